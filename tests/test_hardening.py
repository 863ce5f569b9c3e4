"""Bad input and damaged run directories: size limits, damaged metrics, silent checkpoint corruption, one-line
errors. Every refusal is checked for its one line, its exit status and a run directory left byte for byte."""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from universality.engine import budget, checkpoint, launch, replay, rundir, train
from universality.engine import config as config_lib
from tests.helpers import group_config, set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.task.groups=C5", "--config.seeds=2", "--config.model.mlp.embed_dim=8",
         "--config.model.mlp.hidden=8", "--config.steps=40", "--config.eval_every=10",
         "--config.num_checkpoints=3", "--config.opt.lr=1e-3", "--config.task.train_frac=0.4"]


def tiny_config(**overrides):
  """The study of FLAGS: C5, two seeds, 40 steps, checkpoints at steps 0, 10 and 40."""
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 40, 10, 3
  return set_fields(cfg, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny study; tests copy it before touching it."""
  workdir = tmp_path_factory.mktemp("hardening") / "study"
  launch.run_study(tiny_config(), str(workdir), progress=False)
  return workdir


@pytest.fixture
def study(finished, tmp_path):
  workdir = tmp_path / "study"
  shutil.copytree(finished, workdir)
  return workdir


def snapshot(workdir) -> dict[str, bytes]:
  """Every file of a directory tree by relative path, with its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, workdir)] = f.read()
  return out


def final_params(workdir, step=None):
  trainer = train.make_train(tiny_config())
  with checkpoint.Checkpointer(os.path.join(workdir, rundir.CHECKPOINTS), read_only=True) as ckpt:
    at, state = ckpt.restore(train.host_state_spec(trainer), step=step, fallback=False)
  return at, jax.tree.map(np.asarray, state)


# The peak RSS from VmHWM, not ru_maxrss: the latter keeps the forking test process's own peak across exec, so
# late in a suite it reports the pytest worker's memory rather than the launch's.
_MEASURED = ("import atexit, os, resource, runpy, sys; "
             "peak = lambda: ([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')] "
             "if os.path.exists('/proc/self/status') else [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss])[0]; "
             "atexit.register(lambda: sys.stderr.write(f'maxrss_kb={peak()}\\n')); "
             "sys.argv = ['group_universality'] + sys.argv[1:]; "
             "runpy.run_module('universality.experiments.group_universality', run_name='__main__')")


def cli(workdir, *flags, timeout=120):
  """The entry point in a fresh process, which reports its own peak RSS on exit. Returns (result, error
  lines, peak RSS in bytes, seconds)."""
  cmd = [sys.executable, "-c", _MEASURED, f"--workdir={workdir}", "--noprogress", "--noanalyze", *flags]
  t0 = time.perf_counter()
  res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=timeout)
  seconds = time.perf_counter() - t0
  lines = [l for l in res.stderr.splitlines() if not l.startswith("maxrss_kb=")]
  rss = [int(l.split("=")[1]) * 1024 for l in res.stderr.splitlines() if l.startswith("maxrss_kb=")]
  return res, lines, (rss[0] if rss else None), seconds


# ---------------------------------------------------------------------------------------------------
# 1. The size of a launch.


@pytest.mark.parametrize("flags,needle", [
    (["--config.task.groups=C5", "--config.seeds=10000000"], "10000000 runs"),
    (["--config.task.groups=S7", "--config.seeds=1"], "activations of one step 1.3 TB"),
])
def test_launch_too_large_is_refused_fast_and_small(tmp_path, flags, needle):
  res, lines, rss, seconds = cli(tmp_path / "w", *flags)
  assert res.returncode == 2, res.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: launch needs about") and needle in lines[0], lines
  assert "memory_budget_gb" in lines[0]
  assert rss is not None and rss < 2 * 2**30, rss
  assert seconds < 30, seconds  # a few seconds of which most is importing JAX; nothing is built
  assert not (tmp_path / "w").exists()


def test_budget_flag_refuses_then_admits_and_never_touches_the_run_directory(study, tmp_path):
  before = snapshot(study)
  with pytest.raises(budget.BudgetError, match=r"^launch needs about .* \(config.exec.memory_budget_gb\)"):
    launch.run_study(tiny_config(steps=60, **{"exec.memory_budget_gb": 1e-6}), str(study), progress=False)
  assert snapshot(study) == before  # refused before the lock, config.json or a checkpoint is touched
  fresh = tmp_path / "fresh"
  with pytest.raises(budget.BudgetError):
    launch.run_study(tiny_config(**{"exec.memory_budget_gb": 1e-6}), str(fresh), progress=False)
  assert not fresh.exists()
  out = launch.run_study(tiny_config(**{"exec.memory_budget_gb": 1.0}), str(fresh), progress=False)
  assert out["step"] == 40 and (fresh / rundir.CONFIG).exists()


