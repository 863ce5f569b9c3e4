"""universality.engine.replay: selection, apply against hand-restored params and logged metrics, re-analysis, neurons."""

import json
import os

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from universality.engine import checkpoint, groups, launch, replay, rundir, train
from universality.engine.families.group import models
from universality.engine.families.group import task as tasks
from tests.helpers import group_config

BASE_SEED = 5  # differs from every seed number, so select(seed=k) cannot pass by reading the base seed


def small_study(tmp_path_factory) -> str:
  """One tiny analysed and reported study per test session, shared by the replay, report and notebook
  tests: C7 and S3, three seeds, 200 steps, checkpoints at a few log-spaced steps."""
  root = tmp_path_factory.getbasetemp() / "replay_study"
  if (root / "report" / "index.md").exists():
    return str(root)
  cfg = group_config(groups="C7,S3", embed_dim=16, hidden=16, lr="1e-2", train_frac="0.6", analyze=True)
  cfg.seeds = 3
  cfg.seed = BASE_SEED
  cfg.steps = 200
  cfg.eval_every = 10
  cfg.num_checkpoints = 6
  launch.run_study(cfg, str(root), progress=False)
  return str(root)


@pytest.fixture(scope="session")
def study(tmp_path_factory):
  return small_study(tmp_path_factory)


@pytest.fixture(scope="session")
def run(study):
  return replay.open(study)


def _rows(study):
  with open(os.path.join(study, "runs.json")) as f:
    return json.load(f)


def _hand_params(study, step):
  """The stacked params of all runs at ``step``, restored without universality.engine.replay."""
  with open(os.path.join(study, "config.json")) as f:
    stored = json.load(f)
  assert stored["format_version"] == rundir.FORMAT_VERSION
  cfg = group_config()
  cfg.update_from_flattened_dict(_flat(stored["config"]))
  trainer = train.make_train(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(study, "checkpoints"), read_only=True)
  try:
    _, state = ckpt.restore(train.host_state_spec(trainer), step=step, fallback=False)
  finally:
    ckpt.close()
  return cfg.model, jax.tree.map(np.asarray, state.params)


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def test_select_seed_is_seed_number_and_filters_like_brute_force(study, run):
  rows = _rows(study)
  assert all(r["base_seed"] == BASE_SEED for r in rows)
  for k in range(3):
    got = run.select(seed=k)
    assert got.index.tolist() == [i for i, r in enumerate(rows) if r["seed"] == k]
    assert all(r["seed"] == k for r in got.runs) and len(got) == 2
  s3 = run.select(group="S3", seed=[0, 2])
  assert s3.index.tolist() == [i for i, r in enumerate(rows) if r["group"] == "S3" and r["seed"] in (0, 2)]
  assert run.select(base_seed=BASE_SEED).index.tolist() == list(range(len(rows)))
  assert run.select(lr=0.01 + 1e-12, train_frac=0.6).index.tolist() == list(range(len(rows)))  # float tolerance
  # A view of a view intersects; it shares restored state with its parent.
  assert run.select(group="C7").select(seed=1).index.tolist() == [1]
  assert run.select(index=[4, 0]).index.tolist() == [0, 4]
  assert run.select(name=rows[3]["name"]).index.tolist() == [3]


def test_select_errors(run):
  with pytest.raises(ValueError, match="unknown field 'colour'"):
    run.select(colour="red")
  with pytest.raises(ValueError, match="no run matches"):
    run.select(group="S5")
  with pytest.raises(ValueError, match="no run matches"):
    run.select(seed=BASE_SEED)  # the base seed is not a seed number here
  with pytest.raises(ValueError, match="spans groups"):
    run.plot.similarity_heatmap()
  with pytest.raises(ValueError, match="3 runs match"):
    run.plot.learning_order(group="S3")


