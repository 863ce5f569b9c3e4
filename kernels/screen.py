"""Screened max correlation: the same maxima as the exact pass, computing exactly only what can win.

The universal-neurons statistic keeps, for each neuron, only the maximum correlation over each other
model's neurons (and over that model's rotated neurons), yet the exact pass
(:func:`universality.kernels.correlation.max_correlation`) forms every co-moment over every input. Here:

1. *Screen* on a sample of ``T₁`` inputs: every correlation ``r̂`` and its standard error
   ``se = sqrt(max(m22, 1) / T₁)``, where ``m22`` is the sample mean of ``x²y²`` of the standardised pair
   (1 for independent Gaussians, larger for heavy tails; for a bivariate Gaussian it bounds the delta-method
   variance ``(1 - r²)²``). Each pair gets the interval ``r̂ ± z·se``. For every neuron and model the
   candidates are the neurons whose upper bound reaches the best lower bound (at least the ``k`` highest
   upper bounds, at most ``max_candidates``); the highest upper bound left out is the *bar*. One product
   per pair of models serves both directions.
2. *Refine* on prefixes of ``growth × `` more inputs while they are at most half of all inputs: exact
   co-moments (and ``m22``) over the prefix for the candidates only, and for the rows the screen could not
   separate, in full; the same intervals, now ``sqrt(growth)`` times narrower, drop candidates (their upper
   bound raises the bar) and settle most of those rows. On byte-LM activations a prefix of 16 × T₁ cuts
   the candidates ~4× and the rows taken in full ~20× (benchmarks/README.md).
3. *Exact over all T* for the remaining candidate pairs (a gathered product: each row's few candidate
   columns, rows grouped by candidate count) and the full rows of the neurons still not separated (their
   bar reaches their best lower bound, or they were constant on the last prefix). On the CPU the passes
   of 2 and 3 run as one compiled loop over the model-major batches (:mod:`universality.kernels.gathered`);
   elsewhere as XLA products over neuron-major chunks (``_acc_update``).
4. *Check*: a neuron is settled by the screen when its exact winner exceeds its bar; the others get their
   whole row computed exactly over all T in one more pass. Every reported maximum and argmax is then an
   exact full-T correlation; the only residual risk is a neuron left out whose estimate on a sample or
   prefix was off by more than ``z`` standard errors.

The exact passes sum about a fixed shift (the sample's means): ``C = Σx̃ỹ − n·d_x·d_y`` with ``x̃ = x −
shift`` and ``d = Σx̃/n``, exact algebra that stays well conditioned because the shift is close to the
mean. Sums run over chunks of ``_CHUNK`` inputs and join the totals with compensation (Kahan), so the
maxima are within ~5e-7 of float64 — closer than the exact pass's own float32 products over whole batches
(up to ~2e-6 on heavy-tailed activations).

A neuron constant on the sample may vary over all T, so as a column it is a candidate of every row and
as a row it takes its full row. Rotated neurons (``baseline='rotation'``) are columns like any other: the
gathered product reads the rotations of the candidate rotated neurons only; a neuron whose rotated
maximum is not settled needs every rotated neuron of that model, i.e. a rotation of the whole batch,
which costs what the exact pass pays for it.

Results are :class:`universality.kernels.correlation.MaxCorrelation` with ``settled_SxN`` (``SETTLED_*``:
exact pass, screen, or full row) and ``margin`` (``z / sqrt(T₁)``, the half-width for ``m22 = 1``; None
when the exact pass ran). Under ``jax.jit`` (traced activations) the data-dependent candidate sets have no
static shape, so the exact pass runs and ``settled_SxN`` says so.

Local shape letters:

  E  columns of a batch made neuron-major: the M neurons, then the rotated union, then every rotated neuron
  V  inputs of one chunk of a batch (``_CHUNK``)
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
from universality.kernels import gathered

MODES = ("auto", "off", "on")
SETTLED_EXACT, SETTLED_SCREEN, SETTLED_FULL_ROW = 0, 1, 2
_HIGHEST = lax.Precision.HIGHEST
_NT = (((1,), (1,)), ((), ()))  # contract the last axis of both operands: A·Bᵀ
_ROW_BLOCK = 256  # rows of the sample correlation screened at once: R × H·N floats in memory
_ROW_PAD = 32  # rows of a bucket of the gathered product are padded to a multiple of this
_CHUNK = 128  # inputs per step of the gathered product: the chunk of every neuron stays in cache
# Costs per input in co-moment entries of the exact pass's product (benchmarks/README.md, screened pass),
# used by 'auto' to judge whether screening pays: one neuron's share of a pass that reads, shifts and sums
# every input (memory-bound), one gathered pair, one entry of a full row. XLA (measured on the CPU, where
# the pass transposes each batch) and the CPU loop of kernels.gathered.
_COSTS_XLA = (256.0, 26.0, 1.0)
_COSTS_HOST = (13.0, 21.0, 2.3)


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
    growth: each refinement reads this many times the inputs of the previous screen (T₁, then
      growth·T₁, ...) while that is at most half of the inputs (of the source, when it is not known).
  """

  mode: str = "auto"
  tokens: int = 1 << 15
  z: float = 5.0
  k: int = 1
  max_candidates: int = 32
  inputs: int | None = None
  growth: int = 16

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
    if int(self.growth) < 2:
      raise kc.CorrelationError(f"screen growth must be >= 2, got {self.growth}")
    return self


