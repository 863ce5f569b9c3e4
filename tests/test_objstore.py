"""gs:// work directories against a local GCS server (tests/gcs_server.py): a study killed and resumed in a
bucket, then replayed and reported; the lease that refuses a second launch; bad input in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from universality.engine import checkpoint, events, launch, paths, replay, rundir, train  # noqa: E402
from tests import gcs_server  # noqa: E402
from tests.test_launch import ROOT, small_config  # noqa: E402

# About 0.1 s per eval interval on a 2-core CPU: long enough to be killed mid-run after a checkpoint.
FLAGS = ["--config.task.groups=C11", "--config.seeds=2", "--config.model.mlp.embed_dim=16",
         "--config.model.mlp.hidden=16", "--config.steps=1500", "--config.eval_every=50",
         "--config.num_checkpoints=4"]


@pytest.fixture(scope="module")
def gcs():
  server = gcs_server.start(("bucket", "readonly"))
  server.read_only.add("readonly")
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
  os.environ["STORAGE_EMULATOR_HOST"] = server.url
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
  paths.reset_clients()
  yield server
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  paths.reset_clients()


def _cmd(workdir, *flags):
  return [sys.executable, "-m", "universality.experiments.group_universality", f"--workdir={workdir}", "--noprogress",
          *FLAGS, *flags]


def _env(server):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if server is not None:
    env["STORAGE_EMULATOR_HOST"] = server.url
  return env


def _run(workdir, server, *flags, timeout=300):
  return subprocess.run(_cmd(workdir, *flags), cwd=ROOT, env=_env(server), capture_output=True, text=True,
                        timeout=timeout)


def _one_error(res) -> str:
  assert res.returncode == 2, res.stderr[-2000:]
  errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, res.stderr[-2000:]
  return errors[0]


def _params(workdir, cfg):
  trainer = train.make_train(cfg)
  with checkpoint.Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS), read_only=True) as ckpt:
    step, state = ckpt.restore(train.host_state_spec(trainer), fallback=False)
  return step, jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
def test_gs_study_killed_resumed_replayed_and_reported(gcs, tmp_path):
  url = "gs://bucket/study"
  proc = subprocess.Popen(_cmd(url, "--noanalyze"), cwd=ROOT, env=_env(gcs), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  steps = []
  while time.time() < deadline and proc.poll() is None:
    ckpts = [int(s) for s in paths.listdir(rundir.path(url, rundir.CHECKPOINTS)) if s.isdigit()]
    if ckpts and max(ckpts) > 0 and rundir.has_metrics(url):
      steps = rundir.read_metrics(url)["step"].tolist()
      if steps and steps[-1] >= 400:
        break
    time.sleep(0.2)
  assert proc.poll() is None, f"the launch ended before it could be killed: {proc.stderr.read()[-2000:]}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a local folder named gs: was written"
  assert paths.exists(rundir.path(url, rundir.LOCK))  # a SIGKILL leaves the lease behind
  killed_at = rundir.read_metrics(url)["step"].tolist()
  assert 0 < killed_at[-1] < 1500

  res = _run(url, gcs)  # resumes: the dead holder's lease is taken over at once (same machine, pid gone)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Resuming from checkpoint" in res.stdout
  assert not paths.exists(rundir.path(url, rundir.LOCK))  # released at the end

  local = tmp_path / "whole"  # the independent reference: the same study, uninterrupted, on a local disk
  res = _run(local, None, "--noanalyze")
  assert res.returncode == 0, res.stderr[-2000:]
  cfg = small_config(groups="C11", hidden=16, steps=1500, eval_every=50, num_checkpoints=4)
  step_a, a = _params(str(local), cfg)
  step_b, b = _params(url, cfg)
  assert step_a == step_b == 1500
  jax.tree.map(np.testing.assert_array_equal, a, b)

  with replay.open(url) as run:
    assert run.workdir == url and len(run.runs) == 2
    assert run.steps == checkpoint.Checkpointer(local / "checkpoints", read_only=True).steps()
    jax.tree.map(np.testing.assert_array_equal, run.params(), b)
    m, ref = run.metrics(), rundir.read_metrics(str(local))
    np.testing.assert_array_equal(m["step"], ref["step"])
    np.testing.assert_array_equal(m["train_loss"], ref["train_loss"])
    summary = run.summary()
    assert summary["workdir"] == url and summary["steps"] == run.steps
    assert [r["name"] for r in summary["runs"]] == [r["name"] for r in run.runs]
  index = paths.read_text(rundir.path(url, "report/index.md"))
  assert url in index
  images = [n for n in paths.listdir(rundir.path(url, rundir.REPORT)) if n.endswith(".png")]
  assert images and all(f"({n})" in index for n in images)
  assert paths.read_bytes(rundir.path(url, f"{rundir.REPORT}/{images[0]}"))[:8] == b"\x89PNG\r\n\x1a\n"
  for step in run.steps:  # every analysis checkpoint sealed with checksums that verify in the bucket
    assert rundir.verify_checksums(rundir.path(url, f"{rundir.CHECKPOINTS}/{step}")) is None


def test_second_launch_on_a_leased_gs_workdir_is_refused(gcs):
  url = "gs://bucket/busy"
  with rundir.lock(url):
    with pytest.raises(launch.LaunchError, match=r"^workdir gs://bucket/busy is in use by process \d+ on "):
      launch.run_study(small_config(steps=20), url, progress=False)
  assert not rundir.is_rundir(url)
  with rundir.lock(url):  # released: free again
    pass


BAD_WORKDIRS = [
    ("s3://bucket/x", "unsupported workdir scheme s3:// in 's3://bucket/x': use a local path or gs://"),
    ("hdfs://namenode/x", "unsupported workdir scheme hdfs://"),
    ("gs://no-such-bucket/x", "workdir gs://no-such-bucket/x: bucket gs://no-such-bucket does not exist"),
    ("gs://readonly/x", "workdir gs://readonly/x: no permission to write gs://readonly (403 Forbidden"),
]


@pytest.mark.parametrize("workdir,needle", BAD_WORKDIRS[::3])
def test_bad_workdir_from_the_command_line_is_one_line_error(gcs, workdir, needle):
  res = _run(workdir, gcs, "--noanalyze", timeout=120)
  assert needle in _one_error(res)
  assert not os.path.exists(os.path.join(ROOT, workdir.split(":")[0] + ":"))
  if workdir.startswith("gs://readonly"):
    assert paths.listdir("gs://readonly") == []


@pytest.mark.parametrize("workdir,needle", BAD_WORKDIRS)
def test_bad_workdir_is_refused_before_anything_is_written(gcs, workdir, needle):
  with pytest.raises(launch.LaunchError) as e:
    launch.run_study(small_config(steps=20), workdir, progress=False)
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert not os.path.exists(workdir.split(":")[0] + ":")


def test_unreachable_object_store_is_one_line_error(gcs, monkeypatch):
  monkeypatch.setattr(paths, "PROBE_TIMEOUT_S", 1.0)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{gcs_server.free_port()}")  # no server
  paths.reset_clients()
  try:
    with pytest.raises(launch.LaunchError, match=r"^workdir gs://bucket/x: cannot reach the object store at "
                                                 r"http://127\.0\.0\.1:\d+ for gs://bucket"):
      launch.run_study(small_config(steps=20), "gs://bucket/x", progress=False)
  finally:
    monkeypatch.undo()
    paths.reset_clients()


def test_tensorboard_events_in_a_bucket_equal_the_local_ones(gcs, tmp_path):
  from tests.test_events import _read_events
  pytest.importorskip("tensorboardX")
  rng = np.random.default_rng()
  records = [{"step": s, "train_loss": [float(x) for x in rng.normal(size=2)], "newly_diverged": []}
             for s in (10, 20, 30)]
  written = {}
  for where in ("gs://bucket/tb", str(tmp_path)):
    sink = events.ScalarEvents(where, ["a", "b"], resume_step=None)
    for r in records:
      sink.append(r)
    if paths.is_remote(where):
      assert all(len(_read_events_of(p, tmp_path, _read_events)) == 1 for p in sink.paths)  # not flushed yet
    sink.close()
    written[where] = [[(v.tag, e.step, v.simple_value) for e in _read_events_of(p, tmp_path, _read_events)
                       for v in e.summary.value] for p in sink.paths]
  assert written["gs://bucket/tb"] == written[str(tmp_path)]
  assert [x[1] for x in written[str(tmp_path)][1]] == [10, 20, 30]


def _read_events_of(p, tmp_path, read):
  local = tmp_path / "copy.tfevents"
  local.write_bytes(paths.read_bytes(p))
  return read(str(local))


def _foreign_lease(url, **fields):
  record = {"host": "elsewhere", "boot_id": "another-machine", "pid": 1, "start_time": "1", "token": "t"}
  record.update(fields)
  paths.write_atomic(url, json.dumps(record))


def test_lease_of_a_live_foreign_holder_refuses_until_stale(gcs):
  url = "gs://bucket/lease-a/.lock"
  _foreign_lease(url)
  with pytest.raises(rundir.RunDirError, match=r"in use by process 1 on elsewhere .*stale after 300 s"):
    with paths.lease(url):
      pass
  time.sleep(1.2)
  with paths.lease(url, ttl=1.0):  # not refreshed for longer than its ttl: taken over
    assert json.loads(paths.read_text(url))["pid"] == os.getpid()
  assert not paths.exists(url)


def test_lease_of_a_dead_process_on_this_machine_is_taken_over_at_once(gcs):
  url = "gs://bucket/lease-b/.lock"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                        text=True).stdout.strip()
  _foreign_lease(url, host="here", boot_id=paths._boot_id(), pid=int(dead), start_time="12345")
  with paths.lease(url):
    assert json.loads(paths.read_text(url))["pid"] == os.getpid()


def test_lease_is_refreshed_and_a_takeover_is_noticed(gcs):
  url = "gs://bucket/lease-c/.lock"
  lost = []
  with paths.lease(url, refresh=0.2, on_lost=lambda: lost.append(time.time())):
    first = paths.generation(url)
    time.sleep(0.8)
    assert paths.generation(url) != first  # rewritten by the refresh thread
    _foreign_lease(url)  # another launch took it over (e.g. this one looked dead)
    time.sleep(0.8)
    assert len(lost) == 1
  assert json.loads(paths.read_text(url))["host"] == "elsewhere"  # not deleted: it is not ours any more


@pytest.mark.parametrize("max_components", [1000, 1])
def test_append_composes_and_pieces_of_a_killed_writer_are_removed(gcs, monkeypatch, max_components):
  monkeypatch.setattr(paths, "MAX_COMPONENTS", max_components)  # 1: every append rewrites the object whole
  url = f"gs://bucket/append-{max_components}/metrics.jsonl"
  lines = [json.dumps({"step": i, "x": [float(i)]}) + "\n" for i in range(4)]
  for line in lines:
    paths.append(url, line)
  assert paths.read_text(url) == "".join(lines)
  paths.write_atomic(url + paths.APPEND_PIECE + "left-by-a-kill", "garbage\n")
  log = rundir.MetricsLog(f"gs://bucket/append-{max_components}", resume_step=2, enabled=True)
  assert paths.read_text(url) == "".join(lines[:3]) and log.steps == {0, 1, 2}
  assert paths.listdir(f"gs://bucket/append-{max_components}") == ["metrics.jsonl"]


def test_corrupt_gs_checkpoint_is_moved_aside_and_the_previous_restored(gcs):
  directory = "gs://bucket/ckpt/checkpoints"
  rng = np.random.default_rng()
  trees = {s: {"w": rng.normal(size=(3, 5)).astype(np.float32)} for s in (0, 10)}
  with checkpoint.Checkpointer(directory) as ckpt:
    for s, tree in trees.items():
      ckpt.save(s, tree)
  files = paths.files_under(rundir.path(directory, "10"))
  data = [f for f in files if "/d/" in f]
  victim = rundir.path(directory, f"10/{data[0]}")
  blob = bytearray(paths.read_bytes(victim))
  blob[len(blob) // 2] ^= 0xFF
  paths.write_atomic(victim, bytes(blob))
  with checkpoint.Checkpointer(directory) as ckpt:
    step, tree = ckpt.restore({"w": np.zeros((3, 5), np.float32)})
    assert step == 0 and ckpt.steps() == [0]
  np.testing.assert_array_equal(tree["w"], trees[0]["w"])
  aside = paths.listdir("gs://bucket/ckpt/" + rundir.CORRUPT_CHECKPOINTS)
  assert len(aside) == 1 and aside[0].startswith("10-")


def test_engine_imports_without_the_gcs_packages(tmp_path):
  code = ("import sys\nfor m in ('gcsfs', 'google.cloud.storage'): sys.modules[m] = None\n"
          "import universality.engine.launch, universality.engine.replay, universality.engine.paths as p\n"
          "print(p.resolve('runs/x'))\n"
          "try:\n  p.resolve('gs://bucket/x')\nexcept p.RunDirError as e:\n  print(e)\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-2000:]
  out = res.stdout.splitlines()
  assert out == [str(tmp_path / "runs" / "x"),
                 "a gs:// workdir needs gcsfs and google-cloud-storage: pip install -e '.[gcs]'"]
