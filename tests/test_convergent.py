"""Convergent Learning passes (engine/analysis/convergent.py) against brute force, scikit-learn and planted data."""

import itertools
import json

import jax
import numpy as np
import pytest
from sklearn.cluster import SpectralClustering
from sklearn.linear_model import Lasso
from sklearn.metrics import adjusted_rand_score

from universality.engine.analysis import convergent


def _corr64(x, y):
  n = x.shape[1]
  return np.corrcoef(np.concatenate([x, y], axis=1).T)[:n, n:]


def test_one_to_one_matches_brute_force():
  rng = np.random.default_rng(1)
  s, t, n = 3, 50, 5
  base = rng.normal(size=(t, n))
  acts = np.stack([base[:, rng.permutation(n)] + 0.9 * rng.normal(size=(t, n)) for _ in range(s)])
  res = convergent.one_to_one(acts)
  assert res["pairs"] == [(0, 1), (0, 2), (1, 2)]
  for k, (a, b) in enumerate(res["pairs"]):
    c = _corr64(acts[a].astype(np.float64), acts[b].astype(np.float64))
    greedy = [int(np.argmax(c[i])) for i in range(n)]
    best_perm = max(itertools.permutations(range(n)), key=lambda p: sum(c[i, p[i]] for i in range(n)))
    np.testing.assert_array_equal(res["greedy_ZxN"][k], greedy)
    np.testing.assert_array_equal(res["max_ZxN"][k], best_perm)
    rec = res["records"][k]
    assert rec.greedy_mean == pytest.approx(np.mean([c[i, greedy[i]] for i in range(n)]), abs=1e-5)
    assert rec.max_mean == pytest.approx(np.mean([c[i, best_perm[i]] for i in range(n)]), abs=1e-5)
    assert rec.greedy_mean >= rec.max_mean - 1e-9
    assert rec.same_partner_share == pytest.approx(np.mean(np.asarray(greedy) == np.asarray(best_perm)))


def test_one_to_one_dead_units_left_out():
  rng = np.random.default_rng(2)
  acts = rng.normal(size=(2, 30, 4))
  acts[0, :, 2] = 3.0
  rec = convergent.one_to_one(acts)["records"][0]
  assert rec.units == 3
  res = convergent.one_to_one(acts)
  assert np.isnan(res["greedy_corr_ZxN"][0, 2]) and np.isnan(res["max_corr_ZxN"][0, 2])


def _planted_sparse(rng, t=160, n=8):
  a = rng.normal(size=(t, n))
  b = rng.normal(size=(t, n))
  b[:, 0] = 0.8 * a[:, 1] - 0.5 * a[:, 4] + 0.6 * a[:, 6]
  b[:, 3] = 0.7 * a[:, 2] + 0.5 * rng.normal(size=t)
  return np.stack([a, b])


def test_sparse_prediction_matches_sklearn_lasso_and_recovers_planted_units():
  rng = np.random.default_rng(3)
  acts = _planted_sparse(rng)
  lambdas = [0.01, 0.05, 0.2]
  res = convergent.sparse_prediction(acts, [(0, 1)], key=jax.random.key(0), lambdas=lambdas, iterations=3000)
  z, live = convergent.standardise(acts, res["fit_T"])
  assert live.all()
  xa, xb = z[0].astype(np.float64), z[1].astype(np.float64)
  fit, held = res["fit_T"], res["heldout_T"]
  assert len(held) == 40 and len(set(fit) | set(held)) == 160
  for j, lam in enumerate(lambdas):
    ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=200000).fit(xa[fit], xb[fit])
    w_ref = ref.coef_.T  # [a's units, b's units]
    np.testing.assert_allclose(res["weights_ZxOxNxN"][0, j], w_ref, atol=2e-3)
    mse_ref = np.mean((xb[held] - xa[held] @ w_ref) ** 2, axis=0)
    np.testing.assert_allclose(res["heldout_loss_ZxOxN"][0, j], mse_ref, rtol=2e-2, atol=2e-3)
  used0 = np.flatnonzero(np.abs(res["weights_ZxOxNxN"][0, 0, :, 0]) > convergent.USED_TOL)
  assert used0.tolist() == [1, 4, 6]
  assert res["used_ZxOxN"][0, 0, 0] == 3
  assert res["heldout_loss_ZxOxN"][0, 0, 0] < 0.01  # exact combination: near-perfect held-out prediction
  assert res["heldout_loss_ZxOxN"][0, 0, 5] > 0.5  # an independent unit: nothing to predict it from
  rec = res["records"][0]
  assert rec.mean_units_used[0] >= rec.mean_units_used[-1]  # more penalty, fewer units
  assert convergent.SparsePrediction.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def _planted_blocks(rng, t=200, blocks=4, per=2):
  lat = rng.normal(size=(t, blocks))
  runs, truth = [], []
  for _ in range(2):
    owner = rng.permutation(np.repeat(np.arange(blocks), per))
    runs.append(lat[:, owner] + 0.3 * rng.normal(size=(t, blocks * per)))
    truth.append(owner)
  return np.stack(runs), np.concatenate(truth)


