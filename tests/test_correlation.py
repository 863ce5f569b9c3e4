"""universality.kernels.correlation: max/argmax correlation against float64 numpy, streaming, baseline, Pallas, export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from universality.kernels import correlation as kc
from universality.kernels import pallas_correlation as pc


def _planted(seed, s, t, n, *, mean=0.0, noise=0.5):
  """Each model holds a shuffled, rescaled copy of shared latent features plus its own noise."""
  rng = np.random.default_rng(seed)
  latent_TxN = rng.standard_normal((t, n))
  acts = np.empty((s, t, n))
  for i in range(s):
    perm = rng.permutation(n)
    scale = rng.uniform(0.5, 2.0, n)
    acts[i] = latent_TxN[:, perm] * scale + noise * rng.uniform(0.3, 2.0, n) * rng.standard_normal((t, n))
  return (acts + mean + rng.standard_normal((s, 1, n))).astype(np.float32)


def _reference(acts_SxTxN, q_SxNxN=None):
  """float64 max/argmax by the definition: correlate every pair, exclude self (unless rotated)."""
  x = np.asarray(acts_SxTxN, np.float64)
  s, t, n = x.shape
  cols = x if q_SxNxN is None else np.einsum("stk,skn->stn", x, np.asarray(q_SxNxN, np.float64))

  def z(a):
    flat = a.transpose(1, 0, 2).reshape(t, s * n)
    flat = flat - flat.mean(0)
    sd = np.sqrt((flat * flat).sum(0))
    return np.where(sd > 0, flat / np.where(sd > 0, sd, 1.0), 0.0), sd == 0

  zr, dead = z(x)
  zc, _ = z(cols)
  corr = (zr.T @ zc).reshape(s, n, s, n)
  if q_SxNxN is None:
    for i in range(s):
      corr[i, np.arange(n), i, np.arange(n)] = -np.inf
  srt = np.sort(corr, axis=-1)
  margin = srt[..., -1] - (srt[..., -2] if n > 1 else -np.inf)
  return corr.max(-1), corr.argmax(-1), dead.reshape(s, n), margin


def _assert_matches(max_, argmax_, ref_max, ref_arg, margin, dead, atol=2e-5):
  max_, argmax_ = np.asarray(max_), np.asarray(argmax_)
  assert np.isfinite(max_).all()
  np.testing.assert_allclose(max_, ref_max, atol=atol, rtol=0)
  clear = (margin > 1e-3) & ~dead[:, :, None]
  assert clear.mean() > 0.5  # the comparison below is not vacuous
  np.testing.assert_array_equal(argmax_[clear], ref_arg[clear])


@pytest.mark.parametrize("block_rows", [None, 5, 14])  # one block; 1 model per block; 2 (+1 padded)
def test_xla_matches_float64_reference(block_rows):
  acts = _planted(1, 3, 53, 7)
  ref_max, ref_arg, dead, margin = _reference(acts)
  res = kc.max_correlation(acts, backend="xla", block_rows=block_rows)
  assert res.max_SxNxS.shape == (3, 7, 3) and res.argmax_SxNxS.dtype == jnp.int32
  _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead)
  assert ref_max[0, :, 1].mean() > 0.5  # planted features give meaningful maxima
  assert not np.asarray(res.dead_SxN).any()


# TPU: one 256-row block spans both models (Np = 128); GPU: 32-row blocks span both (Np = 16).
@pytest.mark.parametrize("platform,block_t,block_rows", [("tpu", 128, None), ("gpu", 32, 32)])
def test_pallas_interpret_matches_reference_and_xla(platform, block_t, block_rows):
  # T and N are multiples of no block: padding of inputs and neurons must be masked.
  acts = _planted(2, 2, 300 if platform == "tpu" else 45, 5)
  acts[1, :, 3] = 2.5  # a dead neuron inside the kernel's blocks
  key = jax.random.key(7)
  q = kc.rotations(key, 2, 5)
  ref_max, ref_arg, dead, margin = _reference(acts)
  b_max, b_arg, _, b_margin = _reference(acts, q)
  res = kc.max_correlation(acts, backend="pallas", platform=platform, interpret=True, block_t=block_t,
                           block_rows=block_rows, baseline="rotation", key=key)
  _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead)
  _assert_matches(res.baseline_max_SxNxS, res.baseline_argmax_SxNxS, b_max, b_arg, b_margin, dead)
  xla = kc.max_correlation(acts, backend="xla", baseline="rotation", key=key)
  for a, b in zip(res, xla):
    if a is not None or b is not None:  # the screen's fields are None on the exact pass
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)


def _batches(acts, sizes):
  edges = np.cumsum([0, *sizes])
  assert edges[-1] == acts.shape[1]
  return [acts[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def test_streaming_uneven_batches_equals_one_shot():
  acts = _planted(3, 3, 64, 6)
  sizes = [1, 17, 5, 30, 11]
  state = kc.init(3, 6)
  for batch in _batches(acts, sizes):
    state = kc.update(state, batch)
  streamed = kc.finalize(state)
  one_shot = kc.max_correlation(acts, backend="xla")
  np.testing.assert_allclose(np.asarray(streamed.max_SxNxS), np.asarray(one_shot.max_SxNxS), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(streamed.argmax_SxNxS), np.asarray(one_shot.argmax_SxNxS))
  # The merged moments are the float64 ones.
  x = acts.astype(np.float64)
  np.testing.assert_allclose(np.asarray(state.mean_SxN), x.mean(1), atol=1e-5)
  np.testing.assert_allclose(np.asarray(state.m2_SxN), ((x - x.mean(1, keepdims=True)) ** 2).sum(1),
                             rtol=1e-5)
  assert int(state.count) == 64


def test_large_mean_is_stable_in_float32():
  # Mean 1e4, std 1: raw Σx² / Σxy in float32 would lose every digit of the variance.
  acts = _planted(4, 2, 900, 5, mean=1e4, noise=0.5)
  assert abs(acts.mean() - 1e4) < 10 and 0.3 < acts.std(axis=1).mean() < 3
  ref_max, ref_arg, dead, margin = _reference(acts)
  source = lambda: iter(_batches(acts, [7, 300, 1, 250, 342]))  # noqa: E731
  # In memory; streamed in one pass; streamed one model's rows per pass (every tile reused across passes).
  for res in (kc.max_correlation(source), kc.max_correlation(source, block_rows=5),
              kc.max_correlation(acts, backend="xla")):
    _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead, atol=1e-4)
  corr = np.asarray(kc.correlation_matrix(acts))
  ref = np.corrcoef(acts.astype(np.float64).transpose(0, 2, 1).reshape(10, 900))
  np.testing.assert_allclose(corr, ref, atol=1e-4)


def test_dead_neurons_correlate_zero_and_are_masked():
  acts = _planted(5, 3, 40, 4)
  acts[0, :, 1] = 0.0
  acts[2, :, 3] = 1234.5
  res = kc.max_correlation(acts, backend="xla")
  dead = np.zeros((3, 4), bool)
  dead[0, 1] = dead[2, 3] = True
  np.testing.assert_array_equal(np.asarray(res.dead_SxN), dead)
  assert np.isfinite(np.asarray(res.max_SxNxS)).all()
  np.testing.assert_array_equal(np.asarray(res.max_SxNxS)[dead], 0.0)
  np.testing.assert_array_equal(np.asarray(res.argmax_SxNxS)[dead], -1)
  corr = np.asarray(kc.correlation_matrix(acts)).reshape(3, 4, 3, 4)
  assert np.isfinite(corr).all()
  np.testing.assert_array_equal(corr[0, 1], 0.0)
  np.testing.assert_array_equal(corr[:, :, 2, 3], 0.0)
  # Live neurons are still right, and a dead column only wins when every live one is negative.
  ref_max, ref_arg, ref_dead, margin = _reference(acts)
  np.testing.assert_array_equal(ref_dead, dead)
  _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead)


def test_self_is_excluded():
  acts = _planted(6, 2, 50, 4)
  acts[0, :, 2] = 3.0 * acts[0, :, 0] + 1.0  # a perfect copy inside model 0
  res = kc.max_correlation(acts, backend="xla")
  np.testing.assert_allclose(np.asarray(res.max_SxNxS)[0, [0, 2], 0], 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(res.argmax_SxNxS)[0, [0, 2], 0], [2, 0])
  ref_max, _, _, _ = _reference(acts)
  assert (np.asarray(res.max_SxNxS)[1, :, 1] < 0.9).all()  # would be 1 if the neuron met itself
  np.testing.assert_allclose(np.asarray(res.max_SxNxS), ref_max, atol=2e-5)
  # One neuron per model: nothing left to compare with inside its own model.
  one = kc.max_correlation(_planted(7, 3, 30, 1), backend="xla")
  np.testing.assert_array_equal(np.diagonal(np.asarray(one.argmax_SxNxS)[:, 0, :]), -1)
  np.testing.assert_array_equal(np.diagonal(np.asarray(one.max_SxNxS)[:, 0, :]), 0.0)


def test_rotations_are_haar_orthogonal_and_seeded():
  q = np.asarray(kc.rotations(jax.random.key(0), 3, 6), np.float64)
  np.testing.assert_allclose(np.einsum("skn,skm->snm", q, q), np.broadcast_to(np.eye(6), (3, 6, 6)),
                             atol=1e-5)
  assert not np.allclose(q[0], q[1])
  np.testing.assert_array_equal(q, np.asarray(kc.rotations(jax.random.key(0), 3, 6)))
  assert not np.allclose(q, np.asarray(kc.rotations(jax.random.key(1), 3, 6)))


@pytest.mark.parametrize("mode", ["xla", "xla_blocks", "stream", "stream_blocks"])
def test_rotation_baseline_equals_rotating_the_data(mode):
  acts = _planted(8, 3, 70, 6)
  acts[1, :, 4] = -2.0  # dead neurons are left out of every mixture
  key = jax.random.key(3)
  q = kc.rotations(key, 3, 6)
  b_max, b_arg, dead, margin = _reference(acts, np.where(dead_mask(acts)[:, :, None], 0.0, q))
  if mode.startswith("xla"):
    res = kc.max_correlation(acts, backend="xla", baseline="rotation", key=key,
                             block_rows=12 if mode == "xla_blocks" else None)
  else:
    source = lambda: iter(_batches(acts, [9, 40, 21]))  # noqa: E731
    res = kc.max_correlation(source, baseline="rotation", key=key,
                             block_rows=7 if mode == "stream_blocks" else None)
  _assert_matches(res.baseline_max_SxNxS, res.baseline_argmax_SxNxS, b_max, b_arg, margin, dead)
  # Planted features survive in the max but not in the rotated baseline.
  assert np.asarray(res.max_SxNxS)[0, :, 2].mean() > np.asarray(res.baseline_max_SxNxS)[0, :, 2].mean()


def dead_mask(acts):
  return np.asarray(acts).std(axis=1) == 0


def test_row_block_passes_equal_single_pass():
  acts = _planted(9, 4, 48, 5)
  passes = []

  def source():
    passes.append(1)
    return iter(_batches(acts, [20, 20, 8]))

  key = jax.random.key(11)
  single = kc.max_correlation(source, baseline="rotation", key=key)
  assert len(passes) == 2  # one to read the batch shape, one pass in total
  passes.clear()
  # A budget of four 5×5 tiles (the 20×20 co-moment's upper triangle needs ten) forces row blocks:
  # rows of model 0 against all 4 models, then model 1 against 3, then models 2 and 3 (2 + 1 tiles).
  blocked = kc.max_correlation(source, baseline="rotation", key=key, memory_bytes=400)
  assert len(passes) == 1 + 3
  for a, b in zip(single[:5], blocked[:5]):  # the screen's fields are None on the exact pass
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_stream_compiles_once_for_every_batch_size_and_pass():
  # Distinctive shapes, so the count below is this call's alone; batches shorter than the first are
  # padded and longer ones split, and the row range of a pass is data: one compilation in all.
  acts = _planted(14, 5, 90, 7)
  before = kc._tiles_update._cache_size()  # pylint: disable=protected-access
  res = kc.max_correlation(lambda: iter(_batches(acts, [13, 2, 40, 9, 26])), block_rows=7)
  assert kc._tiles_update._cache_size() == before + 1  # pylint: disable=protected-access
  ref_max, ref_arg, dead, margin = _reference(acts)
  _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead)


@pytest.mark.parametrize("within", [True, False])
@pytest.mark.parametrize("s,n,budget,block_rows", [(7, 3, 10 ** 4, None), (7, 3, 2000, None),
                                                   (40, 16, 1 << 20, None), (9, 5, 10 ** 5, 12),
                                                   (5, 600, 4 * 600 ** 2 * 6, None)])
def test_tile_plan_covers_the_upper_triangle_once_within_budget(s, n, budget, block_rows, within):
  plan = kc._plan_tiles(s, n, budget, block_rows, within)  # pylint: disable=protected-access
  assert plan.sp >= s and plan.sp - s < plan.g and plan.w == plan.g * n
  assert 4 * plan.n_tiles * plan.w ** 2 <= budget
  # Diagonal tiles are skipped exactly when they hold nothing but the unwanted self blocks.
  assert plan.skip == int(not within and plan.g == 1)
  seen = []
  for c0, c1 in plan.passes:
    tiles = [(i, j) for i in range(c0, c1) for j in range(i + plan.skip, plan.nc)]
    assert len(tiles) <= plan.n_tiles
    # Pool slots of a pass are distinct and in range (the index arithmetic of the kernels).
    slots = [int(kc._tile_base(i, c0, plan.nc, plan.skip)) + j - i - plan.skip  # pylint: disable=protected-access
             for i, j in tiles]
    assert sorted(slots) == list(range(len(tiles)))
    seen += tiles
  assert sorted(seen) == [(i, j) for i in range(plan.nc) for j in range(i + plan.skip, plan.nc)]
  if block_rows is not None:
    assert all(c1 - c0 <= max(1, block_rows // plan.w) for c0, c1 in plan.passes)
  with pytest.raises(ValueError, match="memory_bytes"):
    kc._plan_tiles(s, n, 4 * n * n * s - 1, None)  # pylint: disable=protected-access


def test_excess_is_max_minus_baseline_over_other_models():
  acts = _planted(10, 3, 60, 5)
  key = jax.random.key(5)
  ex = kc.excess_correlation(acts, key=key, backend="xla")
  res = kc.max_correlation(acts, backend="xla", baseline="rotation", key=key)
  np.testing.assert_allclose(np.asarray(ex.excess_SxNxS),
                             np.asarray(res.max_SxNxS - res.baseline_max_SxNxS), atol=1e-7)
  e = np.asarray(ex.excess_SxNxS)
  expected = np.stack([(e[i].sum(-1) - e[i, :, i]) / 2 for i in range(3)])
  np.testing.assert_allclose(np.asarray(ex.mean_excess_SxN), expected, atol=1e-6)
  assert (np.asarray(ex.mean_excess_SxN) > 0).mean() > 0.8  # planted features are universal


def test_correlation_matrix_and_pair_comoments():
  acts = _planted(12, 2, 33, 4)
  corr = np.asarray(kc.correlation_matrix(acts))
  flat = acts.astype(np.float64).transpose(1, 0, 2).reshape(33, 8)
  np.testing.assert_allclose(corr, np.corrcoef(flat.T), atol=2e-6)
  state = kc.comoments(acts)
  xc = flat - flat.mean(0)
  np.testing.assert_allclose(np.asarray(state.comoment_RxSxN).reshape(2, 4, 2, 4)[0, :, 1, :],
                             (xc.T @ xc)[:4, 4:], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(kc.correlation_from_comoments(state)), corr, atol=1e-7)


def test_bad_input_raises_value_error():
  acts = _planted(13, 2, 20, 3)
  with pytest.raises(ValueError, match="rank 3"):
    kc.max_correlation(acts[0])
  with pytest.raises(ValueError, match="floating"):
    kc.max_correlation(acts.astype(np.int32))
  with pytest.raises(ValueError, match="T >= 2"):
    kc.max_correlation(acts[:, :1])
  bad = acts.copy()
  bad[1, 3, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    kc.max_correlation(bad)
  with pytest.raises(ValueError, match="NaN"):
    kc.max_correlation(lambda: iter([acts, bad]))
  with pytest.raises(ValueError, match="PRNG key"):
    kc.max_correlation(acts, baseline="rotation")
  with pytest.raises(ValueError, match="baseline"):
    kc.max_correlation(acts, baseline="shuffle", key=jax.random.key(0))
  with pytest.raises(ValueError, match="backend"):
    kc.max_correlation(acts, backend="cuda")
  with pytest.raises(ValueError, match="callable"):
    kc.max_correlation(iter([acts]))
  with pytest.raises(ValueError, match="state holds"):
    kc.update(kc.init(2, 4), acts)
  with pytest.raises(ValueError, match="rows"):
    kc.finalize(kc.update(kc.init(2, 3, rows=(0, 2)), acts))
  runs = iter(range(10))
  with pytest.raises(ValueError, match="re-iterable"):
    kc.max_correlation(lambda: iter([acts] * (1 + next(runs) % 2)), block_rows=2)


def _export_fn(platform, s, n, t, rotation):
  """What ``max_correlation(backend='pallas')`` runs for these sizes, with the blocks 'auto' picks."""
  key = jax.random.key(0)

  def f(acts):
    q = kc.rotations(key, s, n) if rotation else None
    pallas_max = kc._pallas_max  # pylint: disable=protected-access
    return pallas_max(acts, q, platform=platform, interpret=False, block_rows=None, block_t=None,
                      block_n=None, dead_rtol=kc.DEFAULT_DEAD_RTOL)

  return f, jax.ShapeDtypeStruct((s, t, n), jnp.float32)


# N = 100: one column tile per model, rotation inside the kernel. N = 3072: a model's Np×BR co-moment
# fits neither VMEM nor registers, so 'auto' tiles the columns and takes the baseline in a second call.
@pytest.mark.parametrize("n,rotation", [(100, False), (100, True), (3072, False), (3072, True)])
def test_pallas_lowers_for_tpu(n, rotation):
  f, spec = _export_fn("tpu", 3, n, 1000, rotation)
  text = export.export(jax.jit(f), platforms=["tpu"])(spec).mlir_module()
  assert text.count("tpu_custom_call") >= (2 if rotation and n > 1000 else 1)


@pytest.mark.parametrize("n,rotation", [(100, False), (100, True), (3072, False), (3072, True)])
def test_pallas_lowers_for_cuda(n, rotation):
  f, spec = _export_fn("gpu", 3, n, 1000, rotation)
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  text = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=checks)(spec).mlir_module()
  assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_auto_blocks_fit_for_large_models(platform):
  for n in (5, 128, 512, 1000, 3072, 8192):
    for rotation in (False, True):
      np_, br, bt = pc.block_sizes(platform, 4, n, 2048)
      bn, in_kernel = pc.column_block(platform, np_, br, bt, rotation)
      assert np_ % bn == 0 and bn <= np_ and not (in_kernel and bn != np_)
      if platform == "tpu":
        assert pc.vmem_bytes(np_, br, bt, bn, in_kernel) <= pc.TPU_VMEM_BUDGET
      else:
        assert bn & (bn - 1) == 0 and pc.gpu_floats(np_, br, bt, bn, in_kernel) <= pc.GPU_REGISTER_FLOATS
      if n <= 100:
        assert bn == np_ and in_kernel == rotation  # small models keep the one-tile kernel
  np_, br, bt = pc.block_sizes(platform, 4, 3072, 2048)
  assert pc.column_block(platform, np_, br, bt, False)[0] < np_  # 3072 neurons are tiled
  with pytest.raises(ValueError, match="block_n"):
    pc.column_block(platform, np_, br, bt, False, block_n=24)


# Column tiles inside the kernel: TPU N=200 -> Np=256 in two tiles of 128; GPU N=40 -> Np=64 in four
# tiles of 16. The rotation baseline then comes from a second call on rotated activations.
@pytest.mark.parametrize("platform,n,block_t,block_rows,block_n", [("tpu", 200, 128, None, 128),
                                                                   ("gpu", 40, 16, 32, 16)])
def test_pallas_column_tiles_match_reference(platform, n, block_t, block_rows, block_n):
  acts = _planted(15, 2, 150 if platform == "tpu" else 40, n)
  acts[0, :, 7] = -1.5  # a dead neuron in the first tile
  key = jax.random.key(9)
  q = kc.rotations(key, 2, n)
  ref_max, ref_arg, dead, margin = _reference(acts)
  b_max, b_arg, _, b_margin = _reference(acts, np.where(dead[:, :, None], 0.0, q))
  res = kc.max_correlation(acts, backend="pallas", platform=platform, interpret=True, block_t=block_t,
                           block_rows=block_rows, block_n=block_n, baseline="rotation", key=key)
  _assert_matches(res.max_SxNxS, res.argmax_SxNxS, ref_max, ref_arg, margin, dead)
  _assert_matches(res.baseline_max_SxNxS, res.baseline_argmax_SxNxS, b_max, b_arg, b_margin, dead)
  np.testing.assert_array_equal(np.asarray(res.argmax_SxNxS)[0, 7], -1)


def test_block_sizes_follow_platform_rules():
  np_, br, bt = pc.block_sizes("tpu", 3, 200, 1000)
  assert np_ == 256 and br % 128 == 0 and bt % 128 == 0 and (3 * np_) % br == 0
  np_, br, bt = pc.block_sizes("gpu", 3, 200, 1000)
  assert np_ == 256 and br & (br - 1) == 0 and bt & (bt - 1) == 0
  with pytest.raises(ValueError, match="TPU blocks"):
    pc.block_sizes("tpu", 3, 200, 1000, block_rows=100)
  with pytest.raises(ValueError, match="platform"):
    pc.block_sizes("npu", 3, 200, 1000)


def test_auto_backend_is_xla_on_cpu():
  assert kc.resolve_backend("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")


@pytest.mark.parametrize("s,n,memory_bytes", [(3, 520, kc.DEFAULT_MEMORY_BYTES), (3, 520, 4 * 520 ** 2 * 3),
                                              (4, 40, kc.DEFAULT_MEMORY_BYTES)])
def test_cross_model_blocks_only_equal_the_full_computation(s, n, memory_bytes):
  """within=False skips each model's own tiles (one model per tile at n >= 512) or masks them (several),
  in one pass or several; the blocks between models equal the full run's and the float64 reference."""
  acts = _planted(11, s, 200, n)
  key = jax.random.key(2)
  full = kc.max_correlation(acts, backend="xla", baseline="rotation", key=key, memory_bytes=memory_bytes)
  cross = kc.max_correlation(acts, backend="xla", baseline="rotation", key=key, memory_bytes=memory_bytes,
                             within=False)
  other_SxNxS = np.broadcast_to(~np.eye(s, dtype=bool)[:, None, :], (s, n, s))
  for a, b in ((full.max_SxNxS, cross.max_SxNxS), (full.baseline_max_SxNxS, cross.baseline_max_SxNxS)):
    np.testing.assert_allclose(np.asarray(b)[other_SxNxS], np.asarray(a)[other_SxNxS], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cross.argmax_SxNxS)[other_SxNxS],
                                np.asarray(full.argmax_SxNxS)[other_SxNxS])
  assert (np.asarray(cross.max_SxNxS)[~other_SxNxS] == 0).all()
  assert (np.asarray(cross.argmax_SxNxS)[~other_SxNxS] == -1).all()
  ref_max, _, dead, _ = _reference(acts)
  live = ~np.asarray(dead)[:, :, None] & other_SxNxS
  np.testing.assert_allclose(np.asarray(cross.max_SxNxS)[live], np.asarray(ref_max)[live], atol=1e-4)


