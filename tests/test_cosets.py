"""Subgroups and coset neurons against brute force: subgroup counts, exhaustive enumeration on order 8,
fixed-coset characters, coset shares by explicit projection, and planted coset neurons."""

import itertools

import jax
import numpy as np
import pytest

from universality.engine import groups
from universality.engine import irreps as irreps_lib
from universality.engine.families.group import passes
from universality.engine.families.group.passes import cosets
from universality.engine.families.group import models
from tests.helpers import group_config


def _rng(*salt):
  return np.random.default_rng([20241114, *salt])


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


@pytest.mark.parametrize("spec,count", [("Q8", 6), ("S4", 30), ("A5", 59), ("S5", 156), ("C12", 6)]
                         + [(f"D{n}", len(_divisors(n)) + sum(_divisors(n))) for n in (5, 6, 9, 12)])
def test_subgroup_counts_include_trivial_and_whole_group(spec, count):
  subs = groups.subgroups(spec, cache=False)
  assert len(subs) == count
  assert subs.orders[0] == 1 and subs.orders[-1] == groups.get(spec).order
  assert all(groups.get(spec).order % o == 0 for o in subs.orders)  # Lagrange


def _brute_subgroups(g):
  """Every subset containing the identity and closed under products (2^|G| subsets)."""
  out = set()
  for bits in itertools.product([False, True], repeat=g.order):
    m = np.asarray(bits)
    if not m[g.identity]:
      continue
    members = np.flatnonzero(m)
    if m[g.table[np.ix_(members, members)]].all():
      out.add(tuple(members))
  return out


@pytest.mark.parametrize("spec", ["D4", "Q8", "C2xC4", "S3"])
def test_subgroups_equal_exhaustive_search_with_classes_and_flags(spec):
  g = groups.get(spec)
  subs = groups.subgroups(g, cache=False)
  assert {tuple(np.flatnonzero(m)) for m in subs.masks} == _brute_subgroups(g)
  for i, m in enumerate(subs.masks):
    members = np.flatnonzero(m)
    conj = {tuple(sorted(g.table[g.table[x, members], g.inverse[x]])) for x in range(g.order)}
    same_class = {tuple(np.flatnonzero(subs.masks[j])) for j in np.flatnonzero(subs.classes == subs.classes[i])}
    assert conj == same_class
    assert subs.normal[i] == (len(conj) == 1)
    sub_table = g.table[np.ix_(members, members)]
    assert subs.abelian[i] == np.array_equal(sub_table, sub_table.T)


def test_subgroup_cache_round_trip_and_damage(tmp_path, monkeypatch):
  monkeypatch.setenv("UNIVERSALITY_CACHE", str(tmp_path))
  g = groups.get("D6")
  groups._SUBGROUP_MEMO.pop(g.key, None)
  first = groups.subgroups(g)
  path = tmp_path / "subgroups" / f"{g.key}.npz"
  assert path.exists()
  loaded = groups._load_subgroups(g)
  np.testing.assert_array_equal(loaded.masks, first.masks)
  np.testing.assert_array_equal(loaded.classes, first.classes)
  # A file whose rows are not subgroups is refused (and would be recomputed).
  with np.load(path) as z:
    arrays = dict(z)
  arrays["masks"] = arrays["masks"].copy()
  arrays["masks"][3] ^= 0b01000000
  np.savez(path, **arrays)
  assert groups._load_subgroups(g) is None
  path.write_bytes(b"not a zip")
  assert groups._load_subgroups(g) is None
  groups._SUBGROUP_MEMO.pop(g.key, None)


@pytest.mark.parametrize("spec", ["S4", "D6", "Q8"])
def test_permutation_character_counts_fixed_cosets_and_induced_irreps_span(spec):
  g = groups.get(spec)
  irreps = irreps_lib.real_irreps(g)
  table = cosets.coset_tables(g, irreps)
  labels = cosets.coset_labels(g, table.subgroups.masks, "left")
  for h, mask in enumerate(table.subgroups.masks):
    # Brute force: g fixes the coset xH when g·x lies in xH, i.e. has the same label.
    fixed = [len({labels[h, x] for x in range(g.order) if labels[h, g.table[e, x]] == labels[h, x]})
             for e in range(g.order)]
    np.testing.assert_allclose(table.character_AxG[h], fixed, atol=1e-9)
    # Functions constant on left cosets carry Ind_H^G 1: their part in W_ρ has dimension multiplicity · D.
    cosets_of = np.unique(labels[h])
    span_GxC = (labels[h][:, None] == cosets_of[None, :]).astype(np.float64)
    for r, ir in enumerate(irreps):
      rank = np.linalg.matrix_rank(ir.basis.T @ span_GxC, tol=1e-8)
      assert rank == table.induced_AxR[h, r] * ir.dim, (h, ir.name)
    dims = np.asarray([ir.dim for ir in irreps])
    assert table.induced_AxR[h] @ dims == g.order // mask.sum()  # the index [G:H]


