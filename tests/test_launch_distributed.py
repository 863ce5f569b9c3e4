"""The launcher as two local processes (jax.distributed over loopback, gloo) equals one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from universality.engine import checkpoint, rundir, train
from tests.test_launch import ROOT, small_config

FLAGS = ["--config.task.groups=C7,S3", "--config.seeds=3", "--config.model.mlp.embed_dim=16",
         "--config.model.mlp.hidden=8",
         "--config.steps=60", "--config.eval_every=10", "--config.num_checkpoints=4", "--noprogress",
         "--analyze"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(local_devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(local_devices),
              JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")


def _final_state(workdir):
  cfg = small_config(seeds=3, hidden=8)
  trainer = train.make_train(cfg)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True) as ckpt:
    return ckpt.restore(train.host_state_spec(trainer), fallback=False)


def test_two_process_launch_equals_one_process(tmp_path):
  single = tmp_path / "single"
  res = subprocess.run([sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={single}",
                        *FLAGS], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={multi}", *FLAGS, "--distributed",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=600))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 reports.
  assert "Done:" in outs[0][0] and "Done:" not in outs[1][0]

  step_1, state_1 = _final_state(single)
  step_2, state_2 = _final_state(multi)
  assert step_1 == step_2 == 60
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), state_1, state_2)
  m1, m2 = rundir.read_metrics(str(single)), rundir.read_metrics(str(multi))
  np.testing.assert_array_equal(m1["step"], m2["step"])
  np.testing.assert_allclose(m1["test_acc"], m2["test_acc"], atol=1e-6)
  # The analysis and the report exist once, written by process 0.
  s1 = json.loads((single / "analysis" / "summary.json").read_text())
  s2 = json.loads((multi / "analysis" / "summary.json").read_text())
  assert [r["name"] for r in s1["runs"]] == [r["name"] for r in s2["runs"]]
  for r1, r2 in zip(s1["runs"], s2["runs"]):
    assert r1["key_irreps"] == r2["key_irreps"]
  assert (multi / "report" / "index.md").exists()
