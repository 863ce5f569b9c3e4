"""Each hidden neuron's split over irreps when the model has no additive pre-activation (the transformer):
the share of its mean-removed activation, as a function of a·b, in each irrep's span; the trivial share is
the part that is not a function of a·b. Same arrays as ``representation.neuron_irreps``: ``share_SxNxR``,
``dominant_SxN`` (the largest non-trivial share), ``dominant_share_SxN`` (its share of the non-trivial part).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from universality.engine.families.group.passes import representation as rep


def from_fibres(fibre_SxGxN, mean_SxN, m2_SxN, group, irreps) -> dict:
  """``from_hidden`` from streamed sums: ``fibre_SxGxN`` the fibre means of the hidden layer
  (mean over the pairs with a·b = m), ``mean_SxN`` and ``m2_SxN`` each neuron's mean and Σ (h − mean)² over
  all pairs. Same keys."""
  tables = rep.irrep_tables(group, irreps)
  fibre = jnp.asarray(fibre_SxGxN, jnp.float32) - jnp.asarray(mean_SxN, jnp.float32)[:, None, :]
  s, g, n = fibre.shape
  per_SNxR = rep.fibre_fve(jnp.moveaxis(fibre, 2, 1).reshape(s * n, g, 1),
                           jnp.asarray(m2_SxN, jnp.float32).reshape(s * n),
                           jnp.asarray(tables.basis_GxF, jnp.float32),
                           jnp.asarray(tables.basis_member_FxR, jnp.float32))
  return _neuron_shares(np.array(per_SNxR, dtype=np.float32).reshape(s, n, -1))


def from_hidden(hidden_SxGxGxN, group, irreps) -> dict:
  """Per-neuron split of each neuron's activation, as a function of a·b, over irreps.

  For models whose pre-activation is not P_a[a] + P_b[b] (the transformer): a neuron's share in irrep ρ is
  the share of its (mean-removed) activation in the span of (a, b) ↦ ρ_ij(a·b); the trivial share is the
  part that is not a function of a·b. Same keys as ``representation.neuron_irreps``.
  """
  tables = rep.irrep_tables(group, irreps)
  h = jnp.asarray(hidden_SxGxGxN, jnp.float32)
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
