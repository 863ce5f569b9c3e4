"""Speed and memory of universality.kernels.correlation beside numpy float64 corrcoef and a bare float32 XᵀX.

  python -m benchmarks.correlation                      # both cases, each in its own process
  python -m benchmarks.correlation --case small         # S=16 x N=128 neurons, T=14,400 inputs
  python -m benchmarks.correlation --case large   # S=1024 x N=128 = 131k neurons, T=512, streamed
  python -m benchmarks.correlation --case paper   # 2 models x 2,048 neurons, T=32,768, vs Gurnee et al.

The small case times, in one process, a bare ``XᵀX`` of the same (T, S·N) float32 matrix (the floor: the
correlation costs 2·T·(S·N)² FLOPs), numpy ``corrcoef`` in float64, and ``max_correlation`` on the XLA
path (with and without the rotation baseline, and from a streamed source), and checks the maxima against the
float64 correlation. The large case streams batches generated on the fly from a re-iterable source into
the upper triangle of co-moment tiles under a memory budget, several passes over the source, and reports
the peak resident memory (VmHWM) of its process; its bare matmul reference is a plain 1024-row block
product of one batch, timed before and after in the same process, times the number of such products in
the full XᵀX. The full float64 correlation of 131k neurons (137 GB) is not attempted; 64 rows are checked.

The paper case puts ``max_correlation`` (cross-model blocks only, ``within=False``, streamed in batches)
beside the accumulator of *Universal Neurons in GPT2* (Gurnee et al. 2024, ``StreamingPearsonComputer``:
per batch a float32 product of model 1's neurons with model 2's, added into a float64 co-moment, float64
raw sums Σx and Σx²; correlation from raw sums at the end), written here in PyTorch with the same batches,
reduced to the same per-neuron maxima. Both are timed best of ``--repeats`` in the same process, and both
are checked against float64 on the same data, plain and offset by 1e3 (raw sums lose the correlation to
cancellation there; Chan's merge does not). Needs ``pip install torch``.

Local shape letters:

  Q  the dimension of the latent signal the planted neurons share
  J  rows of the reference matmul
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from universality.kernels import correlation as kc


def _peak_rss_gb() -> float:
  """Peak resident memory of this process (VmHWM), in GB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _best_of(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def _planted(rng, s, t, n, k=32):
  """Shared latent features (k of them) mixed differently into every model, plus private noise."""
  latent_TxQ = rng.standard_normal((t, k), dtype=np.float32)
  mix_SxQxN = rng.standard_normal((s, k, n), dtype=np.float32) * (rng.random((s, k, n)) < 0.1)
  acts = np.einsum("tk,skn->stn", latent_TxQ, mix_SxQxN)
  acts += rng.standard_normal(acts.shape, dtype=np.float32)
  return acts


def small(args):
  s, t, n = args.small_models, args.small_t, args.small_n
  m = s * n
  rng = np.random.default_rng(0)
  acts = _planted(rng, s, t, n)
  x_TxM = np.ascontiguousarray(acts.transpose(1, 0, 2).reshape(t, m))
  flops = 2.0 * t * m * m
  print(f"small case: S={s} x N={n} = {m} neurons, T={t}, {flops / 1e9:.1f} GFLOP per correlation, "
        f"{jax.device_count()} device(s), backend {jax.default_backend()}")

  xj = jax.device_put(x_TxM)
  bare = jax.jit(lambda x: x.T @ x)
  t_bare = _best_of(lambda: bare(xj), args.repeats)
  t0 = time.perf_counter()
  corr64 = np.corrcoef(x_TxM.T)
  t_corrcoef = time.perf_counter() - t0

  acts_j = jax.device_put(acts)
  key = jax.random.key(0)
  t_max = _best_of(lambda: kc.max_correlation(acts_j, backend="xla"), args.repeats)
  t_base = _best_of(lambda: kc.max_correlation(acts_j, backend="xla", baseline="rotation", key=key),
                    args.repeats)
  batch = args.small_batch
  source = lambda: (acts_j[:, a:a + batch] for a in range(0, t, batch))  # noqa: E731
  t_stream = _best_of(lambda: kc.max_correlation(source), args.repeats)

  # Correctness against the float64 matrix, self excluded.
  res = kc.max_correlation(acts_j, backend="xla")
  c = corr64.reshape(s, n, s, n).copy()
  for i in range(s):
    c[i, np.arange(n), i, np.arange(n)] = -np.inf
  err = float(np.abs(np.asarray(res.max_SxNxS) - c.max(-1)).max())

  rows = [("bare fp32 XᵀX (jax.jit)", t_bare), ("numpy float64 corrcoef", t_corrcoef),
          ("max_correlation xla", t_max), ("max_correlation xla + rotation baseline", t_base),
          (f"max_correlation streamed, batches of {batch}", t_stream)]
  for name, sec in rows:
    print(f"  {name:44s} {sec:8.3f} s  {flops / sec / 1e9:7.1f} GFLOP/s  "
          f"{sec / t_bare:5.2f}x bare  {t_corrcoef / sec:5.2f}x faster than corrcoef")
  print(f"  max |max_correlation - float64| = {err:.2e};  peak RSS {_peak_rss_gb():.2f} GB")


def large(args):
  s, t, n, batch = args.large_models, args.large_t, args.large_n, args.large_batch
  m = s * n
  if t % batch:
    raise ValueError(f"--large_t={t} must be a multiple of --large_batch={batch}")
  k = 32
  rng = np.random.default_rng(1)
  # Batches are made on the fly: a fixed noise pool (one batch, so memory does not grow with T) plus
  # fresh shared latent features per batch mixed into the models; the source can be read many times.
  noise_BxM = jax.device_put(rng.standard_normal((batch, m), dtype=np.float32))
  mix_QxM = jax.device_put(rng.standard_normal((k, m), dtype=np.float32) * (rng.random((k, m)) < 0.1))

  @jax.jit
  def make(i):
    latent_BxQ = jax.random.normal(jax.random.fold_in(jax.random.key(2), i), (batch, k), jnp.float32)
    x_BxM = jnp.roll(noise_BxM, i, axis=0) + latent_BxQ @ mix_QxM
    return x_BxM.reshape(batch, s, n).transpose(1, 0, 2)

  def source():
    return (make(i) for i in range(t // batch))

  rotation = args.large_baseline
  plan = kc._plan_tiles(s, n, args.memory_bytes, None)  # pylint: disable=protected-access
  passes = len(plan.passes)
  n_tiles = plan.nc * (plan.nc + 1) // 2
  flops = 2.0 * t * m * m
  flops_run = 2.0 * (batch + 1) * plan.w ** 2 * n_tiles * (t // batch)  # triangle, K = B + 1
  print(f"large case: S={s} x N={n} = {m} neurons, T={t} (batches of {batch}), budget "
        f"{args.memory_bytes / 1e9:.2f} GB -> {plan.w}x{plan.w} tiles, {n_tiles} in the upper triangle, "
        f"{passes} passes; {flops / 1e12:.2f} TFLOP for XᵀX, {flops_run / 1e12:.2f} TFLOP run; "
        f"baseline={'rotation' if rotation else None}")
  print(f"  fp32 matmul rate at start: {_matmul_rate():.0f} GFLOP/s (2048² XLA matmul)")

  # Bare reference: a plain 1024-row block of XᵀX for one batch (1024×B by B×S·N), times the number of
  # such products in the full XᵀX. Timed before and after max_correlation, in this process.
  rows_JxB = jax.device_put(rng.standard_normal((1024, batch), dtype=np.float32))
  x_BxM = make(0).transpose(1, 0, 2).reshape(batch, m)
  prod = jax.jit(lambda a, b: a @ b)

  def bare():
    return _best_of(lambda: prod(rows_JxB, x_BxM), 2) * (m / 1024) * (t // batch)

  t_bare = [bare()]
  t_gen = _best_of(lambda: [make(i) for i in range(t // batch)][-1], 1) * passes

  key = jax.random.key(0)
  t0 = time.perf_counter()
  res = kc.max_correlation(source, memory_bytes=args.memory_bytes, baseline="rotation" if rotation else None,
                           key=key)
  jax.block_until_ready(res)
  t_ours = time.perf_counter() - t0
  t_bare.append(bare())
  del rows_JxB, x_BxM
  print(f"  fp32 matmul rate at end:   {_matmul_rate():.0f} GFLOP/s")
  for when, tb in zip(("before", "after"), t_bare):
    print(f"  bare fp32 XᵀX row-block products, {when:6s}  {tb:8.1f} s  {flops / tb / 1e9:7.1f} GFLOP/s")
  tb = float(np.mean(t_bare))
  print(f"  generating the batches alone ({passes} passes)   {t_gen:8.1f} s")
  print(f"  max_correlation streamed                    {t_ours:8.1f} s  {flops / t_ours / 1e9:7.1f} GFLOP/s "
        f"XᵀX-equivalent, {flops_run / (t_ours - t_gen) / 1e9:5.1f} GFLOP/s run without generation")
  print(f"  vs bare (mean of the two): {t_ours / tb:5.2f}x,  without generation {(t_ours - t_gen) / tb:5.2f}x")
  mx = np.asarray(res.max_SxNxS)
  n_dead = int(np.asarray(res.dead_SxN).sum())
  print(f"  result {mx.shape}, finite {bool(np.isfinite(mx).all())}, dead {n_dead}, "
        f"mean max over other models {float(mx.mean()):.3f}")
  print(f"  peak RSS (VmHWM) {_peak_rss_gb():.2f} GB (before the float64 spot check below)")
  # Spot check: 64 neurons' rows against every model, in float64 from the regenerated data.
  idx = np.random.default_rng(3).choice(m, 64, replace=False)
  x64 = np.concatenate([np.asarray(make(i)).transpose(1, 0, 2).reshape(batch, m) for i in range(t // batch)]
                       ).astype(np.float64)
  x64 -= x64.mean(0)
  x64 /= np.linalg.norm(x64, axis=0)
  c = (x64[:, idx].T @ x64).reshape(64, s, n)
  c[np.arange(64), idx // n, idx % n] = -np.inf
  err = float(np.abs(mx.reshape(m, s)[idx] - c.max(-1)).max())
  print(f"  max |max_correlation - float64| over 64 rows x {s} models: {err:.1e}")


def _paper_accumulator(torch, acts_SxTxN: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
  """Gurnee et al.'s streaming Pearson accumulator for two models, then the max over model 2's neurons for
  each neuron of model 1 and the other way round (their summary) as float64 arrays [N], then the argmaxes."""
  return paper_accumulator_stream(
      torch, ((acts_SxTxN[0, a:a + batch], acts_SxTxN[1, a:a + batch])
              for a in range(0, acts_SxTxN.shape[1], batch)))


def paper_accumulator_stream(torch, batches) -> tuple[np.ndarray, np.ndarray]:
  """:func:`_paper_accumulator` over an iterable of ``(x_BxN1, y_BxN2)`` float32 numpy batches (their
  ``StreamingPearsonComputer``: a float32 product per batch added into a float64 co-moment, float64 raw
  sums Σx and Σx²; the correlation from raw sums at the end), with the argmaxes:
  ``(max_12, max_21, argmax_12, argmax_21)``."""
  s1 = q1 = s2 = q2 = s12 = None
  n = 0
  for xb, yb in batches:
    x, y = torch.from_numpy(np.ascontiguousarray(xb)), torch.from_numpy(np.ascontiguousarray(yb))
    if s12 is None:
      s1, q1 = torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)
      s2, q2 = torch.zeros(y.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64)
      s12 = torch.zeros((x.shape[1], y.shape[1]), dtype=torch.float64)
    s12 += (x.T @ y).double()                    # fp32 product, fp64 accumulation
    s1 += x.sum(0, dtype=torch.float64)
    q1 += (x.double() ** 2).sum(0)
    s2 += y.sum(0, dtype=torch.float64)
    q2 += (y.double() ** 2).sum(0)
    n += x.shape[0]
  num = s12 - torch.outer(s1, s2) / n
  corr = num / torch.outer((q1 - s1 ** 2 / n).sqrt(), (q2 - s2 ** 2 / n).sqrt())
  best12, best21 = corr.max(1), corr.max(0)
  return best12.values.numpy(), best21.values.numpy(), best12.indices.numpy(), best21.indices.numpy()


def paper(args):
  try:
    import torch  # noqa: PLC0415 - optional dependency of this case only
  except ImportError:
    print("paper case: needs torch (pip install torch)")
    return
  t, n, batch = args.paper_t, args.paper_n, args.paper_batch
  flops = 2.0 * t * n * n
  print(f"paper case: 2 models x N={n}, T={t} in batches of {batch}; the cross block is "
        f"{flops / 1e9:.0f} GFLOP; torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"matmul {_matmul_rate():.0f} GFLOP/s (XLA)")
  rng = np.random.default_rng(1)
  for offset in (0.0, 1e3):
    acts = _planted(rng, 2, t, n) + np.float32(offset)
    acts_j = jax.device_put(acts)
    source = lambda: (acts_j[:, a:a + batch] for a in range(0, t, batch))  # noqa: E731
    ours = lambda: kc.max_correlation(source, within=False)  # noqa: E731
    t_ours = _best_of(ours, args.repeats)
    t_all = _best_of(lambda: kc.max_correlation(source), args.repeats)
    t_paper = _best_of(lambda: _paper_accumulator(torch, acts, batch), args.repeats)
    res = ours()
    theirs_12 = _paper_accumulator(torch, acts, batch)[0]
    # float64 reference for 256 neurons of model 1 against all of model 2.
    rows = rng.choice(n, 256, replace=False)
    x = acts[0][:, rows].astype(np.float64)
    y = acts[1].astype(np.float64)
    x, y = x - x.mean(0), y - y.mean(0)
    ref = ((x.T @ y) / np.outer(np.linalg.norm(x, axis=0), np.linalg.norm(y, axis=0))).max(1)
    err_ours = float(np.abs(np.asarray(res.max_SxNxS)[0, rows, 1] - ref).max())
    err_paper = float(np.nanmax(np.abs(theirs_12[rows] - ref)))
    print(f"  offset {offset:6g}: ours {t_ours:7.3f} s ({flops / t_ours / 1e9:5.0f} GFLOP/s), Gurnee et al. "
          f"accumulator {t_paper:7.3f} s ({flops / t_paper / 1e9:5.0f} GFLOP/s): ours {t_paper / t_ours:4.2f}x "
          f"faster; max |error| vs float64: ours {err_ours:.1e}, theirs {err_paper:.1e}; with each model's "
          f"own blocks too (within=True) {t_all:7.3f} s = {t_all / t_ours:4.2f}x the cross-only pass")


def _matmul_rate() -> float:
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * 2048 ** 3 / _best_of(lambda: f(a), 5) / 1e9


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", choices=["all", "small", "large", "paper"], default="all")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--small_models", type=int, default=16)
  p.add_argument("--small_n", type=int, default=128)
  p.add_argument("--small_t", type=int, default=14_400)
  p.add_argument("--small_batch", type=int, default=1_440)
  p.add_argument("--large_models", type=int, default=1_024)
  p.add_argument("--large_n", type=int, default=128)
  p.add_argument("--large_t", type=int, default=512)
  p.add_argument("--large_batch", type=int, default=256)
  p.add_argument("--large_baseline", action="store_true", help="also compute the rotation baseline")
  p.add_argument("--memory_bytes", type=int, default=1 << 30)
  p.add_argument("--paper_n", type=int, default=2_048)
  p.add_argument("--paper_t", type=int, default=32_768)
  p.add_argument("--paper_batch", type=int, default=4_096)
  args = p.parse_args(argv)
  if args.case == "all":
    # Separate processes: the large case's peak memory must not include the small case's arrays.
    forward = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("case", "large_baseline")]
    forward += ["--large_baseline"] if args.large_baseline else []
    for case in ("small", "large", "paper"):
      subprocess.run([sys.executable, "-m", "benchmarks.correlation", f"--case={case}", *forward],
                     check=True, env=os.environ)
    return
  {"small": small, "large": large, "paper": paper}[args.case](args)


if __name__ == "__main__":
  main()
