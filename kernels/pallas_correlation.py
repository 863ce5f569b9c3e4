"""Pallas kernel: Pearson correlation of every neuron with every neuron, reduced to a max per model.

The kernel sees activations already centred (mean removed) in neuron-major layout ``xc_(S·Np)xTp``: model
``j``'s neurons occupy rows ``j·Np .. j·Np + N`` and the rows ``N .. Np`` of each model are zero padding,
so that one model is exactly one column block. For a block of ``BR`` row neurons and one model ``j`` it
accumulates the co-moment ``acc_NpxBR = xc_j · xc_rowsᵀ`` over the input axis, then — still inside the
kernel — scales it by the inverse standard deviations, masks padding and the neuron itself, and keeps only
the maximum over model ``j``'s neurons and its argmax. Only ``O(S·N·S)`` numbers leave the kernel; the
``N×N`` correlation block never reaches main memory.

With a rotation ``q_SxNpxNp`` the same accumulated block also gives the baseline: mixing model ``j``'s
neurons by an orthogonal ``Q`` turns its co-moment column block into ``Qᵀ·acc`` (no second pass over the
data), normalised by the standard deviations of the rotated neurons.

Two variants share the reduction:
  * ``'tpu'`` (Mosaic): grid ``(row block, model, input block)``, the input axis is the innermost
    "arbitrary" axis and the co-moment lives in a VMEM scratch, so VMEM use does not grow with T. Block
    shapes have their last two dims divisible by 8 and 128 (``Np`` and ``BR`` are multiples of 128).
  * ``'gpu'`` (Triton): grid ``(row block, model)``, the input axis is a loop inside the kernel (Triton
    programs cannot accumulate across grid steps); blocks are powers of two.
Both run on CPU with ``interpret=True`` (used by the tests and by the ``'pallas'`` backend on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

PLATFORMS = ("tpu", "gpu")
_NT = (((1,), (1,)), ((), ()))  # contract the last (input) axis of both operands: A·Bᵀ


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def block_sizes(platform: str, s: int, n: int, t: int, block_rows: int | None = None,
                block_t: int | None = None) -> tuple[int, int, int]:
  """(Np, BR, BT): padded neurons per model, row block and input block for ``platform``.

  TPU: multiples of 128 (lane width; also divisible by the 8 sublanes); the row block is as large as 512
  to raise the arithmetic intensity of each step. GPU (Triton): powers of two, at least 16 (the smallest
  ``tl.dot`` tile), and a small row block because the accumulator lives in registers. ``BR`` divides the
  ``S·Np`` padded rows.
  """
  if platform == "tpu":
    np_ = _round_up(n, 128)
    br = block_rows or next(b for b in (512, 256, 128) if (s * np_) % b == 0)
    bt = block_t or min(512, _round_up(t, 128))
    if br % 128 or (s * np_) % br or bt % 128:
      raise ValueError(f"TPU blocks must be multiples of 128, BR dividing S·Np={s * np_}: got BR={br}, "
                       f"BT={bt}")
  elif platform == "gpu":
    np_ = max(16, _next_pow2(n))
    br = block_rows or min(64, np_)
    bt = block_t or 32
    if br < 16 or br & (br - 1) or (s * np_) % br or bt < 16 or bt & (bt - 1):
      raise ValueError(f"GPU blocks must be powers of two >= 16, BR dividing S·Np={s * np_}: got BR={br}, "
                       f"BT={bt}")
  else:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  return np_, br, bt


def _reduce(acc_NpxBR, colinv_Npx1, rowinv_1xBR, *, n, self_shift):
  """Correlation block -> (max, argmax) over its column neurons, each ``(1, BR)``.

  ``self_shift`` (scalar, may be traced) is the first row's flattened index minus the first column's:
  column ``c`` is row ``r``'s own neuron when ``c == r + self_shift``, and is excluded. None: no
  exclusion. Padded columns (``>= n``) are excluded; a row with no candidate left gets max 0, argmax -1.
  """
  np_, br = acc_NpxBR.shape
  corr = jnp.clip(acc_NpxBR * colinv_Npx1 * rowinv_1xBR, -1.0, 1.0)
  col = lax.broadcasted_iota(jnp.int32, (np_, br), 0)
  valid = col < n
  if self_shift is not None:
    row = lax.broadcasted_iota(jnp.int32, (np_, br), 1)
    valid = valid & (col != row + self_shift)
  corr = jnp.where(valid, corr, -jnp.inf)
  best = jnp.max(corr, axis=0, keepdims=True)
  # First index attaining the max, as a float min-reduction across sublanes (exact below 2**24): the
  # float reductions are the ones every Mosaic and Triton version lowers.
  arg = jnp.min(jnp.where(corr == best, col.astype(jnp.float32), float(np_)), axis=0, keepdims=True)
  empty = best == -jnp.inf
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, arg.astype(jnp.int32))


def _finish(acc, colinv_ref, rowinv_ref, q_ref, rotinv_ref, out_refs, *, n, np_, br, r, j, precision):
  """Write max/argmax (and the rotation baseline) of one finished co-moment block."""
  # Flattened indices, no division: floor division lowers through sign(), which Mosaic resolves against
  # the attached TPU's generation, so it could not be exported from a machine without one.
  self_shift = r * br - j * np_
  rowinv = rowinv_ref[...]
  colinv = colinv_ref[0]

  def store(refs, values):
    for ref, v in zip(refs, values):
      ref[...] = v.reshape(ref.shape)

  store(out_refs[:2], _reduce(acc, colinv, rowinv, n=n, self_shift=self_shift))

  if q_ref is not None:
    # Rotated co-moment Qᵀ·C: model j's neurons mixed by Q (Np×Np, zero outside the N×N corner).
    rot = lax.dot_general(q_ref[0], acc, (((0,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32)
    store(out_refs[2:], _reduce(rot, rotinv_ref[0], rowinv, n=n, self_shift=None))


def _tpu_kernel(*refs, n, np_, br, n_t_blocks, with_rotation, precision):
  if with_rotation:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, q_ref, rotinv_ref, *outs, acc_ref = refs
  else:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, *outs, acc_ref = refs
    q_ref = rotinv_ref = None
  r, j, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += lax.dot_general(cols_ref[...], rows_ref[...], _NT, precision=precision,
                                  preferred_element_type=jnp.float32)

  @pl.when(k == n_t_blocks - 1)
  def _():
    _finish(acc_ref[...], colinv_ref, rowinv_ref, q_ref, rotinv_ref, outs, n=n, np_=np_, br=br, r=r,
            j=j, precision=precision)


def _gpu_kernel(*refs, n, np_, br, bt, n_t_blocks, with_rotation, precision):
  if with_rotation:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, q_ref, rotinv_ref, *outs = refs
  else:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, *outs = refs
    q_ref = rotinv_ref = None
  r, j = pl.program_id(0), pl.program_id(1)

  def step(k, acc):
    t = pl.ds(pl.multiple_of(k * bt, bt), bt)
    return acc + lax.dot_general(cols_ref[:, t], rows_ref[:, t], _NT, precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, n_t_blocks, step, jnp.zeros((np_, br), jnp.float32))
  _finish(acc, colinv_ref, rowinv_ref, q_ref, rotinv_ref, outs, n=n, np_=np_, br=br, r=r, j=j,
          precision=precision)


def fused_max(xc_SxNpxTp, inv_SxNp, *, n: int, platform: str, block_rows: int, block_t: int,
              q_SxNpxNp=None, rotinv_SxNp=None, interpret: bool = False,
              precision=lax.Precision.HIGHEST):
  """Max correlation of every (padded) neuron against each model, from centred padded activations.

  Args:
    xc_SxNpxTp: float32 centred activations, neuron-major, zero-padded to ``Np`` neurons and ``Tp``
      inputs (padding must be zero: it then adds nothing to any co-moment).
    inv_SxNp: inverse standard deviation ``1/sqrt(M2)`` per neuron, 0 for dead and padded neurons.
    n: real neurons per model (columns ``>= n`` of each model are padding and never win the max).
    platform: ``'tpu'`` (Mosaic grid kernel) or ``'gpu'`` (Triton kernel).
    block_rows, block_t: ``BR`` and ``BT`` from :func:`block_sizes`.
    q_SxNpxNp, rotinv_SxNp: optional rotation per model (zero outside the ``n×n`` corner) and inverse
      standard deviations of the rotated neurons; when given the baseline is returned too.
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    ``(max_SxNpxS, argmax_SxNpxS)``, followed by the baseline pair when a rotation is given.
  """
  s, np_, tp = xc_SxNpxTp.shape
  br, bt = block_rows, block_t
  if (s * np_) % br or tp % bt:
    raise ValueError(f"padded sizes S·Np={s * np_}, Tp={tp} must be multiples of BR={br}, BT={bt}")
  with_rotation = q_SxNpxNp is not None
  m = s * np_
  xc_MxTp = xc_SxNpxTp.reshape(m, tp)
  rowinv_1xM = inv_SxNp.reshape(1, m)
  colinv_SxNpx1 = inv_SxNp.reshape(s, np_, 1)
  n_t_blocks = tp // bt
  out_shape = [jax.ShapeDtypeStruct((s, 1, m), jnp.float32), jax.ShapeDtypeStruct((s, 1, m), jnp.int32)]
  args = [xc_MxTp, xc_MxTp, rowinv_1xM, colinv_SxNpx1]
  if with_rotation:
    out_shape = out_shape * 2
    args += [q_SxNpxNp, rotinv_SxNp.reshape(s, np_, 1)]

  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    grid = (m // br, s, n_t_blocks)
    in_specs = [pl.BlockSpec((br, bt), lambda r, j, k: (r, k)),
                pl.BlockSpec((np_, bt), lambda r, j, k: (j, k)),
                pl.BlockSpec((1, br), lambda r, j, k: (0, r)),
                pl.BlockSpec((1, np_, 1), lambda r, j, k: (j, 0, 0))]
    if with_rotation:
      in_specs += [pl.BlockSpec((1, np_, np_), lambda r, j, k: (j, 0, 0)),
                   pl.BlockSpec((1, np_, 1), lambda r, j, k: (j, 0, 0))]
    out_spec = pl.BlockSpec((1, 1, br), lambda r, j, k: (j, 0, r))
    kernel = functools.partial(_tpu_kernel, n=n, np_=np_, br=br, n_t_blocks=n_t_blocks,
                               with_rotation=with_rotation, precision=precision)
    extra = dict(scratch_shapes=[pltpu.VMEM((np_, br), jnp.float32)],
                 compiler_params=pltpu.CompilerParams(
                     dimension_semantics=("parallel", "parallel", "arbitrary")))
  elif platform == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    grid = (m // br, s)
    in_specs = [pl.BlockSpec((br, tp), lambda r, j: (r, 0)),
                pl.BlockSpec((np_, tp), lambda r, j: (j, 0)),
                pl.BlockSpec((1, br), lambda r, j: (0, r)),
                pl.BlockSpec((1, np_, 1), lambda r, j: (j, 0, 0))]
    if with_rotation:
      in_specs += [pl.BlockSpec((1, np_, np_), lambda r, j: (j, 0, 0)),
                   pl.BlockSpec((1, np_, 1), lambda r, j: (j, 0, 0))]
    out_spec = pl.BlockSpec((1, 1, br), lambda r, j: (j, 0, r))
    kernel = functools.partial(_gpu_kernel, n=n, np_=np_, br=br, bt=bt, n_t_blocks=n_t_blocks,
                               with_rotation=with_rotation, precision=precision)
    # Accumulator, Q and the reduction share the registers of one program: keep warps modest.
    extra = dict(compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))
  else:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

  flops = 2 * tp * m * m + (2 * np_ * m * m if with_rotation else 0)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=[out_spec] * len(out_shape),
      interpret=interpret, name="max_correlation",
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0,
                                    bytes_accessed=4 * (m * tp * (1 + m // br) + 4 * s * m)),
      **extra)(*args)
  # (S_cols, 1, M_rows) -> (S_rows, Np, S_cols): row neuron first, then the model it is compared with.
  return tuple(o.reshape(s, s, np_).transpose(1, 2, 0) for o in outs)


__all__ = ["PLATFORMS", "block_sizes", "fused_max"]
