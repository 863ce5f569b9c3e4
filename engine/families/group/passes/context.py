"""What every pass of a cohort reads, computed once: the streamed all-pairs sums of every checkpoint, the
final co-moments of all neurons, the weights, the per-neuron irrep split and the cross-seed correlations.

``build(group, irreps, model, params_by_step, runs, ...)`` streams each checkpoint once
(``streaming.stream_all_pairs``: blocks of pairs, never S·|G|³ logits), so peak memory is the budget plus
O(S·|G|·N + (S·N)²) whatever |G|³. ``model`` is ``models.Stacked``: its ``effective`` weights (None for the
transformer) decide which passes apply, asked here once rather than by each pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from universality.engine import groups as groups_lib
from universality.engine.analysis import cross_seed
from universality.engine.families.group import models
from universality.engine.families.group.passes import margins as margins_lib
from universality.engine.families.group.passes import neuron_split
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group.passes import streaming
from universality.kernels import correlation as correlation_lib


@dataclasses.dataclass(frozen=True)
class Streamed:
  """Per checkpoint: logit similarity ``sim_KxSxR`` and the margins (``margins_lib.normalise``'s arrays;
  empty without effective weights); at the final step: loss and accuracy on all pairs, the hidden layer
  summed per fibre a·b = m, per a and per b, Σ H², and the co-moments of all S·N neurons."""
  sim_KxSxR: np.ndarray
  margins: tuple
  loss_S: np.ndarray
  acc_S: np.ndarray
  fibre_SxGxN: np.ndarray
  by_a_SxGxN: np.ndarray
  by_b_SxGxN: np.ndarray
  sq_S: np.ndarray
  comoments: correlation_lib.CoMoments


@dataclasses.dataclass(frozen=True)
class Context:
  """A cohort's shared inputs. ``matrices``: the final ``embedding_matrices`` ``[S, V, X]``; ``effective``:
  the final effective weights (rows beyond |G| kept) or None; ``neurons``: ``neuron_split``'s arrays
  (``source`` ``pre_activation`` or ``hidden``); ``corr`` / ``matching``: cross-seed arrays (None for one
  run); ``dead_SxN``: constant neurons (by the co-moments, or by the correlation's own test)."""
  group: groups_lib.Group
  tables: rep.IrrepTables
  steps: list[int]
  runs: list
  generalised: list[bool]
  key_threshold: float
  universal_threshold: float
  memory_bytes: int
  streamed: Streamed
  key_SxR: np.ndarray
  matrices: dict
  effective: models.EffectiveWeights | None
  neurons: dict
  neuron_source: str
  corr: dict | None
  matching: dict | None
  dead_SxN: np.ndarray
  knn_key: Any
  hidden_on: Any  # pairs_P -> float32 [S, P, N] at the final step
  key: Any = None  # the cohort's key, for units that draw their own samples (``fold_in`` of it)

  @property
  def names(self) -> list[str]:
    return list(self.tables.names)

  @property
  def n_runs(self) -> int:
    return len(self.runs)

  @property
  def order(self) -> int:
    return self.group.order

  def effective_g(self):
    """``(pre_a, pre_b, unembed)`` sliced to the group's |G| rows, or None."""
    if self.effective is None:
      return None
    g = self.order
    return (self.effective.pre_a[:, :g], self.effective.pre_b[:, :g], self.effective.unembed[:, :g])


def _stream(model: models.Stacked, params_by_step, steps, n_runs, tables, chunk) -> Streamed:
  """Every checkpoint in one streamed pass each; the hidden-layer statistics at the final step only."""
  g = tables.order
  sims, margins = [], []
  for step in steps:
    sums, state = streaming.stream_all_pairs(model.apply, params_by_step[step], n_runs, tables, chunk=chunk,
                                             hidden_stats=step == steps[-1])
    sims.append(sums["cos_SxR"] / (g * g))
    if model.effective is not None:  # margins need the homogeneous effective weights
      eff = model.effective(params_by_step[step])
      margins.append({k: np.asarray(v) for k, v in margins_lib.normalise(
          sums["margin_S"], eff.pre_a[:, :g], eff.pre_b[:, :g], eff.unembed[:, :g]).items()})
  return Streamed(sim_KxSxR=np.stack(sims), margins=tuple(margins), loss_S=sums["nll_S"] / (g * g),
                  acc_S=sums["hit_S"] / (g * g), fibre_SxGxN=sums["fibre_SxGxN"] / g,  # |G| pairs a fibre
                  by_a_SxGxN=sums["by_a_SxGxN"], by_b_SxGxN=sums["by_b_SxGxN"], sq_S=sums["sq_S"],
                  comoments=state)


def _neurons(streamed: Streamed, effective, group, tables) -> tuple[dict, str]:
  """The per-neuron irrep split: of the pre-activation where the model has one, else of the activation."""
  g = group.order
  if effective is not None:
    return ({k: np.asarray(v) for k, v in rep.neuron_irreps(effective.pre_a[:, :g], effective.pre_b[:, :g],
                                                            group, tables).items()}, "pre_activation")
  state = streamed.comoments
  return (neuron_split.from_fibres(streamed.fibre_SxGxN, state.mean_SxN, state.m2_SxN, group, tables),
          "hidden")


def _cross_seed(state, n_runs: int, key, universal_threshold: float):
  """``(corr, matching, dead_SxN, knn_key)``: neuron correlations and matching between the runs."""
  dead_SxN = ~cross_seed.live_from_comoments(state)
  if n_runs < 2:
    return None, None, dead_SxN, key if key is not None else jax.random.key(0)
  k_corr, k_knn = jax.random.split(key)
  corr = {k: np.asarray(v) for k, v in cross_seed.neuron_correlations_from_comoments(
      state, key=k_corr, universal_threshold=universal_threshold).items()}
  dead_SxN = corr["dead_SxN"].astype(bool) | dead_SxN
  return corr, cross_seed.match_neurons_from_comoments(state), dead_SxN, k_knn


def _check(runs, params_by_step, key, generalised) -> list[bool]:
  if not runs:
    raise ValueError("runs is empty")
  if not params_by_step:
    raise ValueError("params_by_step is empty")
  if key is None and len(runs) >= 2:
    raise ValueError("key is required to compare two or more runs (rotation baseline)")
  out = [True] * len(runs) if generalised is None else [bool(x) for x in generalised]
  if len(out) != len(runs):
    raise ValueError(f"generalised: {len(out)} values for {len(runs)} runs")
  return out


def build(group: groups_lib.Group, irreps, model: models.Stacked, params_by_step: Mapping[int, Any],
          runs: Sequence[Any], *, key=None, generalised: Sequence[bool] | None = None,
          key_threshold: float = rep.DEFAULT_KEY_THRESHOLD,
          universal_threshold: float = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD,
          memory_bytes: int = rep.DEFAULT_MEMORY_BYTES, batch_size: int | None = None) -> Context:
  """The context of the runs of one group (``params_by_step``: step -> parameters stacked over ``runs``;
  the largest step is final). ``key`` (required for two or more runs) draws the rotation baseline and the
  k-NN subsample; ``batch_size`` overrides the pairs per block that ``memory_bytes`` gives."""
  runs = list(runs)
  generalised = _check(runs, params_by_step, key, generalised)
  tables = rep.irrep_tables(group, irreps)
  n_runs, g = len(runs), group.order
  steps = sorted(int(k) for k in params_by_step)
  final = params_by_step[steps[-1]]
  chunk = int(batch_size) if batch_size else streaming.block_size(model.apply, final, n_runs, g, memory_bytes)
  streamed = _stream(model, params_by_step, steps, n_runs, tables, chunk)
  effective = None
  if model.effective is not None:
    effective = models.EffectiveWeights(*(np.asarray(x) for x in model.effective(final)))
  neurons, source = _neurons(streamed, effective, group, tables)
  corr, matching, dead_SxN, knn_key = _cross_seed(streamed.comoments, n_runs, key, universal_threshold)
  hidden_on = lambda pairs_P: streaming.hidden_at(model.apply, final, n_runs, g, pairs_P, chunk)  # noqa: E731
  return Context(group=group, tables=tables, steps=steps, runs=runs, generalised=generalised,
                 key_threshold=float(key_threshold), universal_threshold=float(universal_threshold),
                 memory_bytes=memory_bytes, streamed=streamed,
                 key_SxR=np.asarray(rep.key_irreps(streamed.sim_KxSxR[-1], key_threshold)),
                 matrices={k: np.asarray(v) for k, v in model.matrices(final).items()}, effective=effective,
                 neurons=neurons, neuron_source=source, corr=corr, matching=matching, dead_SxN=dead_SxN,
                 knn_key=knn_key, hidden_on=hidden_on, key=key)
