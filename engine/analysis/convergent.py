"""Convergent Learning passes (Li et al. 2016, *Convergent learning: do different neural networks learn the
same representations?*) on the activations of any family's layer, ``acts_SxTxN`` (S runs, T inputs, N units).

Every pass compares the pairs of runs named in ``pairs`` (a list of ``(a, b)`` run indices; None: every
``a < b``) and returns a dict of arrays with a leading pair axis Z plus one typed, JSON-able record per pair:

* ``one_to_one(acts_SxTxN, pairs)``: for each unit of run a, its most correlated unit of run b (greedy
  semi-matching: several units may pick the same partner) beside the maximum-weight bipartite matching
  (``scipy.optimize.linear_sum_assignment``); the mean matched correlation of each, and the share of units
  to which both assign the same partner (the paper's table: conv1 greedy 0.703 / max 0.663, ...).
* ``sparse_prediction(acts_SxTxN, pairs, lambdas=...)``: every unit of run b predicted from all units of run
  a by L1-regularised linear regression on standardised activations, the objective of scikit-learn's
  ``Lasso``, ``1/(2n) ‖y − Xw‖² + λ‖w‖₁``, solved by FISTA batched over b's units, the pairs and the λ grid in
  one jitted loop; the held-out loss (mean squared error of standardised units on inputs left out of the
  fit, ≈ 1 − R²) against λ and how many of a's units each of b's units uses.
* ``spectral_clusters(acts_SxTxN, pairs, clusters=...)``: the units of runs a and b clustered together
  (normalised spectral clustering, Ng, Jordan & Weiss 2001, on the affinity |correlation|; numpy
  eigenvectors + k-means with a fixed seed, so no runtime dependency beyond numpy); per cluster the units of
  each run, the mean |correlation| within each run and between the runs, the mean canonical correlation
  (SVCCA: each side first reduced to the directions holding ``svcca_keep`` of its variance) between the
  two runs' parts; the share of mixed clusters (units of both runs).

Dead units (constant over the inputs) have no correlation: they count as correlation 0 in the matchings and
are left out of every mean; in the sparse prediction they are neither used nor predicted; in the clustering
they get cluster -1.

A family (the vision family's conv layers, say) calls, for a layer's ``acts_SxTxN`` of runs that differ only
in seed::

    from universality.engine.analysis import convergent
    pairs = convergent.default_pairs(acts_SxTxN.shape[0])
    o2o = convergent.one_to_one(acts_SxTxN, pairs)
    sp = convergent.sparse_prediction(acts_SxTxN, pairs, key=jax.random.key(0))
    sc = convergent.spectral_clusters(acts_SxTxN, pairs)
    records = o2o["records"], sp["records"], sc["records"]   # lists of OneToOne, SparsePrediction, Clusters
    json_ready = [r.to_json() for r in records[0]]

or all three at once with the cheap defaults of ``Settings`` (inputs subsampled to ``max_inputs``), and the
report's markdown::

    res = convergent.analyse(acts_SxTxN, pairs, key=key, settings=convergent.Settings())
    text = convergent.sections(res, layer="conv3")

The families run them behind the analysis setting ``convergent`` (off by default) with the named settings of
``universality.engine.fields.CONVERGENT`` (``settings_of``, ``pairs_of``; each layer's key ``key_of`` of the
cohort's key): the group family on its hidden layer, the language-model family on every MLP layer. A layer's
records go to summary.json as ``to_json`` (with ``layer_means``) and come back typed by ``from_json``;
``layer_table`` is the paper's table with one row per layer. The sparse prediction's solver holds
pairs × λ × N × N weights and as many iterates: ``Settings.memory_bytes`` bounds it by solving b's units in
blocks (``sparse_prediction(memory_bytes=...)``), and ``analyse`` keeps no weights.

Local shape letters:

  Q  the coordinates of the points k-means clusters
  J  units of run b solved together in one block of a sparse-prediction sweep
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from universality.engine import fields
from universality.engine.analysis.jsonable import to_json as _jsonable
from universality.engine.analysis.records import Num, Record, record
from universality.engine.markdown import markdown_table

DEFAULT_LAMBDAS = (0.003, 0.01, 0.03, 0.1, 0.3)
DEFAULT_ITERATIONS = 300
DEFAULT_HELDOUT = 0.25
DEFAULT_CLUSTERS = 8
DEFAULT_SVCCA_KEEP = 0.99
USED_TOL = 1e-6  # a coefficient of magnitude above this counts as a unit used
_DEAD_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------------
# Typed records (``universality.engine.analysis.records``).


@record
class OneToOne(Record):
  """One pair of runs: greedy semi-matching vs maximum bipartite matching of a's units to b's."""
  run_a: int
  run_b: int
  units: int  # live units of run a counted in the means
  greedy_mean: Num  # mean over a's live units of their max correlation with b's units
  max_mean: Num  # mean correlation of the bipartite matching
  same_partner_share: Num  # share of a's live units that both matchings pair with the same unit of b


@record
class SparsePrediction(Record):
  """One pair of runs: b's units predicted from a's, per λ of the sweep."""
  run_a: int
  run_b: int
  lambdas: list[float]
  heldout_loss: list[Num]  # mean over b's live units of the held-out MSE of the standardised unit
  train_loss: list[Num]  # the same on the fitted inputs
  mean_units_used: list[Num]  # mean over b's live units of how many of a's units have a nonzero weight


@record
class Cluster(Record):
  units_a: list[int]
  units_b: list[int]
  within_a: Num  # mean |corr| over pairs of distinct units of run a in the cluster
  within_b: Num
  between: Num  # mean |corr| over (unit of a, unit of b) in the cluster
  svcca: Num  # mean canonical correlation of the two runs' parts (null unless mixed)


@record
class Clusters(Record):
  """One pair of runs: spectral clusters of their units together."""
  run_a: int
  run_b: int
  clusters: list[Cluster]
  mixed_share: Num  # share of (non-empty) clusters holding units of both runs


# ---------------------------------------------------------------------------------------------------
# Inputs.


def default_pairs(runs: int, limit: int | None = None) -> list[tuple[int, int]]:
  """Every pair ``(a, b)`` with ``a < b`` (run 0 against each other run first); the first ``limit`` of
  them when ``limit`` is a positive number (Li et al. compared Net1 with each of Net2–Net4)."""
  out = [(a, b) for a in range(runs) for b in range(a + 1, runs)]
  return out[:int(limit)] if limit else out


def _check(acts_SxTxN, pairs) -> tuple[np.ndarray, list[tuple[int, int]]]:
  acts = np.asarray(acts_SxTxN, np.float32)
  if acts.ndim != 3:
    raise ValueError(f"acts must be [S, T, N], got shape {acts.shape}")
  s, t, n = acts.shape
  if s < 2 or t < 2 or n < 1:
    raise ValueError(f"acts need at least 2 runs, 2 inputs and 1 unit, got shape {acts.shape}")
  if not np.all(np.isfinite(acts)):
    raise ValueError("acts contain NaN or infinity")
  pairs = default_pairs(s) if pairs is None else [(int(a), int(b)) for a, b in pairs]
  if not pairs:
    raise ValueError("pairs is empty")
  for a, b in pairs:
    if not (0 <= a < s and 0 <= b < s) or a == b:
      raise ValueError(f"pair ({a}, {b}) must name two different runs in [0, {s})")
  return acts, pairs


def _stats(x_TxN: np.ndarray):
  """float64 mean, population std and live mask of each unit."""
  x = np.asarray(x_TxN, np.float64)
  mean = x.mean(axis=0)
  std = x.std(axis=0)
  live = std > _DEAD_RTOL * np.maximum(np.abs(mean), 1.0)
  return mean, std, live


def cross_correlation(a_TxN: np.ndarray, b_TxN: np.ndarray) -> np.ndarray:
  """float64 Pearson correlation ``[N, M]`` of the units of two runs; 0 where either unit is dead."""
  ma, sa, la = _stats(a_TxN)
  mb, sb, lb = _stats(b_TxN)
  za = np.where(la, (np.asarray(a_TxN, np.float64) - ma) / np.where(la, sa, 1.0), 0.0)
  zb = np.where(lb, (np.asarray(b_TxN, np.float64) - mb) / np.where(lb, sb, 1.0), 0.0)
  return za.T @ zb / za.shape[0]


# ---------------------------------------------------------------------------------------------------
# One-to-one.


def one_to_one(acts_SxTxN, pairs: Sequence[tuple[int, int]] | None = None) -> dict:
  """Greedy semi-matching and maximum bipartite matching of the units of each pair of runs.

  Returns:
    dict: ``greedy_ZxN`` (the unit of b most correlated with unit n of a), ``max_ZxN`` (its partner in the
    maximum-weight one-to-one matching), ``greedy_corr_ZxN``, ``max_corr_ZxN`` (NaN where a unit of a or
    its partner is dead), ``pairs`` and ``records`` (a ``OneToOne`` per pair).
  """
  acts, pairs = _check(acts_SxTxN, pairs)
  q, n = len(pairs), acts.shape[2]
  greedy = np.zeros((q, n), np.int64)
  best = np.zeros((q, n), np.int64)
  greedy_corr = np.full((q, n), np.nan)
  max_corr = np.full((q, n), np.nan)
  records = []
  for k, (a, b) in enumerate(pairs):
    corr = cross_correlation(acts[a], acts[b])
    live_a, live_b = _stats(acts[a])[2], _stats(acts[b])[2]
    greedy[k] = np.argmax(corr, axis=1)
    rows, cols = scipy.optimize.linear_sum_assignment(corr, maximize=True)
    best[k, rows] = cols
    counted = live_a & live_b[greedy[k]]
    greedy_corr[k] = np.where(counted, corr[np.arange(n), greedy[k]], np.nan)
    max_corr[k] = np.where(live_a & live_b[best[k]], corr[np.arange(n), best[k]], np.nan)
    units = int(live_a.sum())
    same = np.sum((greedy[k] == best[k]) & live_a)
    records.append(OneToOne(run_a=a, run_b=b, units=units, greedy_mean=_nanmean(greedy_corr[k]),
                            max_mean=_nanmean(max_corr[k]),
                            same_partner_share=float(same) / units if units else None))
  return {"greedy_ZxN": greedy, "max_ZxN": best, "greedy_corr_ZxN": greedy_corr, "max_corr_ZxN": max_corr,
          "pairs": pairs, "records": records}


def _nanmean(x) -> float | None:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else None


# ---------------------------------------------------------------------------------------------------
# One-to-many: sparse prediction.


def sparse_prediction(acts_SxTxN, pairs: Sequence[tuple[int, int]] | None = None, *, key,
                      lambdas: Sequence[float] = DEFAULT_LAMBDAS, heldout: float = DEFAULT_HELDOUT,
                      iterations: int = DEFAULT_ITERATIONS, memory_bytes: int | None = None,
                      keep_weights: bool = True) -> dict:
  """Lasso prediction of every unit of run b from all units of run a, for each pair and λ.

  The inputs are split at random (``key``) into a fitted part and a held-out share ``heldout``; each unit is
  standardised with the mean and population std of the fitted part. The weights minimise
  ``1/(2n) ‖y − Xw‖² + λ‖w‖₁`` (n fitted inputs, no intercept: the data are centred), scikit-learn's
  ``Lasso(alpha=λ, fit_intercept=False)``, by ``iterations`` FISTA steps.

  The solver holds pairs × λ × N × N weights (and as many FISTA iterates and gradients). With
  ``memory_bytes`` it solves b's units in blocks (and the pairs one at a time when all of them at once do
  not fit) so that the solver's arrays stay within about that many bytes; each unit's solution is the same
  (its Lasso does not depend on the other units). ``keep_weights=False`` returns no weights (``None``): the
  losses and units used are all a caller of a large layer needs.

  Returns:
    dict: ``weights_ZxOxNxN`` (weight of a's unit i in predicting b's unit j; None unless
    ``keep_weights``), ``heldout_loss_ZxOxN``,
    ``train_loss_ZxOxN`` (NaN for dead units of b), ``used_ZxOxN`` (a's units with |weight| > USED_TOL),
    ``fit_T`` and ``heldout_T`` (the input indices), ``lambdas``, ``pairs`` and ``records``
    (a ``SparsePrediction`` per pair).
  """
  acts, pairs = _check(acts_SxTxN, pairs)
  s, t, n = acts.shape
  lambdas = [float(v) for v in lambdas]
  if not lambdas or not all(np.isfinite(v) and v > 0 for v in lambdas):
    raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas}")
  if not 0.0 < heldout < 1.0:
    raise ValueError(f"heldout must be in (0, 1), got {heldout}")
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  order = np.asarray(jax.random.permutation(key, t))
  m = int(round(heldout * t))
  if m < 1 or t - m < 2:
    raise ValueError(f"heldout={heldout} of {t} inputs leaves no held-out or fitted inputs")
  heldout_T, fit_T = np.sort(order[:m]), np.sort(order[m:])
  z_SxTxN, live_SxN = standardise(acts, fit_T)
  ia = np.asarray([a for a, _ in pairs])
  ib = np.asarray([b for _, b in pairs])
  if memory_bytes is not None and int(memory_bytes) < 1:
    raise ValueError(f"memory_bytes must be a positive number of bytes or None, got {memory_bytes}")
  blocks = _sweep_blocks(len(pairs), len(lambdas), n, memory_bytes)
  if blocks is None:  # everything in one jitted call
    weights, train, held = _lasso_sweep(jnp.asarray(z_SxTxN[:, fit_T]), jnp.asarray(z_SxTxN[:, heldout_T]),
                                        jnp.asarray(ia), jnp.asarray(ib), jnp.asarray(lambdas, jnp.float32),
                                        iterations=int(iterations))
    weights = np.asarray(weights)
    used = np.sum(np.abs(weights) > USED_TOL, axis=2)
    weights = weights if keep_weights else None
  else:
    weights, used, train, held = _lasso_blocks(z_SxTxN[:, fit_T], z_SxTxN[:, heldout_T], ia, ib, lambdas,
                                               int(iterations), blocks, keep_weights)
  live_ZxN = live_SxN[ib]
  train = np.where(live_ZxN[:, None, :], np.asarray(train, np.float64), np.nan)
  held = np.where(live_ZxN[:, None, :], np.asarray(held, np.float64), np.nan)
  used_f = np.where(live_ZxN[:, None, :], used.astype(np.float64), np.nan)
  records = [SparsePrediction(run_a=a, run_b=b, lambdas=lambdas,
                              heldout_loss=[_nanmean(held[k, j]) for j in range(len(lambdas))],
                              train_loss=[_nanmean(train[k, j]) for j in range(len(lambdas))],
                              mean_units_used=[_nanmean(used_f[k, j]) for j in range(len(lambdas))])
             for k, (a, b) in enumerate(pairs)]
  return {"weights_ZxOxNxN": weights, "heldout_loss_ZxOxN": held, "train_loss_ZxOxN": train,
          "used_ZxOxN": used, "fit_T": fit_T, "heldout_T": heldout_T, "lambdas": lambdas, "pairs": pairs,
          "records": records}


def standardise(acts_SxTxN, fit_T) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(acts − mean) / std`` with the mean and population std over the inputs ``fit_T``; dead
  units (on those inputs) 0. Returns it and the live mask ``[S, N]``."""
  x = np.asarray(acts_SxTxN, np.float64)
  fit = x[:, fit_T]
  mean, std = fit.mean(axis=1, keepdims=True), fit.std(axis=1, keepdims=True)
  live = std > _DEAD_RTOL * np.maximum(np.abs(mean), 1.0)
  z = np.where(live, (x - mean) / np.where(live, std, 1.0), 0.0)
  return z.astype(np.float32), live[:, 0, :]


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lasso_sweep(fit_SxTxN, held_SxTxN, ia_Z, ib_Z, lambdas_O, *, iterations):
  n_fit = fit_SxTxN.shape[1]
  n_held = held_SxTxN.shape[1]
  xa, xb = fit_SxTxN[ia_Z], fit_SxTxN[ib_Z]  # [Z, T, N]
  gram_ZxNxN = jnp.einsum("qti,qtj->qij", xa, xa) / n_fit
  cross_ZxNxN = jnp.einsum("qti,qtj->qij", xa, xb) / n_fit
  # FISTA step 1/L with L the largest eigenvalue of the (scaled) Gram matrix: the gradient's Lipschitz bound.
  lip_Z = jnp.linalg.eigvalsh(gram_ZxNxN)[:, -1]
  step_Z = 1.0 / jnp.maximum(lip_Z, 1e-12)
  ha, hb = held_SxTxN[ia_Z], held_SxTxN[ib_Z]
  held_gram = jnp.einsum("qti,qtj->qij", ha, ha) / n_held
  held_cross = jnp.einsum("qti,qtj->qij", ha, hb) / n_held
  return _fista(gram_ZxNxN, cross_ZxNxN, jnp.mean(xb * xb, axis=1), step_Z, held_gram, held_cross,
                jnp.mean(hb * hb, axis=1), lambdas_O, iterations)


def _fista(gram_ZxNxN, cross_ZxNxJ, yy_ZxJ, step_Z, held_gram_ZxNxN, held_cross_ZxNxJ, held_yy_ZxJ, lambdas_O,
           iterations):
  """FISTA for the Y units of run b (columns of the cross moments) of every pair and λ: the weights
  ``[Z, O, N, Y]`` and the training and held-out mean squared errors ``[Z, O, Y]``."""
  q, n = gram_ZxNxN.shape[0], gram_ZxNxN.shape[1]
  nb = cross_ZxNxJ.shape[2]
  thresh_ZxO = step_Z[:, None] * lambdas_O[None, :]

  def body(_, carry):
    w, z, t = carry
    grad = jnp.einsum("qij,qljb->qlib", gram_ZxNxN, z) - cross_ZxNxJ[:, None]
    u = z - step_Z[:, None, None, None] * grad
    w_new = jnp.sign(u) * jnp.maximum(jnp.abs(u) - thresh_ZxO[:, :, None, None], 0.0)
    t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    z_new = w_new + ((t - 1.0) / t_new) * (w_new - w)
    return w_new, z_new, t_new

  w0 = jnp.zeros((q, lambdas_O.shape[0], n, nb), jnp.float32)
  w, _, _ = jax.lax.fori_loop(0, iterations, body, (w0, w0, jnp.float32(1.0)))

  def loss(gram, cross, yy):
    # mean over inputs of (y − Xw)² from the moments: yᵀy − 2 wᵀXᵀy + wᵀXᵀXw, all divided by the count.
    fit_term = jnp.einsum("qib,qlib->qlb", cross, w)
    quad = jnp.einsum("qlib,qij,qljb->qlb", w, gram, w)
    return yy[:, None, :] - 2.0 * fit_term + quad

  return w, loss(gram_ZxNxN, cross_ZxNxJ, yy_ZxJ), loss(held_gram_ZxNxN, held_cross_ZxNxJ, held_yy_ZxJ)


# Floats the solver holds per unit of b, pair and λ (weights, FISTA iterate, gradient, step, new weights),
# and per unit of b and pair (the cross moments of the fit and held-out inputs, the squared norms).
_PER_UNIT_LAMBDA, _PER_UNIT = 5, 4


def _sweep_blocks(pairs: int, lambdas: int, n: int, memory_bytes: int | None):
  """None when the whole sweep fits ``memory_bytes`` (or no bound is set), else ``(pairs per call, units of
  b per call)``: all pairs when one unit of each fits beside their Gram matrices, else one pair a call."""
  if memory_bytes is None:
    return None
  fixed = 2 * n * n + 1  # the Gram matrices of the fit and held-out inputs, per pair
  per_unit = _PER_UNIT_LAMBDA * lambdas * n + _PER_UNIT
  budget = int(memory_bytes) // 4  # float32
  if pairs * (fixed + n * per_unit) <= budget:
    return None
  q = pairs if pairs * (fixed + per_unit) <= budget else 1
  units = max(1, min(n, (budget - q * fixed) // (q * per_unit)))
  return q, int(units)


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lasso_block(xa_ZxTxN, xb_ZxTxJ, ha_ZxTxN, hb_ZxTxJ, step_Z, gram_ZxNxN, held_gram_ZxNxN, lambdas_O, *,
                 iterations):
  n_fit, n_held = xa_ZxTxN.shape[1], ha_ZxTxN.shape[1]
  w, train, held = _fista(gram_ZxNxN, jnp.einsum("qti,qtj->qij", xa_ZxTxN, xb_ZxTxJ) / n_fit,
                          jnp.mean(xb_ZxTxJ * xb_ZxTxJ, axis=1), step_Z, held_gram_ZxNxN,
                          jnp.einsum("qti,qtj->qij", ha_ZxTxN, hb_ZxTxJ) / n_held,
                          jnp.mean(hb_ZxTxJ * hb_ZxTxJ, axis=1), lambdas_O, iterations)
  return w, jnp.sum(jnp.abs(w) > USED_TOL, axis=2), train, held


@jax.jit
def _grams(xa_ZxTxN, ha_ZxTxN):
  gram = jnp.einsum("qti,qtj->qij", xa_ZxTxN, xa_ZxTxN) / xa_ZxTxN.shape[1]
  held_gram = jnp.einsum("qti,qtj->qij", ha_ZxTxN, ha_ZxTxN) / ha_ZxTxN.shape[1]
  step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(gram)[:, -1], 1e-12)
  return gram, held_gram, step


def _lasso_blocks(fit_SxTxN, held_SxTxN, ia, ib, lambdas, iterations: int, blocks, keep_weights: bool):
  """The sweep of ``_lasso_sweep`` in blocks of ``blocks = (pairs, units of b)``; the last block of units
  is padded with zero units (their weights stay 0), so every call has one shape and compiles once."""
  q_all, n = len(ia), fit_SxTxN.shape[2]
  o = len(lambdas)
  per_pairs, per_units = blocks
  lam = jnp.asarray(lambdas, jnp.float32)
  weights = np.zeros((q_all, o, n, n), np.float32) if keep_weights else None
  used = np.zeros((q_all, o, n), np.int64)
  train = np.zeros((q_all, o, n), np.float32)
  held = np.zeros((q_all, o, n), np.float32)
  pad = -n % per_units
  for z0 in range(0, q_all, per_pairs):
    sel = np.arange(z0, min(z0 + per_pairs, q_all))
    xa, ha = jnp.asarray(fit_SxTxN[ia[sel]]), jnp.asarray(held_SxTxN[ia[sel]])
    xb = np.pad(fit_SxTxN[ib[sel]], ((0, 0), (0, 0), (0, pad)))
    hb = np.pad(held_SxTxN[ib[sel]], ((0, 0), (0, 0), (0, pad)))
    gram, held_gram, step = _grams(xa, ha)
    for y0 in range(0, n, per_units):
      y1 = min(y0 + per_units, n)
      w, u, tr, he = _lasso_block(xa, jnp.asarray(xb[:, :, y0:y0 + per_units]), ha,
                                  jnp.asarray(hb[:, :, y0:y0 + per_units]), step, gram, held_gram, lam,
                                  iterations=iterations)
      used[sel, :, y0:y1] = np.asarray(u)[:, :, :y1 - y0]
      train[sel, :, y0:y1] = np.asarray(tr)[:, :, :y1 - y0]
      held[sel, :, y0:y1] = np.asarray(he)[:, :, :y1 - y0]
      if keep_weights:
        weights[sel, :, :, y0:y1] = np.asarray(w)[:, :, :, :y1 - y0]
  return weights, used, train, held


# ---------------------------------------------------------------------------------------------------
# Many-to-many: spectral clustering.


def spectral_clusters(acts_SxTxN, pairs: Sequence[tuple[int, int]] | None = None, *,
                      clusters: int = DEFAULT_CLUSTERS, seed: int = 0, n_init: int = 10,
                      svcca_keep: float = DEFAULT_SVCCA_KEEP) -> dict:
  """Spectral clustering of the units of runs a and b together, per pair.

  The affinity of two live units is |Pearson correlation| (1 on the diagonal); the embedding is the top
  ``clusters`` eigenvectors of D^-½ A D^-½, rows normalised to unit length, clustered by k-means (k-means++
  seeding from ``seed``, the best of ``n_init`` starts by inertia).

  Returns:
    dict: ``labels_Zx2xN`` (cluster of each unit, ``[q, 0]`` run a's, ``[q, 1]`` run b's; -1 for dead
    units), ``pairs`` and
    ``records`` (a ``Clusters`` per pair).
  """
  acts, pairs = _check(acts_SxTxN, pairs)
  s, t, n = acts.shape
  if clusters < 1:
    raise ValueError(f"clusters must be >= 1, got {clusters}")
  if not 0.0 < svcca_keep <= 1.0:
    raise ValueError(f"svcca_keep must be in (0, 1], got {svcca_keep}")
  labels = np.full((len(pairs), 2 * n), -1, np.int64)
  records = []
  for k, (a, b) in enumerate(pairs):
    both = np.concatenate([acts[a], acts[b]], axis=1)
    corr = cross_correlation(both, both)
    live = _stats(both)[2]
    idx = np.flatnonzero(live)
    if idx.size:
      labels[k, idx] = spectral_labels(np.abs(corr[np.ix_(idx, idx)]), min(clusters, idx.size), seed=seed,
                                       n_init=n_init)
    records.append(_cluster_record(a, b, acts[a], acts[b], corr, labels[k], n, svcca_keep))
  return {"labels_Zx2xN": labels.reshape(len(pairs), 2, n), "pairs": pairs, "records": records}


def spectral_labels(affinity: np.ndarray, clusters: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
  """int labels of normalised spectral clustering (Ng, Jordan & Weiss) of a symmetric affinity."""
  aff = np.asarray(affinity, np.float64)
  aff = (aff + aff.T) / 2
  np.fill_diagonal(aff, 1.0)
  d = aff.sum(axis=1)
  inv = 1.0 / np.sqrt(d)
  norm = aff * inv[:, None] * inv[None, :]
  _, vecs = np.linalg.eigh(norm)
  emb = vecs[:, ::-1][:, :clusters]
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return kmeans(emb, clusters, seed=seed, n_init=n_init)


def kmeans(x_TxQ: np.ndarray, clusters: int, *, seed: int = 0, n_init: int = 10,
           iterations: int = 300) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding; the labels of the start with the least inertia."""
  x = np.asarray(x_TxQ, np.float64)
  rng = np.random.default_rng(seed)
  best, best_inertia = None, np.inf
  for _ in range(max(n_init, 1)):
    centres = _kmeans_pp(x, clusters, rng)
    for _ in range(iterations):
      dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
      lab = np.argmin(dist, axis=1)
      new = np.stack([x[lab == c].mean(axis=0) if np.any(lab == c) else centres[c] for c in range(clusters)])
      if np.allclose(new, centres, atol=1e-12, rtol=0):
        break
      centres = new
    dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    lab = np.argmin(dist, axis=1)
    inertia = dist[np.arange(len(x)), lab].sum()
    if inertia < best_inertia - 1e-12:
      best, best_inertia = lab, inertia
  return best


def _kmeans_pp(x, k, rng):
  centres = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
    total = d2.sum()
    centres.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
  return np.asarray(centres)


def _cluster_record(a, b, xa_TxN, xb_TxN, corr, labels, n, svcca_keep) -> Clusters:
  out = []
  absc = np.abs(corr)
  for c in sorted(set(labels[labels >= 0].tolist())):
    ua = np.flatnonzero(labels[:n] == c)
    ub = np.flatnonzero(labels[n:] == c)
    within = lambda u: (float((absc[np.ix_(u, u)].sum() - len(u)) / (len(u) * (len(u) - 1)))
                        if len(u) > 1 else None)
    between = float(absc[np.ix_(ua, ub + n)].mean()) if len(ua) and len(ub) else None
    cca = svcca(xa_TxN[:, ua], xb_TxN[:, ub], keep=svcca_keep) if len(ua) and len(ub) else None
    out.append(Cluster(units_a=ua.tolist(), units_b=ub.tolist(), within_a=within(ua), within_b=within(ub + n),
                       between=between, svcca=cca))
  mixed = [bool(c.units_a and c.units_b) for c in out]
  return Clusters(run_a=a, run_b=b, clusters=out, mixed_share=float(np.mean(mixed)) if out else None)


def svcca(x_TxN: np.ndarray, y_TxN: np.ndarray, *, keep: float = DEFAULT_SVCCA_KEEP) -> float | None:
  """Mean canonical correlation of two sets of units after keeping, on each side, the top singular
  directions that hold ``keep`` of its variance (Raghu et al. 2017); None if either side is constant."""
  bases = []
  for z in (x_TxN, y_TxN):
    z = np.asarray(z, np.float64)
    z = z - z.mean(axis=0)
    u, sv, _ = np.linalg.svd(z, full_matrices=False)
    var = sv ** 2
    if var.sum() <= 1e-12 * max(z.shape[0], 1):
      return None
    r = int(np.searchsorted(np.cumsum(var) / var.sum(), keep - 1e-12) + 1)
    bases.append(u[:, :min(r, int(np.sum(sv > 1e-10 * sv[0])))])
  rho = np.linalg.svd(bases[0].T @ bases[1], compute_uv=False)
  return float(np.clip(rho, 0.0, 1.0).mean())


# ---------------------------------------------------------------------------------------------------
# All three passes, and their report section.


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the passes cost: ``max_inputs`` inputs at most (a random subset, from the key), the λ grid and
  FISTA steps of the sparse prediction, the cluster count; ``enabled`` False skips them all."""
  enabled: bool = True
  max_inputs: int = 2048
  lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
  iterations: int = DEFAULT_ITERATIONS
  heldout: float = DEFAULT_HELDOUT
  clusters: int = DEFAULT_CLUSTERS
  svcca_keep: float = DEFAULT_SVCCA_KEEP
  memory_bytes: Optional[int] = None  # bound of the sparse prediction's solver (``sparse_prediction``)


def settings_of(named: typing.Mapping[str, Any]) -> Settings:
  """``Settings`` from a family's named analysis settings (``universality.engine.fields.CONVERGENT``:
  ``convergent``, ``convergent_lambdas``, ...), checked (a one-line ``ValueError`` naming the bad one)."""
  v = fields.convergent_values(named)
  return Settings(enabled=v["convergent"], max_inputs=v["convergent_inputs"], lambdas=v["convergent_lambdas"],
                  iterations=v["convergent_iterations"], clusters=v["convergent_clusters"],
                  memory_bytes=int(v["convergent_memory_gb"] * (1 << 30)))


def pairs_of(named: typing.Mapping[str, Any], runs: int) -> list[tuple[int, int]]:
  """The pairs of a cohort of ``runs`` runs that the named setting ``convergent_pairs`` compares."""
  return default_pairs(runs, fields.convergent_values(named)["convergent_pairs"])


def key_of(cohort_key, layer: int = 0):
  """The key of the passes on one layer of a cohort, from the cohort's analysis key (folded, so the
  family's other draws from that key are unchanged)."""
  return jax.random.fold_in(jax.random.fold_in(cohort_key, 0xC0417), int(layer))


def subsample(key, inputs: int, max_inputs: int) -> np.ndarray | None:
  """The sorted input indices ``analyse(acts, key=key, ...)`` keeps of ``inputs`` (None: all of them), so
  that a caller may compute the activations of those inputs alone."""
  if inputs <= max_inputs:
    return None
  k_sub, _ = jax.random.split(key)
  return np.sort(np.asarray(jax.random.permutation(k_sub, inputs))[:max_inputs])


def analyse(acts_SxTxN, pairs: Sequence[tuple[int, int]] | None = None, *, key,
            settings: Settings = Settings()) -> dict:
  """The three passes with ``settings``: a dict of record lists ``one_to_one``, ``sparse_prediction`` and
  ``clusters`` (one record per pair each); empty lists when the settings disable the passes."""
  if not settings.enabled:
    return {"one_to_one": [], "sparse_prediction": [], "clusters": []}
  if settings.max_inputs < 4:
    raise ValueError(f"max_inputs must be >= 4, got {settings.max_inputs}")
  acts = np.asarray(acts_SxTxN)
  _, k_split = jax.random.split(key)
  keep = subsample(key, acts.shape[1], settings.max_inputs) if acts.ndim == 3 else None
  if keep is not None:
    acts = acts[:, keep]
  o2o = one_to_one(acts, pairs)
  sp = sparse_prediction(acts, o2o["pairs"], key=k_split, lambdas=settings.lambdas,
                         heldout=settings.heldout, iterations=settings.iterations,
                         memory_bytes=settings.memory_bytes, keep_weights=False)
  sc = spectral_clusters(acts, o2o["pairs"], clusters=settings.clusters, svcca_keep=settings.svcca_keep)
  return {"one_to_one": o2o["records"], "sparse_prediction": sp["records"], "clusters": sc["records"]}


def _f(x, digits=3) -> str:
  return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def sections(results: dict, *, layer: str | None = None, heading: str = "###") -> str:
  """Markdown of ``analyse``'s records (any of the three lists may be missing or empty): the one-to-one
  table, the held-out loss and units used against λ, and a summary of the clusters per pair."""
  where = f" ({layer})" if layer else ""
  out = []
  o2o = results.get("one_to_one") or []
  if o2o:
    out.append(f"{heading} Convergent learning{where}: one-to-one matching\n")
    out.append("Mean correlation of each unit of run a with its partner in run b: greedy (each unit's most "
               "correlated unit) and maximum bipartite matching (one-to-one); Li et al. 2016 report 0.703 / "
               "0.663 for conv1 and 0.416 / 0.385 for conv5 of two AlexNets.\n")
    out.append(markdown_table(["runs", "units", "greedy", "max matching", "same partner"],
                              [[f"{r.run_a}–{r.run_b}", r.units, _f(r.greedy_mean), _f(r.max_mean),
                                _f(r.same_partner_share)] for r in o2o]))
  sp = results.get("sparse_prediction") or []
  if sp:
    out.append(f"{heading} Convergent learning{where}: sparse prediction\n")
    out.append("Each unit of run b predicted from all units of run a by L1-regularised regression on "
               "standardised activations: held-out loss (≈ 1 − R²) / mean units of a used, per λ.\n")
    lams = sp[0].lambdas
    out.append(markdown_table(["runs"] + [f"λ={v:g}" for v in lams],
                              [[f"{r.run_a}–{r.run_b}"] + [f"{_f(h)} / {_f(u, 1)}" for h, u in
                                                            zip(r.heldout_loss, r.mean_units_used)]
                               for r in sp]))
  sc = results.get("clusters") or []
  if sc:
    out.append(f"{heading} Convergent learning{where}: spectral clusters\n")
    out.append("Units of both runs clustered together on |correlation|: mixed clusters hold units of both "
               "runs; correlations are mean |r| within each run's part and between the parts.\n")
    rows = []
    for r in sc:
      mixed = [c for c in r.clusters if c.units_a and c.units_b]
      mean = lambda xs: _f(_nanmean([np.nan if x is None else x for x in xs]) if xs else None)
      rows.append([f"{r.run_a}–{r.run_b}", len(r.clusters), _f(r.mixed_share),
                   mean([c.within_a for c in mixed] + [c.within_b for c in mixed]),
                   mean([c.between for c in mixed]), mean([c.svcca for c in mixed])])
    out.append(markdown_table(["runs", "clusters", "mixed share", "within (mixed)", "between (mixed)",
                               "SVCCA (mixed)"], rows))
  return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Per layer: JSON, means over pairs and the table of every layer (the report of a family with several).

KINDS = {"one_to_one": OneToOne, "sparse_prediction": SparsePrediction, "clusters": Clusters}


def to_json(results: dict) -> dict:
  """``analyse``'s records as plain JSON: ``{kind: [record, ...]}`` plus their ``means`` (``layer_means``)."""
  out = {k: [r.to_json() for r in results.get(k) or []] for k in KINDS}
  out["means"] = layer_means(results)
  return _jsonable(out)


def from_json(obj: typing.Mapping[str, Any]) -> dict:
  """``to_json``'s output read back as typed records (``means`` as plain JSON)."""
  out = {k: [cls.from_json(r) for r in obj.get(k) or []] for k, cls in KINDS.items()}
  out["means"] = dict(obj.get("means") or {})
  return out


def layer_means(results: dict) -> dict:
  """Means over the pairs of ``analyse``'s records: one-to-one (``greedy_mean``, ``max_mean``,
  ``same_partner_share``), sparse prediction per λ (``lambdas``, ``heldout_loss``, ``mean_units_used``) and
  clusters (``mixed_share``); None where no pair has a value."""
  mean = lambda xs: _nanmean([np.nan if x is None else x for x in xs])  # noqa: E731
  o2o = results.get("one_to_one") or []
  sp = results.get("sparse_prediction") or []
  sc = results.get("clusters") or []
  lams = sp[0].lambdas if sp else []
  return {"pairs": len(o2o),
          "greedy_mean": mean([r.greedy_mean for r in o2o]), "max_mean": mean([r.max_mean for r in o2o]),
          "same_partner_share": mean([r.same_partner_share for r in o2o]), "lambdas": list(lams),
          "heldout_loss": [mean([r.heldout_loss[j] for r in sp]) for j in range(len(lams))],
          "mean_units_used": [mean([r.mean_units_used[j] for r in sp]) for j in range(len(lams))],
          "mixed_share": mean([r.mixed_share for r in sc])}


def settings_text(named: typing.Mapping[str, Any]) -> str:
  """A clause for a report's settings line naming the passes' settings (``settings_of``'s names); empty
  when the passes are off."""
  if not named.get("convergent"):
    return ""
  v = fields.convergent_values(named)
  pairs = v["convergent_pairs"] or "all"
  return (f"; Convergent Learning passes on {v['convergent_inputs']} sampled inputs, {pairs} pairs of runs "
          f"per cohort, L1 penalties λ = {', '.join(f'{x:g}' for x in v['convergent_lambdas'])} "
          f"({v['convergent_iterations']} FISTA steps), {v['convergent_clusters']} spectral clusters")


def layer_table(by_layer: typing.Mapping[str, dict]) -> str:
  """Markdown: one row per layer of the means over pairs (``layer_means``), Li et al.'s table for our
  models: greedy and maximum-matching mean correlation, same partner, held-out loss and units used at the
  smallest and largest λ, mixed clusters."""
  rows = []
  lams = []
  for layer, results in by_layer.items():
    m = layer_means(results)
    lams = m["lambdas"] or lams
    ends = (lambda xs, d=3: f"{_f(xs[0], d)} / {_f(xs[-1], d)}" if xs else "–")
    rows.append([layer, m["pairs"], _f(m["greedy_mean"]), _f(m["max_mean"]), _f(m["same_partner_share"]),
                 ends(m["heldout_loss"]), ends(m["mean_units_used"], 1), _f(m["mixed_share"])])
  lam = f" (λ={lams[0]:g} / {lams[-1]:g})" if lams else ""
  return markdown_table(["layer", "pairs", "greedy", "max matching", "same partner", f"held-out loss{lam}",
                         f"units used{lam}", "mixed clusters"], rows)


__all__ = ["Cluster", "Clusters", "OneToOne", "Settings", "SparsePrediction", "analyse", "cross_correlation",
           "default_pairs", "from_json", "key_of", "kmeans", "layer_means", "layer_table", "one_to_one",
           "pairs_of", "sections", "settings_of", "settings_text", "sparse_prediction", "spectral_clusters",
           "spectral_labels", "standardise", "subsample", "svcca", "to_json"]
