"""What a checkpoint of the S5 MLP × 64 seeds costs the training loop: the previous save path and the new.

usage: python -m benchmarks.checkpoint_stall [--seeds 64] [--group S5] [--eval-every 5] [--checkpoints 4]
                                             [--reps 5] [--dir /tmp] [--anatomy-reps 3]

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
import os
import shutil
import statistics
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=64)
  parser.add_argument("--group", default="S5")
  parser.add_argument("--eval-every", type=int, default=5, help="steps per interval between checkpoints")
  parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per episode")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--anatomy-reps", type=int, default=3)
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="local directory for the checkpoints")
  args = parser.parse_args(argv)

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
