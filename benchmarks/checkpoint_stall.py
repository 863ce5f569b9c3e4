"""What a checkpoint of the S5 MLP × 64 seeds costs the training loop: the previous save path and the new.

usage: python -m benchmarks.checkpoint_stall [--seeds 64] [--group S5] [--eval-every 5] [--checkpoints 4]
                                             [--reps 5] [--dir /tmp] [--anatomy-reps 3]
       python -m benchmarks.checkpoint_stall --launch [--reps 1] [--before DIR] [--steps 700]

``--launch`` measures what a user pays: whole launches of the group family's default experiment
(``python -m universality.experiments.group_universality --noanalyze --config.model.name=mlp
--config.task.groups=S5 --config.seeds=64 --config.steps=700 --config.eval_every=50``), one with
``num_checkpoints=14`` (11 checkpoints: steps 0, 50, ..., 550, 700) and one with ``num_checkpoints=2``
(3: steps 0, 50, 700), each in a subprocess, one after the other. It prints the wall time per extra
checkpoint (the difference ÷ 8), the same read from the eval intervals (those begun by a checkpoint against
the others, which a drift of the machine's load disturbs less), the CPU time per extra checkpoint, and where
the time goes: per save, the device copy, Orbax's synchronous part, the wait for the commit and checksums
(on the CPU a save waits for them), the background write until committed (TensorStore's writes, Orbax's
finalise, fsync and rename), the sha256 of the step's files (wall and CPU), and the CPU seconds of the
process's threads by name. ``--before DIR`` interleaves launches of an earlier engine (a source tree with
engine/, experiments/, kernels/, e.g. ``git archive <commit> engine experiments kernels | tar -x -C DIR``)
so that both are measured in the same conditions.

Without ``--launch``, episodes in one process:

The trainer is the paper's MLP (experiments/configs/chughtai_mlp.py: embed 256, hidden 128, AdamW, so the
state is the parameters and two moments: 109 MB at 64 seeds of S5). One *episode* trains ``--checkpoints``
eval intervals of ``--eval-every`` steps and checkpoints after each, as ``universality.engine.launch`` does,
into a fresh directory under ``--dir``, then closes the checkpointer (as a launch does at its end). Three
kinds of episode run in turn, in a rotating order, ``--reps`` times:

  old   the save path before this change (``LegacyCheckpointer`` below, a copy of it): a host numpy copy of
        the state (``Trainer.unpad``), Orbax's default handler (zstd), and at the next save and at close a
        wait for the previous save's commit followed by the sha256 of its files, on the training thread.
  new   ``universality.engine.checkpoint.Checkpointer`` fed by ``Trainer.checkpoint_view``: a copy on the device that Orbax
        writes from, no compression, commit and sha256 in a background thread, waited for only by the next
        save (normally long done) and by close.
  none  the same intervals without checkpoints: the baseline of the same repetition.

Per checkpoint it prints (medians over repetitions):

  blocked    what the loop waits at each save: the gather/copy, Orbax's synchronous part, the wait for the
             previous save, checksums on the loop's thread.
  close      the close at the end (once per launch: the last save committed and sealed before exit).
  stall      blocked + close ÷ the episode's checkpoint count.
  loop cost  the episode's wall time minus the ``none`` episode's, ÷ the checkpoint count: the stall plus the
             training time lost to the background writer and hasher competing for the cores (noisy on a
             shared machine: each repetition is printed).

and, for the new path, the background work (commit, sha256) as the sealing thread measured it.

The *anatomy* table that follows times one save of the same state on an otherwise idle loop (no training),
for each lever on its own: numpy input (Orbax deep-copies it) or device arrays, zstd on or off, zarr2 or
zarr3 (all OCDBT, as Orbax's default): Orbax's synchronous part, the background write until committed, the
CPU seconds of all threads together (what competes with training on a small machine), the bytes on disk, and
the sha256 of the step's files.

The load average is printed before and after: the machine is shared, so read the ratios, taken within one run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from universality.engine import checkpoint, rundir, train  # noqa: E402
from universality.experiments.configs import chughtai_mlp  # noqa: E402


class LegacyCheckpointer:
  """The previous universality.engine.checkpoint save path, kept here to be timed beside the new one (saving only).

  Orbax's default StandardCheckpointHandler (zarr2 chunks in OCDBT, zstd level 1); ``save`` first seals the
  previous step on the caller's thread: waits for its commit, then writes its sha256 (process 0).
  """

  def __init__(self, directory: str):
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(),
                                          item_names=("state",))
    self._unsealed: list[int] = []
    self.pieces: dict[str, float] = {}

  def _add(self, key: str, seconds: float) -> None:
    self.pieces[key] = self.pieces.get(key, 0.0) + seconds

  def save(self, step: int, state) -> None:
    self._seal()
    t = time.perf_counter()
    self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    self._add("orbax_sync", time.perf_counter() - t)
    self._unsealed.append(int(step))

  def _seal(self, prefix: str = "") -> None:
    if not self._unsealed:
      return
    t0 = time.perf_counter()
    self._manager.wait_until_finished()
    t1 = time.perf_counter()
    for step in self._unsealed:
      rundir.write_checksums(os.path.join(self.directory, str(step)))
    self._add(prefix + "wait_prev", t1 - t0)
    self._add(prefix + "checksums", time.perf_counter() - t1)
    self._unsealed = []

  def close(self) -> None:
    self._seal("close_")
    self._manager.close()


def make_trainer(seeds: int, group: str, eval_every: int):
  cfg = chughtai_mlp.get_config()
  cfg.update_from_flattened_dict({"seeds": seeds, "task.groups": group, "steps": 1_000_000,
                                  "task.train_frac_by_group": f"{group}=0.4", "eval_every": eval_every})
  return train.make_train(cfg)


def episode(kind: str, trainer, state, n_ckpt: int, root: str):
  """One episode of ``kind``: (state, wall seconds, blocking pieces summed over it, background work)."""
  directory = tempfile.mkdtemp(dir=root, prefix=f"ckpt-{kind}-")
  pieces: dict[str, float] = {}
  background: dict[str, float] = {}

  def add(key, seconds):
    pieces[key] = pieces.get(key, 0.0) + seconds

  t_start = time.perf_counter()
  if kind == "old":
    ckpt = LegacyCheckpointer(directory)
  elif kind == "new":
    ckpt = checkpoint.Checkpointer(directory)
  for i in range(n_ckpt):
    state, _ = trainer.run(state, 1)  # metrics come back on the host: the interval is done
    step = i + 1
    if kind == "old":
      t = time.perf_counter()
      host = trainer.unpad(state)
      add("gather", time.perf_counter() - t)
      ckpt.save(step, host)
    elif kind == "new":
      t = time.perf_counter()
      view = jax.block_until_ready(trainer.checkpoint_view(state))
      add("gather", time.perf_counter() - t)
      ckpt.save(step, view)
      del view
  if kind != "none":
    t = time.perf_counter()
    ckpt.close()
    add("close", time.perf_counter() - t)
  wall = time.perf_counter() - t_start
  if kind == "old":
    for k, v in ckpt.pieces.items():
      if not k.startswith("close_"):  # the close's own wait and sha256 are inside "close"
        pieces[k] = pieces.get(k, 0.0) + v
  elif kind == "new":
    for t in ckpt.timings:
      add("orbax_sync", t["save_s"])
      add("wait_prev", t["wait_s"])
      for k in ("commit_s", "checksum_s"):
        background[k] = background.get(k, 0.0) + t[k]
    for step in range(1, n_ckpt + 1):  # every step sealed, and intact
      if rundir.verify_checksums(os.path.join(directory, str(step))) is not None:
        raise AssertionError(f"step {step} of the new path does not verify")
  shutil.rmtree(directory)
  return state, wall, pieces, background


def anatomy_row(state, host, root: str, source: str, compression: bool, zarr3: bool) -> dict[str, float]:
  """One save of the state with one setting, on an idle loop: sync, background, CPU, bytes, sha256."""
  directory = tempfile.mkdtemp(dir=root, prefix="ckpt-anatomy-")
  handler = ocp.PyTreeCheckpointHandler(use_compression=compression, use_zarr3=zarr3)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(),
                                  item_handlers={"state": handler})
  tree = host if source == "numpy" else state
  c0, t0 = time.process_time(), time.perf_counter()
  manager.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree)))
  t1 = time.perf_counter()
  manager.wait_until_finished()
  c2, t2 = time.process_time(), time.perf_counter()
  step_dir = os.path.join(directory, "1")
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)
  t3 = time.perf_counter()
  rundir.write_checksums(step_dir)
  t4 = time.perf_counter()
  manager.close()
  shutil.rmtree(directory)
  return {"sync": t1 - t0, "background": t2 - t1, "cpu": c2 - c0, "mb": size / 1e6, "sha256": t4 - t3}


# --- launch mode: the wall time a user pays per checkpoint, from two whole launches ----------------------

# The two launches of ``--launch``: num_checkpoints 14 gives 11 checkpoints of 700 steps at multiples of 50
# (steps 0, 50, ..., 550, 700), num_checkpoints 2 gives 3 (0, 50, 700).
LAUNCH_CHECKPOINTS = {11: 14, 3: 2}


def launch_argv(workdir: str, num_checkpoints: int, seeds: int, group: str, steps: int,
                eval_every: int) -> list[str]:
  """The group family's default experiment with the overrides of the measurement (the MLP is its default)."""
  return [sys.executable, "-m", "benchmarks.checkpoint_stall", "--child", "--",
          f"--workdir={workdir}", "--noanalyze", "--noprogress", "--config.model.name=mlp",
          f"--config.task.groups={group}", f"--config.seeds={seeds}", f"--config.steps={steps}",
          f"--config.eval_every={eval_every}", f"--config.num_checkpoints={num_checkpoints}",
          "--config.exec.resume_every_minutes=0"]  # no resume checkpoint (a slow launch would write one)


