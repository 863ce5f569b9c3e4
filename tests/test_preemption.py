"""Preemption: SIGTERM stops a launch at the end of an eval interval with a checkpoint, one process or
two (every process stops at the same step), and the relaunch equals an uninterrupted run bit for bit."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from universality.engine import checkpoint, launch, replay, rundir, train
from universality.engine import config as config_lib
from tests.helpers import group_config, set_fields
from tests.test_launch import ROOT, _cli
from tests.test_launch_distributed import _env, _free_port

# About 0.1-0.3 s per eval interval on a 2-core CPU: a signal lands mid-interval, not in the start-up.
FLAGS = ["--config.task.groups=C11", "--config.seeds=2", "--config.model.mlp.embed_dim=16",
         "--config.model.mlp.hidden=16", "--config.steps=2400", "--config.eval_every=200",
         "--config.num_checkpoints=4"]
STOPPED = re.compile(r"^preempted: (SIG\w+): stopped at step (\d+) with a checkpoint; relaunch the same "
                     r"command to resume$")


def _config():
  cfg = group_config(groups="C11", embed_dim=16, hidden=16, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 2400, 200, 4
  return cfg


def _newest_state(workdir, cfg):
  trainer = train.make_train(cfg)
  with checkpoint.Checkpointer(os.path.join(workdir, rundir.CHECKPOINTS), read_only=True) as ckpt:
    step, state = ckpt.restore(train.host_state_spec(trainer), fallback=False)
  return step, jax.tree.map(np.asarray, state)


def _logged_steps(workdir):
  path = os.path.join(workdir, rundir.METRICS)
  return rundir.read_metrics(str(workdir))["step"].tolist() if os.path.exists(path) else []


def _wait_for_step(procs, workdir, at_least, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert all(p.poll() is None for p in procs), "a process ended before it could be signalled"
    steps = _logged_steps(workdir)
    if steps and steps[-1] >= at_least:
      return steps[-1]
    time.sleep(0.01)
  raise AssertionError(f"no step {at_least} logged in {timeout} s")


def _stopped_at(stderr):
  lines = [l for l in stderr.splitlines() if l.startswith("preempted:")]
  assert len(lines) == 1 and STOPPED.match(lines[0]), stderr[-2000:]
  return STOPPED.match(lines[0]).group(1), int(STOPPED.match(lines[0]).group(2))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  whole = tmp_path_factory.mktemp("preemption") / "whole"
  res = _cli(whole, *FLAGS)
  assert res.returncode == 0, res.stderr[-2000:]
  return whole


def _launch(workdir, *flags):
  cmd = [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={workdir}", "--noprogress",
         "--noanalyze", *FLAGS, *flags]
  return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _relaunch_equals(workdir, whole, *flags):
  """Relaunches ``workdir``; its final state, metrics and analysis checkpoints equal ``whole``'s."""
  res = _cli(workdir, *FLAGS, *flags)
  assert res.returncode == 0, res.stderr[-2000:]
  step_a, a = _newest_state(whole, _config())
  step_b, b = _newest_state(workdir, _config())
  assert step_a == step_b == 2400
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ma, mb = rundir.read_metrics(str(whole)), rundir.read_metrics(str(workdir))
  for k in ma:
    np.testing.assert_array_equal(ma[k], mb[k])
  # The analysis checkpoints are those of the uninterrupted run: resume checkpoints added none.
  assert sorted(os.listdir(workdir / rundir.CHECKPOINTS)) == sorted(os.listdir(whole / rundir.CHECKPOINTS))
  return res


def _dirs(workdir, name):
  return sorted(os.listdir(workdir / name)) if (workdir / name).exists() else []


def test_sigterm_stops_at_interval_end_with_checkpoint_and_relaunch_is_bit_identical(uninterrupted, tmp_path):
  stopped = tmp_path / "stopped"
  proc = _launch(stopped)
  last = _wait_for_step([proc], stopped, 600)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == launch.PREEMPTED_EXIT, err[-2000:]
  name, step = _stopped_at(err)
  # The interval under way when the signal came is finished, no further one is begun.
  assert name == "SIGTERM" and step in (last, last + 200) and step < 2400, (last, step)
  assert _logged_steps(stopped)[-1] == step  # metrics flushed up to the stop
  # A checkpoint at that step: the resume checkpoint, or the analysis one when the step is on its schedule.
  kind = rundir.CHECKPOINTS if str(step) in _dirs(stopped, rundir.CHECKPOINTS) else rundir.RESUME_CHECKPOINTS
  assert _dirs(stopped, rundir.RESUME_CHECKPOINTS) == ([] if kind == rundir.CHECKPOINTS else [str(step)])
  assert rundir.verify_checksums(str(stopped / kind / str(step))) is None  # committed and sealed
  assert "Traceback" not in err
  res = _relaunch_equals(stopped, uninterrupted)
  assert f"Resuming from checkpoint at step {step}" in res.stdout


def test_sigkill_loses_at_most_the_resume_interval(uninterrupted, tmp_path):
  killed = tmp_path / "killed"
  proc = _launch(killed, "--config.exec.resume_every_steps=400")
  deadline = time.time() + 240
  while not any(int(s) >= 1000 for s in _dirs(killed, rundir.RESUME_CHECKPOINTS) if s.isdigit()):
    assert proc.poll() is None and time.time() < deadline, "no resume checkpoint at step 1000 or later"
    time.sleep(0.01)
  proc.kill()
  proc.communicate()
  logged = _logged_steps(killed)[-1]
  assert logged < 2400, "the run finished before it could be killed"
  res = _relaunch_equals(killed, uninterrupted, "--config.exec.resume_every_steps=400")
  resumed = int(re.search(r"Resuming from checkpoint at step (\d+)", res.stdout).group(1))
  assert logged - resumed <= 400, (logged, resumed)
  assert _dirs(killed, rundir.RESUME_CHECKPOINTS) == ["2000"]  # only the newest is kept


