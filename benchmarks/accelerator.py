"""The accelerator check of the imported-suite pass: kernel against a bare matmul, GPT-2 forward, projection.

  python -m benchmarks.accelerator            # on a GPU or TPU: GPT-2-small shapes, under 5 minutes
  python -m benchmarks.accelerator --tiny     # any device, tiny shapes (what the CPU runs by default)
  python -m benchmarks.accelerator --memory   # CPU: peak RSS of the whole pass over tiny models at T = 2^18

In one process, with random weights of the architecture (no download; the arithmetic does not depend on
the values):

1. the streamed max-correlation kernel (``universality.kernels.correlation``, the exact pass of the
   universal-neurons study: every run against every other, per-layer rotation baseline) beside a bare
   float32 XᵀX of the same activations (every product of every pair of neurons: the floor);
2. the forward pass of S stacked imported GPT-2 models (``universality.engine.families.imported.models``) on
   windows of 512 tokens, in tokens per second per model, beside PyTorch's ``GPT2LMHeadModel`` run model by
   model on the same device when ``transformers`` is installed;
3. the projected time of the paper's pass, 5 GPT-2-small models (12 × 3,072 neurons each) over T = 10^8
   tokens: the forward at the measured rate plus the co-moments at the kernel's measured FLOP rate
   (2·T·(S·M)² · the share of blocks the pass computes: the cross-model ones, each model's own for the
   rotation's variances).

Memory of the paper's pass on one device, counted from the sizes by
``universality.engine.families.imported.analysis.pass_bytes`` (the import command prints it and refuses a
pass that exceeds the device's ``bytes_limit`` before writing anything), float32, 5 GPT-2-small models at
the defaults (4 windows of 512 per batch): per-layer rotations, block-diagonal but held dense as the kernel
takes them, S·M² = 5 · 36,864² · 4 B = 27.2 GB; each model's own co-moment for the rotated variances,
27.2 GB; the co-moment tiles 1.1 GB (``memory_gb``); a batch of pre- and post-activations and the buffer
that packs kept tokens, 6.0 GB; token statistics 0.8 GB; the forward's intermediates 2.6 GB; weights
2.5 GB: 67 GB. On an 80 GB card that needs ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9`` (JAX takes 75% by
default). The rotations are most of it: a kernel that took them layer by layer (12 × 3,072² per model,
2.3 GB) would save 25 GB. Not measured: no accelerator on the machine this was written on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.correlation import _best_of, _peak_rss_gb
from universality.engine.families.imported import analysis, family, models
from universality.kernels import correlation as kc

GPT2_SMALL = models.Spec(arch="gpt2", vocab=50257, n_layers=12, d_model=768, n_heads=12, d_mlp=3072,
                         context=1024)
TINY = models.Spec(arch="gpt2", vocab=1021, n_layers=2, d_model=64, n_heads=4, d_mlp=256, context=128)
PAPER_T, PAPER_S = 10 ** 8, 5


def random_params(spec: models.Spec, s: int, seed: int = 0):
  """S models of ``spec`` with GPT-2's initialisation scale (normal 0.02; unit LayerNorm gains)."""
  rng = np.random.default_rng(seed)
  def leaf(path, shape):
    name = jax.tree_util.keystr(path)
    if "_g" in name:
      return np.ones((s,) + tuple(shape), np.float32)
    return (0.02 * rng.standard_normal((s,) + tuple(shape))).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, models.param_shapes(spec),
                                          is_leaf=lambda x: isinstance(x, tuple))


def kernel_vs_matmul(s: int, m: int, t: int, layers: int, repeats: int) -> dict:
  """Seconds of the exact pass's kernel and of the bare XᵀX on the same [S, T, M] activations."""
  acts = jax.random.normal(jax.random.PRNGKey(0), (s, t, m), jnp.float32)
  flat = jnp.moveaxis(acts, 0, 1).reshape(t, s * m)
  bare = jax.jit(lambda x: x.T @ x)
  t_bare = _best_of(lambda: bare(flat), repeats)
  key = jax.random.PRNGKey(1)
  t_kernel = _best_of(lambda: kc.max_correlation(acts, baseline="rotation", key=key, within=False,
                                                  rotation_blocks=layers).max_SxNxS, repeats)
  flops_bare = 2.0 * t * (s * m) ** 2
  return {"bare_s": t_bare, "kernel_s": t_kernel, "bare_flops": flops_bare / t_bare,
          "kernel_products": 2.0 * t * m * m * (s * (s - 1) / 2 + s)}


def forward_rate(spec: models.Spec, s: int, batch: int, context: int, repeats: int,
                 dtype: str = "float32") -> float:
  """Tokens per second per model of the stacked forward (activations of every layer returned)."""
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), random_params(spec, s))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, spec.vocab, (batch, context)), jnp.int32)
  fwd = jax.jit(lambda p, x: models.apply_stacked(p, x, spec)[1]["mlp_post"])
  return batch * context / _best_of(lambda: fwd(params, ids), repeats)