def test_estimate_counts_runs_without_building_them():
  cfg = tiny_config(seeds=10**7, lr="1e-3,1e-2")
  est = budget.estimate(cfg, n_devices=8, on_cpu=True)
  assert est.n_runs == 2 * 10**7 and est.runs_per_device == 2 * 10**7 // 8
  one = budget.estimate(tiny_config(seeds=1), n_devices=1, on_cpu=True)
  stacked = jax.eval_shape(train.make_train(tiny_config(seeds=1)).init)  # over the padded runs
  state = sum(x.size // x.shape[0] * x.dtype.itemsize for x in jax.tree.leaves((stacked.params,
                                                                                  stacked.opt_state)))
  assert one.state == state  # the model's and the optimiser's own init, abstractly
  with pytest.raises(ValueError, match="memory_budget_gb"):
    config_lib.validate(tiny_config(**{"exec.memory_budget_gb": -1.0}))


class _FakeAccelerator:
  platform, process_index = "gpu", 0

  def __init__(self, bytes_limit):
    self.bytes_limit = bytes_limit

  def memory_stats(self):
    return {"bytes_limit": self.bytes_limit}


def test_accelerator_budget_is_the_smallest_device_limit(monkeypatch):
  cfg = tiny_config(seeds=64)
  est = budget.estimate(cfg, n_devices=2, on_cpu=False)
  assert est.runs_per_device == 32  # on accelerators all runs of a device are vmapped together:
  assert est.device == 32 * (est.state + est.data) + 32 * (2 * est.state + est.step)
  monkeypatch.setattr(budget, "host_ram_available", lambda: 10 * est.host)
  assert budget.check(cfg, [_FakeAccelerator(est.device + 1), _FakeAccelerator(10**12)]) == est
  with pytest.raises(budget.BudgetError, match=r"per device but the budget is .* \(device memory\)"):
    budget.check(cfg, [_FakeAccelerator(10**12), _FakeAccelerator(est.device - 1)])
  monkeypatch.setattr(budget, "host_ram_available", lambda: est.host - 1)
  with pytest.raises(budget.BudgetError, match=r"in host RAM but the budget is .* \(host RAM available\)"):
    budget.check(cfg, [_FakeAccelerator(10**12)] * 2)


