"""Shape letters used in names throughout the package (``acts_SxTxN`` is an array of shape (S, T, N)):

  S  runs: the stacked leading axis of models (seeds x groups x hyperparameters, flattened)
  G  elements of a group (its order |G|); A, B, C index group elements in the roles a, b and c = a·b
  P  input pairs (a, b) of a composition task, P = G² before the train/test split
  T  inputs (tokens, pairs) over which activations are collected
  B  a batch of inputs
  N  neurons (hidden units) of one model
  V  vocabulary / output classes (padded group order in a mixed-group bucket)
  D  dimension of an irreducible representation
  R  irreducible representations of a group
  K  checkpointed steps
  M  neurons of all S models flattened (S·N), in the correlation kernels
  H  column groups of a screened correlation: each model's neurons, then each model's rotated neurons
  J  candidate neurons a screen keeps per neuron and column group
  U  rotated neurons whose rotation a screened pass takes (the union of the candidates), per model
  F  neurons whose correlations with every neuron are computed in full
  Z  pairs of runs (a, b) compared by a convergent-learning pass
  O  values of the L1 penalty λ in a sparse-prediction sweep
  Y  rows of an image or of a conv layer's feature map (its height)
  X  columns of an image or of a conv layer's feature map (its width)
  E  channels of an image, or the input channels of a conv layer (its output channels are its units, N)
"""
