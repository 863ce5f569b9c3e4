"""universality.engine.irreps: real irreps of many groups checked against identities, brute force and float64 numpy."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from universality.engine import groups
from universality.engine import irreps as irreps_lib

# Abelian and not; complex type (C_n n > 2, C3xS3, A4, C4xC4) and quaternionic type (Q8, Dic3).
SPECS = ["C1", "C2", "C5", "C6", "D1", "D2", "D4", "D5", "S1", "S2", "S3", "S4", "S5", "A4", "A5", "Q8",
         "Dic3", "C3xS3", "C2xC2xC2", "C4xC4", "D3xQ8"]
FS_SUM = {1: 1, 0: 0, -1: -2}  # (1/|G|) Σ_g χ(g²) of the real character, by Frobenius–Schur type


@pytest.fixture(scope="module")
def computed():
  return {spec: irreps_lib.real_irreps(groups.get(spec), cache=False) for spec in SPECS}


@pytest.mark.parametrize("spec", SPECS)
def test_homomorphism_and_orthogonality(spec, computed):
  g = groups.get(spec)
  a, b = (x.ravel() for x in np.meshgrid(np.arange(g.order), np.arange(g.order)))
  for ir in computed[spec]:
    m = ir.matrices
    assert m.shape == (g.order, ir.dim, ir.dim) and m.dtype == np.float64
    # every pair: ρ(a)ρ(b) = ρ(a·b), with the product taken from the Cayley table
    np.testing.assert_allclose(m[a] @ m[b], m[g.table[a, b]], atol=1e-9)
    np.testing.assert_allclose(m @ m.transpose(0, 2, 1), np.broadcast_to(np.eye(ir.dim), m.shape), atol=1e-9)
    np.testing.assert_allclose(m[g.identity], np.eye(ir.dim), atol=1e-12)
    np.testing.assert_allclose(ir.character, np.trace(m, axis1=1, axis2=2), atol=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_characters_norms_inequivalence_completeness(spec, computed):
  g = groups.get(spec)
  irs = computed[spec]
  chars = np.stack([ir.character for ir in irs])
  gram = chars @ chars.T / g.order
  # Σ_g χ(g)² = |G|·k, and inequivalent irreps have orthogonal characters
  np.testing.assert_allclose(gram, np.diag([float(ir.k) for ir in irs]), atol=1e-9)
  assert sum(ir.dim ** 2 // ir.k for ir in irs) == g.order
  assert irs[0].name == "trivial" and np.all(irs[0].character == 1.0)
  # the number of real irreps is the number of classes up to inversion
  real_classes = {frozenset(c.tolist()) | frozenset(g.inverse[c].tolist()) for c in g.conjugacy_classes}
  assert len(irs) == len(real_classes)
  assert len({ir.name for ir in irs}) == len(irs)


@pytest.mark.parametrize("spec", SPECS)
def test_frobenius_schur_from_character(spec, computed):
  g = groups.get(spec)
  squares = g.table[np.arange(g.order), np.arange(g.order)]
  for ir in computed[spec]:
    assert ir.frobenius_schur in (1, 0, -1)
    assert abs(ir.character[squares].mean() - FS_SUM[ir.frobenius_schur]) < 1e-9
    assert ir.dim % ir.k == 0  # complex type: even, quaternionic: a multiple of 4


@pytest.mark.parametrize("spec", SPECS)
def test_basis_orthonormal_spans_matrix_entries(spec, computed):
  g = groups.get(spec)
  bases = []
  for ir in computed[spec]:
    b = ir.basis
    assert b.shape == (g.order, ir.dim ** 2 // ir.k)
    np.testing.assert_allclose(b.T @ b, np.eye(b.shape[1]), atol=1e-9)
    entries = ir.matrices.reshape(g.order, -1)
    # every entry g ↦ ρ_ij(g) lies in the span, and the span has exactly rank D²/k
    np.testing.assert_allclose(b @ (b.T @ entries), entries, atol=1e-9)
    assert np.linalg.matrix_rank(entries, tol=1e-8) == b.shape[1]
    bases.append(b)
  full = np.concatenate(bases, axis=1)
  np.testing.assert_allclose(full.T @ full, np.eye(g.order), atol=1e-9)


def test_type_examples(computed):
  types = lambda spec: sorted((ir.dim, ir.frobenius_schur) for ir in computed[spec])
  assert types("Q8") == [(1, 1)] * 4 + [(4, -1)]
  assert types("Dic3") == [(1, 1), (1, 1), (2, 0), (2, 1), (4, -1)]
  assert types("A4") == [(1, 1), (2, 0), (3, 1)]
  assert types("C5") == [(1, 1), (2, 0), (2, 0)]
  assert (4, 0) in types("C3xS3")


@pytest.mark.parametrize("spec, dims", [("S4", [1, 1, 2, 3, 3]), ("S5", [1, 1, 4, 4, 5, 5, 6]),
                                        ("A5", [1, 3, 3, 4, 5]), ("S3", [1, 1, 2]), ("D4", [1, 1, 1, 1, 2]),
                                        ("D5", [1, 1, 2, 2]), ("C4xC4", [1] * 4 + [2] * 6)])
def test_known_dimensions(spec, dims, computed):
  assert sorted(ir.dim for ir in computed[spec]) == dims


def _perm_facts(g):
  perms = [tuple(int(v) for v in lab.strip("()").split()) for lab in g.labels]
  fixed = np.asarray([sum(p[i] == i for i in range(len(p))) for p in perms])
  inversions = np.asarray([sum(p[i] > p[j] for i, j in itertools.combinations(range(len(p)), 2))
                           for p in perms])
  return fixed, (-1.0) ** inversions


@pytest.mark.parametrize("spec", ["S3", "S4", "S5"])
def test_symmetric_group_names(spec, computed):
  g = groups.get(spec)
  n = int(spec[1:])
  by_name = {ir.name: ir for ir in computed[spec]}
  fixed, parity = _perm_facts(g)
  np.testing.assert_allclose(by_name["sign"].character, parity, atol=1e-12)
  np.testing.assert_allclose(by_name["standard"].character, fixed - 1, atol=1e-9)
  assert by_name["standard"].dim == n - 1
  names = [ir.name for ir in computed[spec]]
  expected = {"S3": ["trivial", "sign", "standard"],
              "S4": ["trivial", "sign", "standard", "standard⊗sign", "2d"],
              "S5": ["trivial", "sign", "standard", "standard⊗sign", "5d_a", "5d_b", "6d"]}[spec]
  assert names == expected
  if n >= 4:
    np.testing.assert_allclose(by_name["standard⊗sign"].character, (fixed - 1) * parity, atol=1e-9)
  if spec == "S5":
    tau = int(np.flatnonzero(fixed == 3)[0])
    assert by_name["5d_a"].character[tau] == pytest.approx(1)
    assert by_name["5d_b"].character[tau] == pytest.approx(-1)


def _rotation(theta):
  c, s = np.cos(theta), np.sin(theta)
  return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


@pytest.mark.parametrize("n", [5, 6, 8])
def test_cyclic_names_and_rotations(n):
  irs = irreps_lib.real_irreps(groups.get(f"C{n}"), cache=False)
  want = ["trivial"] + (["sign"] if n % 2 == 0 else []) + [f"freq_{k}" for k in range(1, (n + 1) // 2)]
  assert [ir.name for ir in irs] == want
  j = np.arange(n)
  for ir in irs:
    if ir.name.startswith("freq_"):
      k = int(ir.name[5:])
      np.testing.assert_allclose(ir.matrices, _rotation(2 * np.pi * j * k / n), atol=1e-9)
    elif ir.name == "sign":
      np.testing.assert_array_equal(ir.matrices[:, 0, 0], (-1.0) ** j)


@pytest.mark.parametrize("n", [4, 5, 6])
def test_dihedral_names_and_matrices(n):
  irs = irreps_lib.real_irreps(groups.get(f"D{n}"), cache=False)
  one_d = ["trivial", "sign"] + (["sign_r", "sign_rs"] if n % 2 == 0 else [])
  assert [ir.name for ir in irs] == one_d + [f"rot_{k}" for k in range(1, (n + 1) // 2)]
  kk, f = np.arange(2 * n) % n, np.arange(2 * n) // n  # element kk + n·f is r^kk s^f
  values = {"trivial": (1, 1), "sign": (1, -1), "sign_r": (-1, 1), "sign_rs": (-1, -1)}
  for ir in irs:
    if ir.dim == 1:
      vr, vs = values[ir.name]
      np.testing.assert_array_equal(ir.matrices[:, 0, 0], vr ** kk * vs ** f)
    else:
      k = int(ir.name[4:])
      reflect = np.where(f[:, None, None] == 1, np.diag([1.0, -1.0]), np.eye(2))
      want = _rotation(2 * np.pi * kk * k / n) @ reflect
      np.testing.assert_allclose(ir.matrices, want, atol=1e-9)


def test_general_tables_relabelled_group():
  """A randomly relabelled S4 (identity not element 0) still gets complete irreps with systematic names."""
  s4 = groups.get("S4")
  perm = np.random.default_rng(7).permutation(s4.order)  # new index of old element i is perm[i]
  inv = np.argsort(perm)
  table = perm[s4.table[inv][:, inv]]
  g = groups.from_table(table, name="relabelled")
  irs = irreps_lib.real_irreps(g, cache=False)
  assert sorted(ir.dim for ir in irs) == [1, 1, 2, 3, 3]
  assert [ir.name for ir in irs] == ["trivial", "1d", "2d", "3d_a", "3d_b"]
  ref = sorted(np.round(np.sort(ir.character), 6).tolist() for ir in irreps_lib.real_irreps(s4, cache=False))
  assert sorted(np.round(np.sort(ir.character), 6).tolist() for ir in irs) == ref
  for ir in irs:
    np.testing.assert_allclose(ir.matrices[:, None] @ ir.matrices[None, :], ir.matrices[g.table], atol=1e-9)


def test_deterministic():
  for spec in ("S4", "C3xS3", "Q8"):
    a = irreps_lib.real_irreps(groups.get(spec), cache=False)
    b = irreps_lib.real_irreps(groups.get(spec), cache=False)
    assert [ir.name for ir in a] == [ir.name for ir in b]
    for x, y in zip(a, b):
      np.testing.assert_allclose(x.matrices, y.matrices, atol=1e-12)
      np.testing.assert_allclose(x.basis, y.basis, atol=1e-12)


def test_disk_cache_round_trip_and_corruption(tmp_path, monkeypatch):
  monkeypatch.setenv("UNIVERSALITY_CACHE", str(tmp_path))
  irreps_lib.clear_memory_cache()
  g = groups.get("D4")
  first = irreps_lib.real_irreps(g)
  path = os.path.join(str(tmp_path), "irreps", f"{g.key}.npz")
  assert os.path.exists(path)
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]

  def boom(group):
    raise AssertionError("recomputed although the cache is valid")

  irreps_lib.clear_memory_cache()
  with monkeypatch.context() as m:
    m.setattr(irreps_lib, "_compute", boom)
    loaded = irreps_lib.real_irreps(g)
    assert irreps_lib.real_irreps(g)[0] is loaded[0]  # served from memory now
  assert [ir.name for ir in loaded] == [ir.name for ir in first]
  for x, y in zip(first, loaded):
    np.testing.assert_array_equal(x.matrices, y.matrices)
    np.testing.assert_array_equal(x.basis, y.basis)
    assert x.frobenius_schur == y.frobenius_schur

  # a truncated file and a well-formed file with a wrong matrix both fall back to recomputation
  with open(path, "rb") as f:
    blob = f.read()
  for damage in ("truncate", "tamper"):
    if damage == "truncate":
      with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    else:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
      arrays["matrices_4"] = arrays["matrices_4"].copy()
      arrays["matrices_4"][3] = np.eye(2)
      np.savez(path, **arrays)
    irreps_lib.clear_memory_cache()
    again = irreps_lib.real_irreps(g)
    for x, y in zip(first, again):
      np.testing.assert_allclose(x.matrices, y.matrices, atol=1e-12)
    with np.load(path, allow_pickle=False) as z:  # rewritten with good contents
      np.testing.assert_allclose(z["matrices_4"], first[4].matrices, atol=1e-12)
  irreps_lib.clear_memory_cache()


@pytest.mark.parametrize("spec", ["S4", "Q8", "C3xS3", "D5"])
def test_fourier_inverse_plancherel_power(spec):
  g = groups.get(spec)
  irs = irreps_lib.real_irreps(g, cache=False)
  f = np.random.default_rng(1).standard_normal((3, 2, g.order))
  with jax.enable_x64(True):
    coeffs = irreps_lib.fourier(jnp.asarray(f), irs)
    # f̂(ρ) = Σ_g f(g) ρ(g) against a float64 numpy loop
    for c, ir in zip(coeffs, irs):
      assert c.shape == (3, 2, ir.dim, ir.dim)
      ref = sum(f[..., x, None, None] * ir.matrices[x] for x in range(g.order))
      np.testing.assert_allclose(np.asarray(c), ref, atol=1e-10)
    back = irreps_lib.inverse_fourier(coeffs, irs)
    np.testing.assert_allclose(np.asarray(back), f, atol=1e-10)
    total = (f ** 2).sum(-1)
    weighted = sum(ir.dim / (ir.k * g.order) * (np.asarray(c) ** 2).sum((-2, -1))
                   for c, ir in zip(coeffs, irs))
    np.testing.assert_allclose(weighted, total, rtol=1e-10)
    power = np.asarray(irreps_lib.fourier_power(jnp.asarray(f), irs))
    assert power.shape == (3, 2, len(irs))
    np.testing.assert_allclose(power.sum(-1), total, rtol=1e-10)
    # the power in ρ is the squared norm of the projection of f onto the span of ρ's entries
    proj = np.stack([((f @ ir.basis) ** 2).sum(-1) for ir in irs], -1)
    np.testing.assert_allclose(power, proj, rtol=1e-9, atol=1e-12)


def test_fourier_float32_jit_vmap():
  g = groups.get("S4")
  irs = irreps_lib.real_irreps(g, cache=False)
  f = jnp.asarray(np.random.default_rng(2).standard_normal((5, g.order)), jnp.float32)
  fwd = jax.jit(lambda x: irreps_lib.fourier(x, irs))
  inv = jax.jit(lambda c: irreps_lib.inverse_fourier(c, irs))
  coeffs = fwd(f)
  assert coeffs[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(inv(coeffs)), np.asarray(f), atol=1e-4)
  per_row = jax.vmap(lambda x: irreps_lib.fourier_power(x, irs))(f)
  np.testing.assert_allclose(np.asarray(per_row), np.asarray(irreps_lib.fourier_power(f, irs)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(per_row).sum(-1), np.asarray((f ** 2).sum(-1)), rtol=1e-4)


def test_bad_input():
  g = groups.get("S3")
  irs = irreps_lib.real_irreps(g, cache=False)
  with pytest.raises(ValueError, match="Group"):
    irreps_lib.real_irreps(42)
  with pytest.raises(ValueError, match="group axis"):
    irreps_lib.fourier(jnp.zeros((4, 5)), irs)
  with pytest.raises(ValueError, match="coefficient"):
    irreps_lib.inverse_fourier(irreps_lib.fourier(jnp.ones(6), irs)[:-1], irs)
  with pytest.raises(ValueError, match="non-empty"):
    irreps_lib.fourier_power(jnp.ones(6), [])
  with pytest.raises(ValueError):
    irreps_lib.fourier(jnp.ones(8), irs + irreps_lib.real_irreps(groups.get("Q8"), cache=False))


def test_character_table_cli(capsys):
  assert irreps_lib.main(["S3", "Q8", "--no-cache"]) == 0
  out = capsys.readouterr().out
  assert "standard" in out and "S3: order 6" in out and " H " in out
  table = irreps_lib.character_table(groups.get("S3"), irreps_lib.real_irreps(groups.get("S3"), cache=False))
  np.testing.assert_allclose(table, [[1, 1, 1], [1, -1, 1], [2, 0, -1]], atol=1e-9)
