"""Run a study into a work directory: train all runs in one program, checkpoint, log metrics, analyse.

``run_study(cfg, workdir)`` is the importable body of ``experiments/group_universality.py``; a notebook can
call it too. The work directory is data, never code:

  config.json        the full config (JSON); a relaunch with a different config is refused
  runs.json          one row per leading index of the stacked state: name, group, seed, lr, weight_decay,
                     train_frac
  metrics.jsonl      one JSON object per evaluation: {"step", "train_loss", "train_acc", "test_loss",
                     "test_acc", "diverged"} with one value per run, plus "newly_diverged" run names
  checkpoints/       Orbax checkpoints of the stacked train state on a log-spaced schedule plus the last step
  analysis/, report/ written by engine.analysis and engine.report at the end

Relaunching the same command resumes from the newest restorable checkpoint; the final state equals an
uninterrupted run's bit for bit on CPU. Only process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from engine import checkpoint as checkpoint_lib

GENERALISED_ACC = 0.99  # a run counts as generalised once its test accuracy reaches this


class LaunchError(RuntimeError):
  """A work directory or config that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------------------------------
# Work directory bookkeeping.


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON types (tuples become lists), for config.json and comparisons."""
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


def atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise LaunchError(f"cannot create workdir {workdir}: {e.strerror}") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise LaunchError(f"workdir {workdir} is not writable")


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
  """An exclusive advisory lock on ``workdir/.lock``; a second launch on the same workdir is refused.

  The kernel drops the lock when the process dies (even by SIGKILL), so a crashed run can be relaunched.
  """
  path = os.path.join(workdir, ".lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise LaunchError(f"workdir {workdir} is in use by another launch (lock {path})") from None
      raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    yield
  finally:
    os.close(fd)


def check_or_write_config(workdir: str, cfg: ml_collections.ConfigDict) -> bool:
  """Writes config.json, or checks that an existing one matches. Returns True when resuming."""
  path = os.path.join(workdir, "config.json")
  new = config_to_dict(cfg)
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      raise LaunchError(f"workdir {workdir} has an unreadable config.json ({e}); use a new workdir") from None
    if old != new:
      keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise LaunchError(f"workdir {workdir} belongs to a different config (differs in: {', '.join(keys)}); "
                        "use a new workdir or the same config")
    return True
  atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
  return False


def run_name(row: dict) -> str:
  return (f"{row['group']}/seed{row.get('seed_index', row['seed'])}/lr{row['lr']:g}/wd{row['weight_decay']:g}"
          f"/frac{row['train_frac']:g}")


def _runs_rows(trainer) -> list[dict]:
  rows = []
  for row in trainer.runs:
    row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(row).items()}
    row["name"] = run_name(row)
    rows.append(row)
  return rows


class MetricsLog:
  """metrics.jsonl, appended one line per evaluation; truncated to the resumed step on relaunch."""

  def __init__(self, path: str, resume_step: int | None, enabled: bool):
    self.path = path
    self.enabled = enabled
    if not enabled:
      return
    if resume_step is None:
      atomic_write(path, "")
    elif os.path.exists(path):
      kept = [line for line in self._lines() if json.loads(line)["step"] <= resume_step]
      atomic_write(path, "".join(line + "\n" for line in kept))

  def _lines(self) -> list[str]:
    out = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          json.loads(line)
        except ValueError:
          break  # a line cut by a crash: drop it and everything after it
        out.append(line)
    return out

  def append(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()


def read_metrics(workdir: str) -> dict[str, np.ndarray]:
  """metrics.jsonl as arrays: "step" [E] and every metric [E, S]."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          records.append(json.loads(line))
        except ValueError:
          break
  if not records:
    return {"step": np.zeros((0,), np.int64)}
  keys = [k for k in records[0] if k not in ("newly_diverged",)]
  return {k: np.asarray([r[k] for r in records]) for k in keys}


# ---------------------------------------------------------------------------------------------------
# The training loop.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'runs'."""
  return jax.make_mesh((jax.device_count(),), ("runs",))


def host_state_spec(trainer) -> Any:
  """ShapeDtypeStructs of the checkpointed state: the train state of the real runs, on the host.

  Checkpoints hold the state without the padding runs that make the run axis divisible by the device
  count, so a checkpoint written on 8 devices (or 2 processes) restores on 1 and the other way round.
  """
  def unpadded(x):
    return jax.ShapeDtypeStruct((trainer.n_runs,) + tuple(x.shape[1:]), x.dtype)
  return jax.tree.map(unpadded, jax.eval_shape(trainer.init))


