"""Margins against a brute-force loop on S3; single-irrep neurons and coverage on planted neurons."""

import jax
import numpy as np

from universality.engine import groups
from universality.engine import irreps as irreps_lib
from universality.engine.families.group import passes
from universality.engine.families.group.passes import margins
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group import analysis as group_analysis
from universality.engine.families.group import models
from tests.helpers import group_config


def _rng(*salt):
  return np.random.default_rng([20241115, *salt])


def _brute_margin(pa, pb, u, g):
  """float64 loops over pairs and classes: min (correct − best wrong) / Σ squares of (P_a, P_b, U)."""
  worst = np.inf
  for a in range(g.order):
    for b in range(g.order):
      logits = [sum(u[c, n] * max(pa[a, n] + pb[b, n], 0.0) for n in range(pa.shape[1])) for c in range(g.order)]
      c_star = g.table[a, b]
      worst = min(worst, logits[c_star] - max(l for c, l in enumerate(logits) if c != c_star))
  norm = np.sum(pa ** 2) + np.sum(pb ** 2) + np.sum(u ** 2)
  return worst, norm, worst / norm


def test_normalised_margin_matches_brute_force_on_s3():
  g = groups.get("S3")
  irreps = irreps_lib.real_irreps(g)
  cfg = group_config(model="mlp", embed_dim=5, hidden=7).model
  s = 3
  params = jax.vmap(lambda k: models.init(k, cfg, g.order))(jax.random.split(jax.random.key(4), s))
  apply_fn = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg)))
  logits, _ = passes.evaluate_all_pairs(apply_fn, params, s, g.order)
  mats = {k: np.asarray(v, np.float64) for k, v in group_analysis.matrices_fn_for(cfg)(params).items()}
  res = {k: np.asarray(v) for k, v in margins.normalised_margin(
      logits, g.table, mats["pre_a"], mats["pre_b"], mats["unembed"]).items()}
  for i in range(s):
    ref = _brute_margin(mats["pre_a"][i], mats["pre_b"][i], mats["unembed"][i], g)
    np.testing.assert_allclose([res["margin_S"][i], res["norm_S"][i], res["normalised_S"][i]], ref,
                               rtol=1e-4, atol=1e-6)
  # Degree-2 homogeneity: scaling the effective weights by t leaves the normalised margin unchanged.
  t = 1.7
  scaled = margins.normalised_margin(t * t * logits, g.table, t * mats["pre_a"], t * mats["pre_b"],
                                     t * mats["unembed"])
  np.testing.assert_allclose(np.asarray(scaled["normalised_S"]), res["normalised_S"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(scaled["margin_S"]), t * t * res["margin_S"], rtol=1e-4)


def test_single_irrep_neurons_and_coverage_on_planted_neurons():
  g = groups.get("D4")
  irreps = irreps_lib.real_irreps(g)
  tables = rep.irrep_tables(g, irreps)
  rng = _rng(1)
  # Neuron n lives in irrep n % (R−1) + 1, except the last, which mixes all of them.
  r = len(irreps)
  cols = []
  for n in range(6):
    ir = irreps[n % (r - 1) + 1]
    cols.append(ir.basis @ rng.normal(size=ir.basis.shape[1]))
  cols.append(tables.basis_GxF[:, 1:] @ rng.normal(size=g.order - 1))
  pa = np.stack(cols, axis=1)[None].astype(np.float32)
  pb = np.stack([irreps[n % (r - 1) + 1].basis @ rng.normal(size=irreps[n % (r - 1) + 1].basis.shape[1])
                 for n in range(6)] + [tables.basis_GxF[:, 1:] @ rng.normal(size=g.order - 1)], 1)[None]
  share = rep.neuron_irreps(pa, pb.astype(np.float32), g, irreps)["share_SxNxR"]
  live = np.ones((1, 7), bool)
  live[0, 5] = False
  out = margins.single_irrep_neurons(share, live)
  np.testing.assert_array_equal(out["single_SxN"][0], [True] * 5 + [False, False])
  np.testing.assert_array_equal(out["irrep_SxN"][0, :5], [n % (r - 1) + 1 for n in range(5)])
  # Five single-irrep neurons cover the R − 1 = 4 non-trivial irreps of D4.
  assert out["coverage_S"][0] == 1.0 and out["fraction_S"][0] == 5 / 6
  assert margins.predicted_coverage("C13") == 1.0 and margins.predicted_coverage("S4") is None
