"""Orbax checkpoints of the stacked training state of all runs.

A run directory holds ``checkpoints/<step>/state`` (Orbax, written asynchronously and committed atomically
by every process of a multi-host job). Steps follow a log-spaced schedule plus the last step, because the
analyses need early checkpoints to find the order in which features are learned. The rolling resume
checkpoint (``checkpoints_resume/<step>``, ``keep=1``) is a second Checkpointer of the same kind that the
analyses never read; ``restore_newest`` resumes from the newest step of both.

Arrays are stored as Orbax's zarr chunks in OCDBT files (``PyTreeCheckpointHandler``), uncompressed: zstd
shrinks float32 weights and Adam moments little, and its CPU time is taken from training on a small machine
(benchmarks/README.md, "Checkpoint stall"). Older compressed checkpoints restore as before (the codec is in
each array's metadata). A restore target without shardings comes back as host numpy arrays, whatever the
devices and processes that wrote the checkpoint.

A save blocks only while Orbax takes the arrays (device buffers of their own: ``Trainer.checkpoint_view``);
writing and committing run in Orbax's background thread. Once Orbax has committed a step, a sealing thread of
this class writes the sha256 of every file of the step into it on process 0
(``universality.engine.rundir.write_checksums``) while training goes on; the next save, and ``close``, wait
for it. With ``overlap=False`` the save instead waits for its commit and checksums before it returns (launches
do not use it: on the CPU it made the training after each save slower, benchmarks/README.md, "Checkpoint
stall"). A restore first verifies the checksums, so a
flipped byte that Orbax would read without complaint is caught. A step without checksums — written by an
older engine, or a step of a launch killed between its commit and its checksums (the next launch seals such
steps once it has restored: ``seal_committed``) — is verified only by restoring it (noted in the log).

Once the launch has been asked to stop (SIGTERM), a save still waiting for its commit after ``SEAL_GRACE_S``
is given up (``SaveAbandoned``): a storage server that died would otherwise hold the launch for ever.

Restoring picks the newest checkpoint that verifies and restores cleanly: a truncated or corrupt one is
reported with a one-line warning, moved aside to ``corrupt_checkpoints/<step>-<time>`` beside
``checkpoints/`` (never deleted; a read-only reader only skips it), and the previous one is used.

The directory may be a ``gs://`` URL (``universality.engine.paths``): Orbax then writes through TensorStore
and marks a committed step with a ``commit_success.txt`` object instead of renaming a temporary directory; the
checksums, their verification and the move aside go through ``universality.engine.paths`` (a move on an object
store is a copy and a delete, not atomic).
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from universality.engine import paths
from universality.engine import rundir


def _drop_closed_loop_callbacks() -> None:
  """Drops the "Event loop is closed" errors of a failed restore or save from ``sys.unraisablehook`` (once).

  When Orbax gives up on a corrupt checkpoint, or on a save that failed (a full disk), it closes its event
  loop while TensorStore still completes the reads or writes in flight; each completion raises in a
  TensorStore thread and would print a traceback, burying the one-line warning or error. Every other
  unraisable error goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint directory that cannot be written."""


class SaveAbandoned(CheckpointError):
  """A save that did not commit within ``SEAL_GRACE_S`` of a stop request (the storage does not answer); Orbax's
  threads may still be blocked in it, so the process should exit without waiting for them."""


# How long a save may still take once a stop was asked (SIGTERM): a save of a healthy disk or bucket commits
# well within it; a storage server that died leaves TensorStore retrying for much longer.
SEAL_GRACE_S = 30.0


def log_spaced_steps(total_steps: int, num: int, multiple: int = 1) -> list[int]:
  """``num`` roughly log-spaced steps in ``[0, total_steps]``, rounded to multiples of ``multiple``.

  Always contains 0 (the initialisation) and ``total_steps``; duplicates after rounding are dropped.
  """
  if total_steps <= 0 or num <= 0 or multiple <= 0:
    raise ValueError(f"log_spaced_steps needs positive arguments, got {total_steps}, {num}, {multiple}")
  raw = np.geomspace(multiple, total_steps, num=max(num - 1, 1))
  rounded = np.round(raw / multiple).astype(np.int64) * multiple
  steps = {0, int(total_steps)} | {int(s) for s in rounded if 0 < s <= total_steps}
  return sorted(steps)


class Checkpointer:
  """Saves and restores one pytree (the stacked train state) per step under ``directory``.

  ``timings``: per save, ``{"step", "wait_s", "save_s"}`` — seconds the caller was blocked waiting for the
  previous step's commit and checksums, and in Orbax's synchronous part — completed by the sealing thread
  with ``commit_s`` (from the end of ``save`` until Orbax committed), ``checksum_s`` and ``checksum_cpu_s``
  (its wall and CPU seconds), and without ``overlap`` by ``sealed_s`` (the wait for both in ``save``).
  """

  def __init__(self, directory: str | os.PathLike, *, async_save: bool = True, read_only: bool = False,
               this_process_only: bool = False, keep: int | None = None, overlap: bool = True):
    """Opens (and unless ``read_only`` creates) the checkpoint directory.

    ``keep``: how many of the newest steps to keep (None: all); a save beyond it deletes the oldest once
    the new one is committed, as the rolling resume checkpoint does (``keep=1``).

    ``overlap``: whether the caller goes on while a save is written and hashed (``save`` returns after
    Orbax's synchronous part). Without, ``save`` returns once the step is committed and sealed: where the
    devices are the host's own CPU cores, the writer and the hasher would take them from training, and a
    jitted step split over the cores waits for its slowest share; waiting bounds the wall time a checkpoint
    adds by the time ``save`` blocks (benchmarks/README.md, "Checkpoint stall"). The wait is the same bounded one as the next
    save's (``SEAL_GRACE_S`` once a stop was asked), and the state needs no copy of its own for the save.

    Saving and restoring are collective in a multi-process job: every process must take part. A reader
    that runs on one process alone (a notebook, the report written by process 0) passes
    ``this_process_only=True`` (read-only), which declares the current process the only participant so
    that Orbax skips its cross-process barriers.
    """
    if this_process_only and not read_only:
      raise ValueError("this_process_only=True is for read-only access")
    _drop_closed_loop_callbacks()  # a failed save or restore must end in its one line (see there)
    self.directory = paths.resolve(directory)
    if not read_only:
      try:
        paths.makedirs(self.directory)
      except OSError as e:
        raise CheckpointError(f"cannot create checkpoint directory {self.directory}: {e.strerror}") from None
    processes = ocp.options.MultiprocessingOptions()
    if this_process_only:
      me = jax.process_index()
      processes = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    self.read_only = read_only
    self.overlap = overlap
    self.timings: list[dict] = []
    self._sealer: threading.Thread | None = None  # commits and checksums the newest save
    self._seal_error: BaseException | None = None
    self.stop_requested = lambda: False  # the launch's stop flag: bounds the wait for a save (``_seal``)
    self._abandoned = False
    absl_logger = pylogging.getLogger("absl")
    level = absl_logger.level
    if read_only:  # Orbax warns at every read-only open that it will not save; reading is the point.
      absl_logger.setLevel(max(level, pylogging.ERROR))
    try:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=not read_only, read_only=read_only,
          enable_async_checkpointing=async_save and not read_only, cleanup_tmp_directories=not read_only,
          multiprocessing_options=processes)
      handler = ocp.PyTreeCheckpointHandler(multiprocessing_options=processes, use_compression=False)
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={"state": handler})
    finally:
      absl_logger.setLevel(level)

  def steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def seal_committed(self) -> list[int]:
    """Writes the checksums of every committed step that has none (process 0 of a writer; returns them).

    A launch killed between Orbax's commit of a step and its checksums leaves the step whole (Orbax commits
    atomically) but unsealed; the next launch calls this once it has restored, before it saves anything.
    """
    if self.read_only or jax.process_index() != 0:
      return []
    sealed = [s for s in self.steps() if not rundir.has_checksums(self._step_dir(s))]
    for s in sealed:
      rundir.write_checksums(self._step_dir(s))
      logging.info("checkpoint %d in %s was committed without checksums: sealed now", s, self.directory)
    return sealed

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of ``state`` at ``step`` (a step that exists already is kept); without
    ``overlap``, returns once it is committed and sealed.

    Collective: every process calls it with the same step. ``state`` must not change until the save is
    committed: with ``overlap``, arrays that a later jitted call donates are to be copied first
    (``Trainer.checkpoint_view``).
    """
    if step in self._manager.all_steps():
      return
    t0 = time.perf_counter()
    self._seal()  # the previous step: Orbax would wait for its commit here anyway
    t1 = time.perf_counter()
    self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    t2 = time.perf_counter()
    timing = {"step": int(step), "wait_s": t1 - t0, "save_s": t2 - t1}
    self.timings.append(timing)
    self._sealer = threading.Thread(target=self._commit_and_checksum, args=(int(step), timing),
                                    name=f"checkpoint-seal-{step}", daemon=True)
    self._sealer.start()
    if not self.overlap:
      self._seal()
      timing["sealed_s"] = time.perf_counter() - t2

  def _step_dir(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def _commit_and_checksum(self, step: int, timing: dict) -> None:
    """The sealing thread: waits until Orbax has committed ``step``, then (process 0) writes its checksums.

    Only one save is in flight per checkpointer, and the next one starts after this thread ends, so the step
    is not removed (``keep``) while it is hashed. An error is raised by the next ``save`` or ``close``.
    """
    try:
      t0 = time.perf_counter()
      self._manager.wait_until_finished()
      t1, c1 = time.perf_counter(), time.thread_time()
      if jax.process_index() == 0 and paths.isdir(self._step_dir(step)):
        rundir.write_checksums(self._step_dir(step))
      timing.update(commit_s=t1 - t0, checksum_s=time.perf_counter() - t1,
                    checksum_cpu_s=time.thread_time() - c1)
    except BaseException as e:  # handed to the caller's thread
      self._seal_error = e

  def _seal(self) -> None:
    """Waits for the sealing thread of the newest save (its commit and checksums); raises what it raised.

    Once ``stop_requested()`` holds, it waits at most ``SEAL_GRACE_S`` more and then raises SaveAbandoned:
    a save to a storage server that died would otherwise block a stopped launch for ever."""
    if self._sealer is not None:
      deadline = time.monotonic() if self._abandoned else None  # abandoned once: not waited for again
      while self._sealer.is_alive():
        self._sealer.join(timeout=0.25)  # short waits: the signal handlers run in between
        if deadline is None and self.stop_requested():
          deadline = time.monotonic() + SEAL_GRACE_S
        if deadline is not None and time.monotonic() > deadline and self._sealer.is_alive():
          step = self.timings[-1]["step"] if self.timings else "?"
          self._abandoned = True
          raise SaveAbandoned(f"{self.kind}checkpoint {step} in {self.directory} was not committed within "
                              f"{SEAL_GRACE_S:.0f} s of the stop request (the storage does not answer): stopped "
                              "without it; relaunch to resume from the previous checkpoint")
      self._sealer = None
    if self._seal_error is not None:
      error, self._seal_error = self._seal_error, None
      raise error

  def _check_regular(self, step: int) -> None:
    """Refuses a step holding a FIFO, device or link (never opened: reading one may block for ever)."""
    irregular = rundir.irregular_entry(self._step_dir(step))
    if irregular:
      raise CheckpointError(f"{self.kind}checkpoint {step} in {self.directory}: {irregular}; remove it")

  def _verify(self, step: int) -> str | None:
    """Why the step's files are not the ones committed (None: they are, or the step has no checksums)."""
    if not rundir.has_checksums(self._step_dir(step)):
      logging.info("checkpoint %d in %s has no checksums: verified by restoring it only", step, self.directory)
      return None
    return rundir.verify_checksums(self._step_dir(step))

  def stored_shapes(self, step: int) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every array of the checkpoint at ``step``, sorted, from its metadata (no data read)."""
    self._check_regular(step)
    try:
      tree = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(step)) / "state")
      leaves = jax.tree.leaves(tree)
      return sorted((tuple(int(n) for n in x.shape), str(np.dtype(x.dtype))) for x in leaves)
    except Exception as e:  # Orbax raises many types for unreadable metadata
      raise CheckpointError(f"checkpoint {step} in {self.directory} has unreadable metadata: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None

  def restore(self, abstract_state: Any, step: int | None = None,
              fallback: bool = True) -> tuple[int, Any]:
    """Restores the checkpoint at ``step`` (default: the newest) into the layout of ``abstract_state``:
    host numpy arrays for ``jax.ShapeDtypeStruct`` leaves without a sharding, jax arrays for those with one.

    With ``fallback``, a checkpoint that fails its checksums or fails to restore is moved aside and the
    previous one is tried; without, it raises CheckpointError. Raises CheckpointError when none restores.
    """
    candidates = self.steps() if step is None else [int(step)]
    if step is not None and int(step) not in self.steps():
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory} (have {self.steps()})")
    for s in reversed(candidates):
      ok, out = self.try_restore(abstract_state, s, quarantine=fallback)
      if ok:
        return s, out
      if not fallback:
        raise CheckpointError(f"checkpoint {s} in {self.directory} does not restore: {out}") from None
    raise CheckpointError(f"no restorable checkpoint in {self.directory}")

  def try_restore(self, abstract_state: Any, step: int, quarantine: bool = True) -> tuple[bool, Any]:
    """``(True, state)`` when the checkpoint at ``step`` verifies and restores; else ``(False, reason)``,
    and with ``quarantine`` the step is reported in one line and moved aside. A step holding a FIFO, device or
    link is refused (CheckpointError) before anything in it is opened."""
    self._check_regular(step)
    reason = self._verify(step)
    if reason is None:
      _drop_closed_loop_callbacks()
      try:
        # Leaves without a sharding come back as host numpy arrays, whatever the devices that wrote them.
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)))
        return True, restored["state"]
      except Exception as e:  # Orbax raises many types (ValueError, OSError, JSON errors) for bad data.
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if quarantine:
      logging.info("checkpoint %d in %s is corrupt (%s); falling back to the previous one",
                   step, self.directory, reason)
      print(f"WARNING: {self.kind}checkpoint {step} is corrupt ({reason}); falling back to the previous one",
            flush=True)
      self._quarantine(step)
    return False, reason

  @property
  def kind(self) -> str:
    """"" for the analysis checkpoints, "resume " for the rolling resume checkpoint (in messages)."""
    return "" if os.path.basename(self.directory) == rundir.CHECKPOINTS else "resume "

  def _quarantine(self, step: int) -> None:
    """Moves a corrupt step directory aside so that a resumed run can write that step again."""
    if self.read_only or jax.process_index() != 0:
      return
    src = self._step_dir(step)
    dst_dir = paths.join(os.path.dirname(self.directory), rundir.CORRUPT_CHECKPOINTS)
    paths.makedirs(dst_dir)
    prefix = self.kind.strip() + "-" if self.kind else ""  # a resume step may share an analysis step's number
    dst = paths.join(dst_dir, f"{prefix}{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if paths.isdir(src):
      paths.move(src, dst)
    self._manager.reload()

  def close(self) -> None:
    """Waits until the newest save is committed and sealed, then closes Orbax's manager."""
    try:
      self._seal()
    finally:
      if self._sealer is None:  # else the save is abandoned or interrupted: Orbax's wait would block again
        self._manager.wait_until_finished()
        self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def set_aside_corrupt(directory: str) -> list[int]:
  """Verifies every sealed step of a checkpoint directory and moves aside (``corrupt_checkpoints/``, with a
  one-line warning each) those whose files or sha256.json are damaged, as a restore does with the newest;
  returns their steps. Process 0 of a writer only: an analysis that failed on an older step calls it."""
  with Checkpointer(directory, async_save=False) as c:
    bad = []
    for step in c.steps():
      reason = (rundir.irregular_entry(c._step_dir(step))
                or (rundir.verify_checksums(c._step_dir(step)) if rundir.has_checksums(c._step_dir(step))
                    else None))
      if reason:
        print(f"WARNING: {c.kind}checkpoint {step} is corrupt ({reason}); moved aside", flush=True)
        c._quarantine(step)
        bad.append(step)
    return bad


def shape_mismatch(stored: list, abstract_state: Any) -> str | None:
  """How the (shape, dtype) list of a checkpoint (``Checkpointer.stored_shapes``) differs from the arrays of
  ``abstract_state``; None when they agree."""
  leaves = jax.tree.leaves(abstract_state)
  expected = sorted((tuple(int(n) for n in x.shape), str(np.dtype(x.dtype))) for x in leaves)
  if stored == expected:
    return None
  return next((f"{a} stored, {b} expected" for a, b in zip(stored, expected) if a != b),
              f"{len(stored)} arrays stored, {len(expected)} expected")


def _check_stored_shapes(checkpointer: Checkpointer, step: int, abstract_state: Any) -> None:
  """Refuses a checkpoint whose own metadata contradicts ``abstract_state`` (the config's shapes) in one line,
  before anything is restored; unreadable metadata is left to the restore, which moves a corrupt step aside."""
  try:
    stored = checkpointer.stored_shapes(step)
  except CheckpointError:
    return
  diff = shape_mismatch(stored, abstract_state)
  if diff:
    raise CheckpointError(f"{checkpointer.kind}checkpoint {step} in {checkpointer.directory} does not match "
                          f"{rundir.CONFIG} ({diff}); the run directory is inconsistent: relaunch with the "
                          "config that trained it, or use a new workdir")


def restore_newest(checkpointers: list[Checkpointer], abstract_state: Any) -> tuple[int, Any] | None:
  """The newest checkpoint that restores among several directories (the analysis checkpoints and the
  resume checkpoint), as ``(step, state)``; None when there is none. A corrupt one is reported, moved
  aside and the next newest of either kind is tried. On equal steps the first checkpointer's wins. A
  checkpoint whose array shapes contradict ``abstract_state`` is refused (CheckpointError), never adopted."""
  candidates = sorted(((s, -i) for i, c in enumerate(checkpointers) for s in c.steps()), reverse=True)
  for s, i in candidates:
    _check_stored_shapes(checkpointers[-i], s, abstract_state)
    ok, out = checkpointers[-i].try_restore(abstract_state, s)
    if ok:
      return s, out
  if candidates:
    raise CheckpointError(f"no restorable checkpoint in {checkpointers[0].directory} or beside it")
  return None

