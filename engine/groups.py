"""Finite groups as multiplication tables.

``get(spec)`` builds the groups researchers name (``C113``, ``D59``, ``S5``, ``A5``, ``Q8``, ``Dic3``,
``C2xC2xC2``); ``from_permutations`` closes a set of permutation generators; ``from_table`` accepts any
Cayley table after checking the group axioms. Every group is a ``Group``: its elements are the integers
``0 .. order-1`` and ``table[a, b]`` is the index of ``a·b``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import os
import re
from typing import Sequence

import numpy as np

from universality.engine import atomic

MAX_ORDER = 6000  # a table of 6000² int32 is 144 MB; larger groups are not tabulated

SPEC_FORMS = ("C<n> (cyclic, n>=1), D<n> (dihedral of the n-gon, order 2n, n>=1), S<n> (symmetric, "
              "1<=n<=7), A<n> (alternating, 1<=n<=7), Q8 (quaternion), Dic<n> (dicyclic, order 4n, "
              "n>=2), and products joined by 'x' such as C2xC2xC2 or S3xC3")


class GroupError(ValueError):
  """A group spec, table or generator set that does not define a finite group."""


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """A finite group given by its Cayley table.

  Attributes:
    name: human-readable name, e.g. ``"S5"`` or ``"C4xC4"``.
    table: int32 array ``[order, order]``; ``table[a, b]`` is the index of ``a·b``.
    identity: index of the identity element (element 0 for every built-in group).
    inverse: int32 array ``[order]``; ``inverse[a]`` is the index of ``a⁻¹``.
    conjugacy_classes: tuple of sorted int arrays, the class of the identity first, then by first element.
    labels: one string per element (a permutation, ``r^k s`` for dihedral, a tuple for products).
  """

  name: str
  table: np.ndarray
  identity: int
  inverse: np.ndarray
  conjugacy_classes: tuple[np.ndarray, ...]
  labels: tuple[str, ...]

  @property
  def order(self) -> int:
    return int(self.table.shape[0])

  @functools.cached_property
  def key(self) -> str:
    """A content hash of the table: equal tables give equal keys (used for on-disk caches)."""
    return hashlib.sha256(np.ascontiguousarray(self.table, dtype=np.int32).tobytes()).hexdigest()[:20]

  @functools.cached_property
  def class_of(self) -> np.ndarray:
    """int array ``[order]``: the index of each element's conjugacy class."""
    out = np.empty(self.order, dtype=np.int32)
    for k, cls in enumerate(self.conjugacy_classes):
      out[cls] = k
    return out

  @property
  def is_abelian(self) -> bool:
    return bool(np.array_equal(self.table, self.table.T))

  def multiply(self, a, b):
    return self.table[a, b]

  def __repr__(self) -> str:
    return f"Group({self.name!r}, order={self.order}, classes={len(self.conjugacy_classes)})"


# ---------------------------------------------------------------------------------------------------
# Building and checking.


def _build(name: str, table: np.ndarray, labels: Sequence[str] | None) -> Group:
  """Checks the group axioms on ``table`` and derives identity, inverses and classes."""
  table = np.asarray(table)
  if table.ndim != 2 or table.shape[0] != table.shape[1] or table.shape[0] == 0:
    raise GroupError(f"not a group: table must be a non-empty square matrix, got shape {table.shape}")
  n = table.shape[0]
  if n > MAX_ORDER:
    raise GroupError(f"group order {n} exceeds the tabulation limit {MAX_ORDER}")
  if not np.issubdtype(table.dtype, np.integer):
    raise GroupError(f"not a group: table entries must be integers, got dtype {table.dtype}")
  if table.min() < 0 or table.max() >= n:
    raise GroupError(f"not a group: closure fails, entries must lie in [0, {n - 1}]")
  table = table.astype(np.int32)
  arange = np.arange(n)
  ids = np.flatnonzero((table == arange[None, :]).all(axis=1) & (table == arange[:, None]).all(axis=0))
  if ids.size == 0:
    raise GroupError("not a group: identity fails, no element e with e·a = a·e = a for all a")
  e = int(ids[0])
  left = table == e
  if not (left.sum(axis=1) == 1).all() or not (left.sum(axis=0) == 1).all():
    a = int(np.flatnonzero(left.sum(axis=1) != 1)[0]) if not (left.sum(axis=1) == 1).all() else int(
        np.flatnonzero(left.sum(axis=0) != 1)[0])
    raise GroupError(f"not a group: inverse fails for element {a}")
  inverse = np.argmax(left, axis=1).astype(np.int32)
  if not (table[arange, inverse] == e).all() or not (table[inverse, arange] == e).all():
    a = int(np.flatnonzero(table[inverse, arange] != e)[0])
    raise GroupError(f"not a group: inverse fails, element {a} has no two-sided inverse")
  _check_associative(table)
  classes = _conjugacy_classes(table, inverse, e)
  if labels is None:
    labels = tuple(str(i) for i in range(n))
  if len(labels) != n:
    raise GroupError(f"{len(labels)} labels for a group of order {n}")
  return Group(name=name, table=table, identity=e, inverse=inverse, conjugacy_classes=classes,
               labels=tuple(labels))