def torch_forward_rate(spec: models.Spec, s: int, batch: int, context: int, repeats: int) -> float | None:
  """The same forward in PyTorch (transformers' GPT2LMHeadModel, model after model), tokens/s per model;
  on the CPU the better of one thread and all of them."""
  try:
    import torch  # noqa: PLC0415 - optional
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  cfg = transformers.GPT2Config(vocab_size=spec.vocab, n_positions=spec.context, n_embd=spec.d_model,
                                n_layer=spec.n_layers, n_head=spec.n_heads, n_inner=spec.d_mlp,
                                bos_token_id=None, eos_token_id=None)
  device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
  nets = [transformers.GPT2LMHeadModel(cfg).eval().to(device) for _ in range(s)]
  ids = torch.as_tensor(np.random.default_rng(0).integers(0, spec.vocab, (batch, context)), device=device)

  def run():
    with torch.no_grad():
      for net in nets:
        net(ids, output_hidden_states=False)
    if device == "cuda":
      torch.cuda.synchronize()
  best = float("inf")
  default = torch.get_num_threads()
  for threads in sorted({1, default}):  # the faster of one thread and all (a loaded CPU favours one)
    torch.set_num_threads(threads)
    run()
    best = min([best] + [_timed(run) for _ in range(max(repeats, 5))])
  torch.set_num_threads(default)
  return batch * context / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def memory_pass(tokens: int) -> tuple[float, float]:
  """Seconds and peak RSS (GB) of the whole pass (forward, statistics, correlation) over 3 tiny models."""
  spec = TINY
  params = jax.tree.map(jnp.asarray, random_params(spec, 3))
  ids = np.random.default_rng(0).integers(0, spec.vocab, tokens).astype(np.int32).reshape(-1, spec.context)
  settings = dict(family.ANALYSIS_SETTINGS, batch_windows=32)
  t0 = time.perf_counter()
  out = analysis.neuron_table(params, ids, spec, jax.random.PRNGKey(0), settings, [])
  assert out["excess"].shape == (3, spec.n_layers, spec.d_mlp)
  return time.perf_counter() - t0, _peak_rss_gb()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (the default on the CPU)")
  p.add_argument("--memory", action="store_true", help="peak RSS of the tiny pass at T = 2^18, own process")
  p.add_argument("--memory_tokens", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  if args.memory_tokens:
    secs, rss = memory_pass(args.memory_tokens)
    print(f"whole pass over 3 tiny models at T={args.memory_tokens}: {secs:.1f} s, peak RSS {rss:.2f} GB")
    return
  if args.memory:
    for t in (1 << 15, 1 << 18):
      subprocess.run([sys.executable, "-m", "benchmarks.accelerator", f"--memory_tokens={t}"], check=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return
  backend = jax.default_backend()
  tiny = args.tiny or backend == "cpu"
  spec = TINY if tiny else GPT2_SMALL
  print(f"device: {jax.devices()[0].device_kind} ({backend}); shapes: {'tiny' if tiny else 'GPT-2 small'}")
  if tiny:
    print("On a GPU or TPU this measures: the kernel on 5 models x 3,072 neurons (one GPT-2-small layer "
          "each) over T = 32,768; the GPT-2-small forward of 5 stacked models on 8 x 512 tokens; the paper's "
          "pass projected from both.")
  s, m, t, layers = (3, 512, 8192, 2) if tiny else (PAPER_S, GPT2_SMALL.d_mlp, 32768, 1)
  batch, context = (4, 128) if tiny else (8, 512)
  torch_rate = torch_forward_rate(spec, s, batch, context, args.repeats)  # first: before XLA's threads run
  k = kernel_vs_matmul(s, m, t, layers, args.repeats)
  print(f"kernel vs bare matmul, S={s} x {m} neurons, T={t}: bare XᵀX {k['bare_s']:.3f} s "
        f"({k['bare_flops'] / 1e12:.2f} TFLOP/s), max_correlation {k['kernel_s']:.3f} s "
        f"({k['kernel_s'] / k['bare_s']:.2f}x the bare XᵀX; "
        f"{k['kernel_products'] / k['kernel_s'] / 1e12:.2f} TFLOP/s of the products it needs)")
  rate = forward_rate(spec, s, batch, context, args.repeats)
  if not tiny:  # the pass's forward_dtype=bfloat16
    print(f"forward in bfloat16: {forward_rate(spec, s, batch, context, args.repeats, 'bfloat16'):,.0f} "
          "tokens/s per model")
  line = f"forward of {s} stacked models, {batch} x {context} tokens: {rate:,.0f} tokens/s per model"
  if torch_rate:
    line += f"; PyTorch model by model {torch_rate:,.0f} tokens/s per model ({rate / torch_rate:.2f}x)"
  print(line)
  m_paper = GPT2_SMALL.n_layers * GPT2_SMALL.d_mlp
  products = 2.0 * PAPER_T * m_paper ** 2 * (PAPER_S * (PAPER_S - 1) / 2 + PAPER_S)
  kernel_rate = k["kernel_products"] / k["kernel_s"]
  fwd = PAPER_T / rate * (1 if not tiny else float("nan"))
  corr = products / kernel_rate
  print(f"projected paper pass (5 GPT-2 small, T=1e8): co-moments {corr / 3600:.1f} h at the kernel's rate"
        + (f", forward {fwd / 3600:.1f} h" if not tiny else " (forward: measured on the accelerator only)"))


if __name__ == "__main__":
  main()
