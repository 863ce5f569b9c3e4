"""The whole analysis of the runs of one group: per-run records and per-group aggregates, as plain JSON.

``analyze_group(group, irreps, apply_fn, matrices_fn, params_by_step, runs, key=...)`` evaluates every
checkpoint on all |G|² pairs, runs the passes of ``representation`` and ``cross_seed`` and returns::

  {"group": {...}, "runs": [record, ...], "aggregate": {...}}

Every number is a Python float/int (non-finite values become ``None``); irreps are named by
``Irrep.name``; ``S×S`` matrices are nested lists in the order of ``runs``.

``group``:
  ``name``, ``order``; ``irreps``: list of {``name``, ``dim``, ``frobenius_schur``} (trivial first);
  ``steps``: the checkpoint steps analysed (ascending; the last is the final step of every record);
  ``key_threshold``: the key-irrep threshold on the final logit similarity; ``order_threshold``: the
  learning-order threshold; ``universal_threshold``; ``subgroups``, ``subgroup_classes``,
  ``proper_nontrivial`` (counts of subgroups of the group and their conjugacy classes), ``coset_threshold``;
  ``single_threshold``; ``predicted_coverage``: the max-margin irrep coverage where the margin paper states
  it (cyclic groups: 1), else None.

``runs[i]`` (one per run, in the order of ``runs``):
  ``run``: the run's description as given (e.g. the runs.json row).
  ``loss_all``, ``accuracy_all``: cross-entropy and accuracy over all |G|² pairs at the final step.
  ``logit_similarity``: {irrep: mean cosine between centred logits and tr ρ(a·b·c⁻¹)} at the final step.
  ``fraction_explained``: Σ over non-trivial irreps of similarity²; ``fraction_explained_key``: the same
    sum over key irreps only.
  ``generalised``: as given (``generalised``; True when not given).
  ``key_irreps``: irreps with final similarity > ``key_threshold``, in the irreps' order.
  ``learning_order``: {irrep: first checkpoint step with similarity > ``order_threshold``, or None if never}.
  ``key_irreps_in_order``: key irreps sorted by that step (ties: larger similarity at that step first; key
    irreps that never crossed it last); ``first_learned``: the first of them that crossed it (None if none).
  ``similarity_by_step``: {irrep: [similarity at each of ``group.steps``]}.
  ``fve``: {matrix: {irrep: fraction of its squared norm in that irrep's span}} for ``embed_a``,
    ``embed_b``, ``unembed`` (rows c), ``pre_a``/``pre_b`` (total embeddings, when ``matrices_fn`` gives
    them) and ``hidden`` (the hidden layer over all pairs projected on functions of a·b; its sum over irreps
    is ``fve_hidden_ab_total``, the share of the hidden layer that is a function of a·b).
  ``losses``: (MLP, when ``pre_a``/``pre_b`` are given) {``full``, ``restricted`` (key irreps only),
    ``excluded`` (key irreps removed), ``excluded_each``: {irrep: loss with that irrep removed}}, else None.
  ``neurons``: {``source``: ``"pre_activation"`` (P_a[a] + P_b[b]) or ``"hidden"`` (activations as
    functions of a·b, for models without additive pre-activations), ``dead``: number of constant neurons,
    ``dominant_counts``: {irrep: live neurons whose dominant non-trivial irrep it is},
    ``mean_dominant_share``: mean over live neurons of the dominant irrep's share of the non-constant part,
    ``in_key_irreps``: fraction of live neurons whose dominant irrep is a key irrep of this run,
    ``universal_fraction``: live neurons with excess correlation > ``universal_threshold`` (None for S = 1),
    ``mean_excess``: their mean excess correlation}.
  ``margins`` (``universality.engine.families.group.passes.margins``; None for models without additive pre-activations):
    {``margin_by_step``, ``normalised_margin_by_step`` (at each of ``group.steps``), ``margin``,
    ``normalised_margin``, ``norm`` (‖θ_eff‖^ν) at the final step, ``single_irrep_fraction`` (of live
    neurons), ``irrep_coverage`` and ``covered_irreps`` (non-trivial irreps with a single-irrep neuron)}.
  ``redundancy`` (``universality.engine.families.group.passes.redundancy``; MLP, else None): {``width``, ``never_active``, ``merges``,
    ``feature_complexity`` (neurons left after iterative feature merging), ``loss`` and ``merged_loss`` on
    all pairs}.
  ``cosets`` (``universality.engine.families.group.passes.cosets``): {``source``: ``"pre_activation"`` (P_a, P_b) or ``"hidden"``
    (marginals of the activation), ``sides``: {``a``, ``b``: {``coset_neurons``, ``coset_fraction`` (of live
    neurons), ``left`` / ``right`` (coset neurons by best coset kind), ``by_subgroup``: {subgroup class:
    coset neurons}, ``mean_best_share``, ``mean_induced_share`` (over live neurons)}}, ``both_sides``:
    neurons that are coset neurons on both sides, ``both_sides_same_class``: of them, those whose two best
    subgroups are conjugate}.

``aggregate`` (over the runs of the group):
  ``n_runs``; ``n_generalised``; ``not_generalised``: positions (in ``runs``) of the runs that did not
  generalise. Over the generalised runs only (an unconverged run has a trace of every irrep, so at the
  paper's key threshold it lists them all): ``key_irrep_counts``: {irrep: runs in which it is key} (the
  paper's table); ``key_irrep_sets``: [{``irreps``: [...], ``count``}] most frequent first;
  ``first_learned_counts``: {irrep: runs that learned it first}. Over all runs: ``mean_fraction_explained``,
  ``mean_loss_all``.
  ``correlation`` (S ≥ 2, else None): ``mean_max``, ``mean_baseline_max`` (over live neurons and other runs),
  ``mean_excess``, ``universal_fraction`` (over all live neurons), ``excess_histogram`` {``edges``,
  ``counts``}, ``irrep_agreement`` / ``irrep_agreement_universal``: {``rate``, ``chance``, ``count``} (does a
  neuron's best match in another run share its dominant irrep; the second over universal neurons only).
  ``matching`` (S ≥ 2): ``mean_matched_corr`` S×S (Hungarian one-to-one matching; 1 on the diagonal) and
  ``mean_offdiagonal``.
  ``margins`` (None without margins): ``mean_normalised_margin``, ``positive_margin_runs``,
  ``mean_single_irrep_fraction``, ``mean_irrep_coverage`` and ``mean_irrep_coverage_generalised``.
  ``redundancy`` (MLP, else None): ``mean_feature_complexity`` (all runs), ``_generalised``, and
  ``feature_complexity_by_key_irreps``: {number of key irreps: mean feature complexity of the generalised
  runs with that many}.
  ``connectivity`` (``universality.engine.families.group.passes.connectivity``; MLP with S ≥ 2, else None): {``points``, ``weights``
  (what is interpolated), ``key_irrep_jaccard`` S×S, ``alignments``: {``raw``, ``activation``, ``weight``:
  {``barrier`` S×S, ``mean_barrier``, ``mean_barrier_same_key_irreps`` / ``_different_key_irreps`` and
  ``pairs_same_key_irreps`` / ``pairs_different_key_irreps`` (over pairs of generalised runs),
  ``mean_loss_path`` (over pairs, at each path point), ``mean_min_accuracy`` (lowest accuracy on the path)}}}.
  ``cosets``: {``coset_fraction``: {``a``, ``b``: mean over runs}, ``by_subgroup``: {class: {``order``,
  ``conjugates``, ``normal``, ``neurons`` (coset neurons of all runs, both sides), ``runs``, ``induced``:
  {irrep: multiplicity in Ind_H^G 1}}}}.
  ``cka``, ``procrustes``, ``mutual_knn``: S×S matrices of the hidden representations on all pairs, and
  ``mean_offdiagonal`` of each under ``similarity_means``.

Memory. The logits of all pairs are S·|G|³ floats (1.5 GB per run for S6) and are never held: each
checkpoint is one streamed pass (``stream_all_pairs``) over blocks of pairs, every run at once, whose size
``pair_chunk`` sets from ``memory_bytes`` (the last block padded, so each jitted function compiles once).
A block adds what every statistic needs to running sums: per-pair logit-similarity cosines, cross-entropy,
correct pairs, the minimum margin; at the final step also the hidden layer summed per fibre a·b = m, per a
and per b (O(S·|G|·N): hidden FVE, the hidden-source neuron split and coset marginals) and the co-moments
of all S·N neurons (Chan's merge, ``universality.kernels.correlation``; (S·N)² floats, independent of |G|: live
neurons, correlations and their baseline, matching, CKA, Procrustes). The mutual k-NN alignment evaluates
only its subsample of pairs. The weight-based losses (restricted / excluded, feature merging, mode
connectivity) go through ``representation.mlp_loss`` in blocks of rows of a and of runs sized by the same
budget. So peak memory is the budget plus O(S·|G|·N + (S·N)²), not S·|G|³.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from universality.engine import groups as groups_lib
from universality.engine.families.group.passes import connectivity as connectivity_lib
from universality.engine.families.group.passes import cosets as cosets_lib
from universality.engine.analysis import cross_seed
from universality.engine.families.group.passes import margins as margins_lib
from universality.engine.families.group.passes import redundancy as redundancy_lib
from universality.engine.families.group.passes import representation as rep
from universality.engine.analysis.jsonable import to_json
from universality.kernels import correlation as correlation_lib

ApplyFn = Callable[[Any, Any, Any], tuple[Any, Any]]


def _run_description(run) -> Any:
  if isinstance(run, Mapping):
    return dict(run)
  if hasattr(run, "_asdict"):
    return dict(run._asdict())
  return str(run)


def evaluate_all_pairs(apply_fn: ApplyFn, params_S, n_runs: int, order: int,
                       batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Logits ``[S, G, G, G]`` (padded classes sliced off) and hidden ``[S, G, G, N]`` on all pairs.

  ``batch_size`` bounds the pairs per ``apply_fn`` call (all |G|² at once when None).
  """
  a_P = np.repeat(np.arange(order, dtype=np.int32), order)
  b_P = np.tile(np.arange(order, dtype=np.int32), order)
  step = a_P.size if not batch_size else int(batch_size)
  logits, hidden = [], []
  for lo in range(0, a_P.size, step):
    a_SxB = np.broadcast_to(a_P[lo:lo + step], (n_runs, min(step, a_P.size - lo)))
    b_SxB = np.broadcast_to(b_P[lo:lo + step], a_SxB.shape)
    lg, hd = apply_fn(params_S, a_SxB, b_SxB)
    lg, hd = np.asarray(lg), np.asarray(hd)
    if lg.ndim != 3 or lg.shape[:2] != a_SxB.shape or lg.shape[2] < order:
      raise ValueError(f"apply_fn must return logits [{n_runs}, B, V>={order}], got {lg.shape}")
    if hd.ndim != 3 or hd.shape[:2] != a_SxB.shape:
      raise ValueError(f"apply_fn must return hidden [{n_runs}, B, N], got {hd.shape}")
    logits.append(lg[..., :order].astype(np.float32))
    hidden.append(hd.astype(np.float32))
  logits_SxPxC = np.concatenate(logits, axis=1)
  hidden_SxPxN = np.concatenate(hidden, axis=1)
  return (logits_SxPxC.reshape(n_runs, order, order, order),
          hidden_SxPxN.reshape(n_runs, order, order, -1))


