"""The language-model family's universal-neurons pass: its time beside the bare XᵀX floor, and its memory.

  python -m benchmarks.lm_correlation                     # 8 seeds of the default byte model, T = 2^15
  python -m benchmarks.lm_correlation --workdir=runs/lm   # the trained models of a run directory
  python -m benchmarks.lm_correlation --memory             # peak RSS of the whole pass at T = 2^15 and 2^17

In one process: the post-GELU activations of every layer of S models on the same T held-out bytes are computed
once and kept in memory as batches; then, on those same batches, (1) a bare float32 XᵀX of the (T, S·L·N)
activation matrix (the floor named by the issue: every product of every pair of neurons), (2) the products the
statistic needs, XᵢᵀXⱼ for i < j plus each model's own XᵢᵀXᵢ for the rotation baseline's variances, as plain
XLA matmuls, and (3) ``universality.kernels.correlation.max_correlation`` with the rotation baseline on the
cross-model blocks (``within=False``), as the pass runs it. ``--memory`` runs the whole pass (forward,
statistics, correlation: ``universality.engine.families.lm.analysis.neuron_table``) at two values of T, each
in its own process, and prints its peak resident memory (VmHWM): it must not grow with T.
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

from benchmarks.correlation import _best_of, _matmul_rate, _peak_rss_gb
from universality.engine import config as config_lib
from universality.engine.families.lm import analysis, family, models
from universality.kernels import correlation as kc


def _models(args):
  """(params_S, cfg): a run directory's last checkpoint, or S freshly initialised default models."""
  if args.workdir:
    from universality.engine import replay  # noqa: PLC0415 - only this mode reads a run directory
    run = replay.open(args.workdir)
    return jax.tree.map(jnp.asarray, run.params()), run.config
  cfg = config_lib.default_config("lm")
  keys = jax.random.split(jax.random.key(0), args.seeds)
  return jax.vmap(lambda k: models.init(k, cfg.model.gpt))(keys), cfg


def timing(args):
  params, cfg = _models(args)
  gpt = cfg.model.gpt
  windows = analysis.analysis_windows(cfg, args.tokens)
  fwd = analysis._forward(gpt)  # pylint: disable=protected-access
  batches = [fwd(params, jnp.asarray(windows[a:a + args.batch_windows, 1:], jnp.int32))[1]
             for a in range(0, len(windows), args.batch_windows)]
  jax.block_until_ready(batches)
  s, _, m = batches[0].shape
  t = sum(b.shape[1] for b in batches)
  print(f"S={s} models x {m} neurons (L={gpt.n_layers} x N={gpt.d_mlp}), T={t} held-out bytes in "
        f"{len(batches)} batches; matmul {_matmul_rate():.0f} GFLOP/s")

  @jax.jit
  def gram_all(acc, x_SxBxM):
    x = jnp.moveaxis(x_SxBxM, 1, 0).reshape(x_SxBxM.shape[1], s * m)
    return acc + x.T @ x

  @jax.jit
  def gram_needed(acc, x_SxBxM):
    own = jnp.einsum("sbm,sbn->smn", x_SxBxM, x_SxBxM)
    cross = jnp.stack([x_SxBxM[i].T @ x_SxBxM[j] for i in range(s) for j in range(i + 1, s)])
    return acc[0] + own, acc[1] + cross

  def run_all():
    acc = jnp.zeros((s * m, s * m), jnp.float32)
    for b in batches:
      acc = gram_all(acc, b)
    return acc

  def run_needed():
    acc = (jnp.zeros((s, m, m), jnp.float32), jnp.zeros((s * (s - 1) // 2, m, m), jnp.float32))
    for b in batches:
      acc = gram_needed(acc, b)
    return acc

  key = jax.random.key(0)
  t_all = _best_of(run_all, args.repeats)
  t_needed = _best_of(run_needed, args.repeats)
  t_kernel = _best_of(lambda: kc.max_correlation(lambda: iter(batches), baseline="rotation", key=key,
                                                 within=False), args.repeats)
  f_all, f_needed = 2.0 * t * (s * m) ** 2, 2.0 * t * m * m * (s + s * (s - 1) // 2)
  for name, sec, flops in (("bare XᵀX of all S·L·N neurons", t_all, f_all),
                           ("the products the statistic needs", t_needed, f_needed),
                           ("max_correlation (rotation, cross-model)", t_kernel, f_needed)):
    print(f"  {name:42s} {sec:8.2f} s  {flops / sec / 1e9:6.0f} GFLOP/s  {sec / t_all:5.2f}x the bare XᵀX")


def memory(args):
  for tokens in (1 << 15, 1 << 17):
    cmd = [sys.executable, "-m", "benchmarks.lm_correlation", "--pass_only", f"--tokens={tokens}",
           f"--seeds={args.seeds}", f"--batch_windows={args.batch_windows}"]
    cmd += [f"--workdir={args.workdir}"] if args.workdir else []
    subprocess.run(cmd, check=True, env=os.environ)


def pass_only(args):
  params, cfg = _models(args)
  windows = analysis.analysis_windows(cfg, args.tokens)
  settings = dict(family.ANALYSIS_SETTINGS, batch_windows=args.batch_windows)
  t0 = time.perf_counter()
  table = analysis.neuron_table(params, windows, cfg.model.gpt, jax.random.key(0), settings)
  sec = time.perf_counter() - t0
  print(f"  whole pass at T={windows.shape[0] * (windows.shape[1] - 1)}: {sec:7.1f} s, peak RSS "
        f"{_peak_rss_gb():.2f} GB, universal {table['universal'][~table['dead']].mean():.2%}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="")
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--tokens", type=int, default=1 << 15)
  p.add_argument("--batch_windows", type=int, default=32)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--memory", action="store_true")
  p.add_argument("--pass_only", action="store_true")
  args = p.parse_args(argv)
  if args.pass_only:
    pass_only(args)
  elif args.memory:
    memory(args)
  else:
    timing(args)


if __name__ == "__main__":
  main()
