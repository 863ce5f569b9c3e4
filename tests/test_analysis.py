"""universality.engine.analysis against float64 brute force on S3, D4 and Q8, exactness on planted structure, and a
short real training run showing the paper's result."""

import json

import jax
import numpy as np
import pytest
import scipy.linalg

from universality.engine import groups
from universality.engine import irreps as irreps_lib
from universality.engine import analysis
from universality.engine.families.group import passes
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group import analysis as group_analysis
from universality.engine.families.group import models
from tests.helpers import group_config, set_fields

GROUPS = ("S3", "D4", "Q8")


@pytest.fixture(scope="module", params=GROUPS)
def group_irreps(request):
  g = groups.get(request.param)
  return g, irreps_lib.real_irreps(g)


def _rng(*salt):
  return np.random.default_rng([20240601, *salt])


def _fs_k(irreps):
  """k = 1, 2, 4 (Σ|χ|² = |G|·k) from the Frobenius–Schur indicator."""
  return np.asarray([{1: 1, 0: 2, -1: 4}[int(ir.frobenius_schur)] for ir in irreps], np.float64)


def _abcinv(g):
  """int [G, G, G]: index of a·b·c⁻¹ (the brute-force trace-cube index)."""
  a = np.arange(g.order)
  return g.table[g.table[a[:, None], a[None, :]][:, :, None], g.inverse[None, None, :]]


def _entry_projector(values_XxF, rank: int):
  """Orthogonal projector onto the column span of ``values`` (independent of Irrep.basis).

  The rank is given, not guessed from a cut-off: the entries of an irrep of dimension D and Frobenius–Schur
  type k span D²/k dimensions exactly, and their next singular value is rounding (~1e-14), which a default
  cut-off near machine precision may keep or drop depending on the BLAS kernel. The gap is asserted instead.
  """
  u, sv, _ = np.linalg.svd(np.asarray(values_XxF, np.float64), full_matrices=False)
  assert sv[rank - 1] > 1e-3 * sv[0], f"rank {rank} span is degenerate: {sv[:rank + 1]}"
  assert rank == len(sv) or sv[rank] < 1e-8 * sv[0], f"span has rank > {rank}: {sv[:rank + 2]}"
  q = u[:, :rank]
  return q @ q.T


def _span_rank(ir) -> int:
  """D²/k: the dimension of the span of an irrep's matrix entries."""
  return ir.dim ** 2 // ir.k


def _entries(ir):
  m = np.asarray(ir.matrices, np.float64)
  return m.reshape(m.shape[0], -1)


# ---------------------------------------------------------------------------------------------------
# Logit similarity.


def _similarity_reference(logits_SxGxGxV, g, irreps):
  idx = _abcinv(g)
  s, n = logits_SxGxGxV.shape[0], g.order
  out = np.zeros((s, len(irreps)))
  for si in range(s):
    for r, ir in enumerate(irreps):
      chi = np.asarray(ir.character, np.float64)
      total = 0.0
      for a in range(n):
        for b in range(n):
          x = logits_SxGxGxV[si, a, b] - logits_SxGxGxV[si, a, b].mean()
          t = chi[idx[a, b]] - chi[idx[a, b]].mean()
          den = np.linalg.norm(x) * np.linalg.norm(t)
          total += x @ t / den if den > 1e-12 else 0.0
      out[si, r] = total / n ** 2
  return out


def test_logit_similarity_matches_brute_force(group_irreps):
  g, irreps = group_irreps
  logits = _rng(1, g.order).normal(size=(2, g.order, g.order, g.order))
  got = np.asarray(passes.logit_similarity(logits, g, irreps))
  np.testing.assert_allclose(got, _similarity_reference(logits, g, irreps), atol=2e-5)


def _planted_logits(g, irreps, w_SxR, noise=0.0, seed=0):
  idx = _abcinv(g)
  chars = np.stack([np.asarray(ir.character, np.float64) for ir in irreps])
  logits = np.einsum("sr,rabc->sabc", w_SxR, chars[:, idx])
  rng = _rng(2, seed)
  logits = logits + rng.normal(size=(w_SxR.shape[0], g.order, g.order, 1))  # any per-pair offset
  return logits + noise * rng.normal(size=logits.shape)