@jax.jit
def _loss_accuracy(logits_SxAxBxC, table):
  logp = jax.nn.log_softmax(logits_SxAxBxC, axis=-1)
  target = jnp.broadcast_to(table[None, :, :, None], logp.shape[:3] + (1,))
  loss_S = -jnp.take_along_axis(logp, target, axis=-1).mean(axis=(1, 2, 3))
  acc_S = (jnp.argmax(logp, axis=-1) == table[None]).mean(axis=(1, 2))
  return loss_S, acc_S


# ---------------------------------------------------------------------------------------------------
# The streamed all-pairs pass: blocks of pairs, never S·|G|³ logits.


def pair_chunk(n_runs: int, order: int, n_out: int, n_hidden: int, memory_bytes: int) -> int:
  """Pairs per block of the streamed pass: the block's logits and hidden layer of every run, with the
  copies the reductions make (centred logits, their projection, log-softmax; hidden sums), within
  ``memory_bytes``; at least 1, at most |G|²."""
  per_pair = 4 * n_runs * (5 * n_out + 3 * n_hidden)
  return int(min(max(memory_bytes // per_pair, 1), order * order))


def _pair_blocks(apply_fn: ApplyFn, params_S, n_runs: int, order: int, pairs_P: np.ndarray, chunk: int):
  """``(a_P, b_P, valid, logits_SxPxV, hidden_SxPxN)`` for consecutive blocks of ``chunk`` of the pairs
  ``pairs_P`` (pair a·|G| + b); the last block is padded with the first pair (``valid`` counts the data),
  so ``apply_fn`` and the reductions compile once."""
  for lo in range(0, pairs_P.size, chunk):
    idx = pairs_P[lo:lo + chunk]
    valid = idx.size
    idx = np.concatenate([idx, np.full(chunk - valid, pairs_P[0], idx.dtype)])
    a_P, b_P = (idx // order).astype(np.int32), (idx % order).astype(np.int32)
    a_SxB = np.broadcast_to(a_P, (n_runs, chunk))
    lg, hd = apply_fn(params_S, a_SxB, np.broadcast_to(b_P, a_SxB.shape))
    if lg.ndim != 3 or lg.shape[:2] != a_SxB.shape or lg.shape[2] < order:
      raise ValueError(f"apply_fn must return logits [{n_runs}, B, V>={order}], got {lg.shape}")
    if hd.ndim != 3 or hd.shape[:2] != a_SxB.shape:
      raise ValueError(f"apply_fn must return hidden [{n_runs}, B, N], got {hd.shape}")
    yield a_P, b_P, valid, lg, hd


def _zero_sums(n_runs: int, order: int, n_hidden: int, n_irreps: int, hidden_stats: bool) -> dict:
  zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
  out = {"cos_SxR": zeros((n_runs, n_irreps)), "nll_S": zeros((n_runs,)), "hit_S": zeros((n_runs,)),
         "margin_S": jnp.full((n_runs,), jnp.inf, jnp.float32)}
  if hidden_stats:
    out.update(fibre_SxGxN=zeros((n_runs, order, n_hidden)), by_a_SxGxN=zeros((n_runs, order, n_hidden)),
               by_b_SxGxN=zeros((n_runs, order, n_hidden)), sq_S=zeros((n_runs,)))
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(sums, logits_SxPxV, hidden_SxPxN, a_P, b_P, valid, table, c_of_MxY, character_YxR,
                char_norm_R):
  """``sums`` plus one block of pairs: Σ per-pair cosines per irrep, Σ cross-entropy, Σ correct, min margin
  and, when ``sums`` has them, the hidden layer summed per fibre a·b = m, per a, per b, and Σ H²."""
  g = table.shape[0]
  logits = logits_SxPxV[..., :g].astype(jnp.float32)
  w_P = (jnp.arange(a_P.shape[0]) < valid).astype(jnp.float32)
  m_P = table[a_P, b_P]
  cos_SxPxR = rep.pair_cosines(logits, m_P, c_of_MxY, character_YxR, char_norm_R)
  target_SxPx1 = jnp.broadcast_to(m_P[None, :, None], logits.shape[:2] + (1,))
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll_SxP = -jnp.take_along_axis(logp, target_SxPx1, axis=-1)[..., 0]
  correct_SxP = jnp.take_along_axis(logits, target_SxPx1, axis=-1)[..., 0]
  is_target = jnp.arange(g)[None, None, :] == target_SxPx1
  wrong_SxP = jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  margin_SxP = jnp.where(w_P > 0, correct_SxP - wrong_SxP, jnp.inf)
  out = dict(sums)
  out["cos_SxR"] = sums["cos_SxR"] + jnp.einsum("spr,p->sr", cos_SxPxR, w_P)
  out["nll_S"] = sums["nll_S"] + nll_SxP @ w_P
  out["hit_S"] = sums["hit_S"] + (jnp.argmax(logits, axis=-1) == m_P[None]).astype(jnp.float32) @ w_P
  out["margin_S"] = jnp.minimum(sums["margin_S"], jnp.min(margin_SxP, axis=1))
  if "fibre_SxGxN" in sums:
    h = hidden_SxPxN.astype(jnp.float32) * w_P[None, :, None]
    out["fibre_SxGxN"] = sums["fibre_SxGxN"].at[:, m_P].add(h)
    out["by_a_SxGxN"] = sums["by_a_SxGxN"].at[:, a_P].add(h)
    out["by_b_SxGxN"] = sums["by_b_SxGxN"].at[:, b_P].add(h)
    out["sq_S"] = sums["sq_S"] + jnp.sum(h * h, axis=(1, 2))
  return out


def block_size(apply_fn: ApplyFn, params_S, n_runs: int, order: int, memory_bytes: int) -> int:
  """``pair_chunk`` for this model (its output and hidden widths read from ``apply_fn``'s shapes, no run)."""
  spec = jax.ShapeDtypeStruct((n_runs, 1), jnp.int32)
  lg_shape, hd_shape = jax.eval_shape(apply_fn, params_S, spec, spec)
  return pair_chunk(n_runs, order, lg_shape.shape[-1], hd_shape.shape[-1], memory_bytes)


def stream_all_pairs(apply_fn: ApplyFn, params_S, n_runs: int, tables: rep.IrrepTables, *,
                     memory_bytes: int = rep.DEFAULT_MEMORY_BYTES, chunk: int | None = None,
                     hidden_stats: bool = True) -> tuple[dict, Any]:
  """One pass over all |G|² pairs in blocks; returns ``(sums, comoments)`` without holding the logits.

  ``sums`` (numpy, per run): ``cos_SxR`` (Σ over pairs of the logit-similarity cosine), ``nll_S``, ``hit_S``
  (Σ cross-entropy, number of correct pairs), ``margin_S`` (min over pairs of correct − best wrong logit);
  with ``hidden_stats`` also ``fibre_SxGxN``, ``by_a_SxGxN``, ``by_b_SxGxN`` (the hidden layer summed over
  the pairs with a·b = m, with a given, with b given) and ``sq_S`` (Σ H²), and ``comoments``: a
  ``universality.kernels.correlation.CoMoments`` of every run's neurons over all pairs (else None).

  ``chunk`` (pairs per block) defaults to ``pair_chunk`` of ``memory_bytes``; peak memory is one block of
  logits and hidden layer plus O(S·|G|·N) sums and the (S·N)² co-moment, whatever |G|³.
  """
  g = tables.order
  spec = jax.ShapeDtypeStruct((n_runs, 1), jnp.int32)
  n_hidden = jax.eval_shape(apply_fn, params_S, spec, spec)[1].shape[-1]
  chunk = min(block_size(apply_fn, params_S, n_runs, g, memory_bytes) if not chunk else int(chunk), g * g)
  consts = (jnp.asarray(tables.table), *rep.similarity_constants(tables))
  sums = _zero_sums(n_runs, g, n_hidden, tables.num_irreps, hidden_stats)
  state = correlation_lib.init(n_runs, n_hidden) if hidden_stats else None
  for a_P, b_P, valid, lg, hd in _pair_blocks(apply_fn, params_S, n_runs, g, np.arange(g * g), chunk):
    sums = _accumulate(sums, lg, hd, a_P, b_P, jnp.int32(valid), *consts)
    if hidden_stats:
      state = correlation_lib.update(state, hd, valid=valid)
  return {k: np.asarray(v) for k, v in sums.items()}, state


def hidden_at(apply_fn: ApplyFn, params_S, n_runs: int, order: int, pairs_P: np.ndarray,
              chunk: int) -> np.ndarray:
  """float32 ``[S, P, N]``: the hidden layer on the given pairs (pair a·|G| + b), in blocks of ``chunk``."""
  chunk = int(min(chunk, pairs_P.size))
  parts = [np.asarray(hd[:, :valid], np.float32)
           for _, _, valid, _, hd in _pair_blocks(apply_fn, params_S, n_runs, order, pairs_P, chunk)]
  return np.concatenate(parts, axis=1)


def neuron_irreps_from_fibres(fibre_SxGxN, mean_SxN, m2_SxN, group, irreps) -> dict:
  """``neuron_irreps_from_hidden`` from streamed sums: ``fibre_SxGxN`` the fibre means of the hidden layer
  (mean over the pairs with a·b = m), ``mean_SxN`` and ``m2_SxN`` each neuron's mean and Σ (h − mean)² over
  all pairs. Same keys."""
  tables = rep.irrep_tables(group, irreps)
  fibre = jnp.asarray(fibre_SxGxN, jnp.float32) - jnp.asarray(mean_SxN, jnp.float32)[:, None, :]
  s, g, n = fibre.shape
  per_SNxR = rep.fibre_fve(jnp.moveaxis(fibre, 2, 1).reshape(s * n, g, 1),
                           jnp.asarray(m2_SxN, jnp.float32).reshape(s * n),
                           jnp.asarray(tables.basis_GxM, jnp.float32),
                           jnp.asarray(tables.basis_member_MxR, jnp.float32))
  return _neuron_shares(np.array(per_SNxR, dtype=np.float32).reshape(s, n, -1))


def neuron_irreps_from_hidden(hidden_SxAxBxN, group, irreps) -> dict:
  """Per-neuron split of each neuron's activation, as a function of a·b, over irreps.

  For models whose pre-activation is not P_a[a] + P_b[b] (the transformer): a neuron's share in irrep ρ is
  the share of its (mean-removed) activation in the span of (a, b) ↦ ρ_ij(a·b); the trivial share is the
  part that is not a function of a·b. Same keys as ``representation.neuron_irreps``.
  """
  tables = rep.irrep_tables(group, irreps)
  h = jnp.asarray(hidden_SxAxBxN, jnp.float32)
  s, g, _, n = h.shape
  h = h - h.mean(axis=(1, 2), keepdims=True)
  # hidden_fve per neuron: move neurons into the run axis.
  per_SNxR = rep.hidden_fve(jnp.moveaxis(h, 3, 1).reshape(s * n, g, g, 1), group, tables)
  return _neuron_shares(np.array(per_SNxR, dtype=np.float32).reshape(s, n, -1))


def _neuron_shares(share: np.ndarray) -> dict:
  s, n, _ = share.shape
  share[..., 0] = np.clip(1.0 - share[..., 1:].sum(-1), 0.0, 1.0)
  nontrivial = share[..., 1:]
  dominant = (np.argmax(nontrivial, axis=-1) + 1).astype(np.int32) if share.shape[-1] > 1 else np.zeros(
      (s, n), np.int32)
  rest = nontrivial.sum(-1)
  dom_share = np.where(rest > 1e-12, nontrivial.max(-1, initial=0.0) / np.maximum(rest, 1e-12), 0.0)
  return {"share_SxNxR": share, "dominant_SxN": dominant, "dominant_share_SxN": dom_share}


def analyze_group(group: groups_lib.Group, irreps, apply_fn: ApplyFn, matrices_fn: Callable[[Any], dict],
                  params_by_step: Mapping[int, Any], runs: Sequence[Any], *,
                  key_threshold: float = rep.DEFAULT_KEY_THRESHOLD,
                  order_threshold: float = rep.DEFAULT_ORDER_THRESHOLD,
                  generalised: Sequence[bool] | None = None,
                  coset_threshold: float = cosets_lib.DEFAULT_COSET_THRESHOLD,
                  single_threshold: float = margins_lib.DEFAULT_SINGLE_THRESHOLD,
                  connectivity_points: int = connectivity_lib.DEFAULT_POINTS,
                  merge_tolerance: float = redundancy_lib.DEFAULT_TOLERANCE, key=None,
                  universal_threshold: float = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD, knn_k: int = 10,
                  knn_inputs: int = 1024, batch_size: int | None = None,
                  memory_bytes: int = rep.DEFAULT_MEMORY_BYTES) -> dict:
  """Analyses the runs of one group at every checkpoint; see the module docstring for every field.

  Args:
    group: the runs' group; irreps: ``universality.engine.irreps.real_irreps(group)`` (or ``representation.IrrepTables``).
    apply_fn: ``(params_S, a_SxB, b_SxB) -> (logits_SxBxV, hidden_SxBxN)``; classes ≥ |G| are ignored.
    matrices_fn: ``params_S -> {name: [S, V, X]}`` with at least ``embed_a``, ``embed_b``, ``unembed``;
      ``pre_a``/``pre_b`` enable the per-neuron split and the ablation losses (``matrices_fn_for``).
    params_by_step: checkpoint step -> parameters stacked over the runs; the largest step is final.
    runs: one description per run (leading axis of the parameters).
    key_threshold: key-irrep threshold on the final logit similarity; order_threshold: learning-order
      threshold; universal_threshold: on excess correlation.
    merge_tolerance: the loss rise on all pairs that stops iterative feature merging (redundancy).
    connectivity_points: points on the linear path between two runs' weights (0: no mode connectivity).
    single_threshold: share of a neuron's non-constant pre-activation in one irrep that makes it a
      single-irrep neuron (margins).
    coset_threshold: share of a neuron side's variance its best subgroup's cosets must explain.
    generalised: one bool per run (the family's test); runs marked False are left out of the key-irrep and
      learning-order aggregates. None: all runs count.
    key: PRNG key for the rotation baseline and the k-NN subsample (required when there are ≥ 2 runs).
    knn_k, knn_inputs: mutual k-NN alignment settings.
    memory_bytes: working memory of one block of pairs (logits and hidden layer of every run, and the
      blocks of the weight-based losses); sets the block sizes (``pair_chunk``, ``loss_chunks``).
    batch_size: pairs per ``apply_fn`` call, overriding the block size ``memory_bytes`` gives.
  """
  tables = rep.irrep_tables(group, irreps)
  runs = list(runs)
  n_runs, g = len(runs), group.order
  if n_runs == 0:
    raise ValueError("runs is empty")
  if not params_by_step:
    raise ValueError("params_by_step is empty")
  steps = sorted(int(k) for k in params_by_step)
  if key is None and n_runs >= 2:
    raise ValueError("key is required to compare two or more runs (rotation baseline)")
  names = tables.names
  generalised = [True] * n_runs if generalised is None else [bool(x) for x in generalised]
  if len(generalised) != n_runs:
    raise ValueError(f"generalised: {len(generalised)} values for {n_runs} runs")

  final_params = params_by_step[steps[-1]]
  chunk = int(batch_size) if batch_size else block_size(apply_fn, final_params, n_runs, g, memory_bytes)
  sims, margins = [], []
  for step in steps:  # every checkpoint: logit similarity and margin, one block of pairs at a time
    sums, state = stream_all_pairs(apply_fn, params_by_step[step], n_runs, tables, chunk=chunk,
                                   hidden_stats=step == steps[-1])
    sims.append(sums["cos_SxR"] / (g * g))
    step_mats = matrices_fn(params_by_step[step])
    if "pre_a" in step_mats and "pre_b" in step_mats:  # margins need the homogeneous effective weights
      margins.append({k: np.asarray(v) for k, v in margins_lib.normalise(
          sums["margin_S"], step_mats["pre_a"][:, :g], step_mats["pre_b"][:, :g],
          step_mats["unembed"][:, :g]).items()})
  sim_KxSxR = np.stack(sims)
  sim_SxR = sim_KxSxR[-1]
  key_SxR = np.asarray(rep.key_irreps(sim_SxR, key_threshold))
  frac_S = np.asarray(rep.fraction_explained(sim_SxR))
  frac_key_S = np.sum(np.where(key_SxR, sim_SxR, 0.0) ** 2, axis=1)
  order_SxR = np.asarray(rep.learning_order(np.asarray(steps), sim_KxSxR, order_threshold))
  loss_S, acc_S = sums["nll_S"] / (g * g), sums["hit_S"] / (g * g)  # the final step's sums

  mats = {k: np.asarray(v) for k, v in matrices_fn(final_params).items()}
  fves = {}
  for name, m in mats.items():
    if m.ndim == 3 and m.shape[0] == n_runs and m.shape[1] >= g:
      fves[name] = np.asarray(rep.fve(m[:, :g], group, tables))
  fibre_SxGxN = sums["fibre_SxGxN"] / g  # every fibre {(a, a⁻¹m)} holds |G| pairs
  hidden_fve_SxR = np.asarray(rep.fibre_fve(jnp.asarray(fibre_SxGxN), jnp.asarray(sums["sq_S"]),
                                            jnp.asarray(tables.basis_GxM, jnp.float32),
                                            jnp.asarray(tables.basis_member_MxR, jnp.float32)))

  losses = None
  if "pre_a" in mats and "pre_b" in mats:
    neurons = {k: np.asarray(v) for k, v in
               rep.neuron_irreps(mats["pre_a"][:, :g], mats["pre_b"][:, :g], group, tables).items()}
    source = "pre_activation"
    abl = rep.ablation_losses(mats["pre_a"][:, :g], mats["pre_b"][:, :g], mats["unembed"], key_SxR, group,
                              tables, memory_bytes=memory_bytes)
    losses = {k: np.asarray(v) for k, v in abl.items()}
  else:
    neurons = neuron_irreps_from_fibres(fibre_SxGxN, state.mean_SxN, state.m2_SxN, group, tables)
    source = "hidden"

  dead_SxN = ~cross_seed.live_from_comoments(state)
  coset = cosets_lib.coset_tables(group, tables)
  f_SxIxGxN, coset_source = cosets_lib.input_functions(
      mats["pre_a"][:, :g] if "pre_a" in mats else None, mats["pre_b"][:, :g] if "pre_b" in mats else None,
      marginals=(sums["by_a_SxGxN"] / g, sums["by_b_SxGxN"] / g))
  coset_res = cosets_lib.coset_neurons(f_SxIxGxN, group, tables, coset, threshold=coset_threshold)
  corr = None
  if n_runs >= 2:
    k_corr, k_knn = jax.random.split(key)
    corr = {k: np.asarray(v) for k, v in cross_seed.neuron_correlations_from_comoments(
        state, key=k_corr, universal_threshold=universal_threshold).items()}
    dead_SxN = corr["dead_SxN"].astype(bool) | dead_SxN
    matching = cross_seed.match_neurons_from_comoments(state)
  else:
    k_knn = key if key is not None else jax.random.key(0)
  # The k-NN alignment compares inputs with each other: the hidden layer on its subsample of pairs only.
  subset_U = cross_seed.knn_subset(g * g, knn_inputs, k_knn)
  knn_acts_SxUxN = hidden_at(apply_fn, final_params, n_runs, g, subset_U, chunk)
  sim_mats = {k: np.asarray(v) for k, v in cross_seed.similarity_from_comoments(
      state, knn_acts_SxUxN, k=min(knn_k, subset_U.size - 1)).items()}
  del state

  records = []
  for i, run in enumerate(runs):
    live = ~dead_SxN[i]
    key_names = [names[r] for r in range(len(names)) if key_SxR[i, r]]
    learned = {names[r]: (int(order_SxR[i, r]) if order_SxR[i, r] >= 0 else None) for r in range(len(names))}
    # Irreps crossing at the same checkpoint are ordered by their similarity there (largest first).
    in_order = sorted((r for r in range(len(names)) if key_SxR[i, r] and order_SxR[i, r] >= 0),
                      key=lambda r: (order_SxR[i, r], -sim_KxSxR[steps.index(order_SxR[i, r]), i, r], r))
    in_order += [r for r in range(len(names)) if key_SxR[i, r] and order_SxR[i, r] < 0]
    dom = neurons["dominant_SxN"][i][live]
    rec = {
        "run": _run_description(run), "generalised": generalised[i],
        "loss_all": loss_S[i], "accuracy_all": acc_S[i],
        "logit_similarity": dict(zip(names, sim_SxR[i])),
        "fraction_explained": frac_S[i], "fraction_explained_key": frac_key_S[i],
        "key_irreps": key_names,
        "learning_order": learned,
        "key_irreps_in_order": [names[r] for r in in_order],
        "first_learned": names[in_order[0]] if in_order else None,
        "similarity_by_step": {names[r]: sim_KxSxR[:, i, r] for r in range(len(names))},
        "fve": {**{m: dict(zip(names, v[i])) for m, v in fves.items()},
                "hidden": dict(zip(names, hidden_fve_SxR[i]))},
        "fve_hidden_ab_total": hidden_fve_SxR[i].sum(),
        "losses": None if losses is None else {
            "full": losses["full_S"][i], "restricted": losses["restricted_S"][i],
            "excluded": losses["excluded_S"][i],
            "excluded_each": dict(zip(names, losses["excluded_each_SxR"][i]))},
        "neurons": {
            "source": source, "dead": int(np.sum(~live)),
            "dominant_counts": {names[r]: int(np.sum(dom == r)) for r in range(len(names))},
            "mean_dominant_share": float(np.mean(neurons["dominant_share_SxN"][i][live])) if live.any()
                                   else None,
            "in_key_irreps": float(np.mean(key_SxR[i][dom])) if dom.size else None,
            "universal_fraction": None if corr is None else corr["universal_fraction_S"][i],
            "mean_excess": None if corr is None else (
                float(np.nanmean(corr["excess_SxN"][i][live])) if live.any() else None),
        },
    }
    records.append(rec)
  for rec, coset_rec in zip(records, cosets_lib.run_records(coset_res, coset, dead_SxN, coset_source)):
    rec["cosets"] = coset_rec
  aggregate = _aggregate(records, names, corr, neurons, dead_SxN, sim_mats,
                         None if n_runs < 2 else matching, n_runs)
  aggregate["cosets"] = cosets_lib.cohort_record([r["cosets"] for r in records], coset)
  single = margins_lib.single_irrep_neurons(neurons["share_SxNxR"], ~dead_SxN, single_threshold)
  aggregate["margins"] = _add_margins(records, margins, single, names)
  effective = None if "pre_a" not in mats else (mats["pre_a"][:, :g], mats["pre_b"][:, :g], mats["unembed"][:, :g])
  aggregate["redundancy"] = _add_redundancy(records, effective, tables.table, merge_tolerance, memory_bytes)
  aggregate["connectivity"] = None
  if n_runs >= 2 and effective is not None and connectivity_points:
    conn = connectivity_lib.connectivity(*effective, tables.table, matching["perm_SxSxN"],
                                         points=connectivity_points, memory_bytes=memory_bytes)
    aggregate["connectivity"] = connectivity_lib.cohort_record(conn, [r["key_irreps"] for r in records],
                                                               generalised)
  out = {
      "group": {"name": group.name, "order": g, "steps": steps, "key_threshold": float(key_threshold),
                "order_threshold": float(order_threshold), **cosets_lib.task_record(coset, coset_threshold),
                "single_threshold": float(single_threshold),
                "predicted_coverage": margins_lib.predicted_coverage(group.name),
                "universal_threshold": float(universal_threshold),
                "irreps": [{"name": n, "dim": int(d), "frobenius_schur": int(fs)}
                           for n, d, fs in zip(names, tables.dims, tables.frobenius_schur)]},
      "runs": records,
      "aggregate": aggregate,
  }
  return to_json(out)


def _add_margins(records, margins, single, names) -> dict | None:
  """Each record's ``margins`` (None without margins) and the cohort's margin aggregate."""
  for i, rec in enumerate(records):
    rec["margins"] = None if not margins else {
        "margin_by_step": [m["margin_S"][i] for m in margins],
        "normalised_margin_by_step": [m["normalised_S"][i] for m in margins],
        "margin": margins[-1]["margin_S"][i], "normalised_margin": margins[-1]["normalised_S"][i],
        "norm": margins[-1]["norm_S"][i],
        "single_irrep_fraction": single["fraction_S"][i], "irrep_coverage": single["coverage_S"][i],
        "covered_irreps": [names[r] for r in np.flatnonzero(single["covered_SxR"][i])]}
  return None if not margins else _margin_aggregate(records)


def _add_redundancy(records, effective, table, tolerance, memory_bytes) -> dict | None:
  """Each record's ``redundancy`` (None without effective weights) and the cohort's aggregate."""
  if effective is None:
    for rec in records:
      rec["redundancy"] = None
    return None
  merged = {k: np.asarray(v) for k, v in redundancy_lib.merge_features(
      *effective, table, tolerance=tolerance, memory_bytes=memory_bytes).items()}
  for i, rec in enumerate(records):
    rec["redundancy"] = {"width": int(merged["alive_SxN"].shape[1]), "never_active": merged["never_active_S"][i],
                         "merges": merged["merges_S"][i], "feature_complexity": merged["width_S"][i],
                         "loss": merged["loss_S"][i], "merged_loss": merged["merged_loss_S"][i]}
  return _redundancy_aggregate(records)


def _redundancy_aggregate(records) -> dict:
  done = [r for r in records if r["generalised"]]
  by_keys: dict[int, list[int]] = collections.defaultdict(list)
  for r in done:
    by_keys[len(r["key_irreps"])].append(r["redundancy"]["feature_complexity"])
  return {"mean_feature_complexity": float(np.mean([r["redundancy"]["feature_complexity"] for r in records])),
          "mean_feature_complexity_generalised": (
              float(np.mean([r["redundancy"]["feature_complexity"] for r in done])) if done else None),
          "feature_complexity_by_key_irreps": {str(k): float(np.mean(v)) for k, v in sorted(by_keys.items())}}


def _margin_aggregate(records) -> dict:
  m = [r["margins"] for r in records]
  done = [r["margins"] for r in records if r["generalised"]]
  mean = lambda xs: float(np.mean(xs)) if len(xs) else None  # noqa: E731
  return {"mean_normalised_margin": mean([x["normalised_margin"] for x in m]),
          "positive_margin_runs": int(sum(x["margin"] > 0 for x in m)),
          "mean_single_irrep_fraction": mean([x["single_irrep_fraction"] for x in m]),
          "mean_irrep_coverage": mean([x["irrep_coverage"] for x in m]),
          "mean_irrep_coverage_generalised": mean([x["irrep_coverage"] for x in done])}


def _offdiag_mean(m_SxS: np.ndarray):
  s = m_SxS.shape[0]
  if s < 2:
    return None
  vals = m_SxS[~np.eye(s, dtype=bool)]
  vals = vals[np.isfinite(vals)]
  return float(vals.mean()) if vals.size else None


def _aggregate(records, names, corr, neurons, dead_SxN, sim_mats, matching, n_runs) -> dict:
  done = [r for r in records if r["generalised"]]
  key_counts = {n: sum(n in r["key_irreps"] for r in done) for n in names}
  sets = collections.Counter(tuple(r["key_irreps"]) for r in done)
  first = collections.Counter(r["first_learned"] for r in done if r["first_learned"] is not None)
  agg = {
      "n_runs": n_runs, "n_generalised": len(done),
      "not_generalised": [i for i, r in enumerate(records) if not r["generalised"]],
      "key_irrep_counts": key_counts,
      "key_irrep_sets": [{"irreps": list(k), "count": c}
                         for k, c in sorted(sets.items(), key=lambda kv: (-kv[1], kv[0]))],
      "first_learned_counts": {n: first.get(n, 0) for n in names},
      "mean_fraction_explained": float(np.nanmean([r["fraction_explained"] for r in records])),
      "mean_loss_all": float(np.nanmean([r["loss_all"] for r in records])),
      "cka": sim_mats["cka"], "procrustes": sim_mats["procrustes"], "mutual_knn": sim_mats["mutual_knn"],
      "similarity_means": {k: _offdiag_mean(v) for k, v in sim_mats.items()},
      "correlation": None, "matching": None,
  }
  if corr is not None:
    s = n_runs
    live_SxN = ~dead_SxN
    other = ~np.eye(s, dtype=bool)
    sel = live_SxN[:, :, None] & other[:, None, :]
    excess = corr["excess_SxN"][live_SxN]
    counts, edges = np.histogram(excess[np.isfinite(excess)], bins=20, range=(-0.5, 1.0))
    agg["correlation"] = {
        "mean_max": float(np.nanmean(corr["max_SxNxS"][sel])) if sel.any() else None,
        "mean_baseline_max": float(np.nanmean(corr["baseline_max_SxNxS"][sel])) if sel.any() else None,
        "mean_excess": float(np.nanmean(excess)) if excess.size else None,
        "universal_fraction": float(np.sum(corr["universal_SxN"] & live_SxN) / max(live_SxN.sum(), 1)),
        "excess_histogram": {"edges": edges, "counts": counts},
        "irrep_agreement": cross_seed.irrep_agreement(corr["argmax_SxNxS"], neurons["dominant_SxN"],
                                                      dead_SxN),
        "irrep_agreement_universal": cross_seed.irrep_agreement(
            corr["argmax_SxNxS"], neurons["dominant_SxN"], dead_SxN, corr["universal_SxN"]),
    }
    agg["matching"] = {"mean_matched_corr": matching["mean_matched_SxS"],
                       "mean_offdiagonal": _offdiag_mean(matching["mean_matched_SxS"])}
  return agg