def test_two_processes_signalled_at_different_moments_stop_at_one_step(tmp_path):
  workdir = tmp_path / "multi"
  port = _free_port()
  flags = [f.replace("seeds=2", "seeds=4") for f in FLAGS]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={workdir}", *flags, "--noprogress",
       "--noanalyze", "--distributed", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  try:
    _wait_for_step(procs, workdir, 400)
    procs[1].send_signal(signal.SIGTERM)  # process 1 alone: process 0 learns of it through the collective
    time.sleep(0.3)
    if procs[0].poll() is None:
      procs[0].send_signal(signal.SIGTERM)  # the same notice later, in this interval, the next, or after
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == launch.PREEMPTED_EXIT, err[-3000:]
  (name_0, step_0), (name_1, step_1) = (_stopped_at(err) for _, err in outs)
  assert name_0 == name_1 == "SIGTERM" and step_0 == step_1 < 2400
  assert _logged_steps(workdir)[-1] == step_0
  kind = rundir.CHECKPOINTS if str(step_0) in _dirs(workdir, rundir.CHECKPOINTS) else rundir.RESUME_CHECKPOINTS
  assert rundir.verify_checksums(str(workdir / kind / str(step_0))) is None


def test_sigint_in_process_raises_preempted_restores_handlers_and_resumes(tmp_path):
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 1, 3000, 100, 3
  workdir = tmp_path / "w"

  def interrupt_once_logging():
    while len(_logged_steps(workdir)) < 2:
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGINT)

  before = signal.getsignal(signal.SIGINT)
  threading.Thread(target=interrupt_once_logging, daemon=True).start()
  with pytest.raises(launch.Preempted, match=r"^SIGINT: stopped at step \d+ with a checkpoint") as e:
    launch.run_study(cfg, str(workdir), progress=False)
  assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is Python's again once training stopped
  step = e.value.step
  assert step < 3000 and str(step) in _dirs(workdir, rundir.CHECKPOINTS) + _dirs(workdir, rundir.RESUME_CHECKPOINTS)
  assert launch.run_study(cfg, str(workdir), progress=False)["step"] == 3000


def test_a_signal_during_restore_stops_before_training(tmp_path, monkeypatch):
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 1, 3000, 100, 3
  workdir = tmp_path / "w"

  def terminate_once_logging():
    while len(_logged_steps(workdir)) < 2:
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_once_logging, daemon=True).start()
  with pytest.raises(launch.Preempted) as first:
    launch.run_study(cfg, str(workdir), progress=False)
  logged = (workdir / rundir.METRICS).read_text()
  real = checkpoint.restore_newest

  def signalled(*args, **kwargs):  # SIGTERM arrives while the checkpoint is read
    found = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return found

  monkeypatch.setattr(checkpoint, "restore_newest", signalled)
  with pytest.raises(launch.Preempted, match=rf"^SIGTERM: stopped at step {first.value.step} with a checkpoint"):
    launch.run_study(cfg, str(workdir), progress=False)
  assert (workdir / rundir.METRICS).read_text() == logged  # not one step trained after the signal
  monkeypatch.setattr(checkpoint, "restore_newest", real)
  assert launch.run_study(cfg, str(workdir), progress=False)["step"] == 3000


def test_resume_checkpoints_by_time_are_never_analysed_and_a_corrupt_one_falls_back(tmp_path, capsys):
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 1, 400, 20, 3
  for field, bad in (("resume_every_minutes", -1.0), ("resume_every_minutes", float("inf")),
                     ("resume_every_steps", -5)):
    with pytest.raises(ValueError, match=f"^config.exec.{field}: "):
      config_lib.validate(set_fields(group_config(), **{f"exec.{field}": bad}))
  cfg.exec.resume_every_minutes = 1e-9  # due after every interval
  workdir = tmp_path / "w"
  launch.run_study(cfg, str(workdir), progress=False)
  schedule = checkpoint.log_spaced_steps(400, 3, 20)
  assert _dirs(workdir, rundir.RESUME_CHECKPOINTS) == ["380"]  # the newest off the schedule, alone
  assert rundir.verify_checksums(str(workdir / rundir.RESUME_CHECKPOINTS / "380")) is None
  with replay.open(str(workdir)) as run:
    assert run.steps == schedule
  # A resume checkpoint newer than every analysis checkpoint and corrupt: reported, moved aside, the newest
  # analysis checkpoint used.
  os.rename(workdir / rundir.CHECKPOINTS / "400", tmp_path / "400")  # now 380 (resume) is the newest
  target = max((os.path.join(r, f) for r, _, fs in os.walk(workdir / rundir.RESUME_CHECKPOINTS / "380")
                for f in fs if os.path.basename(r) == "d"), key=os.path.getsize)
  data = bytearray(open(target, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(target, "wb").write(bytes(data))
  capsys.readouterr()
  launch.run_study(cfg, str(workdir), progress=False)
  printed = capsys.readouterr().out
  assert "WARNING: resume checkpoint 380 is corrupt (checksum mismatch" in printed
  assert f"Resuming from checkpoint at step {schedule[-2]}" in printed
  assert [p.rsplit("-", 2)[0] for p in os.listdir(workdir / rundir.CORRUPT_CHECKPOINTS)] == ["resume-380"]