class _Progress:
  """A progress bar with model-steps/s and the share of runs that have generalised."""

  def __init__(self, total: int, start: int, n_runs: int, enabled: bool):
    self.enabled = enabled
    self.n_runs = n_runs
    self.t0, self.s0 = time.perf_counter(), start
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                      file=sys.stderr, smoothing=0.1)

  def update(self, step: int, n: int, test_acc: np.ndarray, diverged: np.ndarray) -> None:
    if not self.bar:
      return
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    rate = (step - self.s0) / elapsed
    gen = float(np.mean(test_acc >= GENERALISED_ACC))
    self.bar.set_postfix_str(f"{rate * self.n_runs:,.0f} model-steps/s, generalised {gen:.0%}"
                             + (f", diverged {int(diverged.sum())}" if diverged.any() else ""),
                             refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    if self.bar:
      self.bar.close()


def run_study(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
              analyze: bool | None = None) -> dict[str, Any]:
  """Trains every run of ``cfg`` into ``workdir`` (resuming if possible), then analyses and reports.

  Returns a dict with the workdir, the final step, the final metrics per run and the paths written.
  """
  from engine import config as config_lib
  from engine import train as train_lib

  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    _check_writable(workdir)
  lock = workdir_lock(workdir) if is_main else contextlib.nullcontext()
  with lock:
    resuming = check_or_write_config(workdir, cfg) if is_main else True
    trainer = train_lib.make_train(cfg, mesh=make_mesh())
    rows = _runs_rows(trainer)
    if is_main:
      atomic_write(os.path.join(workdir, "runs.json"), json.dumps(rows, indent=1) + "\n")
    final = _train_loop(cfg, trainer, rows, workdir, resuming, progress and is_main, is_main)
    if cfg.analyze if analyze is None else analyze:  # under the lock: no launch may write meanwhile
      final.update(_analyze_and_report(workdir, progress=progress and is_main))
  if is_main:
    print(f"Done: {len(rows)} runs x {final['step']} steps in {workdir}"
          + (f"; report at {final['report']}" if final.get("report") else ""), flush=True)
  return final


def _train_loop(cfg, trainer, rows, workdir, resuming, show_progress, is_main) -> dict[str, Any]:
  schedule = set(checkpoint_lib.log_spaced_steps(cfg.steps, cfg.num_checkpoints, cfg.eval_every))
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return _train_with(cfg, trainer, rows, workdir, resuming, show_progress, is_main, schedule, ckpt)


def _train_with(cfg, trainer, rows, workdir, resuming, show_progress, is_main, schedule, ckpt):
  state = trainer.init()
  step = 0
  was_diverged = np.zeros(len(rows), dtype=bool)
  if ckpt.steps():
    step, host = ckpt.restore(host_state_spec(trainer))
    state = trainer.shard(host)
    was_diverged = np.asarray(host.diverged, dtype=bool)  # reported before the crash: not again
    logging.info("resuming %s from step %d", workdir, step)
    if is_main:
      print(f"Resuming from checkpoint at step {step}", flush=True)
  elif resuming and is_main:
    print("No checkpoint found in an existing workdir: starting from step 0", flush=True)
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), step if ckpt.steps() else None, is_main)
  if step == 0:
    ckpt.save(0, trainer.unpad(state))
  bar = _Progress(cfg.steps, step, len(rows), show_progress)
  names = [r["name"] for r in rows]
  last = None

  def log_metrics(at_step, metrics):
    nonlocal was_diverged, last
    m = {k: np.asarray(v)[-1, :len(rows)] for k, v in metrics.items()}
    diverged = m["diverged"].astype(bool)
    new = [names[i] for i in np.flatnonzero(diverged & ~was_diverged)]
    for name in new:
      logging.warning("run %s diverged by step %d and is frozen", name, at_step)
      if is_main:
        print(f"WARNING: run {name} diverged by step {at_step}; it is frozen", flush=True)
    was_diverged |= diverged
    record = {"step": at_step, **{k: [float(x) for x in v] for k, v in m.items()}, "newly_diverged": new}
    log.append(record)
    bar.update(at_step, cfg.eval_every, m["test_acc"], diverged)
    last = m

  try:
    while step < cfg.steps:
      state, metrics = trainer.run(state, 1)  # metrics come back on the host, one row per run
      step += cfg.eval_every
      log_metrics(step, metrics)
      if step in schedule:
        ckpt.save(step, trainer.unpad(state))
  finally:
    bar.close()
  if last is None:  # already finished: report the last logged metrics
    logged = read_metrics(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else {}
    last = {k: v[-1] for k, v in logged.items() if k != "step" and len(v)}
  return {"workdir": workdir, "step": step, "final_metrics": last}


def _analyze_and_report(workdir: str, progress: bool) -> dict[str, Any]:
  """Runs engine.analysis and engine.report on the finished workdir (process 0 writes the files)."""
  from engine import analysis
  from engine import report
  if jax.process_index() != 0:  # the analysis reads checkpoints on this process alone: one is enough
    return {}
  return {"summary": analysis.analyze(workdir, progress=progress), "report": report.write_report(workdir)}
