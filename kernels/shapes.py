"""Shape letters of the kernels package (``acts_SxTxN`` is an array of shape (S, T, N)).

The kernels know nothing of groups or language models; they share S, T, B, N and M with
``universality.engine.shapes`` (same meaning) and name their own axes with the rest.

Shape letters (each means this in every module of the package):

  S  models (runs, seeds or layers) whose neurons are compared
  T  samples over which activations are collected (tokens, pairs, image positions); positions of a sequence
  B  a batch of inputs
  N  neurons (hidden units, channels) of one model: of one layer, or of all its layers flattened
  M  neurons of all S models flattened (S·N)
  K  a batch's centred rows plus one mean-shift row (B + 1): the operand of a co-moment update
  R  a block of the M neurons taken as rows of a co-moment
  C  a block of the M neurons taken as columns of a co-moment
  A  models in one tile of the tiled co-moment
  W  neurons of one tile (A·N)
  Q  tiles of the co-moment matrix
  H  column groups of a screened correlation: each model's neurons, then each model's rotated neurons
  J  candidate neurons a screen keeps per neuron and column group
  U  rotated neurons whose rotation a screened pass takes (the union of the candidates), per model
  F  neurons whose correlations with every neuron are computed in full
  P  candidate pairs a screened pass gathers
"""