def test_spectral_clusters_recover_planted_blocks_and_agree_with_sklearn():
  rng = np.random.default_rng(4)
  acts, truth = _planted_blocks(rng)
  res = convergent.spectral_clusters(acts, clusters=4)
  labels = res["labels_Zx2xN"][0].reshape(-1)
  assert adjusted_rand_score(truth, labels) == 1.0
  both = np.concatenate([acts[0], acts[1]], axis=1)
  aff = np.abs(np.corrcoef(both.T))
  sk = SpectralClustering(n_clusters=4, affinity="precomputed", random_state=0).fit_predict(aff)
  assert adjusted_rand_score(sk, labels) == 1.0
  rec = res["records"][0]
  assert rec.mixed_share == 1.0 and len(rec.clusters) == 4
  for c in rec.clusters:
    assert len(c.units_a) == 2 and len(c.units_b) == 2
    assert c.between > 0.8 and c.within_a > 0.8 and c.within_b > 0.8
    # Two noisy copies of one latent per side: one strong canonical direction, one of noise.
    assert c.svcca > 0.4
    assert convergent.svcca(acts[0][:, c.units_a], acts[1][:, c.units_b], keep=0.9) > 0.9
  assert convergent.Clusters.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_svcca_invariant_to_invertible_mixing_and_low_for_independent():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(300, 3))
  assert convergent.svcca(x, x @ rng.normal(size=(3, 3)), keep=1.0) == pytest.approx(1.0, abs=1e-8)
  assert convergent.svcca(x, rng.normal(size=(300, 3)), keep=1.0) < 0.2
  assert convergent.svcca(x, np.ones((300, 2))) is None
  # Against the canonical correlations from whitened covariances (float64 reference).
  y = x[:, :2] @ rng.normal(size=(2, 2)) + rng.normal(size=(300, 2))
  xc, yc = x - x.mean(0), y - y.mean(0)
  cxx, cyy, cxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
  m = np.linalg.solve(cxx, cxy) @ np.linalg.solve(cyy, cxy.T)
  rho = np.sqrt(np.sort(np.linalg.eigvals(m).real)[::-1][:2])
  assert convergent.svcca(x, y, keep=1.0) == pytest.approx(rho.mean(), abs=1e-8)


def test_bad_input_one_line_errors():
  acts = np.random.default_rng(6).normal(size=(2, 20, 3))
  with pytest.raises(ValueError, match="pair"):
    convergent.one_to_one(acts, [(0, 0)])
  with pytest.raises(ValueError, match=r"\[S, T, N\]"):
    convergent.one_to_one(acts[0])
  with pytest.raises(ValueError, match="lambdas"):
    convergent.sparse_prediction(acts, key=jax.random.key(0), lambdas=[-1.0])
  bad = acts.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    convergent.spectral_clusters(bad)


def test_analyse_and_sections():
  rng = np.random.default_rng(7)
  acts, _ = _planted_blocks(rng, t=300)
  acts = np.concatenate([acts, acts[:1] + 0.1 * rng.normal(size=acts[:1].shape)])
  settings = convergent.Settings(max_inputs=200, lambdas=(0.01, 0.1), iterations=100, clusters=4)
  res = convergent.analyse(acts, key=jax.random.key(1), settings=settings)
  assert [len(res[k]) for k in ("one_to_one", "sparse_prediction", "clusters")] == [3, 3, 3]
  assert all(r.max_mean > 0.7 for r in res["one_to_one"])
  text = convergent.sections(res, layer="hidden")
  assert "one-to-one" in text and "λ=0.01" in text and "spectral clusters" in text and "0–2" in text
  json.dumps({k: [r.to_json() for r in v] for k, v in res.items()})
  off = convergent.analyse(acts, key=jax.random.key(1), settings=convergent.Settings(enabled=False))
  assert off == {"one_to_one": [], "sparse_prediction": [], "clusters": []} and convergent.sections(off) == ""
