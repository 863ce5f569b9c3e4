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
*dead*: it correlates 0 with everything, appears in ``dead_SxN`` and never produces a NaN.

The baseline (``baseline='rotation'``) mixes model ``j``'s neurons by a random orthogonal (Haar) matrix
``Q_j`` before taking the same maximum. Rotated neurons are linear mixtures of the centred activations, so
their co-moments follow from the unrotated ones (``C' = C·Q_j`` on the ``j`` side and ``Q_jᵀ·C_jj·Q_j``
for their variances) and the data are read once for both the maximum and its baseline.

Entry points:
  * :func:`max_correlation` — activations in memory (an array) or a re-iterable source of batches (a
    callable returning an iterator); picks the Pallas kernel or the XLA path, and row blocks with several
    passes over the source when the co-moment of all neurons exceeds ``memory_bytes``.
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

from kernels import pallas_correlation

BACKENDS = ("auto", "xla", "pallas")
BASELINES = (None, "rotation")
DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_DEAD_RTOL = 1e-6
_HIGHEST = lax.Precision.HIGHEST
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")

Source = Callable[[], Iterator]


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
  """

  max_SxNxS: jax.Array
  argmax_SxNxS: jax.Array
  dead_SxN: jax.Array
  baseline_max_SxNxS: jax.Array | None = None
  baseline_argmax_SxNxS: jax.Array | None = None


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


def rotations(key: jax.Array, n_models: int, n_neurons: int) -> jax.Array:
  """Haar-random orthogonal matrices ``Q_SxNxN``, one per model (``Q_j`` from ``fold_in(key, j)``).

  QR of a Gaussian matrix with the signs of R's diagonal moved into Q, which makes the distribution
  uniform on O(N) rather than biased by the QR convention.
  """
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n_models))

  def one(k):
    q, r = jnp.linalg.qr(jax.random.normal(k, (n_neurons, n_neurons), jnp.float32))
    d = jnp.diagonal(r)
    return q * jnp.where(d < 0, -1.0, 1.0)[None, :]

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


def _reduce_rows(cov_RxSxN, rowinv_R, colinv_SxN, row_start, *, exclude_self):
  """Normalise a co-moment row block and reduce it to (max, argmax) over each model's neurons.

  Written as one elementwise-then-reduce expression so XLA fuses it: the normalised block is not stored.
  ``row_start`` (may be traced) is the flattened index of row 0, used to exclude each neuron itself.
  """
  r, s, n = cov_RxSxN.shape
  corr = jnp.clip(cov_RxSxN * rowinv_R[:, None, None] * colinv_SxN[None], -1.0, 1.0)
  if exclude_self:
    row = row_start + lax.broadcasted_iota(jnp.int32, (r, s, n), 0)
    col = (lax.broadcasted_iota(jnp.int32, (r, s, n), 1) * n
           + lax.broadcasted_iota(jnp.int32, (r, s, n), 2))
    corr = jnp.where(row == col, -jnp.inf, corr)
  best_RxS = jnp.max(corr, axis=-1)
  arg_RxS = jnp.argmax(corr, axis=-1).astype(jnp.int32)
  empty = best_RxS == -jnp.inf
  return jnp.where(empty, 0.0, best_RxS), jnp.where(empty, -1, arg_RxS)


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


def _update(state: CoMoments, acts_SxBxN: jax.Array) -> CoMoments:
  s, b, n = acts_SxBxN.shape
  x = acts_SxBxN.astype(jnp.float32)
  n_a = state.count.astype(jnp.float32)
  n_ab = n_a + b
  # Shift by the running mean (or the batch's first input when empty): then the batch mean is a small
  # number computed accurately, and delta = mean_b - mean_a needs no cancellation of large values.
  shift_SxN = jnp.where(state.count > 0, state.mean_SxN, x[:, 0, :])
  d_SxBxN = x - shift_SxN[:, None, :]
  dmean_SxN = jnp.mean(d_SxBxN, axis=1)
  dc_SxBxN = d_SxBxN - dmean_SxN[:, None, :]
  delta_SxN = (shift_SxN - state.mean_SxN) + dmean_SxN
  w = n_a * b / n_ab  # Chan et al.: C = C_a + C_b + δ_x δ_y · n_a n_b / n
  mean_SxN = state.mean_SxN + delta_SxN * (b / n_ab)
  m2_SxN = state.m2_SxN + jnp.sum(jnp.square(dc_SxBxN), axis=1) + w * jnp.square(delta_SxN)

  r = state.n_rows
  dc_MxB = dc_SxBxN.transpose(0, 2, 1).reshape(s * n, b)
  delta_M = delta_SxN.reshape(s * n)
  rows_RxB = lax.dynamic_slice_in_dim(dc_MxB, state.row_start, r)
  cov_RxM = lax.dot_general(rows_RxB, dc_MxB, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                            preferred_element_type=jnp.float32)
  delta_rows_R = lax.dynamic_slice_in_dim(delta_M, state.row_start, r)
  comoment = state.comoment_RxSxN + (cov_RxM + w * delta_rows_R[:, None] * delta_M[None, :]).reshape(r, s, n)
  within = state.within_SxNxN
  if within is not None:
    within = within + jnp.einsum("sbn,sbm->snm", dc_SxBxN, dc_SxBxN, precision=_HIGHEST) + (
        w * delta_SxN[:, :, None] * delta_SxN[:, None, :])
  return CoMoments(count=state.count + b, mean_SxN=mean_SxN, m2_SxN=m2_SxN, comoment_RxSxN=comoment,
                   within_SxNxN=within, finite=state.finite & jnp.all(jnp.isfinite(x)),
                   row_start=state.row_start)


_update_jit = jax.jit(_update, donate_argnums=0)


def update(state: CoMoments, acts_SxBxN) -> CoMoments:
  """Merge a batch of B inputs (``acts_SxBxN``, any B >= 1) into ``state``. The old state is donated."""
  _check_acts(acts_SxBxN, "acts_SxBxN", min_t=1)
  s, _, n = acts_SxBxN.shape
  if (s, n) != state.shape:
    raise CorrelationError(f"batch has (S, N) = {(s, n)} but the state holds {state.shape}")
  return _update_jit(state, jnp.asarray(acts_SxBxN))


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


def _default_block_rows(m: int, memory_bytes: int, rotation: bool) -> int:
  per_row = 4 * m * (3 if rotation else 2)  # co-moment row, fused temporaries, rotated row
  return int(max(8, min(m, (memory_bytes // per_row) // 8 * 8 or 8)))


def _models_per_block(s: int, n: int, memory_bytes: int, rotation: bool,
                      block_rows: int | None) -> int:
  """Models per square block of the XLA path: about S·N/8 neurons (so the triangle of block pairs saves
  ~45% of the products), at least 256 neurons for efficient products, and within the memory budget."""
  if block_rows is not None:
    return int(min(s, max(1, -(-block_rows // n))))
  m = s * n
  target = min(max(m // 8, 256), 2048)
  per_block = 4 * target * target * (4 if rotation else 2)
  while target > n and per_block > memory_bytes:
    target //= 2
    per_block = 4 * target * target * (4 if rotation else 2)
  return int(min(s, max(1, target // n)))


def _pair_reduce(cov_RxR, inv_row_R, inv_col_SbxN, q_SbxNxN, rotinv_SbxN, *, self_offset_ok):
  """(max, argmax[, baseline]) of block rows against the block's column models, each ``R×G``."""
  r = cov_RxR.shape[0]
  g, n = inv_col_SbxN.shape
  cov_RxGxN = cov_RxR.reshape(r, g, n)
  outs = _reduce_rows(cov_RxGxN, inv_row_R, inv_col_SbxN, jnp.where(self_offset_ok, 0, -r - 1),
                      exclude_self=True)
  if q_SbxNxN is not None:
    rot_RxGxN = jnp.einsum("rgk,gkn->rgn", cov_RxGxN, q_SbxNxN, precision=_HIGHEST)
    outs += _reduce_rows(rot_RxGxN, inv_row_R, rotinv_SbxN, 0, exclude_self=False)
  return outs


