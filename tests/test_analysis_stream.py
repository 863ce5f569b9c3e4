"""The streamed analysis (blocks of pairs, blocks of runs) against the in-memory passes on all |G|³ logits
and float64 numpy, with blocks forced small so that several happen and the last one is padded."""

import jax
import numpy as np
import pytest

from universality.engine import analysis
from universality.engine.families.group import passes
from universality.engine import groups
from universality.engine import irreps as irreps_lib
from universality.engine.families.group.passes import connectivity
from universality.engine.analysis import cross_seed
from universality.engine.families.group.passes import margins
from universality.engine.families.group.passes import pipeline
from universality.engine.families.group.passes import redundancy
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group import analysis as group_analysis
from universality.engine.families.group import models
from universality.kernels import correlation as correlation_lib
from tests.helpers import group_config

CHUNK = 7  # pairs per block: divides none of the |G|² below, so the last block is always padded


def _random_mlps(g, s, width=8, seed=0):
  cfg = group_config(model="mlp", embed_dim=width, hidden=width).model
  keys = jax.random.split(jax.random.key(seed), s)
  params = jax.vmap(lambda k: models.init(k, cfg, g.order + 2))(keys)   # 2 padded classes
  # Scaled up so that logits and margins are far from their values at initialisation.
  params = jax.tree.map(lambda x: 3.0 * x, params)
  apply_fn = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg)))
  return cfg, params, apply_fn


@pytest.fixture(scope="module", params=("S4", "D5", "C7"))
def streamed(request):
  g = groups.get(request.param)
  irreps = irreps_lib.real_irreps(g)
  tables = rep.irrep_tables(g, irreps)
  _, params, apply_fn = _random_mlps(g, 3, seed=len(request.param) + g.order)
  sums, state = pipeline.stream_all_pairs(apply_fn, params, 3, tables, chunk=CHUNK)
  logits, hidden = passes.evaluate_all_pairs(apply_fn, params, 3, g.order)
  return g, irreps, tables, sums, state, logits, hidden


def test_logit_sums_match_all_logits(streamed):
  g, irreps, _, sums, _, logits, _ = streamed
  n = g.order
  want = passes.logit_similarity(logits, g, irreps)
  np.testing.assert_allclose(sums["cos_SxR"] / n ** 2, want, atol=2e-5)
  # Loss, accuracy and margin against float64 numpy on the whole logit tensor.
  x = logits.astype(np.float64)
  logp = x - x.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.broadcast_to(g.table[None, :, :, None], logp.shape[:3] + (1,)), -1)
  np.testing.assert_allclose(sums["nll_S"] / n ** 2, -picked.mean(axis=(1, 2, 3)), rtol=1e-4)
  np.testing.assert_allclose(sums["hit_S"] / n ** 2, (x.argmax(-1) == g.table[None]).mean(axis=(1, 2)))
  correct = np.take_along_axis(x, np.broadcast_to(g.table[None, :, :, None], x.shape[:3] + (1,)), -1)[..., 0]
  wrong = np.where(np.arange(n) == g.table[None, :, :, None], -np.inf, x).max(-1)
  np.testing.assert_allclose(sums["margin_S"], (correct - wrong).min(axis=(1, 2)), rtol=1e-4, atol=1e-5)
  assert np.ptp(sums["hit_S"]) >= 0 and np.all(np.abs(sums["margin_S"]) > 1e-3)


