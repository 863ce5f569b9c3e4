"""universality.engine.events: TensorBoard scalars of every run hold exactly what metrics.jsonl logged, resumed launches
included (read back with tensorboardX's protocol buffers and its record checksum)."""

import json
import os
import shutil
import struct

import pytest

from universality.engine import events, launch, rundir
from tests.helpers import group_config


def _read_events(file_path):
  """Every event of a TFRecord event file, each record's length and data checksums verified."""
  from tensorboardX.record_writer import masked_crc32c
  out = []
  data = open(file_path, "rb").read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
    body = data[pos + 12:pos + 12 + length]
    assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
    out.append(_event_pb2().Event.FromString(body))
    pos += 16 + length
  return out


def _event_pb2():
  from tensorboardX.proto import event_pb2
  return event_pb2


def _scalars(run_directory):
  """{(tag, step): value} over every event file of a run (a later file's SessionLog.START drops the steps
  at and after its step from the files before it, as TensorBoard's event accumulator does), and the START
  steps."""
  values, starts = {}, []
  for name in sorted(os.listdir(run_directory)):
    for ev in _read_events(os.path.join(run_directory, name)):
      if ev.HasField("session_log") and ev.session_log.status == _event_pb2().SessionLog.START:
        starts.append(ev.step)
        values = {k: v for k, v in values.items() if k[1] < ev.step}
      for v in ev.summary.value:
        values[(v.tag, ev.step)] = v.simple_value
  return values, starts


def test_event_files_hold_the_logged_scalars_and_a_resume_purges_later_steps(tmp_path):
  pytest.importorskip("tensorboardX")  # the optional writer (setup.cfg extras "tensorboard" and "test")
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 40, 10, 3
  cfg.exec.tensorboard = True
  workdir = tmp_path / "w"
  launch.run_study(cfg, str(workdir), progress=False)
  # Resume from step 10 (checkpoint 40 moved away): steps 20..40 are logged again, in a second file.
  shutil.move(str(workdir / rundir.CHECKPOINTS / "40"), str(tmp_path / "40"))
  launch.run_study(cfg, str(workdir), progress=False)
  records = [json.loads(l) for l in (workdir / rundir.METRICS).read_text().splitlines()]
  names = [r["name"] for r in json.loads((workdir / rundir.RUNS).read_text())]
  assert len(os.listdir(workdir / rundir.TENSORBOARD)) == len(names) == 2
  for i, name in enumerate(names):
    directory = events.run_dir(str(workdir), name)
    assert len(os.listdir(directory)) == 2  # one file per launch: the first is never rewritten
    values, starts = _scalars(directory)
    assert starts == [11]  # TensorBoard keeps the steps below it from the first file: step 10 stays
    expected = {(k, r["step"]): r[k][i] for r in records for k in r if k not in ("step", "newly_diverged")}
    assert {"train_loss", "test_acc", "diverged"} <= {k for k, _ in expected}
    assert values.keys() == expected.keys()
    for key, v in expected.items():
      assert values[key] == pytest.approx(v, rel=1e-7, abs=0), key  # float32 in the event, as computed


def test_missing_tensorboardx_is_one_line_error_before_anything_is_written(tmp_path, monkeypatch):
  def missing():
    raise rundir.RunDirError(events._MISSING)  # pylint: disable=protected-access
  monkeypatch.setattr(events, "_tensorboardx", missing)
  cfg = group_config(groups="C5", embed_dim=8, hidden=8, analyze=False)
  cfg.exec.tensorboard = True
  with pytest.raises(launch.LaunchError, match=r"^config.exec.tensorboard needs the tensorboardX package"):
    launch.run_study(cfg, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()
