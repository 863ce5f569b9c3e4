"""Peak memory and time of the group analysis (``universality.engine.families.group.passes.pipeline.analyze_group``): the streamed
path of this checkout against the in-memory one of an older revision, each in its own process.

usage: python -m benchmarks.analysis_memory [--case s5|s6|both] [--paths new,old] [--old-rev c538a73]
                                            [--steps 2] [--budget-gb 1] [--connectivity-points 0]
                                            [--merge-tolerance T] [--hidden-only]

Each case analyses S seeds of the paper's MLP (embeddings 256 per input, 128 hidden ReLU neurons) on one
group: S5 × 64 seeds and S6 × 16 seeds. The parameters are **randomly initialised** (``models.init``, one
key per seed) and scaled by k/K for checkpoint k = 1..K (``--steps``), so the K checkpoints differ; the
memory of the analysis does not depend on training (every pass has the same shapes), its time does a
little (feature merging stops earlier on trained models). Mode connectivity is off by default
(``--connectivity-points 0``): its 25-point paths over S(S−1)/2 pairs of runs cost more than the rest of
the analysis together on a CPU, whatever the memory. On random parameters the default feature-merging
tolerance (0.01 on a loss of ≈ log|G|) merges every neuron but one, one full-loss pass over all pairs per
merge (≈ 128 passes, ≈ 190 TFLOP for S6 × 16): ``--merge-tolerance 0`` stops each run at its first merge
that raises the loss, with the same memory per pass. ``--hidden-only`` analyses the MLP as a model without
additive pre-activations (a transformer's path): every streamed all-pairs pass, the co-moments, cosets from
the hidden marginals, but none of the weight-based passes (restricted / excluded losses, margins, feature
merging), whose blocks ``representation.loss_chunks`` bounds and whose time on S6 is hours on 2 cores.

Each analysis runs in a child process (``--child``), the old path from ``git archive <old-rev>`` of
``engine/`` and ``kernels/`` unpacked in a temporary folder. Peak RSS is the child's ``ru_maxrss``
(``os.wait4``: per child, the figure ``resource.getrusage(RUSAGE_CHILDREN)`` accumulates as a maximum over
all children); ``import`` is the child's peak before the analysis (JAX and the parameters); ``time`` is the
wall time of ``analyze_group`` alone, compiles included. The old path is skipped where its logits and
hidden layer alone (S·|G|²·(|G| + N) floats) would exceed the machine's available RAM: its predicted size
is printed instead.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"s5": ("S5", 64), "s6": ("S6", 16)}
HIDDEN, EMBED = 128, 256


def child(args) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  from universality.engine import config as config_lib  # pylint: disable=import-outside-toplevel
  from universality.engine import groups  # pylint: disable=import-outside-toplevel
  from universality.engine import irreps as irreps_lib  # pylint: disable=import-outside-toplevel
  from universality.engine.families.group.passes import pipeline  # pylint: disable=import-outside-toplevel
  from universality.engine.families.group import analysis as group_analysis  # pylint: disable=import-outside-toplevel
  from universality.engine.families.group import models  # pylint: disable=import-outside-toplevel

  cfg = config_lib.default_config("group")
  cfg.model.name, cfg.model.mlp.embed_dim, cfg.model.mlp.hidden = "mlp", EMBED, HIDDEN
  g = groups.get(args.group)
  irreps = irreps_lib.real_irreps(g)
  keys = jax.random.split(jax.random.key(0), args.seeds)
  params = jax.vmap(lambda k: models.init(k, cfg.model, g.order))(keys)
  by_step = {k: jax.tree.map(lambda x, k=k: x * (k / args.steps), params) for k in range(1, args.steps + 1)}
  apply_fn = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg.model)))
  kw = {"connectivity_points": args.connectivity_points, "key": jax.random.key(1)}
  if args.merge_tolerance is not None:
    kw["merge_tolerance"] = args.merge_tolerance
  if "memory_bytes" in inspect.signature(pipeline.analyze_group).parameters:
    kw["memory_bytes"] = int(args.budget_gb * 1e9)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t0 = time.perf_counter()
  runs = [{"seed": k} for k in range(args.seeds)]
  if "model" in inspect.signature(pipeline.analyze_group).parameters:  # one model API (models.stacked)
    model = models.stacked(cfg.model)
    if args.hidden_only:  # as for a model without additive pre-activations: no weight-based passes
      model = model._replace(effective=None)
    out = pipeline.analyze_group(g, irreps, model, by_step, runs, **kw)
  else:
    matrices_fn = group_analysis.matrices_fn_for(cfg.model)
    if args.hidden_only:
      full_fn = matrices_fn
      matrices_fn = lambda p: {k: v for k, v in full_fn(p).items() if not k.startswith("pre_")}  # noqa: E731
    out = pipeline.analyze_group(g, irreps, apply_fn, matrices_fn, by_step, runs, **kw)
  seconds = time.perf_counter() - t0
  agg = out["aggregate"]
  print(json.dumps({"seconds": seconds, "import_kb": before, "steps": len(out["group"]["steps"]),
                    "mean_loss_all": agg["mean_loss_all"],
                    "mean_fraction_explained": agg["mean_fraction_explained"],
                    "feature_complexity": (agg["redundancy"] or {}).get("mean_feature_complexity")}))


def available_bytes() -> int:
  with open("/proc/meminfo", encoding="ascii") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def held_bytes(group: str, seeds: int) -> int:
  """What the in-memory path holds at once: logits [S, G, G, G] and hidden [S, G, G, N], float32."""
  order = {"S5": 120, "S6": 720}[group]
  return 4 * seeds * order ** 2 * (order + HIDDEN)


def run_child(group, seeds, args, pythonpath) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--group", group, "--seeds", str(seeds),
         "--steps", str(args.steps), "--budget-gb", str(args.budget_gb),
         "--connectivity-points", str(args.connectivity_points)]
  if args.merge_tolerance is not None:
    cmd += ["--merge-tolerance", str(args.merge_tolerance)]
  if args.hidden_only:
    cmd += ["--hidden-only"]
  env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)  # pylint: disable=consider-using-with
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    return {"error": f"exit {proc.returncode}", "peak_kb": usage.ru_maxrss}
  res = json.loads(out.strip().splitlines()[-1])
  res["peak_kb"] = usage.ru_maxrss
  return res


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--case", default="both", choices=[*CASES, "both"])
  parser.add_argument("--paths", default="new,old")
  parser.add_argument("--old-rev", default="c538a73", help="revision of the in-memory analysis")
  parser.add_argument("--steps", type=int, default=2, help="checkpoints analysed")
  parser.add_argument("--budget-gb", type=float, default=1.0, help="memory_bytes of the streamed path")
  parser.add_argument("--connectivity-points", type=int, default=0)
  parser.add_argument("--merge-tolerance", type=float, default=None,
                      help="feature-merging tolerance (default: the analysis default)")
  parser.add_argument("--hidden-only", action="store_true",
                      help="drop the MLP's total embeddings: the hidden-layer variants of the neuron split and "
                           "cosets, and no restricted / excluded losses, margins or feature merging")
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--group")
  parser.add_argument("--seeds", type=int)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  paths = args.paths.split(",")
  tmp = tempfile.mkdtemp(prefix="analysis_old_")
  try:
    if "old" in paths:
      archive = subprocess.run(["git", "-C", ROOT, "archive", args.old_rev, "engine", "kernels"], check=True,
                               capture_output=True).stdout
      subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    load = os.getloadavg()[0]
    print(f"analysis of K={args.steps} checkpoints, budget {args.budget_gb:g} GB, connectivity points "
          f"{args.connectivity_points}, merge tolerance {args.merge_tolerance}, hidden only {args.hidden_only}, "
          f"load average {load:.1f}, {os.cpu_count()} cores, "
          f"{available_bytes() / 1e9:.1f} GB available")
    print(f"{'case':<10} {'path':<4} {'peak RSS':>10} {'import':>9} {'time':>9} {'held logits+hidden':>19}  result")
    for name in (CASES if args.case == "both" else [args.case]):
      group, seeds = CASES[name]
      held = held_bytes(group, seeds)
      rows = {}
      for path in paths:
        label = f"{group}×{seeds}"
        if path == "old" and held > 0.9 * available_bytes():
          print(f"{label:<10} {path:<4} {'skipped':>10} {'':>9} {'':>9} {held / 1e9:>16.1f} GB  predicted: more "
                "than the RAM available")
          continue
        res = run_child(group, seeds, args, ROOT if path == "new" else tmp)
        rows[path] = res
        if "error" in res:
          print(f"{label:<10} {path:<4} {res['peak_kb'] / 1e6:>8.2f}GB {'':>9} {'':>9} {held / 1e9:>16.2f} GB  "
                f"{res['error']}")
          continue
        print(f"{label:<10} {path:<4} {res['peak_kb'] / 1e6:>8.2f}GB {res['import_kb'] / 1e6:>7.2f}GB "
              f"{res['seconds']:>8.1f}s {held / 1e9:>16.2f} GB  loss {res['mean_loss_all']:.4f}, "
              f"logit FVE {res['mean_fraction_explained']:.4f}, feature complexity {res['feature_complexity']}, "
              f"{res['steps']} steps")
      if "old" in rows and "new" in rows and "error" not in rows["old"] and "error" not in rows["new"]:
        old, new = rows["old"], rows["new"]
        print(f"{'':<10} peak RSS old/new {old['peak_kb'] / new['peak_kb']:.2f}×, time old/new "
              f"{old['seconds'] / new['seconds']:.2f}×")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
