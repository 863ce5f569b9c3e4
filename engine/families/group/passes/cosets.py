"""Coset neurons (*Grokking Group Multiplication with Cosets*, Stander et al. 2024): which neurons read their
inputs through the cosets of a subgroup, and how that account meets the irreps one.

A neuron reads input a through a function f_a: G → ℝ. For the MLP, h = ReLU(P_a[a] + P_b[b]) and the
function of a is the column P_a[:, n] itself (the pre-activation is additive, so this is exactly the part
of the neuron's input that depends on a); likewise P_b[:, n] for b. For models without an additive
pre-activation (the transformer) it is the marginal of the activation, f_a(a) = mean_b h(a, b, n), the
orthogonal projection of h onto the functions of a alone.

* **Coset share** of subgroup H for one side, one neuron: the share of the variance of f over G explained by
  membership of the left cosets aH (f's projection on the functions constant on each aH is its mean over the
  coset), and likewise of the right cosets Ha. The trivial subgroup explains everything and the whole group
  nothing; a function constant on the cosets of H is constant on those of every K ≤ H.
* **Best subgroup**: over proper non-trivial subgroups and both coset kinds, the largest *adjusted* share
  1 − (1 − share)(|G| − 1)/(|G| − [G:H]) (the adjusted R² of a regression on [G:H] coset labels: a random
  function scores 0 on every subgroup, so small subgroups with many cosets are not favoured for their
  degrees of freedom); among near ties (1e-4) the larger subgroup, the coarsest partition that explains as
  much. A **coset neuron** is a live neuron whose best subgroup's share reaches the threshold.
* **Induced share**: the functions constant on the left (or right) cosets of H carry the permutation
  representation of G on G/H, Ind_H^G 1, whose character is the number of fixed cosets,
  χ(g) = |G|·|H ∩ cl(g)| / (|cl(g)|·|H|). An irrep ρ occurs in it with multiplicity ⟨χ, χ_ρ⟩/k_ρ (k_ρ = 1, 2, 4
  for real, complex, quaternionic type). A neuron's induced share is the part of its non-constant energy in
  the irreps that occur in Ind_H^G 1 of its best subgroup: 1 for every coset neuron with share 1, and the
  bridge between the two accounts for the others.

All subgroups × both kinds × neurons × runs in one jitted pass: coset indicator matrices ``[Q, G]`` (Q = the
number of cosets of all subgroups) contract with the centred functions, a one-hot ``[Q, H]`` sums the
squared coset sums per subgroup.

Local shape letters:

  A  the subgroups of the group
  Q  the cosets of every subgroup, concatenated (one kind of coset)
  Y  the two kinds of coset: left (aH) and right (Ha)
  J  the conjugacy classes of the group
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from universality.engine import groups as groups_lib
from universality.engine.families.group.passes import representation as rep

DEFAULT_COSET_THRESHOLD = 0.9
KINDS = ("left", "right")
_TIE = 1e-4
_EPS = 1e-12


@dataclasses.dataclass(frozen=True, eq=False)
class CosetTables:
  """The cosets of every subgroup of one group, as arrays the jitted pass takes.

  Attributes:
    subgroups: ``universality.engine.groups.Subgroups``.
    indicator_YxQxG: float32, row q of kind k (left, right) is the indicator of one coset; the cosets of
      subgroup ``subgroup_Q[q]`` partition G for each kind (left and right cosets are counted alike).
    subgroup_Q: int, the subgroup of each coset row.
    character_AxG: float64 permutation character of G on G/H (fixed cosets).
    induced_AxR: int, multiplicity of each irrep in Ind_H^G 1.
    irrep_names: names of the irreps, trivial first.
  """

  subgroups: groups_lib.Subgroups
  indicator_YxQxG: np.ndarray
  subgroup_Q: np.ndarray
  character_AxG: np.ndarray
  induced_AxR: np.ndarray
  irrep_names: tuple[str, ...]


def coset_labels(group: groups_lib.Group, masks_AxG: np.ndarray, kind: str) -> np.ndarray:
  """int ``[A, G]``: the smallest element of a's left coset aH (or right coset Ha), per subgroup."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  n = group.order
  out = np.empty(masks_AxG.shape, np.int64)
  # a·h over all h at once for a block of subgroups: [block, G, G] stays small.
  prod_GxG = group.table if kind == "left" else group.table.T  # prod[a, g] = a·g (left) or g·a (right)
  block = max(1, (1 << 22) // (n * n))
  for lo in range(0, masks_AxG.shape[0], block):
    m = masks_AxG[lo:lo + block]
    out[lo:lo + block] = np.where(m[:, None, :], prod_GxG[None], n).min(axis=2)
  return out


def permutation_character(group: groups_lib.Group, masks_AxG: np.ndarray) -> np.ndarray:
  """float64 ``[A, G]``: the number of cosets xH fixed by g, |G|·|H ∩ cl(g)| / (|cl(g)|·|H|)."""
  classes = group.class_of
  onehot_GxJ = np.eye(len(group.conjugacy_classes))[classes]
  meet_AxJ = masks_AxG.astype(np.float64) @ onehot_GxJ
  size_J = onehot_GxJ.sum(axis=0)
  order_A = masks_AxG.sum(axis=1).astype(np.float64)
  return group.order * meet_AxJ[:, classes] / (size_J[classes][None, :] * order_A[:, None])


def coset_tables(group: groups_lib.Group, irreps, subgroups: groups_lib.Subgroups | None = None
                 ) -> CosetTables:
  """Builds the coset tables of ``group`` (its subgroups from ``universality.engine.groups.subgroups`` unless given)."""
  tables = rep.irrep_tables(group, irreps)
  subs = groups_lib.subgroups(group) if subgroups is None else subgroups
  indicators, owner = [], None
  for kind in KINDS:
    labels_AxG = coset_labels(group, subs.masks, kind)
    rows, who = [], []
    for h, lab in enumerate(labels_AxG):
      reps_ = np.unique(lab)
      rows.append(lab[None, :] == reps_[:, None])
      who += [h] * len(reps_)
    indicators.append(np.concatenate(rows).astype(np.float32))
    owner = np.asarray(who, np.int64) if owner is None else owner
  character = permutation_character(group, subs.masks)
  k_R = np.asarray([{1: 1, 0: 2, -1: 4}[int(f)] for f in tables.frobenius_schur], np.float64)
  mult = character @ tables.character_RxG.T / group.order / k_R[None, :]
  return CosetTables(subgroups=subs, indicator_YxQxG=np.stack(indicators), subgroup_Q=owner,
                     character_AxG=character, induced_AxR=np.rint(mult).astype(np.int64),
                     irrep_names=tables.names)


def coset_neurons(f_SxIxGxN, group: groups_lib.Group, irreps, coset: CosetTables | None = None, *,
                  threshold: float = DEFAULT_COSET_THRESHOLD) -> dict:
  """Coset shares, best subgroup and induced share of every neuron's input functions (module docstring).

  Args:
    f_SxIxGxN: per run, input side I (a, b) and neuron: the function of that input (MLP: P_a, P_b).
    group, irreps: the group and its real irreps (or ``representation.IrrepTables``).
    coset: ``coset_tables(group, irreps)``, built once per group.
    threshold: a neuron side is a coset side when its best subgroup's share reaches this.

  Returns:
    dict of arrays: ``share_SxIxYxAxN`` (K: left, right), ``best_SxIxN`` (subgroup index; -1 when the
    group has no proper non-trivial subgroup or the function is constant), ``best_kind_SxIxN`` (0 left,
    1 right), ``best_share_SxIxN``, ``best_adjusted_SxIxN``, ``coset_SxIxN`` (bool) and
    ``induced_share_SxIxN``.
  """
  tables = rep.irrep_tables(group, irreps)
  coset = coset_tables(group, tables) if coset is None else coset
  f_SxIxGxN = jnp.asarray(f_SxIxGxN)
  chex.assert_rank(f_SxIxGxN, 4)
  if f_SxIxGxN.shape[2] != group.order:
    raise ValueError(f"f: axis G of size {f_SxIxGxN.shape[2]} does not match the group order {group.order}")
  if not 0 < threshold <= 1:
    raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
  subs = coset.subgroups
  n_sub = len(subs)
  onehot_QxA = np.eye(n_sub, dtype=np.float32)[coset.subgroup_Q]
  index_A = (group.order // subs.orders).astype(np.float32)
  induced_AxR = (coset.induced_AxR > 0).astype(np.float32)
  induced_AxR[:, 0] = 0.0  # the constant part is not part of the variance
  return _coset_pass(f_SxIxGxN, jnp.asarray(coset.indicator_YxQxG), jnp.asarray(onehot_QxA),
                     jnp.asarray(subs.orders, jnp.float32), jnp.asarray(index_A),
                     jnp.asarray(subs.proper_nontrivial), jnp.asarray(induced_AxR),
                     jnp.asarray(tables.basis_GxF, jnp.float32), jnp.asarray(tables.basis_member_FxR, jnp.float32),
                     jnp.float32(threshold))


@jax.jit
def _coset_pass(f_SxIxGxN, ind_YxQxG, onehot_QxA, order_A, index_A, proper_A, induced_AxR, basis_GxF,
                member_FxR, threshold):
  g = f_SxIxGxN.shape[2]

  def one_run(f_IxGxN):
    x = f_IxGxN.astype(jnp.float32)
    x = x - x.mean(axis=1, keepdims=True)
    total_IxN = jnp.sum(x * x, axis=1)
    # Projection on coset-constant functions: Σ over cosets of (coset sum)² / |H| is its squared norm.
    sums_IxYxQxN = jnp.einsum("kqg,ign->ikqn", ind_YxQxG, x)
    energy_IxYxAxN = jnp.einsum("ikqn,qh->ikhn", sums_IxYxQxN ** 2, onehot_QxA) / order_A[None, None, :, None]
    live_IxN = total_IxN > _EPS * jnp.maximum(jnp.max(total_IxN), 1.0)
    share = jnp.where(live_IxN[:, None, None, :], energy_IxYxAxN / jnp.maximum(total_IxN, _EPS)[:, None, None, :],
                      0.0)
    share = jnp.clip(share, 0.0, 1.0)
    dof_A = jnp.where(proper_A, (g - 1) / jnp.maximum(g - index_A, 1.0), 0.0)
    adjusted = jnp.where(proper_A[None, None, :, None], 1.0 - (1.0 - share) * dof_A[None, None, :, None],
                         -jnp.inf)
    i, k, h, n = adjusted.shape
    flat_IxKHxN = adjusted.reshape(i, k * h, n)
    top_IxN = flat_IxKHxN.max(axis=1)
    near = flat_IxKHxN >= top_IxN[:, None, :] - _TIE
    size_YA = jnp.tile(order_A, k)
    pick_IxN = jnp.argmax(jnp.where(near, size_YA[None, :, None], -1.0), axis=1)
    best_IxN = pick_IxN % h
    kind_IxN = pick_IxN // h
    has_sub = jnp.any(proper_A)
    valid_IxN = has_sub & live_IxN
    best_share_IxN = jnp.take_along_axis(share.reshape(i, k * h, n), pick_IxN[:, None, :], axis=1)[:, 0]
    best_adj_IxN = jnp.take_along_axis(flat_IxKHxN, pick_IxN[:, None, :], axis=1)[:, 0]
    # Irrep energies of each side's function; the induced share of the best subgroup's Ind_H^G 1.
    coef_IxFxN = jnp.einsum("gm,ign->imn", basis_GxF, x)
    e_IxNxR = jnp.einsum("imn,mr->inr", coef_IxFxN ** 2, member_FxR)
    in_IxNxR = induced_AxR[best_IxN]
    nontrivial_IxN = e_IxNxR[..., 1:].sum(-1)
    induced_IxN = jnp.where(nontrivial_IxN > _EPS, jnp.sum(e_IxNxR * in_IxNxR, -1) / jnp.maximum(nontrivial_IxN,
                                                                                               _EPS), 0.0)
    return {"share_IxYxAxN": share,
            "best_IxN": jnp.where(valid_IxN, best_IxN, -1).astype(jnp.int32),
            "best_kind_IxN": jnp.where(valid_IxN, kind_IxN, -1).astype(jnp.int32),
            "best_share_IxN": jnp.where(valid_IxN, best_share_IxN, 0.0),
            "best_adjusted_IxN": jnp.where(valid_IxN, best_adj_IxN, 0.0),
            "coset_IxN": valid_IxN & (best_share_IxN >= threshold),
            "induced_share_IxN": jnp.where(valid_IxN, induced_IxN, 0.0)}

  # One run at a time: the coset sums [I, K, Q, N] of a run are the pass's largest array.
  out = jax.lax.map(one_run, f_SxIxGxN)
  return {k.replace("_I", "_SxI"): v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# JSON-ready records (universality.engine.families.group.passes.pipeline).


def input_functions(pre_a_SxGxN, pre_b_SxGxN, hidden_SxGxGxN=None, *,
                    marginals=None) -> tuple[np.ndarray, str]:
  """``(f_SxIxGxN, source)``: P_a and P_b when the model has additive pre-activations (``"pre_activation"``),
  else the marginals of the hidden activations over the other input (``"hidden"``): from
  ``hidden_SxGxGxN``, or given as ``marginals`` = (mean over b ``[S, A, N]``, mean over a ``[S, B, N]``)
  by a pass that streams the pairs."""
  if pre_a_SxGxN is not None and pre_b_SxGxN is not None:
    return np.stack([np.asarray(pre_a_SxGxN), np.asarray(pre_b_SxGxN)], axis=1), "pre_activation"
  if marginals is not None:
    return np.stack([np.asarray(m, np.float32) for m in marginals], axis=1), "hidden"
  h = np.asarray(hidden_SxGxGxN, np.float32)
  return np.stack([h.mean(axis=2), h.mean(axis=1)], axis=1), "hidden"


def class_labels(subs: groups_lib.Subgroups) -> list[str]:
  """The label of every subgroup's conjugacy class (``Subgroups.label`` of its first member)."""
  first = {}
  for i, c in enumerate(subs.classes):
    first.setdefault(int(c), i)
  by_class = {c: subs.label(i) for c, i in first.items()}
  return [by_class[int(c)] for c in subs.classes]


def run_records(res: dict, coset: CosetTables, dead_SxN, source: str) -> list[dict]:
  """One record per run: per input side, the share of live neurons that are coset neurons, their best
  coset kind, the subgroup classes they use, and mean best and induced shares."""
  res = {k: np.asarray(v) for k, v in res.items()}
  labels = class_labels(coset.subgroups)
  live_SxN = ~np.asarray(dead_SxN, bool)
  out = []
  for s in range(live_SxN.shape[0]):
    live = live_SxN[s]
    sides = {}
    for i, side in enumerate(("a", "b")):
      is_coset = res["coset_SxIxN"][s, i] & live
      best = res["best_SxIxN"][s, i][is_coset]
      kinds = res["best_kind_SxIxN"][s, i][is_coset]
      by_class: dict[str, int] = {}
      for h in best:
        by_class[labels[h]] = by_class.get(labels[h], 0) + 1
      sides[side] = {
          "coset_neurons": int(is_coset.sum()),
          "coset_fraction": float(is_coset.sum() / max(live.sum(), 1)),
          "left": int(np.sum(kinds == 0)), "right": int(np.sum(kinds == 1)),
          "by_subgroup": dict(sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))),
          "mean_best_share": float(res["best_share_SxIxN"][s, i][live].mean()) if live.any() else None,
          "mean_induced_share": float(res["induced_share_SxIxN"][s, i][live].mean()) if live.any() else None,
      }
    both = res["coset_SxIxN"][s, 0] & res["coset_SxIxN"][s, 1] & live
    same = (coset.subgroups.classes[res["best_SxIxN"][s, 0]] == coset.subgroups.classes[res["best_SxIxN"][s, 1]])
    out.append({"source": source, "sides": sides, "both_sides": int(both.sum()),
                "both_sides_same_class": int(np.sum(both & same))})
  return out


def cohort_record(records: list[dict], coset: CosetTables) -> dict:
  """Over a cohort's runs: per side the mean coset-neuron fraction, and per subgroup class its coset
  neurons (both sides), the runs using it, its order, conjugates, normality and the irreps of Ind_H^G 1."""
  subs = coset.subgroups
  labels = class_labels(subs)
  first = {}
  for i, lab in enumerate(labels):
    first.setdefault(lab, i)
  classes: dict[str, dict] = {}
  for rec in records:
    used = set()
    for side in rec["sides"].values():
      for lab, count in side["by_subgroup"].items():
        if lab not in classes:
          i = first[lab]
          classes[lab] = {
              "order": int(subs.orders[i]), "conjugates": int(np.sum(subs.classes == subs.classes[i])),
              "normal": bool(subs.normal[i]), "neurons": 0, "runs": 0,
              "induced": {n: int(m) for n, m in zip(coset.irrep_names, coset.induced_AxR[i]) if m}}
        classes[lab]["neurons"] += count
        used.add(lab)
    for lab in used:
      classes[lab]["runs"] += 1
  n = max(len(records), 1)
  return {
      "coset_fraction": {side: sum(r["sides"][side]["coset_fraction"] for r in records) / n for side in "ab"},
      "by_subgroup": dict(sorted(classes.items(), key=lambda kv: (-kv[1]["neurons"], kv[0]))),
  }


def task_record(coset: CosetTables, threshold: float) -> dict:
  subs = coset.subgroups
  return {"subgroups": len(subs), "subgroup_classes": int(len(np.unique(subs.classes))),
          "proper_nontrivial": int(subs.proper_nontrivial.sum()), "coset_threshold": float(threshold)}
