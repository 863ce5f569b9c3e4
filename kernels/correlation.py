"""Neuron-to-neuron Pearson correlation across models, reduced to the best match per model.

For activations ``acts_SxTxN`` of S models (or seeds, or layers) on the same T inputs, every neuron ``n`` of
model ``i`` is correlated with every neuron of every model ``j`` and only the maximum correlation over model
``j``'s neurons and its argmax are kept: ``max_SxNxS[i, n, j]``. For ``j == i`` the neuron itself is
excluded. The full ``(S·N)²`` correlation tensor is never held: it is produced block by block, normalised
and reduced where it is made (inside the Pallas kernel, or inside one XLA fusion), so memory stays
``O(block · S·N)`` and the cost is that of the matrix product.

Numerics are float32 throughout and stable for activations far from zero: data are shifted by a reference
sample before any sum, batches are merged with the parallel update of Chan, Golub & LeVeque (means, M2
and co-moments, never raw Σx² or Σxy), and a neuron whose variance is zero (relative to its mean) is
*dead*: it correlates 0 with everything, appears in ``dead_SxN`` and never produces a NaN. Chan's
co-moment update ``C += C_b + (n_a·n_b/n)·δδᵀ`` is applied as one matrix product of the batch centred on
its own mean with one extra column ``sqrt(n_a·n_b/n)·δ`` (:func:`_chan_batch`): the exact parallel
update, at the cost of one GEMM-accumulate into the co-moment, in place.

The baseline (``baseline='rotation'``) mixes model ``j``'s neurons by a random orthogonal (Haar) matrix
``Q_j`` before taking the same maximum. Rotated neurons are linear mixtures of the centred activations, so
their co-moments follow from the unrotated ones (``C' = C·Q_j`` on the ``j`` side and ``Q_jᵀ·C_jj·Q_j``
for their variances) and the data are read once for both the maximum and its baseline.

Entry points:
  * :func:`max_correlation` — activations in memory (an array) or a re-iterable source of batches (a
    callable returning an iterator); picks the Pallas kernel or the XLA path. A source is accumulated as
    the upper triangle of co-moment tiles, in several passes over it when those exceed ``memory_bytes``.
  * :func:`excess_correlation` — max, baseline and their difference (mean over the other models).
  * :func:`init` / :func:`update` / :func:`finalize` — the streaming accumulator (:class:`CoMoments`).
  * :func:`comoments`, :func:`correlation_matrix`, :func:`correlation_from_comoments` — the full matrix
    and per-pair co-moments for small cases (e.g. one-to-one matching on the correlation matrix).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from universality.kernels import pallas_correlation

BACKENDS = ("auto", "xla", "pallas")
BASELINES = (None, "rotation")
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_DEAD_RTOL = 1e-6
_HIGHEST = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands: A·Bᵀ
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")

Source = Callable[[], Iterator]


XLA_BATCH = 1024  # inputs per accumulate step when an in-memory array goes through the tiled XLA path


class CorrelationError(ValueError):
  """Activations, sources or options that the correlation kernels cannot use."""


# --------------------------------------------------------------------------------------------------
# Results and state


class MaxCorrelation(NamedTuple):
  """Best match of every neuron in every model.

  Attributes:
    max_SxNxS: ``[i, n, j]`` the largest Pearson correlation of neuron ``n`` of model ``i`` with a neuron
      of model ``j`` (the neuron itself excluded when ``j == i``).
    argmax_SxNxS: the index of that neuron in model ``j``; -1 for a dead neuron ``n`` or when model ``j``
      has no candidate (``j == i`` and ``N == 1``).
    dead_SxN: neurons with zero variance; they correlate 0 with everything.
    baseline_max_SxNxS, baseline_argmax_SxNxS: the same against model ``j``'s neurons mixed by a random
      orthogonal matrix (``baseline='rotation'``), else None. For ``j == i`` nothing is excluded: a
      rotated neuron is a mixture that contains neuron ``n`` itself, so that entry is not a baseline and
      :func:`excess_correlation` leaves it out of the mean.
    settled_SxN: how each neuron's maxima were found when a screen chose the pass
      (:mod:`universality.kernels.screen`: exact pass, screen, or full row), else None.
    margin: the screen's margin (``z / sqrt(T₁)``), else None.
  """

  max_SxNxS: jax.Array
  argmax_SxNxS: jax.Array
  dead_SxN: jax.Array
  baseline_max_SxNxS: jax.Array | None = None
  baseline_argmax_SxNxS: jax.Array | None = None
  settled_SxN: jax.Array | None = None
  margin: float | None = None


class Excess(NamedTuple):
  """Max correlation, its rotation baseline, their difference, and its mean over the other models."""

  max_SxNxS: jax.Array
  baseline_SxNxS: jax.Array
  excess_SxNxS: jax.Array
  mean_excess_SxN: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["count", "mean_SxN", "m2_SxN", "comoment_RxSxN", "within_SxNxN", "finite",
                                "row_start"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class CoMoments:
  """Streaming second moments of S·N neurons (flattened model-major: neuron ``n`` of model ``s`` is
  ``s·N + n``).

  Attributes:
    count: int32 scalar, inputs seen.
    mean_SxN: running mean of every neuron.
    m2_SxN: Σ (x - mean)² of every neuron.
    comoment_RxSxN: Σ (x_r - mean_r)(x - mean) for the R flattened neurons ``row_start .. row_start+R``
      against all S·N neurons; with all rows, ``comoment_RxSxN.reshape(S, N, S, N)[i, :, j, :]`` is the
      co-moment block of models ``i`` and ``j``.
    within_SxNxN: co-moment of each model with itself, tracked for the rotation baseline when the rows do
      not cover every model (else None).
    finite: whether every activation seen was finite.
    row_start: int32 scalar, first flattened neuron of the row block. It is data, not a static field, so
      every row block of one size shares one compiled update.
  """

  count: jax.Array
  mean_SxN: jax.Array
  m2_SxN: jax.Array
  comoment_RxSxN: jax.Array
  within_SxNxN: jax.Array | None
  finite: jax.Array
  row_start: jax.Array

  @property
  def n_rows(self) -> int:
    return self.comoment_RxSxN.shape[0]

  @property
  def rows(self) -> tuple[int, int]:
    start = int(self.row_start)
    return start, start + self.n_rows

  @property
  def shape(self) -> tuple[int, int]:
    """(S, N)."""
    return tuple(self.mean_SxN.shape)

  @property
  def covers_all_rows(self) -> bool:
    s, n = self.shape
    return self.n_rows == s * n


# --------------------------------------------------------------------------------------------------
# Helpers shared by every path


def rotations(key: jax.Array, n_models: int, n_neurons: int, blocks: int = 1) -> jax.Array:
  """Haar-random orthogonal matrices ``Q_SxNxN``, one per model (``Q_j`` from ``fold_in(key, j)``).

  QR of a Gaussian matrix with the signs of R's diagonal moved into Q, which makes the distribution
  uniform on O(N) rather than biased by the QR convention. ``blocks`` > 1: each ``Q_j`` is block-diagonal,
  ``blocks`` independent Haar matrices of ``N / blocks`` neurons each (block b from
  ``fold_in(Q_j's key, b)``): the neurons of one layer mixed only among themselves, as Gurnee et al.
  rotated layer by layer.
  """
  if blocks < 1 or n_neurons % blocks:
    raise CorrelationError(f"rotation blocks must divide the {n_neurons} neurons of a model, got {blocks}")
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n_models))
  m = n_neurons // blocks

  def haar(k):
    q, r = jnp.linalg.qr(jax.random.normal(k, (m, m), jnp.float32))
    d = jnp.diagonal(r)
    return q * jnp.where(d < 0, -1.0, 1.0)[None, :]

  if blocks == 1:
    return jax.vmap(haar)(keys)

  def one(k):
    q_blocks = jax.vmap(lambda b: haar(jax.random.fold_in(k, b)))(jnp.arange(blocks))
    eye = jnp.eye(blocks, dtype=jnp.float32)
    return jnp.einsum("bij,bc->bicj", q_blocks, eye).reshape(n_neurons, n_neurons)

  return jax.vmap(one)(keys)


def _dead(count, mean_SxN, m2_SxN, rtol):
  """Zero-variance neurons, relative to the float32 resolution of their mean, and that tolerance on M2."""
  tol_SxN = count * jnp.square(rtol * jnp.maximum(jnp.abs(mean_SxN), 1.0))
  return m2_SxN <= tol_SxN, tol_SxN


def _inv_std(m2, dead):
  return jnp.where(dead, 0.0, lax.rsqrt(jnp.where(dead, 1.0, m2)))


def _rotated_inv_std(q_SxNxN, within_SxNxN, dead_SxN, tol_SxN):
  """Dead-masked rotation and inverse std of the rotated neurons: diag(Qᵀ·C_jj·Q) from co-moments."""
  q = jnp.where(dead_SxN[:, :, None], 0.0, q_SxNxN)  # a dead neuron contributes nothing to a mixture
  var_SxN = jnp.einsum("skn,skl,sln->sn", q, within_SxNxN, q, precision=_HIGHEST)
  tol_rot_SxN = jnp.einsum("skn,sk->sn", jnp.square(q), tol_SxN, precision=_HIGHEST)
  return q, _inv_std(var_SxN, var_SxN <= tol_rot_SxN)


def _max_argmax(x, axis):
  """Max along ``axis`` and the first index attaining it.

  Two plain reductions (max, then min of the indices where the max is attained) rather than one
  variadic (value, index) reduction: XLA:CPU vectorises the plain ones and runs the variadic one element
  by element, about 5× slower on a correlation tile.
  """
  best = jnp.max(x, axis=axis)
  idx = lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
  arg = jnp.min(jnp.where(x == jnp.expand_dims(best, axis), idx, x.shape[axis]), axis=axis)
  empty = best == -jnp.inf
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, arg)


def _reduce_rows(cov_RxSxN, rowinv_R, colinv_SxN, row_start, *, exclude_self):
  """Normalise a co-moment row block and reduce it to (max, argmax) over each model's neurons.

  Written as elementwise-then-reduce expressions so XLA fuses them: the normalised block is not stored.
  ``row_start`` (may be traced) is the flattened index of row 0, used to exclude each neuron itself.
  """
  r, s, n = cov_RxSxN.shape
  corr = jnp.clip(cov_RxSxN * rowinv_R[:, None, None] * colinv_SxN[None], -1.0, 1.0)
  if exclude_self:
    row = row_start + lax.broadcasted_iota(jnp.int32, (r, s, n), 0)
    col = (lax.broadcasted_iota(jnp.int32, (r, s, n), 1) * n
           + lax.broadcasted_iota(jnp.int32, (r, s, n), 2))
    corr = jnp.where(row == col, -jnp.inf, corr)
  return _max_argmax(corr, -1)


def _reduce_cols(cov_AxNxC, inv_AxN, colinv_C, col_start, *, exclude_self):
  """The column reading of a co-moment block: for every column, (max, argmax) over each row model's N
  neurons, each ``C×G``. Reducing over the major axis keeps the columns contiguous (vector lanes).

  ``col_start`` (may be traced) is the flattened index of column 0 relative to row 0.
  """
  g, n, c = cov_AxNxC.shape
  # The column's own inverse std is a positive factor common to the whole reduction: applied afterwards.
  x = cov_AxNxC * inv_AxN[:, :, None]
  if exclude_self:
    row = lax.broadcasted_iota(jnp.int32, x.shape, 0) * n + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    x = jnp.where(row == col_start + lax.broadcasted_iota(jnp.int32, x.shape, 2), -jnp.inf, x)
  best_AxC, arg_AxC = _max_argmax(x, 1)
  best_AxC = jnp.clip(best_AxC * colinv_C[None, :], -1.0, 1.0)
  return best_AxC.T, arg_AxC.T


def _moments(acts_SxTxN):
  """Mean, M2 and centred activations, shifted by the first input so large means lose no precision."""
  shift_Sx1xN = acts_SxTxN[:, :1, :]
  d_SxTxN = acts_SxTxN - shift_Sx1xN
  dmean_SxN = jnp.mean(d_SxTxN, axis=1)
  xc_SxTxN = d_SxTxN - dmean_SxN[:, None, :]
  return shift_Sx1xN[:, 0, :] + dmean_SxN, jnp.sum(jnp.square(xc_SxTxN), axis=1), xc_SxTxN


def _check_acts(acts, name="acts_SxTxN", min_t=2):
  if not hasattr(acts, "shape") or not hasattr(acts, "dtype"):
    raise CorrelationError(f"{name} must be an array, got {type(acts).__name__}")
  if len(acts.shape) != 3:
    raise CorrelationError(f"{name} must have rank 3 (models, inputs, neurons), got shape {acts.shape}")
  s, t, n = acts.shape
  if s < 1 or n < 1 or t < min_t:
    raise CorrelationError(f"{name} needs S >= 1, N >= 1 and T >= {min_t}, got shape {acts.shape}")
  if not jnp.issubdtype(acts.dtype, jnp.floating):
    raise CorrelationError(f"{name} must be floating point, got {acts.dtype}")


def _check_options(backend, baseline, key, dead_rtol):
  if backend not in BACKENDS:
    raise CorrelationError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if baseline not in BASELINES:
    raise CorrelationError(f"baseline must be one of {BASELINES}, got {baseline!r}")
  if baseline == "rotation" and key is None:
    raise CorrelationError("baseline='rotation' needs a PRNG key")
  if not 0.0 <= dead_rtol < 1e-2:
    raise CorrelationError(f"dead_rtol must be in [0, 1e-2), got {dead_rtol}")


def resolve_backend(backend: str = "auto") -> str:
  """'auto' -> 'pallas' on GPU and TPU, 'xla' elsewhere (Pallas only interprets on CPU)."""
  if backend not in BACKENDS:
    raise CorrelationError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    return "pallas" if jax.default_backend() in _ACCELERATORS else "xla"
  return backend


def _pallas_platform() -> str:
  return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


# --------------------------------------------------------------------------------------------------
# Streaming accumulator


def init(n_models: int, n_neurons: int, *, rows: tuple[int, int] | None = None,
         within: bool = False) -> CoMoments:
  """Empty co-moments for ``n_models × n_neurons`` neurons.

  Args:
    rows: flattened neuron range ``(start, stop)`` whose co-moment rows are kept (default: all). A row
      block against all columns is what one pass of the multi-pass path holds.
    within: also keep each model's own ``N×N`` co-moment (the rotation baseline needs it when ``rows``
      does not cover every model).
  """
  s, n = int(n_models), int(n_neurons)
  if s < 1 or n < 1:
    raise CorrelationError(f"need at least one model and one neuron, got S={s}, N={n}")
  start, stop = (0, s * n) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= start < stop <= s * n:
    raise CorrelationError(f"rows must satisfy 0 <= start < stop <= S·N={s * n}, got {rows}")
  zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
  return CoMoments(count=jnp.zeros((), jnp.int32), mean_SxN=zeros((s, n)), m2_SxN=zeros((s, n)),
                   comoment_RxSxN=zeros((stop - start, s, n)),
                   within_SxNxN=zeros((s, n, n)) if within else None,
                   finite=jnp.ones((), bool), row_start=jnp.asarray(start, jnp.int32))


def _chan_batch(count, mean_SxN, m2_SxN, x_SxBxN, b):
  """Merge a batch into the running count, mean and M2 (Chan, Golub & LeVeque's parallel update).

  Only the first ``b`` inputs of ``x_SxBxN`` are data (``b`` may be traced; the rest is padding, so one
  compiled update serves every batch size up to B). Also returns ``aug_SxNxK`` with K = B + 1: the batch
  centred on its own mean, neuron-major and zero on padding, followed by one more column
  ``sqrt(n_a·b/n)·δ`` (δ = batch mean - running mean). Then ``aug_r·aug_cᵀ = C_b + (n_a·b/n)·δ_r·δ_c``
  is exactly Chan's co-moment increment, so merging a batch into a co-moment block is one
  GEMM-accumulate: no raw Σxy is ever formed and the rank-one correction costs one column of K, not a
  second read and write of the block.
  """
  s, bmax, n = x_SxBxN.shape
  x = x_SxBxN.astype(jnp.float32)
  valid_1xBx1 = (lax.broadcasted_iota(jnp.int32, (1, bmax, 1), 1) < b)
  n_a = count.astype(jnp.float32)
  n_b = jnp.asarray(b, jnp.float32)
  n_ab = n_a + n_b
  # Shift by the running mean (or the batch's first input when empty): then the batch mean is a small
  # number computed accurately, and δ = mean_b - mean_a needs no cancellation of large values.
  shift_SxN = jnp.where(count > 0, mean_SxN, x[:, 0, :])
  d_SxBxN = jnp.where(valid_1xBx1, x - shift_SxN[:, None, :], 0.0)
  dmean_SxN = jnp.sum(d_SxBxN, axis=1) / n_b
  dc_SxBxN = jnp.where(valid_1xBx1, d_SxBxN - dmean_SxN[:, None, :], 0.0)
  delta_SxN = (shift_SxN - mean_SxN) + dmean_SxN
  w = n_a * n_b / n_ab
  mean_SxN = mean_SxN + delta_SxN * (n_b / n_ab)
  m2_SxN = m2_SxN + jnp.sum(jnp.square(dc_SxBxN), axis=1) + w * jnp.square(delta_SxN)
  aug_SxNxK = jnp.concatenate([dc_SxBxN.transpose(0, 2, 1), (jnp.sqrt(w) * delta_SxN)[:, :, None]], axis=2)
  finite = jnp.all(jnp.isfinite(jnp.where(valid_1xBx1, x, 0.0)))
  return count + b, mean_SxN, m2_SxN, aug_SxNxK, finite


def _update(state: CoMoments, acts_SxBxN: jax.Array, valid=None) -> CoMoments:
  s, b, n = acts_SxBxN.shape
  count, mean_SxN, m2_SxN, aug_SxNxK, finite = _chan_batch(state.count, state.mean_SxN, state.m2_SxN,
                                                            acts_SxBxN, b if valid is None else valid)
  r, k = state.n_rows, b + 1
  aug_MxK = aug_SxNxK.reshape(s * n, k)
  rows_RxK = lax.dynamic_slice_in_dim(aug_MxK, state.row_start, r)
  comoment = state.comoment_RxSxN + lax.dot_general(
      rows_RxK, aug_MxK, _NT, precision=_HIGHEST, preferred_element_type=jnp.float32).reshape(r, s, n)
  within = state.within_SxNxN
  if within is not None:
    within = within + jnp.einsum("snk,smk->snm", aug_SxNxK, aug_SxNxK, precision=_HIGHEST)
  return CoMoments(count=count, mean_SxN=mean_SxN, m2_SxN=m2_SxN, comoment_RxSxN=comoment,
                   within_SxNxN=within, finite=state.finite & finite, row_start=state.row_start)


_update_jit = jax.jit(_update, donate_argnums=0)


def update(state: CoMoments, acts_SxBxN, valid: int | None = None) -> CoMoments:
  """Merge a batch of B inputs (``acts_SxBxN``, any B >= 1) into ``state``. The old state is donated.

  ``valid``: only the first ``valid`` inputs are data (the rest pads a last batch to the shape of the
  others, so one compiled update serves them all); default all B.
  """
  _check_acts(acts_SxBxN, "acts_SxBxN", min_t=1)
  s, b, n = acts_SxBxN.shape
  if (s, n) != state.shape:
    raise CorrelationError(f"batch has (S, N) = {(s, n)} but the state holds {state.shape}")
  if valid is None:
    return _update_jit(state, jnp.asarray(acts_SxBxN))
  if not 1 <= valid <= b:
    raise CorrelationError(f"valid must be in [1, {b}], got {valid}")
  return _update_jit(state, jnp.asarray(acts_SxBxN), jnp.int32(valid))


@functools.partial(jax.jit, static_argnames=("dead_rtol",))
def _finalize_rows(state: CoMoments, q_SxNxN, within_SxNxN, *, dead_rtol):
  """(max, argmax[, baseline max, argmax]) of the state's rows, each ``R×S``, and the dead mask."""
  s, n = state.shape
  start, r = state.row_start, state.n_rows
  dead_SxN, tol_SxN = _dead(state.count.astype(jnp.float32), state.mean_SxN, state.m2_SxN, dead_rtol)
  inv_SxN = _inv_std(state.m2_SxN, dead_SxN)
  rowinv_R = lax.dynamic_slice_in_dim(inv_SxN.reshape(s * n), start, r)
  row_dead_R = lax.dynamic_slice_in_dim(dead_SxN.reshape(s * n), start, r)
  outs = _reduce_rows(state.comoment_RxSxN, rowinv_R, inv_SxN, start, exclude_self=True)
  if q_SxNxN is not None:
    q, rotinv_SxN = _rotated_inv_std(q_SxNxN, within_SxNxN, dead_SxN, tol_SxN)
    rot_RxSxN = jnp.einsum("rsk,skn->rsn", state.comoment_RxSxN, q, precision=_HIGHEST)
    outs += _reduce_rows(rot_RxSxN, rowinv_R, rotinv_SxN, start, exclude_self=False)
  outs = tuple(jnp.where(row_dead_R[:, None], -1, o) if o.dtype == jnp.int32 else o for o in outs)
  return outs, dead_SxN


def _within_from_full(state: CoMoments):
  s, n = state.shape
  blocks_SxNxSxN = state.comoment_RxSxN.reshape(s, n, s, n)
  return jnp.diagonal(blocks_SxNxSxN, axis1=0, axis2=2).transpose(2, 0, 1)


def _assemble(outs, dead_SxN, s, n) -> MaxCorrelation:
  shaped = [o.reshape(s, n, s) for o in outs]
  if len(shaped) == 2:
    shaped += [None, None]
  return MaxCorrelation(shaped[0], shaped[1], dead_SxN, shaped[2], shaped[3])


def finalize(state: CoMoments, *, baseline: str | None = None, key: jax.Array | None = None,
             dead_rtol: float = DEFAULT_DEAD_RTOL) -> MaxCorrelation:
  """Max correlation (and optional rotation baseline) from co-moments that cover every row."""
  _check_options("xla", baseline, key, dead_rtol)
  if not state.covers_all_rows:
    raise CorrelationError(f"state holds rows {state.rows} only; use max_correlation(source) for row blocks")
  if int(state.count) < 2:
    raise CorrelationError(f"need at least 2 inputs, the state has seen {int(state.count)}")
  if not bool(state.finite):
    raise CorrelationError("activations contain NaN or infinity")
  s, n = state.shape
  q = rotations(key, s, n) if baseline == "rotation" else None
  within = _within_from_full(state) if q is not None else None
  outs, dead = _finalize_rows(state, q, within, dead_rtol=dead_rtol)
  return _assemble(outs, dead, s, n)


# --------------------------------------------------------------------------------------------------
# Small cases: the full matrix and the per-pair co-moments


def comoments(acts_SxTxN) -> CoMoments:
  """Co-moments of all S·N neurons in one pass (every pair block ``(i, j)`` available)."""
  _check_acts(acts_SxTxN)
  s, _, n = acts_SxTxN.shape
  return update(init(s, n), acts_SxTxN)


@functools.partial(jax.jit, static_argnames=("dead_rtol",))
def _corr_from_state(state, dead_rtol):
  s, n = state.shape
  dead, _ = _dead(state.count.astype(jnp.float32), state.mean_SxN, state.m2_SxN, dead_rtol)
  inv = _inv_std(state.m2_SxN, dead)
  rowinv = lax.dynamic_slice_in_dim(inv.reshape(s * n), state.row_start, state.n_rows)
  corr = jnp.clip(state.comoment_RxSxN * rowinv[:, None, None] * inv[None], -1.0, 1.0)
  return corr.reshape(state.n_rows, s * n)


def correlation_from_comoments(state: CoMoments, *, dead_rtol: float = DEFAULT_DEAD_RTOL) -> jax.Array:
  """Pearson correlation ``corr_RxSN`` of the state's rows against all S·N neurons (dead rows/cols 0)."""
  if int(state.count) < 2:
    raise CorrelationError(f"need at least 2 inputs, the state has seen {int(state.count)}")
  return _corr_from_state(state, dead_rtol)


def correlation_matrix(acts_SxTxN, *, dead_rtol: float = DEFAULT_DEAD_RTOL) -> jax.Array:
  """Full Pearson correlation ``corr_SNxSN`` (flattened model-major) for small cases; dead neurons 0.

  ``corr.reshape(S, N, S, N)[i, :, j, :]`` is the block of models i and j, e.g. for Hungarian matching.
  """
  return correlation_from_comoments(comoments(acts_SxTxN), dead_rtol=dead_rtol)


# --------------------------------------------------------------------------------------------------
# Activations in memory: one fused pass


def _pallas_max(acts_SxTxN, q_SxNxN, *, platform, interpret, block_rows, block_t, block_n, dead_rtol):
  s, t, n = acts_SxTxN.shape
  np_, br, bt = pallas_correlation.block_sizes(platform, s, n, t, block_rows, block_t)
  bn, rotate_in_kernel = pallas_correlation.column_block(platform, np_, br, bt, q_SxNxN is not None,
                                                         block_n)
  tp = -(-t // bt) * bt
  mean, m2, xc_SxTxN = _moments(acts_SxTxN.astype(jnp.float32))
  dead, tol = _dead(jnp.float32(t), mean, m2, dead_rtol)
  inv_SxN = _inv_std(m2, dead)
  # Zero padding of neurons and inputs: padded inputs add nothing to any co-moment, padded neurons have
  # inverse std 0 and are masked out of the max inside the kernel.
  xcT_SxNxT = xc_SxTxN.transpose(0, 2, 1)
  xc_SxNpxTp = jnp.pad(xcT_SxNxT, ((0, 0), (0, np_ - n), (0, tp - t)))
  inv_SxNp = jnp.pad(inv_SxN, ((0, 0), (0, np_ - n)))
  call = functools.partial(pallas_correlation.fused_max, n=n, platform=platform, block_rows=br,
                           block_t=bt, block_n=bn, interpret=interpret)
  if q_SxNxN is None:
    outs = call(xc_SxNpxTp, inv_SxNp)
  else:
    within = jnp.einsum("snt,smt->snm", xcT_SxNxT, xcT_SxNxT, precision=_HIGHEST)
    q, rotinv_SxN = _rotated_inv_std(q_SxNxN, within, dead, tol)
    q_SxNpxNp = jnp.pad(q, ((0, 0), (0, np_ - n), (0, np_ - n)))
    rotinv_SxNp = jnp.pad(rotinv_SxN, ((0, 0), (0, np_ - n)))
    if rotate_in_kernel:
      outs = call(xc_SxNpxTp, inv_SxNp, q_SxNpxNp=q_SxNpxNp, rotinv_SxNp=rotinv_SxNp)
    else:
      # A model's co-moment does not fit the kernel at once: rotate the activations instead and take
      # the baseline as a second maximum against them (rotated neurons are not excluded).
      rot_SxNpxTp = jnp.einsum("skt,skn->snt", xc_SxNpxTp, q_SxNpxNp, precision=_HIGHEST)
      outs = call(xc_SxNpxTp, inv_SxNp) + call(xc_SxNpxTp, inv_SxNp, cols_SxNpxTp=rot_SxNpxTp,
                                                rotinv_SxNp=rotinv_SxNp, exclude_self=False)
  row_dead = dead.reshape(s * n)
  outs = tuple(o[:, :n, :].reshape(s * n, s) for o in outs)
  outs = tuple(jnp.where(row_dead[:, None], -1, o) if o.dtype == jnp.int32 else o for o in outs)
  return outs, dead


# --------------------------------------------------------------------------------------------------
# A re-iterable source: the upper triangle of co-moment tiles, one pass over the batches per set of rows

_TILE_TARGET = 512  # neurons per tile side: a W×K×W product per tile runs near the matmul rate on CPU


@dataclasses.dataclass(frozen=True)
class _TilePlan:
  """How the S·N × S·N co-moment of a source is cut into tiles and passes.

  Tiles are ``W×W`` with ``W = A·N`` (A whole models, so each tile reduces to complete per-model maxima);
  models are padded to ``Sp = NC·A``. Only tiles (i, j) with j >= i + skip are accumulated: the co-moment
  is symmetric, and tile (i, j) read along its columns gives chunk j's neurons against chunk i's models.
  ``skip`` is 1 when the blocks of a model with itself are not wanted and every tile holds one model
  (A = 1): the diagonal tiles are then exactly those blocks and are never computed. A pass holds the tiles
  of row chunks ``c0 .. c1`` (row chunk i needs ``NC - i - skip`` tiles, so later passes take more rows
  within the same budget) in a pool of ``n_tiles`` tiles.
  """

  s: int
  n: int
  g: int
  nc: int
  n_tiles: int
  passes: tuple[tuple[int, int], ...]
  skip: int = 0

  @property
  def w(self) -> int:
    return self.g * self.n

  @property
  def sp(self) -> int:
    return self.nc * self.g


def _tile_base(i, c0, nc, skip=0):
  """Pool index of row chunk i's first tile (i, i + skip) in the pass starting at row chunk c0:
  Σ_{c0 <= i' < i} (nc - i' - skip)."""
  return (i - c0) * (nc - skip) - (i * (i - 1) - c0 * (c0 - 1)) // 2


def _plan_tiles(s: int, n: int, memory_bytes: int, block_rows: int | None, within: bool = True) -> _TilePlan:
  g = max(1, min(s, _TILE_TARGET // n))
  max_chunks = None
  if block_rows is not None:
    g = min(g, -(-block_rows // n))
    max_chunks = max(1, block_rows // (g * n))
  # One row chunk (NC tiles) must fit: narrower tiles shrink it (NC·W² = Sp·G·N²).
  while g > 1 and 4 * (-(-s // g)) * (g * n) ** 2 > memory_bytes:
    g //= 2
  nc = -(-s // g)
  w = g * n
  skip = int(not within and g == 1 and nc > 1)
  budget = memory_bytes // (4 * w * w)
  if budget < nc - skip:
    raise CorrelationError(f"memory_bytes={memory_bytes} cannot hold one model's co-moment rows against all "
                           f"{s * n} neurons ({4 * (nc - skip) * w * w} bytes); raise it")
  passes, c0, used_max = [], 0, 0
  last = nc - skip  # with skip, the last row chunk has no tile of its own
  while c0 < last:
    c1, used = c0, 0
    while c1 < last and used + nc - c1 - skip <= budget and (max_chunks is None or c1 - c0 < max_chunks):
      used += nc - c1 - skip
      c1 += 1
    passes.append((c0, c1))
    used_max = max(used_max, used)
    c0 = c1
  return _TilePlan(s=s, n=n, g=g, nc=nc, n_tiles=used_max, passes=tuple(passes), skip=skip)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["count", "mean_SxN", "m2_SxN", "pool_QxWxW", "within_SxNxN", "finite"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Tiles:
  """One pass's accumulator: moments of every neuron and the co-moment tiles of its row chunks."""

  count: jax.Array
  mean_SxN: jax.Array
  m2_SxN: jax.Array
  pool_QxWxW: jax.Array
  within_SxNxN: jax.Array | None
  finite: jax.Array


def _tiles_init(plan: _TilePlan, within: bool, pool_QxWxW=None) -> _Tiles:
  s, n, w = plan.s, plan.n, plan.w
  # A pool from an earlier pass is reused as it is: the first batch of a pass overwrites its tiles.
  pool = jnp.zeros((plan.n_tiles, w, w), jnp.float32) if pool_QxWxW is None else pool_QxWxW
  return _Tiles(count=jnp.zeros((), jnp.int32), mean_SxN=jnp.zeros((s, n), jnp.float32),
                m2_SxN=jnp.zeros((s, n), jnp.float32), pool_QxWxW=pool,
                within_SxNxN=jnp.zeros((s, n, n), jnp.float32) if within else None,
                finite=jnp.ones((), bool))


@functools.partial(jax.jit, static_argnames=("g", "nc", "skip"), donate_argnums=0)
def _tiles_update(st: _Tiles, x_SxBxN, b, c0, c1, *, g, nc, skip):
  """Merge one (padded) batch of ``b`` inputs into the tiles of row chunks ``c0 .. c1`` (traced, so every
  pass and every batch size share one compilation). Each tile is one in-place GEMM-accumulate of the
  augmented batch (see :func:`_chan_batch`); its W×W product stays in cache. The first batch of a pass
  overwrites its tiles, so a pool reused from the previous pass needs no zeroing."""
  s, _, n = x_SxBxN.shape
  w = g * n
  count, mean_SxN, m2_SxN, aug_SxNxK, finite = _chan_batch(st.count, st.mean_SxN, st.m2_SxN, x_SxBxN, b)
  k = aug_SxNxK.shape[-1]
  aug_MpxK = jnp.pad(aug_SxNxK, ((0, nc * g - s), (0, 0), (0, 0))).reshape(nc * w, k)
  fresh = st.count == 0

  def row_chunk(i, pool):
    a_WxK = lax.dynamic_slice_in_dim(aug_MpxK, i * w, w)
    base = _tile_base(i, c0, nc, skip) - i - skip

    def tile(j, pool):
      prod_WxW = lax.dot_general(a_WxK, lax.dynamic_slice_in_dim(aug_MpxK, j * w, w), _NT,
                                 precision=_HIGHEST, preferred_element_type=jnp.float32)
      t = base + j
      acc_1xWxW = jnp.where(fresh, 0.0, lax.dynamic_slice_in_dim(pool, t, 1)) + prod_WxW[None]
      return lax.dynamic_update_slice_in_dim(pool, acc_1xWxW, t, 0)

    return lax.fori_loop(i + skip, nc, tile, pool)

  pool = lax.fori_loop(c0, c1, row_chunk, st.pool_QxWxW)
  within = st.within_SxNxN
  if within is not None:
    within = within + jnp.einsum("snk,smk->snm", aug_SxNxK, aug_SxNxK, precision=_HIGHEST)
  return _Tiles(count=count, mean_SxN=mean_SxN, m2_SxN=m2_SxN, pool_QxWxW=pool, within_SxNxN=within,
                finite=st.finite & finite)


@functools.partial(jax.jit, static_argnames=("nc", "skip", "dead_rtol"), donate_argnums=0)
def _tiles_finalize(outs, st: _Tiles, q_SpxNxN, rotinv_SpxN, c0, c1, *, nc, skip, dead_rtol):
  """Write max/argmax (and the baseline) of the pass's tiles into ``outs`` (each ``Sp×N×Sp``, donated).

  Tile (i, j) read along rows gives chunk i's neurons against chunk j's models; read along columns, chunk
  j's neurons against chunk i's models. Normalisation, masking and the max/argmax run tile by tile, so
  no normalised block larger than a tile is ever stored.
  """
  s, n = st.mean_SxN.shape
  sp = outs[0].shape[0]
  g = sp // nc
  w = g * n
  dead_SxN, tol_SxN = _dead(st.count.astype(jnp.float32), st.mean_SxN, st.m2_SxN, dead_rtol)
  # Padded models: inverse std 0 (they correlate 0) and marked dead (their argmax rows are sliced off).
  inv_SpxN = jnp.pad(_inv_std(st.m2_SxN, dead_SxN), ((0, sp - s), (0, 0)))
  inv_Mp = inv_SpxN.reshape(sp * n)
  dead_Mp = jnp.pad(dead_SxN, ((0, sp - s), (0, 0)), constant_values=True).reshape(sp * n)

  def rows_of(x, r):
    return lax.dynamic_slice_in_dim(x, r * w, w)

  def models_of(x, c):
    return lax.dynamic_slice_in_dim(x, c * g, g)

  def finish(outs_, row_dead_W):
    outs_ = tuple(jnp.where(row_dead_W[:, None], -1, o) if o.dtype == jnp.int32 else o for o in outs_)
    return tuple(o.reshape(g, n, g) for o in outs_)

  def row_reading(cov_WxW, i, j):
    """Chunk i's neurons against chunk j's models (``W×A`` each, as ``A×N×A``)."""
    cov_WxAxN = cov_WxW.reshape(w, g, n)
    rowinv_W = rows_of(inv_Mp, i)
    outs_ = _reduce_rows(cov_WxAxN, rowinv_W, models_of(inv_SpxN, j), jnp.where(i == j, 0, -w - 1),
                         exclude_self=True)
    if q_SpxNxN is not None:
      rot_WxAxN = jnp.einsum("rgk,gkn->rgn", cov_WxAxN, models_of(q_SpxNxN, j), precision=_HIGHEST)
      outs_ += _reduce_rows(rot_WxAxN, rowinv_W, models_of(rotinv_SpxN, j), 0, exclude_self=False)
    return finish(outs_, rows_of(dead_Mp, i))

  def col_reading(cov_WxW, i, j):
    """Chunk j's neurons against chunk i's models, read down the columns of tile (i, j)."""
    cov_AxNxW = cov_WxW.reshape(g, n, w)
    colinv_W = rows_of(inv_Mp, j)
    outs_ = _reduce_cols(cov_AxNxW, models_of(inv_SpxN, i), colinv_W, jnp.where(i == j, 0, -w - 1),
                         exclude_self=True)
    if q_SpxNxN is not None:
      rot_AxNxW = jnp.einsum("gkc,gkn->gnc", cov_AxNxW, models_of(q_SpxNxN, i), precision=_HIGHEST)
      outs_ += _reduce_cols(rot_AxNxW, models_of(rotinv_SpxN, i), colinv_W, 0, exclude_self=False)
    return finish(outs_, rows_of(dead_Mp, j))

  def write(outs, values, r, c):
    return tuple(lax.dynamic_update_slice(o, v, (r * g, 0, c * g)) for o, v in zip(outs, values))

  def row_chunk(i, outs):
    base = _tile_base(i, c0, nc, skip) - i - skip

    def tile(j, outs):
      cov_WxW = lax.dynamic_index_in_dim(st.pool_QxWxW, base + j, keepdims=False)
      # Column reading first: on a diagonal tile the row reading below overwrites it.
      outs = write(outs, col_reading(cov_WxW, i, j), j, i)
      return write(outs, row_reading(cov_WxW, i, j), i, j)

    return lax.fori_loop(i + skip, nc, tile, outs)

  return lax.fori_loop(c0, c1, row_chunk, outs), dead_SxN


@functools.partial(jax.jit, static_argnames=("bmax",))
def _pad_batch(x_SxBxN, *, bmax):
  return jnp.pad(x_SxBxN.astype(jnp.float32), ((0, 0), (0, bmax - x_SxBxN.shape[1]), (0, 0)))


def _batches(source: Source, bmax: int):
  """The source's batches as ``(acts_SxBmaxxN, b)``: short ones zero-padded, long ones split."""
  for batch in source():
    _check_acts(batch, "batch", min_t=1)
    for a in range(0, batch.shape[1], bmax):
      piece = batch if batch.shape[1] <= bmax else batch[:, a:a + bmax]
      b = piece.shape[1]
      if isinstance(piece, np.ndarray):
        # Host batches stay on the host, all of them (one kind of argument, one compilation): a jitted
        # update takes them as they are, the CPU loop of the screened pass (kernels.gathered) reads them
        # without a copy.
        x = piece.astype(np.float32, copy=False)
        yield (x if b == bmax else np.pad(x, ((0, 0), (0, bmax - b), (0, 0)))), b
      elif b == bmax and piece.dtype == jnp.float32:
        yield jnp.asarray(piece), b
      else:
        yield _pad_batch(jnp.asarray(piece), bmax=bmax), b


def _stream(source: Source, q_fn, *, memory_bytes, block_rows, dead_rtol, within=True):
  try:
    first = next(iter(source()))
  except StopIteration:
    raise CorrelationError("source yielded no batches") from None
  _check_acts(first, "batch", min_t=1)
  s, bmax, n = first.shape
  del first
  if block_rows is not None and block_rows < 1:
    raise CorrelationError(f"block_rows must be >= 1, got {block_rows}")
  plan = _plan_tiles(s, n, memory_bytes, block_rows, within)
  rotation = q_fn is not None
  sp, nc = plan.sp, plan.nc
  # The variances of rotated neurons need each model's own co-moment. One pass that accumulates every
  # diagonal tile already holds it; otherwise the first pass collects it beside the tiles.
  own_from_tiles = rotation and len(plan.passes) == 1 and plan.skip == 0
  # Results are written in place tile by tile (donated buffers): only O(S·N·S) is ever held, once. Blocks
  # never computed (a model with itself, when not asked for) keep max 0 and argmax -1.
  outs = tuple(jnp.zeros((sp, n, sp), dtype) if dtype == jnp.float32 else jnp.full((sp, n, sp), -1, dtype)
               for dtype in (jnp.float32, jnp.int32) * (2 if rotation else 1))
  q = rotinv = dead = count = pool = None
  for p, (c0, c1) in enumerate(plan.passes):
    st = _tiles_init(plan, within=rotation and p == 0 and not own_from_tiles, pool_QxWxW=pool)
    c0_, c1_ = jnp.int32(c0), jnp.int32(c1)
    for x, b in _batches(source, bmax):
      if x.shape[0] != s or x.shape[2] != n:
        raise CorrelationError(f"batch has (S, N) = {(x.shape[0], x.shape[2])}, the first had {(s, n)}")
      st = _tiles_update(st, x, jnp.int32(b), c0_, c1_, g=plan.g, nc=nc, skip=plan.skip)
    if count is None:
      count = int(st.count)
      if count < 2:
        raise CorrelationError(f"need at least 2 inputs, the source yielded {count}")
    elif int(st.count) != count:
      raise CorrelationError(f"source is not re-iterable: {int(st.count)} inputs in a later pass, "
                             f"{count} in the first")
    if not bool(st.finite):
      raise CorrelationError("activations contain NaN or infinity")
    if rotation and q is None:
      if own_from_tiles:
        st = _own_from_tiles(st, g=plan.g, nc=nc, s=s)
      q, rotinv = _padded_rotation(q_fn(s, n), st, sp, dead_rtol)
    outs, dead = _tiles_finalize(outs, st, q, rotinv, c0_, c1_, nc=nc, skip=plan.skip, dead_rtol=dead_rtol)
    pool = st.pool_QxWxW
    del st
  del pool
  if sp != s:
    outs = tuple(o[:s, :, :s] for o in outs)
  return outs, dead, s, n


@functools.partial(jax.jit, static_argnames=("g", "nc", "s"))
def _own_from_tiles(st: _Tiles, *, g, nc, s) -> _Tiles:
  """``st`` with ``within_SxNxN`` read from the diagonal blocks of a single pass's diagonal tiles."""
  n = st.mean_SxN.shape[1]
  bases = jnp.asarray([_tile_base(i, 0, nc) for i in range(nc)], jnp.int32)

  def own(m):
    o = (m % g) * n
    return lax.dynamic_slice(st.pool_QxWxW, (bases[m // g], o, o), (1, n, n))[0]

  return dataclasses.replace(st, within_SxNxN=jax.vmap(own)(jnp.arange(s)))


@functools.partial(jax.jit, static_argnames=("sp", "dead_rtol"))
def _padded_rotation(q_SxNxN, st: _Tiles, sp, dead_rtol):
  dead_SxN, tol_SxN = _dead(st.count.astype(jnp.float32), st.mean_SxN, st.m2_SxN, dead_rtol)
  q, rotinv_SxN = _rotated_inv_std(q_SxNxN, st.within_SxNxN, dead_SxN, tol_SxN)
  s = q.shape[0]
  return jnp.pad(q, ((0, sp - s), (0, 0), (0, 0))), jnp.pad(rotinv_SxN, ((0, sp - s), (0, 0)))


# --------------------------------------------------------------------------------------------------
# Public entry points


def max_correlation(acts_SxTxN, *, backend: str = "auto", baseline: str | None = None,
                    key: jax.Array | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                    block_rows: int | None = None, block_t: int | None = None,
                    block_n: int | None = None, dead_rtol: float = DEFAULT_DEAD_RTOL,
                    platform: str | None = None, interpret: bool | None = None,
                    within: bool = True, rotation_blocks: int = 1) -> MaxCorrelation:
  """Max Pearson correlation of every neuron with each model's neurons, and its argmax.

  Args:
    acts_SxTxN: activations of S models on the same T inputs, an array; or a *source*: a callable that
      returns a fresh iterator of ``acts_SxBxN`` batches each time it is called (batch sizes may differ;
      every call must yield the same data). A source is accumulated in float32 with Chan's parallel
      merge, as the upper triangle of ``W×W`` co-moment tiles (one in-place GEMM-accumulate per tile
      and batch); when those tiles exceed ``memory_bytes`` they are taken a set of rows at a time, one
      pass over the source per set, so peak memory does not grow with T.
    backend: 'pallas' (fused kernel), 'xla', or 'auto' (Pallas on GPU/TPU, XLA on CPU). Applies to
      arrays; a source is accumulated with XLA matrix products (its co-moment must persist across
      batches, so there is nothing left to fuse) and reduced tile by tile.
    baseline: None or 'rotation' (model j's neurons mixed by a Haar-random orthogonal ``Q_j``).
    key: PRNG key for the rotations (``Q_j`` from ``fold_in(key, j)``, see :func:`rotations`).
    memory_bytes: budget for the co-moment tiles of the XLA path (a source, or an array on the CPU).
    block_rows: rows per block, within the budget: on the XLA path, at most this many co-moment rows per
      pass (rounded up to whole models; also caps the tile side); for Pallas, the kernel's row block.
    block_t: the Pallas kernel's input block.
    block_n: the Pallas kernel's column tile (neurons of one model per tile); default: the largest that
      fits the platform's VMEM or registers (:func:`universality.kernels.pallas_correlation.column_block`).
    dead_rtol: a neuron is dead when its std is <= dead_rtol · max(|mean|, 1).
    platform: Pallas variant, 'tpu' or 'gpu'; default from ``jax.default_backend()`` ('tpu' on CPU).
    interpret: run Pallas in the interpreter; default True on CPU.
    within: whether to compare each model with itself. With False, ``[i, :, i]`` holds max 0 and argmax -1
      (baseline too) and, on the XLA path with models of at least ``_TILE_TARGET`` neurons (one model per
      tile), the S diagonal co-moment tiles are never computed: S(S−1)/2 tiles instead of S(S+1)/2 (a third
      of the products at 2 models). Cross-seed statistics (excess correlation) need no more.
    rotation_blocks: the baseline's rotation is block-diagonal over this many equal blocks of each model's
      neurons (e.g. its layers: :func:`rotations`); 1: one rotation of all of them.

  Returns:
    :class:`MaxCorrelation` with ``max_SxNxS``, ``argmax_SxNxS``, ``dead_SxN`` (and baseline fields).

  Composes with ``jax.jit`` and ``jax.export`` for an array: the Pallas kernel is traced as it runs, and the
  XLA path, which streams batches through host loops for concrete arrays, takes one shot over all inputs
  (the whole ``S·N × S·N`` co-moment, refused in one line beyond ``memory_bytes``). Traced activations are
  not checked for NaN or infinity: non-finite ones give max NaN and argmax -1. ``platform`` and
  ``interpret`` default from the backend the trace runs on, so an export for another platform names them
  (``platform='tpu', interpret=False``).
  """
  _check_options(backend, baseline, key, dead_rtol)
  if memory_bytes <= 0:
    raise CorrelationError(f"memory_bytes must be positive, got {memory_bytes}")
  q_fn = (lambda s, n: rotations(key, s, n, rotation_blocks)) if baseline == "rotation" else None
  if callable(acts_SxTxN) and not hasattr(acts_SxTxN, "shape"):
    outs, dead, s, n = _stream(acts_SxTxN, q_fn, memory_bytes=memory_bytes, block_rows=block_rows,
                               dead_rtol=dead_rtol, within=within)
    return _without_self(_assemble(outs, dead, s, n), within)
  if isinstance(acts_SxTxN, Iterator):
    raise CorrelationError("a source must be a callable returning an iterator (it is read several "
                           "times), not an iterator")
  _check_acts(acts_SxTxN)
  acts = jnp.asarray(acts_SxTxN)
  chex.assert_rank(acts, 3)
  # Under jax.jit (or any transformation) the activations have no value to check or to stream through host
  # loops; the traced path (``_traced_max``) never converts a device value to a Python one.
  traced = isinstance(acts, jax.core.Tracer)
  if not traced and not bool(jnp.all(jnp.isfinite(acts))):
    raise CorrelationError("activations contain NaN or infinity")
  s, t, n = acts.shape
  if traced:
    return _traced_max(acts, q_fn, backend=backend, memory_bytes=memory_bytes, block_rows=block_rows,
                       block_t=block_t, block_n=block_n, dead_rtol=dead_rtol, platform=platform,
                       interpret=interpret, within=within)
  q = q_fn(s, n) if q_fn is not None else None
  if resolve_backend(backend) == "pallas":
    platform, interpret = _pallas_args(platform, interpret)
    outs, dead = _pallas_max(acts, q, platform=platform, interpret=interpret,
                             block_rows=block_rows, block_t=block_t, block_n=block_n,
                             dead_rtol=dead_rtol)
  else:
    # On the CPU the tiled accumulate of the streamed path (upper-triangle tiles, in place) beats one
    # in-memory product of the whole matrix (measured ~2x on the 16 x 128 x 14,400 benchmark), so an array
    # is fed to it as a source of batches; the results are the same to float32 rounding.
    batches = [acts[:, i:i + XLA_BATCH] for i in range(0, t, XLA_BATCH)]
    outs, dead, s, n = _stream(lambda: iter(batches), q_fn, memory_bytes=memory_bytes,
                               block_rows=block_rows, dead_rtol=dead_rtol, within=within)
  return _without_self(_assemble(outs, dead, s, n), within)


def _pallas_args(platform, interpret):
  platform = platform or _pallas_platform()
  if platform not in pallas_correlation.PLATFORMS:
    raise CorrelationError(f"platform must be one of {pallas_correlation.PLATFORMS}, got {platform!r}")
  return platform, bool(jax.default_backend() == "cpu" if interpret is None else interpret)


def _traced_max(acts, q_fn, *, backend, memory_bytes, block_rows, block_t, block_n, dead_rtol, platform,
                interpret, within) -> MaxCorrelation:
  """``max_correlation`` of traced activations (inside ``jax.jit``, ``jax.export``, ...).

  Pallas runs as on concrete arrays. The XLA path cannot stream batches through host loops, so it takes
  one shot: the whole ``S·N × S·N`` co-moment from all T inputs at once, which it refuses (one line naming
  backend='pallas') when that exceeds ``memory_bytes``. Non-finite activations cannot raise here: they
  give max NaN and argmax -1 for every neuron instead.
  """
  s, _, n = acts.shape
  q = q_fn(s, n) if q_fn is not None else None
  if resolve_backend(backend) == "pallas":
    platform, interpret = _pallas_args(platform, interpret)
    outs, dead = _pallas_max(acts, q, platform=platform, interpret=interpret, block_rows=block_rows,
                             block_t=block_t, block_n=block_n, dead_rtol=dead_rtol)
  else:
    need = 4 * (s * n) ** 2
    if need > memory_bytes:
      raise CorrelationError(
          f"under jax.jit the XLA path holds the whole S·N x S·N co-moment ({need / 2**30:.2f} GiB > "
          f"memory_bytes={memory_bytes}); use backend='pallas', or call max_correlation outside jit")
    state = _update(init(s, n), acts)
    outs, dead = _finalize_rows(state, q, _within_from_full(state) if q is not None else None,
                                dead_rtol=dead_rtol)
  finite = jnp.all(jnp.isfinite(acts))
  outs = tuple(jnp.where(finite, o, -1 if o.dtype == jnp.int32 else jnp.nan) for o in outs)
  return _without_self(_assemble(outs, dead, s, n), within)


def _without_self(res: MaxCorrelation, within: bool) -> MaxCorrelation:
  """With ``within=False``, the blocks of each model with itself as max 0 and argmax -1 on every path."""
  if within:
    return res
  s = res.max_SxNxS.shape[0]
  self_Sx1xS = jnp.eye(s, dtype=bool)[:, None, :]
  fix = lambda x, v: None if x is None else jnp.where(self_Sx1xS, v, x)
  return res._replace(max_SxNxS=fix(res.max_SxNxS, 0.0), argmax_SxNxS=fix(res.argmax_SxNxS, -1),
                      baseline_max_SxNxS=fix(res.baseline_max_SxNxS, 0.0),
                      baseline_argmax_SxNxS=fix(res.baseline_argmax_SxNxS, -1))


def excess_correlation(acts_SxTxN, *, key: jax.Array, **kwargs) -> Excess:
  """Max correlation, rotation baseline, excess = max - baseline, and the mean excess over j != i.

  Accepts everything :func:`max_correlation` does (``baseline`` is set to 'rotation'). With one model
  there is no other model to average over and ``mean_excess_SxN`` is 0.
  """
  res = max_correlation(acts_SxTxN, baseline="rotation", key=key, **kwargs)
  excess = res.max_SxNxS - res.baseline_max_SxNxS
  s = excess.shape[0]
  others_SxS = 1.0 - jnp.eye(s, dtype=excess.dtype)
  mean = jnp.sum(excess * others_SxS[:, None, :], axis=-1) / max(s - 1, 1)
  return Excess(res.max_SxNxS, res.baseline_max_SxNxS, excess, mean)


__all__ = ["BACKENDS", "BASELINES", "CoMoments", "CorrelationError", "Excess", "MaxCorrelation",
           "comoments", "correlation_from_comoments", "correlation_matrix", "excess_correlation",
           "finalize", "init", "max_correlation", "resolve_backend", "rotations", "update"]
