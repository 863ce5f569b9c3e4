"""The grokking phase diagram of Tian (2025) ("Li2"): the transition fit on synthetic outcomes drawn from a
known logistic boundary, the scaling fit on known laws, and the per-neuron irrep features against
brute-force references."""

import math

import numpy as np
import pytest
import scipy.optimize

from universality.engine import groups, irreps as irreps_lib
from universality.engine.families.group import family as family_lib, phase


def _draw(n_star, slope, seeds, rng, span=1.2, sizes=9):
  """Outcomes of ``seeds`` seeds at ``sizes`` sizes around ``n_star``, P(gen) = σ(slope·ln(n/n*))."""
  n_grid = np.round(n_star * np.exp(np.linspace(-span, span, sizes))).astype(int)
  n_S = np.repeat(n_grid[None], seeds, 0).ravel()
  seed_S = np.repeat(np.arange(seeds)[:, None], sizes, 1).ravel()
  p_S = 1 / (1 + np.exp(-slope * (np.log(n_S) - math.log(n_star))))
  return n_S, rng.random(n_S.size) < p_S, seed_S


def test_logistic_fit_without_ridge_is_the_maximum_likelihood():
  rng = np.random.default_rng(11)
  x = rng.normal(2.0, 0.7, 300)
  y = rng.random(300) < 1 / (1 + np.exp(-(1.5 * x - 3.1)))

  def nll(t):
    z = t[0] + t[1] * x
    return np.sum(np.logaddexp(0, z) - y * z)

  ref = scipy.optimize.minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
  a, b = phase.logistic_fit(x, y, ridge=0.0)
  np.testing.assert_allclose([a, b], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_star,slope,draw", [(700.0, 4.0, 0), (2500.0, 8.0, 1), (150.0, 3.0, 2)])
def test_transition_recovers_a_known_boundary_within_its_bootstrap_interval(n_star, slope, draw):
  rng = np.random.default_rng(100 + draw)
  n_S, gen_S, seed_S = _draw(n_star, slope, 40, rng)
  tr = phase.transition(n_S, gen_S, seed_S, n_boot=400, seed=draw)
  assert tr.where == "fit" and tr.runs == n_S.size and tr.seeds == 40
  assert tr.low <= n_star <= tr.high, tr
  assert tr.low < tr.n_star < tr.high
  # a wrong boundary (25% off) lies outside: the interval is informative, not merely wide
  assert not tr.low <= 1.25 * n_star <= tr.high and not tr.low <= n_star / 1.25 <= tr.high
  assert abs(math.log(tr.slope / slope)) < math.log(2)


def test_transition_of_separated_and_one_sided_outcomes():
  n_S = np.array([100, 200, 400, 800] * 5)
  seed_S = np.repeat(np.arange(5), 4)
  tr = phase.transition(n_S, n_S >= 400, seed_S, n_boot=50)
  assert tr.where == "fit" and 200 < tr.n_star < 400
  np.testing.assert_allclose([tr.low, tr.high], [200, 400], rtol=1e-9)  # the bracket: no finer information
  below = phase.transition(n_S, np.ones(20, bool), seed_S, n_boot=20)
  above = phase.transition(n_S, np.zeros(20, bool), seed_S, n_boot=20)
  assert (below.where, below.n_star, below.low) == ("below", None, 0.0)
  assert (above.where, above.n_star, above.high) == ("above", None, math.inf)
  with pytest.raises(ValueError, match="equal non-empty"):
    phase.transition(n_S, n_S[:3] > 0, seed_S)


def test_transition_is_deterministic_given_its_seed():
  n_S, gen_S, seed_S = _draw(500.0, 5.0, 12, np.random.default_rng(4))
  a = phase.transition(n_S, gen_S, seed_S, n_boot=100, seed=3)
  assert a == phase.transition(n_S, gen_S, seed_S, n_boot=100, seed=3)
  assert a != phase.transition(n_S, gen_S, seed_S, n_boot=100, seed=4)


def test_scaling_fit_recovers_m_log_m_and_tells_it_from_m_squared():
  orders = [23, 41, 59, 83, 113, 127]
  s = {23: 1.0, 41: 1.0, 59: 1.0, 83: 1.5, 113: 1.0, 127: 2.0}
  rng = np.random.default_rng(0)
  noise = np.exp(rng.normal(0, 1e-3, len(orders)))
  law = [(f"G{m}", m, s[m], 2.7 * s[m] * m * math.log(m) * e) for m, e in zip(orders, noise)]
  fit = phase.scaling_fit(law)
  assert fit.groups == tuple(f"G{m}" for m in orders)
  np.testing.assert_allclose([fit.coefficients["ln M"], fit.coefficients["ln ln M"], fit.coefficients["1"]],
                             [1.0, 1.0, math.log(2.7)], atol=0.05)
  np.testing.assert_allclose(fit.slope_m_log_m, 1.0, atol=0.01)
  np.testing.assert_allclose(list(fit.ratio.values()), 2.7, rtol=0.01)
  square = phase.scaling_fit([(g, m, sg, 0.1 * sg * m * m) for g, m, sg, _ in law])
  assert abs(square.slope_m_log_m - 1.0) > 0.5  # n ∝ M² is not M ln M: its slope in ln M is ≈ 2 − ln ln M'
  assert phase.scaling_fit(law[:1]).slope_m_log_m is None


def test_cells_pairs_and_first_step():
  rng = np.random.default_rng(5)
  outs = []
  for opt, shift in (("adam", 1.0), ("muon", 0.5)):
    for m in (23, 47):
      unit = 2.7482 * m * math.log(m)
      for mult in (0.25, 0.5, 1.0, 2.0, 4.0):
        for k in range(10):
          gen = bool(rng.random() < 1 / (1 + np.exp(-4 * math.log(mult / shift))))
          outs.append(phase.Outcome(f"C{m}", m, opt, int(round(mult * unit)), mult, 1.0, k, gen,
                                    100 * k if gen else None))
  summ = phase.summary(outs, n_boot=50)
  cells = {(c["group"], c["optimiser"]): c for c in summ["cells"]}
  assert len(cells) == 4 and cells[("C23", "adam")]["mults"] == [0.25, 0.5, 1.0, 2.0, 4.0]
  for c in summ["cells"]:
    at = [o for o in outs if o.group == c["group"] and o.optimiser == c["optimiser"] and o.mult == 1.0]
    assert c["generalised_share"][2] == pytest.approx(np.mean([o.generalised for o in at]))
  assert cells[("C47", "muon")]["mult_star"] < cells[("C47", "adam")]["mult_star"]
  pairs = summ["pairs"]["adam vs muon"]
  assert len(pairs) == 10 and {p["group"] for p in pairs} == {"C23", "C47"}
  steps_E = np.array([0, 10, 20, 30])
  acc_ExS = np.array([[0.1, 0.1, np.nan], [0.5, 0.995, np.nan], [0.99, 0.2, np.nan], [1.0, 1.0, np.nan]])
  assert phase.first_step(steps_E, acc_ExS, 0.99) == [20, 10, None]


# --- per-neuron features -----------------------------------------------------------------------------


def _brute_power(f_G, irreps):
  """Power of f in each irrep by projecting onto an orthonormal basis of its matrix entries (QR, float64)."""
  out = []
  for r in irreps:
    entries_GxE = r.matrices.reshape(r.order, -1)
    q, rr = np.linalg.qr(entries_GxE)
    q = q[:, np.abs(np.diag(rr)) > 1e-9 * np.abs(rr).max()]
    out.append(float(np.sum((q.T @ f_G) ** 2)))
  return np.asarray(out)


@pytest.mark.parametrize("spec", ["C12", "S4", "D5"])
def test_neuron_features_against_brute_force_projection(spec):
  from universality.engine.families.group.passes import emergence
  group = groups.get(spec)
  reps = irreps_lib.real_irreps(group)
  g, n = group.order, 6
  rng = np.random.default_rng(7)
  w_a, w_b = rng.normal(size=(2, 2, g, n))
  # planted neurons: 0 a matrix entry of the last irrep on both sides (pure), 1 the same plus a constant,
  # 2 dead, 3 mixing two irreps equally
  last, first = reps[-1], reps[1]
  w_a[0, :, 0] = last.matrices[:, 0, 0]
  w_b[0, :, 0] = last.matrices[:, -1, 0]
  w_a[0, :, 1] = last.matrices[:, 0, 0] + 0.5
  w_b[0, :, 1] = 0.0
  w_a[0, :, 2] = w_b[0, :, 2] = 0.0
  w_a[0, :, 3] = first.matrices[:, 0, 0] / np.linalg.norm(first.matrices[:, 0, 0])
  w_b[0, :, 3] = last.matrices[:, 0, 0] / np.linalg.norm(last.matrices[:, 0, 0])
  feats = emergence.neuron_features(w_a, w_b, reps)
  for s in range(2):
    for k in range(n):
      if s == 0 and k == 2:
        continue
      ref = _brute_power(w_a[s, :, k], reps) + _brute_power(w_b[s, :, k], reps)
      np.testing.assert_allclose(feats.share_SxNxR[s, k], ref / ref.sum(), atol=2e-5)
      ent = -np.sum(np.where(ref > 0, ref / ref.sum() * np.log(np.maximum(ref / ref.sum(), 1e-300)), 0))
      np.testing.assert_allclose(feats.entropy_SxN[s, k], ent, atol=1e-4)
  r_last = len(reps) - 1
  assert feats.single_SxN[0, 0] and feats.top_SxN[0, 0] == r_last
  np.testing.assert_allclose([feats.share_SxNxR[0, 0, r_last], feats.entropy_SxN[0, 0]], [1.0, 0.0],
                             atol=1e-5)
  assert feats.single_SxN[0, 1] and feats.top_SxN[0, 1] == r_last and feats.entropy_SxN[0, 1] > 0.1
  assert not feats.live_SxN[0, 2] and not feats.single_SxN[0, 2] and feats.share_SxNxR[0, 2].sum() == 0
  np.testing.assert_allclose(feats.entropy_SxN[0, 3], np.log(2), atol=1e-4)
  assert not feats.single_SxN[0, 3] or first is last
  # random neurons: power near each irrep's share of R^G, dim²/k / |G|; no single-irrep neuron
  expected_R = np.asarray([r.dim ** 2 / r.k / g for r in reps])
  many = emergence.neuron_features(*rng.normal(size=(2, 1, g, 4000)), reps)
  np.testing.assert_allclose(many.share_SxNxR[0].mean(0), expected_R, atol=0.01)
  assert many.single_SxN.mean() < 0.02 and many.entropy_SxN.mean() > 0.7 * np.log(len(reps))
  summ = emergence.run_summaries(feats, reps)[0]
  assert summ["live"] == n - 1 and summ["single_irreps"][last.name] == 2


def test_neuron_features_refuse_mismatched_weights():
  from universality.engine.families.group.passes import emergence
  reps = irreps_lib.real_irreps(groups.get("C5"))
  with pytest.raises(ValueError, match="6 rows, the group 5"):
    emergence.neuron_features(np.ones((1, 6, 2)), np.ones((1, 6, 2)), reps)


# --- the study -----------------------------------------------------------------------------------------


def test_the_study_config_sizes_and_buckets():
  from universality.engine import families
  from universality.experiments.configs import li2_phase
  family = families.get("group")
  cpu, full = li2_phase.get_config(), li2_phase.get_config("full")
  runs = [sum(family.n_runs(c) for _, c in families.buckets(cfg)) for cfg in (cpu, full)]
  assert runs[0] >= 500 and runs[1] >= 5000
  for cfg in (cpu, full):
    names = [name for name, _ in families.buckets(cfg)]
    assert {n.split("-")[0] for n in names} == {"adam", "muon"} and len(names) % 2 == 0 and len(names) >= 6
    for spec in cfg.task.groups.split(","):  # every size of the sweep leaves a test set
      order = groups.order_of(spec)
      assert all(n < order * order for _, n in family_lib.law_pairs(cfg, spec))
  with pytest.raises(ValueError, match="size must be one of"):
    li2_phase.get_config("huge")


def test_the_study_end_to_end_launch_analysis_report(tmp_path):
  import json
  import os
  from universality.engine import launch, replay
  from universality.experiments.configs import li2_phase
  cfg = li2_phase.get_config()
  cfg.task.groups, cfg.task.size_mult = "C7", "0.45,0.8"
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 40, 10, 2
  cfg.model.li2.hidden = 8
  workdir = str(tmp_path / "study")
  launch.run_study(cfg, workdir, progress=False)
  report_dir = os.path.join(workdir, "report")
  text = open(os.path.join(report_dir, "index.md")).read()
  assert "## Phase diagram" in text and "### The transition n*(M)" in text and "muon against adam" in text
  for name in ("phase_share.png", "phase_heatmap.png", "phase_n_star.png", "phase_steps.png",
               "phase_features.png"):
    assert os.path.getsize(os.path.join(report_dir, name)) > 1000
  with open(os.path.join(report_dir, "phase.json")) as f:
    summ = json.load(f)
  cells = {(c["group"], c["optimiser"]): c for c in summ["cells"]}
  assert sorted(cells) == [("C7", "adam"), ("C7", "muon")]
  with replay.open(workdir) as study:
    for (spec, opt), c in cells.items():
      assert c["n"] == [n for _, n in family_lib.law_pairs(cfg, spec)] and c["transition"]["runs"] == 4
      view = study.select(group=spec, bucket=[b for b in study.buckets if b.startswith(opt)])
      acc = view.metrics()["test_acc"][-1]
      for mult, share in zip(c["mults"], c["generalised_share"]):
        at = [i for i, r in enumerate(view.runs) if r["size_mult"] == mult]
        assert share == pytest.approx(np.mean(acc[at] >= 0.99))
  feats = summ["features"]
  assert len(feats) == 8 and all(0 < f["live"] <= 8 for f in feats)
  assert all(0 <= f["mean_entropy"] <= math.log(len(irreps_lib.real_irreps(groups.get(f["group"])))) + 1e-6
             for f in feats)
