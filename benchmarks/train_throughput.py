"""Training throughput of the S5 MLP (Chughtai et al.): universality.engine.train at 1..256 seeds vs a PyTorch loop.

usage: python benchmarks/train_throughput.py [--seeds 1,8,64,256] [--work 600] [--eval-every 100]
                                            [--run-chunk 0] [--quick] [--no-torch]

Each configuration trains the paper's MLP (E=256, N=128) on S5 with train fraction 0.4 (5,760 training pairs,
full batch, AdamW lr 1e-3, wd 1, betas 0.9/0.98). For each seed count S it compiles one ``trainer.run`` of
about ``work / S`` steps, rounded up to a whole number of eval intervals (``--eval-every``, default 100 as in
a launch; the same interval in every configuration, so evaluation is the same share of every line), runs it
once to warm up, then reports the best of three timed calls as model-steps per second (S × steps / seconds).
``--run-chunk`` takes a comma-separated list of ``cfg.exec.run_chunk`` values (runs vmapped together per
``lax.map`` step; 0 = the automatic default) and times each at every seed count. Beside it, in the same
process, it times plain sequential PyTorch loops of the same model and optimiser (torch is optional: ``pip
install torch``): the literal concat-then-multiply model (the baseline of the "vs torch" column), and the
factorised form the engine uses ("vs t.fact"), to separate the gain of the algebra from the gain of the
compiled loop. Torch gets its best of 1 thread and all cores.

The machine's fp32 matmul rate is measured first (best of several 2048² XLA matmuls) and each line prints
the fraction of it achieved, counting the step's matrix-product FLOPs (forward and backward of the unembedding
and of the two V×E×N table products).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from universality.engine import config, groups, train  # noqa: E402
from universality.engine.families.group import task as tasks  # noqa: E402

GROUP, FRAC = "S5", 0.4


def matmul_rate(n: int = 2048, reps: int = 8) -> float:
  """Best observed fp32 FLOP/s of an n×n×n XLA matmul on the default device."""
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def step_flops(cfg, n_train: int, vocab: int) -> float:
  """Matrix-product FLOPs of one factorised full-batch step: 3 unembedding products, 6 table products."""
  m = cfg.model.mlp
  return 3 * 2 * n_train * m.hidden * vocab + 6 * 2 * vocab * m.embed_dim * m.hidden


def bench_engine(seeds: int, work: int, eval_every: int, run_chunk: int = 0,
                 reps: int = 3) -> tuple[float, float]:
  """(model-steps/s, compile-and-first-call seconds) of universality.engine.train at ``seeds`` seeds.

  Every configuration evaluates every ``eval_every`` steps, so the evaluation overhead (a forward pass over
  all |G|² pairs: ~8% of the time at 10 steps, <1% at 100) is the same share of every line.
  """
  cfg = config.default_config()
  steps = eval_every * max(1, math.ceil(work / (seeds * eval_every)))
  cfg.update_from_flattened_dict({"task.groups": GROUP, "task.train_frac": str(FRAC), "seeds": seeds,
                                  "steps": steps, "eval_every": eval_every, "exec.run_chunk": run_chunk})
  trainer = train.make_train(cfg)
  n_evals = steps // eval_every
  t = time.perf_counter()
  state, _ = trainer.run(trainer.init(), n_evals)
  first = time.perf_counter() - t
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    state, metrics = trainer.run(state, n_evals)
    best = min(best, time.perf_counter() - t)
  assert np.isfinite(metrics["train_loss"]).all()
  return seeds * steps / best, first


def bench_torch(factorised: bool, steps: int) -> float | None:
  """Steps/s of a sequential PyTorch AdamW loop on the same task, model and init scales (None without torch)."""
  try:
    import torch
  except ImportError:
    return None
  g = groups.get(GROUP)
  sp = tasks.split(g, FRAC, base_seed=0, seed=0)
  a, b, c = (torch.as_tensor(sp.train_Px3[:, i], dtype=torch.long) for i in range(3))
  n, e, h = g.order, 256, 128
  gen = torch.Generator().manual_seed(0)
  normal = lambda *shape, fan_in: (torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).requires_grad_()
  wa, wb = normal(n, e, fan_in=e), normal(n, e, fan_in=e)
  w1, u = normal(2 * e, h, fan_in=2 * e), normal(h, n, fan_in=h)
  opt = torch.optim.AdamW([wa, wb, w1, u], lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)

  def step():
    if factorised:
      hidden = torch.relu((wa @ w1[:e])[a] + (wb @ w1[e:])[b])
    else:
      hidden = torch.relu(torch.cat([wa[a], wb[b]], dim=1) @ w1)
    loss = torch.nn.functional.cross_entropy(hidden @ u, c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  for _ in range(3):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    loss = step().detach()
  rate = steps / (time.perf_counter() - t)
  assert math.isfinite(loss.item())
  return rate


def bench_torch_best(factorised: bool, steps: int) -> tuple[float, int] | None:
  """(best steps/s, its thread count) over 1 thread and all cores: on a shared CPU, OpenMP's spinning
  threads can make the multi-threaded loop many times slower than one thread, and the baseline should be
  torch at its best."""
  try:
    import torch
  except ImportError:
    return None
  default = torch.get_num_threads()
  best = None
  for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    rate = bench_torch(factorised, steps)
    if best is None or rate > best[0]:
      best = (rate, threads)
  torch.set_num_threads(default)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="1,8,64,256", help="comma-separated seed counts")
  parser.add_argument("--work", type=int, default=600, help="model-steps per timed call (steps = work / S)")
  parser.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (all lines)")
  parser.add_argument("--run-chunk", default="0", help="comma-separated cfg.exec.run_chunk values (0: automatic)")
  parser.add_argument("--reps", type=int, default=3, help="timed calls per line (the best is reported)")
  parser.add_argument("--torch-steps", type=int, default=30, help="timed steps of each PyTorch loop")
  parser.add_argument("--quick", action="store_true", help="shrink: seeds 1,8, 80 model-steps, 10 torch steps")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  args = parser.parse_args(argv)
  if args.quick:
    args.seeds, args.work, args.torch_steps = "1,8", 80, 10
  seed_counts = [int(s) for s in args.seeds.split(",")]
  chunks = [int(c) for c in args.run_chunk.split(",")]
  if args.eval_every < 1 or min(seed_counts) < 1 or min(chunks) < 0:
    parser.error("--eval-every and --seeds must be positive, --run-chunk non-negative")

  g = groups.get(GROUP)
  cfg = config.default_config()
  n_train = tasks.n_train_pairs(g.order, FRAC)
  flops = step_flops(cfg, n_train, g.order)
  print(f"devices: {jax.devices()}  cores: {os.cpu_count()}  jax {jax.__version__}")
  print(f"task: {GROUP} MLP, {n_train} train pairs, full batch; {flops / 1e9:.3f} GFLOP (matmul) per model-step")
  peak = matmul_rate()
  print(f"measured fp32 matmul rate: {peak / 1e9:.0f} GFLOP/s (2048² XLA matmul, best of 8)")
  torch_plain = torch_fact = None
  if not args.no_torch:
    plain, fact = bench_torch_best(False, args.torch_steps), bench_torch_best(True, args.torch_steps)
    if plain is None:
      print("torch not installed: no baseline (pip install torch)")
    else:
      import torch
      torch_plain, torch_fact = plain[0], fact[0]
      print(f"torch {torch.__version__} sequential AdamW loop (best of 1 and {os.cpu_count()} threads): "
            f"{plain[0]:.1f} steps/s plain (concat) model [{plain[1]} thr], "
            f"{fact[0]:.1f} steps/s factorised [{fact[1]} thr]")
  print(f"evaluation every {args.eval_every} steps in every line")
  print(f"{'seeds':>6} {'chunk':>5} {'model-steps/s':>14} {'ms/model-step':>14} {'vs torch':>9} {'vs t.fact':>9} "
        f"{'GFLOP/s':>8} {'of peak':>8} {'compile s':>10}")
  for s in seed_counts:
    for chunk in chunks:
      rate, first = bench_engine(s, args.work, args.eval_every, chunk, max(1, args.reps))
      ratio = f"{rate / torch_plain:8.1f}x {rate / torch_fact:8.1f}x" if torch_plain else f"{'-':>9} {'-':>9}"
      print(f"{s:>6} {chunk or 'auto':>5} {rate:>14.1f} {1e3 / rate:>14.2f} {ratio} {rate * flops / 1e9:>8.0f} "
            f"{rate * flops / peak:>8.0%} {first:>10.1f}", flush=True)
  print(f"matmul rate re-measured at the end: {matmul_rate() / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
  main()
