"""Composition in a finite group (a·b = ?), as in *A Toy Model of Universality* (Chughtai, Chan, Nanda 2023).

``task``: seeded splits of the |G|² pairs, padding of mixed groups, the masked loss. ``models``: the paper's
MLP and one-layer transformer. ``family``: the seam (``FAMILY``). ``analysis``: irreps and cross-seed passes
per cohort. ``report``: the family's report sections. ``view``: the notebook view of its run directories.
"""

from universality.engine.families.group.family import FAMILY

__all__ = ["FAMILY"]
