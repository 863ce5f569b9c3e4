"""Byte-level language modelling, as in *Universal Neurons in GPT2* (Gurnee et al. 2024), at toy scale.

``corpus``: the byte corpus (the Python standard library by default), split by file and fingerprinted.
``models``: a GPT-style byte transformer. ``family``: the seam (``FAMILY``). ``analysis``: the
universal-neurons pass and per-neuron properties per cohort. ``report``: the family's report sections.
``view``: the notebook view of its run directories.
"""

from universality.engine.families.lm.family import FAMILY

__all__ = ["FAMILY"]
