"""A run directory is a contract: what it records (config.json, runs.json, the checkpoints' own shapes, the
corpus) is checked before anything in it is adopted, trained past or served. Each refusal is one line, exit
status 2 from the command line, with the directory left byte for byte (but its lock file)."""

import json
import os

import numpy as np
import pytest

from universality.engine import checkpoint, config as config_lib, groups, launch, replay, rundir
from universality.engine.families.lm import corpus as corpus_lib
from tests.test_hardening import FLAGS, cli, finished, study, tiny_config  # noqa: F401 - fixtures


def snapshot(workdir) -> dict[str, bytes]:
  """Every file but the lock (a launch writes its pid there before it checks anything else) with its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      full = os.path.join(root, name)
      if name == rundir.LOCK:
        continue
      if os.path.islink(full) or not os.path.isfile(full):  # a FIFO or link: never opened, only named
        out[os.path.relpath(full, workdir)] = os.readlink(full) if os.path.islink(full) else "special"
        continue
      with open(full, "rb") as f:
        out[os.path.relpath(full, workdir)] = f.read()
  return out


def one_error_line(res, lines, *needles):
  assert res.returncode == 2, res.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for needle in needles:
    assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------
# What a relaunch adopts.


def test_checkpoints_without_config_json_are_refused_not_adopted(study):
  os.remove(study / rundir.CONFIG)
  before = snapshot(study)
  res, lines, _, _ = cli(study, *FLAGS, "--config.steps=80", "--config.opt.lr=2e-3")
  one_error_line(res, lines, "holds checkpoints (checkpoints/", "but no config.json", "new workdir")
  assert snapshot(study) == before
  with pytest.raises(rundir.RunDirError, match="but no config.json"):  # the same study is refused too
    launch.run_study(tiny_config(), str(study), progress=False)
  assert snapshot(study) == before


def test_checkpoint_shapes_that_contradict_config_json_are_refused_before_restoring(study):
  stored = json.loads((study / rundir.CONFIG).read_text())
  stored["config"]["model"]["mlp"]["hidden"] = 4  # the checkpoints hold width 8
  (study / rundir.CONFIG).write_text(json.dumps(stored))
  before = snapshot(study)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"^checkpoint 40 in .* does not match config.json \(.*stored, .*expected\)"):
    launch.run_study(tiny_config(hidden=4), str(study), progress=False)
  assert snapshot(study) == before
  assert not (study / rundir.CORRUPT_CHECKPOINTS).exists()  # a contradiction, not a corrupt checkpoint


def test_replay_cross_checks_runs_json_against_the_sweep(study):
  rows = json.loads((study / rundir.RUNS).read_text())
  for edit, needle in [(lambda r: r.reverse(), "row 0 has seed=1 but config.json's sweep puts seed=0"),
                       (lambda r: r[1].update(group="C7"), "row 1 has group='C7'")]:
    edited = json.loads(json.dumps(rows))
    edit(edited)
    (study / rundir.RUNS).write_text(json.dumps(edited))
    before = snapshot(study)
    with pytest.raises(rundir.RunDirError, match=needle):
      replay.open(str(study))
    assert snapshot(study) == before
  (study / rundir.RUNS).write_text(json.dumps(rows))
  with replay.open(str(study)) as run:
    assert [r["seed"] for r in run.runs] == [0, 1]
    for bad in (2**32 + 1, -(2**32) + 1):  # an int32 cast would wrap them onto elements 1
      with pytest.raises(ValueError, match="group elements 0 .. order-1"):
        run.apply(None, np.asarray([bad], np.int64), np.asarray([1], np.int64))
    logits, _ = run.apply(None, np.asarray([3], np.int64), np.asarray([4], np.int64))
    assert logits.shape[:2] == (2, 1)


def test_corpus_fingerprint_sees_contents_and_binary_files_are_refused(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "corpus"
  root.mkdir()
  for i in range(6):
    (root / f"f{i}.txt").write_bytes(bytes(rng.integers(32, 127, 400, dtype=np.uint8)))
  a = corpus_lib.load(str(root), 0.3)
  text = bytearray((root / "f2.txt").read_bytes())
  text[100] = ord("A") if text[100] != ord("A") else ord("B")  # same size, other text
  (root / "f2.txt").write_bytes(bytes(text))
  b = corpus_lib.load(str(root), 0.3)
  assert a.sizes == b.sizes and a.fingerprint != b.fingerprint
  assert a.legacy_fingerprint == b.legacy_fingerprint  # what run directories of paths and sizes only hold
  from universality.engine.families.lm import family as lm_family
  cfg = config_lib.default_config("lm")
  cfg.task.corpus, cfg.task.heldout_frac, cfg.model.gpt.context = str(root), 0.3, 16
  for accepted in (b.fingerprint, b.legacy_fingerprint):  # an older run directory still replays
    cfg.task.fingerprint = accepted
    assert lm_family.corpus_of(cfg).fingerprint == b.fingerprint
  cfg.task.fingerprint = a.fingerprint
  with pytest.raises(corpus_lib.CorpusError, match=f"the study was made on {a.fingerprint}"):
    lm_family.corpus_of(cfg)
  (root / "f2.txt").write_bytes(bytes(text[:50]) + b"\x00\x01" + bytes(text[52:]))
  with pytest.raises(corpus_lib.CorpusError, match=r"f2.txt is binary \(a NUL byte at offset 50\)"):
    corpus_lib.load(str(root), 0.3)


@pytest.mark.parametrize("spec,needle", [
    ("C5,C05,C\uff15", "'C5' and 'C05' are the same group"),
    ("S2,C2", "'S2' and 'C2' are the same group"),
    ("C1,C5", "C1 has one element"),
    ("S1", "S1 has one element"),
])
def test_groups_are_identified_by_their_table_and_trivial_ones_refused(spec, needle):
  with pytest.raises(ValueError, match=f"^config.task.groups: {needle}"):
    config_lib.validate(tiny_config(groups=spec))


def test_canonical_group_spelling():
  assert {groups.canonical(s) for s in ("C5", "C05", " C5", "C\uff15")} == {"C5"}
  assert groups.canonical("S3xC03") == groups.canonical("S3×C3") == "S3xC3"
  assert groups.duplicates(["S3", "D3", "C6", "C2xC3"]) == []  # isomorphic, other tables: distinct tasks


def test_duplicate_groups_from_the_command_line(tmp_path):
  res, lines, _, _ = cli(tmp_path / "w", *FLAGS[1:], "--config.task.groups=C5,C05")
  one_error_line(res, lines, "config.task.groups: 'C5' and 'C05' are the same group")
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------
# Sizes bounded before anything is allocated.


_PEAK = ("import atexit, runpy, sys; "
         "atexit.register(lambda: sys.stderr.write([l for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')][0])); "
         "sys.argv = ['group_universality'] + sys.argv[1:]; "
         "runpy.run_module('universality.experiments.group_universality', run_name='__main__')")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
def test_absurd_checkpoint_count_is_refused_before_allocating(tmp_path):
  import subprocess
  import sys
  from tests.test_hardening import ROOT
  # VmHWM, not ru_maxrss: the latter keeps the forking test process's peak across exec.
  res = subprocess.run([sys.executable, "-c", _PEAK, f"--workdir={tmp_path / 'w'}", "--noprogress", *FLAGS,
                        "--config.num_checkpoints=1000000000"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  lines = [l for l in res.stderr.splitlines() if not l.startswith("VmHWM")]
  one_error_line(res, lines, "config.num_checkpoints: at most 10000, got 1000000000")
  peak_kb = [int(l.split()[1]) for l in res.stderr.splitlines() if l.startswith("VmHWM")]
  assert peak_kb and peak_kb[0] < 1024 * 1024, peak_kb  # under 1 GiB: a few hundred MB of imports
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------
# Damaged files a relaunch repairs, or refuses in one line.


def test_metrics_line_of_the_wrong_length_is_damaged_not_fatal(study, capsys):
  lines = (study / rundir.METRICS).read_text().splitlines()
  record = json.loads(lines[1])
  record["test_acc"] = record["test_acc"] + [0.5]  # valid JSON, three runs' worth
  (study / rundir.METRICS).write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
  with replay.open(str(study)) as run:
    assert run.metrics()["step"].tolist() == [10, 30, 40]
  assert rundir.read_metrics(str(study))["step"].tolist() == [10, 30, 40]  # the first record's length rules
  capsys.readouterr()
  launch.run_study(tiny_config(), str(study), progress=False)
  assert "1 damaged line(s) of metrics.jsonl skipped (line 2)" in capsys.readouterr().out


def test_damaged_bucket_summary_means_not_finished(study):
  (study / rundir.ANALYSIS).mkdir(exist_ok=True)
  for text in ("[]", '{"steps": [40], "coh'):
    (study / rundir.SUMMARY).write_text(text)
    assert launch._bucket_finished(tiny_config(), str(study), analyze=True) is False  # analysed again
    with pytest.raises(rundir.RunDirError, match="summary.json"):
      rundir.read_summary(str(study))
  assert launch._bucket_finished(tiny_config(), str(study), analyze=False) is True


def test_config_json_nested_too_deeply_is_one_line(study):
  (study / rundir.CONFIG).write_text("[" * 100_000 + "]" * 100_000)
  before = snapshot(study)
  with pytest.raises(rundir.RunDirError, match="unreadable config.json .*nested too deeply"):
    replay.open(str(study))
  res, lines, _, _ = cli(study, *FLAGS)
  one_error_line(res, lines, "config.json", "nested too deeply")
  assert snapshot(study) == before


# ---------------------------------------------------------------------------------------------------
# Entries that would block a reader: refused, never opened.


@pytest.mark.parametrize("kind", ["fifo", "dev_zero_link"])
def test_fifo_or_device_link_in_a_checkpoint_is_refused_never_opened(study, kind):
  step_dir = study / rundir.CHECKPOINTS / "40"
  target = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs),
               key=os.path.getsize)
  os.remove(target)
  if kind == "fifo":
    os.mkfifo(target)
  else:
    os.symlink("/dev/zero", target)
  rel = os.path.relpath(target, step_dir)
  before = snapshot(study)
  with replay.open(str(study)) as run:
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint 40 in .*: {rel} is not a regular file"):
      run.params()
  res, lines, _, seconds = cli(study, *FLAGS, timeout=60)  # a hang fails here, by the timeout
  one_error_line(res, lines, f"checkpoint 40 in {study / rundir.CHECKPOINTS}: {rel} is not a regular file")
  assert snapshot(study) == before
  assert os.path.islink(target) if kind != "fifo" else not os.path.isfile(target)


def _npz_with_header(path, shape, data: bytes):
  """An .npz whose one member's header declares ``shape`` float64 but holds ``data``."""
  import io
  import zipfile
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("excess.npy", header.getvalue() + data)  # the header writer puts the magic first


