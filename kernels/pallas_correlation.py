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

Large models (N in the thousands) do not fit one model's ``Np×BR`` co-moment in VMEM or registers: the
columns of a model are then cut into tiles of ``BN`` neurons (:func:`column_block`), each tile is reduced
as soon as it is accumulated and merged into a running (max, argmax) per row. The in-kernel rotation
needs all of a model's co-moment at once, so with column tiles the baseline is a second call whose
columns are the rotated activations (twice the FLOPs of the plain max, but it fits).
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


# Scoped VMEM that Mosaic grants a kernel by default is 16 MiB on v4/v5e (32 MiB on v6e); stay below it
# with room for the compiler's own temporaries.
TPU_VMEM_BUDGET = 12 << 20
# Triton keeps the accumulator, the operand tiles and the reduction in registers of one program
# (num_warps=4: 128 threads); above this many float32 values per program it spills heavily.
GPU_REGISTER_FLOATS = 16384


def vmem_bytes(np_: int, br: int, bt: int, bn: int, rotation: bool) -> int:
  """Estimated VMEM of one TPU kernel instance: double-buffered row and column input blocks, the
  ``BN×BR`` accumulator and about six temporaries of its size in the reduction, and (in-kernel rotation)
  the double-buffered ``Np×Np`` rotation with the ``Np×BR`` rotated block."""
  total = 4 * (2 * (br * bt + bn * bt) + 7 * bn * br + 4 * (br + bn))
  if rotation:
    total += 4 * (2 * np_ * np_ + 7 * np_ * br)
  return total


def gpu_floats(np_: int, br: int, bt: int, bn: int, rotation: bool) -> int:
  """float32 values one Triton program holds at once: accumulator, operand tiles, reduction temporaries
  (and the rotation with its rotated block)."""
  total = 3 * bn * br + bn * bt + br * bt
  if rotation:
    total += np_ * np_ + 2 * np_ * br
  return total


def column_block(platform: str, np_: int, br: int, bt: int, rotation: bool,
                 block_n: int | None = None) -> tuple[int, bool]:
  """(BN, rotate_in_kernel): neurons of one model per column tile, and whether the rotation baseline fits
  in the same kernel (only when a tile holds the whole model).

  The largest tile whose estimated footprint fits (:func:`vmem_bytes` on TPU, :func:`gpu_floats` on
  GPU) is taken, so no N chooses a configuration that cannot fit; ``block_n`` forces a tile.
  """
  if platform == "tpu":
    step, fits = 128, lambda bn, rot: vmem_bytes(np_, br, bt, bn, rot) <= TPU_VMEM_BUDGET
  elif platform == "gpu":
    step, fits = 16, lambda bn, rot: gpu_floats(np_, br, bt, bn, rot) <= GPU_REGISTER_FLOATS
  else:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  if block_n is not None:
    if block_n % step or np_ % block_n or (platform == "gpu" and block_n & (block_n - 1)):
      raise ValueError(f"block_n={block_n} must divide Np={np_} and be a multiple of {step}"
                       f"{' and a power of two' if platform == 'gpu' else ''}")
    return block_n, rotation and block_n == np_ and fits(np_, True)
  candidates = [b for b in range(np_, step - 1, -step) if np_ % b == 0 and
                (platform == "tpu" or b & (b - 1) == 0)]
  bn = next((b for b in candidates if fits(b, False)), step)
  return bn, rotation and bn == np_ and fits(np_, True)


def _reduce(acc_NpxBR, colinv_Npx1, rowinv_1xBR, *, n, self_shift, col_offset=0):
  """Correlation block -> raw (max, argmax) over its column neurons, each ``(1, BR)``.

  ``col_offset`` (may be traced) is the index of the block's first column within its model.
  ``self_shift`` (scalar, may be traced) is the first row's flattened index minus the first column's:
  column ``c`` is row ``r``'s own neuron when ``c == r + self_shift``, and is excluded. None: no
  exclusion. Padded columns (``>= n``) are excluded; a row with no candidate left keeps max -inf
  (:func:`_settle` turns it into max 0, argmax -1 once every tile is merged).
  """
  np_, br = acc_NpxBR.shape
  corr = jnp.clip(acc_NpxBR * colinv_Npx1 * rowinv_1xBR, -1.0, 1.0)
  col = col_offset + lax.broadcasted_iota(jnp.int32, (np_, br), 0)
  valid = col < n
  if self_shift is not None:
    row = lax.broadcasted_iota(jnp.int32, (np_, br), 1)
    valid = valid & (col != row + self_shift)
  corr = jnp.where(valid, corr, -jnp.inf)
  best = jnp.max(corr, axis=0, keepdims=True)
  # First index attaining the max, as a float min-reduction across sublanes (exact below 2**24): the
  # float reductions are the ones every Mosaic and Triton version lowers.
  arg = jnp.min(jnp.where(corr == best, col.astype(jnp.float32), 3e38), axis=0, keepdims=True)
  return best, arg.astype(jnp.int32)


