"""TensorBoard scalars of every run, beside metrics.jsonl (``exec.tensorboard``).

``tensorboard --logdir runs/`` then shows a sweep: one TensorBoard run per run of the study,
``<workdir>/tensorboard/<run name>/``, its tags the metric names of metrics.jsonl (``train_loss``,
``test_acc``, ..., ``diverged``). metrics.jsonl stays the source of truth; these files are a view of it.

The events are TensorBoard's protocol buffers from tensorboardX (no TensorFlow), framed as TFRecords here
rather than through tensorboardX's writers: those keep a file and a thread open per run and fsync on flush,
where a sweep of hundreds of runs needs one appended write per run and evaluation. Each launch starts a new
file per run, so a relaunch never rewrites an earlier one; a resumed launch opens with a ``SessionLog.START``
just after its resume step, which tells TensorBoard to drop the steps after it that an earlier file holds
(the relaunch logs them again, as metrics.jsonl is cut back to that step).

On an object store (a ``gs://`` workdir), which cannot append, each launch's file of a run is rewritten
whole from memory at most every ``REMOTE_FLUSH_S`` seconds and when the metrics log closes: a killed launch
loses at most that much of this view (never of metrics.jsonl, which is appended at every evaluation).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import zlib

from universality.engine import paths
from universality.engine import rundir

REMOTE_FLUSH_S = 60.0  # gs://: how often a launch's event files are rewritten

_MISSING = ("config.exec.tensorboard needs the tensorboardX package: pip install -e '.[tensorboard]' "
            "(or set it to False)")


def _tensorboardx():
  """The tensorboardX modules used here; a one-line RunDirError when the optional package is absent."""
  try:
    from tensorboardX.proto import event_pb2, summary_pb2
    from tensorboardX.record_writer import masked_crc32c
  except ImportError:
    raise rundir.RunDirError(_MISSING) from None
  return event_pb2, summary_pb2, masked_crc32c


def check_available() -> None:
  _tensorboardx()


def run_dir(workdir: str, run_name: str) -> str:
  """The TensorBoard run directory of one run (its name made safe for a path, and unique by a checksum)."""
  safe = re.sub(r"[^A-Za-z0-9.=,_-]+", "_", run_name).strip("_") or "run"
  return paths.join(workdir, rundir.TENSORBOARD, f"{safe}-{zlib.crc32(run_name.encode()):08x}")


class ScalarEvents:
  """Appends every metrics record to one event file per run (process 0 only: ``enabled``)."""

  def __init__(self, workdir: str, run_names: list[str], resume_step: int | None, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self._event_pb2, self._summary_pb2, self._crc = _tensorboardx()
    stamp = f"{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
    self.paths = []
    for name in run_names:
      directory = run_dir(workdir, name)
      paths.makedirs(directory)
      self.paths.append(paths.join(directory, f"events.out.tfevents.{stamp}"))
    self._remote = paths.is_remote(workdir)
    self._written: dict[str, bytearray] = {p: bytearray() for p in self.paths}  # gs://: the whole files
    self._flushed = time.monotonic()
    first = [self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")]
    if resume_step:
      # TensorBoard keeps the earlier files' steps below a START's step: the resumed step itself stays.
      first.append(self._event_pb2.Event(wall_time=time.time(), step=int(resume_step) + 1,
                                         session_log=self._event_pb2.SessionLog(
                                             status=self._event_pb2.SessionLog.START)))
    for p in self.paths:
      self._write(p, first)
    self.flush()

  def _write(self, file_path: str, events) -> None:
    out = bytearray()
    for event in events:
      data = event.SerializeToString()
      header = struct.pack("<Q", len(data))
      out += header + struct.pack("<I", self._crc(header)) + data + struct.pack("<I", self._crc(data))
    if self._remote:
      self._written[file_path] += out
    else:
      paths.append(file_path, bytes(out))

  def flush(self) -> None:
    """gs://: rewrites every file of this launch from memory (locally each write is appended at once)."""
    if self._remote:
      for p, data in self._written.items():
        paths.write_atomic(p, bytes(data))
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self.flush()

  def append(self, record: dict) -> None:
    """Writes one metrics.jsonl record: every metric that is a number per run, at the record's step."""
    if not self.enabled:
      return
    step, now = int(record["step"]), time.time()
    metrics = {k: v for k, v in record.items()
               if isinstance(v, list) and len(v) == len(self.paths) and all(isinstance(x, float) for x in v)}
    for i, p in enumerate(self.paths):
      values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v[i]) for k, v in metrics.items()]
      self._write(p, [self._event_pb2.Event(wall_time=now, step=step,
                                            summary=self._summary_pb2.Summary(value=values))])
    if self._remote and time.monotonic() - self._flushed >= REMOTE_FLUSH_S:
      self.flush()
