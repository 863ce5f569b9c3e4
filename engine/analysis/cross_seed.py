"""Cross-seed comparison of hidden representations: do runs of one group learn the same neurons?

All passes take the hidden activations of every run on the same inputs, ``acts_SxTxN`` (for a group task:
all |G|² pairs), and compare every pair of runs at once.

* ``neuron_correlations`` (Gurnee et al. 2024, *Universal neurons in GPT2*): for neuron n of run i and every
  run j, the maximum Pearson correlation over run j's neurons (the streaming kernel of
  ``universality.kernels.correlation``, so the full S·N × S·N matrix never reaches memory), the same maximum after mixing
  run j's neurons by a random orthogonal matrix (the baseline: a rotation keeps the subspace but destroys
  the neuron basis), the excess correlation (mean over the other runs of max − baseline max) and the
  universal neurons (excess above 0.5).
* ``irrep_agreement``: how often a neuron and its best match in another run share their dominant irrep,
  against the rate expected if the match were a random live neuron of that run.
* ``match_neurons`` (Li et al. 2016, *Convergent learning*): a one-to-one matching of the neurons of every
  pair of runs maximising the summed correlation (Hungarian algorithm), and the mean matched correlation.
* ``representation_similarity``: linear CKA (Kornblith et al. 2019), the orthogonal Procrustes distance
  (Williams et al. 2021: centred, unit-Frobenius representations, d = √(2 − 2‖XᵢᵀXⱼ‖_*), 0 for a rotated
  and rescaled copy, at most √2) and mutual k-nearest-neighbour alignment (Huh et al. 2024: the mean over
  inputs of the overlap of the k nearest neighbours, by cosine similarity of centred activations, in the two
  representations), for all pairs of runs in one jitted pass, as ``[S, S]`` matrices.

Each pass also has a form that reads the inputs only through their co-moments (``*_from_comoments``: a
``universality.kernels.correlation.CoMoments`` of all S·N neurons, accumulated over blocks of inputs by Chan's
merge) and, for the k-NN alignment, the activations on its subsample of inputs (``knn_subset``), so that a
caller can stream the inputs instead of holding ``acts_SxTxN``
(``universality.engine.families.group.passes.pipeline``).

Dead neurons (constant over the inputs) have no correlation; they are excluded from every mean, and in the
matching they count as correlation 0.

Local shape letters:

  Q  the classes neurons are sorted into (e.g. each neuron's dominant irrep)
  J  the k nearest neighbours of a sample
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from universality.kernels import correlation as correlation_lib
from universality.kernels import screen as screen_lib

DEFAULT_UNIVERSAL_THRESHOLD = 0.5


def _check_acts(acts_SxTxN, min_runs: int = 2) -> jax.Array:
  acts_SxTxN = jnp.asarray(acts_SxTxN)
  if acts_SxTxN.ndim != 3:
    raise ValueError(f"acts must be [S, T, N], got shape {acts_SxTxN.shape}")
  s, t, n = acts_SxTxN.shape
  if s < min_runs:
    raise ValueError(f"cross-seed comparison needs at least {min_runs} runs, got {s}")
  if t < 2 or n < 1:
    raise ValueError(f"acts need at least 2 inputs and 1 neuron, got shape {acts_SxTxN.shape}")
  return acts_SxTxN


@jax.jit
def live_neurons(acts_SxTxN) -> jax.Array:
  """bool ``[S, N]``: neurons that vary over the inputs (std > 1e-6 · max(|mean|, 1), as in ``kernels``)."""
  x = acts_SxTxN.astype(jnp.float32)
  return jnp.std(x, axis=1) > 1e-6 * jnp.maximum(jnp.abs(x.mean(axis=1)), 1.0)


def live_from_comoments(state: correlation_lib.CoMoments) -> np.ndarray:
  """bool ``[S, N]``: ``live_neurons`` from streamed moments (population std = √(M2 / count))."""
  count = float(state.count)
  mean = np.asarray(state.mean_SxN, np.float64)
  std = np.sqrt(np.maximum(np.asarray(state.m2_SxN, np.float64), 0.0) / max(count, 1.0))
  return std > 1e-6 * np.maximum(np.abs(mean), 1.0)


# ---------------------------------------------------------------------------------------------------
# Neuron correlations.


def neuron_correlations(acts_SxTxN, *, key, universal_threshold: float = DEFAULT_UNIVERSAL_THRESHOLD,
                        backend: str = "auto", screen: screen_lib.Screen | str | None = None,
                        **kernel_options) -> dict:
  """Max correlation of every neuron in every other run, the rotation baseline and the excess.

  Args:
    acts_SxTxN: hidden activations of S ≥ 2 runs on the same T inputs; or a re-iterable source of
      ``acts_SxBxN`` batches (``universality.kernels.correlation.max_correlation``), so that T is not bounded by memory.
    key: PRNG key of the random orthogonal rotations of the baseline.
    universal_threshold: a live neuron is universal when its excess correlation exceeds this.
    backend: passed to ``universality.kernels.correlation.max_correlation`` ('auto': Pallas on GPU/TPU, XLA on CPU).
    screen: ``universality.kernels.screen`` settings (a ``Screen`` or a mode, 'auto' | 'on' | 'off'); None:
      the exact pass. The screened pass gives the same maxima (module docstring there).
    **kernel_options: further options of ``max_correlation`` (e.g. ``memory_bytes``).

  Returns:
    dict of arrays: ``max_SxNxS`` and ``argmax_SxNxS`` (for j = i: over the other neurons of run i),
    ``baseline_max_SxNxS``, ``excess_SxN`` (mean over j ≠ i of max − baseline max; NaN for dead neurons),
    ``universal_SxN`` (bool), ``dead_SxN`` (bool), ``universal_fraction_S`` (over live neurons); with a
    screen also ``settled_SxN`` (``screen_lib.SETTLED_*``) and ``screen_margin``.
  """
  if not callable(acts_SxTxN):
    acts_SxTxN = _check_acts(acts_SxTxN)
  if not np.isfinite(universal_threshold):
    raise ValueError(f"universal_threshold must be finite, got {universal_threshold}")
  # One pass over the data gives both the maximum and its rotation baseline.
  if screen is None:
    res = correlation_lib.max_correlation(acts_SxTxN, backend=backend, baseline="rotation", key=key,
                                          **kernel_options)
    return _correlation_record(res, universal_threshold)
  res = screen_lib.max_correlation(acts_SxTxN, screen=screen, backend=backend, baseline="rotation", key=key,
                                   **kernel_options)
  return dict(_correlation_record(res, universal_threshold), settled_SxN=res.settled_SxN,
              screen_margin=res.margin)


def neuron_correlations_from_comoments(state: correlation_lib.CoMoments, *, key,
                                       universal_threshold: float = DEFAULT_UNIVERSAL_THRESHOLD) -> dict:
  """``neuron_correlations`` from co-moments of every neuron accumulated over the inputs (all rows of a
  ``universality.kernels.correlation.CoMoments``, e.g. streamed over blocks of pairs); the same dict."""
  if not np.isfinite(universal_threshold):
    raise ValueError(f"universal_threshold must be finite, got {universal_threshold}")
  if state.shape[0] < 2:
    raise ValueError(f"cross-seed comparison needs at least 2 runs, got {state.shape[0]}")
  res = correlation_lib.finalize(state, baseline="rotation", key=key)
  return _correlation_record(res, universal_threshold)


def _correlation_record(res, universal_threshold) -> dict:
  max_SxNxS, base_SxNxS = jnp.asarray(res.max_SxNxS), jnp.asarray(res.baseline_max_SxNxS)
  dead_SxN = jnp.asarray(res.dead_SxN)
  excess_SxN, universal_SxN, frac_S = _excess(max_SxNxS, base_SxNxS, dead_SxN,
                                              jnp.float32(universal_threshold))
  return {"max_SxNxS": max_SxNxS, "argmax_SxNxS": jnp.asarray(res.argmax_SxNxS),
          "baseline_max_SxNxS": base_SxNxS, "excess_SxN": excess_SxN, "universal_SxN": universal_SxN,
          "dead_SxN": dead_SxN, "universal_fraction_S": frac_S}


@jax.jit
def _excess(max_SxNxS, base_SxNxS, dead_SxN, threshold):
  s = max_SxNxS.shape[0]
  other_SxS = ~jnp.eye(s, dtype=bool)
  diff = jnp.where(other_SxS[:, None, :], max_SxNxS - base_SxNxS, 0.0)
  excess_SxN = diff.sum(axis=-1) / (s - 1)
  excess_SxN = jnp.where(dead_SxN, jnp.nan, excess_SxN)
  universal_SxN = (excess_SxN > threshold) & ~dead_SxN
  live_S = jnp.sum(~dead_SxN, axis=1)
  frac_S = jnp.sum(universal_SxN, axis=1) / jnp.maximum(live_S, 1)
  return excess_SxN, universal_SxN, frac_S


def irrep_agreement(argmax_SxNxS, dominant_SxN, dead_SxN, mask_SxN=None) -> dict:
  """How often neuron n of run i and its best match in run j ≠ i share their dominant irrep.

  Args:
    argmax_SxNxS: best-matching neuron of run j for neuron n of run i (``neuron_correlations``).
    dominant_SxN: int, each neuron's dominant irrep (``representation.neuron_irreps``).
    dead_SxN: bool, neurons to leave out (on either side of a match).
    mask_SxN: optional bool, restrict the source neurons (e.g. to the universal ones).

  Returns:
    dict of floats: ``rate`` (agreement over all counted (i, n, j)), ``chance`` (the agreement expected if
    each match were a random live neuron of run j) and ``count`` (number of (i, n, j) counted).
  """
  argmax_SxNxS, dominant_SxN = jnp.asarray(argmax_SxNxS), jnp.asarray(dominant_SxN)
  dead_SxN = jnp.asarray(dead_SxN, dtype=bool)
  chex.assert_rank(argmax_SxNxS, 3)
  s, n, s2 = argmax_SxNxS.shape
  if s2 != s or dominant_SxN.shape != (s, n) or dead_SxN.shape != (s, n):
    raise ValueError(f"shapes disagree: argmax {argmax_SxNxS.shape}, dominant {dominant_SxN.shape}, "
                     f"dead {dead_SxN.shape}")
  mask_SxN = jnp.ones((s, n), bool) if mask_SxN is None else jnp.asarray(mask_SxN, dtype=bool)
  chex.assert_shape(mask_SxN, (s, n))
  if dominant_SxN.size and int(dominant_SxN.min()) < 0:
    raise ValueError("dominant irrep indices must be >= 0")
  n_classes = int(dominant_SxN.max()) + 1 if dominant_SxN.size else 1
  agree, chance, count = _irrep_agreement(argmax_SxNxS.astype(jnp.int32), dominant_SxN.astype(jnp.int32),
                                          dead_SxN, mask_SxN, n_classes=n_classes)
  count = int(count)
  return {"rate": float(agree) / count if count else float("nan"),
          "chance": float(chance) / count if count else float("nan"), "count": count}


@functools.partial(jax.jit, static_argnames=("n_classes",))
def _irrep_agreement(argmax_SxNxS, dominant_SxN, dead_SxN, mask_SxN, *, n_classes):
  s, n = dominant_SxN.shape
  j_S = jnp.arange(s)
  partner_dom_SxNxS = dominant_SxN[j_S[None, None, :], argmax_SxNxS]
  partner_dead_SxNxS = dead_SxN[j_S[None, None, :], argmax_SxNxS]
  counted = ((mask_SxN & ~dead_SxN)[:, :, None] & ~partner_dead_SxNxS & (argmax_SxNxS >= 0)
             & ~jnp.eye(s, dtype=bool)[:, None, :])
  agree = jnp.sum(counted & (partner_dom_SxNxS == dominant_SxN[:, :, None]))
  # Share of run j's live neurons whose dominant irrep equals that of neuron (i, n), from per-run histograms.
  onehot_SxNxQ = jax.nn.one_hot(dominant_SxN, n_classes, dtype=jnp.float32)
  hist_SxQ = jnp.sum(onehot_SxNxQ * (~dead_SxN)[:, :, None], axis=1)
  hist_SxQ = hist_SxQ / jnp.maximum(hist_SxQ.sum(axis=1, keepdims=True), 1.0)
  share_SxNxS = jnp.einsum("inr,jr->inj", onehot_SxNxQ, hist_SxQ)
  chance = jnp.sum(jnp.where(counted, share_SxNxS, 0.0))
  return agree, chance, jnp.sum(counted)


# ---------------------------------------------------------------------------------------------------
# One-to-one matching.


def match_neurons(acts_SxTxN) -> dict:
  """Maximum-weight one-to-one matching of the neurons of every pair of runs on their correlation.

  Returns:
    dict of numpy arrays: ``perm_SxSxN`` (neuron n of run i is matched to neuron perm[i, j, n] of run j;
    the identity for j = i), ``matched_corr_SxSxN`` (NaN where either neuron is dead) and
    ``mean_matched_SxS`` (mean over matched pairs of live neurons; 1 on the diagonal).
  """
  acts_SxTxN = _check_acts(acts_SxTxN)
  s, _, n = acts_SxTxN.shape
  corr = correlation_lib.correlation_matrix(acts_SxTxN)
  return _match(np.asarray(corr).reshape(s, n, s, n), np.asarray(live_neurons(acts_SxTxN)))


def match_neurons_from_comoments(state: correlation_lib.CoMoments) -> dict:
  """``match_neurons`` from co-moments of every neuron (all rows, like ``neuron_correlations_from_comoments``
  takes)."""
  s, n = state.shape
  if s < 2:
    raise ValueError(f"cross-seed comparison needs at least 2 runs, got {s}")
  corr = correlation_lib.correlation_from_comoments(state)
  return _match(np.asarray(corr).reshape(s, n, s, n), live_from_comoments(state))


def _match(corr_SxNxSxN: np.ndarray, live_SxN: np.ndarray) -> dict:
  s, n = live_SxN.shape
  perm = np.tile(np.arange(n), (s, s, 1))
  matched = np.full((s, s, n), np.nan)
  for i in range(s):
    matched[i, i] = np.where(live_SxN[i], 1.0, np.nan)
    for j in range(i + 1, s):
      block = np.nan_to_num(np.asarray(corr_SxNxSxN[i, :, j, :], np.float64), nan=0.0)
      rows, cols = scipy.optimize.linear_sum_assignment(block, maximize=True)
      perm[i, j, rows] = cols
      perm[j, i, cols] = rows
      vals = np.where(live_SxN[i][rows] & live_SxN[j][cols], block[rows, cols], np.nan)
      matched[i, j, rows] = vals
      matched[j, i, cols] = vals
  with np.errstate(invalid="ignore"):
    counts = np.sum(np.isfinite(matched), axis=-1)
    mean = np.where(counts > 0, np.nansum(matched, axis=-1) / np.maximum(counts, 1), np.nan)
  return {"perm_SxSxN": perm, "matched_corr_SxSxN": matched, "mean_matched_SxS": mean}


# ---------------------------------------------------------------------------------------------------
# Representation similarity.


def representation_similarity(acts_SxTxN, *, k: int = 10, knn_inputs: int = 1024, key=None) -> dict:
  """Linear CKA, orthogonal Procrustes distance and mutual k-NN alignment of every pair of runs.

  Args:
    acts_SxTxN: hidden activations of S runs on the same T inputs.
    k: neighbours per input in the mutual k-NN alignment (1 ≤ k < number of k-NN inputs).
    knn_inputs: the k-NN alignment uses at most this many inputs (a T × T similarity per run would not
      fit for large groups), drawn without replacement with ``key``; all of them when T ≤ knn_inputs.
    key: PRNG key of that subsample (needed only when T > knn_inputs).

  Returns:
    dict of float32 ``[S, S]`` arrays ``cka``, ``procrustes`` and ``mutual_knn``.
  """
  acts_SxTxN = _check_acts(acts_SxTxN, min_runs=1)
  subset_U = jnp.asarray(knn_subset(acts_SxTxN.shape[1], knn_inputs, key))
  if not 1 <= k < subset_U.shape[0]:
    raise ValueError(f"k must be in [1, {subset_U.shape[0] - 1}], got {k}")
  cka, procrustes, knn = _representation_similarity(acts_SxTxN, subset_U, k=k)
  return {"cka": cka, "procrustes": procrustes, "mutual_knn": knn}


@jax.jit
def _gram_blocks(acts_SxTxN):
  """Centred cross-covariance blocks ``[S, S, N, N]`` = XᵢᵀXⱼ: one matmul for all pairs."""
  x = acts_SxTxN.astype(jnp.float32)
  x = x - x.mean(axis=1, keepdims=True)
  return jnp.einsum("itn,jtm->ijnm", x, x)


def knn_subset(n_inputs: int, knn_inputs: int, key) -> np.ndarray:
  """int ``[U]``: the inputs of the mutual k-NN alignment (all of them when ``n_inputs <= knn_inputs``)."""
  if knn_inputs < 2:
    raise ValueError(f"knn_inputs must be >= 2, got {knn_inputs}")
  if n_inputs > knn_inputs:
    if key is None:
      raise ValueError(f"{n_inputs} inputs exceed knn_inputs={knn_inputs}: pass a key for the subsample")
    return np.asarray(jax.random.choice(key, n_inputs, (knn_inputs,), replace=False))
  return np.arange(n_inputs)


def similarity_from_comoments(state: correlation_lib.CoMoments, knn_acts_SxUxN, *, k: int = 10) -> dict:
  """``representation_similarity`` from co-moments of every neuron over all inputs (all rows; the centred
  cross-covariances XᵢᵀXⱼ) and the activations on the k-NN inputs (``knn_subset``)."""
  s, n = state.shape
  knn_acts_SxUxN = _check_acts(knn_acts_SxUxN, min_runs=1)
  if not 1 <= k < knn_acts_SxUxN.shape[1]:
    raise ValueError(f"k must be in [1, {knn_acts_SxUxN.shape[1] - 1}], got {k}")
  c_SxSxNxN = jnp.asarray(state.comoment_RxSxN).reshape(s, n, s, n).transpose(0, 2, 1, 3)
  cka, procrustes = _cka_procrustes(c_SxSxNxN)
  return {"cka": cka, "procrustes": procrustes, "mutual_knn": _mutual_knn_jit(knn_acts_SxUxN, k=k)}


@functools.partial(jax.jit, static_argnames=("k",))
def _representation_similarity(acts_SxTxN, subset_U, *, k):
  cka, procrustes = _cka_procrustes(_gram_blocks(acts_SxTxN))
  return cka, procrustes, _mutual_knn(acts_SxTxN[:, subset_U], k)


@jax.jit
def _cka_procrustes(c_SxSxNxN):
  s = c_SxSxNxN.shape[0]
  diag_SxNxN = c_SxSxNxN[jnp.arange(s), jnp.arange(s)]
  # CKA = ‖XᵢᵀXⱼ‖²_F / (‖XᵢᵀXᵢ‖_F ‖XⱼᵀXⱼ‖_F), the feature-space form of HSIC with linear kernels.
  hsic_SxS = jnp.sum(c_SxSxNxN * c_SxSxNxN, axis=(2, 3))
  self_S = jnp.sqrt(jnp.sum(diag_SxNxN * diag_SxNxN, axis=(1, 2)))
  cka = hsic_SxS / jnp.maximum(self_S[:, None] * self_S[None, :], 1e-30)
  # Procrustes: min over orthogonal Q of ‖X̂ᵢ − X̂ⱼQ‖_F for unit-norm X̂ equals √(2 − 2‖X̂ᵢᵀX̂ⱼ‖_*).
  sq_norm_S = jnp.trace(diag_SxNxN, axis1=1, axis2=2)
  nuclear_SxS = jnp.sum(jnp.linalg.svd(c_SxSxNxN, compute_uv=False), axis=-1)
  nuclear_SxS = nuclear_SxS / jnp.maximum(jnp.sqrt(sq_norm_S[:, None] * sq_norm_S[None, :]), 1e-30)
  return cka, jnp.sqrt(jnp.maximum(2.0 - 2.0 * nuclear_SxS, 0.0))


def _mutual_knn(acts_SxUxN, k):
  u = acts_SxUxN.shape[1]
  x = acts_SxUxN.astype(jnp.float32)
  x = x - x.mean(axis=1, keepdims=True)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  def adjacency(x_UxN):  # one run at a time: one U×U similarity in memory, not S of them
    sim_UxU = jnp.where(jnp.eye(u, dtype=bool), -jnp.inf, x_UxN @ x_UxN.T)
    _, nbrs_UxJ = jax.lax.top_k(sim_UxU, k)
    return jnp.zeros((u, u), jnp.float32).at[jnp.arange(u)[:, None], nbrs_UxJ].set(1.0)

  adj_SxUxU = jax.lax.map(adjacency, x)
  return jnp.einsum("iuv,juv->ij", adj_SxUxU, adj_SxUxU) / (u * k)


_mutual_knn_jit = jax.jit(_mutual_knn, static_argnames=("k",))