def _settle(best, arg):
  """A row with no candidate (max still -inf) gets max 0 and argmax -1."""
  empty = best == -jnp.inf
  return jnp.where(empty, 0.0, best), jnp.where(empty, -1, arg)


def _store(refs, values):
  for ref, v in zip(refs, values):
    ref[...] = v.reshape(ref.shape)


def _self_shift(r, j, *, np_, br, exclude_self):
  """First row's flattened index minus model j's first column's (column indices count from the model's
  first neuron, tile offset included). Flattened indices, no division: floor division lowers through
  sign(), which Mosaic resolves against the attached TPU's generation, so it could not be exported from
  a machine without one."""
  return r * br - j * np_ if exclude_self else None


def _rotated(acc, rowinv, q_ref, rotinv_ref, out_refs, *, n, precision):
  """Baseline of a whole-model block: rotated co-moment Qᵀ·C (Q is Np×Np, zero outside the N×N corner)."""
  rot = lax.dot_general(q_ref[0], acc, (((0,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
  _store(out_refs, _settle(*_reduce(rot, rotinv_ref[0], rowinv, n=n, self_shift=None)))


def _tpu_kernel(*refs, n, np_, br, bn, n_t_blocks, n_c, with_rotation, exclude_self, precision):
  if with_rotation:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, q_ref, rotinv_ref, *outs, acc_ref = refs
  else:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, *outs, acc_ref = refs
    q_ref = rotinv_ref = None
  r, j, c, k = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += lax.dot_general(cols_ref[...], rows_ref[...], _NT, precision=precision,
                                  preferred_element_type=jnp.float32)

  @pl.when(k == n_t_blocks - 1)
  def _():
    acc = acc_ref[...]
    rowinv = rowinv_ref[...]
    best, arg = _reduce(acc, colinv_ref[0], rowinv, n=n, col_offset=c * bn,
                        self_shift=_self_shift(r, j, np_=np_, br=br, exclude_self=exclude_self))
    max_ref, arg_ref = outs[0], outs[1]

    # The output block of (row block, model) stays resident while the column tiles c pass: the running
    # (max, argmax) lives in it. Ties keep the earlier tile, i.e. the first index.
    @pl.when(c == 0)
    def _():
      _store((max_ref, arg_ref), (best, arg))

    @pl.when(c > 0)
    def _():
      old = max_ref[...].reshape(best.shape)
      better = best > old
      _store((max_ref, arg_ref), (jnp.where(better, best, old),
                                  jnp.where(better, arg, arg_ref[...].reshape(arg.shape))))

    @pl.when(c == n_c - 1)
    def _():
      _store((max_ref, arg_ref), _settle(max_ref[...], arg_ref[...]))

    if with_rotation:  # only with one column tile: it holds the whole model
      _rotated(acc, rowinv, q_ref, rotinv_ref, outs[2:], n=n, precision=precision)


def _gpu_kernel(*refs, n, np_, br, bt, bn, n_t_blocks, n_c, with_rotation, exclude_self, precision):
  if with_rotation:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, q_ref, rotinv_ref, *outs = refs
  else:
    rows_ref, cols_ref, rowinv_ref, colinv_ref, *outs = refs
    q_ref = rotinv_ref = None
  r, j = pl.program_id(0), pl.program_id(1)
  rowinv = rowinv_ref[...]

  def tile_of(c):
    return pl.ds(c * bn if isinstance(c, int) else pl.multiple_of(c * bn, bn), bn)

  def accumulate(c):
    cols = tile_of(c)

    def step(k, acc):
      t = pl.ds(pl.multiple_of(k * bt, bt), bt)
      return acc + lax.dot_general(cols_ref[cols, t], rows_ref[:, t], _NT, precision=precision,
                                   preferred_element_type=jnp.float32)

    return lax.fori_loop(0, n_t_blocks, step, jnp.zeros((bn, br), jnp.float32))

  def reduce(c, acc):
    colinv = colinv_ref[0, tile_of(c), :]
    return _reduce(acc, colinv, rowinv, n=n, col_offset=c * bn,
                   self_shift=_self_shift(r, j, np_=np_, br=br, exclude_self=exclude_self))

  if n_c == 1:
    acc = accumulate(0)
    _store(outs[:2], _settle(*reduce(0, acc)))
    if with_rotation:
      _rotated(acc, rowinv, q_ref, rotinv_ref, outs[2:], n=n, precision=precision)
    return

  def tile(c, carry):
    best, arg = reduce(c, accumulate(c))
    better = best > carry[0]
    return jnp.where(better, best, carry[0]), jnp.where(better, arg, carry[1])

  init = (jnp.full((1, br), -jnp.inf, jnp.float32), jnp.full((1, br), -1, jnp.int32))
  _store(outs[:2], _settle(*lax.fori_loop(0, n_c, tile, init)))


def fused_max(xc_SxNpxTp, inv_SxNp, *, n: int, platform: str, block_rows: int, block_t: int,
              block_n: int | None = None, q_SxNpxNp=None, rotinv_SxNp=None, cols_SxNpxTp=None,
              exclude_self: bool = True, interpret: bool = False, precision=lax.Precision.HIGHEST):
  """Max correlation of every (padded) neuron against each model, from centred padded activations.

  Args:
    xc_SxNpxTp: float32 centred activations, neuron-major, zero-padded to ``Np`` neurons and ``Tp``
      inputs (padding must be zero: it then adds nothing to any co-moment).
    inv_SxNp: inverse standard deviation ``1/sqrt(M2)`` per neuron, 0 for dead and padded neurons.
    n: real neurons per model (columns ``>= n`` of each model are padding and never win the max).
    platform: ``'tpu'`` (Mosaic grid kernel) or ``'gpu'`` (Triton kernel).
    block_rows, block_t: ``BR`` and ``BT`` from :func:`block_sizes`.
    block_n: ``BN``, neurons per column tile (default ``Np``: one tile per model); see
      :func:`column_block`.
    q_SxNpxNp, rotinv_SxNp: optional rotation per model (zero outside the ``n×n`` corner) and inverse
      standard deviations of the rotated neurons; when given the baseline is returned too. Needs
      ``block_n == Np``.
    cols_SxNpxTp: the column side's activations when they differ from the rows (e.g. rotated neurons),
      with ``inv_col_SxNp`` taken from ``rotinv_SxNp``; default: the rows themselves.
    exclude_self: leave each neuron out of its own model's maximum (off for rotated columns).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    ``(max_SxNpxS, argmax_SxNpxS)``, followed by the baseline pair when a rotation is given.
  """
  s, np_, tp = xc_SxNpxTp.shape
  br, bt = block_rows, block_t
  bn = block_n or np_
  if (s * np_) % br or tp % bt or np_ % bn:
    raise ValueError(f"padded sizes S·Np={s * np_}, Tp={tp}, Np={np_} must be multiples of BR={br}, "
                     f"BT={bt}, BN={bn}")
  with_rotation = q_SxNpxNp is not None
  if with_rotation and bn != np_:
    raise ValueError(f"the in-kernel rotation needs one column tile per model (BN = Np = {np_}), got "
                     f"BN={bn}; pass rotated activations as cols_SxNpxTp instead")
  m = s * np_
  n_c = np_ // bn
  xc_MxTp = xc_SxNpxTp.reshape(m, tp)
  cols_MxTp = xc_MxTp if cols_SxNpxTp is None else cols_SxNpxTp.reshape(m, tp)
  colinv = inv_SxNp if cols_SxNpxTp is None else rotinv_SxNp
  rowinv_1xM = inv_SxNp.reshape(1, m)
  colinv_SxNpx1 = colinv.reshape(s, np_, 1)
  n_t_blocks = tp // bt
  out_shape = [jax.ShapeDtypeStruct((s, 1, m), jnp.float32), jax.ShapeDtypeStruct((s, 1, m), jnp.int32)]
  args = [xc_MxTp, cols_MxTp, rowinv_1xM, colinv_SxNpx1]
  if with_rotation:
    out_shape = out_shape * 2
    args += [q_SxNpxNp, rotinv_SxNp.reshape(s, np_, 1)]
  static = dict(n=n, np_=np_, br=br, bn=bn, n_t_blocks=n_t_blocks, n_c=n_c, with_rotation=with_rotation,
                exclude_self=exclude_self, precision=precision)

  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    grid = (m // br, s, n_c, n_t_blocks)
    in_specs = [pl.BlockSpec((br, bt), lambda r, j, c, k: (r, k)),
                pl.BlockSpec((bn, bt), lambda r, j, c, k: (j * n_c + c, k)),
                pl.BlockSpec((1, br), lambda r, j, c, k: (0, r)),
                pl.BlockSpec((1, bn, 1), lambda r, j, c, k: (j, c, 0))]
    if with_rotation:
      in_specs += [pl.BlockSpec((1, np_, np_), lambda r, j, c, k: (j, 0, 0)),
                   pl.BlockSpec((1, np_, 1), lambda r, j, c, k: (j, 0, 0))]
    out_spec = pl.BlockSpec((1, 1, br), lambda r, j, c, k: (j, 0, r))
    kernel = functools.partial(_tpu_kernel, **static)
    extra = dict(scratch_shapes=[pltpu.VMEM((bn, br), jnp.float32)],
                 compiler_params=pltpu.CompilerParams(
                     dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")))
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
    kernel = functools.partial(_gpu_kernel, bt=bt, **static)
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


__all__ = ["GPU_REGISTER_FLOATS", "PLATFORMS", "TPU_VMEM_BUDGET", "block_sizes", "column_block",
           "fused_max", "gpu_floats", "vmem_bytes"]
