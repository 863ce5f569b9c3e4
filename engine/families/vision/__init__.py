"""Image classification with conv nets, as in *Convergent Learning* (Li et al. 2016).

``data``: the images (scikit-learn's digits built in; MNIST IDX, CIFAR binary and .npz read without pickle),
split and fingerprinted. ``models``: conv nets as pure functions with named activations per layer.
``family``: the seam (``FAMILY``). ``analysis``: per layer, cross-seed unit correlation against a rotation
baseline, CKA and the Convergent Learning passes. ``report``: the family's report sections. ``view``: the
notebook view of its run directories.
"""

from universality.engine.families.vision.family import FAMILY

__all__ = ["FAMILY"]
