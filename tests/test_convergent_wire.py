"""The Convergent Learning passes wired into the group and language-model families: the setting reaches the
analysis from the config and the command line, the summary holds the records per cohort and layer, the
report their sections, the view returns records equal to ``convergent.analyse`` on the view's activations,
and with the setting off nothing changes."""

import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from universality.engine import config as config_lib, fields, launch, replay, report, rundir
from universality.engine.analysis import convergent, driver
from tests.test_lm import _write_corpus, lm_config
from tests.test_replay import small_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"convergent": True, "convergent_inputs": 32, "convergent_pairs": 2, "convergent_clusters": 4,
            "convergent_lambdas": "0.01,0.1", "convergent_iterations": 150}


def _relaunch_with(workdir, dest, **settings):
  """A copy of a finished run directory, launched again with analysis ``settings``: nothing to train, the
  analysis and the report are written again."""
  shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns(".lock"))
  cfg = config_lib.load(str(dest))
  cfg.exec.analyze = True
  cfg.analysis.update(settings)
  return launch.run_study(cfg, str(dest), progress=False)


def _strip(text, workdir):
  """A report without its Convergent Learning parts and with its run directory named DIR."""
  text = text.replace(str(workdir), "DIR")
  text = re.sub(r"; Convergent Learning passes on [^\n]*?spectral clusters", "", text)
  text = re.sub(r"!\[sparse prediction against λ\]\([^)]*\)\n\n", "", text)
  text = re.sub(r"Convergent learning on the \w+ layer:[^\n]*\n\n", "", text)
  text = re.sub(r"### Convergent learning \(\w+\): .*?\n\n(?=<details><summary>Runs)", "", text, flags=re.S)
  return re.sub(r"\n### Convergent learning\n.*?(?=\n## |\Z)", "", text, flags=re.S)


def _assert_records_close(got, want):
  """Typed records of two computations on the same activations (float rounding apart)."""
  assert [(r.run_a, r.run_b) for r in got["one_to_one"]] == [(r.run_a, r.run_b) for r in want["one_to_one"]]
  for g, w in zip(got["one_to_one"], want["one_to_one"]):
    assert g.units == w.units
    for name in ("greedy_mean", "max_mean", "same_partner_share"):
      assert getattr(g, name) == pytest.approx(getattr(w, name), abs=1e-4)
  for g, w in zip(got["sparse_prediction"], want["sparse_prediction"], strict=True):
    assert g.lambdas == w.lambdas
    np.testing.assert_allclose(g.heldout_loss, w.heldout_loss, atol=1e-3)
    np.testing.assert_allclose(g.mean_units_used, w.mean_units_used, atol=0.2)
  for g, w in zip(got["clusters"], want["clusters"], strict=True):
    assert sorted(map(sorted, [c.units_a + [100 + u for u in c.units_b] for c in g.clusters])) == \
        sorted(map(sorted, [c.units_a + [100 + u for u in c.units_b] for c in w.clusters]))
    assert g.mixed_share == pytest.approx(w.mixed_share)


# ---------------------------------------------------------------------------------------------------
# Settings.


def test_settings_defaults_match_the_pass_and_bad_values_are_one_line_errors():
  s, d = convergent.settings_of(fields.CONVERGENT), convergent.Settings()
  assert not s.enabled and (s.max_inputs, s.lambdas, s.iterations, s.clusters) == \
      (d.max_inputs, d.lambdas, d.iterations, d.clusters)
  listed = dict(fields.CONVERGENT, convergent_lambdas=[0.1, 1])
  assert convergent.settings_of(listed).lambdas == (0.1, 1.0)
  for family in ("group", "lm"):
    cfg = config_lib.default_config(family)
    assert cfg.analysis.convergent is False and set(fields.CONVERGENT) <= set(cfg.analysis)
  with pytest.raises(ValueError, match="config.analysis.convergent: expected True or False, got 1"):
    fields.convergent_values({"convergent": 1})
  for name, value, needle in (("convergent_lambdas", "0.1,-1", "> 0"), ("convergent_inputs", 2, ">= 4"),
                              ("convergent_memory_gb", 0.0, "GB > 0"), ("convergent_pairs", -1, ">= 0")):
    cfg = config_lib.default_config("group")
    cfg.analysis[name] = value
    with pytest.raises(ValueError, match=f"config.analysis.{name}: .*{needle}"):
      config_lib.validate(cfg)
  assert convergent.default_pairs(4, 3) == [(0, 1), (0, 2), (0, 3)]
  assert len(convergent.default_pairs(4, 0)) == 6


