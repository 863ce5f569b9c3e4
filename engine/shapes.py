"""Shape letters used in names throughout the package (``acts_SxTxN`` is an array of shape (S, T, N)).

Shape letters (each means this in every module):

  S  runs: the stacked leading axis of models (seeds x groups x hyperparameters, flattened)
  G  elements of a group (its order |G|), whatever their role: a, b, c = a·b, or g
  P  input pairs (a, b) of a composition task (G² before the train/test split)
  I  the two inputs of a pair, a and b
  T  samples over which activations are collected (tokens, pairs, image positions); positions of a sequence
  U  a subset of the samples (the inputs a k-nearest-neighbour comparison takes)
  B  a batch of inputs
  N  neurons (hidden units, channels) of one model: of one layer, or of all its layers flattened
  V  output classes / vocabulary (the padded group order in a mixed-group bucket)
  D  the model's width (embedding, residual stream)
  R  irreducible representations of a group
  F  the irreps' matrix entries as functions on G, concatenated (Σ d_ρ² = |G|): the group's Fourier basis
  H  rows of an image or of a conv layer's feature map (its height)
  W  columns of an image or of a conv layer's feature map (its width)
  C  channels of an image, or the input channels of a conv layer (its output channels are its neurons, N)
  E  evaluations logged during training (rows of the metrics log)
  K  checkpointed steps
  L  layers of a model
  M  neurons of all S models flattened (S·N)
  Z  pairs of runs (a, b) compared by a convergent-learning pass
  O  points of a λ grid (L1 penalties of a sparse-prediction sweep, points of an interpolation path)

A module may name axes that never leave it with letters of its own, declared in a "Local shape letters"
block of its docstring; those letters are not among the ones above (tests/test_shapes.py checks both).
"""