def _check_associative(table: np.ndarray) -> None:
  """Light's test: (x·g)·y = x·(g·y) for g in a generating set implies associativity everywhere."""
  n = table.shape[0]
  reached = np.zeros(n, dtype=bool)
  gens: list[int] = []
  while not reached.all():
    g = int(np.flatnonzero(~reached)[0])
    gens.append(g)
    frontier = [g] if not reached[g] else []
    reached[g] = True
    # Closure under right multiplication by all generators found so far.
    frontier = np.flatnonzero(reached)
    while frontier.size:
      prods = table[np.ix_(frontier, np.asarray(gens))].ravel()
      new = np.unique(prods[~reached[prods]])
      reached[new] = True
      frontier = new
  for g in gens:
    lhs = table[table[:, g]][:, :]  # lhs[x, y] = (x·g)·y
    rhs = table[:, table[g, :]]     # rhs[x, y] = x·(g·y)
    bad = np.argwhere(lhs != rhs)
    if bad.size:
      x, y = (int(v) for v in bad[0])
      raise GroupError(f"not a group: associativity fails, ({x}·{g})·{y} != {x}·({g}·{y})")


def _conjugacy_classes(table: np.ndarray, inverse: np.ndarray, e: int) -> tuple[np.ndarray, ...]:
  n = table.shape[0]
  seen = np.zeros(n, dtype=bool)
  classes = []
  for a in itertools.chain([e], range(n)):
    if seen[a]:
      continue
    cls = np.unique(table[table[:, a], inverse])  # g·a·g⁻¹ for every g
    seen[cls] = True
    classes.append(cls.astype(np.int32))
  return tuple(classes)


def from_table(table, name: str = "G", labels: Sequence[str] | None = None) -> Group:
  """A group from its Cayley table (``table[a, b]`` = index of a·b); the axioms are verified."""
  return _build(name, np.asarray(table), labels)


def from_permutations(generators, name: str = "G") -> Group:
  """The permutation group generated by ``generators`` (each a sequence, ``p[i]`` is the image of ``i``).

  Permutations compose right to left: ``(p·q)[i] = p[q[i]]``. Element 0 is the identity; the others are
  in breadth-first order from the generators, so the numbering is deterministic.
  """
  gens = [tuple(int(v) for v in g) for g in generators]
  if not gens:
    raise GroupError("from_permutations needs at least one generator")
  m = len(gens[0])
  for g in gens:
    if len(g) != m or sorted(g) != list(range(m)):
      raise GroupError(f"generator {list(g)} is not a permutation of 0..{m - 1}")
  ident = tuple(range(m))
  index = {ident: 0}
  elems = [ident]
  frontier = [ident]
  while frontier:
    nxt = []
    for p in frontier:
      for g in gens:
        q = tuple(p[i] for i in g)  # p·g
        if q not in index:
          if len(elems) >= MAX_ORDER:
            raise GroupError(f"generated group exceeds the tabulation limit {MAX_ORDER}")
          index[q] = len(elems)
          elems.append(q)
          nxt.append(q)
    frontier = nxt
  perms = np.asarray(elems, dtype=np.int64)  # [n, m]
  keyer = _PermIndexer(perms)
  # table[a, b] = index of perms[a] ∘ perms[b], i.e. (a·b)[i] = a[b[i]].
  table = np.stack([keyer(perms[a][perms]) for a in range(len(elems))]).astype(np.int32)
  labels = tuple("(" + " ".join(map(str, p)) + ")" for p in elems)
  return _build(name, table, labels)