def test_apply_equals_models_apply_on_hand_restored_params(study, run):
  step = run.steps[len(run.steps) // 2]
  cfg, params = _hand_params(study, step)
  rng = np.random.default_rng(0)
  a_B, b_B = rng.integers(0, 6, 40), rng.integers(0, 6, 40)
  sel = run.select(group="S3")
  logits, hidden = sel.apply(step, (a_B, b_B))
  assert logits.shape == (3, 40, 7) and hidden.shape == (3, 40, 16)
  for j, i in enumerate(sel.index):
    one = jax.tree.map(lambda x: x[i], params)
    ref_logits, ref_hidden = models.apply(one, a_B.astype(np.int32), b_B.astype(np.int32), cfg)
    np.testing.assert_allclose(logits[j, :, :6], np.asarray(ref_logits)[:, :6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hidden[j], np.asarray(ref_hidden), rtol=1e-5, atol=1e-5)
  assert np.all(logits[..., 6] == -np.inf)  # S3 runs in a bucket padded to |C7| = 7 classes
  # Every accepted form of the inputs gives the same numbers.
  pairs = np.stack([a_B, b_B], axis=1)
  np.testing.assert_array_equal(sel.apply(step, pairs)[0], logits)
  np.testing.assert_array_equal(sel.apply(step, a_B, b_B)[0], logits)
  np.testing.assert_array_equal(sel.apply(step, np.broadcast_to(pairs, (3, 40, 2)), batch_size=7)[1], hidden)
  # Default inputs: every pair of the group, in the order a·|G| + b.
  full_logits, _ = sel.apply(step)
  np.testing.assert_array_equal(full_logits[:, 6 * a_B + b_B], logits)


def test_apply_reproduces_logged_test_accuracy_and_loss(study, run):
  metrics = rundir.read_metrics(study)
  for step in (run.steps[2], run.steps[-1]):
    row = int(np.flatnonzero(metrics["step"] == step)[0])
    for spec in ("C7", "S3"):
      sel = run.select(group=spec)
      grp = groups.get(spec)
      splits = [tasks.split(grp, r["train_frac"], r["base_seed"], r["seed"]) for r in sel.runs]
      test = np.stack([s.test_Px3 for s in splits])
      logits, _ = sel.apply(step, test[..., :2])
      pred = np.argmax(logits, axis=-1)
      acc = np.mean(pred == test[..., 2], axis=1)
      np.testing.assert_allclose(acc, metrics["test_acc"][row, sel.index], rtol=0, atol=1e-6)
      lse = np.log(np.sum(np.exp(logits[..., :grp.order].astype(np.float64)), axis=-1))
      picked = np.take_along_axis(logits, test[..., 2:3], axis=-1)[..., 0]
      np.testing.assert_allclose((lse - picked).mean(axis=1), metrics["test_loss"][row, sel.index],
                                 rtol=2e-4, atol=1e-5)


def test_apply_and_step_errors(run):
  sel = run.select(group="S3")
  with pytest.raises(ValueError, match="group elements"):
    sel.apply(None, (np.array([0, 6]), np.array([1, 1])))  # 6 is not an element of S3
  with pytest.raises(ValueError, match="integer"):
    sel.apply(None, (np.array([0.5]), np.array([1.0])))
  with pytest.raises(ValueError, match="pairs"):
    sel.apply(None, np.zeros((4, 3), np.int32))
  with pytest.raises(ValueError, match="no checkpoint at step 7"):
    sel.apply(7)
  with pytest.raises(ValueError, match=r"\[3, B\]"):
    sel.apply(None, (np.zeros((2, 4), np.int32), np.zeros((2, 4), np.int32)))


def _assert_same(a, b, path="", rtol=1e-5):
  """Deep equality of JSON-like values, floats to ``rtol``."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
    for k in a:
      _assert_same(a[k], b[k], f"{path}.{k}", rtol)
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_same(x, y, f"{path}[{i}]", rtol)
  elif isinstance(a, float) and isinstance(b, float):
    assert np.isclose(a, b, rtol=rtol, atol=1e-6), f"{path}: {a} vs {b}"
  else:
    assert a == b, f"{path}: {a!r} vs {b!r}"


def test_analyze_final_step_equals_summary(study, run):
  path = os.path.join(study, "analysis", "summary.json")
  before = open(path, "rb").read()
  res = run.analyze()
  summary = json.loads(before)
  assert list(res) == ["C7/lr0.01/wd1/frac0.6", "S3/lr0.01/wd1/frac0.6"] == run.cohorts
  for spec, entry in res.items():
    _assert_same(entry["task"], summary["cohorts"][spec]["task"], spec)
    _assert_same(entry["aggregate"], summary["cohorts"][spec]["aggregate"], spec)
    assert [r["index"] for r in entry["runs"]] == summary["cohorts"][spec]["runs"]
    for rec in entry["runs"]:
      _assert_same(rec, summary["runs"][rec["index"]], f"run {rec['index']}")
  assert open(path, "rb").read() == before  # nothing written


def test_analyze_earlier_step_matches_recorded_similarity(study, run):
  summary = run.summary()
  k = 2
  step = run.steps[k]
  res = run.select(group="S3").analyze(step=step)["S3/lr0.01/wd1/frac0.6"]  # all seeds: passes are reused
  assert res["task"]["steps"] == run.steps[:k + 1]
  metrics = rundir.read_metrics(study)
  row = int(np.flatnonzero(metrics["step"] == step)[0])
  for rec in res["runs"]:
    saved = summary["runs"][rec["index"]]
    for name, sim in rec["logit_similarity"].items():  # the summary kept every checkpoint's similarity
      assert np.isclose(sim, saved["similarity_by_step"][name][k], rtol=1e-5, atol=1e-6)
    assert all(v is None or v <= step for v in rec["learning_order"].values())
    assert rec["final"]["test_acc"] == pytest.approx(metrics["test_acc"][row, rec["index"]])
  assert res["aggregate"]["n_runs"] == 3


def test_neuron_correlations_reproduce_summary_histogram(run):
  summary = run.summary()
  for spec in ("C7", "S3"):
    res = run.neuron_correlations(group=spec, universal_threshold=summary["settings"]["universal_threshold"])
    live = ~res["dead_SxN"]
    saved = summary["cohorts"][f"{spec}/lr0.01/wd1/frac0.6"]["aggregate"]["correlation"]
    counts, _ = np.histogram(res["excess_SxN"][live], bins=20, range=(-0.5, 1.0))
    assert counts.tolist() == saved["excess_histogram"]["counts"]
    assert counts.sum() == live.sum() > 0
    s = res["max_SxNxS"].shape[0]
    sel = live[:, :, None] & ~np.eye(s, dtype=bool)[:, None, :]
    assert np.nanmean(res["max_SxNxS"][sel]) == pytest.approx(saved["mean_max"], rel=1e-5)
    assert np.nanmean(res["baseline_max_SxNxS"][sel]) == pytest.approx(saved["mean_baseline_max"], rel=1e-5)


def test_compare_neurons_against_float64_reference(study, run):
  cfg, params = _hand_params(study, run.steps[-1])
  cmp = run.compare_neurons(0, 2, group="S3")
  ia, ib = (i for i, r in enumerate(_rows(study)) if r["group"] == "S3" and r["seed"] in (0, 2))
  a_T, b_T = np.repeat(np.arange(6, dtype=np.int32), 6), np.tile(np.arange(6, dtype=np.int32), 6)
  h = [np.asarray(models.apply(jax.tree.map(lambda x: x[i], params), a_T, b_T, cfg)[1], np.float64)
       for i in (ia, ib)]
  live = [x.std(axis=0) > 1e-6 for x in h]
  ref = np.corrcoef(h[0][:, live[0]].T, h[1][:, live[1]].T)[:live[0].sum(), live[0].sum():]
  np.testing.assert_allclose(cmp["corr_NxN"][np.ix_(live[0], live[1])], ref, atol=1e-4)
  assert np.isnan(cmp["corr_NxN"][~live[0]]).all()
  perm = cmp["perm_N"]
  assert sorted(perm.tolist()) == list(range(16))  # one-to-one
  both = live[0] & live[1][perm]
  np.testing.assert_allclose(cmp["matched_corr_N"][both], cmp["corr_NxN"][both, perm[both]], atol=1e-5)
  # The matching beats the identity and random permutations on total correlation.
  total = lambda p: np.nansum(np.nan_to_num(cmp["corr_NxN"])[np.arange(16), p])
  rng = np.random.default_rng(1)
  assert all(total(perm) >= total(rng.permutation(16)) - 1e-9 for _ in range(50))
  # Dominant irreps agree with the per-run counts saved in the summary.
  saved = run.summary()["runs"]
  for dom, live_n, i in ((cmp["dominant_a_N"], cmp["live_a_N"], ia), (cmp["dominant_b_N"], cmp["live_b_N"], ib)):
    counts = {n: int(np.sum(dom[live_n] == r)) for r, n in enumerate(cmp["irreps"])}
    assert counts == saved[i]["neurons"]["dominant_counts"]


def test_plot_helpers_return_figures(run):
  figs = [run.plot.learning_curves(), run.plot.similarity_heatmap("S3"), run.plot.key_irreps("C7"),
          run.plot.learning_order(seed=1, group="C7"), run.plot.learning_order_group("S3"),
          run.plot.cka("S3"), run.plot.cka("C7", measure="matching"), run.plot.neurons(0, 1, group="C7")]
  for fig in figs:
    assert isinstance(fig, Figure) and fig.axes
  assert len(figs[0].axes) == 2  # one panel per group
  assert len(figs[0].axes[1].lines) >= 2 * 3  # train and test curve of each S3 run
  with pytest.raises(ValueError, match="unknown measure"):
    run.plot.cka("S3", measure="cosine")


def test_cosets_view_reproduces_summary(run):
  summary = run.summary()
  res = run.select(group="S3").cosets()
  assert res["source"] == "pre_activation" and len(res["subgroups"]) == 6
  records = [r for r in summary["runs"] if r["group"] == "S3"]
  dead = run.select(group="S3").neuron_correlations()["dead_SxN"]
  for s, rec in enumerate(records):
    for i, side in enumerate("ab"):
      assert int(np.sum(res["coset_SxIxN"][s, i] & ~dead[s])) == rec["cosets"]["sides"][side]["coset_neurons"]
  c7 = [r for r in summary["runs"] if r["group"] == "C7"]
  assert all(r["cosets"]["sides"]["a"]["coset_neurons"] == 0 for r in c7)   # C7 has no proper subgroup
  text = open(os.path.join(run.workdir, "report", "index.md")).read()
  assert text.count("### Cosets") == 2 and "no proper non-trivial subgroup" in text


def test_margins_in_summary_and_report(run):
  summary = run.summary()
  for rec in summary["runs"]:
    m = rec["margins"]
    assert len(m["normalised_margin_by_step"]) == len(summary["steps"])
    assert m["normalised_margin"] == pytest.approx(m["margin"] / m["norm"], rel=1e-5)
    assert 0 <= m["single_irrep_fraction"] <= 1 and 0 <= m["irrep_coverage"] <= 1
  c7 = next(e for c, e in summary["cohorts"].items() if c.startswith("C7"))
  assert c7["task"]["predicted_coverage"] == 1.0
  text = open(os.path.join(run.workdir, "report", "index.md")).read()
  assert text.count("### Margins") == 2


def test_connectivity_view_reproduces_summary(run):
  summary = run.summary()
  spec = "S3"
  res = run.select(group=spec).connectivity()
  entry = next(e for c, e in summary["cohorts"].items() if c.startswith(spec))
  conn = entry["aggregate"]["connectivity"]
  assert conn["points"] == len(res["lambda_O"]) == 25
  for name in ("raw", "activation", "weight"):
    saved = np.asarray(conn["alignments"][name]["barrier"], float)
    for p, (i, j) in enumerate(res["pairs_Zx2"]):
      assert saved[i, j] == pytest.approx(float(res[name]["barrier_Z"][p]), abs=1e-5)
  text = open(os.path.join(run.workdir, "report", "index.md")).read()
  assert text.count("### Mode connectivity") == 2


def test_redundancy_in_summary_and_report(run):
  summary = run.summary()
  for rec in summary["runs"]:
    red = rec["redundancy"]
    assert red["feature_complexity"] + red["never_active"] + red["merges"] == red["width"]
    assert red["merged_loss"] <= red["loss"] + summary["settings"]["merge_tolerance"] + 1e-6
  text = open(os.path.join(run.workdir, "report", "index.md")).read()
  assert text.count("### Redundancy") == 2