def test_hidden_sums_match_all_activations(streamed):
  g, irreps, tables, sums, state, _, hidden = streamed
  n = g.order
  h = hidden.astype(np.float64)
  flat = h.reshape(h.shape[0], n * n, -1)
  fibre = np.stack([flat[:, g.table.reshape(-1) == m].sum(1) for m in range(n)], axis=1)
  np.testing.assert_allclose(sums["fibre_SxGxN"], fibre, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums["by_a_SxGxN"], h.sum(2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums["by_b_SxGxN"], h.sum(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums["sq_S"], (h ** 2).sum(axis=(1, 2, 3)), rtol=1e-5)
  fve = rep.fibre_fve(sums["fibre_SxGxN"] / n, sums["sq_S"], np.asarray(tables.basis_GxF, np.float32),
                      np.asarray(tables.basis_member_FxR, np.float32))
  np.testing.assert_allclose(fve, passes.hidden_fve(hidden, g, irreps), atol=1e-5)
  acts = h.reshape(h.shape[0], n * n, -1)
  assert int(state.count) == n * n
  np.testing.assert_allclose(state.mean_SxN, acts.mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.m2_SxN, acts.var(1) * n * n, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(cross_seed.live_from_comoments(state), analysis.live_neurons(acts))
  want = passes.neuron_irreps_from_hidden(hidden, g, irreps)
  got = pipeline.neuron_irreps_from_fibres(sums["fibre_SxGxN"] / n, state.mean_SxN, state.m2_SxN, g, irreps)
  live = np.asarray(analysis.live_neurons(acts))
  np.testing.assert_allclose(got["share_SxNxR"][live], want["share_SxNxR"][live], atol=1e-4)
  np.testing.assert_array_equal(got["dominant_SxN"][live], want["dominant_SxN"][live])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_cross_seed_from_comoments_match_all_activations(streamed):
  g, _, _, _, state, _, hidden = streamed
  acts = hidden.reshape(3, g.order ** 2, -1)
  key = jax.random.key(3)
  want = analysis.neuron_correlations(acts, key=key)
  got = cross_seed.neuron_correlations_from_comoments(state, key=key)
  for name in ("max_SxNxS", "baseline_max_SxNxS", "excess_SxN"):
    np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)
  np.testing.assert_array_equal(got["dead_SxN"], want["dead_SxN"])
  m_want, m_got = analysis.match_neurons(acts), cross_seed.match_neurons_from_comoments(state)
  np.testing.assert_allclose(m_got["mean_matched_SxS"], m_want["mean_matched_SxS"], atol=1e-4)
  subset = cross_seed.knn_subset(acts.shape[1], 30, jax.random.key(4))
  sim_want = analysis.representation_similarity(acts, k=4, knn_inputs=30, key=jax.random.key(4))
  sim_got = cross_seed.similarity_from_comoments(state, acts[:, subset], k=4)
  for name in ("cka", "mutual_knn"):
    np.testing.assert_allclose(sim_got[name], sim_want[name], atol=2e-4, err_msg=name)
  # The distance is √(2 − 2x): near x = 1 (the diagonal) it turns float32 rounding of x into ~1e-3.
  np.testing.assert_allclose(np.square(sim_got["procrustes"]), np.square(sim_want["procrustes"]), atol=2e-5)


def test_blocks_compile_once():
  g = groups.get("D5")
  tables = rep.irrep_tables(g, irreps_lib.real_irreps(g))
  _, params, apply_fn = _random_mlps(g, 2, seed=5)
  pipeline.stream_all_pairs(apply_fn, params, 2, tables, chunk=CHUNK)
  traces = lambda: (pipeline._accumulate._cache_size(),  # noqa: E731  pylint: disable=protected-access
                     correlation_lib._update_jit._cache_size())  # pylint: disable=protected-access
  before = traces()
  pipeline.stream_all_pairs(apply_fn, jax.tree.map(lambda x: -x, params), 2, tables, chunk=CHUNK)
  after = traces()
  assert after == before  # 15 blocks, the last one padded: no new trace


def _mlp_loss_reference(u_SxGxN, v_SxGxN, w_SxCxN, table):
  """float64 (loss_S, accuracy_S) of ReLU(u[a] + v[b])·Wᵀ over all pairs."""
  u, v, w = (np.asarray(x, np.float64) for x in (u_SxGxN, v_SxGxN, w_SxCxN))
  hidden = np.maximum(u[:, :, None, :] + v[:, None, :, :], 0.0)
  logits = np.einsum("sabn,scn->sabc", hidden, w)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  target = np.broadcast_to(table[None, :, :, None], logp.shape[:3] + (1,))
  loss = -np.take_along_axis(logp, target, -1).mean(axis=(1, 2, 3))
  return loss, (logits.argmax(-1) == table).mean(axis=(1, 2))


@pytest.mark.parametrize("memory_bytes", [7_000, 1 << 30])
def test_weight_losses_in_blocks_match_float64(memory_bytes):
  g = groups.get("D5")
  irreps = irreps_lib.real_irreps(g)
  cfg, params, _ = _random_mlps(g, 3, seed=7)
  mats = {k: np.asarray(v)[:, :g.order] for k, v in group_analysis.matrices_fn_for(cfg)(params).items()}
  u, v, w = mats["pre_a"], mats["pre_b"], mats["unembed"]
  rows, runs = rep.loss_chunks(g.order, u.shape[2], g.order, 3, memory_bytes)
  # 3 rows of a per block (the last one padded), one run at a time; or everything in one block.
  assert (rows, runs) == ((3, 1) if memory_bytes == 7_000 else (g.order, 3))
  loss, acc = jax.jit(lambda *a: rep.mlp_loss(*a, rows=rows, runs=runs))(u, v, w, g.table)
  want_loss, want_acc = _mlp_loss_reference(u, v, w, g.table)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, want_acc)
  keep = np.zeros((3, len(irreps)), bool)
  keep[:, 1] = True
  abl = passes.ablation_losses(u, v, w, keep, g, irreps, memory_bytes=memory_bytes)
  np.testing.assert_allclose(abl["full_S"], want_loss, rtol=1e-5)
  # Redundancy and mode connectivity give the same numbers whatever the blocks.
  merged = redundancy.merge_features(u, v, w, g.table, tolerance=0.05, memory_bytes=memory_bytes)
  ref = redundancy.merge_features(u, v, w, g.table, tolerance=0.05)
  np.testing.assert_array_equal(merged["width_S"], ref["width_S"])
  np.testing.assert_allclose(merged["merged_loss_S"], ref["merged_loss_S"], rtol=1e-5)
  np.testing.assert_allclose(merged["loss_S"], want_loss, rtol=1e-5)
  pairs = connectivity.pairs_of(3)
  perm = np.tile(np.arange(u.shape[2]), (len(pairs), 1))
  path = connectivity.path_losses(u, v, w, g.table, pairs, perm, points=3, batch=2,
                                  memory_bytes=memory_bytes)
  mid = [0.5 * (x[pairs[:, 0]] + x[pairs[:, 1]]) for x in (u, v, w)]
  mid_loss, _ = _mlp_loss_reference(*mid, g.table)
  np.testing.assert_allclose(np.asarray(path["loss_ZxO"])[:, 1], mid_loss, rtol=1e-5)
  norm = margins.normalise(np.ones(3, np.float32), u, v, w)["norm_S"]
  np.testing.assert_allclose(norm, sum((x.astype(np.float64) ** 2).sum((1, 2)) for x in (u, v, w)), rtol=1e-5)


def _assert_close_json(a, b, path=""):
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      _assert_close_json(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close_json(x, y, f"{path}[{i}]")
  elif isinstance(a, float) and isinstance(b, float):
    if ".procrustes" in path:  # √(2 − 2x) near x = 1 magnifies rounding: compare its square
      a, b = a * a, b * b
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=path)
  else:
    assert a == b, path


@pytest.mark.slow
def test_analyze_group_in_small_blocks_equals_one_block():
  g = groups.get("S3")
  irreps = irreps_lib.real_irreps(g)
  cfg, params, apply_fn = _random_mlps(g, 3, seed=11)
  full = models.stacked(cfg)
  plain = full._replace(effective=None)
  by_step = {0: jax.tree.map(lambda x: x / 3.0, params), 10: params}
  for model in (full, plain):
    kw = dict(key=jax.random.key(1), connectivity_points=3, knn_inputs=20)
    small = passes.analyze_group(g, irreps, model, by_step, range(3), batch_size=5,
                                   memory_bytes=1, **kw)
    whole = passes.analyze_group(g, irreps, model, by_step, range(3), **kw)
    _assert_close_json(small, whole)
    assert small["runs"][0]["losses"] is None or small["runs"][0]["losses"]["full"] > 0
