"""Run a study into a work directory: train all runs in one program, checkpoint, log metrics, analyse.

``run_study(cfg, workdir)`` is the importable body of ``experiments/group_universality.py``; a notebook can
call it too. The work directory's format belongs to ``universality.engine.rundir``. Relaunching the same
command resumes from the newest restorable checkpoint; the final state equals an uninterrupted run's bit for
bit on CPU. A relaunch with a different study config is refused; execution settings (``config.exec``) may
differ. Only process 0 writes files other than checkpoints.

Beside the log-spaced analysis checkpoints, the whole state is written as the rolling resume checkpoint
(``checkpoints_resume/``, only the newest kept) every ``exec.resume_every_steps`` steps or
``exec.resume_every_minutes`` of wall time, so a crash loses bounded work. SIGTERM or SIGINT during training
stops every process at the end of the same eval interval, writes a checkpoint at that step (the resume
checkpoint, or the analysis checkpoint when the step is on its schedule) and raises ``Preempted`` (the entry
point exits with ``PREEMPTED_EXIT``). A relaunch resumes from the newest step of either kind.

A study its family splits into buckets (``Family.buckets``; e.g. groups of very different orders) is trained
bucket after bucket, each one program compiled once and spread over every device, into the bucket's own run
directory (universality.engine.rundir: ``buckets/<name>/``), which is exactly what a launch of the bucket's
config alone writes; the study's config.json and report index sit above them. A relaunch skips the finished
buckets (final checkpoint, and report when analysing) and resumes the one in progress; ``Preempted`` stops the
bucket in progress like a one-program launch. The memory check covers every bucket before any is built.

A launch is checked against the memory it may use (``universality.engine.budget``) before anything is built,
and writes config.json only once its state exists (initialised or restored): a refused or crashed start leaves
no config.json behind, and an existing one is never rewritten. A relaunch whose metrics log lost the line of
the step it resumes from recomputes that line from the checkpoint.

A run directory is a contract: a work directory holding checkpoints but no config.json is refused (nothing
would tell which study trained them), and a checkpoint whose array shapes (its own Orbax metadata) contradict
the config is refused before it is restored, never trained past. An analysis that fails on an older
checkpoint that no longer verifies sets that checkpoint aside and analyses the rest, so a relaunch repairs it.

This is the top of the engine: nothing else in it imports this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from universality.engine import budget
from universality.engine import checkpoint as checkpoint_lib
from universality.engine import config as config_lib
from universality.engine import events
from universality.engine import families
from universality.engine import paths
from universality.engine import replay
from universality.engine import report
from universality.engine import rundir
from universality.engine import train as train_lib
from universality.engine.analysis import driver

LaunchError = rundir.RunDirError  # a work directory or config that cannot be used; one-line message
# The exit status of a launch stopped by SIGTERM or SIGINT once its checkpoint is written: EX_TEMPFAIL
# of sysexits.h ("try again later"), so a requeue script can tell a preemption from a failure (2) or a crash.
PREEMPTED_EXIT = 75


class Preempted(RuntimeError):
  """Training stopped on SIGTERM or SIGINT at the end of an eval interval, with a checkpoint at that
  step and the metrics logged up to it; the message is one line."""

  def __init__(self, signal_name: str, step: int):
    super().__init__(f"{signal_name}: stopped at step {step} with a checkpoint; relaunch the same command "
                     "to resume")
    self.signal_name, self.step = signal_name, step


def _runs_rows(trainer) -> list[dict]:
  return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in dict(row).items()}
          for row in trainer.runs]


# ---------------------------------------------------------------------------------------------------
# The training loop.


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, axis 'runs'."""
  return jax.make_mesh((jax.device_count(),), ("runs",))


