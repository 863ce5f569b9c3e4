"""The run directory: the one module that knows its file names and formats (no JAX, no Orbax).

A run directory is data, never code: JSON files, an append-only JSON-lines log and Orbax checkpoints.
Nothing in it is executed, evaluated or unpickled.

  config.json        {"format_version": 2, "config": the study's config} (execution settings excluded)
  runs.json          one row per leading index of the stacked state (``Row``)
  metrics.jsonl      one JSON object per evaluation: "step", each metric as a list over runs, and
                     "newly_diverged" (run names); a line that does not read as such a record is damaged:
                     readers skip it, and a relaunch keeps the file as it was in
                     metrics.jsonl.damaged-<time> before rewriting it without the damaged lines
  checkpoints/       Orbax checkpoints (universality.engine.checkpoint); corrupt ones are moved to
                     corrupt_checkpoints/; a step holding anything but plain files and folders (a FIFO,
                     a device, a symbolic link) is refused and never opened;
                     checkpoints/<step>/sha256.json: the checksum of every file of the step, written once
                     Orbax has committed it (``write_checksums``, ``verify_checksums``)
  checkpoints_resume/   the rolling resume checkpoint (universality.engine.checkpoint; only the newest
                     step is kept, with its sha256.json): the whole train state at a step that need not
                     be an analysis step, written on preemption and every exec.resume_every_* so a crash
                     loses bounded work.
                     Analyses never read it; a relaunch resumes from the newest step of either directory
  tensorboard/<run>/ TensorBoard event files of every run's metrics (universality.engine.events;
                     exec.tensorboard), a view of metrics.jsonl, one file per run and launch
  analysis/summary.json   written by universality.engine.analysis.driver
  analysis/cohorts/<cohort>.npz   per-cohort arrays of a family's analysis (e.g. one row per neuron), plain
                     numeric arrays read with allow_pickle=False
  report/            written by universality.engine.report
  .lock              held by the launch that writes the directory: flock on a local disk, a lease object on
                     gs:// (universality.engine.paths.lease)

The workdir is a local path or a ``gs://bucket/prefix`` URL (``resolve``; every read and write goes through
``universality.engine.paths``). On an object store the format is the same, one object per file under the
prefix: folders are name prefixes, atomic writes are single uploads, metrics.jsonl grows by server-side
compose of each appended line (readers see whole lines, as locally), setting a file or checkpoint aside is a
copy and a delete, and ``.lock`` holds the lease record (JSON: host, boot id, pid, process start time, a
token).

A study its family splits into several buckets (``Family.buckets``: e.g. groups of very different orders,
each bucket one program) is a directory of run directories instead::

  config.json        the whole study's config, as above (written once the first bucket has started)
  buckets/<name>/    one run directory per bucket, as above: exactly what a launch of the bucket's config
                     alone writes (its config.json, runs.json, metrics.jsonl, checkpoints, analysis, report)
  report/index.md    written by universality.engine.report: the buckets, each linked to its own report
  .lock              held by the launch, besides each bucket's own

It has no runs.json at the top (``has_runs``). A study of one bucket is one run directory, as it was before
buckets existed; so is a directory whose config.json lacks a field that now splits its study (written before
the field existed): a relaunch resumes it as one program and universality.engine.replay opens it as one.

Format versions: 2 (current) nests the config by concern (``task``, ``model``, ``opt``) and names a run's
seed number ``seed`` and the config's base seed ``base_seed`` in runs.json. Version 1 (a flat config.json,
runs.json rows with ``seed`` = base seed and ``seed_index`` = seed number) is read and converted on the fly;
any other version is refused with a one-line ``RunDirError``.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import signal
import time
import zlib
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from universality.engine import paths

FORMAT_VERSION = 2
CONFIG = "config.json"
RUNS = "runs.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
RESUME_CHECKPOINTS = "checkpoints_resume"
CORRUPT_CHECKPOINTS = "corrupt_checkpoints"
CHECKSUMS = "sha256.json"             # inside a checkpoint's step directory
DAMAGED_SUFFIX = ".damaged-"          # metrics.jsonl.damaged-<time>: a metrics log as found, kept aside
TENSORBOARD = "tensorboard"
ANALYSIS = "analysis"
SUMMARY = ANALYSIS + "/summary.json"
REPORT = "report"
LOCK = ".lock"
BUCKETS = "buckets"


RunDirError = paths.RunDirError  # a run directory that cannot be read or written as asked; one line
resolve = paths.resolve  # a workdir string as the canonical path of the engine (absolute, or gs:// URL)


def path(workdir: str, name: str) -> str:
  """The path of one of this module's names (``CONFIG``, ``CHECKPOINTS``, ...) inside ``workdir``."""
  return paths.join(workdir, name)