def _thread_cpu() -> dict[str, float]:
  """CPU seconds of the live threads of this process, summed by thread name (digits dropped)."""
  out: dict[str, float] = {}
  tick = os.sysconf("SC_CLK_TCK")
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    key = "".join(c for c in name if not c.isdigit()).rstrip("-_ ") or "?"
    out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
  return out


def child(argv: list[str]) -> None:
  """Runs the launch ``argv`` in this process, timing each checkpoint's stages, and writes them as JSON to
  ``$CHECKPOINT_STALL_OUT`` at exit: per save the device copy, Orbax's synchronous part, the wait for the
  previous save, the background commit (TensorStore's write, Orbax's finalise and rename) and the sha256 with
  its CPU time; the closes; the CPU seconds of the threads still alive by name, and of the whole process."""
  out_path = os.environ["CHECKPOINT_STALL_OUT"]
  views: list[float] = []
  closes: list[float] = []
  saves: list[dict] = []
  evals: list[tuple[int, float]] = []
  view = train.Trainer.checkpoint_view
  close = checkpoint.Checkpointer.close
  append = rundir.MetricsLog.append

  def timed_view(self, tree, copy=True):
    t = time.perf_counter()
    out = view(self, tree) if copy else view(self, tree, copy=False)
    out = jax.block_until_ready(out)  # Orbax's save would wait for the copy anyway
    views.append(time.perf_counter() - t)
    return out

  def timed_append(self, record):
    evals.append((int(record["step"]), time.perf_counter()))
    append(self, record)

  def timed_close(self):
    t = time.perf_counter()
    try:
      close(self)
    finally:
      closes.append(time.perf_counter() - t)
      saves.extend(self.timings)

  def dump():
    times = os.times()
    with open(out_path, "w") as f:
      json.dump({"views": views, "closes": closes, "saves": saves, "evals": evals, "threads": _thread_cpu(),
                 "cpu": times.user + times.system}, f)

  train.Trainer.checkpoint_view = timed_view
  checkpoint.Checkpointer.close = timed_close
  rundir.MetricsLog.append = timed_append
  atexit.register(dump)
  sys.argv = ["group_universality"] + argv
  runpy.run_module("universality.experiments.group_universality", run_name="__main__", alter_sys=True)


