"""Redundancy within a model (*Network Feature Complexity*, Iterative Feature Merging): how many distinct
features does a run's hidden layer hold once functionally equivalent neurons are merged?

For the MLP h_n = ReLU(P_a[a, n] + P_b[b, n]) and logits = Σ_n h_n U[n]. A neuron whose incoming weights
w_m = (P_a[:, m], P_b[:, m]) are c·w_n with c > 0 computes c·h_n (ReLU is positively homogeneous), so it can
be removed and its outgoing weights folded into n's, U[n] += c·U[m], without changing the function.

Iterative merging, per run: neurons that are never active on any pair are dropped first (they contribute
nothing); then repeatedly the pair of remaining neurons with the largest cosine similarity of incoming
weights (scale-invariant) is merged — the one with the smaller incoming norm into the other, with the
least-squares scale c = ⟨w_m, w_n⟩/‖w_n‖² — as long as the cross-entropy on all |G|² pairs stays within
``tolerance`` of the unmerged model's. The width left is the run's **feature complexity**.

One ``lax.while_loop`` over merges, vectorised over runs (a run that has stopped keeps its state).

Local shape letters:

  J  a neuron's input weights from a and from b, concatenated
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from universality.engine.families.group.passes import representation as rep

DEFAULT_TOLERANCE = 0.01


def merge_features(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, table_GxG, *,
                   tolerance: float = DEFAULT_TOLERANCE,
                   memory_bytes: int = rep.DEFAULT_MEMORY_BYTES) -> dict:
  """Iterative feature merging of every run (module docstring).

  Args:
    pre_a_SxGxN, pre_b_SxGxN: effective first-layer weights; unembed_SxVxN: unembedding rows per class
      (padded classes sliced off); table_GxG: the Cayley table.
    tolerance: the largest rise of the loss on all pairs a merge may cause.
    memory_bytes: working memory of one block of pairs in the loss (``representation.loss_chunks``).

  Returns:
    dict of arrays: ``alive_SxN`` (neurons left), ``unembed_SxVxN`` (outgoing weights after folding),
    ``width_S`` (feature complexity), ``never_active_S``, ``merges_S``, ``loss_S`` (before) and
    ``merged_loss_S`` (after).
  """
  pa, pb, u = (jnp.asarray(x, jnp.float32) for x in (pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN))
  chex.assert_rank([pa, pb, u], 3)
  chex.assert_equal_shape([pa, pb])
  s, g, n = pa.shape
  chex.assert_shape(u, (s, g, n))
  if not np.isfinite(tolerance) or tolerance < 0:
    raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
  rows, runs = rep.loss_chunks(g, n, g, s, memory_bytes)
  return _merge(pa, pb, u, jnp.asarray(table_GxG, jnp.int32), jnp.float32(tolerance), rows=rows, runs=runs)


@functools.partial(jax.jit, static_argnames=("rows", "runs"))
def _merge(pa, pb, u, table_GxG, tolerance, *, rows, runs):
  s, _, n = pa.shape

  def _loss(pa_SxGxN, pb_SxGxN, u_SxVxN, alive_SxN, table):
    # A removed neuron's outgoing weights are zeroed, which removes it from the logits.
    return rep.mlp_loss(pa_SxGxN, pb_SxGxN, u_SxVxN * alive_SxN[:, None, :], table, rows=rows, runs=runs)[0]

  w_SxNxJ = jnp.concatenate([pa, pb], axis=1).transpose(0, 2, 1)
  norm_SxN = jnp.linalg.norm(w_SxNxJ, axis=-1)
  unit = w_SxNxJ / jnp.maximum(norm_SxN, 1e-30)[..., None]
  cos_SxNxN = jnp.einsum("snf,smf->snm", unit, unit)
  dots_SxNxN = jnp.einsum("snf,smf->snm", w_SxNxJ, w_SxNxJ)
  ever_active_SxN = jnp.any(pa.max(axis=1)[:, None, :] + pb.max(axis=1)[:, None, :] > 0, axis=1)
  loss0_S = _loss(pa, pb, u, jnp.ones((s, n)), table_GxG)
  runs_S = jnp.arange(s)

  def propose(state):
    alive, u_cur, _, _ = state
    pair_ok = alive[:, :, None] & alive[:, None, :] & ~jnp.eye(n, dtype=bool)[None]
    score = jnp.where(pair_ok, cos_SxNxN, -jnp.inf).reshape(s, n * n)
    flat = jnp.argmax(score, axis=1)
    i, j = flat // n, flat % n
    # Keep the neuron with the larger incoming norm; fold the other in with its least-squares scale.
    keep = jnp.where(norm_SxN[runs_S, i] >= norm_SxN[runs_S, j], i, j)
    drop = jnp.where(keep == i, j, i)
    c_S = dots_SxNxN[runs_S, keep, drop] / jnp.maximum(norm_SxN[runs_S, keep] ** 2, 1e-30)
    u_new = u_cur.at[runs_S, :, keep].add(c_S[:, None] * u_cur[runs_S, :, drop])
    u_new = u_new.at[runs_S, :, drop].set(0.0)
    alive_new = alive.at[runs_S, drop].set(False)
    return alive_new, u_new, jnp.isfinite(score.max(axis=1))

  def body(state):
    alive, u_cur, done, merges = state
    alive_new, u_new, valid = propose(state)
    loss_S = _loss(pa, pb, u_new, alive_new.astype(jnp.float32), table_GxG)
    accept = ~done & valid & (loss_S <= loss0_S + tolerance)
    alive = jnp.where(accept[:, None], alive_new, alive)
    u_cur = jnp.where(accept[:, None, None], u_new, u_cur)
    return alive, u_cur, done | ~accept, merges + accept.astype(jnp.int32)

  u_start = u * ever_active_SxN[:, None, :]
  state = (ever_active_SxN, u_start, jnp.zeros((s,), bool), jnp.zeros((s,), jnp.int32))
  alive, u_out, _, merges = jax.lax.while_loop(lambda st: ~jnp.all(st[2]), body, state)
  return {"alive_SxN": alive, "unembed_SxVxN": u_out, "width_S": alive.sum(axis=1),
          "never_active_S": n - ever_active_SxN.sum(axis=1), "merges_S": merges, "loss_S": loss0_S,
          "merged_loss_S": _loss(pa, pb, u_out, alive.astype(jnp.float32), table_GxG)}
