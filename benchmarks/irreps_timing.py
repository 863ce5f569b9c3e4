"""Uncached time to compute the real irreps of groups up to order 1000, with the worst numerical errors.

  python -m benchmarks.irreps_timing            # the default list below (from the repository root)
  python -m benchmarks.irreps_timing S6 D500    # chosen groups

Each group is built first (not timed), then ``real_irreps(group, cache=False)`` is timed. Errors: the
homomorphism ρ(a)ρ(b) − ρ(a·b) on 20,000 random pairs, orthogonality ρρᵀ − I, and the character
orthogonality (1/|G|) Σ χ_a χ_b − k δ_ab; the last column checks completeness Σ D²/k = |G|.
"""

import sys
import time

import numpy as np

from universality.engine import groups
from universality.engine import irreps as irreps_lib

DEFAULT = ["S5", "A5", "S4xC5", "Q8xC15", "A6", "S6", "C3xS3xD20", "S4xS4", "A5xD5", "Dic125",
           "D500", "C1000", "C10xC10xC10", "C2xC2xC2xC5xC5xC5", "S4xD20", "Q8xC125", "S5xC2xC2xC2"]


def errors(group, irreps, rng):
  a = rng.integers(0, group.order, 20000)
  b = rng.integers(0, group.order, 20000)
  hom = orth = 0.0
  for ir in irreps:
    m = ir.matrices
    hom = max(hom, float(np.abs(m[a] @ m[b] - m[group.table[a, b]]).max()))
    orth = max(orth, float(np.abs(m @ m.transpose(0, 2, 1) - np.eye(ir.dim)).max()))
  chars = np.stack([ir.character for ir in irreps])
  gram = chars @ chars.T / group.order - np.diag([ir.k for ir in irreps])
  return hom, orth, float(np.abs(gram).max()), sum(ir.dim ** 2 // ir.k for ir in irreps) == group.order


def main(specs):
  rng = np.random.default_rng(0)
  print(f"{'group':>20} {'order':>6} {'irreps':>6} {'max D':>5} {'seconds':>8} {'hom err':>9} "
        f"{'orth err':>9} {'char err':>9} complete")
  for spec in specs:
    group = groups.get(spec)
    start = time.perf_counter()
    irreps = irreps_lib.real_irreps(group, cache=False)
    took = time.perf_counter() - start
    hom, orth, char, complete = errors(group, irreps, rng)
    print(f"{spec:>20} {group.order:>6} {len(irreps):>6} {max(ir.dim for ir in irreps):>5} {took:>8.2f} "
          f"{hom:>9.1e} {orth:>9.1e} {char:>9.1e} {complete}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:] or DEFAULT)
