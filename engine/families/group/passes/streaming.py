"""The streamed pass over all |G|² pairs of one group: blocks of pairs through the model, every run at once.

The logits of all pairs are S·|G|³ floats (1.5 GB per run for S6) and are never held: each checkpoint is
one pass over blocks of pairs whose size ``pair_chunk`` sets from a memory budget (the last block padded,
so each jitted function compiles once). A block adds what every statistic needs to running sums: per-pair
logit-similarity cosines, cross-entropy, correct pairs, the minimum margin; at the final step also the
hidden layer summed per fibre a·b = m, per a and per b (O(S·|G|·N)) and the co-moments of all S·N neurons
(Chan's merge, ``universality.kernels.correlation``; (S·N)² floats, independent of |G|).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from universality.engine.families.group.passes import representation as rep
from universality.kernels import correlation as correlation_lib

ApplyFn = Callable[[Any, Any, Any], tuple[Any, Any]]


def _checked(out, shape_SxB: tuple, order: int):
  """``apply_fn``'s ``(logits, hidden)`` after checking their shapes against the inputs' ``[S, B]``."""
  lg, hd = out
  if lg.ndim != 3 or lg.shape[:2] != shape_SxB or lg.shape[2] < order:
    raise ValueError(f"apply_fn must return logits [{shape_SxB[0]}, B, V>={order}], got {lg.shape}")
  if hd.ndim != 3 or hd.shape[:2] != shape_SxB:
    raise ValueError(f"apply_fn must return hidden [{shape_SxB[0]}, B, N], got {hd.shape}")
  return lg, hd


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
    lg, hd = _checked(apply_fn(params_S, a_SxB, b_SxB), a_SxB.shape, order)
    lg, hd = np.asarray(lg), np.asarray(hd)
    logits.append(lg[..., :order].astype(np.float32))
    hidden.append(hd.astype(np.float32))
  logits_SxPxV = np.concatenate(logits, axis=1)
  hidden_SxPxN = np.concatenate(hidden, axis=1)
  return (logits_SxPxV.reshape(n_runs, order, order, order),
          hidden_SxPxN.reshape(n_runs, order, order, -1))


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
    lg, hd = _checked(apply_fn(params_S, a_SxB, np.broadcast_to(b_P, a_SxB.shape)), a_SxB.shape, order)
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
def _accumulate(sums, logits_SxPxV, hidden_SxPxN, a_P, b_P, valid, table, c_of_GxG, character_GxR,
                char_norm_R):
  """``sums`` plus one block of pairs: Σ per-pair cosines per irrep, Σ cross-entropy, Σ correct, min margin
  and, when ``sums`` has them, the hidden layer summed per fibre a·b = m, per a, per b, and Σ H²."""
  g = table.shape[0]
  logits = logits_SxPxV[..., :g].astype(jnp.float32)
  w_P = (jnp.arange(a_P.shape[0]) < valid).astype(jnp.float32)
  m_P = table[a_P, b_P]
  cos_SxPxR = rep.pair_cosines(logits, m_P, c_of_GxG, character_GxR, char_norm_R)
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
