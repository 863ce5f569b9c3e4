"""Real orthogonal irreducible representations of any finite group, computed numerically, and a group
Fourier transform in JAX.

``real_irreps(group)`` returns every irreducible representation of ``group`` over the reals, as orthogonal
matrices ``rho_GxQxQ`` with ``rho[a] @ rho[b] == rho[table[a, b]]``, the trivial one first. Nothing is
looked up: the method works for any ``universality.engine.groups.Group``.

Method (two stages, both on the regular representation, all randomness from fixed seeds):

1. **Characters.** A real symmetric combination Z = Σ c_i K_i of the real class sums K_i (a conjugacy class
   merged with the class of its inverses) is a self-adjoint central element of the group algebra. Acting by
   multiplication on the real centre, in the orthonormal basis K_i / √|K_i|, it is a symmetric r×r matrix
   (r = number of real classes = number of real irreps) built in O(|G|·r) from the Cayley table. Its
   eigenvectors are the real characters χ_ρ(K_i)·√|K_i| up to scale: every real irrep ρ has its own central
   character, so a generic Z separates them all (near-ties are split again with fresh random Z). The scale
   and the type follow from (1/|G|) Σ_g χ(g)² = k and the Frobenius–Schur sum (1/|G|) Σ_g χ(g²) = 1, 0, −2
   for real (k = 1), complex (k = 2) and quaternionic (k = 4) type.
2. **Matrices.** The central idempotent e_ρ = D/(k|G|) Σ_g χ_ρ(g) g⁻¹ projects ℝ^G onto the isotypic
   component W_ρ (dimension D²/k, D/k copies of ρ); a basis comes from a random sketch of its columns.
   Inside it a random symmetric element of the right-regular algebra (which commutes with the left-regular
   action) has D/k distinct eigenvalues, each eigenspace an irreducible copy; the eigenspace U (|G|×D) of
   the lowest one carries ρ(g) = Uᵀ L(g) U, solved from D well-conditioned rows of U[g⁻¹h] = U[h] ρ(g).

The basis inside U is canonical: the unique orthonormal basis whose rows at the first D linearly independent
group elements (in element order) form a lower-triangular matrix with positive diagonal. Everything is
verified (homomorphism on generators, orthogonality, traces, completeness, character orthogonality); a
failed check retries with the next seed. Results are cached in memory and on disk (``cache_dir()``).

Names: the trivial irrep is ``"trivial"`` everywhere. For the engine's own tables of
  * S_n: ``"sign"``, ``"standard"`` (dim n−1, character #fixed points − 1), ``"standard⊗sign"``, the rest by
    dimension, ``"<D>d"`` or ``"<D>d_a"``, ``"<D>d_b"``, … ordered by the character on a transposition,
    largest first (S5: 5d_a is the partition (3,2) with χ(transposition) = +1, 5d_b is (2,2,1) with −1);
  * C_n: ``"sign"`` (n even, r ↦ −1) and ``"freq_k"`` with ρ(r^j) = rotation by 2πjk/n exactly;
  * D_n (element k + n·f is r^k s^f): ``"sign"`` (r ↦ 1, s ↦ −1), for even n ``"sign_r"`` (r ↦ −1, s ↦ 1)
    and ``"sign_rs"`` (r ↦ −1, s ↦ −1), and ``"rot_k"`` with ρ(r) = rotation by 2πk/n, ρ(s) = diag(1, −1).
Elsewhere ``"<D>d"`` with suffixes ``_a``, ``_b``, … (``_aa`` after ``_z``) when several irreps share the
real dimension D, ordered by character values class by class (class order of the group), largest first.

Fourier transform on real irreps. f̂(ρ) = Σ_g f(g) ρ(g). With the weights w_ρ = D/(k|G|) of the central
idempotents e_ρ = w_ρ Σ_g χ_ρ(g) g⁻¹ (Σ_ρ e_ρ = 1, so Σ_ρ w_ρ χ_ρ(g) = [g = 1]; the k accounts for a
complex or quaternionic real irrep containing its complex constituent twice):
  inversion   f(g) = Σ_ρ w_ρ ⟨f̂(ρ), ρ(g)⟩_F,
  Plancherel  Σ_g f(g)² = Σ_ρ w_ρ ‖f̂(ρ)‖_F²,
and w_ρ ‖f̂(ρ)‖_F² is ‖f projected onto W_ρ‖², the power of f in ρ (``fourier_power``).

``python -m universality.engine.irreps S5 D4 Q8`` prints character tables.

Local shape letters:

  Q  the dimension of one irrep
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from universality.engine import atomic
from universality.engine import groups as groups_lib

FORMAT = "universality.engine.irreps/1"  # bump when the computation or the file layout changes
_SEED = 20240611
_ATTEMPTS = 4
_TOL = 1e-9  # homomorphism, orthogonality and trace checks on the results


class IrrepError(ValueError):
  """Bad input to a function of this module (not a group, irreps of another group, wrong shapes)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Irrep:
  """One real orthogonal irreducible representation of a finite group.

  Attributes:
    name: ``"trivial"``, ``"sign"``, ``"standard"``, ``"freq_3"``, ``"5d_a"``… (see the module docstring).
    dim: real dimension D.
    matrices: float64 ``[G, D, D]``, orthogonal, ``matrices[a] @ matrices[b] == matrices[table[a, b]]``.
    character: float64 ``[G]``, the traces of ``matrices`` (the real character).
    frobenius_schur: type of the complex constituent: 1 real, 0 complex (this real irrep is a complex irrep
      of dimension D/2 seen over ℝ), −1 quaternionic (twice a complex irrep of dimension D/2).
    basis: float64 ``[G, M]``, orthonormal columns spanning the functions g ↦ ρ_ij(g), M = D²/k. The bases
      of all irreps together form an orthonormal basis of ℝ^G. Built by Gram–Schmidt over the entries ρ_ij
      in row-major order (for real type it is √(D/|G|)·ρ_ij).
  """

  name: str
  dim: int
  matrices: np.ndarray
  character: np.ndarray
  frobenius_schur: int
  basis: np.ndarray

  @property
  def k(self) -> int:
    """Real dimension of the commutant: 1 real, 2 complex, 4 quaternionic type."""
    return {1: 1, 0: 2, -1: 4}[self.frobenius_schur]

  @property
  def order(self) -> int:
    return int(self.matrices.shape[0])

  @property
  def plancherel_weight(self) -> float:
    """w = D / (k |G|): f(g) = Σ_ρ w_ρ ⟨f̂(ρ), ρ(g)⟩ and Σ_g f(g)² = Σ_ρ w_ρ ‖f̂(ρ)‖²."""
    return self.dim / (self.k * self.order)

  def __repr__(self) -> str:
    kind = {1: "real", 0: "complex", -1: "quaternionic"}[self.frobenius_schur]
    return f"Irrep({self.name!r}, dim={self.dim}, {kind}, order={self.order})"