def is_rundir(workdir: str) -> bool:
  return paths.isfile(path(workdir, CONFIG))


def has_runs(workdir: str) -> bool:
  """Whether ``workdir`` holds runs.json: a run directory, not a study of several buckets."""
  return paths.isfile(path(workdir, RUNS))


def bucket_dir(workdir: str, name: str) -> str:
  """The run directory of the bucket ``name`` of a study of several buckets."""
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.=+_-]*", name):
    raise RunDirError(f"bucket name {name!r} is not a plain file name")
  return paths.join(workdir, BUCKETS, name)


def has_final_checkpoint(workdir: str, step: int) -> bool:
  """Whether the analysis checkpoint of ``step`` is committed and sealed with its checksums."""
  return has_checksums(paths.join(workdir, CHECKPOINTS, str(int(step))))


def checkpoint_steps_present(workdir: str) -> list[str]:
  """The step folders of either checkpoint directory (``checkpoints/<step>``, ``checkpoints_resume/<step>``),
  committed or not, as ``<dir>/<step>``: what a run directory has trained, whatever its config.json says."""
  return [f"{d}/{name}" for d in (CHECKPOINTS, RESUME_CHECKPOINTS)
          for name in paths.listdir(path(workdir, d)) if name.isdigit() or name.split(".")[0].isdigit()]


def check_unclaimed_state(workdir: str) -> None:
  """A work directory without config.json must hold no checkpoint: nothing would tell which study trained
  it, and a launch would adopt it as its own. A one-line RunDirError names it and how to start afresh."""
  if paths.exists(path(workdir, CONFIG)):
    return
  found = checkpoint_steps_present(workdir)
  if found:
    raise RunDirError(f"workdir {workdir} holds checkpoints ({found[0]}{', ...' if len(found) > 1 else ''}) "
                      f"but no {CONFIG}: they cannot be checked against this config; start afresh in a new "
                      f"workdir (or move {CHECKPOINTS}/ and {RESUME_CHECKPOINTS}/ away)")


def atomic_write(file_path: str, text: str) -> None:
  """Writes ``text`` to ``file_path`` atomically (``universality.engine.paths.write_atomic``): readers never see half."""
  paths.write_atomic(file_path, text)


def check_writable(workdir: str) -> None:
  """Creates a local workdir, or proves a gs:// one writable; a one-line RunDirError otherwise."""
  paths.check_writable(workdir)