# The public entry point inside jax.jit: Pallas (interpreted here) and the XLA path's one-shot traced form.
@pytest.mark.parametrize("kwargs", [
    dict(backend="pallas", platform="tpu", interpret=True, block_t=128),
    dict(backend="pallas", platform="gpu", interpret=True, block_t=32, block_rows=32),
    dict(backend="xla"),
    dict(backend="xla", within=False),
])
def test_jit_of_max_correlation_equals_eager(kwargs):
  acts = _planted(21, 2, 150, 5)
  acts[0, :, 2] = 1.5  # a dead neuron
  key = jax.random.key(3)
  eager = kc.max_correlation(acts, baseline="rotation", key=key, **kwargs)
  jitted = jax.jit(lambda x, k: kc.max_correlation(x, baseline="rotation", key=k, **kwargs))(acts, key)
  for a, b in zip(eager, jitted):
    if a is None and b is None:  # the screen's fields
      continue
    if a.dtype == jnp.float32:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jit_of_max_correlation_marks_non_finite_and_refuses_too_large_xla():
  acts = _planted(22, 2, 40, 3)
  acts[1, 5, 0] = np.inf
  res = jax.jit(lambda x: kc.max_correlation(x, backend="xla"))(acts)
  assert np.isnan(np.asarray(res.max_SxNxS)).all() and (np.asarray(res.argmax_SxNxS) == -1).all()
  with pytest.raises(kc.CorrelationError, match=r"^under jax.jit the XLA path .* use backend='pallas'"):
    jax.jit(lambda x: kc.max_correlation(x, backend="xla", memory_bytes=100))(acts)


def _public_fn(platform):
  return lambda acts: kc.max_correlation(acts, backend="pallas", platform=platform, interpret=False,
                                         baseline="rotation", key=jax.random.key(0))


def test_public_entry_point_exports_for_tpu_and_cuda():
  spec = jax.ShapeDtypeStruct((3, 1000, 100), jnp.float32)
  text = export.export(jax.jit(_public_fn("tpu")), platforms=["tpu"])(spec).mlir_module()
  assert "tpu_custom_call" in text
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  text = export.export(jax.jit(_public_fn("gpu")), platforms=["cuda"], disabled_checks=checks)(spec).mlir_module()
  assert "__gpu$xla.gpu.triton" in text