def test_planted_characters_give_their_weights_back(group_irreps):
  g, irreps = group_irreps
  r_count = len(irreps)
  rng = _rng(3, g.order)
  w = rng.uniform(0.5, 2.0, size=(2, r_count)) * rng.choice([-1.0, 1.0], size=(2, r_count))
  w[0, 1::2] = 0.0   # run 0 uses every other irrep, run 1 the rest
  w[1, 2::2] = 0.0
  sim = np.asarray(passes.logit_similarity(_planted_logits(g, irreps, w), g, irreps))
  expected = w * np.sqrt(_fs_k(irreps))[None]
  expected[:, 0] = 0.0   # the trivial character is constant over c: centring removes it
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(sim, expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(passes.fraction_explained(sim)), 1.0, atol=1e-5)
  keys = np.asarray(passes.key_irreps(sim, 0.05))
  np.testing.assert_array_equal(keys, expected > 0.05)
  assert not keys[:, 0].any()


def test_fourier_power_agrees_with_similarity_on_key_irreps(group_irreps):
  g, irreps = group_irreps
  w = np.zeros((2, len(irreps)))
  w[0, -1], w[0, 1] = 2.0, 1.0
  w[1, -2], w[1, -1] = 1.5, 0.7
  logits = _planted_logits(g, irreps, w, noise=0.05, seed=g.order)
  sim = np.asarray(passes.logit_similarity(logits, g, irreps))
  power = np.asarray(passes.logit_fourier_power(logits, g, irreps))
  keys = np.asarray(passes.key_irreps(sim))
  assert keys.sum(axis=1).min() >= 1
  share = np.where(keys, sim, 0.0) ** 2
  share /= share.sum(axis=1, keepdims=True)
  np.testing.assert_allclose(np.where(keys, power, 0.0), share, atol=0.02)
  np.testing.assert_allclose(power.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# FVEs, per-neuron irreps, ablation losses.


def test_fve_matches_projection_on_matrix_entries(group_irreps):
  g, irreps = group_irreps
  x = _rng(4, g.order).normal(size=(2, g.order, 5)) + 0.3
  got = np.asarray(passes.fve(x, g, irreps))
  ref = np.stack([[np.sum((_entry_projector(_entries(ir), _span_rank(ir)) @ xs) ** 2) / np.sum(xs ** 2) for ir in irreps]
                  for xs in x])
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_hidden_fve_matches_projection_on_functions_of_ab(group_irreps):
  g, irreps = group_irreps
  n = g.order
  h = np.maximum(_rng(5, n).normal(size=(2, n, n, 4)), 0.0)
  ab = g.table.reshape(-1)
  got = np.asarray(passes.hidden_fve(h, g, irreps))
  ref = np.zeros_like(got)
  for r, ir in enumerate(irreps):
    proj = _entry_projector(_entries(ir)[ab], _span_rank(ir))   # functions (a, b) -> rho_ij(a·b) on all pairs
    for s in range(2):
      hs = h[s].reshape(n * n, -1)
      ref[s, r] = np.sum((proj @ hs) ** 2) / np.sum(hs ** 2)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  # A hidden layer that is a function of a·b alone is fully explained.
  only_ab = _rng(6).normal(size=(1, n, 3))[:, g.table]
  np.testing.assert_allclose(np.asarray(passes.hidden_fve(only_ab, g, irreps)).sum(), 1.0, atol=1e-5)


def test_neuron_irreps_match_projection_on_pair_functions(group_irreps):
  g, irreps = group_irreps
  n = g.order
  rng = _rng(7, n)
  u, v = rng.normal(size=(2, n, 6)) + 0.5, rng.normal(size=(2, n, 6))
  # Plant neuron 0 of run 0 in the last irrep only (plus a constant).
  last = _entries(irreps[-1])
  u[0, :, 0] = last @ rng.normal(size=last.shape[1]) + 1.0
  v[0, :, 0] = last @ rng.normal(size=last.shape[1])
  out = passes.neuron_irreps(u, v, g, irreps)
  share = np.asarray(out["share_SxNxR"])
  a_idx, b_idx = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
  ref = np.zeros_like(share)
  for r, ir in enumerate(irreps):
    e = _entries(ir)
    span = np.ones((n * n, 1)) if r == 0 else np.concatenate([e[a_idx], e[b_idx]], axis=1)
    proj = _entry_projector(span, 1 if r == 0 else 2 * _span_rank(ir))
    for s in range(2):
      f = u[s][a_idx] + v[s][b_idx]
      ref[s, :, r] = np.sum((proj @ f) ** 2, axis=0) / np.sum(f ** 2, axis=0)
  np.testing.assert_allclose(share, ref, atol=1e-5)
  dominant = np.argmax(ref[..., 1:], axis=-1) + 1
  np.testing.assert_array_equal(np.asarray(out["dominant_SxN"]), dominant)
  assert int(out["dominant_SxN"][0, 0]) == len(irreps) - 1
  np.testing.assert_allclose(float(out["dominant_share_SxN"][0, 0]), 1.0, atol=1e-5)


def _mlp_loss_reference(u, v, unembed_VxN, table):
  n = table.shape[0]
  hidden = np.maximum(u[:, None, :] + v[None, :, :], 0.0)
  logits = hidden @ unembed_VxN[:n].T
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.mean(np.take_along_axis(logp, table[:, :, None], axis=-1))


def test_ablation_losses_match_brute_force(group_irreps):
  g, irreps = group_irreps
  n, r_count = g.order, len(irreps)
  rng = _rng(8, n)
  u, v = rng.normal(size=(2, n, 7)), rng.normal(size=(2, n, 7))
  unembed = rng.normal(size=(2, n + 3, 7))   # 3 padded classes, ignored
  keep = np.zeros((2, r_count), bool)
  keep[0, -1] = True
  keep[1, 1:] = True
  out = {k: np.asarray(x) for k, x in passes.ablation_losses(u, v, unembed, keep, g, irreps).items()}
  projs = [_entry_projector(_entries(ir), _span_rank(ir)) for ir in irreps]
  for s in range(2):
    def loss_keeping(mask):
      p = sum((projs[r] for r in range(r_count) if mask[r]), np.zeros((n, n)))
      return _mlp_loss_reference(p @ u[s], p @ v[s], unembed[s], g.table)
    np.testing.assert_allclose(out["full_S"][s], _mlp_loss_reference(u[s], v[s], unembed[s], g.table),
                               rtol=1e-4)
    np.testing.assert_allclose(out["restricted_S"][s], loss_keeping(keep[s]), rtol=1e-4)
    np.testing.assert_allclose(out["excluded_S"][s], loss_keeping(~keep[s]), rtol=1e-4)
    for r in range(r_count):
      np.testing.assert_allclose(out["excluded_each_SxR"][s, r], loss_keeping(np.arange(r_count) != r),
                                 rtol=1e-4)


def test_learning_order_brute_force():
  rng = _rng(9)
  steps = np.array([0, 10, 30, 100, 300, 1000])
  sim = rng.uniform(0.0, 0.08, size=(6, 3, 4))
  got = np.asarray(passes.learning_order(steps, sim, 0.05))
  for s in range(3):
    for r in range(4):
      hits = [k for k in range(6) if sim[k, s, r] > 0.05]
      assert got[s, r] == (steps[hits[0]] if hits else -1)
  with pytest.raises(ValueError, match="increasing"):
    passes.learning_order(steps[::-1], sim)


# ---------------------------------------------------------------------------------------------------
# Cross-seed comparison.


def _planted_runs(s=3, t=64, n=6, seed=0):
  """Runs that share 4 neurons (permuted, rescaled, noisy) and have 2 private ones."""
  rng = _rng(10, seed)
  shared = rng.normal(size=(t, 4))
  acts, perms = [], []
  for _ in range(s):
    private = rng.normal(size=(t, n - 4))
    x = np.concatenate([shared * rng.uniform(0.5, 2.0, size=4) + 0.05 * rng.normal(size=(t, 4)), private], 1)
    p = rng.permutation(n)
    acts.append(x[:, p])
    perms.append(p)
  return np.stack(acts), np.stack(perms)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_neuron_correlations_match_brute_force():
  acts, _ = _planted_runs()
  acts[1, :, 2] = 3.0   # a dead neuron
  s, _, n = acts.shape
  out = {k: np.asarray(v) for k, v in analysis.neuron_correlations(acts, key=jax.random.key(0)).items()}
  live = acts.std(axis=1) > 0
  np.testing.assert_array_equal(out["dead_SxN"], ~live)
  for i in range(s):
    for j in range(s):
      c = np.corrcoef(acts[i].T, acts[j].T)[:n, n:]
      c[:, ~live[j]] = 0.0   # a dead neuron correlates 0 with everything
      if i == j:
        np.fill_diagonal(c, -np.inf)
      for nn in np.flatnonzero(live[i]):
        np.testing.assert_allclose(out["max_SxNxS"][i, nn, j], c[nn].max(), atol=1e-4)
  diff = out["max_SxNxS"] - out["baseline_max_SxNxS"]
  for i in range(s):
    others = [j for j in range(s) if j != i]
    ref = diff[i][:, others].mean(axis=1)
    np.testing.assert_allclose(out["excess_SxN"][i][live[i]], ref[live[i]], atol=1e-5)
    np.testing.assert_array_equal(out["universal_SxN"][i], live[i] & (ref > 0.5))
  # Shared neurons correlate ~1 across runs; private ones do not.
  assert np.nanmean(out["max_SxNxS"][0, :, 1:].max(axis=1)) > 0.6


def test_irrep_agreement_brute_force():
  rng = _rng(11)
  s, n = 3, 8
  argmax = rng.integers(0, n, size=(s, n, s))
  dominant = rng.integers(1, 4, size=(s, n))
  dead = rng.uniform(size=(s, n)) < 0.2
  mask = rng.uniform(size=(s, n)) < 0.7
  got = analysis.irrep_agreement(argmax, dominant, dead, mask)
  agree = chance = count = 0
  for i in range(s):
    for nn in range(n):
      if dead[i, nn] or not mask[i, nn]:
        continue
      for j in range(s):
        m = argmax[i, nn, j]
        if j == i or dead[j, m]:
          continue
        count += 1
        agree += dominant[j, m] == dominant[i, nn]
        chance += np.mean(dominant[j][~dead[j]] == dominant[i, nn])
  assert got["count"] == count
  np.testing.assert_allclose(got["rate"], agree / count, atol=1e-6)
  np.testing.assert_allclose(got["chance"], chance / count, atol=1e-6)


def test_matching_recovers_planted_permutation():
  rng = _rng(12)
  base = rng.normal(size=(50, 7))
  perm = rng.permutation(7)
  acts = np.stack([base, base[:, perm] * 2.0 + 0.01 * rng.normal(size=(50, 7))])
  out = analysis.match_neurons(acts)
  # Neuron n of run 0 is neuron perm⁻¹[n] of run 1.
  np.testing.assert_array_equal(out["perm_SxSxN"][0, 1], np.argsort(perm))
  np.testing.assert_array_equal(out["perm_SxSxN"][1, 0], perm)
  assert out["mean_matched_SxS"][0, 1] > 0.999
  np.testing.assert_allclose(np.diag(out["mean_matched_SxS"]), 1.0)


def test_matching_is_optimal_against_brute_force():
  acts = _rng(13).normal(size=(2, 40, 5))
  out = analysis.match_neurons(acts)
  c = np.corrcoef(acts[0].T, acts[1].T)[:5, 5:]
  import itertools  # pylint: disable=import-outside-toplevel
  best = max(np.mean(c[np.arange(5), list(p)]) for p in itertools.permutations(range(5)))
  np.testing.assert_allclose(out["mean_matched_SxS"][0, 1], best, atol=1e-6)


def _cka_reference(x, y):
  """HSIC form with centred T×T Gram matrices: an independent route to linear CKA."""
  t = x.shape[0]
  h = np.eye(t) - 1.0 / t
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l))


