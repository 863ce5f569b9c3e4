"""The screened pass's exact co-moments on the CPU, read straight from model-major batches.

A pass of :mod:`universality.kernels.screen` needs, per batch, a few thousand co-moments ``Σ x̃_r·x̃_c``
(each neuron's candidates), per neuron ``Σx̃`` and ``Σx̃²``, and the rows the screen could not separate in
full. On accelerators that is a gathered product over a neuron-major batch (``screen._acc_update``). XLA on
the CPU has no fast gather along the minor axis, so it pays for transposing each batch (10–40× the time to
read it) and ~26 matrix-product entries per gathered pair. Here one compiled loop (numba, every thread a
share of the batch's inputs) reads each input's row of every model once, shifted by the sample's means
into a float32 row that stays in the first-level cache, and adds every pair's product (exact in float64)
to float64 totals. Full rows are held by the loop while they are few (``ROW_ENTRIES``); more are products
over the whole batch: float64 ones for a pass whose sums are reported, float32 ones for a refinement that
only steers the screen (float32 products over a batch are off by ~4e-7 of a correlation, more than the
exact pass may be). Rotations are float64 products. On the byte-LM activations of benchmarks/README.md a
batch of 4,096 inputs × 2 × 2,048 neurons with ~7,800 pairs takes 20–40 ms here (the exact pass 370–480
ms, the XLA gathered pass ~360 ms).

The sums are those of ``screen._acc_update`` (same names and meaning, float64, no compensation needed):
``s1``, ``s2`` per real neuron, ``r2`` per rotated neuron of the union, ``rall2`` per rotated neuron when
rows take every rotated neuron, ``full``/``rot_full`` (and the squares ``full2``/``rot_full2``) per full
row, and per unique pair of the layout ``pairs`` (and ``pairs2``, the sums of squared products).

Local shape letters:

  E  one input's values as the loop holds them: M neurons, the rotated union (S·U), every rotated neuron
  Z  rotated neurons per model held for rows taken in full against every rotated neuron (N or 0)
"""

from __future__ import annotations

import jax
import numpy as np

try:  # optional: without it (or off the CPU) the screened pass runs its XLA path
  import numba
except ImportError:  # pragma: no cover - numba is an install requirement
  numba = None


def available() -> bool:
  """Whether this path runs: numba is installed and JAX computes on the CPU."""
  return numba is not None and jax.default_backend() == "cpu"