@functools.partial(jax.jit, static_argnames=("models_per_block", "dead_rtol"))
def _xla_max(acts_SxTxN, q_SxNxN, *, models_per_block, dead_rtol):
  """Square blocks of G models; only block pairs (b, c) with b <= c are multiplied.

  The co-moment is symmetric: block (b, c) read along its rows gives block b's neurons against models of
  c, and read along its columns gives c's neurons against models of b, so the lower triangle of products
  is never computed (about half the FLOPs of XᵀX). The rotation acts on the column side of each reading.
  """
  s, t, n = acts_SxTxN.shape
  g = models_per_block
  nb = -(-s // g)
  sp, r = nb * g, g * n
  mean, m2, xc_SxTxN = _moments(acts_SxTxN.astype(jnp.float32))
  dead, tol = _dead(jnp.float32(t), mean, m2, dead_rtol)
  inv_SxN = _inv_std(m2, dead)
  xcT_SxNxT = xc_SxTxN.transpose(0, 2, 1)
  # Padded models are zero with inverse std 0; they only fill output columns that are sliced off.
  xc_MpxT = jnp.pad(xcT_SxNxT, ((0, sp - s), (0, 0), (0, 0))).reshape(sp * n, t)
  inv_SpxN = jnp.pad(inv_SxN, ((0, sp - s), (0, 0)))
  q = rotinv_SpxN = None
  if q_SxNxN is not None:
    within = jnp.einsum("snt,smt->snm", xcT_SxNxT, xcT_SxNxT, precision=_HIGHEST)
    q, rotinv_SxN = _rotated_inv_std(q_SxNxN, within, dead, tol)
    q = jnp.pad(q, ((0, sp - s), (0, 0), (0, 0)))
    rotinv_SpxN = jnp.pad(rotinv_SxN, ((0, sp - s), (0, 0)))
  pairs = np.array([(b, c) for b in range(nb) for c in range(b, nb)], np.int32)
  n_out = 2 if q is None else 4
  init_outs = tuple(jnp.zeros((sp * n, sp), jnp.float32 if k % 2 == 0 else jnp.int32)
                    for k in range(n_out))

  def models(x, c):
    return lax.dynamic_slice_in_dim(x, c * g, g) if x is not None else None

  def step(outs, bc):
    b, c = bc[0], bc[1]
    rows_b = lax.dynamic_slice_in_dim(xc_MpxT, b * r, r)
    rows_c = lax.dynamic_slice_in_dim(xc_MpxT, c * r, r)
    cov_RxR = lax.dot_general(rows_b, rows_c, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                              preferred_element_type=jnp.float32)
    inv_b, inv_c = models(inv_SpxN, b), models(inv_SpxN, c)
    # Column reading first: on a diagonal block (b == c) the row reading below overwrites it.
    col = _pair_reduce(cov_RxR.T, inv_c.reshape(r), inv_b, models(q, b), models(rotinv_SpxN, b),
                       self_offset_ok=b == c)
    row = _pair_reduce(cov_RxR, inv_b.reshape(r), inv_c, models(q, c), models(rotinv_SpxN, c),
                       self_offset_ok=b == c)
    outs = tuple(lax.dynamic_update_slice(o, v, (c * r, b * g)) for o, v in zip(outs, col))
    outs = tuple(lax.dynamic_update_slice(o, v, (b * r, c * g)) for o, v in zip(outs, row))
    return outs, None

  outs, _ = lax.scan(step, init_outs, jnp.asarray(pairs))
  row_dead = dead.reshape(s * n)
  outs = tuple(o[:s * n, :s] for o in outs)
  outs = tuple(jnp.where(row_dead[:, None], -1, o) if o.dtype == jnp.int32 else o for o in outs)
  return outs, dead


@functools.partial(jax.jit, static_argnames=("platform", "interpret", "block_rows", "block_t",
                                             "dead_rtol"))
def _pallas_max(acts_SxTxN, q_SxNxN, *, platform, interpret, block_rows, block_t, dead_rtol):
  s, t, n = acts_SxTxN.shape
  np_, br, bt = pallas_correlation.block_sizes(platform, s, n, t, block_rows, block_t)
  tp = -(-t // bt) * bt
  mean, m2, xc_SxTxN = _moments(acts_SxTxN.astype(jnp.float32))
  dead, tol = _dead(jnp.float32(t), mean, m2, dead_rtol)
  inv_SxN = _inv_std(m2, dead)
  # Zero padding of neurons and inputs: padded inputs add nothing to any co-moment, padded neurons have
  # inverse std 0 and are masked out of the max inside the kernel.
  xcT_SxNxT = xc_SxTxN.transpose(0, 2, 1)
  xc_SxNpxTp = jnp.pad(xcT_SxNxT, ((0, 0), (0, np_ - n), (0, tp - t)))
  inv_SxNp = jnp.pad(inv_SxN, ((0, 0), (0, np_ - n)))
  kwargs = {}
  if q_SxNxN is not None:
    within = jnp.einsum("snt,smt->snm", xcT_SxNxT, xcT_SxNxT, precision=_HIGHEST)
    q, rotinv_SxN = _rotated_inv_std(q_SxNxN, within, dead, tol)
    kwargs = dict(q_SxNpxNp=jnp.pad(q, ((0, 0), (0, np_ - n), (0, np_ - n))),
                  rotinv_SxNp=jnp.pad(rotinv_SxN, ((0, 0), (0, np_ - n))))
  outs = pallas_correlation.fused_max(xc_SxNpxTp, inv_SxNp, n=n, platform=platform, block_rows=br,
                                      block_t=bt, interpret=interpret, **kwargs)
  row_dead = dead.reshape(s * n)
  outs = tuple(o[:, :n, :].reshape(s * n, s) for o in outs)
  outs = tuple(jnp.where(row_dead[:, None], -1, o) if o.dtype == jnp.int32 else o for o in outs)
  return outs, dead


# --------------------------------------------------------------------------------------------------
# A re-iterable source: row blocks, one pass over the batches per block


def _stream(source: Source, q_fn, *, memory_bytes, block_rows, dead_rtol):
  try:
    first = next(iter(source()))
  except StopIteration:
    raise CorrelationError("source yielded no batches") from None
  _check_acts(first, "batch", min_t=1)
  s, _, n = first.shape
  m = s * n
  rotation = q_fn is not None
  if block_rows is None:
    block_rows = m if 4 * m * m * (3 if rotation else 2) <= memory_bytes else _default_block_rows(
        m, memory_bytes, rotation)
  if block_rows < 1:
    raise CorrelationError(f"block_rows must be >= 1, got {block_rows}")
  block_rows = min(block_rows, m)
  q = q_fn(s, n) if rotation else None
  within = None
  # Results are written in place block by block (donated buffers): only O(S·N·S) is ever held, once.
  outs = tuple(jnp.zeros((m, s), dtype) for dtype in (jnp.float32, jnp.int32) * (2 if rotation else 1))
  dead, count = None, None
  done = 0  # rows finished so far
  while done < m:
    # Every block has the same size (the last one is moved back to end at row m and its overlap with the
    # previous block dropped), so the update and the reduction compile once.
    start = min(done, m - block_rows)
    # The first pass also collects each model's own co-moment for the rotated variances.
    state = init(s, n, rows=(start, start + block_rows), within=rotation and done == 0 and block_rows < m)
    for batch in source():
      state = update(state, batch)
    if count is None:
      count = int(state.count)
      if count < 2:
        raise CorrelationError(f"need at least 2 inputs, the source yielded {count}")
    elif int(state.count) != count:
      raise CorrelationError(f"source is not re-iterable: {int(state.count)} inputs in a later pass, "
                             f"{count} in the first")
    if not bool(state.finite):
      raise CorrelationError("activations contain NaN or infinity")
    if rotation and within is None:
      within = state.within_SxNxN if state.within_SxNxN is not None else _within_from_full(state)
    block_outs, dead = _finalize_rows(state, q, within, dead_rtol=dead_rtol)
    del state
    # The last block may overlap the previous one: its rows are recomputed and written again.
    outs = _write_rows(outs, block_outs, start)
    done = start + block_rows
  return outs, dead, s, n


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(outs, block_outs, start):
  return tuple(lax.dynamic_update_slice_in_dim(o, b, start, axis=0) for o, b in zip(outs, block_outs))


# --------------------------------------------------------------------------------------------------
# Public entry points


def max_correlation(acts_SxTxN, *, backend: str = "auto", baseline: str | None = None,
                    key: jax.Array | None = None, memory_bytes: int = DEFAULT_MEMORY_BYTES,
                    block_rows: int | None = None, block_t: int | None = None,
                    dead_rtol: float = DEFAULT_DEAD_RTOL, platform: str | None = None,
                    interpret: bool | None = None) -> MaxCorrelation:
  """Max Pearson correlation of every neuron with each model's neurons, and its argmax.

  Args:
    acts_SxTxN: activations of S models on the same T inputs, an array; or a *source*: a callable that
      returns a fresh iterator of ``acts_SxBxN`` batches each time it is called (batch sizes may differ;
      every call must yield the same data). A source is accumulated in float32 with Chan's parallel
      merge; when the co-moment of all S·N neurons exceeds ``memory_bytes`` it is computed in row blocks,
      one pass over the source per block, so peak memory does not grow with T.
    backend: 'pallas' (fused kernel), 'xla', or 'auto' (Pallas on GPU/TPU, XLA on CPU). Applies to
      arrays; a source is accumulated with XLA matrix products (its co-moment must persist across
      batches, so there is nothing left to fuse) and reduced in one XLA fusion.
    baseline: None or 'rotation' (model j's neurons mixed by a Haar-random orthogonal ``Q_j``).
    key: PRNG key for the rotations (``Q_j`` from ``fold_in(key, j)``, see :func:`rotations`).
    memory_bytes: budget for the co-moment block (and the XLA path's row blocks).
    block_rows: rows per block, overriding the budget: for a source, the co-moment rows kept per pass;
      for the XLA path, the side of its square blocks (rounded up to whole models); for Pallas, the
      kernel's row block.
    block_t: the Pallas kernel's input block.
    dead_rtol: a neuron is dead when its std is <= dead_rtol · max(|mean|, 1).
    platform: Pallas variant, 'tpu' or 'gpu'; default from ``jax.default_backend()`` ('tpu' on CPU).
    interpret: run Pallas in the interpreter; default True on CPU.

  Returns:
    :class:`MaxCorrelation` with ``max_SxNxS``, ``argmax_SxNxS``, ``dead_SxN`` (and baseline fields).
  """
  _check_options(backend, baseline, key, dead_rtol)
  if memory_bytes <= 0:
    raise CorrelationError(f"memory_bytes must be positive, got {memory_bytes}")
  q_fn = (lambda s, n: rotations(key, s, n)) if baseline == "rotation" else None
  if callable(acts_SxTxN) and not hasattr(acts_SxTxN, "shape"):
    outs, dead, s, n = _stream(acts_SxTxN, q_fn, memory_bytes=memory_bytes, block_rows=block_rows,
                               dead_rtol=dead_rtol)
    return _assemble(outs, dead, s, n)
  if isinstance(acts_SxTxN, Iterator):
    raise CorrelationError("a source must be a callable returning an iterator (it is read several "
                           "times), not an iterator")
  _check_acts(acts_SxTxN)
  acts = jnp.asarray(acts_SxTxN)
  chex.assert_rank(acts, 3)
  if not bool(jnp.all(jnp.isfinite(acts))):
    raise CorrelationError("activations contain NaN or infinity")
  s, t, n = acts.shape
  q = q_fn(s, n) if q_fn is not None else None
  if resolve_backend(backend) == "pallas":
    platform = platform or _pallas_platform()
    if platform not in pallas_correlation.PLATFORMS:
      raise CorrelationError(f"platform must be one of {pallas_correlation.PLATFORMS}, got {platform!r}")
    if interpret is None:
      interpret = jax.default_backend() == "cpu"
    outs, dead = _pallas_max(acts, q, platform=platform, interpret=bool(interpret),
                             block_rows=block_rows, block_t=block_t, dead_rtol=dead_rtol)
  else:
    g = _models_per_block(s, n, memory_bytes, q is not None, block_rows)
    outs, dead = _xla_max(acts, q, models_per_block=g, dead_rtol=dead_rtol)
  return _assemble(outs, dead, s, n)


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
