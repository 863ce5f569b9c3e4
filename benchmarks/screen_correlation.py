"""The screened universal-neurons pass beside the exact streamed pass and Gurnee et al.'s accumulator, on
real byte-LM activations.

  python -m universality.experiments.lm_universality --workdir=runs/lm2 \\
      --config=experiments/configs/lm_default.py --config.seeds=2 --config.model.gpt.d_model=64 \\
      --config.model.gpt.d_mlp=1024 --config.steps=1500 --config.exec.analyze=False   # 2 x 2,048 neurons
  python -m benchmarks.screen_correlation --workdir=runs/lm2                # T = 2^22 tokens
  python -m benchmarks.screen_correlation --workdir=runs/lm2 --tokens=1048576 --baseline

The post-GELU activations of every MLP layer of both models (2 layers × 1,024 = 2,048 neurons each) on
``--tokens`` bytes of the corpus (windows in a shuffled order; the correlation does not depend on the order,
and the screen's sample, the first T₁ inputs, is then spread over the text) are computed once and kept on
disk in float16 (as Gurnee et al. kept ``hook_post``): 2^22 × 4,096 floats do not fit in memory. Every
method then reads the same batches from that file, side by side in one process: the file alone (the
source's cost, paid once per pass by every method), the exact streamed pass
(``kernels.correlation.max_correlation``, cross-model blocks), the screened pass (``kernels.screen``), and
Gurnee et al.'s accumulator (fp32 products, fp64 raw sums; PyTorch). Times are printed with and without the
source's cost, the load average beside them. The FLOP split of the screened pass (sample, gathered pairs,
full rows) projects the paper's full pass (5 GPT-2-small seeds × 36,864 neurons, 10^8 tokens, seed 0
against the other 4) on one H100 (tf32 dense 400 TFLOP/s for products, 3.35 TB/s for gathered columns).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.correlation import _matmul_rate, paper_accumulator_stream
from universality.engine import replay
from universality.engine.families.lm import analysis
from universality.engine.families.lm import family as family_lib
from universality.kernels import correlation as kc
from universality.kernels import screen as ks

H100_TF32 = 400e12
H100_BYTES = 3.35e12


def _load():
  return " ".join(open("/proc/loadavg").read().split()[:3])


def build_cache(args):
  """float16 activations ``[batches, S, B, M]`` of the run's last checkpoint on shuffled windows."""
  run = replay.open(args.workdir)
  params = jax.tree.map(jnp.asarray, run.params())
  cfg = run.config
  c = int(cfg.model.gpt.context)
  text = family_lib.corpus_of(cfg).train
  n_win = args.tokens // c
  starts = np.sort(np.random.default_rng(0).choice((len(text) - 1) // c, n_win, replace=False)) * c
  starts = starts[np.random.default_rng(1).permutation(n_win)]
  fwd = analysis._forward(cfg.model.gpt)  # pylint: disable=protected-access
  bw = args.batch_windows
  nb = n_win // bw
  s = jax.tree.leaves(params)[0].shape[0]
  m = int(cfg.model.gpt.n_layers) * int(cfg.model.gpt.d_mlp)
  cache = np.lib.format.open_memmap(args.cache, mode="w+", dtype=np.float16, shape=(nb, s, bw * c, m))
  t0 = time.perf_counter()
  for i in range(nb):
    idx = starts[i * bw:(i + 1) * bw, None] + np.arange(c)[None, :]
    cache[i] = np.asarray(fwd(params, jnp.asarray(text[idx], jnp.int32))[1], np.float16)
    if i % 64 == 0:
      print(f"  activations: batch {i}/{nb} ({time.perf_counter() - t0:.0f} s)", flush=True)
  cache.flush()
  print(f"  {nb} batches x {bw * c} tokens x {s} models x {m} neurons in {time.perf_counter() - t0:.0f} s "
        f"(forward passes and the float16 file)")


def _timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def compare(args):
  cache = np.load(args.cache, mmap_mode="r")
  nb, s, b, m = cache.shape
  nb = min(nb, args.batches or nb)
  t = nb * b
  source = lambda: (np.asarray(cache[i], np.float32) for i in range(nb))  # noqa: E731
  flops_exact = 2.0 * t * m * m
  print(f"{s} models x {m} neurons, T={t} tokens in {nb} batches of {b}; load {_load()}; "
        f"matmul {_matmul_rate():.0f} GFLOP/s; cross block {flops_exact / 1e12:.1f} TFLOP")
  def read_all():
    for _ in source():
      pass

  _, t_src = _timed(read_all)
  print(f"  the source alone (read + float32): {t_src:7.1f} s per pass; load {_load()}", flush=True)
  # The floor of any pass that reads every input once: a jitted sum of squares of resident batches.
  resident = [jnp.asarray(cache[i], jnp.float32) for i in range(min(8, nb))]
  sumsq = jax.jit(lambda x: jnp.sum(x * x, axis=1))
  jax.block_until_ready(sumsq(resident[0]))
  _, t_read = _timed(lambda: [sumsq(x) for x in resident])
  t_floor = t_read / len(resident) * nb
  resident = None  # free the resident batches
  print(f"  one read of every input (resident batches, no source): {t_floor:7.1f} s per pass", flush=True)
  base = "rotation" if args.baseline else None
  key = jax.random.key(0)
  screen = ks.Screen("on", args.screen_tokens, args.z, args.k, args.max_candidates, inputs=t)
  stats = {}
  scr, t_scr = _timed(lambda: ks.max_correlation(source, screen=screen, baseline=base, key=key, within=False,
                                                 stats=stats))
  # The sample and each refinement read a prefix of the source.
  passes = stats["passes"] + (args.screen_tokens + sum(r["tokens"] for r in stats["refine"])) / t
  print(f"  screened pass: {t_scr:7.1f} s ({t_scr - passes * t_src:7.1f} s without the source); {stats}; "
        f"load {_load()}", flush=True)
  ex, t_ex = _timed(lambda: kc.max_correlation(source, baseline=base, key=key, within=False))
  print(f"  exact pass:    {t_ex:7.1f} s ({t_ex - t_src:7.1f} s without the source); load {_load()}", flush=True)
  rows = []
  if not args.skip_paper:
    import torch  # noqa: PLC0415 - optional dependency of this comparison only
    theirs, t_paper = _timed(lambda: paper_accumulator_stream(
        torch, ((np.asarray(cache[i, 0], np.float32), np.asarray(cache[i, 1], np.float32)) for i in range(nb))))
    rows.append(("Gurnee et al. accumulator (torch)", t_paper))
    err_p = max(float(np.nanmax(np.abs(theirs[0] - np.asarray(ex.max_SxNxS)[0, :, 1]))),
                float(np.nanmax(np.abs(theirs[1] - np.asarray(ex.max_SxNxS)[1, :, 0]))))
    print(f"  Gurnee et al.: {t_paper:7.1f} s; max |their max - exact| {err_p:.1e}; load {_load()}", flush=True)
  _report(args, ex, scr, stats, t_ex, t_scr, t_src, passes, rows, s, m, t)
  print(f"  bound for any screen that reads every input once: (exact - source) / one read = "
        f"{(t_ex - t_src) / t_floor:.1f}x")


def _report(args, ex, scr, stats, t_ex, t_scr, t_src, passes, rows, s, m, t):
  off = ~np.eye(s, dtype=bool)[:, None, :]
  for name, mx, arg in (("max", "max_SxNxS", "argmax_SxNxS"), ("baseline", "baseline_max_SxNxS",
                                                               "baseline_argmax_SxNxS")):
    if getattr(ex, mx) is None:
      continue
    wanted = np.broadcast_to(off, ex.max_SxNxS.shape)
    d = np.abs(np.asarray(getattr(scr, mx)) - np.asarray(getattr(ex, mx)))[wanted]
    agree = (np.asarray(getattr(scr, arg)) == np.asarray(getattr(ex, arg)))[wanted]
    print(f"  {name}: max |screened - exact| {d.max():.1e}, argmax agrees for {agree.mean():.4%}")
  settled = np.asarray(scr.settled_SxN)
  print(f"  settled by the screen {np.mean(settled == ks.SETTLED_SCREEN):.2%}, by a full row "
        f"{np.mean(settled == ks.SETTLED_FULL_ROW):.2%}; margin z/sqrt(T1) = {scr.margin:.4f}")
  for name, sec in [("exact streamed pass", t_ex), ("screened pass", t_scr)] + rows:
    print(f"  {name:36s} {sec:8.1f} s   exact / this {t_ex / sec:6.2f}x")
  print(f"  without the source's cost: exact {t_ex - t_src:.1f} s, screened {t_scr - passes * t_src:.1f} s: "
        f"{(t_ex - t_src) / (t_scr - passes * t_src):.2f}x")
  _project(args, stats, s, m, t)


def _project(args, stats, s, m, t):
  """The paper's pass (seed 0 against 4 others, N = 36,864, T = 10^8) from this run's candidate and full-row
  shares: sample products (correlation and m22), gathered pairs, full rows."""
  n, t_paper, others = 36_864, 1e8, 4
  rows = s * m
  pairs_per_row = stats["pairs"] / rows
  full_share = (stats["full_rows_sample"] + stats["full_rows_check"]) / rows
  exact = others * 2 * t_paper * n * n
  sample = others * 2 * args.screen_tokens * n * n  # one product per pair of models (correlation and m22)
  full = others * full_share * 2 * t_paper * n * n
  # Each pair reads one column of T floats; the refinements read their prefix for their pairs and squares.
  pair_bytes = others * 2 * pairs_per_row * n * t_paper * 4
  for r in stats["refine"]:
    pair_bytes += others * 2 * 2 * (r["pairs"] / rows) * n * r["tokens"] * 4
  read_bytes = (others + 1) * n * t_paper * 4  # every activation read once
  t_exact = exact / H100_TF32
  t_screen = (sample + full) / H100_TF32 + (pair_bytes + read_bytes) / H100_BYTES
  print(f"  projection, paper's pass on one H100: exact {exact:.2e} FLOP = {t_exact / 60:.0f} min; screened: "
        f"products {sample + full:.2e} FLOP, gathered and read {pair_bytes + read_bytes:.2e} bytes "
        f"({pairs_per_row:.1f} pairs per row, {full_share:.2%} full rows) = {t_screen / 60:.1f} min, "
        f"{t_exact / t_screen:.0f}x")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--tokens", type=int, default=1 << 22)
  p.add_argument("--batch_windows", type=int, default=32)
  p.add_argument("--cache", default="")
  p.add_argument("--batches", type=int, default=0, help="the first this many batches of the cache (0: all)")
  p.add_argument("--screen_tokens", type=int, default=ks.Screen.tokens)
  p.add_argument("--z", type=float, default=ks.Screen.z)
  p.add_argument("--k", type=int, default=ks.Screen.k)
  p.add_argument("--max_candidates", type=int, default=ks.Screen.max_candidates)
  p.add_argument("--baseline", action="store_true", help="with the rotation baseline (both passes)")
  p.add_argument("--skip_paper", action="store_true")
  args = p.parse_args(argv)
  args.cache = args.cache or os.path.join(args.workdir, f"acts_{args.tokens}.npy")
  if not os.path.exists(args.cache):
    build_cache(args)
  compare(args)


if __name__ == "__main__":
  main()