def _pairs(x_SxBxN, shift_SxN, y_SxBxU, z_SxBxZ, b, rows_P, cols_P, full_F, rot_F, squares, nt):
  """Per-thread token ranges; per input its E values, their sums and squares, every pair's product, and the
  rows ``full_F`` (against the M neurons) and ``rot_F`` (against every rotated neuron) in full."""
  s, _, n = x_SxBxN.shape
  u, nz = y_SxBxU.shape[2], z_SxBxZ.shape[2]
  m = s * n
  e = s * (n + u + nz)
  p, f, f2 = rows_P.shape[0], full_F.shape[0], rot_F.shape[0]
  ps = p if squares else 0
  s1 = np.zeros((nt, e))
  s2 = np.zeros((nt, e))
  acc = np.zeros((nt, p))
  acc2 = np.zeros((nt, ps))
  full = np.zeros((nt, f, m))
  full2 = np.zeros((nt, f if squares else 0, m))
  rot = np.zeros((nt, f2, m))
  rot2 = np.zeros((nt, f2 if squares else 0, m))
  for t in numba.prange(nt):
    v_E = np.empty(e, np.float32)  # fits the first-level cache; products and sums are float64
    for tok in range(t * b // nt, (t + 1) * b // nt):
      for g in range(s):
        for j in range(n):
          v_E[g * n + j] = x_SxBxN[g, tok, j] - shift_SxN[g, j]
      off = m
      for g in range(s):
        for j in range(u):
          v_E[off + g * u + j] = y_SxBxU[g, tok, j]
      off += s * u
      for g in range(s):
        for j in range(nz):
          v_E[off + g * nz + j] = z_SxBxZ[g, tok, j]
      for j in range(e):
        v = np.float64(v_E[j])
        s1[t, j] += v
        s2[t, j] += v * v
      if squares:
        for q in range(p):
          w = np.float64(v_E[rows_P[q]]) * np.float64(v_E[cols_P[q]])
          acc[t, q] += w
          acc2[t, q] += w * w
      else:
        for q in range(p):
          acc[t, q] += np.float64(v_E[rows_P[q]]) * np.float64(v_E[cols_P[q]])
      for i in range(f):
        w = np.float64(v_E[full_F[i]])
        for j in range(m):
          full[t, i, j] += w * np.float64(v_E[j])
        if squares:
          for j in range(m):
            full2[t, i, j] += (w * w) * np.square(np.float64(v_E[j]))
      for i in range(f2):
        w = np.float64(v_E[rot_F[i]])
        for j in range(m):
          rot[t, i, j] += w * np.float64(v_E[off + j])
        if squares:
          for j in range(m):
            rot2[t, i, j] += (w * w) * np.square(np.float64(v_E[off + j]))
  return (s1.sum(0), s2.sum(0), acc.sum(0), acc2.sum(0), full.sum(0), full2.sum(0), rot.sum(0),
          rot2.sum(0))


# Full rows held by the loop itself (their float64 totals stay in cache) while rows × E is at most this;
# more rows are products over the whole batch (BLAS).
ROW_ENTRIES = 1 << 16

_pairs_jit = (numba.njit(parallel=True, cache=True, boundscheck=False, nogil=True)(_pairs)
              if numba is not None else None)


def _full_rows(xs_SxBxN, rows_F, cols_SxBxN):
  """Σ over the batch of x̃_row·col for each row against every neuron of ``cols_SxBxN`` ([F, S·N], float64;
  float32 products for float32 operands)."""
  s, _, n = xs_SxBxN.shape
  r_FxB = xs_SxBxN[rows_F // n, :, rows_F % n]
  return np.concatenate([r_FxB @ cols_SxBxN[g] for g in range(s)], axis=1).astype(np.float64)


class Sums:
  """Float64 totals of one pass over batches (the layout's pairs, full rows and per-neuron sums)."""

  def __init__(self, pair_rows_P, pair_cols_P, full_F, rot_full_F, q_sel_SxNxU, q_SxNxN, s: int, n: int,
               squares: bool, precise: bool = True):
    self.rows_P = np.ascontiguousarray(pair_rows_P, np.int64)
    self.cols_P = np.ascontiguousarray(pair_cols_P, np.int64)
    self.full_F, self.rot_full_F = np.asarray(full_F, np.int64), np.asarray(rot_full_F, np.int64)
    self.q_sel = None if q_sel_SxNxU is None else np.asarray(q_sel_SxNxU, np.float64)
    self.q = None if q_SxNxN is None or not len(self.rot_full_F) else np.asarray(q_SxNxN, np.float64)
    self.s, self.n, self.squares, self.precise = s, n, squares, precise
    m, u = s * n, 0 if self.q_sel is None else self.q_sel.shape[2]
    self.u = u
    self.count, self.finite = 0, True
    self.sums = {"s1": np.zeros(m), "s2": np.zeros(m), "r2": np.zeros(s * u),
                 "rall2": np.zeros(m if len(self.rot_full_F) else 0),
                 "full": np.zeros((len(self.full_F), m)), "rot_full": np.zeros((len(self.rot_full_F), m)),
                 "pairs": np.zeros(len(self.rows_P))}
    if squares:
      self.sums.update(pairs2=np.zeros(len(self.rows_P)), full2=np.zeros_like(self.sums["full"]),
                       rot_full2=np.zeros_like(self.sums["rot_full"]))

  def add(self, x_SxBxN, b: int, shift_SxN) -> None:
    """Adds the first ``b`` inputs of one batch (float32, model-major, as the source yields it)."""
    s, m, u = self.s, self.s * self.n, self.u
    x = np.ascontiguousarray(np.asarray(x_SxBxN)[:, :b], np.float32)
    shift32 = np.asarray(shift_SxN, np.float32)
    shift64 = shift32.astype(np.float64)  # the same shift in every sum
    f, f2 = len(self.full_F), len(self.rot_full_F)
    e = s * self.n + s * u + (m if self.q is not None else 0)
    in_loop = (f + f2) * e <= ROW_ENTRIES
    rows = (f or f2) and not in_loop
    xs = None
    if self.q_sel is not None or self.q is not None or (rows and self.precise):
      xs = x.astype(np.float64)
      xs -= shift64[:, None, :]
    none = np.zeros((s, b, 0))
    y = np.matmul(xs, self.q_sel) if self.q_sel is not None and u else none
    z = np.matmul(xs, self.q) if self.q is not None else none
    no_rows = np.zeros(0, np.int64)
    out = _pairs_jit(x, shift32, y, z, b, self.rows_P, self.cols_P, self.full_F if in_loop else no_rows,
                     self.rot_full_F if in_loop else no_rows, self.squares, numba.get_num_threads())
    s1, s2, p, p2, full, full2, rot, rot2 = out
    sums = self.sums
    sums["s1"] += s1[:m]
    sums["s2"] += s2[:m]
    sums["r2"] += s2[m:m + s * u]
    sums["rall2"] += s2[m + s * u:]
    sums["pairs"] += p
    if self.squares:
      sums["pairs2"] += p2
    if in_loop:
      for name, v, v2 in (("full", full, full2), ("rot_full", rot, rot2)):
        sums[name] += v
        if self.squares:
          sums[name + "2"] += v2
    elif rows:
      if not self.precise:  # float32 products (a pass that only steers the screen)
        xs = x - shift32[:, None, :]
      cols_z = z if self.precise or self.q is None else z.astype(np.float32)
      for name, rr, cols in (("full", self.full_F, xs), ("rot_full", self.rot_full_F, cols_z)):
        if len(rr):
          sums[name] += _full_rows(xs, rr, cols)
          if self.squares:
            sums[name + "2"] += _full_rows(np.square(xs), rr, np.square(cols))
    self.count += b
    self.finite = self.finite and bool(np.isfinite(s2[:m]).all())

  def as_acc(self) -> dict:
    """The totals in the form :func:`universality.kernels.screen._observe` reads (no compensation)."""
    out = {k: (v, np.zeros_like(v)) for k, v in self.sums.items()}
    return {"count": self.count, "finite": self.finite, "sums": out}