# ---------------------------------------------------------------------------------------------------
# Public entry points.

_MEMO: dict[str, tuple[Irrep, ...]] = {}


def real_irreps(group: groups_lib.Group | str, cache: bool = True) -> list[Irrep]:
  """All real irreducible representations of ``group``, trivial first (see the module docstring).

  Args:
    group: an ``universality.engine.groups.Group`` or a spec for ``universality.engine.groups.get`` such as ``"S5"``.
    cache: read and write the in-process and on-disk caches; ``False`` always computes afresh.
  """
  if isinstance(group, str):
    group = groups_lib.get(group)
  if not isinstance(group, groups_lib.Group):
    raise IrrepError(f"real_irreps needs an universality.engine.groups.Group or a group spec, got {type(group).__name__}")
  if not cache:
    return list(_compute(group))
  key = group.key
  if key not in _MEMO:
    irreps = _load(group)
    if irreps is None:
      irreps = _compute(group)
      _save(group, irreps)
    _MEMO[key] = irreps
  return list(_MEMO[key])


def clear_memory_cache() -> None:
  """Forgets the in-process cache (the on-disk cache stays)."""
  _MEMO.clear()


def cache_dir() -> str:
  """``$UNIVERSALITY_CACHE/irreps`` (default ``~/.cache/universality-engine/irreps``)."""
  root = os.environ.get("UNIVERSALITY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "universality-engine")
  return os.path.join(root, "irreps")


def character_table(group: groups_lib.Group, irreps: Sequence[Irrep] | None = None) -> np.ndarray:
  """float64 ``[R, C]``: the real character of each irrep on each conjugacy class (``group`` class order)."""
  irreps = real_irreps(group) if irreps is None else list(irreps)
  _check_irreps_shape(irreps, group.order)
  reps = np.asarray([int(c[0]) for c in group.conjugacy_classes])
  return np.stack([np.asarray(ir.character)[reps] for ir in irreps])


# ---------------------------------------------------------------------------------------------------
# Stage 1: real characters from the real centre of the group algebra.


@dataclasses.dataclass
class _Work:
  """Per-group arrays shared by both stages."""

  group: groups_lib.Group
  rc: np.ndarray        # [G] real class of each element
  reps: np.ndarray      # [r] a representative of each real class (the identity's class is 0)
  sizes: np.ndarray     # [r] real class sizes
  t_inv: np.ndarray     # [G, G] t_inv[h, x] = h⁻¹·x
  ct: np.ndarray        # [G, G] real class of h⁻¹·x
  gens: list[int]       # a generating set

  @property
  def order(self) -> int:
    return self.group.order


def _work(group: groups_lib.Group) -> _Work:
  classes = group.conjugacy_classes
  partner = group.class_of[group.inverse[[int(c[0]) for c in classes]]]
  rc_of_class = np.full(len(classes), -1, dtype=np.int64)
  reps, sizes = [], []
  for i, cls in enumerate(classes):
    if rc_of_class[i] >= 0:
      continue
    rc_of_class[i] = rc_of_class[partner[i]] = len(reps)
    reps.append(int(cls[0]))
    sizes.append(len(cls) * (1 if partner[i] == i else 2))
  return _Work(group=group, rc=rc_of_class[group.class_of], reps=np.asarray(reps),
               sizes=np.asarray(sizes, dtype=np.float64), t_inv=group.table[group.inverse],
               ct=rc_of_class[group.class_of][group.table[group.inverse]].astype(np.int32),
               gens=_generators(group))


def _generators(group: groups_lib.Group) -> list[int]:
  """A small generating set: greedily add the first element outside the subgroup generated so far."""
  n = group.order
  inside = np.zeros(n, dtype=bool)
  inside[group.identity] = True
  gens: list[int] = []
  while not inside.all():
    gens.append(int(np.flatnonzero(~inside)[0]))
    frontier = np.flatnonzero(inside)
    while frontier.size:  # close under right multiplication by the generators
      prods = group.table[np.ix_(frontier, np.asarray(gens))].ravel()
      frontier = np.unique(prods[~inside[prods]])
      inside[frontier] = True
  return gens


def _centre_matrix(w: _Work, c_r: np.ndarray) -> np.ndarray:
  """Symmetric [r, r] matrix of Z = Σ_j c_j K_j on the real centre, basis K_j / √|K_j|.

  Z·K_j = Σ_k A[k, j] K_k with A[k, j] = Σ_x c(x) [x⁻¹ g_k ∈ K_j] (the coefficient of g_k in Z·K_j).
  """
  r = len(w.reps)
  j_of = w.rc[w.t_inv[:, w.reps]]                       # [G, r]: real class of x⁻¹ g_k
  flat = (np.arange(r)[None, :] * r + j_of).ravel()
  weights = np.broadcast_to(c_r[w.rc][:, None], j_of.shape).ravel()
  a = np.bincount(flat, weights=weights, minlength=r * r).reshape(r, r)
  s = np.sqrt(w.sizes)
  m = s[:, None] * a / s[None, :]
  return 0.5 * (m + m.T)


def _centre_eigenvectors(w: _Work, rng: np.random.Generator) -> np.ndarray:
  """[r, r] orthonormal common eigenvectors of the real centre (columns), split by random elements."""
  r = len(w.reps)
  pending = [np.eye(r)]
  found = []
  scale = None
  for _ in range(12):
    if not pending:
      break
    m = _centre_matrix(w, rng.standard_normal(r) / np.sqrt(w.sizes))
    still = []
    for v in pending:
      lam, vec = np.linalg.eigh(v.T @ m @ v)
      scale = scale or max(float(np.abs(lam).max()), 1e-300)  # from the first, full spectrum
      # Eigenvectors closer than this gap are mixed at the 1e-12 level: split them again.
      for idx in _clusters(lam, 1e-4 * scale):
        (found if len(idx) == 1 else still).append(v @ vec[:, idx])
    pending = still
  if pending:
    raise _Retry("the real centre did not split into one-dimensional eigenspaces")
  return np.concatenate(found, axis=1)


def _clusters(lam: np.ndarray, gap: float) -> list[np.ndarray]:
  """Index groups of sorted eigenvalues, cut wherever consecutive values differ by more than ``gap``."""
  cuts = np.flatnonzero(np.diff(lam) > gap) + 1
  return np.split(np.arange(len(lam)), cuts)


class _Retry(Exception):
  """A numerical check failed for this seed; the computation is repeated with the next one."""


def _real_characters(w: _Work, rng: np.random.Generator) -> list[tuple[np.ndarray, int, int]]:
  """(χ on real classes, D, k) for every real irrep."""
  g = w.order
  sq_count = np.bincount(w.rc[w.group.table[np.arange(g), np.arange(g)]], minlength=len(w.reps))
  out = []
  for v in _centre_eigenvectors(w, rng).T:
    u = v / np.sqrt(w.sizes)
    u = u if u[0] > 0 else -u
    t = math.sqrt(g) * float(sq_count @ u) / g          # ≈ 1, 0, −1 for k = 1, 2, 4
    k = 1 if t > 0.5 else (4 if t < -0.5 else 2)
    chi = math.sqrt(k * g) * u
    d = int(round(chi[0]))
    fs_sum = float(sq_count @ chi) / g
    if d < 1 or abs(chi[0] - d) > 1e-6 or abs(fs_sum - {1: 1, 2: 0, 4: -2}[k]) > 1e-6 or d % k:
      raise _Retry(f"inconsistent character: dim {chi[0]:.6f}, Frobenius-Schur sum {fs_sum:.6f}")
    out.append((chi, d, k))
  total = sum(d * d // k for _, d, k in out)
  if total != g:
    raise _Retry(f"sum of D²/k is {total}, not |G| = {g}")
  return out


# ---------------------------------------------------------------------------------------------------
# Stage 2: one irreducible subspace of each isotypic component, and its matrices.


def _isotypic_basis(w: _Work, chi_r: np.ndarray, d: int, k: int, rng: np.random.Generator) -> np.ndarray:
  """[G, D²/k] orthonormal basis of the image W of the central idempotent of χ.

  W is the range of the projector P[h, x] = D/(k|G|)·χ(h⁻¹x). Its columns are the translates of one
  function, so random sparse combinations of 16 columns each usually span W at O(|G|·M) cost; when they do
  not (or M is large) a dense Gaussian sketch P·Ω, O(|G|²·M), is used.
  """
  g, m = w.order, d * d // k
  p = min(g, m + 4)
  if 16 * p < g // 2:
    idx = rng.integers(0, g, size=(p, 16))
    x = np.einsum("hct,ct->hc", chi_r[w.ct[:, idx]], rng.standard_normal((p, 16)))
    basis = _orthonormal_range(x, m)
    if basis is not None:
      return basis
  basis = _orthonormal_range(chi_r[w.ct] @ rng.standard_normal((g, p)), m)
  if basis is None:
    raise _Retry(f"isotypic component of dimension {m} not resolved")
  return basis


def _orthonormal_range(x: np.ndarray, m: int) -> np.ndarray | None:
  """[G, m] orthonormal basis of the range of ``x`` if it has rank m (cond ≤ 1e4), else None.

  Eigenvectors of the small Gram matrix, then one Cholesky–QR pass: all level-3 BLAS, which stays fast
  on a busy machine where pivoted QR and SVD of tall matrices do not.
  """
  lam, v = np.linalg.eigh(x.T @ x)
  lam, v = lam[::-1], v[:, ::-1]
  if lam[m - 1] < 1e-8 * lam[0] or (len(lam) > m and lam[m] > 1e-10 * lam[0]):
    return None
  b = x @ (v[:, :m] / np.sqrt(lam[:m]))
  chol = np.linalg.cholesky(b.T @ b)
  return b @ np.linalg.inv(chol).T                      # chol is within rounding of I: inv is safe


def _irreducible_subspace(w: _Work, basis_w: np.ndarray, d: int, elems: np.ndarray,
                          coef: np.ndarray) -> np.ndarray:
  """[G, D]: the eigenspace of the lowest eigenvalue of Y = Σ_t c_t (R(x_t) + R(x_t)ᵀ) inside W.

  R(x) f = f(· x) is the right-regular action: it commutes with the left one, so Y restricted to W lies in
  the commutant; a generic such Y has D/k distinct eigenvalues, each on one irreducible copy.
  """
  m = basis_w.shape[1]
  if m == d:
    return basis_w
  right = basis_w[w.group.table[:, elems]] + basis_w[w.group.table[:, w.group.inverse[elems]]]
  ym = basis_w.T @ np.einsum("htm,t->hm", right, coef)
  # Only the lowest D + 1 eigenvalues matter: a D-fold lowest one, then a gap.
  lam, vec = scipy.linalg.eigh(0.5 * (ym + ym.T), subset_by_index=[0, d])
  scale = np.abs(ym).sum(axis=0).max()                  # ≥ the spectral radius
  if lam[d - 1] - lam[0] > 1e-9 * scale or lam[d] - lam[d - 1] < 1e-6 * scale:
    raise _Retry("the commutant did not split off an irreducible copy")
  return basis_w @ vec[:, :d]


def _canonical(u: np.ndarray) -> np.ndarray:
  """The orthonormal basis of span(u) that is lower-triangular with positive diagonal on its pivot rows.

  Pivot rows are the first D group elements whose rows are independent (residual norm² above 1% of the
  mean row norm² D/|G|); the result depends only on the subspace.
  """
  g, d = u.shape
  rows: list[int] = []
  done = np.zeros((0, d))
  for h in range(g):
    res = u[h] - done.T @ (done @ u[h])
    nrm = np.linalg.norm(res)
    if nrm * nrm > 1e-2 * d / g:
      rows.append(h)
      done = np.vstack([done, res / nrm])
      if len(rows) == d:
        break
  if len(rows) < d:
    raise _Retry("no canonical pivot rows")
  q, r = np.linalg.qr(u[rows].T)
  return u @ (q * np.sign(np.diag(r))[None, :])


def _matrices(w: _Work, u: np.ndarray) -> np.ndarray:
  """ρ(g) = Uᵀ L(g) U for every g, solved from D well-conditioned rows: U[g⁻¹h] = U[h] ρ(g)."""
  piv = scipy.linalg.qr(u.T, pivoting=True, mode="r")[1][: u.shape[1]]
  rhs = u[w.t_inv[:, piv]]                              # [G, D, D]: rows g⁻¹·h for the pivots h
  return np.linalg.solve(np.broadcast_to(u[piv], rhs.shape), rhs)


def _coefficient_basis(mats: np.ndarray, m: int) -> np.ndarray:
  """[G, M] orthonormal basis of span{g ↦ ρ_ij(g)} by Gram–Schmidt over (i, j) in row-major order.

  Entries whose residual keeps under 1% of the mean squared norm |G|/D are dependent on earlier ones (for
  complex and quaternionic type); Gram–Schmidt is applied twice per vector for orthogonality to rounding.
  """
  g, d, _ = mats.shape
  cols = mats.reshape(g, d * d)
  done = np.zeros((g, 0))
  for c in range(d * d):
    res = cols[:, c] - done @ (done.T @ cols[:, c])
    if res @ res > 1e-2 * g / d:
      res = res - done @ (done.T @ res)
      done = np.hstack([done, (res / np.linalg.norm(res))[:, None]])
      if done.shape[1] == m:
        return done
  raise _Retry(f"matrix entries span {done.shape[1]} dimensions, expected {m}")


def _check(group: groups_lib.Group, gens: Sequence[int], mats: np.ndarray, chi_g: np.ndarray) -> None:
  """Homomorphism on a generating set (which implies it everywhere), orthogonality, traces."""
  eye = np.eye(mats.shape[1])
  gens = np.asarray(gens, dtype=np.int64)
  if gens.size:
    prod = np.einsum("aij,sjk->asik", mats, mats[gens])
    hom = np.abs(prod - mats[group.table[:, gens]]).max()
  else:
    hom = 0.0
  orth = np.abs(np.einsum("gij,gkj->gik", mats, mats) - eye).max()
  tr = np.abs(np.einsum("gii->g", mats) - chi_g).max()
  ident = np.abs(mats[group.identity] - eye).max()
  if max(hom, orth, tr, ident) > _TOL:
    raise _Retry(f"representation check failed: hom {hom:.2e}, orth {orth:.2e}, trace {tr:.2e}")


def _compute(group: groups_lib.Group) -> tuple[Irrep, ...]:
  w = _work(group)
  last = None
  for attempt in range(_ATTEMPTS):
    try:
      return _compute_once(w, np.random.default_rng([_SEED, attempt]))
    except _Retry as err:
      last = err
  raise RuntimeError(f"real irreps of {group.name} failed {_ATTEMPTS} seeds: {last}")


def _compute_once(w: _Work, rng: np.random.Generator) -> tuple[Irrep, ...]:
  g = w.order
  items = []
  elems = rng.choice(g, size=min(g, 24), replace=False)  # the right-regular element used to split
  coef = rng.standard_normal(len(elems))
  for chi_r, d, k in _real_characters(w, rng):
    chi_g = chi_r[w.rc]
    if d == 1:
      mats = np.rint(chi_g)[:, None, None]
      if np.abs(mats[:, 0, 0] - chi_g).max() > 1e-6:
        raise _Retry("a one-dimensional real character is not ±1")
      chi_g = mats[:, 0, 0].copy()
    else:
      basis_w = _isotypic_basis(w, chi_r, d, k, rng)
      u = _canonical(_irreducible_subspace(w, basis_w, d, elems, coef))
      mats = _matrices(w, u)
    items.append(dict(chi_r=chi_r, chi_g=chi_g, d=d, k=k, mats=mats))
  named = _arrange(w, items)
  out = []
  for name, it in named:
    mats = it["mats"]
    _check(w.group, w.gens, mats, it["chi_g"])
    basis = _coefficient_basis(mats, it["d"] ** 2 // it["k"])
    out.append(_freeze(name, mats, {1: 1, 2: 0, 4: -1}[it["k"]], basis))
  _check_complete(out, g)
  return tuple(out)


def _freeze(name: str, mats: np.ndarray, fs: int, basis: np.ndarray) -> Irrep:
  mats = np.ascontiguousarray(mats, dtype=np.float64)
  basis = np.ascontiguousarray(basis, dtype=np.float64)
  chi = np.ascontiguousarray(np.einsum("gii->g", mats))
  for a in (mats, basis, chi):
    a.setflags(write=False)
  return Irrep(name=name, dim=int(mats.shape[1]), matrices=mats, character=chi, frobenius_schur=int(fs),
               basis=basis)


def _check_complete(irreps: Sequence[Irrep], g: int) -> None:
  """Σ D²/k = |G| and (1/|G|) Σ_g χ_a χ_b = k δ_ab."""
  chars = np.stack([ir.character for ir in irreps])
  gram = chars @ chars.T / g
  want = np.diag([float(ir.k) for ir in irreps])
  if sum(ir.dim ** 2 // ir.k for ir in irreps) != g or np.abs(gram - want).max() > 1e-8:
    raise _Retry("characters are not complete and orthogonal")


# ---------------------------------------------------------------------------------------------------
# Names and order.

_FAMILY = re.compile(r"^(C|D|S)(\d+)$")


def _arrange(w: _Work, items: list[dict]) -> list[tuple[str, dict]]:
  """Names and orders the irreps; fixes the family conventions of C_n and D_n in place."""
  triv = [it for it in items if it["d"] == 1 and np.all(it["chi_g"] == 1)]
  if len(triv) != 1:
    raise _Retry("no unique trivial representation")
  first = [("trivial", triv[0])]
  rest = [it for it in items if it is not triv[0]]
  fam = _family(w.group)
  if fam is not None:
    kind, n = fam
    named = {"C": _name_cyclic, "D": _name_dihedral, "S": _name_symmetric}[kind](w, n, rest)
    if named is not None:
      return first + named
  return first + _name_systematic(sorted(rest, key=functools.cmp_to_key(_by_character)))


def _family(group: groups_lib.Group) -> tuple[str, int] | None:
  """("C"|"D"|"S", n) when ``group`` carries the engine's own table for its name, else None."""
  m = _FAMILY.match(group.name)
  if not m:
    return None
  kind, n = m.group(1), int(m.group(2))
  if kind == "S" and n > 7:
    return None
  ref = {"C": groups_lib.cyclic, "D": groups_lib.dihedral}.get(kind)
  ref_table = ref(n).table if ref else groups_lib.get(group.name).table
  return (kind, n) if np.array_equal(ref_table, group.table) else None


def _by_character(a: dict, b: dict) -> int:
  """Dimension ascending, then character values on real classes in order, larger first."""
  if a["d"] != b["d"]:
    return -1 if a["d"] < b["d"] else 1
  diff = a["chi_r"] - b["chi_r"]
  idx = np.flatnonzero(np.abs(diff) > 1e-6)
  return 0 if idx.size == 0 else (-1 if diff[idx[0]] > 0 else 1)


def _suffix(i: int) -> str:
  """a, b, …, z, aa, ab, … (spreadsheet columns)."""
  s = ""
  i += 1
  while i:
    i, rem = divmod(i - 1, 26)
    s = chr(ord("a") + rem) + s
  return s


def _name_systematic(items: list[dict]) -> list[tuple[str, dict]]:
  """``"<D>d"``, or ``"<D>d_a"``, ``"<D>d_b"``… in the given order when the dimension repeats."""
  counts: dict[int, int] = {}
  for it in items:
    counts[it["d"]] = counts.get(it["d"], 0) + 1
  seen: dict[int, int] = {}
  out = []
  for it in items:
    d = it["d"]
    i = seen.get(d, 0)
    seen[d] = i + 1
    out.append((f"{d}d" if counts[d] == 1 else f"{d}d_{_suffix(i)}", it))
  return out


def _frequency(chi_r_of_r: float, n: int) -> int:
  """k with 2cos(2πk/n) = χ(r), 0 < k < n/2."""
  k = int(round(n * math.acos(max(-1.0, min(1.0, chi_r_of_r / 2))) / (2 * math.pi)))
  if not 0 < 2 * k < n or abs(2 * math.cos(2 * math.pi * k / n) - chi_r_of_r) > 1e-6:
    raise _Retry(f"character {chi_r_of_r} on the rotation is not 2cos(2πk/{n})")
  return k


def _rebase(it: dict, o: np.ndarray) -> None:
  """Change of orthonormal basis: ρ(g) ↦ Oᵀ ρ(g) O."""
  it["mats"] = np.einsum("ji,gjk,kl->gil", o, it["mats"], o)


def _orient(it: dict, r: int) -> None:
  """Flips the second basis vector so that ρ(r) is a rotation by a positive angle below π."""
  if it["mats"][r, 1, 0] < 0:
    _rebase(it, np.diag([1.0, -1.0]))


def _name_cyclic(w: _Work, n: int, items: list[dict]) -> list[tuple[str, dict]]:
  out = []
  for it in items:
    if it["d"] == 1:
      out.append(((0,), "sign", it))
    else:
      k = _frequency(it["chi_g"][1], n)
      _orient(it, 1)
      out.append(((k,), f"freq_{k}", it))
  return [(name, it) for _, name, it in sorted(out, key=lambda t: t[0])]


def _name_dihedral(w: _Work, n: int, items: list[dict]) -> list[tuple[str, dict]]:
  r, s = (1 if n > 1 else 0), n
  names_1d = {(1, -1): "sign", (-1, 1): "sign_r", (-1, -1): "sign_rs"}
  out = []
  for it in items:
    if it["d"] == 1:
      key = (int(it["chi_g"][r]), int(it["chi_g"][s]))
      out.append(((0, list(names_1d).index(key)), names_1d[key], it))
      continue
    k = _frequency(it["chi_g"][r], n)
    lam, vec = np.linalg.eigh(it["mats"][s])
    v = vec[:, 1]                                      # eigenvalue +1 of the reflection
    v = v if (v[0] > 1e-9 or (abs(v[0]) <= 1e-9 and v[1] > 0)) else -v
    _rebase(it, np.array([[v[0], -v[1]], [v[1], v[0]]]))
    _orient(it, r)
    out.append(((1, k), f"rot_{k}", it))
  return [(name, it) for _, name, it in sorted(out, key=lambda t: t[0])]


def _name_symmetric(w: _Work, n: int, items: list[dict]) -> list[tuple[str, dict]]:
  # The table equals the built-in S_n, whose labels are the permutations (this group's may be custom).
  perms = np.asarray([[int(v) for v in lab.strip("()").split()] for lab in groups_lib.get(f"S{n}").labels])
  fixed = (perms == np.arange(n)[None, :]).sum(axis=1)
  sign = np.asarray([_perm_sign(p) for p in perms])
  special = [("sign", sign), ("standard", fixed - 1), ("standard⊗sign", (fixed - 1) * sign)]
  out, left = [], list(items)
  for name, chi in special:
    hit = [it for it in left if it["d"] == chi[0] and np.abs(it["chi_g"] - chi).max() < 1e-6]
    if hit:
      out.append((name, hit[0]))
      left = [it for it in left if it is not hit[0]]
  tau = np.flatnonzero(fixed == n - 2)
  def key(a: dict, b: dict) -> int:  # dimension, then χ(transposition) descending, then all classes
    if a["d"] == b["d"] and tau.size and abs(a["chi_g"][tau[0]] - b["chi_g"][tau[0]]) > 1e-6:
      return -1 if a["chi_g"][tau[0]] > b["chi_g"][tau[0]] else 1
    return _by_character(a, b)
  return out + _name_systematic(sorted(left, key=functools.cmp_to_key(key)))


def _perm_sign(p: Sequence[int]) -> int:
  seen, sign = set(), 1
  for i in range(len(p)):
    j, length = i, 0
    while j not in seen:
      seen.add(j)
      j, length = p[j], length + 1
    if length and length % 2 == 0:
      sign = -sign
  return sign


# ---------------------------------------------------------------------------------------------------
# Disk cache: one npz per group key, written atomically, validated when read.


def _path(group: groups_lib.Group) -> str:
  return os.path.join(cache_dir(), f"{group.key}.npz")


def _save(group: groups_lib.Group, irreps: Sequence[Irrep]) -> None:
  arrays = {"format": np.asarray(FORMAT), "key": np.asarray(group.key), "order": np.asarray(group.order),
            "names": np.asarray([ir.name for ir in irreps]),
            "fs": np.asarray([ir.frobenius_schur for ir in irreps], dtype=np.int64)}
  for i, ir in enumerate(irreps):
    arrays[f"matrices_{i}"] = ir.matrices
    arrays[f"basis_{i}"] = ir.basis
  atomic.write_cache(_path(group), arrays)


def _load(group: groups_lib.Group) -> tuple[Irrep, ...] | None:
  """The cached irreps, or None when the file is missing, unreadable or fails validation."""
  path = _path(group)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["format"]) != FORMAT or str(z["key"]) != group.key or int(z["order"]) != group.order:
        return None
      names, fs = [str(s) for s in z["names"]], [int(v) for v in z["fs"]]
      irreps = tuple(_freeze(name, z[f"matrices_{i}"], f, z[f"basis_{i}"])
                     for i, (name, f) in enumerate(zip(names, fs)))
    _validate(group, irreps)
    return irreps
  except Exception:  # noqa: BLE001 -- any damage (truncated zip, bad dtype, failed check) means recompute
    return None


def _validate(group: groups_lib.Group, irreps: Sequence[Irrep]) -> None:
  g = group.order
  if not irreps or irreps[0].name != "trivial":
    raise _Retry("no trivial irrep first")
  gens = _generators(group)
  for ir in irreps:
    if ir.frobenius_schur not in (1, 0, -1) or ir.matrices.shape != (g, ir.dim, ir.dim):
      raise _Retry("bad shape or type")
    if ir.basis.shape != (g, ir.dim ** 2 // ir.k) or not np.isfinite(ir.matrices).all():
      raise _Retry("bad basis")
    _check(group, gens, ir.matrices, ir.character)
  _check_complete(irreps, g)
  basis = np.concatenate([ir.basis for ir in irreps], axis=1)
  if basis.shape[1] != g or np.abs(basis.T @ basis - np.eye(g)).max() > 1e-8:
    raise _Retry("bases are not orthonormal")


# ---------------------------------------------------------------------------------------------------
# Group Fourier transform (JAX).


def _check_irreps_shape(irreps: Sequence[Irrep], g: int | None = None) -> int:
  if not irreps or not all(isinstance(ir, Irrep) for ir in irreps):
    raise IrrepError("irreps must be a non-empty sequence of universality.engine.irreps.Irrep")
  orders = {ir.order for ir in irreps}
  if len(orders) != 1 or (g is not None and orders != {g}):
    raise IrrepError(f"irreps of groups of orders {sorted(orders)} do not match a group of order {g}")
  return orders.pop()


@functools.lru_cache(maxsize=32)
def _stacked(irreps: tuple[Irrep, ...]) -> tuple[np.ndarray, tuple[int, ...], np.ndarray, np.ndarray]:
  """Matrices flattened side by side [G, ΣD²], dims, weights [R], and a [ΣD², R] weighted membership."""
  flat = np.concatenate([ir.matrices.reshape(ir.order, -1) for ir in irreps], axis=1)
  dims = tuple(ir.dim for ir in irreps)
  weights = np.asarray([ir.plancherel_weight for ir in irreps])
  member = np.zeros((flat.shape[1], len(irreps)))
  start = 0
  for i, d in enumerate(dims):
    member[start:start + d * d, i] = weights[i]
    start += d * d
  return flat, dims, weights, member


def _float_dtype(x: jax.Array):
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros((), float).dtype


def _coefficients(f_xG, irreps: Sequence[Irrep]):
  """All irreps' Fourier coefficients flattened side by side, ``[..., Σ D²]``, and the stacked tables."""
  g = _check_irreps_shape(list(irreps))
  f = jnp.asarray(f_xG)
  if f.ndim < 1 or f.shape[-1] != g:
    raise IrrepError(f"f_xG must end in the group axis of size {g}, got shape {f.shape}")
  stacked = _stacked(tuple(irreps))
  dtype = _float_dtype(f)
  coeffs = jnp.tensordot(f.astype(dtype), jnp.asarray(stacked[0], dtype), axes=1,
                         precision=jax.lax.Precision.HIGHEST)
  return coeffs, stacked


def fourier(f_xG, irreps: Sequence[Irrep]) -> list[jax.Array]:
  """f̂(ρ) = Σ_g f(g) ρ(g) for every irrep: a list of ``[..., D, D]`` arrays (leading axes are batch).

  Pure jnp with the matrices as constants: jit it with the irreps closed over,
  ``jax.jit(lambda f: fourier(f, irreps))``, and vmap it freely.
  """
  coeffs, (_, dims, _, _) = _coefficients(f_xG, irreps)
  out, start = [], 0
  for d in dims:
    out.append(coeffs[..., start:start + d * d].reshape(coeffs.shape[:-1] + (d, d)))
    start += d * d
  return out


def inverse_fourier(coeffs: Sequence, irreps: Sequence[Irrep]) -> jax.Array:
  """f(g) = Σ_ρ w_ρ ⟨f̂(ρ), ρ(g)⟩_F with w_ρ = D/(k|G|): the inverse of ``fourier``, ``[..., G]``."""
  irreps = list(irreps)
  _check_irreps_shape(irreps)
  coeffs = [jnp.asarray(c) for c in coeffs]
  if len(coeffs) != len(irreps):
    raise IrrepError(f"{len(coeffs)} coefficient arrays for {len(irreps)} irreps")
  batch = coeffs[0].shape[:-2]
  for c, ir in zip(coeffs, irreps):
    if c.ndim < 2 or c.shape[-2:] != (ir.dim, ir.dim) or c.shape[:-2] != batch:
      raise IrrepError(f"coefficients of {ir.name!r} must be {batch + (ir.dim, ir.dim)}, got {c.shape}")
  flat, _, weights, _ = _stacked(tuple(irreps))
  dtype = _float_dtype(coeffs[0])
  scaled = jnp.concatenate([c.astype(dtype).reshape(batch + (-1,)) * float(wt)
                            for c, wt in zip(coeffs, weights)], axis=-1)
  return jnp.tensordot(scaled, jnp.asarray(flat.T, dtype), axes=1, precision=jax.lax.Precision.HIGHEST)


def fourier_power(f_xG, irreps: Sequence[Irrep]) -> jax.Array:
  """``[..., R]``: w_ρ ‖f̂(ρ)‖_F², the part of Σ_g f(g)² in each irrep (sums to Σ_g f(g)²)."""
  coeffs, (_, _, _, member) = _coefficients(f_xG, irreps)
  return jnp.tensordot(coeffs * coeffs, jnp.asarray(member, coeffs.dtype), axes=1,
                       precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------------
# Command line: character tables.


def _element_orders(group: groups_lib.Group) -> np.ndarray:
  order = np.ones(group.order, dtype=np.int64)
  power = np.arange(group.order)
  while True:
    active = power != group.identity
    if not active.any():
      return order
    power = np.where(active, group.table[power, np.arange(group.order)], power)
    order += active


def format_character_table(group: groups_lib.Group, irreps: Sequence[Irrep] | None = None) -> str:
  """A printable real character table: classes named by element order (1a, 2a, 2b, …) with sizes."""
  irreps = real_irreps(group) if irreps is None else list(irreps)
  table = character_table(group, irreps)
  orders = _element_orders(group)
  names, count = [], {}
  for cls in group.conjugacy_classes:
    o = int(orders[cls[0]])
    count[o] = count.get(o, 0) + 1
    names.append(f"{o}{_suffix(count[o] - 1)}")
  def cell(x: float) -> str:
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.3f}"
  kinds = {1: "R", 0: "C", -1: "H"}
  head = ["class", "", ""] + names
  size = ["size", "dim", "FS"] + [str(len(c)) for c in group.conjugacy_classes]
  rows = [[ir.name, str(ir.dim), kinds[ir.frobenius_schur]] + [cell(x) for x in row]
          for ir, row in zip(irreps, table)]
  widths = [max(len(r[i]) for r in [head, size] + rows) for i in range(len(head))]
  def fmt(r: list[str]) -> str:
    return "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths)))
  lines = [f"{group.name}: order {group.order}, {len(group.conjugacy_classes)} classes, {len(irreps)} real "
           "irreps (FS: R real, C complex, H quaternionic type; complex-type characters are 2·Re χ)",
           fmt(head), fmt(size), "-" * len(fmt(head))] + [fmt(r) for r in rows]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m universality.engine.irreps", description="Print real character tables.")
  parser.add_argument("specs", nargs="+", help="group specs such as S5 D4 Q8 C3xS3")
  parser.add_argument("--no-cache", action="store_true",
                      help="compute afresh, do not read or write the cache")
  parser.add_argument("--time", action="store_true", help="print the computation time")
  args = parser.parse_args(argv)
  for spec in args.specs:
    try:
      group = groups_lib.get(spec)
    except groups_lib.GroupError as err:
      print(err, file=sys.stderr)
      return 2
    start = time.perf_counter()
    irreps = real_irreps(group, cache=not args.no_cache)
    took = time.perf_counter() - start
    print(format_character_table(group, irreps))
    if args.time:
      print(f"({took:.3f} s)")
    print()
  return 0


if __name__ == "__main__":
  sys.exit(main())