def settings(mode: str = "auto", tokens: int = 1 << 15, z: float = 5.0, k: int = 1,
             max_candidates: int = 32, inputs: int | None = None, growth: int = 16) -> Screen:
  """A checked :class:`Screen` from plain values (e.g. a config's ``analysis.screen*`` fields)."""
  return Screen(str(mode), int(tokens), float(z), int(k), int(max_candidates),
                None if inputs is None else int(inputs), int(growth)).check()


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
  """

  cand_MxHxJ: np.ndarray
  bar_MxH: np.ndarray
  full_MxH: np.ndarray
  skip_MxH: np.ndarray


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


@functools.partial(jax.jit, static_argnames=("z", "k_top"))
def _bounds_both(rows_TxN, rows2_TxN, rdead_N, cols_TxN, cols2_TxN, cdead_N, *, z, k_top):
  """Model i's neurons against model j's and, from the same products, j's against i's: per neuron of
  either side the ``k_top`` highest upper bounds with their neurons and the best lower bound. Rows go in
  blocks; the other direction's top bounds are merged block by block."""
  t, n = rows_TxN.shape
  r = min(_ROW_BLOCK, n)
  nb = -(-n // r)
  pad = nb * r - n
  rows = jnp.pad(rows_TxN, ((0, 0), (0, pad)))
  rows2 = jnp.pad(rows2_TxN, ((0, 0), (0, pad)))
  rdead = jnp.pad(rdead_N, (0, pad))
  valid = jnp.arange(nb * r) < n
  k_blk = min(k_top, r)

  def block(carry, i):
    a = lax.dynamic_slice_in_dim(rows, i * r, r, axis=1)
    a2 = lax.dynamic_slice_in_dim(rows2, i * r, r, axis=1)
    ok = lax.dynamic_slice_in_dim(valid, i * r, r)[:, None]
    dead = lax.dynamic_slice_in_dim(rdead, i * r, r)[:, None]
    corr = jnp.clip(jnp.dot(a.T, cols_TxN, precision=_HIGHEST), -1.0, 1.0)
    se = z * jnp.sqrt(jnp.maximum(jnp.dot(a2.T, cols2_TxN, precision=_HIGHEST), 1.0) / t)
    top, idx = lax.top_k(jnp.where(cdead_N[None, :], jnp.inf, corr + se), k_top)
    best = jnp.max(jnp.where(cdead_N[None, :], -jnp.inf, corr - se), axis=-1)
    up_t = jnp.where(ok, jnp.where(dead, jnp.inf, corr + se), -jnp.inf).T
    lo_t = jnp.where(ok & ~dead, corr - se, -jnp.inf).T
    ct, ci = lax.top_k(up_t, k_blk)
    cv, cidx, cbest = carry
    mv, mi = lax.top_k(jnp.concatenate([cv, ct], axis=1), k_top)
    midx = jnp.take_along_axis(jnp.concatenate([cidx, ci + i * r], axis=1), mi, axis=1)
    return (mv, midx, jnp.maximum(cbest, lo_t.max(-1))), (top, idx, best)

  init = (jnp.full((n, k_top), -jnp.inf), jnp.zeros((n, k_top), jnp.int32), jnp.full((n,), -jnp.inf))
  (cv, ci, cbest), (top, idx, best) = lax.scan(block, init, jnp.arange(nb))
  return (top.reshape(nb * r, k_top)[:n], idx.reshape(nb * r, k_top)[:n], best.reshape(nb * r)[:n],
          cv, ci, cbest)


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
    for j in range(i + 1, s):  # one product per pair of models serves both directions
      res = [np.asarray(a) for a in _bounds_both(zr[i], zr2[i], dead[i], zr[j], zr2[j], dead[j], z=z,
                                                 k_top=k_top)]
      top[i, :, j], idx[i, :, j], best_lower[i, :, j] = res[:3]
      top[j, :, i], idx[j, :, i], best_lower[j, :, i] = res[3:]
    rotated = np.array([s + j for j in range(s) if j != i and g > s], np.int64)
    if not len(rotated):
      continue
    o = jnp.asarray(rotated)
    res = bounds(zr[i], zr2[i], cols[o], cols2[o], cdead[o], exclude_self=False)
    top[i][:, rotated], idx[i][:, rotated], best_lower[i][:, rotated] = (np.asarray(a) for a in res)
  return (top.reshape(s * n, g, k_top), idx.reshape(s * n, g, k_top), best_lower.reshape(s * n, g),
          np.asarray(dead).reshape(s * n))


def _select(top_MxHxJ, idx_MxHxJ, best_lower_MxH, screen: Screen):
  """From the highest upper bounds of a group (sorted, with their neurons): which to keep, the bar (the
  highest upper bound left out) and the candidates. Every neuron left out has an upper bound at most the
  largest one not kept among the top ones (the last of them is never kept when there are
  ``max_candidates + 1`` of fewer than N)."""
  k_top = top_MxHxJ.shape[-1]
  rank = np.arange(k_top)[None, None, :]
  keep = np.isfinite(top_MxHxJ) & ((top_MxHxJ >= best_lower_MxH[..., None]) | (rank < screen.k))
  keep &= rank < screen.max_candidates
  bar = np.where(keep, -np.inf, top_MxHxJ).max(-1)
  cand = np.where(keep, idx_MxHxJ, -1)[..., :min(screen.max_candidates, k_top)]
  return keep, bar, cand


def plan(sample_SxTxN, q_SxNxN, screen: Screen, *, within: bool, dead_rtol: float) -> Plan:
  """Phase 1 (module docstring): candidates, bars and the rows to compute in full, from the sample."""
  s, _, n = sample_SxTxN.shape
  k_top = min(screen.max_candidates + 1, n)
  top, idx, best_lower, sdead = _screen_rows(jnp.asarray(sample_SxTxN), q_SxNxN, z=float(screen.z),
                                             k_top=k_top, dead_rtol=dead_rtol, within=within)
  m, g = top.shape[:2]
  keep, bar, cand = _select(top, idx, best_lower, screen)
  full = (bar >= best_lower) | sdead[:, None] | ~np.any(keep, axis=-1)
  model_M = np.repeat(np.arange(s), n)
  skip = np.zeros((m, g), bool)
  if not within:
    for grp in range(g):
      skip[:, grp] = model_M == grp % s
  full &= ~skip
  cand = np.where(skip[..., None], -1, cand)
  return Plan(cand_MxHxJ=cand.astype(np.int32), bar_MxH=bar.astype(np.float32), full_MxH=full,
              skip_MxH=skip)


# --------------------------------------------------------------------------------------------------
# Phases 2 and 3: co-moments over a prefix of the inputs (a refinement) or over all of them (exact)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Which co-moments one pass accumulates (host arrays; their shapes fix the compiled update).

  Pairs are unordered for two real neurons (one co-moment serves both rows) and (real row, rotated
  column) otherwise. Columns index ``[the M neurons; the rotated union, model-major, U per model]``. Pairs
  are grouped by row, rows into buckets by their pair count (:func:`_bucket`), padded to ``_ROW_PAD``.
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


def _bucket(x: int) -> int:
  """The bucket of a row with ``x`` pairs: the next of 1, 2, 3, 4, 6, 8, 12, 16, ... (at most ~1.5× padding,
  few distinct compiled shapes)."""
  p = 1 << max(0, int(x - 1).bit_length())
  return 3 * p // 4 if p >= 4 and x <= 3 * p // 4 else p


def _pad_to(idx: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros(size, np.int32)
  out[:len(idx)] = idx
  return out


def _padded(idx):
  return _pad_to(idx, -(-len(idx) // _ROW_PAD) * _ROW_PAD) if len(idx) else np.zeros(0, np.int32)


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
  buckets = np.array([_bucket(c) for c in counts], np.int64)
  row_of_pair = np.repeat(np.arange(len(rows)), counts)
  b_rows, b_cols, slot = [], [], np.zeros(len(prow), np.int64)
  offset = 0
  for bsize in sorted(set(buckets.tolist())):
    sel = np.nonzero(buckets == bsize)[0]
    nr = -(-len(sel) // _ROW_PAD) * _ROW_PAD
    place = np.zeros(len(rows), np.int64)
    place[sel] = np.arange(len(sel))
    mine = buckets[row_of_pair] == bsize
    # Padding slots point at the row's own column: finite, and never read back.
    cols = np.repeat(_pad_to(rows[sel], nr)[:, None], bsize, axis=1).astype(np.int32)
    cols[place[row_of_pair[mine]], within_row[mine]] = pcol[mine]
    slot[mine] = offset + place[row_of_pair[mine]] * bsize + within_row[mine]
    b_rows.append(_pad_to(rows[sel], nr))
    b_cols.append(cols)
    offset += nr * bsize
  full_rows = np.nonzero(full_MxH[:, :s].any(1))[0]
  rot_rows = np.nonzero(full_MxH[:, s:].any(1))[0] if g > s else np.zeros(0, np.int64)
  return _Layout(tuple(b_rows), tuple(b_cols), union, full_rows.astype(np.int32),
                 rot_rows.astype(np.int32), prow, pcol, slot, cand_pair)


def _kahan(acc, inc):
  """Compensated float32 accumulation (``acc`` is (sum, compensation)): sums of 2^22 and more batch
  increments stay within a few ulps, as the exact pass's pairwise merges do."""
  total, comp = acc
  y = inc - comp
  new = total + y
  return new, (new - total) - y


def _acc_init(lay: _Layout, s: int, n: int, squares: bool) -> dict:
  """Zeroed sums of one pass: per neuron Σx̃ and Σx̃² (x̃ = x − shift), per pair Σx̃ỹ (and Σ(x̃ỹ)² with
  ``squares``), the full rows, and the rotated neurons' Σr̃²."""
  m = s * n
  f, f2 = len(_padded(lay.full_F)), len(_padded(lay.rot_full_F))
  shapes = {"s1": (m,), "s2": (m,), "r2": (lay.union_SxU.size,),
            "full": (f, m), "rot_full": (f2, m), "rall2": (m if f2 else 0,)}
  for i, c in enumerate(lay.bucket_cols):
    shapes[f"p{i}"] = c.shape
    if squares:
      shapes[f"q{i}"] = c.shape
  if squares:
    shapes.update(full2=(f, m), rot_full2=(f2, m))
  sums = {k: (jnp.zeros(v, jnp.float32), jnp.zeros(v, jnp.float32)) for k, v in shapes.items()}
  return {"count": jnp.zeros((), jnp.int32), "finite": jnp.ones((), bool), "sums": sums}


def _gathered(chunk_ExV, rows_R, cols_RxJ, squares):
  """Σ over the chunk's inputs of x̃_row·x̃_col for each row's own columns (and of its square): the columns'
  rows of the neuron-major chunk are gathered (J·V floats per row, from cache), never the full product."""
  cols_RxJxV = chunk_ExV.at[cols_RxJ].get(mode="promise_in_bounds")  # the layout's indices are in range
  rows_RxV = chunk_ExV.at[rows_R].get(mode="promise_in_bounds")
  p = jnp.einsum("rjv,rv->rj", cols_RxJxV, rows_RxV, precision=_HIGHEST)
  if not squares:
    return p, None
  return p, jnp.einsum("rjv,rv->rj", jnp.square(cols_RxJxV), jnp.square(rows_RxV), precision=_HIGHEST)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("squares",))
def _acc_update(acc, x_SxBxN, b, shift_SxN, bucket_rows, bucket_cols, q_sel_SxNxU, full_F, rot_full_F,
                q_SxNxN, *, squares):
  """Add one batch (its first ``b`` inputs are data) to the sums of :func:`_acc_init`.

  The batch is shifted and made neuron-major once; products run over chunks of ``_CHUNK`` inputs, so that
  float32 rounding grows with sequential runs of ``_CHUNK`` inputs, not with the batch, and each batch's
  sums join the totals with compensation (Kahan)."""
  s, bmax, n = x_SxBxN.shape
  m = s * n
  v = min(_CHUNK, bmax)
  pad = -bmax % v
  x = jnp.pad(x_SxBxN, ((0, 0), (0, pad), (0, 0))) if pad else x_SxBxN
  nck = (bmax + pad) // v
  valid_B = jnp.arange(bmax + pad) < b
  xs_SxBxN = jnp.where(valid_B[None, :, None], x - shift_SxN[:, None, :], 0.0)
  cols = [xs_SxBxN.transpose(0, 2, 1).reshape(m, bmax + pad)]
  u = q_sel_SxNxU.shape[-1]
  if u:  # rotated neurons are mixtures of one model's neurons: one product per batch
    cols.append(jnp.einsum("sbn,snu->sub", xs_SxBxN, q_sel_SxNxU, precision=_HIGHEST).reshape(s * u, -1))
  if rot_full_F.shape[0]:
    cols.append(jnp.einsum("sbk,skn->snb", xs_SxBxN, q_SxNxN, precision=_HIGHEST).reshape(m, -1))
  cols_ExB = jnp.concatenate(cols) if len(cols) > 1 else cols[0]
  e = cols_ExB.shape[0]
  n_rot = s * u
  nf, nf2 = full_F.shape[0], rot_full_F.shape[0]
  names = ["s1", "s2"] + [f"p{k}" for k in range(len(bucket_rows))]
  names += [f"q{k}" for k in range(len(bucket_rows))] if squares else []
  names += (["full"] + (["full2"] if squares else [])) if nf else []
  names += (["rot_full"] + (["rot_full2"] if squares else [])) if nf2 else []

  def chunk(i, inc):
    c_ExV = lax.dynamic_slice_in_dim(cols_ExB, i * v, v, axis=1)
    sq_ExV = jnp.square(c_ExV)
    out = dict(inc)
    out["s1"] = inc["s1"] + jnp.sum(c_ExV, axis=1)
    out["s2"] = inc["s2"] + jnp.sum(sq_ExV, axis=1)
    for k, (r, c) in enumerate(zip(bucket_rows, bucket_cols)):
      p, p2 = _gathered(c_ExV, r, c, squares)
      out[f"p{k}"] = inc[f"p{k}"] + p
      if squares:
        out[f"q{k}"] = inc[f"q{k}"] + p2
    for name, rows, lo in (("full", full_F, 0), ("rot_full", rot_full_F, m + n_rot)):
      if rows.shape[0]:
        blk = lax.dynamic_slice_in_dim(c_ExV, lo, m, axis=0)
        out[name] = inc[name] + lax.dot_general(c_ExV[rows], blk, _NT, precision=_HIGHEST)
        if squares:
          sq_blk = lax.dynamic_slice_in_dim(sq_ExV, lo, m, axis=0)
          out[name + "2"] = inc[name + "2"] + lax.dot_general(sq_ExV[rows], sq_blk, _NT, precision=_HIGHEST)
    return out

  zeros = {k: jnp.zeros_like(acc["sums"][k][0]) for k in names}
  zeros["s1"] = zeros["s2"] = jnp.zeros((e,), jnp.float32)
  inc = lax.fori_loop(0, nck, chunk, zeros)
  # s1 and s2 cover every column: the real neurons, the rotated union, every rotated neuron.
  inc["r2"] = inc["s2"][m:m + n_rot]
  if nf2:
    inc["rall2"] = inc["s2"][m + n_rot:]
  inc["s1"], inc["s2"] = inc["s1"][:m], inc["s2"][:m]
  sums = dict(acc["sums"])
  for k, val in inc.items():
    sums[k] = _kahan(sums[k], val)
  finite = jnp.all(jnp.isfinite(sums["s2"][0]))
  return {"count": acc["count"] + b, "finite": acc["finite"] & finite, "sums": sums}


def _accumulate(batches, lay: _Layout, shift_SxN, q_SxNxN, s, n, squares, host: bool | None = None,
                precise: bool = True) -> dict:
  """One pass over ``batches`` (``(acts_SxBmaxxN, b)`` as ``correlation._batches`` yields them): on the
  CPU by :mod:`universality.kernels.gathered` (``host``; default: where it runs), else by XLA. A pass
  that only steers the screen (never reported) is not ``precise``: the CPU loop may take float32
  products for its full rows."""
  q_sel = (jnp.take_along_axis(q_SxNxN, jnp.asarray(lay.union_SxU)[:, None, :], axis=2)
           if lay.union_SxU.shape[1] else jnp.zeros((s, n, 0), jnp.float32))
  if gathered.available() if host is None else host:
    sums = gathered.Sums(lay.pair_rows, lay.pair_cols, lay.full_F, lay.rot_full_F,
                         q_sel if lay.union_SxU.shape[1] else None, q_SxNxN, s, n, squares, precise)
    for x, b in batches:
      if x.shape[0] != s or x.shape[2] != n:
        raise kc.CorrelationError(f"batch has (S, N) = {(x.shape[0], x.shape[2])}, the first had {(s, n)}")
      sums.add(x, b, shift_SxN)
    return sums.as_acc()
  acc = _acc_init(lay, s, n, squares)
  args = (jnp.asarray(shift_SxN, jnp.float32), tuple(jnp.asarray(r) for r in lay.bucket_rows),
          tuple(jnp.asarray(c) for c in lay.bucket_cols), q_sel, jnp.asarray(_padded(lay.full_F)),
          jnp.asarray(_padded(lay.rot_full_F)), q_SxNxN if len(lay.rot_full_F) else None)
  for x, b in batches:
    if x.shape[0] != s or x.shape[2] != n:
      raise kc.CorrelationError(f"batch has (S, N) = {(x.shape[0], x.shape[2])}, the first had {(s, n)}")
    acc = _acc_update(acc, x, jnp.int32(b), *args, squares=squares)
  return acc


@dataclasses.dataclass(frozen=True)
class _Observed:
  """What one pass measured, in float64: per candidate its correlation (and ``m22``), the full rows'
  correlations with every neuron of every group, and the rows dead over the pass's inputs."""

  count: int
  dead_M: np.ndarray
  cand_corr_MxHxJ: np.ndarray            # -inf where no candidate was computed
  cand_m22_MxHxJ: np.ndarray | None
  full_rows_F: np.ndarray                # rows whose real groups were computed in full
  full_corr_FxSxN: np.ndarray
  full_m22_FxSxN: np.ndarray | None
  rot_rows_F: np.ndarray                 # rows whose rotated groups were computed in full
  rot_corr_FxSxN: np.ndarray
  rot_m22_FxSxN: np.ndarray | None


def _value(acc, name):
  total, comp = acc["sums"][name]
  return np.asarray(total, np.float64) - np.asarray(comp, np.float64)


def _inv(m2, dead):
  return np.where(dead, 0.0, 1.0 / np.sqrt(np.where(dead, 1.0, m2)))


def _observe(acc, lay: _Layout, shift_SxN, q_SxNxN, *, s, n, dead_rtol, squares) -> _Observed:
  m = s * n
  cnt = int(acc["count"])
  if cnt < 2:
    raise kc.CorrelationError(f"need at least 2 inputs, the source yielded {cnt}")
  if not bool(acc["finite"]):
    raise kc.CorrelationError("activations contain NaN or infinity")
  d_M = _value(acc, "s1") / cnt
  mean_M = np.asarray(shift_SxN, np.float64).reshape(m) + d_M
  m2_M = np.maximum(_value(acc, "s2") - cnt * d_M * d_M, 0.0)
  tol_M = cnt * np.square(dead_rtol * np.maximum(np.abs(mean_M), 1.0))
  dead_M = m2_M <= tol_M
  inv_M = _inv(m2_M, dead_M)
  q = None if q_SxNxN is None else np.asarray(q_SxNxN, np.float64)
  cand_corr = np.full(lay.cand_pair_MxHxJ.shape, -np.inf)
  cand_m22 = np.full(lay.cand_pair_MxHxJ.shape, np.nan) if squares else None
  if lay.n_pairs:
    d_col, m2_col, inv_col = d_M, m2_M, inv_M
    if lay.union_SxU.shape[1]:
      q_sel = np.take_along_axis(q, lay.union_SxU[:, None, :], axis=2)
      d_rot = np.einsum("sn,snu->su", d_M.reshape(s, n), q_sel).reshape(-1)
      m2_rot = np.maximum(_value(acc, "r2") - cnt * d_rot * d_rot, 0.0)
      rdead = m2_rot <= np.einsum("snu,sn->su", np.square(q_sel), tol_M.reshape(s, n)).reshape(-1)
      d_col = np.concatenate([d_M, d_rot])
      m2_col = np.concatenate([m2_M, m2_rot])
      inv_col = np.concatenate([inv_M, _inv(m2_rot, rdead)])
    buckets = range(len(lay.bucket_rows))
    raw = (_value(acc, "pairs") if "pairs" in acc["sums"]
           else np.concatenate([_value(acc, f"p{k}").reshape(-1) for k in buckets])[lay.pair_slot])
    pr, pc = lay.pair_rows, lay.pair_cols
    co = raw - cnt * d_M[pr] * d_col[pc]
    corr_P = np.clip(co * inv_M[pr] * inv_col[pc], -1.0, 1.0)
    have = lay.cand_pair_MxHxJ >= 0
    idx = np.maximum(lay.cand_pair_MxHxJ, 0)
    cand_corr = np.where(have, corr_P[idx], -np.inf)
    if squares:
      raw2 = (_value(acc, "pairs2") if "pairs2" in acc["sums"]
              else np.concatenate([_value(acc, f"q{k}").reshape(-1) for k in buckets])[lay.pair_slot])
      m22_P = raw2 * cnt / np.maximum(m2_M[pr] * m2_col[pc], 1e-300)
      cand_m22 = np.where(have, m22_P[idx], np.nan)
  empty = np.zeros((0, s, n))
  full_corr, full_m22, rot_corr, rot_m22 = empty, None, empty, None
  rows = lay.full_F
  if len(rows):
    co = _value(acc, "full")[:len(rows)] - cnt * d_M[rows, None] * d_M[None, :]
    full_corr = np.clip(co * inv_M[rows, None] * inv_M[None, :], -1.0, 1.0).reshape(-1, s, n)
    if squares:
      full_m22 = (_value(acc, "full2")[:len(rows)] * cnt
                  / np.maximum(m2_M[rows, None] * m2_M[None, :], 1e-300)).reshape(-1, s, n)
  rrows = lay.rot_full_F
  if len(rrows):
    d_rall = np.einsum("sk,skn->sn", d_M.reshape(s, n), q).reshape(m)
    m2_rall = np.maximum(_value(acc, "rall2") - cnt * d_rall * d_rall, 0.0)
    rdead = m2_rall <= np.einsum("skn,sk->sn", np.square(q), tol_M.reshape(s, n)).reshape(m)
    co = _value(acc, "rot_full")[:len(rrows)] - cnt * d_M[rrows, None] * d_rall[None, :]
    rot_corr = np.clip(co * inv_M[rrows, None] * _inv(m2_rall, rdead)[None, :], -1.0, 1.0).reshape(-1, s, n)
    if squares:
      rot_m22 = (_value(acc, "rot_full2")[:len(rrows)] * cnt
                 / np.maximum(m2_M[rrows, None] * m2_rall[None, :], 1e-300)).reshape(-1, s, n)
  return _Observed(cnt, dead_M, cand_corr, cand_m22, rows, full_corr, full_m22, rrows, rot_corr, rot_m22)


def _full_groups(obs: _Observed, s: int, g: int):
  """Rows computed in full, as ``(rows, corr_RxHxN, m22_RxHxN or None, groups)`` per kind (real, rotated)."""
  out = [(obs.full_rows_F, obs.full_corr_FxSxN, obs.full_m22_FxSxN, slice(0, s))]
  if g > s:
    out.append((obs.rot_rows_F, obs.rot_corr_FxSxN, obs.rot_m22_FxSxN, slice(s, g)))
  return out


@dataclasses.dataclass
class _Result:
  """Per row neuron and group: max, argmax, and how it was settled (filled in as the passes finish)."""

  max_MxH: np.ndarray
  arg_MxH: np.ndarray
  full_row_M: np.ndarray


def _exclude_self(corr_RxHxN, rows_R, groups: slice, s: int, n: int, within: bool):
  """-inf where a row meets itself (real groups only) and where its group is not wanted."""
  out = corr_RxHxN.copy()
  if groups.start == 0:
    out[np.arange(len(rows_R)), rows_R // n, rows_R % n] = -np.inf
    if not within:
      out[np.arange(len(rows_R)), rows_R // n, :] = -np.inf
  elif not within:
    out[np.arange(len(rows_R)), rows_R // n, :] = -np.inf
  return out


def _final(obs: _Observed, pl: Plan, full_MxH, res: _Result, *, s, n, within):
  """Write the exact maxima of a pass over all inputs into ``res``; returns the screened (row, group)s
  whose exact winner does not beat their bar."""
  g = pl.cand_MxHxJ.shape[1]
  vals = obs.cand_corr_MxHxJ
  have = np.isfinite(vals)
  best = vals.max(-1)
  arg = np.where((vals == best[..., None]) & have, pl.cand_MxHxJ, np.iinfo(np.int32).max).min(-1)
  screened = have.any(-1) & ~full_MxH
  res.max_MxH[screened] = best[screened]
  res.arg_MxH[screened] = arg[screened]
  surprise = screened & ~(best > pl.bar_MxH) & ~obs.dead_M[:, None]
  for rows, corr, _, groups in _full_groups(obs, s, g):
    if not len(rows):
      continue
    c = _exclude_self(corr, rows, groups, s, n, within)
    mx = c.max(-1)
    ar = np.argmax(c == mx[..., None], axis=-1)  # the first index attaining the max, as the exact pass
    none = mx == -np.inf
    res.max_MxH[rows, groups] = np.where(none, 0.0, mx)
    res.arg_MxH[rows, groups] = np.where(none, -1, ar)
    res.full_row_M[rows] = True
  return surprise


def _refine(obs: _Observed, pl: Plan, screen: Screen, *, s, n, within) -> Plan:
  """The plan for the next pass from exact co-moments over a prefix: the intervals ``r ± z·se`` of the
  computed candidates and full rows (``se`` from this prefix's ``m22``) drop every candidate whose upper
  bound falls below the group's best lower bound; a dropped candidate's upper bound raises the bar."""
  g = pl.cand_MxHxJ.shape[1]
  t = float(obs.count)
  se = lambda m22: screen.z * np.sqrt(np.maximum(np.nan_to_num(m22, nan=1.0), 1.0) / t)  # noqa: E731
  vals = obs.cand_corr_MxHxJ
  have = np.isfinite(vals)
  cand_dead = have & (vals == 0.0)  # a column dead over the prefix may still vary later: keep it
  upper = np.where(have, np.where(cand_dead, np.inf, vals + se(obs.cand_m22_MxHxJ)), -np.inf)
  lower = np.where(have & ~cand_dead, vals - se(obs.cand_m22_MxHxJ), -np.inf)
  order = np.argsort(-upper, axis=-1, kind="stable")
  upper_s = np.take_along_axis(upper, order, -1)
  idx_s = np.take_along_axis(pl.cand_MxHxJ, order, -1)
  best_lower = lower.max(-1)
  rank = np.arange(upper.shape[-1])[None, None, :]
  keep = np.isfinite(upper_s) & ((upper_s >= best_lower[..., None]) | (rank < screen.k))
  bar = np.maximum(pl.bar_MxH, np.where(keep | ~np.isfinite(upper_s), -np.inf, upper_s).max(-1))
  cand = np.where(keep, idx_s, -1).astype(np.int32)
  full = (bar >= best_lower) | ~keep.any(-1)
  j = cand.shape[-1]
  for rows, corr, m22, groups in _full_groups(obs, s, g):
    if not len(rows):
      continue
    c = _exclude_self(corr, rows, groups, s, n, within)
    dead_col = (corr == 0.0) & np.isfinite(c)
    up = np.where(dead_col, np.inf, c + se(m22))
    lo = np.where(dead_col | ~np.isfinite(c), -np.inf, c - se(m22))
    k_top = min(screen.max_candidates + 1, n)
    top_idx = np.argsort(-up, axis=-1, kind="stable")[..., :k_top]
    top = np.take_along_axis(up, top_idx, -1)
    kp, b, cd = _select(top, top_idx, lo.max(-1), screen)
    cand[rows, groups] = np.pad(cd, ((0, 0), (0, 0), (0, j - cd.shape[-1])), constant_values=-1)[..., :j]
    bar[rows, groups] = b
    full[rows, groups] = (b >= lo.max(-1)) | ~kp.any(-1)
  full |= obs.dead_M[:, None]
  full &= ~pl.skip_MxH
  cand = np.where(pl.skip_MxH[..., None] | full[..., None], -1, cand)
  return Plan(cand_MxHxJ=cand, bar_MxH=bar.astype(np.float32), full_MxH=full, skip_MxH=pl.skip_MxH)


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
  """Whether the planned pass does less than half the exact pass's work, per input (in co-moment entries
  of the exact pass's product: a pass over every neuron, the gathered pairs, the full rows)."""
  blocks = s * (s + 1) // 2 if within else s * (s - 1) // 2 + (s if rotation else 0)
  exact = blocks * n * n
  pairs = int(((pl.cand_MxHxJ >= 0) & ~pl.full_MxH[..., None]).sum())
  full = int(pl.full_MxH[:, :s].any(1).sum()) * s * n
  rot_full = pl.full_MxH[:, s:].any() * s * n * n
  pass_cost, pair_cost, full_cost = _COSTS_HOST if gathered.available() else _COSTS_XLA
  return pass_cost * s * n + pair_cost * pairs + full_cost * (full + rot_full) < 0.5 * exact


def max_correlation(acts_SxTxN, *, screen: Screen | str | None = "auto", baseline: str | None = None,
                    key: jax.Array | None = None, within: bool = True,
                    dead_rtol: float = kc.DEFAULT_DEAD_RTOL, stats: dict | None = None,
                    rotation_blocks: int = 1, **options) -> kc.MaxCorrelation:
  """:func:`universality.kernels.correlation.max_correlation`, screened (module docstring).

  Args:
    acts_SxTxN: an array or a re-iterable source of batches, as for the exact pass.
    screen: a :class:`Screen`, or a mode name with the default sample, margin and candidates.
    baseline, key, within, dead_rtol, rotation_blocks, **options: as for the exact pass (``options`` reach it
      when it runs: ``backend``, ``memory_bytes``, block sizes).
    stats: a dict to fill with what ran: ``ran`` ('exact' or 'screen'), ``pairs`` (gathered co-moments of
      the pass over all inputs), ``full_rows_sample`` (rows computed in full in that pass because the screen
      did not separate them), ``full_rows_check`` (rows whose exact winner did not beat the bar: one more
      pass), ``passes`` (passes over all inputs), ``refine`` (per refinement: inputs read, pairs, full rows).

  Returns:
    :class:`MaxCorrelation` with ``settled_SxN`` (``SETTLED_EXACT`` everywhere when the exact pass ran) and
    ``margin``.
  """
  screen = (Screen(mode=screen) if isinstance(screen, str) else screen or Screen(mode="off")).check()
  kc._check_options("xla", baseline, key, dead_rtol)  # pylint: disable=protected-access
  stats = {} if stats is None else stats
  stats.update(ran="exact", pairs=0, full_rows_sample=0, full_rows_check=0, passes=1, refine=[])
  exact = functools.partial(_exact, baseline=baseline, key=key, within=within,
                            dead_rtol=dead_rtol, rotation_blocks=rotation_blocks, **options)
  is_source = callable(acts_SxTxN) and not hasattr(acts_SxTxN, "shape")
  if not screen.may_screen() or isinstance(acts_SxTxN, (jax.core.Tracer, Iterator)):
    return exact(acts_SxTxN)
  t1 = int(screen.tokens)
  if is_source:
    sample, more = _prefix_sample(acts_SxTxN, t1)
    source, inputs = acts_SxTxN, screen.inputs
    if not more:
      return exact(lambda: iter([sample]))
  else:
    kc._check_acts(acts_SxTxN)  # pylint: disable=protected-access
    t = acts_SxTxN.shape[1]
    if t <= t1 or (screen.mode == "auto" and t < 8 * t1):
      return exact(acts_SxTxN)
    sample = _spread_sample(acts_SxTxN, t1)
    arr, inputs = jnp.asarray(acts_SxTxN), t
    # Batches in a fixed shuffled order, so that the prefix a refinement reads is spread over the array
    # (the co-moments do not depend on the order).
    starts = np.random.default_rng(0).permutation(np.arange(0, t, kc.XLA_BATCH))
    source = lambda: (arr[:, a:a + kc.XLA_BATCH] for a in starts)  # noqa: E731
  if not np.isfinite(sample).all():
    raise kc.CorrelationError("activations contain NaN or infinity")
  s, _, n = sample.shape
  q = kc.rotations(key, s, n, rotation_blocks) if baseline == "rotation" else None
  pl = plan(sample, q, screen, within=within, dead_rtol=dead_rtol)
  if screen.mode == "auto" and not _worth_it(pl, s, n, within, q is not None):
    return exact(source)
  return _screened(source, pl, q, screen, s=s, n=n, within=within, dead_rtol=dead_rtol, stats=stats,
                   shift_SxN=sample.mean(axis=1), inputs=inputs)


def _spread_full(full_MxH, s):
  """A row computed in full for one model is computed in full for all (one product gives them all)."""
  out = full_MxH.copy()
  out[:, :s] = full_MxH[:, :s].any(1, keepdims=True)
  if out.shape[1] > s:
    out[:, s:] = full_MxH[:, s:].any(1, keepdims=True)
  return out


def _prefix_batches(source, bmax: int, upto: int, state: dict):
  """The first ``upto`` inputs of a source as ``(acts_SxBmaxxN, b)``; ``state['more']``: whether it holds
  more."""
  have = 0
  state["more"] = False
  for x, b in kc._batches(source, bmax):  # pylint: disable=protected-access
    if have >= upto:
      state["more"] = True
      return
    take = min(b, upto - have)
    yield x, take
    have += take
    if take < b:
      state["more"] = True
      return


def _screened(source, pl: Plan, q, screen: Screen, *, s, n, within, dead_rtol, stats, shift_SxN,
              inputs) -> kc.MaxCorrelation:
  m, g = pl.cand_MxHxJ.shape[:2]
  first = next(iter(source()))
  bmax = first.shape[1]
  del first
  res = _Result(np.zeros((m, g), np.float32), np.full((m, g), -1, np.int32), np.zeros(m, bool))
  rotation = q is not None
  observe = functools.partial(_observe, shift_SxN=shift_SxN, q_SxNxN=q, s=s, n=n, dead_rtol=dead_rtol)
  accumulate = functools.partial(_accumulate, shift_SxN=shift_SxN, q_SxNxN=q, s=s, n=n)
  refined, level = [], int(screen.tokens)
  while True:
    full = _spread_full(pl.full_MxH, s) & ~pl.skip_MxH
    lay = layout(pl, full, s, n, rotation)
    upto = level * int(screen.growth)
    state = {"more": False}
    if inputs is not None and 2 * upto > inputs:
      acc = accumulate(kc._batches(source, bmax), lay, squares=False)  # pylint: disable=protected-access
      obs = observe(acc, lay, squares=False)
    else:
      # With the inputs known this prefix is not the last pass, and only steers the screen.
      acc = accumulate(_prefix_batches(source, bmax, upto, state), lay, squares=True, precise=inputs is None)
      obs = observe(acc, lay, squares=True)
    del acc
    if not state["more"]:
      break
    refined.append({"tokens": obs.count, "pairs": lay.n_pairs, "full_rows": int(full.any(1).sum())})
    pl = _refine(obs, pl, screen, s=s, n=n, within=within)
    level = upto
  stats.update(ran="screen", pairs=lay.n_pairs, full_rows_sample=int(full.any(1).sum()), refine=refined)
  surprise = _final(obs, pl, full, res, s=s, n=n, within=within)
  dead_M, count = obs.dead_M, obs.count
  if surprise.any():
    again = _spread_full(surprise, s) & ~pl.skip_MxH
    none = dataclasses.replace(pl, cand_MxHxJ=np.full_like(pl.cand_MxHxJ, -1))
    lay3 = layout(none, again, s, n, rotation)
    stats.update(full_rows_check=int(again.any(1).sum()), passes=2)
    acc = accumulate(kc._batches(source, bmax), lay3, squares=False)  # pylint: disable=protected-access
    if int(acc["count"]) != count:
      raise kc.CorrelationError(f"source is not re-iterable: {int(acc['count'])} inputs in a later pass, "
                                f"{count} in the first")
    _final(observe(acc, lay3, squares=False), none, again, res, s=s, n=n, within=within)
  res.max_MxH[dead_M] = 0.0
  res.arg_MxH[dead_M] = -1
  res.max_MxH[pl.skip_MxH], res.arg_MxH[pl.skip_MxH] = 0.0, -1
  shaped = lambda a: jnp.asarray(a.reshape(s, n, -1))  # noqa: E731
  settled = np.where(res.full_row_M, SETTLED_FULL_ROW, SETTLED_SCREEN).astype(np.int8).reshape(s, n)
  out = kc.MaxCorrelation(shaped(res.max_MxH[:, :s]), shaped(res.arg_MxH[:, :s]),
                          jnp.asarray(dead_M.reshape(s, n)),
                          shaped(res.max_MxH[:, s:]) if rotation else None,
                          shaped(res.arg_MxH[:, s:]) if rotation else None,
                          settled_SxN=jnp.asarray(settled), margin=screen.margin)
  return kc._without_self(out, within)  # pylint: disable=protected-access


__all__ = ["MODES", "Plan", "SETTLED_EXACT", "SETTLED_FULL_ROW", "SETTLED_SCREEN", "Screen", "layout",
           "max_correlation", "plan", "settings"]