class _Progress:
  """A progress bar with model-steps/s and the share of runs that have generalised."""

  def __init__(self, total: int, start: int, n_runs: int, enabled: bool, family: families.Family):
    self.enabled = enabled
    self.family = family
    self.n_runs = n_runs
    self.t0, self.s0 = time.perf_counter(), start
    self.bar = None
    if enabled:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0,
                      file=sys.stderr, smoothing=0.1)

  def update(self, step: int, n: int, metrics: dict, diverged: np.ndarray) -> None:
    if not self.bar:
      return
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    rate = (step - self.s0) / elapsed
    gen = float(np.mean(self.family.generalised_mask(metrics)))
    self.bar.set_postfix_str(f"{rate * self.n_runs:,.0f} model-steps/s, generalised {gen:.0%}"
                             + (f", diverged {int(diverged.sum())}" if diverged.any() else ""),
                             refresh=False)
    self.bar.update(n)

  def close(self) -> None:
    if self.bar:
      self.bar.close()


def run_study(cfg: ml_collections.ConfigDict | config_lib.Study, workdir: str, *, progress: bool = True,
              analyze: bool | None = None) -> dict[str, Any]:
  """Trains every run of ``cfg`` into ``workdir`` (resuming if possible), then analyses and reports.

  ``cfg``: a study config, or the ``Study`` a caller already built from it (``config.study``: validated
  once, its family resolved once, passed along from here). A study its family splits into several buckets
  (``Family.buckets``) trains them one after another, each one program on every device, into
  ``buckets/<name>/`` (universality.engine.rundir); a relaunch skips the finished ones and resumes the one
  in progress.

  Returns a dict with the workdir, the final step, the final metrics per run and the paths written (for
  several buckets: ``buckets``, that dict per bucket, and ``report``, the study's report index).
  """
  study = config_lib.study(cfg)
  workdir = rundir.resolve(workdir)  # an absolute local path or a gs:// URL; another scheme is refused
  # One program: a study of one bucket, or a run directory written before its study was split.
  if len(study.programs) > 1 and _agreed(rundir.has_runs(workdir)):
    if jax.process_index() == 0:
      print(f"{workdir} is one run directory (written before buckets existed): trained as one program",
            flush=True)
    study = study._replace(programs=((study.family.name, study.cfg),))
  _check_budget(study, jax.devices())  # before anything is built or written
  if study.cfg.exec.tensorboard:
    events.check_available()
  if len(study.programs) == 1:
    study = study._replace(cfg=study.family.resolve(study.cfg))
    return _run_one(study.cfg, study.family, workdir, progress=progress, analyze=analyze)
  return _run_buckets(study.resolved(), workdir, progress=progress, analyze=analyze)


def check_size(cfg: ml_collections.ConfigDict | config_lib.Study) -> config_lib.Study:
  """The config's validation and memory check (``run_study`` repeats the check), for a caller that describes
  the study first: describing may read its data (a corpus), which must not happen before the check refuses.
  Returns the ``Study``, to hand to ``describe`` and ``run_study``."""
  study = config_lib.study(cfg)
  _check_budget(study, jax.devices())
  return study


def describe(cfg: ml_collections.ConfigDict | config_lib.Study) -> list[str]:
  """Lines naming the buckets of ``cfg`` (``Family.buckets``), their runs and task (printed at launch)."""
  study = config_lib.study(cfg)
  out = [f"{len(study.programs)} buckets, trained one after another, each one program compiled once:"
         if len(study.programs) > 1 else "One program, compiled once:"]
  for name, cfg_b in study.programs:
    task = study.family.describe(cfg_b)[0].lstrip("- ")
    out.append(f"  {name}: {study.family.n_runs(cfg_b)} runs; {task}")
  return out


def _agreed(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (it alone reads the work directory before a launch writes)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag if jax.process_index() == 0 else 0)))


def _check_budget(study: config_lib.Study, devices) -> None:
  """The memory check of every program of a launch (the largest bucket decides), named when several."""
  for name, cfg_b in study.programs:
    try:
      budget.check(cfg_b, devices, study.family)
    except budget.BudgetError as e:
      if len(study.programs) == 1:
        raise
      raise budget.BudgetError(f"bucket {name}: {e}") from None