def test_launch_that_crashes_at_startup_leaves_no_config(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise ValueError("cannot build the task")
  monkeypatch.setattr(launch.train_lib, "make_train", broken)
  with pytest.raises(ValueError, match="cannot build the task"):
    launch.run_study(tiny_config(), str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w" / rundir.CONFIG).exists()
  monkeypatch.undo()
  # The directory is not bound to the study that never started: another config launches in it.
  assert launch.run_study(tiny_config(seeds=1), str(tmp_path / "w"), progress=False)["step"] == 40


def test_replay_refuses_config_that_disagrees_with_runs_or_checkpoint(study):
  stored = json.loads((study / rundir.CONFIG).read_text())
  stored["config"]["seeds"] = 10**7
  (study / rundir.CONFIG).write_text(json.dumps(stored))
  before = snapshot(study)
  t0 = time.perf_counter()
  with pytest.raises(rundir.RunDirError, match="describes 10000000 runs but runs.json lists 2"):
    replay.open(str(study))
  assert time.perf_counter() - t0 < 5
  assert snapshot(study) == before
  stored["config"]["seeds"] = 2
  stored["config"]["model"]["mlp"]["hidden"] = 16  # same run count, other shapes than the checkpoint's
  (study / rundir.CONFIG).write_text(json.dumps(stored))
  before = snapshot(study)
  with replay.open(str(study)) as run:
    with pytest.raises(rundir.RunDirError, match=r"checkpoint 40 does not match config.json .*\(2, 8, 5\)"):
      run.params()
  assert snapshot(study) == before


# ---------------------------------------------------------------------------------------------------
# 2. metrics.jsonl: damaged lines.


def test_damaged_metrics_lines_are_kept_aside_and_the_cut_last_line_is_recomputed(study, capsys):
  lines = (study / rundir.METRICS).read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [10, 20, 30, 40]
  damaged = "\n".join([lines[0], "{not json", lines[2], lines[3][: len(lines[3]) // 2]])
  (study / rundir.METRICS).write_text(damaged)
  assert rundir.read_metrics(str(study))["step"].tolist() == [10, 30]  # readers skip, never stop
  capsys.readouterr()
  launch.run_study(tiny_config(), str(study), progress=False)
  printed = capsys.readouterr().out
  assert "2 damaged line(s) of metrics.jsonl skipped (line 2, 4)" in printed
  assert "Recomputed the metrics of step 40 from its checkpoint" in printed
  aside = [p for p in os.listdir(study) if p.startswith(rundir.METRICS + rundir.DAMAGED_SUFFIX)]
  assert len(aside) == 1 and (study / aside[0]).read_text() == damaged  # the file as found, byte for byte
  now = (study / rundir.METRICS).read_text().splitlines()
  assert now[:2] == [lines[0], lines[2]]  # every valid line survives unchanged
  original, recomputed = json.loads(lines[3]), json.loads(now[2])
  assert recomputed["step"] == 40 and recomputed.keys() == original.keys()
  for k in ("train_loss", "train_acc", "test_loss", "test_acc", "diverged"):
    np.testing.assert_array_equal(recomputed[k], original[k])
  with replay.open(str(study)) as run:  # what the summary's "final" is read from
    assert all(m is not None and m["test_acc"] == v
               for m, v in zip(run.metrics_at(40).values(), original["test_acc"]))


# ---------------------------------------------------------------------------------------------------
# 3. Checkpoint checksums.


def _data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
           if os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def test_flipped_bytes_in_newest_checkpoint_are_caught_and_resume_is_bit_identical(study, capsys):
  step, uninterrupted = final_params(study)
  assert step == 40 and rundir.verify_checksums(str(study / rundir.CHECKPOINTS / "40")) is None
  target = _data_file(study / rundir.CHECKPOINTS / "40")
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
  open(target, "wb").write(bytes(data))
  capsys.readouterr()
  launch.run_study(tiny_config(), str(study), progress=False)
  printed = capsys.readouterr().out.splitlines()
  warning = [l for l in printed if "corrupt" in l]
  assert warning == [f"WARNING: checkpoint 40 is corrupt (checksum mismatch in "
                     f"{os.path.relpath(target, study / rundir.CHECKPOINTS / '40')}); falling back to the "
                     "previous one"]
  assert "Resuming from checkpoint at step 10" in printed
  assert [p.split("-")[0] for p in os.listdir(study / rundir.CORRUPT_CHECKPOINTS)] == ["40"]
  step, resumed = final_params(study)
  assert step == 40
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  assert rundir.verify_checksums(str(study / rundir.CHECKPOINTS / "40")) is None  # the new one is sealed


def test_checkpoints_without_checksums_restore_and_corrupt_ones_fail_in_one_line(study):
  for step in ("0", "10", "40"):
    os.remove(study / rundir.CHECKPOINTS / step / rundir.CHECKSUMS)  # as written by an older engine
  with checkpoint.Checkpointer(study / rundir.CHECKPOINTS, read_only=True) as ckpt:
    trainer = train.make_train(tiny_config())
    assert ckpt.restore(train.host_state_spec(trainer))[0] == 40
  for root, _, files in os.walk(study / rundir.CHECKPOINTS / "40" / "state"):
    for name in files:
      if os.path.basename(root) == "d":  # the array data, not Orbax's metadata
        os.truncate(os.path.join(root, name), 100)
  res, err, _, _ = cli(study, *FLAGS)  # a process of its own: pytest would catch what it prints otherwise
  assert res.returncode == 0, res.stderr[-2000:]
  assert len([l for l in res.stdout.splitlines() if "is corrupt" in l]) == 1
  assert "Resuming from checkpoint at step 10" in res.stdout
  assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# 4. One-line errors.


def _write(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("case", ["unknown_field", "missing_file", "syntax_error", "no_get_config"])
def test_cli_config_errors_are_one_line_exit_2(study, tmp_path, case):
  flags, needle = {
      "unknown_field": (["--config.grups=S5"], "--config.grups: no such config field (did you mean "
                                               "--config.task.groups?)"),
      "missing_file": ([f"--config={tmp_path / 'nope.py'}"], "no such config file"),
      "syntax_error": ([f"--config={_write(tmp_path / 'bad.py', 'def get_config(:')}"], "syntax error in"),
      "no_get_config": ([f"--config={_write(tmp_path / 'none.py', 'x = 1')}"], "does not define get_config()"),
  }[case]
  before = snapshot(study)
  res, lines, _, _ = cli(study, *flags)
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
  assert lines[0].startswith("error: ") and needle in lines[0], lines
  assert snapshot(study) == before


def test_replay_open_refuses_missing_or_empty_runs(study):
  os.remove(study / rundir.RUNS)
  with pytest.raises(rundir.RunDirError, match=r"is not a run directory \(no runs.json\)"):
    replay.open(str(study))
  (study / rundir.RUNS).write_text("[]\n")
  before = snapshot(study)
  with pytest.raises(rundir.RunDirError, match="runs.json lists no run"):
    replay.open(str(study))
  with pytest.raises(rundir.RunDirError, match="not a run directory"):
    replay.open(str(study / "nowhere"))
  assert snapshot(study) == before


def test_apply_refuses_empty_inputs_and_batch_size_zero(finished):
  with replay.open(str(finished)) as run:
    empty = np.zeros((0,), np.int32)
    with pytest.raises(ValueError, match=r"^apply: no inputs \(B = 0\)"):
      run.apply(None, (empty, empty))
    for bad in (0, -1, 1.5, True):
      with pytest.raises(ValueError, match=r"^apply: batch_size must be a positive integer or None"):
        run.apply(None, batch_size=bad)
    logits, _ = run.apply(None, batch_size=7)  # 25 pairs in batches of 7
    np.testing.assert_array_equal(logits, run.apply(None)[0])
