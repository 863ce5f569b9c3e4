"""universality.engine.groups: named families, products, generators, tables, and the errors for bad input."""

import itertools

import numpy as np
import pytest

from universality.engine import groups


def _brute_check(g):
  """Axioms and derived fields by plain loops (independent of the vectorised checks)."""
  n = g.order
  t = g.table
  for a, b, c in itertools.product(range(n), repeat=3):
    assert t[t[a, b], c] == t[a, t[b, c]]
  for a in range(n):
    assert t[g.identity, a] == a and t[a, g.identity] == a
    assert t[a, g.inverse[a]] == g.identity
  # Classes partition the group and are closed under conjugation.
  members = np.concatenate(g.conjugacy_classes)
  assert sorted(members.tolist()) == list(range(n))
  for cls in g.conjugacy_classes:
    s = set(cls.tolist())
    for x in cls:
      for h in range(n):
        assert t[t[h, x], g.inverse[h]] in s


ORDERS = {"C1": 1, "C7": 7, "D1": 2, "D4": 8, "D5": 10, "S1": 1, "S3": 6, "S4": 24, "A4": 12, "A5": 60,
          "Q8": 8, "Dic3": 12, "C2xC2xC2": 8, "S3xC3": 18, "C4xC4": 16, "D3xQ8": 48}
N_CLASSES = {"S4": 5, "A4": 4, "A5": 5, "Q8": 5, "D4": 5, "D5": 4, "Dic3": 6, "S3xC3": 9, "C4xC4": 16}


@pytest.mark.parametrize("spec", sorted(ORDERS))
def test_named_groups_orders_and_axioms(spec):
  g = groups.get(spec)
  assert g.order == ORDERS[spec]
  assert g.identity == 0
  if g.order <= 24:
    _brute_check(g)
  if spec in N_CLASSES:
    assert len(g.conjugacy_classes) == N_CLASSES[spec]


def test_large_named_groups():
  assert groups.get("S5").order == 120 and len(groups.get("S5").conjugacy_classes) == 7
  assert groups.get("S6").order == 720 and len(groups.get("S6").conjugacy_classes) == 11
  assert groups.get("D59").order == 118
  assert len(groups.get("D59").conjugacy_classes) == 31  # n odd: 1 + (n-1)/2 + 1


def test_abelian_flags():
  assert groups.get("C4xC4").is_abelian and groups.get("C2xC2xC2").is_abelian
  assert not groups.get("Q8").is_abelian and not groups.get("D3").is_abelian


def test_q8_and_dicyclic_structure():
  q8 = groups.get("Q8")
  # Q8 has exactly one element of order 2 (-1) and six of order 4.
  def order_of(g, a):
    k, x = 1, a
    while x != g.identity:
      x, k = g.table[x, a], k + 1
    return k
  orders = sorted(order_of(q8, a) for a in range(8))
  assert orders == [1, 2, 4, 4, 4, 4, 4, 4]
  assert np.array_equal(groups.get("Dic2").table, q8.table)


def test_from_permutations_generates_s4():
  g = groups.from_permutations([[1, 2, 3, 0], [1, 0, 2, 3]], name="S4p")
  assert g.order == 24 and len(g.conjugacy_classes) == 5
  _brute_check(g)
  assert g.labels[g.identity] == "(0 1 2 3)"


def test_from_table_random_relabelling_is_accepted():
  rng = np.random.default_rng(0)
  g = groups.get("S3")
  perm = rng.permutation(g.order)   # new label of old element i is perm[i]
  inv = np.argsort(perm)
  t = perm[g.table[inv][:, inv]]
  h = groups.from_table(t, name="S3r")
  assert h.identity == perm[g.identity]
  assert sorted(len(c) for c in h.conjugacy_classes) == [1, 2, 3]


@pytest.mark.parametrize("spec", ["S0", "D1x", "Z5", "C-3", "S9", "Q7", "", "C0", "Dic1", "C5xx"])
def test_bad_specs_give_one_line_errors(spec):
  with pytest.raises(groups.GroupError) as err:
    groups.get(spec)
  msg = str(err.value)
  assert "\n" not in msg and "accepted forms" in msg


def test_non_groups_name_the_failed_axiom():
  with pytest.raises(groups.GroupError, match="identity"):
    groups.from_table(np.zeros((3, 3), dtype=int))
  with pytest.raises(groups.GroupError, match="closure"):
    groups.from_table([[0, 1], [1, 2]])
  # A Latin square with identity that is not associative (a loop of order 5).
  loop = np.array([[0, 1, 2, 3, 4], [1, 0, 3, 4, 2], [2, 4, 0, 1, 3], [3, 2, 4, 0, 1], [4, 3, 1, 2, 0]])
  with pytest.raises(groups.GroupError, match="associativity"):
    groups.from_table(loop)
  with pytest.raises(groups.GroupError, match="inverse"):
    groups.from_table([[0, 1, 2], [1, 1, 2], [2, 2, 2]])
  with pytest.raises(groups.GroupError, match="permutation"):
    groups.from_permutations([[0, 0, 1]])
