"""Training throughput of the byte transformer (universality.engine.families.lm): universality.engine.train at 1 and 8 seeds vs PyTorch.

usage: python benchmarks/lm_throughput.py [--seeds 1,8] [--evals 1] [--reps 3] [--torch-steps 20]
                                         [--layers 2] [--d-model 128] [--heads 4] [--d-mlp 512]
                                         [--context 128] [--batch 8] [--eval-every 50] [--run-chunk 0]
                                         [--no-torch] [--no-breakdown] [--only-breakdown] [--quick]

The model and training are those of ``experiments/configs/lm_default.py`` (2 layers, d_model 128, 4 heads,
d_mlp 512, context 128, 8 windows per step, AdamW lr 3e-3, betas 0.9/0.95, weight decay 0.1, global-norm
clipping 1.0, 100 warm-up steps then cosine decay) on the Python standard library corpus; the flags change
the shape. For each seed count S one ``trainer.run`` call of ``--evals`` evaluation intervals
(``--eval-every`` steps each, 50 as in the default config, so evaluation is the same share as in a launch)
is compiled and warmed up; model-steps/s is S × steps / seconds.

Beside it, in the same process, a plain sequential PyTorch loop trains exactly the same function: GPT-2 init,
pre-LN blocks of causal multi-head attention and a GELU (tanh) MLP, learned positions, final LN, unembedding
without bias, on windows sampled from the same training bytes, with ``torch.optim.AdamW`` (same betas, decay,
eps), ``clip_grad_norm_`` and the same warm-up + cosine multiplier (``LambdaLR``). Torch runs with 1 thread
and with all cores, attention both as ``scaled_dot_product_attention(is_causal=True)`` and as an explicit
masked softmax; the baseline of the ratio is the fastest of the four. Torch's loop does no evaluation; the
engine's lines include it.

The machine is shared, so every timed call of every configuration is repeated ``--reps`` times in an
interleaved order (engine S=1, engine S=8, torch ...; then again), the best of each is reported, and each line
shows the 1-minute load average over its calls and the process CPU seconds per model-step of its best call
(wall time inflates under contention; CPU time much less). FLOPs are the step's matrix products: 6 × (matmul
parameters) × tokens for the dense layers and the unembedding, plus QKᵀ and AV forward and backward
(12·B·T²·D per layer, full square as computed); the embedding lookup is not a product. Utilisation is against
the 2048² XLA fp32 matmul rate measured at the start and the end.

The breakdown times the pieces of one run's step (jitted loops of 20 iterations, best of ``--reps``, wall and
CPU): the step's matrix products alone (the same shapes on random operands: the floor the rest adds to), the
forward loss, forward and backward, and the AdamW update with clipping and schedule alone; and prints XLA's
cost analysis of the compiled forward-and-backward. The same products are timed in PyTorch on 1 thread
(torch's floor at these shapes). ``--only-breakdown`` skips the training lines.
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

from benchmarks.train_throughput import matmul_rate  # noqa: E402
from universality.engine import optim, train  # noqa: E402
from universality.engine.families.lm import family as lm_family  # noqa: E402
from universality.engine.families.lm import models  # noqa: E402
from universality.experiments.configs import lm_default  # noqa: E402

_PIECE_ITERS = 20


def make_config(args, seeds: int):
  cfg = lm_default.get_config()
  g = cfg.model.gpt
  g.n_layers, g.d_model, g.n_heads, g.d_mlp, g.context = (args.layers, args.d_model, args.heads, args.d_mlp,
                                                         args.context)
  cfg.batch_size, cfg.eval_every, cfg.seeds = args.batch, args.eval_every, seeds
  cfg.steps = args.eval_every * max(1, cfg.steps // args.eval_every)  # the schedule's length, not timed
  cfg.exec.run_chunk = args.run_chunk
  cfg.exec.analyze = False
  return cfg


def step_flops(cfg) -> float:
  """Matrix-product FLOPs of one training step of one model (see the module docstring)."""
  g = cfg.model.gpt
  d, n, l, t, b = g.d_model, g.d_mlp, g.n_layers, g.context, cfg.batch_size
  matmul_params = l * (d * 3 * d + d * d + 2 * d * n) + d * 256
  return 6.0 * matmul_params * b * t + l * 12.0 * b * t * t * d


class Timed:
  """Best wall time of repeated calls, with the CPU time of that call and the load averages seen."""

  def __init__(self):
    self.best, self.cpu, self.loads = math.inf, math.nan, []

  def measure(self, fn):
    self.loads.append(os.getloadavg()[0])
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if wall < self.best:
      self.best, self.cpu = wall, cpu

  @property
  def load(self) -> str:
    return f"{min(self.loads):.1f}-{max(self.loads):.1f}"


class EngineBench:
  """``trainer.run`` of ``evals`` intervals at ``seeds`` seeds, compiled and warmed up at construction."""

  def __init__(self, args, seeds: int):
    self.cfg = make_config(args, seeds)
    self.trainer = train.make_train(self.cfg)
    self.evals, self.seeds = args.evals, seeds
    self.work = seeds * args.evals * args.eval_every
    t = time.perf_counter()
    self.state, _ = self.trainer.run(self.trainer.init(), self.evals)
    self.first = time.perf_counter() - t
    self.timed = Timed()

  def call(self):
    self.state, metrics = self.trainer.run(self.state, self.evals)
    assert np.isfinite(metrics["train_bpb"]).all()


def torch_bench(cfg, text: np.ndarray, attention: str, threads: int):
  """A closure running ``n`` steps of the sequential PyTorch loop (None without torch)."""
  try:
    import torch
  except ImportError:
    return None
  F = torch.nn.functional
  g = cfg.model.gpt
  d, n, h, l, c, b, v = g.d_model, g.d_mlp, g.n_heads, g.n_layers, g.context, cfg.batch_size, 256
  gen = torch.Generator().manual_seed(0)
  normal = lambda *shape, std=0.02: (torch.randn(*shape, generator=gen) * std).requires_grad_()
  zeros = lambda *shape: torch.zeros(*shape, requires_grad=True)
  ones = lambda *shape: torch.ones(*shape, requires_grad=True)
  proj = 0.02 / math.sqrt(2 * l)
  top = dict(embed=normal(v, d), pos=normal(c, d), lnf_g=ones(d), lnf_b=zeros(d), unembed=normal(d, v))
  blocks = [dict(ln1_g=ones(d), ln1_b=zeros(d), w_qkv=normal(d, 3 * d), b_qkv=zeros(3 * d),
                 w_o=normal(d, d, std=proj), b_o=zeros(d), ln2_g=ones(d), ln2_b=zeros(d),
                 w_in=normal(d, n), b_in=zeros(n), w_out=normal(n, d, std=proj), b_out=zeros(d))
            for _ in range(l)]
  params = list(top.values()) + [p for w in blocks for p in w.values()]
  causal_TxT = torch.ones(c, c, dtype=torch.bool).tril()

  def forward(tokens_BxT):
    x = top["embed"][tokens_BxT] + top["pos"]
    for w in blocks:
      y = F.layer_norm(x, (d,), w["ln1_g"], w["ln1_b"], 1e-5)
      q, k, val = (y @ w["w_qkv"] + w["b_qkv"]).view(b, c, 3, h, d // h).permute(2, 0, 3, 1, 4)
      if attention == "sdpa":
        o = F.scaled_dot_product_attention(q, k, val, is_causal=True)
      else:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        o = torch.softmax(scores.masked_fill(~causal_TxT, float("-inf")), dim=-1) @ val
      x = x + o.transpose(1, 2).reshape(b, c, d) @ w["w_o"] + w["b_o"]
      y = F.layer_norm(x, (d,), w["ln2_g"], w["ln2_b"], 1e-5)
      x = x + F.gelu(y @ w["w_in"] + w["b_in"], approximate="tanh") @ w["w_out"] + w["b_out"]
    return F.layer_norm(x, (d,), top["lnf_g"], top["lnf_b"], 1e-5) @ top["unembed"]

  o = cfg.opt
  opt = torch.optim.AdamW(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                          weight_decay=float(o.weight_decay))
  multiplier = optim.lr_multiplier(o, cfg.steps)
  table = np.asarray(jax.vmap(multiplier)(jnp.arange(cfg.steps + 1)), np.float64)  # the engine's own schedule
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(table[min(s, cfg.steps)]))
  text_t = torch.as_tensor(text.astype(np.int64))
  offsets = torch.arange(c + 1)

  def step():
    starts = torch.randint(0, len(text_t) - c - 1, (b,), generator=gen)
    windows = text_t[starts[:, None] + offsets]
    loss = F.cross_entropy(forward(windows[:, :-1]).reshape(-1, v), windows[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, float(o.clip_norm))
    opt.step()
    sched.step()
    return loss

  def run(steps: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      for _ in range(steps):
        loss = step()
      assert math.isfinite(loss.item())
    finally:
      torch.set_num_threads(previous)

  return run


def _products(cfg):
  """A loop body running only the matrix products of one training step (forward and backward, the step's
  shapes, ``step_flops`` of them): the floor the step's other work adds to."""
  g = cfg.model.gpt
  d, n, h, t, b = g.d_model, g.d_mlp, g.n_heads, g.context, cfg.batch_size
  m, e = b * t, d // h
  key = jax.random.PRNGKey(2)
  dense = [(d, 3 * d), (d, d), (d, n), (n, d)] * g.n_layers + [(d, 256)]
  xs = [jax.random.normal(jax.random.fold_in(key, i), (m, k)) for i, (k, _) in enumerate(dense)]
  ws = [jax.random.normal(jax.random.fold_in(key, 100 + i), kp) for i, kp in enumerate(dense)]
  gs = [jax.random.normal(jax.random.fold_in(key, 200 + i), (m, p)) for i, (_, p) in enumerate(dense)]
  rand = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape)
  # per layer: q, k, v, the output gradient [G=B·H, T, E]; probabilities and score gradient [G, T, T]
  attn = [[rand(300 + 10 * layer + j, (b * h, t, e)) for j in range(4)]
          + [rand(305 + 10 * layer + j, (b * h, t, t)) for j in range(2)] for layer in range(g.n_layers)]

  def body(i, acc):
    s = 1.0 + i.astype(jnp.float32) * 1e-7  # loop-dependent inputs, so XLA cannot hoist the products
    out = []
    for x, w, gr in zip(xs, ws, gs):
      out += [(s * x) @ w, (s * gr) @ w.T, (s * x).T @ gr]
    for q, k, v, do, p, ds in attn:
      q, p = s * q, s * p
      out += [jnp.einsum("gqe,gke->gqk", q, k), jnp.einsum("gqk,gke->gqe", p, v),    # QKᵀ, AV
              jnp.einsum("gqe,gke->gqk", do, v), jnp.einsum("gqk,gqe->gke", p, do),  # dP, dV
              jnp.einsum("gqk,gke->gqe", ds, k), jnp.einsum("gqk,gqe->gke", ds, q)]  # dQ, dK
    # full sums (an extra read of every output, a few % of the time) rather than one element, which XLA
    # could compute by slicing the operands
    return acc + sum(jnp.sum(o) for o in out)

  return body