class _PermIndexer:
  """Maps rows of permutations to their element index with a vectorised base-m encoding."""

  def __init__(self, perms: np.ndarray):
    m = perms.shape[1]
    self.weights = (m ** np.arange(m, dtype=np.int64)).astype(np.int64) if m <= 15 else None
    if self.weights is None:
      self.lookup = {tuple(p): i for i, p in enumerate(perms.tolist())}
    else:
      codes = perms @ self.weights
      self.order = np.argsort(codes)
      self.sorted_codes = codes[self.order]

  def __call__(self, rows: np.ndarray) -> np.ndarray:
    if self.weights is None:
      return np.asarray([self.lookup[tuple(r)] for r in rows.tolist()], dtype=np.int32)
    codes = rows @ self.weights
    pos = np.searchsorted(self.sorted_codes, codes)
    return self.order[pos].astype(np.int32)


# ---------------------------------------------------------------------------------------------------
# Named families.


def cyclic(n: int) -> Group:
  a = np.arange(n)
  return _build(f"C{n}", (a[:, None] + a[None, :]) % n, [f"r^{k}" for k in range(n)])


def dihedral(n: int) -> Group:
  """Symmetries of the regular n-gon, order 2n: element k + n·f is r^k s^f."""
  idx = np.arange(2 * n)
  k, f = idx % n, idx // n
  sign = 1 - 2 * f[:, None]                      # (-1)^f1
  k_out = (k[:, None] + sign * k[None, :]) % n   # r^k1 s^f1 r^k2 s^f2 = r^(k1 + (-1)^f1 k2) s^(f1+f2)
  f_out = (f[:, None] + f[None, :]) % 2
  labels = [f"r^{kk}" + (" s" if ff else "") for kk, ff in zip(k, f)]
  return _build(f"D{n}", k_out + n * f_out, labels)


def dicyclic(n: int) -> Group:
  """⟨a, x | a^2n = 1, x² = a^n, x a x⁻¹ = a⁻¹⟩, order 4n: element k + 2n·f is a^k x^f."""
  m = 2 * n
  idx = np.arange(2 * m)
  k, f = idx % m, idx // m
  k1, f1, k2, f2 = k[:, None], f[:, None], k[None, :], f[None, :]
  k_out = np.where(f1 == 0, k1 + k2, k1 - k2 + n * f2) % m   # x a^k2 = a^-k2 x, x² = a^n
  f_out = (f1 + f2) % 2
  labels = [f"a^{kk}" + (" x" if ff else "") for kk, ff in zip(k, f)]
  return _build(f"Dic{n}" if n != 2 else "Q8", k_out + m * f_out, labels)


def symmetric(n: int) -> Group:
  perms = list(itertools.permutations(range(n)))
  return _from_perm_list(f"S{n}", perms)


def alternating(n: int) -> Group:
  perms = [p for p in itertools.permutations(range(n)) if _parity(p) == 0]
  return _from_perm_list(f"A{n}", perms)


def _parity(p: Sequence[int]) -> int:
  p = list(p)
  parity = 0
  for i in range(len(p)):
    while p[i] != i:
      j = p[i]
      p[i], p[j] = p[j], p[i]
      parity ^= 1
  return parity


def _from_perm_list(name: str, perms: list[tuple[int, ...]]) -> Group:
  """A group from the full list of its permutations (sorted lexicographically, identity first)."""
  arr = np.asarray(perms, dtype=np.int64).reshape(len(perms), -1)
  keyer = _PermIndexer(arr)
  table = np.stack([keyer(arr[a][arr]) for a in range(len(perms))]).astype(np.int32)
  labels = tuple("(" + " ".join(map(str, p)) + ")" for p in perms)
  return _build(name, table, labels)


def direct_product(g: Group, h: Group, name: str | None = None) -> Group:
  """G × H; element i·|H| + j is the pair (g_i, h_j)."""
  ng, nh = g.order, h.order
  table = (g.table[:, None, :, None] * nh + h.table[None, :, None, :]).reshape(ng * nh, ng * nh)
  labels = [f"({a}, {b})" for a in g.labels for b in h.labels]
  return _build(name or f"{g.name}x{h.name}", table, labels)


_FACTOR = re.compile(r"^(C|D|S|A|Dic|Q)(\d+)$")


def _bad_spec(spec: str, why: str) -> GroupError:
  return GroupError(f"bad group spec {spec!r}: {why}; accepted forms: {SPEC_FORMS}")