def test_cohort_arrays_are_bounded_by_their_headers_and_shape_checked(study):
  rng = np.random.default_rng(1)
  table = rng.normal(size=(2, 3, 4))
  written = rundir.write_cohort_arrays(str(study), "c", {"excess": table})
  np.testing.assert_array_equal(rundir.read_cohort_arrays(str(study), "c", (2, 3))["excess"], table)
  with pytest.raises(rundir.RunDirError, match=r"excess has shape \(2, 3, 4\), expected \(5,\) leading"):
    rundir.read_cohort_arrays(str(study), "c", (5,))
  _npz_with_header(written, (10**12,), rng.normal(size=4).tobytes())  # claims 8 TB, holds 32 bytes
  with pytest.raises(rundir.RunDirError, match=r"header declares \(1000000000000,\) float64"):
    rundir.read_cohort_arrays(str(study), "c")
  np.savez_compressed(written, excess=np.zeros(4 * 2**20))  # 32 MiB of zeros, a few kB compressed
  assert os.path.getsize(written) < 100_000
  from universality.engine import paths
  with pytest.raises(ValueError, match=r"would take 33554432 bytes, more than the 1048576"):
    paths.read_npz(written, max_bytes=2**20)
  assert paths.read_npz(written)["excess"].shape == (4 * 2**20,)