def _bucket_finished(cfg, workdir: str, analyze: bool) -> bool:
  """Whether a bucket's run directory holds its final checkpoint (and, when ``analyze``, its report) for
  this very config; a run directory of another config is refused with the usual one-line error."""
  if not (rundir.is_rundir(workdir) and rundir.has_final_checkpoint(workdir, cfg.steps)):
    return False
  config_lib.check_workdir(workdir, cfg)  # another config's directory: refused
  if not analyze:
    return True
  try:  # a damaged summary is not a finished analysis: the bucket is analysed again
    steps = rundir.read_summary(workdir).get("steps", []) if rundir.has_summary(workdir) else []
  except rundir.RunDirError:
    return False
  return isinstance(steps, list) and steps[-1:] == [cfg.steps] and report.has_report(workdir)


@contextlib.contextmanager
def _claimed(cfg, workdir: str):
  """Holds ``workdir`` for a launch of ``cfg``: process 0 checks that it can be written, takes its lock and
  checks its config.json against ``cfg``. Yields ``(identity, written)``: the config as config.json holds it,
  and whether config.json already names this study (always True on the other processes)."""
  is_main = jax.process_index() == 0
  if is_main:
    rundir.check_writable(workdir)
  with rundir.lock(workdir) if is_main else contextlib.nullcontext():
    written = config_lib.check_workdir(workdir, cfg) if is_main else True
    if not written:
      rundir.check_unclaimed_state(workdir)
    yield config_lib.identity(cfg), written


def _run_buckets(study: config_lib.Study, workdir: str, *, progress: bool, analyze: bool | None
                 ) -> dict[str, Any]:
  """``run_study`` of a study of several buckets (universality.engine.rundir), one after another."""
  cfg, family, programs = study
  is_main = jax.process_index() == 0
  do_analyze = cfg.exec.analyze if analyze is None else analyze
  with _claimed(cfg, workdir) as (identity, written):

    def started():  # the first bucket's state exists: the directory may now name the study
      nonlocal written
      if is_main and not written:
        rundir.write_config(workdir, identity)
        written = True

    results = {}
    for i, (name, cfg_b) in enumerate(programs, 1):
      bucket = rundir.bucket_dir(workdir, name)
      head = f"Bucket {i}/{len(programs)} {name} ({family.n_runs(cfg_b)} runs)"
      if _agreed(is_main and _bucket_finished(cfg_b, bucket, do_analyze)):
        if is_main:
          print(f"{head}: finished, skipped", flush=True)
        logged = rundir.read_metrics(bucket, family.n_runs(cfg_b)) if is_main and rundir.has_metrics(bucket) \
            else {}
        results[name] = {"workdir": bucket, "step": cfg_b.steps, "skipped": True,
                         "final_metrics": {k: v[-1] for k, v in logged.items() if k != "step" and len(v)}}
        continue
      if is_main:
        print(f"{head}: {family.describe(cfg_b)[0].lstrip('- ')}", flush=True)
      results[name] = _run_one(cfg_b, family, bucket, progress=progress, analyze=analyze, on_start=started)
    out = {"workdir": workdir, "step": cfg.steps, "buckets": results}
    if do_analyze and is_main:  # under the lock, as each bucket's own report
      ran = not all(r.get("skipped") for r in results.values())
      out["report"] = report.write_study_report(workdir) if ran or not report.has_report(workdir) else \
          paths.join(rundir.report_dir(workdir), "index.md")
  if is_main:
    runs = sum(family.n_runs(cfg_b) for _, cfg_b in programs)
    print(f"Done: {len(programs)} buckets, {runs} runs x {cfg.steps} steps in {workdir}"
          + (f"; report at {out['report']}" if out.get("report") else ""), flush=True)
  return out