def _torch_products(cfg):
  """The same products as ``_products`` in PyTorch (None without torch): torch's floor at these shapes."""
  try:
    import torch
  except ImportError:
    return None
  g = cfg.model.gpt
  d, n, h, t, b = g.d_model, g.d_mlp, g.n_heads, g.context, cfg.batch_size
  m, e = b * t, d // h
  gen = torch.Generator().manual_seed(2)
  rand = lambda *shape: torch.randn(*shape, generator=gen)
  dense = [(d, 3 * d), (d, d), (d, n), (n, d)] * g.n_layers + [(d, 256)]
  mats = [(rand(m, k), rand(k, p), rand(m, p)) for k, p in dense]
  attn = [[rand(b * h, t, e) for _ in range(4)] + [rand(b * h, t, t) for _ in range(2)] for _ in range(g.n_layers)]

  def run():
    torch.set_num_threads(1)
    for _ in range(_PIECE_ITERS):
      for x, w, gr in mats:
        x @ w, gr @ w.T, x.T @ gr
      for q, k, v, do, p, ds in attn:
        q @ k.transpose(1, 2), p @ v, do @ v.transpose(1, 2), p.transpose(1, 2) @ do, ds @ k, ds.transpose(1, 2) @ q

  return run


def breakdown(cfg, reps: int, flops: float) -> None:
  """Wall and CPU ms of the pieces of one run's step, and XLA's cost analysis of forward and backward."""
  g = cfg.model.gpt
  corpus = lm_family.corpus_of(cfg)
  text = jnp.asarray(corpus.train)
  n_starts = len(corpus.train) - g.context
  params = models.init(jax.random.PRNGKey(0), g)

  def windows(i):
    starts_B = jax.random.randint(jax.random.fold_in(jax.random.PRNGKey(1), i), (cfg.batch_size,), 0, n_starts)
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(text, s, g.context + 1))(starts_B)

  loss = lambda p, w: models.next_byte_xent(p, w, g)
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  tx = optim.make(cfg.opt, cfg.steps, 3e-3, 0.1, lambda p: p)
  grads0 = jax.grad(loss)(params, windows(0))

  def update(i, carry):
    p, s = carry
    u, s = tx.update(grads0, s, p)
    return jax.tree.map(jnp.add, p, u), s

  pieces = {
      "matrix products alone": jax.jit(lambda p: jax.lax.fori_loop(0, _PIECE_ITERS, _products(cfg), 0.0)),
      "forward loss": jax.jit(lambda p: jax.lax.fori_loop(0, _PIECE_ITERS, lambda i, a: a + loss(p, windows(i)),
                                                          0.0)),
      "forward + backward": jax.jit(lambda p: jax.lax.fori_loop(
          0, _PIECE_ITERS, lambda i, a: add(a, jax.grad(loss)(p, windows(i))), jax.tree.map(jnp.zeros_like, p))),
      "AdamW update (clip, schedule)": jax.jit(lambda p: jax.lax.fori_loop(0, _PIECE_ITERS, update,
                                                                           (p, tx.init(p)))),
  }
  calls = {name: (lambda fn=fn: jax.block_until_ready(fn(params))) for name, fn in pieces.items()}
  torch_products = _torch_products(cfg)
  if torch_products is not None:
    calls["torch: matrix products, 1 thread"] = torch_products
  timed = {}
  for name, call in calls.items():
    call()
    timed[name] = Timed()
  for _ in range(reps):
    for name, call in calls.items():
      timed[name].measure(call)
  print(f"breakdown of one run's step (loops of {_PIECE_ITERS}, best of {reps}; wall / CPU ms per iteration):")
  for name, t in timed.items():
    extra = (f"  {flops / (t.best / _PIECE_ITERS) / 1e9:.0f} GFLOP/s wall, "
             f"{flops / (t.cpu / _PIECE_ITERS) / 1e9:.0f} per CPU-second" if "products" in name else "")
    print(f"  {name:32s} {t.best / _PIECE_ITERS * 1e3:7.1f} / {t.cpu / _PIECE_ITERS * 1e3:6.1f}  "
          f"load {t.load}{extra}")
  cost = jax.jit(jax.grad(loss)).lower(params, windows(0)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  print(f"  XLA cost analysis of forward + backward: {cost.get('flops', math.nan) / 1e9:.2f} GFLOP, "
        f"{cost.get('transcendentals', math.nan) / 1e6:.2f} M transcendentals, "
        f"{cost.get('bytes accessed', math.nan) / 1e6:.0f} MB accessed")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="1,8", help="comma-separated seed counts")
  parser.add_argument("--evals", type=int, default=1, help="evaluation intervals per timed engine call")
  parser.add_argument("--eval-every", type=int, default=50, help="steps per evaluation interval")
  parser.add_argument("--reps", type=int, default=3, help="interleaved timed calls per line (best reported)")
  parser.add_argument("--torch-steps", type=int, default=20, help="steps per timed PyTorch call")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--d-mlp", type=int, default=512)
  parser.add_argument("--context", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8, help="context windows per step")
  parser.add_argument("--run-chunk", type=int, default=0, help="cfg.exec.run_chunk (0: automatic, 1 on CPU)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loops")
  parser.add_argument("--no-breakdown", action="store_true", help="skip the per-piece breakdown")
  parser.add_argument("--only-breakdown", action="store_true", help="skip the training lines")
  parser.add_argument("--quick", action="store_true", help="shrink: eval every 10 steps, 2 reps, 5 torch steps")
  args = parser.parse_args(argv)
  if args.quick:
    args.eval_every, args.reps, args.torch_steps = 10, 2, 5
  seed_counts = [int(s) for s in args.seeds.split(",")]
  if min(seed_counts) < 1 or args.evals < 1 or args.reps < 1 or args.eval_every < 1:
    parser.error("--seeds, --evals, --reps and --eval-every must be positive")

  cfg = make_config(args, 1)
  g = cfg.model.gpt
  flops = step_flops(cfg)
  print(f"devices: {jax.devices()}  cores: {os.cpu_count()}  jax {jax.__version__}")
  print(f"model: {g.n_layers} layers, d_model {g.d_model}, {g.n_heads} heads, d_mlp {g.d_mlp}, context "
        f"{g.context}; {cfg.batch_size} windows per step; {flops / 1e9:.3f} GFLOP (matmul) per model-step")
  peak = matmul_rate()
  print(f"measured fp32 matmul rate: {peak / 1e9:.0f} GFLOP/s (2048² XLA matmul, best of 8)")

  if args.only_breakdown:
    seed_counts, args.no_torch = [], True
  lines = {}  # name -> (Timed, model-steps per call, run)
  for s in seed_counts:
    e = EngineBench(args, s)
    print(f"engine {s} seeds: compile + first call {e.first:.1f} s", flush=True)
    lines[f"engine S={s}"] = (e.timed, e.work, e.call)
  if not args.no_torch:
    corpus = lm_family.corpus_of(cfg)
    for attention in ("sdpa", "masked"):
      for threads in sorted({1, os.cpu_count() or 1}):
        run = torch_bench(cfg, corpus.train, attention, threads)
        if run is None:
          print("torch not installed: no baseline (pip install torch)")
          break
        run(3)  # warm-up: allocator, autograd graph, OpenMP pool
        lines[f"torch {attention} {threads} thr"] = (Timed(), args.torch_steps,
                                                     lambda r=run: r(args.torch_steps))
  for _ in range(args.reps):
    for timed, _, call in lines.values():
      timed.measure(call)

  rate = {name: work / t.best for name, (t, work, _) in lines.items()}
  torch_names = [k for k in rate if k.startswith("torch")]
  base = max(torch_names, key=rate.get) if torch_names else None
  if base:
    import torch
    print(f"torch {torch.__version__}; baseline: {base} ({rate[base]:.1f} steps/s)")
  if lines:
    print_lines(args, lines, rate, base, flops, peak)
  if not args.no_breakdown:
    breakdown(cfg, args.reps, flops)
  print(f"matmul rate re-measured at the end: {matmul_rate() / 1e9:.0f} GFLOP/s; load average "
        f"{os.getloadavg()[0]:.1f}")


def print_lines(args, lines, rate, base, flops, peak):
  print(f"best of {args.reps} interleaved calls; engine calls: {args.evals} × {args.eval_every} steps per run "
        f"with evaluation; torch calls: {args.torch_steps} steps")
  print(f"{'line':>20} {'model-steps/s':>14} {'ms/model-step':>14} {'CPU ms/m-step':>14} {'vs torch':>9} "
        f"{'GFLOP/s':>8} {'of peak':>8} {'load':>10}")
  for name, (t, work, _) in lines.items():
    r = rate[name]
    ratio = f"{r / rate[base]:8.2f}x" if base else f"{'-':>9}"
    print(f"{name:>20} {r:>14.2f} {1e3 / r:>14.1f} {t.cpu / work * 1e3:>14.1f} {ratio} {r * flops / 1e9:>8.0f} "
          f"{r * flops / peak:>8.0%} {t.load:>10}", flush=True)


if __name__ == "__main__":
  main()
