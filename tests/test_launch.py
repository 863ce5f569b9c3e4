"""universality.engine.launch and universality.engine.checkpoint: resume bit for bit after SIGKILL, corrupt checkpoints, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from universality.engine import checkpoint, config as config_lib, launch, rundir, train
from tests.helpers import group_config, set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  cfg = group_config(groups="C7,S3", embed_dim=16, hidden=8, analyze=False)
  cfg.seeds = 2
  cfg.steps = 60
  cfg.eval_every = 10
  cfg.num_checkpoints = 4
  return set_fields(cfg, **overrides)


def _final_params(workdir, cfg):
  trainer = train.make_train(cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  step, state = ckpt.restore(train.host_state_spec(trainer), fallback=False)
  ckpt.close()
  return step, jax.tree.map(np.asarray, state)


def _cli(workdir, *flags, timeout=300):
  cmd = [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={workdir}", "--noprogress",
         "--noanalyze", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_log_spaced_steps():
  steps = checkpoint.log_spaced_steps(10000, 12, 10)
  assert steps[0] == 0 and steps[-1] == 10000
  assert all(s % 10 == 0 for s in steps) and steps == sorted(set(steps))
  gaps = np.diff(steps[1:])
  assert (gaps[1:] >= gaps[:-1]).all()  # gaps grow: dense early, sparse late
  with pytest.raises(ValueError):
    checkpoint.log_spaced_steps(0, 3)


def test_run_study_writes_workdir_and_resume_is_noop(tmp_path):
  cfg = small_config()
  out = launch.run_study(cfg, str(tmp_path), progress=False)
  assert out["step"] == cfg.steps
  rows = json.loads((tmp_path / "runs.json").read_text())
  assert [r["group"] for r in rows] == ["C7"] * 2 + ["S3"] * 2
  metrics = rundir.read_metrics(str(tmp_path))
  assert metrics["step"].tolist() == list(range(10, 61, 10))
  assert metrics["test_acc"].shape == (6, 4)
  assert checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True).steps() == \
      checkpoint.log_spaced_steps(60, 4, 10)
  # A second launch of a finished study trains nothing and leaves the metrics alone.
  before = (tmp_path / "metrics.jsonl").read_text()
  launch.run_study(cfg, str(tmp_path), progress=False)
  assert (tmp_path / "metrics.jsonl").read_text() == before


def test_sigkill_midrun_then_relaunch_equals_uninterrupted(tmp_path):
  flags = ["--config.task.groups=C11", "--config.seeds=2", "--config.model.mlp.embed_dim=16",
           "--config.model.mlp.hidden=16",
           "--config.steps=4000", "--config.eval_every=5", "--config.num_checkpoints=40"]
  whole = tmp_path / "whole"
  res = _cli(whole, *flags)
  assert res.returncode == 0, res.stderr[-2000:]

  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={killed}", "--noprogress",
         "--noanalyze", *flags]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckdir = killed / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    done = [int(p) for p in os.listdir(ckdir) if p.isdigit()] if ckdir.exists() else []
    if done and max(done) >= 200:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  partial = rundir.read_metrics(str(killed))["step"]
  assert partial[-1] < 4000

  res = _cli(killed, *flags)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "Resuming from checkpoint" in res.stdout
  cfg = small_config(groups="C11", hidden=16, steps=4000, eval_every=5, num_checkpoints=40)
  step_a, a = _final_params(whole, cfg)
  step_b, b = _final_params(killed, cfg)
  assert step_a == step_b == 4000
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
  ma, mb = rundir.read_metrics(str(whole)), rundir.read_metrics(str(killed))
  np.testing.assert_array_equal(ma["step"], mb["step"])
  np.testing.assert_array_equal(ma["train_loss"], mb["train_loss"])


def test_corrupt_latest_checkpoint_falls_back_loudly(tmp_path, capsys):
  cfg = small_config()
  launch.run_study(cfg, str(tmp_path), progress=False)
  steps = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True).steps()
  latest = tmp_path / "checkpoints" / str(steps[-1])
  for root, _, files in os.walk(latest / "state"):
    for name in files:
      path = os.path.join(root, name)
      data = open(path, "rb").read()
      open(path, "wb").write(data[: len(data) // 2])
  capsys.readouterr()
  out = launch.run_study(cfg, str(tmp_path), progress=False)
  printed = capsys.readouterr().out
  assert f"checkpoint {steps[-1]} is corrupt" in printed
  assert f"Resuming from checkpoint at step {steps[-2]}" in printed
  assert out["step"] == cfg.steps
  assert (tmp_path / "corrupt_checkpoints").is_dir()  # kept for inspection, not deleted
  assert checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True).steps() == steps


def test_second_launch_on_locked_workdir_is_refused(tmp_path):
  cfg = small_config()
  os.makedirs(tmp_path, exist_ok=True)
  with rundir.lock(str(tmp_path)):
    with pytest.raises(launch.LaunchError, match="in use by another launch"):
      launch.run_study(cfg, str(tmp_path), progress=False)


def test_different_config_on_existing_workdir_is_refused_and_kept(tmp_path):
  cfg = small_config(steps=20)
  launch.run_study(cfg, str(tmp_path), progress=False)
  before = {p: (tmp_path / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
  with pytest.raises(launch.LaunchError, match=r"different config \(differs in: seeds\)"):
    launch.run_study(small_config(steps=20, seeds=3), str(tmp_path), progress=False)
  assert {p: (tmp_path / p).read_bytes() for p in before} == before


@pytest.mark.parametrize("flag,needle", [
    ("--config.task.groups=Z5", "groups"),
    ("--config.seeds=0", "seeds"),
    ("--config.task.train_frac=1.5", "train_frac"),
    ("--config.steps=0", "steps"),
])
def test_cli_bad_input_one_line_error(tmp_path, flag, needle):
  res = _cli(tmp_path / "w", flag, timeout=120)
  assert res.returncode != 0
  err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1 and needle in err[0], res.stderr[-1000:]
  assert not (tmp_path / "w" / "config.json").exists()


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(launch.LaunchError, match="cannot create workdir"):
    launch.run_study(small_config(), str(blocker / "run"), progress=False)


def test_train_frac_by_group_overrides_the_sweep():
  cfg = small_config(groups="C7,S3,D4", train_frac="0.3,0.5", train_frac_by_group="S3=0.8")
  rows = config_lib.runs(cfg)
  fracs = {(r["group"], r["train_frac"]) for r in rows}
  assert fracs == {("C7", 0.3), ("C7", 0.5), ("S3", 0.8), ("D4", 0.3), ("D4", 0.5)}
  assert len(rows) == (2 + 1 + 2) * cfg.seeds
  for bad, needle in [("S4=0.5", "not in config.task.groups"), ("S3=1.5", "cannot read"), ("S3", "cannot read")]:
    with pytest.raises(ValueError, match=needle):
      config_lib.validate(small_config(groups="C7,S3", train_frac_by_group=bad))


def test_diverging_member_is_named_in_metrics_and_log(tmp_path, capsys):
  cfg = small_config(groups="C7", lr="1e-2,1e3", steps=40)
  launch.run_study(cfg, str(tmp_path), progress=False)
  printed = capsys.readouterr().out
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  named = [n for rec in lines for n in rec["newly_diverged"]]
  assert named and all("lr1000" in n for n in named)
  assert len(set(named)) == len(named)  # each divergence is reported once
  for n in named:
    assert f"run {n} diverged" in printed
  final = lines[-1]
  assert final["diverged"] == [0.0, 0.0, 1.0, 1.0]
  assert all(np.isfinite(final["train_loss"][:2]))
