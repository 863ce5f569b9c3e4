"""Per-neuron property statistics of *Universal Neurons in GPT2* (Gurnee et al. 2024), streamed.

The paper characterises each neuron by the moments of its activation distribution (mean, variance, skew,
kurtosis, share of inputs where it is non-negative), by how much of its variance a categorical feature of
the input explains (the current byte, the previous byte, the position in the context window), and by the
moments over the vocabulary of the cosine between its output weights and the unembedding (high-kurtosis
neurons with positive skew *predict* a few tokens, with negative skew they *suppress* them). Universal
neurons stand out in exactly these statistics, so they are computed here for every neuron of every run.

Shape letters: B inputs in one batch, M neurons (flattened over whatever the caller stacks: runs, layers,
neurons), C categories of a feature, S runs, N neurons of one run, D model width, V vocabulary entries.

Everything is pure (no I/O): the ``*_update`` functions are jit-compatible step functions
``(state, batch) -> state`` over pytree dataclasses, meant to be jitted once at the caller's boundary or
called inside a ``lax.scan``; padded rows are masked out by ``valid_B`` so one compiled update serves
batches of every size up to B.

Numerics are float32 and stay exact for activations far from zero (means of 1e3 and more): no raw power
sums Σx^k are ever formed. Moments are merged batch by batch with the pairwise formulas of Pébay (2008),
each batch's central moments computed after shifting by the running mean; category sums are taken about a
per-neuron shift fixed by the first batch's mean.

Zero-variance convention (shared by every statistic): a neuron whose standard deviation is at most
``DEFAULT_DEAD_RTOL · max(|mean|, 1)`` (the tolerance of ``universality.kernels.correlation``: below it,
float32 rounding of the mean is all that is left) is *dead*; its skew and kurtosis are 0 and the variance any
feature explains is 0, never NaN. A real distribution has kurtosis >= 1, so ``kurtosis == 0`` marks a dead
neuron unambiguously.

Local shape letters:

  Q  the categories of a token property (its byte, the previous byte, its position)
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_DEAD_RTOL = 1e-6
DEFAULT_KURTOSIS_THRESHOLD = 10.0
N_BYTES = 256
_HIGHEST = lax.Precision.HIGHEST


def _valid_rows(valid_B, b):
  """The row mask as bool ``[B]``; None means every row counts."""
  if valid_B is None:
    return jnp.ones((b,), bool)
  valid_B = jnp.asarray(valid_B)
  chex.assert_shape(valid_B, (b,))
  return valid_B.astype(bool)


def _dead(n, mean_M, m2_M, rtol):
  """Zero variance relative to the float32 resolution of the mean (``n`` float32 scalar)."""
  return m2_M <= n * jnp.square(rtol * jnp.maximum(jnp.abs(mean_M), 1.0))


def _standardized(n, mean_M, m2_M, m3_M, m4_M, rtol):
  """Population variance, skew and (non-excess) kurtosis from central sums; 0 skew and kurtosis if dead."""
  n_safe = jnp.maximum(n, 1.0)
  var_M = m2_M / n_safe
  dead_M = _dead(n, mean_M, m2_M, rtol)
  var_safe_M = jnp.where(dead_M, 1.0, var_M)
  skew_M = jnp.where(dead_M, 0.0, (m3_M / n_safe) / (var_safe_M * jnp.sqrt(var_safe_M)))
  kurt_M = jnp.where(dead_M, 0.0, (m4_M / n_safe) / jnp.square(var_safe_M))
  return var_M, skew_M, kurt_M


# --------------------------------------------------------------------------------------------------
# Moments


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["count", "mean_M", "m2_M", "m3_M", "m4_M", "nonneg_M"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Moments:
  """Streaming central moments of M neurons.

  Attributes:
    count: int32 scalar, inputs seen (an integer so it stays exact past 2^24 inputs).
    mean_M: running mean.
    m2_M, m3_M, m4_M: central sums Σ (x - mean)^k, k = 2, 3, 4.
    nonneg_M: int32, inputs with x >= 0.
  """

  count: jax.Array
  mean_M: jax.Array
  m2_M: jax.Array
  m3_M: jax.Array
  m4_M: jax.Array
  nonneg_M: jax.Array


def moments_init(m: int) -> Moments:
  """Empty moments of ``m`` neurons."""
  zeros = jnp.zeros((int(m),), jnp.float32)
  return Moments(count=jnp.zeros((), jnp.int32), mean_M=zeros, m2_M=zeros, m3_M=zeros, m4_M=zeros,
                 nonneg_M=jnp.zeros((int(m),), jnp.int32))


def moments_update(state: Moments, x_BxM, valid_B=None) -> Moments:
  """Merge a batch into ``state``: its own central moments, then Pébay's (2008) pairwise update.

  The batch is shifted by the running mean (by its first valid row while the state is empty) before its
  mean is taken, so the batch mean is a small number computed accurately and δ = mean_b - mean_a needs no
  cancellation of large values. Rows where ``valid_B`` is False are ignored whatever they hold (padding
  may be NaN). Pure and jit-compatible; the state keeps its dtypes, so a jitted update traces once per
  batch shape.
  """
  x_BxM = jnp.asarray(x_BxM, jnp.float32)
  chex.assert_rank(x_BxM, 2)
  b, m = x_BxM.shape
  chex.assert_shape(state.mean_M, (m,))
  valid_B = _valid_rows(valid_B, b)
  valid_Bx1 = valid_B[:, None]
  x_BxM = jnp.where(valid_Bx1, x_BxM, 0.0)  # padding must not poison the sums (NaN · 0 is NaN)
  n_b_int = jnp.sum(valid_B.astype(jnp.int32))
  n_a = state.count.astype(jnp.float32)
  n_b = n_b_int.astype(jnp.float32)
  n = n_a + n_b
  n_safe = jnp.maximum(n, 1.0)

  first_M = x_BxM[jnp.argmax(valid_B)]  # the first valid row (row 0, zeroed, when none is valid)
  shift_M = jnp.where(state.count > 0, state.mean_M, first_M)
  d_BxM = jnp.where(valid_Bx1, x_BxM - shift_M[None, :], 0.0)
  dmean_M = jnp.sum(d_BxM, axis=0) / jnp.maximum(n_b, 1.0)
  dc_BxM = jnp.where(valid_Bx1, d_BxM - dmean_M[None, :], 0.0)
  dc2_BxM = jnp.square(dc_BxM)
  m2b_M = jnp.sum(dc2_BxM, axis=0)
  m3b_M = jnp.sum(dc2_BxM * dc_BxM, axis=0)
  m4b_M = jnp.sum(jnp.square(dc2_BxM), axis=0)

  # Pébay's formulas with the counts as fractions fa + fb = 1, so no n² or n³ is ever formed.
  fa, fb = n_a / n_safe, n_b / n_safe
  m2a_M, m3a_M = state.m2_M, state.m3_M
  delta_M = (shift_M - state.mean_M) + dmean_M
  delta2_M = jnp.square(delta_M)
  w = n_a * fb  # n_a·n_b/n
  m2_M = m2a_M + m2b_M + w * delta2_M
  m3_M = (m3a_M + m3b_M + (w * (fa - fb)) * delta2_M * delta_M
          + 3.0 * delta_M * (fa * m2b_M - fb * m2a_M))
  m4_M = (state.m4_M + m4b_M + (w * (fa * fa - fa * fb + fb * fb)) * jnp.square(delta2_M)
          + 6.0 * delta2_M * (fa * fa * m2b_M + fb * fb * m2a_M)
          + 4.0 * delta_M * (fa * m3b_M - fb * m3a_M))
  nonneg_M = state.nonneg_M + jnp.sum((valid_Bx1 & (x_BxM >= 0)).astype(jnp.int32), axis=0)
  return Moments(count=state.count + n_b_int, mean_M=state.mean_M + delta_M * fb, m2_M=m2_M, m3_M=m3_M,
                 m4_M=m4_M, nonneg_M=nonneg_M)


def moments_finalize(state: Moments, dead_rtol: float = DEFAULT_DEAD_RTOL) -> dict[str, jax.Array]:
  """``mean``, ``var`` (population, M2/n), ``skew`` (M3/n / var^1.5), ``kurtosis`` (M4/n / var², not
  excess: 3 for a Gaussian) and ``freq_nonneg`` (share of inputs with x >= 0), each ``[M]``.

  Dead neurons (see the module docstring) get skew 0 and kurtosis 0; an empty state gives zeros.
  """
  n = state.count.astype(jnp.float32)
  var_M, skew_M, kurt_M = _standardized(n, state.mean_M, state.m2_M, state.m3_M, state.m4_M, dead_rtol)
  return {"mean": state.mean_M, "var": var_M, "skew": skew_M, "kurtosis": kurt_M,
          "freq_nonneg": state.nonneg_M.astype(jnp.float32) / jnp.maximum(n, 1.0)}


# --------------------------------------------------------------------------------------------------
# Variance explained by a categorical feature


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["count_Q", "sum_QxM", "sumsq_M", "count", "shift_M"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Categories:
  """Streaming per-category sums of M neurons, taken about a fixed shift.

  Attributes:
    count_Q: int32, inputs seen in each category.
    sum_QxM: Σ (x - shift) over the inputs of each category.
    sumsq_M: Σ (x - shift)² over all inputs.
    count: int32 scalar, inputs seen (those with a valid row and a category in [0, C)).
    shift_M: the mean of the first batch that had a valid input; close enough to the mean that the sums
      hold (x - mean) to float32 accuracy even when the mean is large.
  """

  count_Q: jax.Array
  sum_QxM: jax.Array
  sumsq_M: jax.Array
  count: jax.Array
  shift_M: jax.Array

  @property
  def n_categories(self) -> int:
    return self.count_Q.shape[0]


def categories_init(n_categories: int, m: int) -> Categories:
  """Empty sums for ``n_categories`` categories and ``m`` neurons."""
  c, m = int(n_categories), int(m)
  return Categories(count_Q=jnp.zeros((c,), jnp.int32), sum_QxM=jnp.zeros((c, m), jnp.float32),
                    sumsq_M=jnp.zeros((m,), jnp.float32), count=jnp.zeros((), jnp.int32),
                    shift_M=jnp.zeros((m,), jnp.float32))


def categories_update(state: Categories, x_BxM, cat_B, valid_B=None) -> Categories:
  """Add a batch: ``x_BxM`` activations, ``cat_B`` integer category of each input.

  Per-category sums are one matrix product ``onehot_BxQᵀ · (x - shift)_BxM`` (no loop over categories).
  Inputs whose row is not valid, or whose category lies outside ``[0, C)``, are not counted at all (the
  one-hot row of an out-of-range category would be empty; counting it in the total only would charge its
  variance to "within"). Pure and jit-compatible.
  """
  x_BxM = jnp.asarray(x_BxM, jnp.float32)
  chex.assert_rank(x_BxM, 2)
  b, m = x_BxM.shape
  c = state.n_categories
  chex.assert_shape(state.shift_M, (m,))
  cat_B = jnp.asarray(cat_B)
  chex.assert_shape(cat_B, (b,))
  chex.assert_type(cat_B, int)
  cat_B = cat_B.astype(jnp.int32)  # uint8 bytes would wrap in the comparisons below
  valid_B = _valid_rows(valid_B, b) & (cat_B >= 0) & (cat_B < c)
  valid_Bx1 = valid_B[:, None]
  x_BxM = jnp.where(valid_Bx1, x_BxM, 0.0)
  n_b = jnp.sum(valid_B.astype(jnp.int32))
  batch_mean_M = jnp.sum(x_BxM, axis=0) / jnp.maximum(n_b, 1).astype(jnp.float32)
  shift_M = jnp.where(state.count > 0, state.shift_M, batch_mean_M)
  d_BxM = jnp.where(valid_Bx1, x_BxM - shift_M[None, :], 0.0)
  onehot_BxQ = (cat_B[:, None] == jnp.arange(c, dtype=jnp.int32)[None, :]) & valid_Bx1
  sum_QxM = state.sum_QxM + jnp.einsum("bc,bm->cm", onehot_BxQ.astype(jnp.float32), d_BxM,
                                       precision=_HIGHEST)
  return Categories(count_Q=state.count_Q + jnp.sum(onehot_BxQ.astype(jnp.int32), axis=0),
                    sum_QxM=sum_QxM, sumsq_M=state.sumsq_M + jnp.sum(jnp.square(d_BxM), axis=0),
                    count=state.count + n_b, shift_M=shift_M)


def variance_explained(state: Categories, groups_Q=None, dead_rtol: float = DEFAULT_DEAD_RTOL) -> jax.Array:
  """Share of each neuron's variance explained by the category, ``[M]`` in [0, 1].

  Between-category sum of squares Σ_c n_c (mean_c - mean)² over the total Σ (x - mean)². ``groups_Q``
  (integer group id of each category, any values) merges categories first: each category is given its
  group's mean, since Σ_{c∈g} n_c (mean_g - mean)² = n_g (mean_g - mean)², which needs no static number
  of groups (one ``C×C`` same-group product), so it is jit-compatible with traced groups. Dead neurons
  (and an empty state) give 0.
  """
  n_Q = state.count_Q.astype(jnp.float32)
  n = state.count.astype(jnp.float32)
  sum_QxM = state.sum_QxM
  if groups_Q is not None:
    groups_Q = jnp.asarray(groups_Q)
    chex.assert_shape(groups_Q, (state.n_categories,))
    same_QxQ = (groups_Q[:, None] == groups_Q[None, :]).astype(jnp.float32)
    sum_QxM = jnp.matmul(same_QxQ, sum_QxM, precision=_HIGHEST)
    n_group_Q = jnp.matmul(same_QxQ, n_Q, precision=_HIGHEST)
  else:
    n_group_Q = n_Q
  grand_M = jnp.sum(state.sum_QxM, axis=0) / jnp.maximum(n, 1.0)
  mean_QxM = sum_QxM / jnp.maximum(n_group_Q, 1.0)[:, None]
  between_M = jnp.sum(n_Q[:, None] * jnp.square(mean_QxM - grand_M[None, :]), axis=0)
  total_M = state.sumsq_M - n * jnp.square(grand_M)
  dead_M = _dead(n, state.shift_M + grand_M, total_M, dead_rtol)
  return jnp.where(dead_M, 0.0, jnp.clip(between_M / jnp.where(dead_M, 1.0, total_M), 0.0, 1.0))


BYTE_CLASS_NAMES = ("lowercase", "uppercase", "digit", "space", "newline", "tab", "punctuation",
                    "control", "non_ascii")


def byte_classes() -> tuple[tuple[str, ...], np.ndarray]:
  """A fixed partition of the 256 byte values, as ``(names, class_of_byte)`` (``int32[256]``, an index
  into ``names``; usable as ``groups_Q`` of :func:`variance_explained`).

  lowercase a-z; uppercase A-Z; digit 0-9; space (0x20 only); newline (\\n and \\r); tab (\\t);
  punctuation: every other printable ASCII byte (0x21-0x7E, not alphanumeric); control: every other byte
  below 0x20, and DEL (0x7F), including \\v and \\f; non_ascii: 0x80-0xFF (UTF-8 lead and continuation
  bytes alike). A fresh array on every call, so callers may modify it.
  """
  names = BYTE_CLASS_NAMES
  idx = {name: i for i, name in enumerate(names)}
  b = np.arange(N_BYTES)
  cls = np.full(N_BYTES, idx["control"], np.int32)
  cls[(b >= 0x21) & (b <= 0x7E)] = idx["punctuation"]
  cls[(b >= ord("a")) & (b <= ord("z"))] = idx["lowercase"]
  cls[(b >= ord("A")) & (b <= ord("Z"))] = idx["uppercase"]
  cls[(b >= ord("0")) & (b <= ord("9"))] = idx["digit"]
  cls[ord(" ")] = idx["space"]
  cls[[ord("\n"), ord("\r")]] = idx["newline"]
  cls[ord("\t")] = idx["tab"]
  cls[b >= 0x80] = idx["non_ascii"]
  return names, cls


# --------------------------------------------------------------------------------------------------
# Vocabulary composition of output weights


def vocab_composition(w_out_SxNxD, w_u_SxDxV, dead_rtol: float = DEFAULT_DEAD_RTOL) -> dict[str, jax.Array]:
  """Moments over the V vocabulary entries of cos(w_out[n], W_U[:, v]), W_U centred over V first.

  Centring removes the direction every token shares (it moves all logits together and so changes no
  prediction); what is left says which tokens a neuron promotes or suppresses. Returns ``mean``, ``var``
  (population), ``skew`` and ``kurtosis`` (not excess), each ``[S, N]``; a zero weight vector or column
  gives cosine 0, and a neuron whose cosines do not vary gets skew and kurtosis 0. Jit-compatible.
  """
  w_out = jnp.asarray(w_out_SxNxD, jnp.float32)
  w_u = jnp.asarray(w_u_SxDxV, jnp.float32)
  chex.assert_rank([w_out, w_u], 3)
  s, _, d = w_out.shape
  chex.assert_axis_dimension(w_u, 0, s)
  chex.assert_axis_dimension(w_u, 1, d)
  v = w_u.shape[2]
  w_u = w_u - jnp.mean(w_u, axis=2, keepdims=True)

  def unit(a, axis):
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=axis, keepdims=True))
    return a / jnp.where(norm > 0, norm, 1.0)

  cos_SxNxV = jnp.einsum("snd,sdv->snv", unit(w_out, 2), unit(w_u, 1), precision=_HIGHEST)
  mean_SxN = jnp.mean(cos_SxNxV, axis=2)
  dc_SxNxV = cos_SxNxV - mean_SxN[:, :, None]
  dc2_SxNxV = jnp.square(dc_SxNxV)
  sums = [jnp.sum(p, axis=2) for p in (dc2_SxNxV, dc2_SxNxV * dc_SxNxV, jnp.square(dc2_SxNxV))]
  var, skew, kurt = _standardized(jnp.float32(v), mean_SxN, *sums, dead_rtol)
  return {"mean": mean_SxN, "var": var, "skew": skew, "kurtosis": kurt}


def prediction_class(skew, kurtosis, kurtosis_threshold: float = DEFAULT_KURTOSIS_THRESHOLD) -> jax.Array:
  """+1 prediction neuron (kurtosis > threshold, skew > 0), -1 suppression (kurtosis > threshold,
  skew < 0), 0 otherwise; int32, the shape of ``skew``.

  A heavy-tailed composition means a few tokens stand apart from the rest; the skew says whether the
  neuron pushes their logits up or down.
  """
  skew, kurtosis = jnp.asarray(skew), jnp.asarray(kurtosis)
  chex.assert_equal_shape([skew, kurtosis])
  heavy = kurtosis > kurtosis_threshold
  return jnp.where(heavy & (skew > 0), 1, jnp.where(heavy & (skew < 0), -1, 0)).astype(jnp.int32)


__all__ = ["BYTE_CLASS_NAMES", "Categories", "DEFAULT_DEAD_RTOL", "DEFAULT_KURTOSIS_THRESHOLD", "Moments",
           "byte_classes", "categories_init", "categories_update", "moments_finalize", "moments_init",
           "moments_update", "prediction_class", "variance_explained", "vocab_composition"]