def _run_one(cfg, family, workdir: str, *, progress: bool, analyze: bool | None, on_start=None
             ) -> dict[str, Any]:
  """``run_study`` of one program into one run directory; ``on_start()`` runs once its state exists."""
  is_main = jax.process_index() == 0
  with _claimed(cfg, workdir) as (identity, resuming):
    trainer = train_lib.make_train(cfg, mesh=make_mesh(), family=family)
    rows = _runs_rows(trainer)

    def started():  # the state exists (initialised or restored): the run directory may now name the study
      if on_start is not None:
        on_start()
      if is_main:
        if not resuming:
          rundir.write_config(workdir, identity)
        rundir.write_runs(workdir, rows)

    final = _train_loop(cfg, trainer, rows, workdir, started, progress and is_main, is_main)
    if cfg.exec.analyze if analyze is None else analyze:  # under the lock: no launch may write meanwhile
      final.update(_analyze_and_report(workdir, dict(cfg.analysis), progress=progress and is_main))
  if is_main:
    print(f"Done: {len(rows)} runs x {final['step']} steps in {workdir}"
          + (f"; report at {final['report']}" if final.get("report") else ""), flush=True)
  return final


class _StopRequests:
  """SIGTERM and SIGINT, while training, as a request to stop at the end of the current eval interval.

  Preemptible VMs and SLURM send SIGTERM shortly before they stop a job. A handler only sets a flag (a
  second SIGINT aborts at once, as Ctrl-C usually does); the loop reads it between intervals, where the
  state is whole. Every process of a multi-process job must stop after the same interval, or the others
  would hang in the next interval's collectives. JAX's preemption sync point
  (``multihost_utils.reached_preemption_sync_point``) needs the coordination service's preemption notifier,
  which hears SIGTERM only and does not exist in a single-process launch. Instead every process adds its
  flag to one allgather of a few int32 per interval (next to the interval's metrics, which are gathered
  anyway: one network round trip, milliseconds, against an interval's eval_every steps of every run), and
  all stop when any asked.
  The handlers are installed after ``jax.distributed.initialize``, so they replace that notifier's, and
  are removed when training ends: the analysis after it is not interruptible this way.
  """

  def __init__(self):
    self.signal: str | None = None   # the first signal this process received
    self.stopped: str | None = None   # the signal every process agreed to stop on
    self._previous: dict = {}

  def __enter__(self) -> "_StopRequests":
    if threading.current_thread() is threading.main_thread():  # Python handles signals in it alone
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      if self.stopped == "SIGTERM" and sig == signal.SIGTERM:
        previous = signal.SIG_IGN  # a scheduler's notice may repeat: it must not kill the exit under way
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: a handler set outside Python

  def _handle(self, signum, frame) -> None:
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signal is None:
      self.signal = signal.Signals(signum).name
      logging.info("%s received: stopping at the end of this eval interval", self.signal)

  def agreed(self, resume_due: bool = False) -> tuple[str | None, bool]:
    """After an interval: the name of the signal that stops training (None: go on), and whether any process
    finds a resume checkpoint due (its wall clock may differ from the others'). Collective: every process
    calls it after every interval."""
    if jax.process_count() == 1:
      name, due = self.signal, resume_due
    else:
      mine = signal.Signals[self.signal].value if self.signal else 0
      gathered = multihost_utils.process_allgather(np.asarray([mine, int(resume_due)], np.int32))
      codes = np.asarray(gathered).reshape(-1, 2)
      asked = [int(c) for c in codes[:, 0] if c]
      name = (self.signal or signal.Signals(asked[0]).name) if asked else None
      due = bool(codes[:, 1].any())
    self.stopped = name
    return name, due


class _ResumeSchedule:
  """When the rolling resume checkpoint is due: the first interval end that reaches a multiple of
  ``every_steps``, or ``every_minutes`` of wall time since the last checkpoint of either kind (0: off)."""

  def __init__(self, every_steps: int, every_minutes: float):
    self.every_steps, self.seconds = int(every_steps), 60.0 * float(every_minutes)
    self.last_time = time.monotonic()

  def due(self, before: int, step: int) -> bool:
    """Whether an interval from ``before`` to ``step`` calls for a resume checkpoint (this process's clock)."""
    by_steps = self.every_steps > 0 and step // self.every_steps > before // self.every_steps
    by_time = self.seconds > 0 and time.monotonic() - self.last_time >= self.seconds
    return by_steps or by_time

  def saved(self) -> None:
    self.last_time = time.monotonic()


