"""Training throughput of the vision family's conv net: universality.engine.train over S seeds vs a PyTorch
loop.

usage: python benchmarks/vision_throughput.py [--seeds 1,16] [--steps 400] [--eval-every 200] [--no-torch]
                                             [--widths 16,32,32] [--dense 64] [--batch 64] [--run-chunk 0]

The net is the default vision study's (experiments/configs/vision_default.py): 3×3 convs of the given widths
with ReLU and 2×2 max pooling after each, a dense ReLU layer and the head, on scikit-learn's 8×8 digits,
minibatches of ``--batch`` images drawn uniformly, AdamW (lr 3e-3, weight decay 1e-4, betas 0.9/0.999).
For each seed count S the engine compiles one ``trainer.run`` of ``--steps`` steps (evaluation every
``--eval-every`` steps, as a launch does), runs it once to warm up, then reports the best of two timed calls
as model-steps per second (S × steps / seconds); ``--run-chunk`` lists ``exec.run_chunk`` values (runs vmapped
together per ``lax.map`` step; 0 = the automatic default, one at a time on the CPU), each timed. Beside it, in
the same process, a plain sequential PyTorch loop trains the same net with the same optimiser and batch (torch
is optional: the ``torch`` extra): its model-steps per second are those of S models trained one after another.
Torch gets its best of 1 thread and all cores. The ratio column is engine / torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from universality.engine import config, train  # noqa: E402
from universality.engine.families.vision import family  # noqa: E402


def study(seeds: int, steps: int, eval_every: int, widths: str, dense: str, batch: int, chunk: int = 0):
  cfg = config.default_config("vision")
  cfg.exec.run_chunk = chunk
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.batch_size = seeds, steps, eval_every, batch
  cfg.model.conv.widths, cfg.model.conv.dense = widths, dense
  cfg.opt.lr, cfg.opt.weight_decay, cfg.opt.b2 = "3e-3", "1e-4", 0.999
  cfg.exec.analyze = False
  return cfg


def bench_engine(cfg) -> float:
  trainer = train.make_train(cfg)
  n = cfg.steps // cfg.eval_every
  state = trainer.init()
  state, _ = trainer.run(state, n)  # compile and warm up
  jax.block_until_ready(state)
  best = np.inf
  for _ in range(2):
    t = time.perf_counter()
    state, _ = trainer.run(state, n)
    jax.block_until_ready(state)
    best = min(best, time.perf_counter() - t)
  return cfg.seeds * cfg.steps / best


def bench_torch(cfg, threads: int) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  d = family.dataset_of(cfg)
  spec = family.spec_of(cfg, d)
  mean, std = d.channel_stats()
  x_all = torch.tensor((d.train_images.astype(np.float32) - mean) / std).permute(0, 3, 1, 2).contiguous()
  y_all = torch.tensor(d.train_labels.astype(np.int64))
  layers, c_in = [], spec.channels
  for i, c in enumerate(spec.widths):
    layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU()]
    if spec.pools_after(i):
      layers.append(torch.nn.MaxPool2d(2))
    c_in = c
  layers.append(torch.nn.Flatten())
  n_in = spec.flat_features()
  for n in spec.dense:
    layers += [torch.nn.Linear(n_in, n), torch.nn.ReLU()]
    n_in = n
  layers.append(torch.nn.Linear(n_in, spec.classes))
  model = torch.nn.Sequential(*layers)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4, betas=(0.9, 0.999))
  gen = torch.Generator().manual_seed(0)
  loss_fn = torch.nn.CrossEntropyLoss()

  def steps(n):
    for _ in range(n):
      idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(x_all[idx]), y_all[idx])
      loss.backward()
      opt.step()

  steps(50)
  best = np.inf
  for _ in range(2):
    t = time.perf_counter()
    steps(cfg.steps)
    best = min(best, time.perf_counter() - t)
  return cfg.steps / best


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", default="1,16")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval-every", type=int, default=200)
  p.add_argument("--widths", default="16,32,32")
  p.add_argument("--dense", default="64")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--run-chunk", default="0")
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  base = study(1, args.steps, args.eval_every, args.widths, args.dense, args.batch)
  print(f"devices: {jax.devices()}  cores: {os.cpu_count()}  jax {jax.__version__}")
  print(f"net: conv {args.widths}, dense {args.dense or '-'}, batch {args.batch} digits 8x8, AdamW; "
        f"{args.steps} steps per call, evaluation every {args.eval_every}")
  torch_rate = None
  if not args.no_torch:
    rates = [r for r in (bench_torch(base, 1), bench_torch(base, os.cpu_count())) if r is not None]
    torch_rate = max(rates) if rates else None
    if torch_rate is None:
      print("torch not installed: no baseline (pip install -e '.[torch]')")
    else:
      import torch
      print(f"torch {torch.__version__} sequential AdamW loop (best of 1 and {os.cpu_count()} threads): "
            f"{torch_rate:.1f} model-steps/s")
  print(f"{'seeds':>6} {'chunk':>5} {'model-steps/s':>14} {'ms/model-step':>14} {'vs torch':>9}")
  for s in seeds:
    for chunk in sorted({min(int(c), s) for c in args.run_chunk.split(",")}):
      rate = bench_engine(study(s, args.steps, args.eval_every, args.widths, args.dense, args.batch, chunk))
      ratio = f"{rate / torch_rate:8.2f}x" if torch_rate else f"{'-':>9}"
      print(f"{s:>6} {chunk or 'auto':>5} {rate:>14.1f} {1e3 / rate:>14.2f} {ratio}", flush=True)


if __name__ == "__main__":
  main()
