"""Preemption: SIGTERM stops a launch at the end of an eval interval with a resume checkpoint, one process or
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

from engine import checkpoint, launch, rundir, train
from tests.helpers import group_config
from tests.test_launch import ROOT, _cli
from tests.test_launch_distributed import _env, _free_port

# About 0.1-0.3 s per eval interval on a 2-core CPU: a signal lands mid-interval, not in the start-up.
FLAGS = ["--config.task.groups=C11", "--config.seeds=2", "--config.model.mlp.embed_dim=16",
         "--config.model.mlp.hidden=16", "--config.steps=2400", "--config.eval_every=200",
         "--config.num_checkpoints=4"]
STOPPED = re.compile(r"^preempted: (SIG\w+): stopped at step (\d+) with a resume checkpoint; relaunch the same "
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


def test_sigterm_stops_at_interval_end_with_checkpoint_and_relaunch_is_bit_identical(tmp_path):
  whole = tmp_path / "whole"
  res = _cli(whole, *FLAGS)
  assert res.returncode == 0, res.stderr[-2000:]

  stopped = tmp_path / "stopped"
  cmd = [sys.executable, "-m", "experiments.group_universality", f"--workdir={stopped}", "--noprogress",
         "--noanalyze", *FLAGS]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  last = _wait_for_step([proc], stopped, 600)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == launch.PREEMPTED_EXIT, err[-2000:]
  name, step = _stopped_at(err)
  # The interval under way when the signal came is finished, no further one is begun.
  assert name == "SIGTERM" and step in (last, last + 200) and step < 2400, (last, step)
  assert _logged_steps(stopped)[-1] == step  # metrics flushed up to the stop
  resume_dir = stopped / rundir.RESUME_CHECKPOINTS
  assert sorted(os.listdir(resume_dir)) == [str(step)]
  assert rundir.verify_checksums(str(resume_dir / str(step))) is None  # committed and sealed
  assert "Traceback" not in err

  res = _cli(stopped, *FLAGS)
  assert res.returncode == 0, res.stderr[-2000:]
  assert f"Resuming from checkpoint at step {step}" in res.stdout
  step_a, a = _newest_state(whole, _config())
  step_b, b = _newest_state(stopped, _config())
  assert step_a == step_b == 2400
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ma, mb = rundir.read_metrics(str(whole)), rundir.read_metrics(str(stopped))
  for k in ma:
    np.testing.assert_array_equal(ma[k], mb[k])
  # The analysis checkpoints are those of the uninterrupted run: the stop added none.
  assert sorted(os.listdir(stopped / rundir.CHECKPOINTS)) == sorted(os.listdir(whole / rundir.CHECKPOINTS))


def test_two_processes_signalled_at_different_moments_stop_at_one_step(tmp_path):
  workdir = tmp_path / "multi"
  port = _free_port()
  flags = [f.replace("seeds=2", "seeds=4") for f in FLAGS]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.group_universality", f"--workdir={workdir}", *flags, "--noprogress",
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
  assert sorted(os.listdir(workdir / rundir.RESUME_CHECKPOINTS)) == [str(step_0)]
  assert rundir.verify_checksums(str(workdir / rundir.RESUME_CHECKPOINTS / str(step_0))) is None


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
  with pytest.raises(launch.Preempted, match=r"^SIGINT: stopped at step \d+ with a resume checkpoint") as e:
    launch.run_study(cfg, str(workdir), progress=False)
  assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C is Python's again once training stopped
  assert e.value.step < 3000 and sorted(os.listdir(workdir / rundir.RESUME_CHECKPOINTS)) == [str(e.value.step)]
  assert launch.run_study(cfg, str(workdir), progress=False)["step"] == 3000