def _lease_lost(url: str) -> None:
  print(f"ERROR: the lease {url} was taken over by another launch (this one was paused longer than "
        f"{paths.LEASE_TTL_S:.0f} s): stopping", flush=True)
  _thread.interrupt_main(signal.SIGTERM)  # the launch's SIGTERM handler stops at the end of the interval


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Exclusive use of ``workdir`` by one launch; a second writer of the same directory is refused.

  Local: an advisory flock on ``workdir/.lock``. The kernel drops it when the process dies (even by SIGKILL),
  so a crashed run can be relaunched. gs://: the lease object ``workdir/.lock``
  (``universality.engine.paths.lease``).
  """
  if paths.is_remote(workdir):
    with paths.lease(path(workdir, LOCK), on_lost=lambda: _lease_lost(path(workdir, LOCK))):
      yield
    return
  lock_path = path(workdir, LOCK)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise RunDirError(f"workdir {workdir} is in use by another launch (lock {lock_path})") from None
      raise
    try:
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:  # a full disk names no file by itself
      raise OSError(e.errno, e.strerror, lock_path) from None
    yield
  finally:
    os.close(fd)


def _read_json(file_path: str, what: str) -> Any:
  try:
    return json.loads(paths.read_bytes(file_path))
  except FileNotFoundError:
    raise RunDirError(f"{os.path.dirname(file_path) or '.'} is not a run directory (no {what})") from None
  except (OSError, ValueError) as e:
    raise RunDirError(f"unreadable {what} in {os.path.dirname(file_path) or '.'}: {e}") from None
  except RecursionError:  # JSON nested deeper than the interpreter's stack: no file of ours is
    raise RunDirError(f"unreadable {what} in {os.path.dirname(file_path) or '.'}: nested too deeply") from None


# ---------------------------------------------------------------------------------------------------
# config.json


def read_config(workdir: str) -> tuple[int, dict]:
  """``(format version, config)`` of a run directory's config.json as stored: version 1 is the flat config
  of the first format, version 2 the nested one (``universality.engine.config.load`` reads either into
  today's config); any other version is refused with a one-line ``RunDirError``."""
  data = _read_json(path(workdir, CONFIG), CONFIG)
  if not isinstance(data, dict):
    raise RunDirError(f"{CONFIG} in {workdir} is not a JSON object")
  if "format_version" not in data:
    return 1, data
  version = data["format_version"]
  if version != FORMAT_VERSION or not isinstance(data.get("config"), dict):
    raise RunDirError(f"{workdir} has run-directory format {version!r}; this engine reads formats 1 and "
                      f"{FORMAT_VERSION}")
  return version, data["config"]


def write_config(workdir: str, config: dict) -> None:
  text = json.dumps({"format_version": FORMAT_VERSION, "config": config}, indent=2, sort_keys=True)
  atomic_write(path(workdir, CONFIG), text + "\n")


# ---------------------------------------------------------------------------------------------------
# runs.json


def write_runs(workdir: str, rows: Sequence[dict]) -> None:
  atomic_write(path(workdir, RUNS), json.dumps(list(rows), indent=1) + "\n")


def read_runs(workdir: str) -> list[dict]:
  """runs.json rows in the current format: ``seed`` is the seed number k, ``base_seed`` the config's seed."""
  rows = _read_json(path(workdir, RUNS), RUNS)
  if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
    raise RunDirError(f"{RUNS} in {workdir} is not a list of run records")
  out = []
  for r in rows:
    if "seed_index" in r:  # format 1: "seed" held the base seed
      r = dict(r)
      r["base_seed"] = r.pop("seed")
      r["seed"] = r.pop("seed_index")
    out.append(r)
  return out


# ---------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricLines(NamedTuple):
  """A metrics log as read: the valid lines (text) and their records, in file order, and the 1-based
  numbers of the damaged lines (cut by a crash, edited, or not a metrics record)."""
  lines: list[str]
  records: list[dict]
  damaged: list[int]


def _is_record(record: Any, keys: set | None, n_runs: int | None) -> bool:
  step = record.get("step") if isinstance(record, dict) else None
  if not (isinstance(step, int) and not isinstance(step, bool) and (keys is None or keys <= set(record))):
    return False
  lists = [v for k, v in record.items() if k != "newly_diverged" and isinstance(v, list)]
  return n_runs is None or all(len(v) == n_runs for v in lists)


def read_metric_lines(file_path: str, n_runs: int | None = None) -> MetricLines:
  """Every readable record of a metrics log; a damaged line is skipped, never the lines after it.

  ``n_runs``: the length every metric's list must have (None: that of the first record's lists), so that
  a line edited to another length is damaged rather than an array that numpy cannot stack."""
  out = MetricLines([], [], [])
  keys = None  # the first record's fields: a later record without one of them is damaged
  with io.StringIO(paths.read_text(file_path, errors="replace"), newline=None) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except ValueError:
        record = None
      if not _is_record(record, keys, n_runs):
        out.damaged.append(number)
        continue
      if keys is None:
        keys = set(record)
        lengths = {len(v) for k, v in record.items() if k != "newly_diverged" and isinstance(v, list)}
        n_runs = n_runs if n_runs is not None or len(lengths) != 1 else lengths.pop()
      out.lines.append(line)
      out.records.append(record)
  return out


class MetricsLog:
  """metrics.jsonl, appended one line per evaluation; on relaunch cut back to the resumed step.

  Lines after the resumed step are dropped because the resumed run logs those steps again. Damaged lines are
  skipped, not the valid lines after them; when there are any, the file as it was is first kept aside as
  ``metrics.jsonl.damaged-<time>`` (``aside``) and their line numbers are in ``damaged``. ``steps`` are the
  logged steps kept and ``last`` the last record kept (None when none).
  """

  def __init__(self, workdir: str, resume_step: int | None, enabled: bool, n_runs: int | None = None):
    self.path = path(workdir, METRICS)
    self.enabled = enabled
    self.damaged: list[int] = []
    self.aside: str | None = None
    self.steps: set[int] = set()
    self.last: dict | None = None
    self.mirror = None  # another sink of every record appended (universality.engine.events.ScalarEvents), or None
    if not enabled:
      return
    paths.remove_pieces(self.path)
    if resume_step is None or not paths.exists(self.path):
      atomic_write(self.path, "")
      return
    found = read_metric_lines(self.path, n_runs)
    kept = [(line, r) for line, r in zip(found.lines, found.records) if r["step"] <= resume_step]
    if found.damaged:
      self.damaged = found.damaged
      self.aside = f"{self.path}{DAMAGED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}"
      paths.move(self.path, self.aside)
    atomic_write(self.path, "".join(line + "\n" for line, _ in kept))
    self.steps = {r["step"] for _, r in kept}
    self.last = kept[-1][1] if kept else None

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    paths.append(self.path, json.dumps(record) + "\n")
    if self.mirror is not None:
      self.mirror.append(record)
    self.steps.add(int(record["step"]))
    self.last = record

  def close(self) -> None:
    """Flushes the mirror (the log itself is written at every append)."""
    if self.mirror is not None and hasattr(self.mirror, "close"):
      self.mirror.close()


def has_metrics(workdir: str) -> bool:
  return paths.exists(path(workdir, METRICS))


def read_metrics(workdir: str, n_runs: int | None = None) -> dict[str, np.ndarray]:
  """metrics.jsonl as arrays: "step" [E] and every metric [E, S] (damaged lines skipped; ``n_runs`` as in
  ``read_metric_lines``)."""
  records = read_metric_lines(path(workdir, METRICS), n_runs).records
  if not records:
    return {"step": np.zeros((0,), np.int64)}
  keys = [k for k in records[0] if k != "newly_diverged"]
  return {k: np.asarray([r[k] for r in records]) for k in keys}


# ---------------------------------------------------------------------------------------------------
# checkpoints/<step>/sha256.json


def irregular_entry(step_dir: str) -> str | None:
  """What in a checkpoint step directory is not a plain file or folder (``paths.irregular_files``), as a
  reason; None when nothing is. Such an entry is never opened."""
  found = paths.irregular_files(step_dir)
  if not found:
    return None
  return f"{found[0]} is not a regular file (a link, FIFO or device)" + (f", and {len(found) - 1} more"
                                                                         if len(found) > 1 else "")


def _file_digests(step_dir: str) -> dict[str, str]:
  irregular = irregular_entry(step_dir)
  if irregular:
    raise RunDirError(f"{step_dir}: {irregular}")
  out = {}
  for rel in paths.files_under(step_dir):
    if rel == CHECKSUMS or rel.startswith(f".{CHECKSUMS}.") or rel.startswith(CHECKSUMS + ".tmp-"):
      continue
    digest = hashlib.sha256()
    with paths.open_read(paths.join(step_dir, rel)) as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    out[rel] = digest.hexdigest()
  return out


def write_checksums(step_dir: str) -> None:
  """Writes the sha256 of every file of a committed checkpoint step directory into it."""
  text = json.dumps({"sha256": _file_digests(step_dir)}, indent=1, sort_keys=True)
  atomic_write(paths.join(step_dir, CHECKSUMS), text + "\n")


def has_checksums(step_dir: str) -> bool:
  return paths.isfile(paths.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> str | None:
  """None when every file listed in the step's checksums is present and intact, else what is wrong."""
  irregular = irregular_entry(step_dir)
  if irregular:
    return irregular
  try:
    expected = json.loads(paths.read_bytes(paths.join(step_dir, CHECKSUMS)))["sha256"]
    if not isinstance(expected, dict) or not expected:
      raise ValueError("no files listed")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"unreadable {CHECKSUMS}: {e}"
  found = _file_digests(step_dir)
  for rel, digest in sorted(expected.items()):
    if rel not in found:
      return f"file {rel} is missing"
    if found[rel] != digest:
      return f"checksum mismatch in {rel}"
  return None


# ---------------------------------------------------------------------------------------------------
# analysis/summary.json and report/


def write_summary(workdir: str, summary: dict) -> str:
  paths.makedirs(path(workdir, ANALYSIS))
  out = path(workdir, SUMMARY)
  atomic_write(out, json.dumps(summary, indent=1) + "\n")
  return out


def _cohort_file(workdir: str, cohort: str) -> str:
  safe = re.sub(r"[^A-Za-z0-9.=-]+", "_", cohort).strip("_")
  return paths.join(workdir, ANALYSIS, "cohorts", f"{safe}-{zlib.crc32(cohort.encode()):08x}.npz")


def write_cohort_arrays(workdir: str, cohort: str, arrays: dict[str, np.ndarray]) -> str:
  """Writes one cohort's arrays (numeric, or bool) atomically; returns the file's path."""
  out = _cohort_file(workdir, cohort)
  paths.write_npz(out, arrays)
  return out


def read_cohort_arrays(workdir: str, cohort: str,
                       shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
  """The arrays ``write_cohort_arrays`` wrote for ``cohort`` (never unpickled; sizes bounded from the headers,
  ``universality.engine.paths.read_npz``). ``shape``: the leading dimensions every array must have (e.g. the
  cohort's run count), checked; a file that disagrees is refused in one line."""
  file_path = _cohort_file(workdir, cohort)
  if not paths.exists(file_path):
    raise RunDirError(f"{workdir} has no analysis arrays for cohort {cohort!r}: run the analysis")
  try:
    arrays = paths.read_npz(file_path)
  except (OSError, ValueError) as e:
    raise RunDirError(f"unreadable analysis arrays {file_path}: {e}") from None
  for name, value in arrays.items():
    if shape is not None and value.shape[:len(shape)] != tuple(shape):
      raise RunDirError(f"analysis arrays {file_path}: {name} has shape {value.shape}, expected "
                        f"{tuple(shape)} leading; run the analysis again")
  return arrays


def has_summary(workdir: str) -> bool:
  return paths.exists(path(workdir, SUMMARY))


def summary_mtime(workdir: str) -> int:
  """A number that changes whenever summary.json is rewritten (mtime, or the object's generation)."""
  return paths.generation(path(workdir, SUMMARY))


def read_summary(workdir: str) -> dict:
  """analysis/summary.json (plain JSON); a one-line error when the analysis has not been run."""
  if not has_summary(workdir):
    raise FileNotFoundError(f"{path(workdir, SUMMARY)} does not exist: run "
                            f"universality.engine.analysis.driver.analyze({workdir!r})")
  summary = _read_json(path(workdir, SUMMARY), SUMMARY)
  if not isinstance(summary, dict):
    raise RunDirError(f"{SUMMARY} in {workdir} is not a JSON object: run the analysis again")
  return summary


def report_dir(workdir: str) -> str:
  return path(workdir, REPORT)