def _factor_order(kind: str, n: int) -> int:
  return {"C": n, "D": 2 * n, "S": math.factorial(min(n, 20)), "A": max(1, math.factorial(min(n, 20)) // 2),
          "Dic": 4 * n, "Q": n}[kind]


def parse(spec: str) -> list[tuple[str, int]]:
  """Splits a spec like ``"S3xC3"`` into ``[("S", 3), ("C", 3)]``, validating each factor."""
  if not isinstance(spec, str) or not spec.strip():
    raise _bad_spec(str(spec), "empty spec")
  parts = spec.strip().replace("×", "x").split("x")
  factors = []
  total = 1
  for part in parts:
    m = _FACTOR.match(part)
    if not m:
      raise _bad_spec(spec, f"cannot read factor {part!r}")
    kind, n = m.group(1), int(m.group(2))
    if kind == "Q" and n != 8:
      raise _bad_spec(spec, "only Q8 is a named quaternion group (use Dic<n> for generalised ones)")
    if kind in ("C", "D", "S", "A") and n < 1:
      raise _bad_spec(spec, f"{kind}{n} needs n >= 1")
    if kind == "Dic" and n < 2:
      raise _bad_spec(spec, "Dic<n> needs n >= 2")
    total *= _factor_order(kind, n)
    if total > MAX_ORDER:
      raise _bad_spec(spec, f"order exceeds the tabulation limit {MAX_ORDER}")
    factors.append((kind, n))
  return factors


def canonical(spec: str) -> str:
  """The spelling of ``spec`` that ``get`` names the group by: ASCII digits without leading zeros, factors
  joined by ``x`` ("C05", "C\uff15" and " C5" are all "C5")."""
  return "x".join(f"{kind}{n}" for kind, n in parse(spec))


def duplicates(specs: Sequence[str]) -> list[tuple[str, str]]:
  """Pairs ``(earlier, later)`` of specs that name one group: the same canonical spelling, or the same
  Cayley table (compared only between specs of equal order, so nothing large is built needlessly)."""
  out, seen = [], {}
  for spec in specs:
    key = canonical(spec)
    if key in seen:
      out.append((seen[key], spec))
      continue
    order = order_of(spec)
    twin = next((s for c, s in seen.items() if order_of(c) == order and get(c).key == get(key).key), None)
    if twin is not None:
      out.append((twin, spec))
      continue
    seen[key] = spec
  return out


def order_of(spec: str) -> int:
  """The order of the group named by ``spec``, from the spec alone (nothing is tabulated)."""
  return math.prod(_factor_order(kind, n) for kind, n in parse(spec))


@functools.lru_cache(maxsize=64)
def get(spec: str) -> Group:
  """The group named by ``spec``: ``C<n>``, ``D<n>`` (order 2n), ``S<n>``, ``A<n>``, ``Q8``, ``Dic<n>``,
  or a direct product such as ``C2xC2xC2``. Raises ``GroupError`` with the accepted forms otherwise."""
  factors = parse(spec)
  built = [_named(kind, n) for kind, n in factors]
  out = built[0]
  for h in built[1:]:
    out = direct_product(out, h)
  if len(built) > 1:
    out = dataclasses.replace(out, name=spec.strip().replace("×", "x"))
  return out


@functools.lru_cache(maxsize=64)
def _named(kind: str, n: int) -> Group:
  if kind == "C":
    return cyclic(n)
  if kind == "D":
    return dihedral(n)
  if kind == "S":
    return symmetric(n)
  if kind == "A":
    return alternating(n)
  if kind == "Q":
    return dicyclic(2)
  return dicyclic(n)


# ---------------------------------------------------------------------------------------------------
# Subgroups.

SUBGROUPS_FORMAT = "universality.engine.groups.subgroups/1"  # bump when the enumeration or the file layout changes


@dataclasses.dataclass(frozen=True, eq=False)
class Subgroups:
  """Every subgroup of a group, the trivial one and the whole group included.

  Attributes:
    masks: bool ``[H, G]``, row i the members of subgroup i; sorted by order, then by members.
    orders: int ``[H]`` subgroup orders; ``index = |G| / order``.
    classes: int ``[H]`` conjugacy class of each subgroup, numbered in the order of the sorted subgroups.
    normal: bool ``[H]``, subgroups equal to all their conjugates.
    cyclic, abelian: bool ``[H]``.
  """

  masks: np.ndarray
  orders: np.ndarray
  classes: np.ndarray
  normal: np.ndarray
  cyclic: np.ndarray
  abelian: np.ndarray

  def __len__(self) -> int:
    return int(self.masks.shape[0])

  @property
  def proper_nontrivial(self) -> np.ndarray:
    """bool ``[H]``: neither the trivial subgroup nor the whole group."""
    return (self.orders > 1) & (self.orders < self.masks.shape[1])

  def label(self, i: int) -> str:
    """A short name of subgroup ``i``'s conjugacy class: ``C4`` (cyclic), ``ab8`` (abelian), ``H12``,
    and ``#k`` (the class number) when the order does not single the class out."""
    n = int(self.orders[i])
    kind = f"C{n}" if self.cyclic[i] else (f"ab{n}" if self.abelian[i] else f"H{n}")
    same = {int(c) for c, o, cy, ab in zip(self.classes, self.orders, self.cyclic, self.abelian)
            if o == n and cy == self.cyclic[i] and ab == self.abelian[i]}
    return kind if len(same) == 1 else f"{kind}#{int(self.classes[i])}"


def element_orders(group: Group) -> np.ndarray:
  """int ``[G]``: the order of every element (vectorised powers)."""
  n = group.order
  out = np.zeros(n, np.int64)
  power = np.arange(n)
  for k in range(1, n + 1):
    power = group.table[power, np.arange(n)] if k > 1 else power
    hit = (power == group.identity) & (out == 0)
    out[hit] = k
    if (out > 0).all():
      break
  return out


def _closure(table: np.ndarray, gens: Sequence[int], e: int) -> np.ndarray:
  """bool ``[G]``: the subgroup generated by ``gens`` (breadth-first from e by right multiplication)."""
  mask = np.zeros(table.shape[0], bool)
  mask[e] = True
  frontier = np.asarray([e])
  gens = np.asarray(list(gens), np.int64)
  if gens.size == 0:
    return mask
  while frontier.size:
    prods = table[np.ix_(frontier, gens)].ravel()
    new = np.unique(prods[~mask[prods]])
    mask[new] = True
    frontier = new
  return mask


def _is_prime_power(n: int) -> bool:
  if n < 2:
    return False
  p = next(d for d in range(2, n + 1) if n % d == 0)
  while n % p == 0:
    n //= p
  return n == 1


def _enumerate_subgroups(group: Group) -> tuple[np.ndarray, np.ndarray]:
  """Masks ``[H, G]`` and conjugacy classes of all subgroups, by cyclic extension up to conjugacy.

  Every subgroup is generated by its elements of prime-power order, so every subgroup is the end of a chain
  1 = K₀ < K₁ < … with K_i = ⟨K_{i−1}, z_i⟩ and z_i of prime-power order. Extending one representative of
  each conjugacy class of subgroups by every cyclic subgroup of prime-power order, and adding a new
  subgroup together with all its conjugates, therefore reaches every subgroup; the joins cost
  (classes × prime-power cyclic subgroups) closures instead of (subgroups × elements).
  """
  table, e, n = group.table, group.identity, group.order
  inv = group.inverse
  # conj_inv[g, x] = g⁻¹ x g, so K[conj_inv[g]] is the mask of g K g⁻¹.
  conj_inv = table[table[inv[:, None], np.arange(n)[None, :]], np.arange(n)[:, None]]
  orders = element_orders(group)
  zuppos, seen = [], set()
  for z in np.flatnonzero([_is_prime_power(int(o)) for o in orders]):
    m = _closure(table, [int(z)], e)
    k = np.packbits(m).tobytes()
    if k not in seen:
      seen.add(k)
      zuppos.append(int(z))
  trivial = np.zeros(n, bool)
  trivial[e] = True
  found = {np.packbits(trivial).tobytes(): 0}
  masks = [trivial]
  classes = [0]
  reps: list[tuple[np.ndarray, list[int]]] = [(trivial, [])]
  done = 0
  while done < len(reps):
    mask, gens = reps[done]
    done += 1
    for z in zuppos:
      if mask[z]:
        continue
      k_mask = _closure(table, gens + [z], e)
      if np.packbits(k_mask).tobytes() in found:
        continue
      cls = len(reps)
      conjugates = np.unique(k_mask[conj_inv], axis=0)
      for c in conjugates:
        found[np.packbits(c).tobytes()] = len(masks)
        masks.append(c)
        classes.append(cls)
      reps.append((k_mask, gens + [z]))
  return np.stack(masks), np.asarray(classes, np.int64)


def _describe_subgroups(group: Group, masks: np.ndarray, classes: np.ndarray) -> Subgroups:
  """Sorts the subgroups (order, then members), renumbers their classes and derives the flags."""
  sizes = masks.sum(axis=1)
  packed = np.packbits(masks, axis=1)
  # Members as a sort key: sets with smaller elements first (packbits is big-endian per byte).
  key = [tuple(-packed[i]) for i in range(len(masks))]
  order = sorted(range(len(masks)), key=lambda i: (int(sizes[i]), key[i]))
  masks, classes, sizes = masks[order], classes[order], sizes[order]
  renumber: dict[int, int] = {}
  for c in classes:
    renumber.setdefault(int(c), len(renumber))
  classes = np.asarray([renumber[int(c)] for c in classes], np.int64)
  class_size = np.bincount(classes)
  orders = element_orders(group)
  table = group.table
  cyclic = np.asarray([bool((orders[m] == s).any()) for m, s in zip(masks, sizes)])
  abelian = np.asarray([bool(np.array_equal(table[np.ix_(np.flatnonzero(m), np.flatnonzero(m))],
                                            table[np.ix_(np.flatnonzero(m), np.flatnonzero(m))].T))
                        for m in masks])
  return Subgroups(masks=masks, orders=sizes.astype(np.int64), classes=classes,
                   normal=class_size[classes] == 1, cyclic=cyclic, abelian=abelian)


_SUBGROUP_MEMO: dict[str, Subgroups] = {}


def subgroups(group: Group | str, cache: bool = True) -> Subgroups:
  """All subgroups of ``group`` (a ``Group`` or a spec for ``get``), cached in memory and on disk
  (``$UNIVERSALITY_CACHE/subgroups``, one validated npz per group key). Counts: Q8 6, S4 30, A5 59, S5 156,
  D_n τ(n) + σ(n) — the trivial subgroup and the whole group included."""
  if isinstance(group, str):
    group = get(group)
  if not cache:
    return _describe_subgroups(group, *_enumerate_subgroups(group))
  if group.key not in _SUBGROUP_MEMO:
    subs = _load_subgroups(group)
    if subs is None:
      subs = _describe_subgroups(group, *_enumerate_subgroups(group))
      _save_subgroups(group, subs)
    _SUBGROUP_MEMO[group.key] = subs
  return _SUBGROUP_MEMO[group.key]


def subgroups_cache_dir() -> str:
  """``$UNIVERSALITY_CACHE/subgroups`` (default ``~/.cache/universality-engine/subgroups``)."""
  root = os.environ.get("UNIVERSALITY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "universality-engine")
  return os.path.join(root, "subgroups")


def _subgroups_path(group: Group) -> str:
  return os.path.join(subgroups_cache_dir(), f"{group.key}.npz")


def _save_subgroups(group: Group, subs: Subgroups) -> None:
  atomic.write_cache(_subgroups_path(group), {
      "format": np.asarray(SUBGROUPS_FORMAT), "key": np.asarray(group.key), "order": np.asarray(group.order),
      "masks": np.packbits(subs.masks, axis=1), "classes": subs.classes})


def _load_subgroups(group: Group) -> Subgroups | None:
  """The cached subgroups, or None when the file is missing, damaged or fails validation."""
  path = _subgroups_path(group)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if str(z["format"]) != SUBGROUPS_FORMAT or str(z["key"]) != group.key or int(z["order"]) != group.order:
        return None
      masks = np.unpackbits(z["masks"], axis=1, count=group.order).astype(bool)
      classes = np.asarray(z["classes"], np.int64)
    if classes.shape != (masks.shape[0],) or not _are_distinct_subgroups(group, masks):
      return None
    return _describe_subgroups(group, masks, classes)
  except Exception:  # noqa: BLE001 -- any damage (truncated zip, bad dtype, failed check) means recompute
    return None


def _are_distinct_subgroups(group: Group, masks: np.ndarray) -> bool:
  """Every row holds the identity, is closed under products, and no two rows are equal."""
  if masks.ndim != 2 or masks.shape[1] != group.order or not masks[:, group.identity].all():
    return False
  if len(np.unique(np.packbits(masks, axis=1), axis=0)) != len(masks):
    return False
  for m in masks:
    members = np.flatnonzero(m)
    if not m[group.table[np.ix_(members, members)]].all():
      return False
  return True