def _procrustes_reference(x, y):
  x = x - x.mean(0)
  y = y - y.mean(0)
  x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
  q, _ = scipy.linalg.orthogonal_procrustes(y, x)
  return np.linalg.norm(x - y @ q)


def _knn_reference(x, y, k):
  def nbrs(z):
    z = z - z.mean(0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    return [set(np.argsort(-row, kind="stable")[:k]) for row in sim]
  nx, ny = nbrs(x), nbrs(y)
  return np.mean([len(a & b) / k for a, b in zip(nx, ny)])


def test_representation_similarity_brute_force_and_invariances():
  rng = _rng(14)
  x = rng.normal(size=(60, 6))
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  acts = np.stack([x, 3.0 * x @ q + 1.5, rng.normal(size=(60, 6)),
                   np.tanh(x) + 0.3 * rng.normal(size=(60, 6))])
  out = {k: np.asarray(v) for k, v in analysis.representation_similarity(acts, k=5).items()}
  for i in range(4):
    for j in range(4):
      np.testing.assert_allclose(out["cka"][i, j], _cka_reference(acts[i], acts[j]), atol=1e-5)
      np.testing.assert_allclose(out["procrustes"][i, j], _procrustes_reference(acts[i], acts[j]), atol=2e-3)
      np.testing.assert_allclose(out["mutual_knn"][i, j], _knn_reference(acts[i], acts[j], 5), atol=1e-6)
  np.testing.assert_allclose(out["cka"][0, 1], 1.0, atol=1e-5)
  np.testing.assert_allclose(out["procrustes"][0, 1], 0.0, atol=2e-3)
  np.testing.assert_allclose(out["mutual_knn"][0, 1], 1.0)


def test_representation_similarity_subsamples_inputs_deterministically():
  acts = _rng(15).normal(size=(2, 300, 4))
  one = analysis.representation_similarity(acts, k=3, knn_inputs=100, key=jax.random.key(1))
  two = analysis.representation_similarity(acts, k=3, knn_inputs=100, key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(one["mutual_knn"]), np.asarray(two["mutual_knn"]))
  with pytest.raises(ValueError, match="key"):
    analysis.representation_similarity(acts, k=3, knn_inputs=100)


# ---------------------------------------------------------------------------------------------------
# Bad input, recompilation.


def test_bad_input_raises_value_error():
  g = groups.get("S3")
  irreps = irreps_lib.real_irreps(g)
  with pytest.raises(ValueError, match="group order"):
    passes.logit_similarity(np.zeros((1, 6, 6, 7)), g, irreps)
  with pytest.raises(ValueError, match="empty"):
    passes.fve(np.zeros((1, 6, 2)), g, [])
  with pytest.raises(ValueError, match="missing or repeated"):
    passes.fve(np.zeros((1, 6, 2)), g, irreps[:-1])
  with pytest.raises(ValueError, match="trivial"):
    passes.fve(np.zeros((1, 6, 2)), g, irreps[::-1])
  with pytest.raises(ValueError, match="another group"):
    passes.fve(np.zeros((1, 6, 2)), groups.get("C6"), passes.irrep_tables(g, irreps))
  with pytest.raises(ValueError, match="at least 2 runs"):
    analysis.neuron_correlations(np.ones((1, 5, 3)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="keep"):
    passes.ablation_losses(np.zeros((1, 6, 2)), np.zeros((1, 6, 2)), np.zeros((1, 6, 2)),
                             np.zeros((1, 2), bool), g, irreps)


def test_passes_compile_once_per_shape():
  g = groups.get("D4")
  irreps = irreps_lib.real_irreps(g)
  rng = _rng(16)
  before = rep._logit_similarity._cache_size()  # pylint: disable=protected-access
  for _ in range(3):
    passes.logit_similarity(rng.normal(size=(3, 8, 8, 8)), g, irreps)
  assert rep._logit_similarity._cache_size() - before <= 1  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------------
# The pipeline end to end on a short real training run.


def _trained_group(spec, seeds, steps, eval_every):
  """Trains ``seeds`` MLPs on ``spec`` and keeps log-spaced checkpoints (multiples of ``eval_every``)."""
  from universality.engine import train  # pylint: disable=import-outside-toplevel

  cfg = group_config(groups=spec, model="mlp", embed_dim=128, hidden=128)
  cfg.seeds = seeds
  # A large train fraction and lr 1e-2 make C23 grok in a few hundred full-batch steps.
  set_fields(cfg, train_frac="0.8", lr="1e-2", weight_decay="1.0")
  cfg.steps, cfg.eval_every = steps, eval_every
  trainer = train.make_train(cfg)
  state = trainer.init()
  params_by_step, done = {0: trainer.unpad(state.params)}, 0
  for step in sorted({eval_every * 2 ** k for k in range(20) if eval_every * 2 ** k < steps} | {steps}):
    state, metrics = trainer.run(state, (step - done) // eval_every)
    params_by_step[step], done = trainer.unpad(state.params), step
  # The model itself, vmapped over runs (the trainer's own apply works on its padded, sharded run axis).
  apply_fn = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg.model)))
  return cfg.model, trainer, params_by_step, apply_fn, metrics


