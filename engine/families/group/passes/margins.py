"""Margins (*Feature emergence via margin maximization*, Morwani et al. 2023): how far each checkpoint is
from the max-margin solutions the paper derives, and the neuron structure those solutions have.

The MLP is h = ReLU(P_a[a] + P_b[b]), logits = h·U (``universality.engine.families.group.models``): in the
effective per-neuron weights θ_n = (P_a[:, n], P_b[:, n], U[n, :]) it is positively homogeneous of degree ν =
2 (scaling every θ_n by t scales the logits by t²). The raw weights (W_a, W_b, W₁, U) are of degree 3, but the
same function has many raw parametrisations; the effective weights are the function's own.

* **Normalised margin**: min over all |G|² pairs of (correct logit − largest wrong logit), divided by
  ‖θ‖^ν = Σ_n ‖θ_n‖² (ν = 2, so the L_{2,ν} norm of the paper raised to ν is the plain squared norm of the
  effective weights). Positive once every pair is classified correctly; gradient descent on a homogeneous
  network with small weight decay raises it towards the max-margin value.
* **Single-irrep neurons**: live neurons whose dominant non-trivial irrep holds at least a share
  ``single_threshold`` of the non-constant part of the pre-activation (``representation.neuron_irreps``);
  the paper's max-margin solutions are made of such neurons only.
* **Irrep coverage**: the share of non-trivial irreps that are the irrep of at least one single-irrep neuron.
  For cyclic groups the paper's max-margin solution uses every frequency (coverage 1, ``predicted_coverage``);
  for other groups it states no such count, and the prediction is None.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SINGLE_THRESHOLD = 0.9
HOMOGENEITY = 2  # the MLP in its effective weights (module docstring)


def normalised_margin(logits_SxGxGxV, table_GxG, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN) -> dict:
  """Margin of every run on all pairs and its normalisation by the effective weights' norm.

  Args:
    logits_SxGxGxV: logits on all pairs (padded classes sliced off).
    table_GxG: the group's Cayley table (the correct class of each pair).
    pre_a_SxGxN, pre_b_SxGxN: effective first-layer weights; unembed_SxVxN: unembedding rows per class.

  Returns:
    dict of float32 ``margin_S`` (min over pairs of correct − best wrong logit), ``norm_S`` (‖θ‖^ν, the
    summed squares of the effective weights) and ``normalised_S`` (their ratio).
  """
  logits_SxGxGxV = jnp.asarray(logits_SxGxGxV)
  pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN = (jnp.asarray(x) for x in (pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN))
  chex.assert_rank([logits_SxGxGxV, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN], [4, 3, 3, 3])
  s, g = logits_SxGxGxV.shape[:2]
  chex.assert_shape(logits_SxGxGxV, (s, g, g, g))
  chex.assert_equal_shape([pre_a_SxGxN, pre_b_SxGxN])
  chex.assert_shape(unembed_SxVxN, (s, g, pre_a_SxGxN.shape[2]))
  return _normalised_margin(logits_SxGxGxV, jnp.asarray(table_GxG, jnp.int32), pre_a_SxGxN, pre_b_SxGxN,
                            unembed_SxVxN)


@jax.jit
def _normalised_margin(logits_SxGxGxV, table_GxG, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN):
  logits = logits_SxGxGxV.astype(jnp.float32)
  target_SxGxGx1 = jnp.broadcast_to(table_GxG[None, :, :, None], logits.shape[:3] + (1,))
  correct = jnp.take_along_axis(logits, target_SxGxGx1, axis=-1)[..., 0]
  is_target = jnp.arange(logits.shape[-1])[None, None, None, :] == target_SxGxGx1
  wrong = jnp.max(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  return _normalise(jnp.min(correct - wrong, axis=(1, 2)), pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN)


def normalise(margin_S, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN) -> dict:
  """``normalised_margin``'s dict from a margin computed elsewhere (e.g. streamed over blocks of pairs:
  the minimum over pairs of correct − best wrong logit)."""
  arrays = [jnp.asarray(x) for x in (margin_S, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN)]
  chex.assert_rank(arrays, [1, 3, 3, 3])
  return _normalise(*arrays)


@jax.jit
def _normalise(margin_S, pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN):
  norm_S = sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2))
               for x in (pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN)) ** (HOMOGENEITY / 2)
  margin_S = margin_S.astype(jnp.float32)
  return {"margin_S": margin_S, "norm_S": norm_S, "normalised_S": margin_S / jnp.maximum(norm_S, 1e-30)}


def single_irrep_neurons(share_SxNxR, live_SxN, threshold: float = DEFAULT_SINGLE_THRESHOLD) -> dict:
  """Single-irrep neurons and irrep coverage (module docstring).

  Args:
    share_SxNxR: per neuron, its pre-activation's share in each irrep (index 0 the constant part).
    live_SxN: bool, the neurons to count.

  Returns:
    dict of numpy ``single_SxN`` (bool), ``irrep_SxN`` (the dominant non-trivial irrep), ``fraction_S``
    (single-irrep share of live neurons), ``covered_SxR`` (bool, irreps with a single-irrep neuron; index 0
    False) and ``coverage_S`` (covered share of the non-trivial irreps).
  """
  share_SxNxR = np.asarray(share_SxNxR, np.float64)
  live_SxN = np.asarray(live_SxN, bool)
  chex.assert_rank([share_SxNxR, live_SxN], [3, 2])
  if share_SxNxR.shape[:2] != live_SxN.shape:
    raise ValueError(f"shapes disagree: share {share_SxNxR.shape}, live {live_SxN.shape}")
  r = share_SxNxR.shape[2]
  nontrivial = share_SxNxR[..., 1:]
  rest = nontrivial.sum(-1)
  top = nontrivial.max(-1, initial=0.0)
  irrep_SxN = np.argmax(nontrivial, -1) + 1 if r > 1 else np.zeros(live_SxN.shape, np.int64)
  single_SxN = live_SxN & (rest > 1e-12) & (top >= threshold * np.maximum(rest, 1e-12))
  covered_SxR = np.zeros(share_SxNxR.shape[::2], bool)
  s_idx, n_idx = np.nonzero(single_SxN)
  covered_SxR[s_idx, irrep_SxN[s_idx, n_idx]] = True
  covered_SxR[:, 0] = False
  return {"single_SxN": single_SxN, "irrep_SxN": irrep_SxN,
          "fraction_S": single_SxN.sum(1) / np.maximum(live_SxN.sum(1), 1),
          "covered_SxR": covered_SxR, "coverage_S": covered_SxR.sum(1) / max(r - 1, 1)}


def predicted_coverage(group_name: str) -> float | None:
  """The coverage of the paper's max-margin solutions where it states one: every frequency of C_n."""
  return 1.0 if group_name.startswith("C") and group_name[1:].isdigit() else None