def _on_google_cloud() -> bool:
  try:
    with open("/sys/class/dmi/id/product_name") as f:
      return f.read().startswith("Google")
  except OSError:
    return False


@pytest.mark.skipif(_on_google_cloud(), reason="a Google Cloud machine has credentials of its own")
def test_gs_workdir_without_credentials_is_one_line_and_fast(tmp_path):
  import subprocess
  import sys
  import time
  from tests.test_hardening import ROOT, _MEASURED
  env = {k: v for k, v in os.environ.items()
         if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GCE_METADATA_HOST",
                      "GCE_METADATA_IP")}
  env.update(JAX_PLATFORMS="cpu", CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
  t0 = time.perf_counter()
  res = subprocess.run([sys.executable, "-c", _MEASURED, "--workdir=gs://no-such-bucket/x", "--noprogress",
                        *FLAGS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  seconds = time.perf_counter() - t0
  lines = [l for l in res.stderr.splitlines() if not l.startswith("maxrss_kb=")]
  one_error_line(res, lines, "gs:// needs Google Cloud credentials and none were found")
  assert "Traceback" not in res.stderr
  assert seconds < 90, seconds  # importing JAX (slow on a loaded machine); the message shows nothing was probed


# ---------------------------------------------------------------------------------------------------
# No hang survives SIGTERM.

_GRACE = ("import runpy, sys; from universality.engine import checkpoint; "
          "checkpoint.SEAL_GRACE_S = float(sys.argv.pop(1)); sys.argv[0] = 'group_universality'; "
          "runpy.run_module('universality.experiments.group_universality', run_name='__main__')")


@pytest.mark.slow
def test_launch_whose_storage_server_dies_ends_under_sigterm(tmp_path):
  """The server stops answering mid-run: the launch ends in one line by itself, or within the seal grace
  (2 s here) and the lease's bounded release after SIGTERM, never hanging in a save."""
  import signal
  import subprocess
  import sys
  import time
  pytest.importorskip("gcsfs")
  pytest.importorskip("gcp_storage_emulator")
  from tests import gcs_server
  from tests.test_hardening import ROOT
  from universality.engine import paths
  server = gcs_server.start(("bucket",))
  env = dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url)
  flags = ["--config.task.groups=C11", "--config.seeds=2", "--config.model.mlp.embed_dim=16",
           "--config.model.mlp.hidden=16", "--config.steps=3000", "--config.eval_every=50",
           "--config.num_checkpoints=30", "--noprogress", "--noanalyze"]
  proc = subprocess.Popen([sys.executable, "-c", _GRACE, "2", "--workdir=gs://bucket/study", *flags], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    saved = dict(os.environ)
    os.environ.update(STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url)
    paths.reset_clients()
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      if len([s for s in paths.listdir("gs://bucket/study/checkpoints") if s.isdigit()]) >= 2:
        break
      time.sleep(0.2)
  finally:
    os.environ.clear()
    os.environ.update(saved)
    paths.reset_clients()
    server.stop()  # from now on every request is refused
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  time.sleep(8)  # long enough to reach the next save
  t0 = time.perf_counter()
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
  try:
    _, err = proc.communicate(timeout=90)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the launch hangs after SIGTERM")
  seconds = time.perf_counter() - t0
  errors = [l for l in err.splitlines() if l.startswith("error: ")]
  assert proc.returncode == 2 and len(errors) == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  assert seconds < 60, seconds


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
def test_huge_corpus_is_refused_by_the_size_check_before_it_is_read(tmp_path):
  import subprocess
  import sys
  from tests.test_hardening import ROOT
  from universality.engine import budget
  from universality.engine.families.lm import family as lm_family
  huge = tmp_path / "huge.txt"
  with open(huge, "wb") as f:
    f.truncate(30 * 2**30)  # sparse: 30 GiB long, nothing on disk
  peak = _PEAK.replace("group_universality", "lm_universality")
  res = subprocess.run([sys.executable, "-c", peak, f"--workdir={tmp_path / 'w'}", "--noprogress",
                        f"--config.task.corpus={huge}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  lines = [l for l in res.stderr.splitlines() if not l.startswith("VmHWM")]
  one_error_line(res, lines, "launch needs about", "memory_budget_gb")
  peak_kb = [int(l.split()[1]) for l in res.stderr.splitlines() if l.startswith("VmHWM")]
  assert peak_kb and peak_kb[0] < 1024 * 1024, peak_kb  # the 30 GiB were never read
  assert not (tmp_path / "w").exists()
  # A one-file corpus is memory-mapped: the estimate grows with it by the device's copy alone (on the CPU,
  # where host and device share the RAM: 1.0x the corpus; benchmarks/README.md, "LM corpus memory").
  small, big = tmp_path / "small.txt", tmp_path / "big.txt"
  small.write_bytes(b"ab" * 5_000)
  big.write_bytes(b"ab" * 505_000)
  cfg = config_lib.default_config("lm")
  est = [budget.estimate(_with_corpus(cfg, p), 1, on_cpu=True) for p in (small, big)]
  grown = (est[1].host + est[1].device) - (est[0].host + est[0].device)
  assert grown == 1_000_000 and lm_family.corpus_lib.is_mapped(str(big))


def _with_corpus(cfg, path):
  out = cfg.copy_and_resolve_references()
  out.task.corpus = str(path)
  return out


@pytest.mark.parametrize("damage", ["flipped_bytes", "truncated_checksums"])
def test_corrupt_older_checkpoint_is_set_aside_and_the_analysis_completes(study, damage, capsys):
  step_dir = study / rundir.CHECKPOINTS / "10"
  if damage == "flipped_bytes":
    target = max((os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs
                  if os.path.basename(r) == "d"), key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
  else:
    text = (step_dir / rundir.CHECKSUMS).read_text()
    (step_dir / rundir.CHECKSUMS).write_text(text[: len(text) // 2])
  capsys.readouterr()
  out = launch.run_study(tiny_config(**{"exec.analyze": True}), str(study), progress=False)
  printed = capsys.readouterr().out
  assert "WARNING: checkpoint 10 is corrupt (" in printed and "moved aside" in printed, printed
  assert [p.split("-")[0] for p in os.listdir(study / rundir.CORRUPT_CHECKPOINTS)] == ["10"]
  assert out["summary"]["steps"] == [0, 40]
  with replay.open(str(study)) as run:  # a relaunch now finds nothing to repair
    assert run.steps == [0, 40] and run.summary()["steps"] == [0, 40]


_DISK_FULL = ("import errno, os, runpy, sys\n"
              "def full(fd): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
              "os.fsync = full; sys.argv[0] = 'group_universality'\n"
              "runpy.run_module('universality.experiments.group_universality', run_name='__main__')")


def test_disk_full_at_start_is_one_line_naming_the_file(tmp_path):
  import subprocess
  import sys
  from tests.test_hardening import ROOT
  res = subprocess.run([sys.executable, "-c", _DISK_FULL, f"--workdir={tmp_path / 'w'}", "--noprogress",
                        "--noanalyze", *FLAGS], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  lines = res.stderr.splitlines()
  one_error_line(res, lines, f"error: {tmp_path / 'w'}/", ": No space left on device")  # the file named
  assert not (tmp_path / "w" / rundir.CONFIG).exists()


_FULL_FLAGS = ["--config.task.groups=C11", "--config.seeds=4", "--config.model.mlp.embed_dim=32",
               "--config.model.mlp.hidden=256", "--config.steps=30", "--config.eval_every=10",
               "--config.num_checkpoints=4", "--config.opt.lr=1e-3", "--config.task.train_frac=0.4",
               "--config.exec.resume_every_minutes=0", "--noprogress", "--noanalyze"]


def _mount_works() -> bool:
  import shutil
  import subprocess
  if shutil.which("unshare") is None:
    return False
  res = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True, timeout=30)
  return res.returncode == 0


def test_disk_full_mid_checkpoint_is_one_line_and_a_relaunch_resumes_bit_identically(tmp_path):
  """A launch whose disk fills while it writes its third checkpoint (a 2.8 MB tmpfs; each checkpoint of this
  study takes about 1 MB) ends in one line, exit 2; the committed checkpoints and metrics survive, and a
  relaunch with space resumes from the last committed step to the metrics of a launch never interrupted."""
  import subprocess
  import sys
  if not _mount_works():
    pytest.skip("needs a private mount namespace (unshare -rm) to mount a small tmpfs")
  from tests.test_hardening import ROOT
  command = [sys.executable, "-m", "universality.experiments.group_universality"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  mnt, kept, whole = tmp_path / "mnt", tmp_path / "kept", tmp_path / "whole"
  mnt.mkdir()
  script = ('mount -t tmpfs -o size=2800k tmpfs "$1" && shift && "$@" --workdir="$MNT/w"; rc=$?; '
            'cp -a "$MNT/w" "$KEPT"; exit $rc')
  res = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mnt), *command, *_FULL_FLAGS], cwd=ROOT,
                       capture_output=True, text=True, env=dict(env, MNT=str(mnt), KEPT=str(kept)), timeout=300)
  lines = res.stderr.splitlines()
  one_error_line(res, lines, "No space left on device")
  committed = sorted(int(p) for p in os.listdir(kept / "checkpoints") if p.isdigit())
  assert committed and committed[-1] < 30, committed  # the disk filled mid-run, after a checkpoint committed
  for step in committed:
    assert (kept / "checkpoints" / str(step) / rundir.CHECKSUMS).is_file()
  again = subprocess.run([*command, f"--workdir={kept}", *_FULL_FLAGS], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"Resuming from checkpoint at step {committed[-1]}" in again.stdout
  ref = subprocess.run([*command, f"--workdir={whole}", *_FULL_FLAGS], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert (kept / rundir.METRICS).read_text() == (whole / rundir.METRICS).read_text()