def _random_mlps(g, s, width=8, seed=0):

  cfg = group_config(model="mlp", embed_dim=width, hidden=width).model
  keys = jax.random.split(jax.random.key(seed), s)
  params = jax.vmap(lambda k: models.init(k, cfg, g.order + 2))(keys)   # 2 padded classes
  apply_fn = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg)))
  return cfg, params, apply_fn


def test_analyze_group_fields_agree_with_the_passes():
  g = groups.get("S3")
  irreps = irreps_lib.real_irreps(g)
  cfg, params, apply_fn = _random_mlps(g, 3)
  later = jax.tree.map(lambda x: 1.5 * x, params)
  full = models.stacked(cfg)
  # Without effective weights (as for a transformer) the neuron split falls back to the hidden layer.
  plain = full._replace(effective=None)
  runs = [{"seed": k} for k in range(3)]
  generalised = [True, False, True]
  for model, source in ((full, "pre_activation"), (plain, "hidden")):
    out = passes.analyze_group(g, irreps, model, {10: later, 0: params}, runs,
                                 key=jax.random.key(1), batch_size=12, generalised=generalised)
    json.dumps(out, allow_nan=False)
    assert out["group"]["steps"] == [0, 10]
    assert (out["group"]["key_threshold"], out["group"]["order_threshold"]) == (0.005, 0.05)
    logits, hidden = passes.evaluate_all_pairs(apply_fn, later, 3, g.order)
    sim = np.asarray(passes.logit_similarity(logits, g, irreps))
    sim0 = np.asarray(passes.logit_similarity(passes.evaluate_all_pairs(apply_fn, params, 3, g.order)[0],
                                                g, irreps))
    names = [ir.name for ir in irreps]
    for i, record in enumerate(out["runs"]):
      assert record["run"] == runs[i] and record["generalised"] == generalised[i]
      np.testing.assert_allclose([record["logit_similarity"][n] for n in names], sim[i], atol=1e-6)
      assert record["key_irreps"] == [n for n, v in zip(names, sim[i]) if v > 0.005 and n != names[0]]
      # The learning order has its own threshold: the first of the two steps above 0.05.
      for r, n in enumerate(names[1:], 1):
        want = 0 if sim0[i, r] > 0.05 else (10 if sim[i, r] > 0.05 else None)
        assert record["learning_order"][n] == want, (i, n)
      assert record["neurons"]["source"] == source
      assert (record["losses"] is None) == (source == "hidden")
      np.testing.assert_allclose(sum(record["fve"]["embed_a"].values()), 1.0, atol=1e-5)
    agg = out["aggregate"]
    done = [r for r, ok in zip(out["runs"], generalised) if ok]
    assert agg["n_generalised"] == 2 and agg["not_generalised"] == [1]
    assert agg["key_irrep_counts"] == {n: sum(n in r["key_irreps"] for r in done) for n in names}
    assert sum(c["count"] for c in agg["key_irrep_sets"]) == 2
    assert sum(agg["first_learned_counts"].values()) == sum(r["first_learned"] is not None for r in done)
  one = passes.analyze_group(g, irreps, full, {0: jax.tree.map(lambda x: x[:1], params)},
                               runs[:1], key_threshold=0.3, order_threshold=0.4)
  assert one["aggregate"]["correlation"] is None and one["runs"][0]["neurons"]["universal_fraction"] is None
  assert one["runs"][0]["key_irreps"] == [n for n, v in zip(names, sim0[0]) if v > 0.3 and n != names[0]]
  assert one["aggregate"]["n_generalised"] == 1
  json.dumps(one, allow_nan=False)