def _train_loop(cfg, trainer, rows, workdir, started, show_progress, is_main) -> dict[str, Any]:
  schedule = set(checkpoint_lib.log_spaced_steps(cfg.steps, cfg.num_checkpoints, cfg.eval_every))
  # The handlers outlive the checkpointers: a signal that arrives while the last checkpoint is committed
  # must not cut it short.
  # Saves overlap training on every platform: waiting for each save on the CPU (overlap=False) cost more
  # (benchmarks/README.md, "Checkpoint stall").
  with _StopRequests() as stop, \
      checkpoint_lib.Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS)) as ckpt, \
      checkpoint_lib.Checkpointer(rundir.path(workdir, rundir.RESUME_CHECKPOINTS), keep=1) as resume:
    for c in (ckpt, resume):  # a stopped launch waits a bounded time for a save (a dead storage server)
      c.stop_requested = lambda: stop.signal is not None
    return _train_with(cfg, trainer, rows, workdir, started, show_progress, is_main, schedule, ckpt, resume,
                       stop)


def _record(at_step: int, m: dict, names: list[str], was_diverged: np.ndarray) -> tuple[dict, list[str]]:
  """The metrics.jsonl record of one evaluation and the runs that diverged since ``was_diverged``."""
  new = [names[i] for i in np.flatnonzero(m["diverged"].astype(bool) & ~was_diverged)]
  return {"step": at_step, **{k: [float(x) for x in v] for k, v in m.items()}, "newly_diverged": new}, new


def _open_log(workdir, step, resumed, is_main, n_runs) -> rundir.MetricsLog:
  log = rundir.MetricsLog(workdir, step if resumed else None, is_main, n_runs)
  if log.damaged:
    lines = ", ".join(map(str, log.damaged[:5])) + (", ..." if len(log.damaged) > 5 else "")
    logging.warning("%s: damaged lines %s skipped; the file as found is kept as %s", log.path, lines, log.aside)
    print(f"WARNING: {len(log.damaged)} damaged line(s) of {os.path.basename(log.path)} skipped (line {lines}); "
          f"the file as found is kept as {os.path.basename(log.aside)}", flush=True)
  return log


def _recompute_missing(trainer, state, step, log, names) -> dict | None:
  """The metrics of the resumed step recomputed from its checkpoint when the log lost them (e.g. a last
  line cut by a crash); every process evaluates, process 0 appends the line. Returns them (None: not lost)."""
  if jax.process_count() == 1 and step in log.steps:
    return None
  m = trainer.evaluate(state)  # collective: with several processes only process 0 reads the log
  if step in log.steps or not log.enabled:
    return None
  before = np.zeros(len(names), bool)  # the runs reported diverged in the last line kept
  if log.last and "diverged" in log.last:
    before = np.asarray(log.last["diverged"], bool)
  record, _ = _record(step, m, names, before)
  log.append(record)
  print(f"Recomputed the metrics of step {step} from its checkpoint (missing from {os.path.basename(log.path)})",
        flush=True)
  return m