def test_command_line_refuses_a_bad_setting_and_writes_nothing(tmp_path):
  work = tmp_path / "w"
  res = subprocess.run([sys.executable, "-m", "universality.experiments.group_universality",
                        f"--workdir={work}", "--config.analysis.convergent=true",
                        "--config.analysis.convergent_lambdas=0.1,-1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 2, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [
      "error: config.analysis.convergent_lambdas: every λ must be finite and > 0, got (0.1, -1.0)"]
  assert not work.exists()


def test_sparse_prediction_in_blocks_equals_the_whole_sweep():
  rng = np.random.default_rng(11)
  acts = rng.normal(size=(3, 90, 9)).astype(np.float32)
  acts[1, :, 4] = acts[0, :, 2] - 0.5 * acts[0, :, 7]
  kw = dict(key=jax.random.key(2), lambdas=[0.01, 0.1], iterations=200)
  whole = convergent.sparse_prediction(acts, **kw)
  for memory in (3_000, 12_000):  # one pair at a time in blocks of units; all pairs in blocks of units
    blocks = convergent._sweep_blocks(3, 2, 9, memory)
    assert blocks is not None and blocks[1] < 9
    part = convergent.sparse_prediction(acts, memory_bytes=memory, **kw)
    np.testing.assert_allclose(part["weights_ZxOxNxN"], whole["weights_ZxOxNxN"], atol=1e-6)
    np.testing.assert_allclose(part["heldout_loss_ZxOxN"], whole["heldout_loss_ZxOxN"], atol=1e-5)
    np.testing.assert_array_equal(part["used_ZxOxN"], whole["used_ZxOxN"])
    assert part["records"][0].mean_units_used == whole["records"][0].mean_units_used
  lean = convergent.sparse_prediction(acts, memory_bytes=12_000, keep_weights=False, **kw)
  assert lean["weights_ZxOxNxN"] is None and lean["records"] == part["records"]


# ---------------------------------------------------------------------------------------------------
# Group family: the hidden layer.


@pytest.fixture(scope="module")
def group_on(tmp_path_factory):
  study = small_study(tmp_path_factory)
  dest = tmp_path_factory.mktemp("conv") / os.path.basename(study)
  out = _relaunch_with(study, dest, **SETTINGS)
  return study, str(dest), out


def test_group_summary_report_and_view(group_on):
  study, on, out = group_on
  summary = rundir.read_summary(on)
  off = rundir.read_summary(study)
  assert summary["settings"]["convergent"] is True and off["settings"]["convergent"] is False
  for name, entry in summary["cohorts"].items():
    conv = entry["aggregate"].pop("convergent")
    # Everything else the analysis wrote is as without the setting.
    assert entry == off["cohorts"][name] and "convergent" not in off["cohorts"][name]["aggregate"]
    hidden = conv["hidden"]
    assert hidden["inputs"] == 32 and hidden["means"]["pairs"] == 2
    assert [(r["run_a"], r["run_b"]) for r in hidden["one_to_one"]] == [(0, 1), (0, 2)]
    assert [r["lambdas"] for r in hidden["sparse_prediction"]] == [[0.01, 0.1]] * 2
    assert all(1 <= len(r["clusters"]) <= 4 for r in hidden["clusters"])
  text = open(out["report"]).read()
  for head in ("one-to-one matching", "sparse prediction", "spectral clusters"):
    assert text.count(f"### Convergent learning (hidden): {head}") == 2
  assert "Convergent Learning passes on 32 sampled inputs, 2 pairs" in text
  for ci, spec in enumerate(("C7", "S3")):
    png = os.path.join(on, "report", f"c{ci}_{spec}_lr0.01_wd1_frac0.6_convergent.png")
    assert f"]({os.path.basename(png)})" in text and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  # With the setting off the report is the one written without it.
  assert _strip(text, on) == open(os.path.join(study, "report", "index.md")).read().replace(study, "DIR")
  with replay.open(on) as run:
    for cohort in summary["cohorts"]:
      sub = run.select(cohort=cohort)
      records = sub.convergent()["hidden"]
      key = convergent.key_of(driver.cohort_key(0, cohort), 0)
      direct = convergent.analyse(sub.hidden(), [(0, 1), (0, 2)], key=key,
                                  settings=convergent.settings_of(summary["settings"]))
      _assert_records_close(records, direct)
      _assert_records_close(sub.compute_convergent()["hidden"], direct)
  with replay.open(study) as run, pytest.raises(ValueError, match="no Convergent Learning records"):
    run.select(group="C7").convergent()


# ---------------------------------------------------------------------------------------------------
# Language-model family: every MLP layer.


def test_lm_summary_report_and_view(tmp_path):
  cfg = lm_config(_write_corpus(tmp_path / "c"), steps=20, eval_every=10, num_checkpoints=3)
  cfg.seeds = 3
  cfg.exec.analyze = True
  cfg.analysis.tokens = 512
  # Inputs above one window (16 bytes) and a solver bound that takes b's 32 units in blocks.
  cfg.analysis.update(dict(SETTINGS, convergent_inputs=40, convergent_memory_gb=1e-5))
  on_dir, off_dir = tmp_path / "on" / "study", tmp_path / "off" / "study"  # one name: the report's title
  out = launch.run_study(cfg, str(on_dir), progress=False)
  # The same run directory analysed and reported with the setting off.
  shutil.copytree(on_dir, off_dir, ignore=shutil.ignore_patterns(".lock"))
  with replay.open(str(off_dir)) as run:
    off = driver.analyze(run, tokens=512)
    report.write_report_of(run)
  summary = rundir.read_summary(str(on_dir))
  assert summary["settings"]["convergent"] is True and off["settings"]["convergent"] is False
  (name, entry), = summary["cohorts"].items()
  conv = entry["aggregate"].pop("convergent")
  assert entry == off["cohorts"][name]
  assert sorted(conv) == ["layer0", "layer1"]
  for layer in conv.values():
    assert layer["inputs"] == 40
    assert [(r["run_a"], r["run_b"]) for r in layer["one_to_one"]] == [(0, 1), (0, 2)]
  text = open(out["report"]).read()
  assert "### Convergent learning" in text and "| layer0 | 2 |" in text and "| layer1 | 2 |" in text
  assert text.count("#### Convergent learning (layer1): sparse prediction") == 1
  assert "](c0_lm_lr0.003_wd0.1_convergent.png)" in text
  assert (on_dir / "report" / "c0_lm_lr0.003_wd0.1_convergent.png").stat().st_size > 5000
  off_report = open(off_dir / "report" / "index.md").read()
  assert "onvergent" not in off_report
  assert _strip(text, on_dir) == off_report.replace(str(off_dir), "DIR")
  with replay.open(str(on_dir)) as run:
    records = run.convergent()
    text_bytes = run.convergent_text()
    assert len(text_bytes) == 48  # three whole windows of 16 bytes hold the 40 inputs
    acts = run.activations(text_bytes)["mlp_post"]
    key = driver.cohort_key(0, name)
    settings = convergent.settings_of(summary["settings"])
    for j in range(2):
      direct = convergent.analyse(acts[:, :, j], [(0, 1), (0, 2)], key=convergent.key_of(key, j),
                                  settings=settings)
      _assert_records_close(records[f"layer{j}"], direct)
    recomputed = run.compute_convergent()
    for j in range(2):
      _assert_records_close(recomputed[f"layer{j}"], records[f"layer{j}"])