@pytest.mark.slow
def test_pipeline_on_a_short_training_run_reproduces_the_paper():
  g = groups.get("C23")
  irreps = irreps_lib.real_irreps(g)
  cfg, trainer, params_by_step, apply_fn, metrics = _trained_group("C23", seeds=4, steps=2000,
                                                                   eval_every=25)
  assert np.all(metrics["test_acc"][-1] > 0.999)
  out = passes.analyze_group(g, irreps, models.stacked(cfg), params_by_step,
                               trainer.runs, key=jax.random.key(0))
  json.dumps(out, allow_nan=False)   # plain JSON, no NaN
  names = [ir.name for ir in irreps]
  for record in out["runs"]:
    # The paper's result: after grokking the key irreps explain nearly all of the logits ...
    assert record["fraction_explained_key"] >= 0.9
    assert record["accuracy_all"] > 0.999
    assert 1 <= len(record["key_irreps"]) < len(names) - 1
    # ... the model needs them (restricted loss stays low, excluded loss is high) ...
    losses = record["losses"]
    assert losses["restricted"] < 0.5 * losses["excluded"]
    assert losses["excluded"] > 1.0
    # ... and the neurons and the unembedding live in the key irreps too.
    assert record["neurons"]["in_key_irreps"] >= 0.7
    assert sum(record["fve"]["unembed"][k] for k in record["key_irreps"]) >= 0.8
    order = record["learning_order"]
    assert all(order[k] is not None for k in record["key_irreps"])
    assert record["first_learned"] in record["key_irreps"]
  agg = out["aggregate"]
  # Different seeds learn different key irreps (C23 has 11 frequencies to choose from).
  assert len(agg["key_irrep_sets"]) >= 2
  assert sum(agg["key_irrep_counts"].values()) == sum(len(r["key_irreps"]) for r in out["runs"])
  s = len(out["runs"])
  for name in ("cka", "procrustes", "mutual_knn"):
    assert np.asarray(agg[name]).shape == (s, s)
  np.testing.assert_allclose(np.diag(agg["cka"]), 1.0, atol=1e-4)
  corr = agg["correlation"]
  assert corr["mean_max"] > corr["mean_baseline_max"]
  # Neurons that match across seeds share their dominant irrep far more often than chance.
  assert corr["irrep_agreement"]["rate"] > 2 * corr["irrep_agreement"]["chance"]
  assert agg["matching"]["mean_offdiagonal"] is not None
  # The similarity and the Fourier power of the final logits agree on the key irreps.
  logits, _ = passes.evaluate_all_pairs(apply_fn, params_by_step[max(params_by_step)], s, g.order)
  sim = np.asarray(passes.logit_similarity(logits, g, irreps))
  power = np.asarray(passes.logit_fourier_power(logits, g, irreps))
  keys = np.asarray(passes.key_irreps(sim))
  share = np.where(keys, sim, 0.0) ** 2 / np.sum(np.where(keys, sim, 0.0) ** 2, axis=1, keepdims=True)
  np.testing.assert_allclose(np.where(keys, power, 0.0), share, atol=0.1)