def _share_reference(f_SxIxGxN, g, masks):
  """float64 loops: share of variance explained by left and right coset means, per subgroup."""
  s_, i_, _, n_ = f_SxIxGxN.shape
  out = np.zeros((s_, i_, 2, len(masks), n_))
  for h, m in enumerate(masks):
    members = np.flatnonzero(m)
    for k, kind in enumerate(("left", "right")):
      coset_of = [frozenset(g.table[a, members] if kind == "left" else g.table[members, a])
                  for a in range(g.order)]
      for s in range(s_):
        for i in range(i_):
          for n in range(n_):
            f = f_SxIxGxN[s, i, :, n].astype(np.float64)
            proj = np.array([np.mean(f[list(coset_of[a])]) for a in range(g.order)])
            x = f - f.mean()
            out[s, i, k, h, n] = np.sum((proj - f.mean()) ** 2) / np.sum(x * x)
  return out


@pytest.mark.parametrize("spec", ["S3", "D4"])
def test_coset_shares_match_explicit_projection(spec):
  g = groups.get(spec)
  irreps = irreps_lib.real_irreps(g)
  f = _rng(1).normal(size=(2, 2, g.order, 3)).astype(np.float32)
  res = cosets.coset_neurons(f, g, irreps)
  subs = groups.subgroups(g)
  ref = _share_reference(f, g, subs.masks)
  np.testing.assert_allclose(np.asarray(res["share_SxIxYxAxN"]), ref, atol=1e-5)
  np.testing.assert_allclose(ref[:, :, :, 0], 1.0, atol=1e-9)     # the trivial subgroup explains all
  np.testing.assert_allclose(ref[:, :, :, -1], 0.0, atol=1e-9)    # the whole group nothing


def _planted(g, h_index, n_coset, n_random, rng):
  """Left-coset functions of subgroup h for side a, right-coset ones for side b; then random columns."""
  subs = groups.subgroups(g)
  left = cosets.coset_labels(g, subs.masks[h_index:h_index + 1], "left")[0]
  right = cosets.coset_labels(g, subs.masks[h_index:h_index + 1], "right")[0]
  values = rng.normal(size=(g.order, n_coset))
  pa = np.concatenate([values[left], rng.normal(size=(g.order, n_random))], axis=1)
  pb = np.concatenate([rng.normal(size=(g.order, n_coset))[right], rng.normal(size=(g.order, n_random))], axis=1)
  return pa.astype(np.float32), pb.astype(np.float32)


def test_planted_coset_neurons_are_attributed_to_their_subgroup():
  g = groups.get("S4")
  irreps = irreps_lib.real_irreps(g)
  subs = groups.subgroups(g)
  # A non-normal subgroup (a point stabiliser ≅ S3 of order 6), and a normal one (A4).
  for h in (int(np.flatnonzero((subs.orders == 6) & ~subs.normal)[0]), int(np.flatnonzero(subs.orders == 12)[0])):
    rng = _rng(2, h)
    pa, pb = _planted(g, h, 5, 4, rng)
    res = {k: np.asarray(v) for k, v in cosets.coset_neurons(np.stack([pa, pb])[None], g, irreps).items()}
    assert (res["best_SxIxN"][0, :, :5] == h).all()
    assert (res["coset_SxIxN"][0, :, :5]).all() and not res["coset_SxIxN"][0, :, 5:].any()
    if not subs.normal[h]:  # left and right cosets differ: each side is attributed to its own kind
      assert (res["best_kind_SxIxN"][0, 0, :5] == 0).all() and (res["best_kind_SxIxN"][0, 1, :5] == 1).all()
    np.testing.assert_allclose(res["best_share_SxIxN"][0, :, :5], 1.0, atol=1e-5)
    np.testing.assert_allclose(res["induced_share_SxIxN"][0, :, :5], 1.0, atol=1e-5)


def test_planted_mlp_through_the_pipeline():
  """An MLP whose total embeddings are coset functions of one subgroup: the summary names its class."""
  g = groups.get("S4")
  irreps = irreps_lib.real_irreps(g)
  subs = groups.subgroups(g)
  h = int(np.flatnonzero((subs.orders == 8))[0])   # a Sylow 2-subgroup ≅ D4, three conjugates
  n = 6
  rng = _rng(3)
  pa, pb = _planted(g, h, n, 0, rng)
  cfg = group_config(model="mlp", embed_dim=g.order, hidden=n).model
  params = {"embed_a": np.eye(g.order, dtype=np.float32), "embed_b": np.eye(g.order, dtype=np.float32),
            "linear": np.concatenate([pa, pb]), "unembed": rng.normal(size=(n, g.order)).astype(np.float32)}
  params = jax.tree.map(lambda x: x[None], params)
  out = passes.analyze_group(g, irreps, models.stacked(cfg), {0: params},
                               [{"seed": 0}])
  rec = out["runs"][0]["cosets"]
  label = cosets.class_labels(subs)[h]
  assert rec["source"] == "pre_activation"
  for side in "ab":
    assert rec["sides"][side]["by_subgroup"] == {label: n}
  entry = out["aggregate"]["cosets"]["by_subgroup"][label]
  assert (entry["order"], entry["conjugates"], entry["normal"], entry["neurons"]) == (8, 3, False, 2 * n)
  assert entry["induced"] == {"trivial": 1, "2d": 1}  # S4 permutes the 3 cosets of D4 through S3
  assert out["group"]["subgroups"] == 30 and out["group"]["subgroup_classes"] == 11
