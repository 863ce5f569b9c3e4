"""The sparse prediction of the Convergent Learning passes on a language-model-sized layer: the whole sweep in
one jitted call, the same sweep under a memory bound (run b's units in blocks), and scikit-learn's ``Lasso``
fitted unit by unit and λ by λ (the sequential reference), side by side in one run.

  python benchmarks/convergent_memory.py                     # 2 runs × 2,048 inputs × 512 units, 5 λ
  python benchmarks/convergent_memory.py --runs=3 --units=256 --memory_mb=1   # 3 pairs, one at a time

Prints the seconds of each, their ratios, the solver's working set (pairs × λ × N × Y floats, five arrays
of them, Y the units of b per block) and the largest difference of the held-out losses.
"""

import argparse
import time

import jax
import numpy as np
from sklearn.linear_model import Lasso

from universality.engine.analysis import convergent


def _acts(runs, inputs, units, seed=0):
  """Activations with shared structure: each run mixes the same latent factors, plus noise."""
  rng = np.random.default_rng(seed)
  lat = rng.normal(size=(inputs, units // 4))
  mixed = [lat @ rng.normal(size=(units // 4, units)) + 0.5 * rng.normal(size=(inputs, units))
           for _ in range(runs)]
  return np.maximum(np.stack(mixed), 0.0).astype(np.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--inputs", type=int, default=2048)
  parser.add_argument("--units", type=int, default=512)
  parser.add_argument("--iterations", type=int, default=300)
  parser.add_argument("--memory_mb", type=float, default=4.0)
  parser.add_argument("--sklearn_units", type=int, default=32, help="units of b fitted by scikit-learn")
  args = parser.parse_args()
  acts = _acts(args.runs, args.inputs, args.units)
  lambdas = list(convergent.DEFAULT_LAMBDAS)
  pairs = convergent.default_pairs(args.runs)
  kw = dict(key=jax.random.key(0), lambdas=lambdas, iterations=args.iterations, keep_weights=False)
  memory = int(args.memory_mb * (1 << 20))
  z, o, n = len(pairs), len(lambdas), args.units
  blocks = convergent._sweep_blocks(z, o, n, memory)
  print(f"{args.runs} runs × {args.inputs} inputs × {n} units, {z} pairs, {o} λ, "
        f"{args.iterations} FISTA steps")
  timings = {}
  results = {}
  for name, mem in (("whole", None), ("bounded", memory)):
    convergent.sparse_prediction(acts, pairs, memory_bytes=mem, **kw)  # compile
    t0 = time.perf_counter()
    results[name] = convergent.sparse_prediction(acts, pairs, memory_bytes=mem, **kw)
    timings[name] = time.perf_counter() - t0
  whole_mb = 4 * 5 * z * o * n * n / 2**20
  q, y = blocks if blocks else (z, n)
  bounded_mb = 4 * 5 * q * o * n * y / 2**20
  print(f"whole sweep   {timings['whole']:7.2f} s   solver arrays {whole_mb:8.1f} MB")
  print(f"bounded       {timings['bounded']:7.2f} s   solver arrays {bounded_mb:8.1f} MB "
        f"(pairs {q} × units {y} per call; bound {args.memory_mb:g} MB)")
  diff = np.nanmax(np.abs(results["whole"]["heldout_loss_ZxOxN"]
                          - results["bounded"]["heldout_loss_ZxOxN"]))
  print(f"bounded / whole time: {timings['bounded'] / timings['whole']:.2f}×; "
        f"max |Δ held-out loss| {diff:.2e}")
  # scikit-learn on the same standardised inputs, for the first pair and the first units of b.
  res = results["whole"]
  zs, _ = convergent.standardise(acts, res["fit_T"])
  a, b = pairs[0]
  xa, xb = zs[a][res["fit_T"]].astype(np.float64), zs[b][res["fit_T"]].astype(np.float64)
  k = min(args.sklearn_units, n)
  t0 = time.perf_counter()
  for lam in lambdas:
    for j in range(k):
      Lasso(alpha=lam, fit_intercept=False).fit(xa, xb[:, j])
  sk = (time.perf_counter() - t0) * (z * n / k)
  print(f"scikit-learn Lasso, unit by unit and λ by λ: {sk:7.2f} s for all pairs and units "
        f"(extrapolated from {k} units of one pair)")
  print(f"batched FISTA speed-up over scikit-learn: whole {sk / timings['whole']:.1f}×, "
        f"bounded {sk / timings['bounded']:.1f}×")


if __name__ == "__main__":
  main()