def _train_with(cfg, trainer, rows, workdir, started, show_progress, is_main, schedule, ckpt, resume, stop):
  state = trainer.init()
  step = 0
  was_diverged = np.zeros(len(rows), dtype=bool)
  found = checkpoint_lib.restore_newest([ckpt, resume], train_lib.host_state_spec(trainer))
  resumed = found is not None
  if resumed:
    step, host = found
    state = trainer.shard(host)
    was_diverged = np.asarray(host.diverged, dtype=bool)  # reported before the crash: not again
    logging.info("resuming %s from step %d", workdir, step)
    if is_main:
      kind = "" if step in ckpt.steps() else " (the resume checkpoint)"
      print(f"Resuming from checkpoint at step {step}{kind}", flush=True)
  elif is_main and rundir.is_rundir(workdir):
    print("No checkpoint found in an existing workdir: starting from step 0", flush=True)
  for c in (ckpt, resume):  # steps a killed launch committed but did not seal
    c.seal_committed()
  started()
  log = _open_log(workdir, step, resumed, is_main, len(rows))
  names = [r["name"] for r in rows]
  if cfg.exec.tensorboard and is_main:
    log.mirror = events.ScalarEvents(workdir, names, step if resumed else None)
  last = _recompute_missing(trainer, state, step, log, names) if step else None
  if step == 0:
    ckpt.save(0, trainer.checkpoint_view(state, copy=ckpt.overlap))
  bar = _Progress(cfg.steps, step, len(rows), show_progress, trainer.family)

  def log_metrics(at_step, metrics):
    nonlocal was_diverged, last
    m = {k: np.asarray(v)[-1, :len(rows)] for k, v in metrics.items()}
    record, new = _record(at_step, m, names, was_diverged)
    for name in new:
      logging.warning("run %s diverged by step %d and is frozen", name, at_step)
      if is_main:
        print(f"WARNING: run {name} diverged by step {at_step}; it is frozen", flush=True)
    was_diverged |= m["diverged"].astype(bool)
    log.append(record)
    bar.update(at_step, cfg.eval_every, m, m["diverged"].astype(bool))
    last = m

  timer = _ResumeSchedule(cfg.exec.resume_every_steps, cfg.exec.resume_every_minutes)
  try:
    stopped_by, _ = stop.agreed(False)
    if stopped_by and step < cfg.steps:  # a signal while restoring or starting: its checkpoint is on disk
      raise Preempted(stopped_by, step)
    while step < cfg.steps:
      state, metrics = trainer.run(state, 1)  # metrics come back on the host, one row per run
      step += cfg.eval_every
      log_metrics(step, metrics)
      stopped_by, due = stop.agreed(timer.due(step - cfg.eval_every, step))
      if step in schedule:
        # the whole state too: a point to resume from as well
        ckpt.save(step, trainer.checkpoint_view(state, copy=ckpt.overlap))
        timer.saved()
      elif due or stopped_by:
        # replaces the previous one once committed (keep=1)
        resume.save(step, trainer.checkpoint_view(state, copy=resume.overlap))
        timer.saved()
      if stopped_by:
        raise Preempted(stopped_by, step)  # the checkpoints are committed and sealed as their managers close
  finally:
    bar.close()
    log.close()
  if last is None:  # already finished: report the last logged metrics
    logged = rundir.read_metrics(workdir, len(rows)) if rundir.has_metrics(workdir) else {}
    last = {k: v[-1] for k, v in logged.items() if k != "step" and len(v)}
  return {"workdir": workdir, "step": step, "final_metrics": last}


def _analyze_and_report(workdir: str, settings: dict, progress: bool) -> dict[str, Any]:
  """Runs universality.engine.analysis (with the config's analysis ``settings``) and universality.engine.report on the finished workdir
  (process 0 writes the files)."""
  if jax.process_index() != 0:  # the analysis reads checkpoints on this process alone: one is enough
    return {}
  try:
    with replay.open(workdir) as run:
      summary = driver.analyze(run, progress=progress, **settings)
      return {"summary": summary, "report": report.write_report_of(run)}
  except checkpoint_lib.CheckpointError:
    # An older checkpoint that no longer reads would fail every relaunch: set it aside, analyse the rest.
    if not checkpoint_lib.set_aside_corrupt(rundir.path(workdir, rundir.CHECKPOINTS)):
      raise
  with replay.open(workdir) as run:
    summary = driver.analyze(run, progress=progress, **settings)
    return {"summary": summary, "report": report.write_report_of(run)}