def _shim(tree: str, root: str) -> str:
  """A directory to put first on PYTHONPATH so that ``universality.*`` is imported from the source ``tree``
  (an earlier checkout: engine/, experiments/, kernels/) instead of the installed one."""
  shim = tempfile.mkdtemp(dir=root, prefix="ckpt-shim-")
  os.makedirs(os.path.join(shim, "universality"))
  for name in ("engine", "experiments", "kernels"):
    os.symlink(os.path.join(os.path.abspath(tree), name), os.path.join(shim, "universality", name))
  return shim


def one_launch(n_ckpt: int, args, shim: str | None = None) -> dict:
  """One launch with ``n_ckpt`` checkpoints in a subprocess (with the engine of ``shim``, else the installed
  one): its wall and CPU seconds and its stage timings."""
  workdir = tempfile.mkdtemp(dir=args.dir, prefix=f"ckpt-launch-{n_ckpt}-")
  out = os.path.join(workdir, "stages.json")
  argv = launch_argv(os.path.join(workdir, "run"), LAUNCH_CHECKPOINTS[n_ckpt], args.seeds, args.group,
                     args.steps, args.launch_eval_every)
  env = {**os.environ, "CHECKPOINT_STALL_OUT": out}
  if shim:
    env["PYTHONPATH"] = os.pathsep.join([shim] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  load = os.getloadavg()[0]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t = time.perf_counter()
  proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise SystemExit(f"error: the launch with {n_ckpt} checkpoints failed ({proc.returncode}): "
                     f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
  with open(out) as f:
    stages = json.load(f)
  ckpt_dir = os.path.join(workdir, "run", rundir.CHECKPOINTS)
  written = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  if len(written) != n_ckpt:
    raise SystemExit(f"error: the launch wrote {len(written)} checkpoints ({written}), expected {n_ckpt}")
  shutil.rmtree(workdir)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"wall": wall, "cpu": cpu, "load": load, "load_after": os.getloadavg()[0], **stages}


def _stage_sums(r: dict) -> dict[str, float]:
  """The stages of one launch summed over its saves (seconds)."""
  s = r["saves"]
  return {"device copy (blocked)": sum(r["views"]),
          "Orbax synchronous part (blocked)": sum(t["save_s"] for t in s),
          "wait for the previous save (blocked)": sum(t["wait_s"] for t in s),
          "commit + sha256 waited for in save (blocked)": sum(t.get("sealed_s", 0.0) for t in s),
          "close at the end (blocked)": sum(r["closes"]),
          "write until committed (sealing thread, wall)": sum(t.get("commit_s", 0.0) for t in s),
          "sha256 (sealing thread, wall)": sum(t.get("checksum_s", 0.0) for t in s),
          "sha256 (sealing thread, CPU)": sum(t.get("checksum_cpu_s", 0.0) for t in s)}


def _report(label: str, results: dict, args) -> None:
  """The figures of one engine's launches (``results[n]``: the launches with ``n`` checkpoints)."""
  med = statistics.median
  extra = 11 - 3
  per = [(a["wall"] - b["wall"]) / extra for a, b in zip(results[11], results[3])]
  per_cpu = [(a["cpu"] - b["cpu"]) / extra for a, b in zip(results[11], results[3])]
  print(f"\n{label}: wall time per extra checkpoint {med(per):.2f} s (" + ", ".join(f"{x:.2f}" for x in per)
        + f"); CPU time per extra checkpoint {med(per_cpu):.2f} s (" + ", ".join(f"{x:.2f}" for x in per_cpu)
        + ")")
  with_ckpt, without = [], []  # eval intervals after the first (which compiles): begun by a checkpoint or not
  for n in (11, 3):
    schedule = set(checkpoint.log_spaced_steps(args.steps, LAUNCH_CHECKPOINTS[n], args.launch_eval_every))
    for r in results[n]:
      for (s0, t0), (_, t1) in zip(r.get("evals", []), r.get("evals", [])[1:]):
        (with_ckpt if s0 in schedule else without).append(t1 - t0)
  if with_ckpt and without:
    print(f"{label}: eval intervals of {args.launch_eval_every} steps begun by a checkpoint, median "
          f"{med(with_ckpt):.2f} s ({len(with_ckpt)}), without {med(without):.2f} s ({len(without)}): "
          f"{med(with_ckpt) - med(without):.2f} s per checkpoint")
  print(f"{label}, where it goes, seconds per checkpoint (medians; a launch's total ÷ its checkpoints):")
  print(f"| {'stage':46s} | {'11 ckpts':>8s} | {'3 ckpts':>8s} |")
  print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
  for key in _stage_sums(results[3][0]):
    cells = [med([_stage_sums(r)[key] / n for r in results[n]]) for n in (11, 3)]
    print(f"| {key:46s} | {cells[0]:8.3f} | {cells[1]:8.3f} |")
  print(f"{label}, CPU seconds by thread (alive at exit; 'exited': the threads that ended before), medians:")
  for n in (11, 3):
    names = sorted({k for r in results[n] for k in r["threads"]})
    rows = {k: med([r["threads"].get(k, 0.0) for r in results[n]]) for k in names}
    rows["exited"] = med([r["cpu"] - sum(r["threads"].values()) for r in results[n]])
    top = sorted(rows.items(), key=lambda kv: -kv[1])[:8]
    print(f"  {n:2d} checkpoints: " + ", ".join(f"{k} {v:.1f}" for k, v in top))


def launch_mode(args) -> None:
  """``--launch``: launches with 11 and 3 checkpoints, ``--reps`` times each (and as many with the engine of
  ``--before``, interleaved); prints the wall time per extra checkpoint (the difference ÷ 8), the same from
  the eval intervals, and where it goes."""
  print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; jax {jax.__version__}, orbax "
        f"{getattr(ocp, '__version__', '?')}; {args.group} MLP x {args.seeds} seeds, {args.steps} steps, "
        f"eval every {args.launch_eval_every}, --noanalyze; launches of 11 and 3 checkpoints", flush=True)
  engines = {"this engine": None}
  if args.before:
    engines = {"before": _shim(args.before, args.dir), **engines}
  results = {label: {11: [], 3: []} for label in engines}
  for rep in range(args.reps):
    # Each engine's two launches one after the other (before: 11, 3; then this engine: 3, 11), reversed at
    # every other repetition, so that a drift of the machine's load biases neither difference much.
    order = [(label, n) for i, label in enumerate(engines) for n in ((11, 3) if i % 2 == 0 else (3, 11))]
    if rep % 2:
      order.reverse()
    for label, n in order:
      r = one_launch(n, args, engines[label])
      results[label][n].append(r)
      print(f"  repetition {rep + 1}, {label}, {n:2d} checkpoints: wall {r['wall']:6.2f} s, "
            f"CPU {r['cpu']:6.2f} s, load {r['load']:.2f} -> {r['load_after']:.2f}", flush=True)
  for label in engines:
    _report(label, results[label], args)
  print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  for shim in engines.values():
    if shim:
      shutil.rmtree(shim)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=64)
  parser.add_argument("--group", default="S5")
  parser.add_argument("--eval-every", type=int, default=5, help="steps per interval between checkpoints")
  parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per episode")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--anatomy-reps", type=int, default=3)
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="local directory for the checkpoints")
  parser.add_argument("--launch", action="store_true",
                      help="time two launches (11 and 3 checkpoints) instead of episodes in one process")
  parser.add_argument("--steps", type=int, default=700, help="--launch: steps per launch")
  parser.add_argument("--launch-eval-every", type=int, default=50, help="--launch: steps between evaluations")
  parser.add_argument("--before", help="--launch: a source tree of an earlier engine (engine/, experiments/, "
                      "kernels/, e.g. from git archive) whose launches are interleaved with this engine's")
  argv = sys.argv[1:] if argv is None else argv
  if argv[:2] == ["--child", "--"]:
    return child(argv[2:])
  args = parser.parse_args(argv)
  if args.launch:
    return launch_mode(args)

  print(f"load average before: {os.getloadavg()[0]:.2f}; jax {jax.__version__}, orbax "
        f"{getattr(ocp, '__version__', '?')}, {jax.device_count()} device(s)", flush=True)
  trainer = make_trainer(args.seeds, args.group, args.eval_every)
  state = trainer.init()
  state, _ = trainer.run(state, 1)  # compile
  jax.block_until_ready(trainer.checkpoint_view(state))  # compile the copy
  mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
  print(f"{args.seeds} seeds of {args.group}: state {mb:.0f} MB; intervals of {args.eval_every} steps; "
        f"{args.checkpoints} checkpoints per episode; {args.reps} repetitions", flush=True)

  # A first checkpoint of each kind outside the timing: Orbax's one-off set-up (threads, TensorStore).
  for kind in ("old", "new"):
    state, wall, pieces, _ = episode(kind, trainer, state, 1, args.dir)
    blocked = sum(pieces.values()) - pieces["close"]
    print(f"  first checkpoint of the process, {kind}: blocked {blocked:.3f} s, "
          f"close {pieces['close']:.3f} s", flush=True)

  kinds = ["old", "new", "none"]
  results = {k: [] for k in kinds}
  for rep in range(args.reps):
    order = kinds[rep % 3:] + kinds[:rep % 3]
    for kind in order:
      state, wall, pieces, background = episode(kind, trainer, state, args.checkpoints, args.dir)
      results[kind].append((wall, pieces, background))
    walls = ", ".join(f"{k} {results[k][-1][0]:.2f} s" for k in kinds)
    print(f"  repetition {rep + 1}: {walls}", flush=True)

  n = args.checkpoints
  med = statistics.median
  both = ("old", "new")
  base = results["none"]
  cost = {k: [(results[k][r][0] - base[r][0]) / n for r in range(args.reps)] for k in both}
  loop_keys = ["gather", "orbax_sync", "wait_prev", "checksums"]
  in_loop = {k: [sum(p.get(key, 0.0) for key in loop_keys) / n for _, p, _ in results[k]] for k in both}
  close = {k: [p.get("close", 0.0) for _, p, _ in results[k]] for k in both}
  amortised = {k: [i + c / n for i, c in zip(in_loop[k], close[k])] for k in both}
  labels = {"gather": "device→host gather / device copy", "orbax_sync": "Orbax synchronous part",
            "wait_prev": "wait for the previous save", "checksums": "sha256 on the loop's thread"}

  def row(label, old, new):
    ratio = f"{old / new:.1f}×" if new > 1e-3 else "—"
    print(f"| {label:46s} | {old:7.3f} | {new:7.3f} | {ratio:>7s} |")

  print(f"\nSeconds, medians over {args.reps} repetitions:")
  print(f"| {'':46s} | {'old':>7s} | {'new':>7s} | old/new |")
  print(f"|{'-' * 48}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
  for key in loop_keys:
    row(labels[key] + ", per checkpoint",
        *(med([p.get(key, 0.0) for _, p, _ in results[k]]) / n for k in both))
  row("**blocked in the loop**, per checkpoint", *(med(in_loop[k]) for k in both))
  row("close at the end, once", *(med(close[k]) for k in both))
  row(f"**stall** per checkpoint (close ÷ {n})", *(med(amortised[k]) for k in both))
  row("loop cost per checkpoint (episode − baseline)", *(med(cost[k]) for k in both))
  bg = {k: med([b.get(k, 0.0) for _, _, b in results["new"]]) / n for k in ("commit_s", "checksum_s")}
  print(f"new path, in the background per checkpoint: commit {bg['commit_s']:.3f} s after save returned, "
        f"then sha256 {bg['checksum_s']:.3f} s")
  print("loop cost per repetition: old " + ", ".join(f"{c:.2f}" for c in cost["old"])
        + "; new " + ", ".join(f"{c:.2f}" for c in cost["new"]))
  print(f"baseline episode ({n} intervals): median {med([w for w, _, _ in base]):.2f} s")

  host = trainer.unpad(state)
  view = jax.block_until_ready(trainer.checkpoint_view(state))
  print(f"\nAnatomy of one save on an idle loop (median of {args.anatomy_reps}), seconds:")
  print("| input | zstd | zarr | Orbax sync | background | CPU (all threads) | MB on disk | sha256 |")
  print("|---|---|---|---|---|---|---|---|")
  for source, compression, zarr3 in [("numpy", True, False), ("numpy", False, False), ("device", True, False),
                                     ("device", False, False), ("device", True, True),
                                     ("device", False, True)]:
    rows = [anatomy_row(view, host, args.dir, source, compression, zarr3) for _ in range(args.anatomy_reps)]
    m = {k: med([r[k] for r in rows]) for k in rows[0]}
    print(f"| {source} | {'on' if compression else 'off'} | {3 if zarr3 else 2} | {m['sync']:.3f} | "
          f"{m['background']:.3f} | {m['cpu']:.3f} | {m['mb']:.0f} | {m['sha256']:.3f} |", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
