"""The run axis sharded over devices and processes gives the numbers of a single device."""

import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from universality.engine import train
from tests.helpers import group_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg():
  # 6 runs of mixed orders: not a multiple of 4 or 8 devices, so dummy runs pad the sharded axis.
  return group_config(groups="C5,S3,C4", seeds=1, lr="3e-3", weight_decay="1.0", train_frac="0.5,0.7",
                      embed_dim=16, hidden=16, steps=6, eval_every=2)


def _train(mesh):
  tr = train.make_train(_cfg(), mesh=mesh)
  state, m = tr.train()
  return tr, tr.unpad(state.params), m


@functools.lru_cache(maxsize=1)
def _reference():
  return _train(Mesh(np.asarray(jax.devices()[:1]), ("runs",)))


def test_eight_devices_equal_one_device():
  tr1, p1, m1 = _reference()
  tr8, p8, m8 = _train(Mesh(np.asarray(jax.devices()[:8]), ("runs",)))
  assert len(jax.devices()) == 8 and tr8.n_padded == 8 and tr1.n_padded == tr1.n_runs == 6
  # One run per device loop on CPU: the same per-run program wherever a run lands, so bitwise equal.
  for k in m1:
    np.testing.assert_array_equal(m1[k], m8[k], err_msg=k)
  for k in p1:
    np.testing.assert_array_equal(p1[k], p8[k], err_msg=k)
  assert np.isfinite(m1["train_loss"]).all()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_workers(cfg, tmp_path, *extra: str) -> list[str]:
  """Runs tests/distributed_worker.py as two processes of one ``jax.distributed`` job (2 CPU devices each,
  gloo on loopback) with ``cfg`` and ``tmp_path`` (and ``extra`` arguments); asserts both exit 0 and
  returns their output."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = lambda i: [sys.executable, os.path.join(REPO, "tests", "distributed_worker.py"), str(port), str(i), "2",
                   "2", cfg.to_json(), str(tmp_path), *extra]
  procs = [subprocess.Popen(cmd(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def test_two_processes_equal_one_process(tmp_path):
  run_two_workers(_cfg(), tmp_path)
  _, p_ref, m_ref = _reference()
  for i in range(2):
    with np.load(tmp_path / f"process_{i}.npz", allow_pickle=False) as got:
      for k in m_ref:
        np.testing.assert_array_equal(got[f"metrics/{k}"], m_ref[k], err_msg=f"process {i} {k}")
      for k in p_ref:
        np.testing.assert_array_equal(got[f"params/{k}"], p_ref[k], err_msg=f"process {i} {k}")
