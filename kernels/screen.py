"""Screened max correlation: the same maxima as the exact pass, computing exactly only what can win.

The universal-neurons statistic keeps, for each neuron, only the maximum correlation over each other
model's neurons (and over that model's rotated neurons), yet the exact pass
(:func:`universality.kernels.correlation.max_correlation`) forms every co-moment over every input. Here:

1. *Screen* on a sample of ``T₁`` inputs: every correlation ``r̂`` and its standard error
   ``se = sqrt(max(m22, 1) / T₁)``, where ``m22`` is the sample mean of ``x²y²`` of the standardised pair
   (1 for independent Gaussians, larger for heavy tails; for a bivariate Gaussian it bounds the delta-method
   variance ``(1 - r²)²``). Each pair gets the interval ``r̂ ± z·se``. For every neuron and model the
   candidates are the neurons whose upper bound reaches the best lower bound (at least the ``k`` highest
   upper bounds, at most ``max_candidates``); the highest upper bound left out is the *bar*.
2. *Exact over all T* for the candidate pairs only (a gathered product: each row's few candidate columns,
   rows grouped by candidate count), in one pass that also takes the full rows of the neurons the sample
   could not separate (their bar reaches their best lower bound, or they were constant on the sample).
3. *Check*: a neuron is settled by the screen when its exact winner exceeds its bar; the others get their
   whole row computed exactly over all T in one more pass. Every reported maximum and argmax is then an
   exact full-T correlation; the only residual risk is a neuron left out whose sample estimate was off by
   more than ``z`` standard errors.

A neuron constant on the sample may vary over all T, so as a column it is a candidate of every row and
as a row it takes its full row. Rotated neurons (``baseline='rotation'``) are columns like any other: the
gathered product reads the rotations of the candidate rotated neurons only; a neuron whose rotated
maximum is not settled needs every rotated neuron of that model, i.e. each model's own co-moment, which
costs what the exact pass pays for it.

Results are :class:`universality.kernels.correlation.MaxCorrelation` with ``settled_SxN`` (``SETTLED_*``:
exact pass, screen, or full row) and ``margin`` (``z / sqrt(T₁)``, the half-width for ``m22 = 1``; None
when the exact pass ran). Under
``jax.jit`` (traced activations) the data-dependent candidate sets have no static shape, so the exact
pass runs and ``settled_SxN`` says so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from universality.kernels import correlation as kc

MODES = ("auto", "off", "on")
SETTLED_EXACT, SETTLED_SCREEN, SETTLED_FULL_ROW = 0, 1, 2
_HIGHEST = lax.Precision.HIGHEST
_ROW_BLOCK = 256  # rows of the sample correlation screened at once: R × H·N floats in memory
_GATHER_ROWS = 32  # rows per step of the gathered product
# Relative cost of one gathered pair against one co-moment entry of the exact pass's GEMM on the CPU
# (gather-bound, measured ~3.5 GB/s against ~130 GFLOP/s), used by 'auto' to judge whether screening pays.
_PAIR_COST = 40.0


@dataclasses.dataclass(frozen=True)
class Screen:
  """How :func:`max_correlation` screens.

  Attributes:
    mode: 'off' (the exact pass), 'on' (screen whenever the data hold more than ``tokens`` inputs),
      'auto' (screen when there are at least ``8 × tokens`` inputs and the sample predicts the screen does
      less than half the exact pass's work).
    tokens: T₁, inputs of the sample (the first T₁ of a source; spread evenly over an array).
    z: the margin in standard errors of a sample correlation.
    k: candidates kept per neuron and model at least.
    max_candidates: at most this many; a neuron needing more takes its full row.
    inputs: how many inputs a source holds, when the caller knows (lets 'auto' decide before reading it).
  """

  mode: str = "auto"
  tokens: int = 1 << 15
  z: float = 5.0
  k: int = 1
  max_candidates: int = 32
  inputs: int | None = None

  def may_screen(self) -> bool:
    """False when the mode or the size of the data rule the screen out before any is read."""
    small = self.inputs is not None and self.inputs < (8 if self.mode == "auto" else 1) * self.tokens
    return self.mode != "off" and not small

  @property
  def margin(self) -> float:
    return self.z / math.sqrt(self.tokens)

  def check(self) -> "Screen":
    if self.mode not in MODES:
      raise kc.CorrelationError(f"screen mode must be one of {MODES}, got {self.mode!r}")
    if int(self.tokens) < 16:
      raise kc.CorrelationError(f"screen tokens must be >= 16, got {self.tokens}")
    if not (math.isfinite(self.z) and self.z > 0):
      raise kc.CorrelationError(f"screen z must be positive and finite, got {self.z}")
    if not 1 <= int(self.k) <= int(self.max_candidates):
      raise kc.CorrelationError(f"screen needs 1 <= k <= max_candidates, got k={self.k}, "
                                f"max_candidates={self.max_candidates}")
    return self


def settings(mode: str = "auto", tokens: int = 1 << 15, z: float = 5.0, k: int = 1,
             max_candidates: int = 32, inputs: int | None = None) -> Screen:
  """A checked :class:`Screen` from plain values (e.g. a config's ``analysis.screen*`` fields)."""
  return Screen(str(mode), int(tokens), float(z), int(k), int(max_candidates),
                None if inputs is None else int(inputs)).check()


# --------------------------------------------------------------------------------------------------
# Phase 1: the sample


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the sample decided, per row neuron (flattened, M = S·N) and column group (H: the S models, then
  their S rotations with a baseline).

  Attributes:
    cand_MxHxJ: candidate neurons (within the group's model), -1 for none.
    bar_MxH: the highest upper bound among the neurons left out (-inf when none is left out).
    full_MxH: the sample could not separate the winner: the row is computed in full for this group.
    skip_MxH: groups not wanted (a model with itself when ``within=False``).
    sample_dead_M: rows constant on the sample.
  """

  cand_MxHxJ: np.ndarray
  bar_MxH: np.ndarray
  full_MxH: np.ndarray
  skip_MxH: np.ndarray
  sample_dead_M: np.ndarray


def _standardise(xc_SxTxN, dead_rtol, mean_SxN):
  """Unit-norm columns (0 where dead on the sample), their squares scaled so that Σ_t z²·w² is m22, and the
  dead mask."""
  t = xc_SxTxN.shape[1]
  m2 = jnp.sum(jnp.square(xc_SxTxN), axis=1)
  dead, _ = kc._dead(jnp.float32(t), mean_SxN, m2, dead_rtol)  # pylint: disable=protected-access
  inv = kc._inv_std(m2, dead)  # pylint: disable=protected-access
  z = xc_SxTxN * inv[:, None, :]
  return z, jnp.square(z) * jnp.sqrt(jnp.float32(t)), dead


@functools.partial(jax.jit, static_argnames=("dead_rtol",))
def _sample_columns(sample_SxTxN, q_SxNxN, *, dead_rtol):
  """Standardised sample of the rows ``[S, T₁, N]`` and of the column groups ``[H, T₁, N]`` (the models,
  then their rotations), with ``m22`` factors and dead masks."""
  x = sample_SxTxN.astype(jnp.float32)
  mean = jnp.mean(x, axis=1)
  xc = x - mean[:, None, :]
  zr, zr2, dead = _standardise(xc, dead_rtol, mean)
  cols, cols2, cdead = [zr], [zr2], [dead]
  if q_SxNxN is not None:
    y = jnp.einsum("stk,skn->stn", xc, q_SxNxN, precision=_HIGHEST)
    zy, zy2, ydead = _standardise(y, dead_rtol, jnp.zeros_like(mean))
    cols, cols2, cdead = cols + [zy], cols2 + [zy2], cdead + [ydead]
  return zr, zr2, dead, jnp.concatenate(cols), jnp.concatenate(cols2), jnp.concatenate(cdead)


@functools.partial(jax.jit, static_argnames=("z", "k_top", "exclude_self"))
def _bounds(rows_TxR, rows2_TxR, cols_HxTxN, cols2_HxTxN, cdead_HxN, *, z, k_top, exclude_self):
  """Per row: the ``k_top`` highest upper bounds of each column group with their neurons, and the group's
  best lower bound. With ``exclude_self`` the rows are all neurons, model-major, and column group i holds
  model i, so row r's own neuron is column r."""
  t, m = rows_TxR.shape
  g, _, n = cols_HxTxN.shape
  zc = cols_HxTxN.transpose(1, 0, 2).reshape(t, g * n)
  zc2 = cols2_HxTxN.transpose(1, 0, 2).reshape(t, g * n)
  cdead = cdead_HxN.reshape(g * n)
  r = min(_ROW_BLOCK, m)
  nb = -(-m // r)
  rows = jnp.pad(rows_TxR, ((0, 0), (0, nb * r - m)))
  rows2 = jnp.pad(rows2_TxR, ((0, 0), (0, nb * r - m)))

  def block(i):
    a = lax.dynamic_slice_in_dim(rows, i * r, r, axis=1)
    a2 = lax.dynamic_slice_in_dim(rows2, i * r, r, axis=1)
    corr = jnp.clip(jnp.dot(a.T, zc, precision=_HIGHEST), -1.0, 1.0)
    se = z * jnp.sqrt(jnp.maximum(jnp.dot(a2.T, zc2, precision=_HIGHEST), 1.0) / t)
    upper = jnp.where(cdead[None, :], jnp.inf, corr + se)
    lower = jnp.where(cdead[None, :], -jnp.inf, corr - se)
    if exclude_self:
      is_self = (lax.broadcasted_iota(jnp.int32, upper.shape, 1)
                 == i * r + lax.broadcasted_iota(jnp.int32, upper.shape, 0))
      upper, lower = jnp.where(is_self, -jnp.inf, upper), jnp.where(is_self, -jnp.inf, lower)
    top, idx = lax.top_k(upper.reshape(r, g, n), k_top)
    return top, idx, jnp.max(lower.reshape(r, g, n), axis=-1)

  top, idx, best_lower = lax.map(block, jnp.arange(nb))
  return (top.reshape(nb * r, g, k_top)[:m], idx.reshape(nb * r, g, k_top)[:m],
          best_lower.reshape(nb * r, g)[:m])


def _screen_rows(sample_SxTxN, q_SxNxN, *, z, k_top, dead_rtol, within):
  """Per row neuron and group: the ``k_top`` highest upper bounds with their neurons, the best lower bound,
  and the rows constant on the sample. Without ``within`` each model's rows meet only the other models'
  groups (the sample's products of a model with itself are never formed)."""
  s, t, n = sample_SxTxN.shape
  zr, zr2, dead, cols, cols2, cdead = _sample_columns(sample_SxTxN, q_SxNxN, dead_rtol=dead_rtol)
  g = cols.shape[0]
  bounds = functools.partial(_bounds, z=z, k_top=k_top)
  flat = lambda a: a.transpose(1, 0, 2).reshape(t, -1)  # noqa: E731
  if within:
    top, idx, best_lower = bounds(flat(zr), flat(zr2), cols, cols2, cdead, exclude_self=True)
    return (np.asarray(top), np.asarray(idx), np.asarray(best_lower), np.asarray(dead).reshape(s * n))
  top = np.full((s, n, g, k_top), -np.inf, np.float32)
  idx = np.zeros((s, n, g, k_top), np.int32)
  best_lower = np.full((s, n, g), -np.inf, np.float32)
  for i in range(s):
    others = np.array([grp for grp in range(g) if grp % s != i])
    if not len(others):
      continue
    o = jnp.asarray(others)
    res = bounds(zr[i], zr2[i], cols[o], cols2[o], cdead[o], exclude_self=False)
    top[i][:, others], idx[i][:, others], best_lower[i][:, others] = (np.asarray(a) for a in res)
  return (top.reshape(s * n, g, k_top), idx.reshape(s * n, g, k_top), best_lower.reshape(s * n, g),
          np.asarray(dead).reshape(s * n))


def plan(sample_SxTxN, q_SxNxN, screen: Screen, *, within: bool, dead_rtol: float) -> Plan:
  """Phase 1 (module docstring): candidates, bars and the rows to compute in full, from the sample."""
  s, _, n = sample_SxTxN.shape
  k_top = min(screen.max_candidates + 1, n)
  top, idx, best_lower, sdead = _screen_rows(jnp.asarray(sample_SxTxN), q_SxNxN, z=float(screen.z),
                                             k_top=k_top, dead_rtol=dead_rtol, within=within)
  m, g = top.shape[:2]
  rank = np.arange(k_top)[None, None, :]
  keep = np.isfinite(top) & ((top >= best_lower[..., None]) | (rank < screen.k))
  keep &= rank < screen.max_candidates
  # Every neuron left out has an upper bound at most the largest one not kept among the top k_top (the
  # last of them is never kept when k_top = max_candidates + 1 < N).
  bar = np.where(keep, -np.inf, top).max(-1)
  cand = np.where(keep, idx, -1)[..., :min(screen.max_candidates, k_top)]
  full = (bar >= best_lower) | sdead[:, None] | ~np.any(keep, axis=-1)
  model_M = np.repeat(np.arange(s), n)
  skip = np.zeros((m, g), bool)
  if not within:
    for grp in range(g):
      skip[:, grp] = model_M == grp % s
  full &= ~skip
  cand = np.where(skip[..., None], -1, cand)
  return Plan(cand_MxHxJ=cand.astype(np.int32), bar_MxH=bar.astype(np.float32), full_MxH=full,
              skip_MxH=skip, sample_dead_M=sdead)


# --------------------------------------------------------------------------------------------------
# Phases 2 and 3: exact co-moments over all inputs for what the plan asks


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Which co-moments one pass accumulates (host arrays; their shapes fix the compiled update).

  Pairs are unordered for two real neurons (one co-moment serves both rows) and (real row, rotated
  column) otherwise. Columns index ``[aug of the M neurons; aug of the rotated union, model-major,
  U per model]``. Pairs are grouped by row, rows into buckets by their pair count (a power of two),
  ``_GATHER_ROWS`` rows per step.
  """

  bucket_rows: tuple[np.ndarray, ...]   # each [nb·R]
  bucket_cols: tuple[np.ndarray, ...]   # each [nb·R, J]
  union_SxU: np.ndarray                 # rotated neurons whose rotation is taken, per model (padded)
  full_F: np.ndarray                    # rows against every real neuron
  rot_full_F: np.ndarray                # rows against every rotated neuron
  pair_rows: np.ndarray                 # unique pairs (row, combined column) in pair-id order...
  pair_cols: np.ndarray
  pair_slot: np.ndarray                 # ...and where each sits in the concatenated bucket outputs
  cand_pair_MxHxJ: np.ndarray           # the pair of each of the plan's candidates, -1 for none

  @property
  def n_pairs(self) -> int:
    return len(self.pair_rows)


def _pow2(x: int) -> int:
  return 1 << max(0, int(x - 1).bit_length())


def _pad_to(idx: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros(size, np.int32)
  out[:len(idx)] = idx
  return out


def layout(pl: Plan, full_MxH: np.ndarray, s: int, n: int, rotation: bool) -> _Layout:
  """The pass that computes the plan's candidate pairs where ``full_MxH`` is False and full rows where it
  is True (with no candidates, as for the last pass, pass ``pl`` with ``cand_MxHxJ`` all -1)."""
  m = s * n
  g = pl.cand_MxHxJ.shape[1]
  r_, g_, j_ = np.nonzero((pl.cand_MxHxJ >= 0) & ~full_MxH[..., None] & ~pl.skip_MxH[..., None])
  c_ = pl.cand_MxHxJ[r_, g_, j_].astype(np.int64)
  real = g_ < s
  col_virtual = np.where(real, g_ * n + c_, m + (g_ - s) * n + c_)
  # Rotated union per model, and the rotated columns' place after the M real ones.
  rot_model, rot_neuron = (g_[~real] - s), c_[~real]
  unions = [np.unique(rot_neuron[rot_model == j]) for j in range(s)] if rotation else [np.zeros(0)] * s
  u = max([len(x) for x in unions] + [1]) if rotation and (~real).any() else 0
  union = np.stack([_pad_to(x, u) for x in unions]) if u else np.zeros((s, 0), np.int32)
  pos = np.full(m, -1, np.int64)
  for j in range(s):
    if u:
      pos[j * n + unions[j].astype(np.int64)] = m + j * u + np.arange(len(unions[j]))
  col = np.where(real, col_virtual, pos[np.clip(col_virtual - m, 0, m - 1)])
  row = np.where(real, np.minimum(r_, col), r_)
  col = np.where(real, np.maximum(r_, col), col)
  key, pair_of = np.unique(row * (2 * m + 1) + col, return_inverse=True)
  prow, pcol = key // (2 * m + 1), key % (2 * m + 1)
  cand_pair = np.full(pl.cand_MxHxJ.shape, -1, np.int64)
  cand_pair[r_, g_, j_] = pair_of.reshape(-1)
  rows, counts = np.unique(prow, return_counts=True)
  start = np.cumsum(counts) - counts
  within_row = np.arange(len(prow)) - np.repeat(start, counts)
  buckets = np.array([_pow2(c) for c in counts], np.int64)
  row_of_pair = np.repeat(np.arange(len(rows)), counts)
  b_rows, b_cols, slot = [], [], np.zeros(len(prow), np.int64)
  offset = 0
  for bsize in sorted(set(buckets.tolist())):
    sel = np.nonzero(buckets == bsize)[0]
    nr = -(-len(sel) // _GATHER_ROWS) * _GATHER_ROWS
    place = np.zeros(len(rows), np.int64)
    place[sel] = np.arange(len(sel))
    mine = buckets[row_of_pair] == bsize
    cols = np.zeros((nr, bsize), np.int32)
    cols[place[row_of_pair[mine]], within_row[mine]] = pcol[mine]
    slot[mine] = offset + place[row_of_pair[mine]] * bsize + within_row[mine]
    b_rows.append(_pad_to(rows[sel], nr))
    b_cols.append(cols)
    offset += nr * bsize
  full_rows = np.nonzero(full_MxH[:, :s].any(1))[0]
  rot_rows = np.nonzero(full_MxH[:, s:].any(1))[0] if g > s else np.zeros(0, np.int64)
  return _Layout(tuple(b_rows), tuple(b_cols), union, full_rows.astype(np.int32),
                 rot_rows.astype(np.int32), prow, pcol, slot, cand_pair)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["count", "mean_SxN", "m2_SxN", "finite", "pairs", "rot_m2_SxU", "full_FxM",
                                "rot_full_FxM", "rot_m2_SxN"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class _Acc:
  """One pass's exact accumulators (Chan's merge, as in :mod:`universality.kernels.correlation`)."""

  count: jax.Array
  mean_SxN: jax.Array
  m2_SxN: jax.Array
  finite: jax.Array
  pairs: tuple                  # per bucket [nb·R, J] co-moments
  rot_m2_SxU: jax.Array         # M2 of the rotated union
  full_FxM: jax.Array           # full rows against the real neurons
  rot_full_FxM: jax.Array       # full rows against the rotated neurons
  rot_m2_SxN: jax.Array         # M2 of every rotated neuron (only with rotated full rows)


def _padded(idx, multiple=_GATHER_ROWS):
  return _pad_to(idx, -(-len(idx) // multiple) * multiple) if len(idx) else np.zeros(0, np.int32)


def _acc_init(lay: _Layout, s: int, n: int) -> _Acc:
  z = functools.partial(jnp.zeros, dtype=jnp.float32)
  m = s * n
  f, f2 = len(_padded(lay.full_F)), len(_padded(lay.rot_full_F))
  return _Acc(count=jnp.zeros((), jnp.int32), mean_SxN=z((s, n)), m2_SxN=z((s, n)), finite=jnp.ones((), bool),
              pairs=tuple(z(c.shape) for c in lay.bucket_cols), rot_m2_SxU=z(lay.union_SxU.shape),
              full_FxM=z((f, m)), rot_full_FxM=z((f2, m)), rot_m2_SxN=z((s, n) if f2 else (s, 0)))


def _gathered(rows_BR, cols_BRxJ, aug_MxK, colaug_CxK):
  """Co-moment increments of each row with its own columns, ``_GATHER_ROWS`` rows per step: the columns
  are gathered (J·K floats per row), never the full product."""
  nr, j = cols_BRxJ.shape

  def step(i):
    rows = lax.dynamic_slice_in_dim(rows_BR, i * _GATHER_ROWS, _GATHER_ROWS)
    cols = lax.dynamic_slice_in_dim(cols_BRxJ, i * _GATHER_ROWS, _GATHER_ROWS)
    return lax.dot_general(colaug_CxK[cols], aug_MxK[rows], (((2,), (1,)), ((0,), (0,))),
                           precision=_HIGHEST, preferred_element_type=jnp.float32)

  return lax.map(step, jnp.arange(nr // _GATHER_ROWS)).reshape(nr, j)


@functools.partial(jax.jit, donate_argnums=0)
def _acc_update(acc: _Acc, x_SxBxN, b, bucket_rows, bucket_cols, q_sel_SxNxU, full_F, rot_full_F, q_SxNxN):
  s, _, n = x_SxBxN.shape
  count, mean, m2, aug_SxNxK, finite = kc._chan_batch(  # pylint: disable=protected-access
      acc.count, acc.mean_SxN, acc.m2_SxN, x_SxBxN, b)
  k = aug_SxNxK.shape[-1]
  aug_MxK = aug_SxNxK.reshape(s * n, k)
  colaug = aug_MxK
  rot_m2 = acc.rot_m2_SxU
  if q_sel_SxNxU.shape[-1]:
    # The rotated neurons' augmented batch is the rotation of the real one (the rotation is linear), so
    # their co-moments and M2 follow Chan's update exactly as the real neurons' do.
    raug_SxUxK = jnp.einsum("snu,snk->suk", q_sel_SxNxU, aug_SxNxK, precision=_HIGHEST)
    rot_m2 = rot_m2 + jnp.sum(jnp.square(raug_SxUxK), axis=-1)
    colaug = jnp.concatenate([aug_MxK, raug_SxUxK.reshape(-1, k)])
  pairs = tuple(p + _gathered(r, c, aug_MxK, colaug) for p, r, c in zip(acc.pairs, bucket_rows, bucket_cols))
  full = acc.full_FxM
  if full_F.shape[0]:
    full = full + lax.dot_general(aug_MxK[full_F], aug_MxK, kc._NT, precision=_HIGHEST,  # pylint: disable=protected-access
                                  preferred_element_type=jnp.float32)
  rot_full, rot_m2_all = acc.rot_full_FxM, acc.rot_m2_SxN
  if rot_full_F.shape[0]:
    rall_SxNxK = jnp.einsum("skn,skt->snt", q_SxNxN, aug_SxNxK, precision=_HIGHEST)
    rot_m2_all = rot_m2_all + jnp.sum(jnp.square(rall_SxNxK), axis=-1)
    rot_full = rot_full + lax.dot_general(aug_MxK[rot_full_F], rall_SxNxK.reshape(s * n, k), kc._NT,  # pylint: disable=protected-access
                                          precision=_HIGHEST, preferred_element_type=jnp.float32)
  return _Acc(count=count, mean_SxN=mean, m2_SxN=m2, finite=acc.finite & finite, pairs=pairs,
              rot_m2_SxU=rot_m2, full_FxM=full, rot_full_FxM=rot_full, rot_m2_SxN=rot_m2_all)


def _accumulate(batches, lay: _Layout, q_SxNxN, s, n) -> _Acc:
  """One pass over ``batches`` (``(acts_SxBmaxxN, b)`` as ``correlation._batches`` yields them)."""
  acc = _acc_init(lay, s, n)
  q_sel = (jnp.take_along_axis(q_SxNxN, jnp.asarray(lay.union_SxU)[:, None, :], axis=2)
           if lay.union_SxU.shape[1] else jnp.zeros((s, n, 0), jnp.float32))
  args = (tuple(jnp.asarray(r) for r in lay.bucket_rows), tuple(jnp.asarray(c) for c in lay.bucket_cols),
          q_sel, jnp.asarray(_padded(lay.full_F)), jnp.asarray(_padded(lay.rot_full_F)),
          q_SxNxN if len(lay.rot_full_F) else None)
  for x, b in batches:
    if x.shape[0] != s or x.shape[2] != n:
      raise kc.CorrelationError(f"batch has (S, N) = {(x.shape[0], x.shape[2])}, the first had {(s, n)}")
    acc = _acc_update(acc, x, jnp.int32(b), *args)
  return acc


@dataclasses.dataclass
class _Result:
  """Per row neuron and group: max, argmax, and how it was settled (filled in as the passes finish)."""

  max_MxH: np.ndarray
  arg_MxH: np.ndarray
  full_row_M: np.ndarray


def _reduce_full(co_FxM, rowinv_F, colinv_M, rows_F, s, n, exclude_self):
  corr = np.clip(co_FxM * rowinv_F[:, None] * colinv_M[None, :], -1.0, 1.0).reshape(-1, s, n)
  if exclude_self:
    corr = corr.reshape(len(rows_F), s * n)
    corr[np.arange(len(rows_F)), rows_F] = -np.inf
    corr = corr.reshape(-1, s, n)
  best = corr.max(-1)
  arg = np.argmax(corr == best[..., None], axis=-1)  # the first index attaining the max, as the exact pass
  empty = best == -np.inf
  return np.where(empty, 0.0, best).astype(np.float32), np.where(empty, -1, arg).astype(np.int32)


def _finish(acc: _Acc, lay: _Layout, pl: Plan, full_MxH, q_SxNxN, res: _Result, *, s, n, dead_rtol):
  """Write the pass's exact maxima into ``res``; returns (row dead mask, the screened (row, group)s whose
  exact winner does not beat their bar)."""
  m = s * n
  dead, tol = (np.asarray(a) for a in kc._dead(  # pylint: disable=protected-access
      acc.count.astype(jnp.float32), acc.mean_SxN, acc.m2_SxN, dead_rtol))
  m2 = np.asarray(acc.m2_SxN)
  inv_M = np.where(dead, 0.0, 1.0 / np.sqrt(np.where(dead, 1.0, m2))).astype(np.float32).reshape(m)
  dead_M = dead.reshape(m)
  surprise = np.zeros(full_MxH.shape, bool)
  if lay.n_pairs:
    colinv = inv_M
    if lay.union_SxU.shape[1]:
      q_sel = np.take_along_axis(np.asarray(q_SxNxN), lay.union_SxU[:, None, :], axis=2)
      rvar = np.asarray(acc.rot_m2_SxU)
      rdead = rvar <= np.einsum("snu,sn->su", np.square(q_sel), tol)
      rinv = np.where(rdead, 0.0, 1.0 / np.sqrt(np.where(rdead, 1.0, rvar))).astype(np.float32)
      colinv = np.concatenate([inv_M, rinv.reshape(-1)])
    flat = np.concatenate([np.asarray(p).reshape(-1) for p in acc.pairs])
    corr_P = np.clip(flat[lay.pair_slot] * inv_M[lay.pair_rows] * colinv[lay.pair_cols], -1.0, 1.0)
    have = lay.cand_pair_MxHxJ >= 0
    vals = np.where(have, corr_P[np.maximum(lay.cand_pair_MxHxJ, 0)], -np.inf)
    best = vals.max(-1)
    arg = np.where(vals == best[..., None], pl.cand_MxHxJ, np.iinfo(np.int32).max).min(-1)
    screened = have.any(-1)
    res.max_MxH[screened] = best[screened]
    res.arg_MxH[screened] = arg[screened]
    surprise = screened & ~(best > pl.bar_MxH) & ~dead_M[:, None]
  if len(lay.full_F):
    rows = lay.full_F
    co = np.asarray(acc.full_FxM)[:len(rows)]
    mx, ar = _reduce_full(co, inv_M[rows], inv_M, rows, s, n, exclude_self=True)
    res.max_MxH[rows, :s], res.arg_MxH[rows, :s] = mx, ar
    res.full_row_M[rows] = True
  if len(lay.rot_full_F):
    rows = lay.rot_full_F
    rvar = np.asarray(acc.rot_m2_SxN)
    rdead = rvar <= np.einsum("skn,sk->sn", np.square(np.asarray(q_SxNxN)), tol)
    rinv = np.where(rdead, 0.0, 1.0 / np.sqrt(np.where(rdead, 1.0, rvar))).astype(np.float32).reshape(m)
    co = np.asarray(acc.rot_full_FxM)[:len(rows)]
    mx, ar = _reduce_full(co, inv_M[rows], rinv, rows, s, n, exclude_self=False)
    res.max_MxH[rows, s:], res.arg_MxH[rows, s:] = mx, ar
    res.full_row_M[rows] = True
  return dead_M, surprise


# --------------------------------------------------------------------------------------------------
# Entry point


def _spread_sample(acts_SxTxN, t1: int) -> np.ndarray:
  """T₁ inputs of an array in runs of 256 spread evenly over it (consecutive inputs are often alike)."""
  t = acts_SxTxN.shape[1]
  run = min(256, t1)
  starts = np.linspace(0, t - run, t1 // run).astype(np.int64)
  return np.concatenate([np.asarray(acts_SxTxN[:, a:a + run], np.float32) for a in starts], axis=1)


def _prefix_sample(source, t1: int):
  """The first T₁ inputs of a source, and whether it holds more."""
  parts, have = [], 0
  it = iter(source())
  for batch in it:
    kc._check_acts(batch, "batch", min_t=1)  # pylint: disable=protected-access
    parts.append(np.asarray(batch[:, :t1 - have], np.float32))
    have += parts[-1].shape[1]
    if have >= t1:
      more = batch.shape[1] > parts[-1].shape[1] or next(it, None) is not None
      return np.concatenate(parts, axis=1), more
  if not parts:
    raise kc.CorrelationError("source yielded no batches")
  return np.concatenate(parts, axis=1), False


def _exact(acts, *, baseline, key, within, dead_rtol, **options) -> kc.MaxCorrelation:
  res = kc.max_correlation(acts, baseline=baseline, key=key, within=within, dead_rtol=dead_rtol, **options)
  s, n = res.dead_SxN.shape
  return res._replace(settled_SxN=jnp.full((s, n), SETTLED_EXACT, jnp.int8), margin=None)


def _worth_it(pl: Plan, s: int, n: int, within: bool, rotation: bool) -> bool:
  """Whether the planned passes do less than half the exact pass's work, per input (co-moment entries)."""
  blocks = s * (s + 1) // 2 if within else s * (s - 1) // 2 + (s if rotation else 0)
  exact = blocks * n * n
  pairs = int(((pl.cand_MxHxJ >= 0) & ~pl.full_MxH[..., None]).sum())
  full = int(pl.full_MxH[:, :s].any(1).sum()) * s * n
  rot_full = pl.full_MxH[:, s:].any() * s * n * n
  return _PAIR_COST * pairs + full + rot_full < 0.5 * exact


def max_correlation(acts_SxTxN, *, screen: Screen | str | None = "auto", baseline: str | None = None,
                    key: jax.Array | None = None, within: bool = True,
                    dead_rtol: float = kc.DEFAULT_DEAD_RTOL, stats: dict | None = None,
                    rotation_blocks: int = 1, **options) -> kc.MaxCorrelation:
  """:func:`universality.kernels.correlation.max_correlation`, screened (module docstring).

  Args:
    acts_SxTxN: an array or a re-iterable source of batches, as for the exact pass.
    screen: a :class:`Screen`, or a mode name with the default sample, margin and candidates.
    baseline, key, within, dead_rtol, rotation_blocks, **options: as for the exact pass (``options`` reach it when it runs:
      ``backend``, ``memory_bytes``, block sizes).
    stats: a dict to fill with what ran: ``ran`` ('exact' or 'screen'), ``pairs`` (gathered co-moments),
      ``full_rows_sample`` (rows computed in full because the sample did not separate them),
      ``full_rows_check`` (rows whose exact winner did not beat the bar: one more pass), ``passes``.

  Returns:
    :class:`MaxCorrelation` with ``settled_SxN`` (``SETTLED_EXACT`` everywhere when the exact pass ran) and
    ``margin``.
  """
  screen = (Screen(mode=screen) if isinstance(screen, str) else screen or Screen(mode="off")).check()
  kc._check_options("xla", baseline, key, dead_rtol)  # pylint: disable=protected-access
  stats = {} if stats is None else stats
  stats.update(ran="exact", pairs=0, full_rows_sample=0, full_rows_check=0, passes=1)
  exact = functools.partial(_exact, baseline=baseline, key=key, within=within,
                            dead_rtol=dead_rtol, rotation_blocks=rotation_blocks, **options)
  is_source = callable(acts_SxTxN) and not hasattr(acts_SxTxN, "shape")
  if not screen.may_screen() or isinstance(acts_SxTxN, (jax.core.Tracer, Iterator)):
    return exact(acts_SxTxN)
  t1 = int(screen.tokens)
  if is_source:
    sample, more = _prefix_sample(acts_SxTxN, t1)
    source = acts_SxTxN
    if not more:
      return exact(lambda: iter([sample]))
  else:
    kc._check_acts(acts_SxTxN)  # pylint: disable=protected-access
    t = acts_SxTxN.shape[1]
    if t <= t1 or (screen.mode == "auto" and t < 8 * t1):
      return exact(acts_SxTxN)
    sample = _spread_sample(acts_SxTxN, t1)
    arr = jnp.asarray(acts_SxTxN)
    source = lambda: (arr[:, a:a + kc.XLA_BATCH] for a in range(0, t, kc.XLA_BATCH))  # noqa: E731
  if not np.isfinite(sample).all():
    raise kc.CorrelationError("activations contain NaN or infinity")
  s, _, n = sample.shape
  q = kc.rotations(key, s, n, rotation_blocks) if baseline == "rotation" else None
  pl = plan(sample, q, screen, within=within, dead_rtol=dead_rtol)
  if screen.mode == "auto" and not _worth_it(pl, s, n, within, q is not None):
    return exact(source)
  return _screened(source, pl, q, screen, s=s, n=n, within=within, dead_rtol=dead_rtol, stats=stats)


def _spread_full(full_MxH, s):
  """A row computed in full for one model is computed in full for all (one product gives them all)."""
  out = full_MxH.copy()
  out[:, :s] = full_MxH[:, :s].any(1, keepdims=True)
  if out.shape[1] > s:
    out[:, s:] = full_MxH[:, s:].any(1, keepdims=True)
  return out


def _screened(source, pl: Plan, q, screen: Screen, *, s, n, within, dead_rtol, stats) -> kc.MaxCorrelation:
  m, g = pl.cand_MxHxJ.shape[:2]
  first = next(iter(source()))
  bmax = first.shape[1]
  del first
  res = _Result(np.zeros((m, g), np.float32), np.full((m, g), -1, np.int32), np.zeros(m, bool))
  full = _spread_full(pl.full_MxH, s) & ~pl.skip_MxH
  lay = layout(pl, full, s, n, q is not None)
  stats.update(ran="screen", pairs=lay.n_pairs, full_rows_sample=int(full.any(1).sum()))
  acc = _accumulate(kc._batches(source, bmax), lay, q, s, n)  # pylint: disable=protected-access
  if int(acc.count) < 2:
    raise kc.CorrelationError(f"need at least 2 inputs, the source yielded {int(acc.count)}")
  if not bool(acc.finite):
    raise kc.CorrelationError("activations contain NaN or infinity")
  count = int(acc.count)
  dead_M, surprise = _finish(acc, lay, pl, full, q, res, s=s, n=n, dead_rtol=dead_rtol)
  del acc
  if surprise.any():
    again = _spread_full(surprise, s) & ~pl.skip_MxH
    none = dataclasses.replace(pl, cand_MxHxJ=np.full_like(pl.cand_MxHxJ, -1))
    lay3 = layout(none, again, s, n, q is not None)
    stats.update(full_rows_check=int(again.any(1).sum()), passes=2)
    acc = _accumulate(kc._batches(source, bmax), lay3, q, s, n)  # pylint: disable=protected-access
    if int(acc.count) != count:
      raise kc.CorrelationError(f"source is not re-iterable: {int(acc.count)} inputs in a later pass, "
                                f"{count} in the first")
    _finish(acc, lay3, none, again, q, res, s=s, n=n, dead_rtol=dead_rtol)
  res.max_MxH[dead_M] = 0.0
  res.arg_MxH[dead_M] = -1
  res.max_MxH[pl.skip_MxH], res.arg_MxH[pl.skip_MxH] = 0.0, -1
  shaped = lambda a: jnp.asarray(a.reshape(s, n, -1))  # noqa: E731
  settled = np.where(res.full_row_M, SETTLED_FULL_ROW, SETTLED_SCREEN).astype(np.int8).reshape(s, n)
  out = kc.MaxCorrelation(shaped(res.max_MxH[:, :s]), shaped(res.arg_MxH[:, :s]), jnp.asarray(dead_M.reshape(s, n)),
                          shaped(res.max_MxH[:, s:]) if q is not None else None,
                          shaped(res.arg_MxH[:, s:]) if q is not None else None,
                          settled_SxN=jnp.asarray(settled), margin=screen.margin)
  return kc._without_self(out, within)  # pylint: disable=protected-access


__all__ = ["MODES", "Plan", "SETTLED_EXACT", "SETTLED_FULL_ROW", "SETTLED_SCREEN", "Screen", "layout",
           "max_correlation", "plan", "settings"]
