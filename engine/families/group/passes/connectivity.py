"""Linear mode connectivity across seeds (*Mechanistic Mode Connectivity*, Lubana et al. 2023; *Git
Re-Basin*, Ainsworth et al. 2023): is the straight path between two seeds' solutions a valley, once their
neurons are put in the same order?

The MLP is h = ReLU(P_a[a] + P_b[b]), logits = h·U. The path interpolates the **effective** weights
(P_a = W_a·W₁[:E], P_b = W_b·W₁[E:], U), not the raw W_a, W₁: the raw weights also have an embedding-space
symmetry (W_a → W_aQ, W₁[:E] → QᵀW₁[:E] for any invertible Q) that no neuron permutation aligns, and
every point of the effective path is again a model of the same form. What remains to align is the order of
the hidden neurons:

* **raw**: no alignment;
* **activation matching**: the one-to-one matching of the two runs' neurons that maximises their summed
  activation correlation on all pairs (``cross_seed.match_neurons``, Hungarian algorithm);
* **weight matching**: the permutation maximising Σ_n ⟨θ_i[n], θ_j[π(n)]⟩ over the neurons' effective
  weights θ[n] = (P_a[:, n], P_b[:, n], U[n]). With a single permuted layer, Git Re-Basin's coordinate
  descent is one linear assignment.

Along λ ∈ [0, 1] (``points`` values, ends included) the loss and accuracy on all |G|² pairs; the
**barrier** is max_λ L(λ) − ((1 − λ)L(0) + λL(1)). One jitted pass mapped over pairs of runs in batches; each
pair's path points go through ``representation.mlp_loss`` like runs, in blocks of inputs sized by a memory
budget (never ``points`` whole hidden layers of |G|² × N).

Local shape letters:

  J  a neuron's weights from input a, from input b and to the output classes, concatenated
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from universality.engine.families.group.passes import representation as rep

DEFAULT_POINTS = 25
ALIGNMENTS = ("raw", "activation", "weight")


def pairs_of(n_runs: int) -> np.ndarray:
  """int ``[Z, 2]``: every pair (i, j) with i < j."""
  i, j = np.triu_indices(n_runs, k=1)
  return np.stack([i, j], axis=1)


def weight_matching(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, pairs_Zx2) -> np.ndarray:
  """int ``[Z, N]``: for each pair (i, j), neuron n of run i is matched to neuron perm[p, n] of run j,
  maximising the summed inner products of the neurons' effective weights."""
  pa, pb, u = (np.asarray(x, np.float64) for x in (pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN))
  chex.assert_rank([pa, pb, u], 3)
  feats_SxNxJ = np.concatenate([pa.transpose(0, 2, 1), pb.transpose(0, 2, 1), u.transpose(0, 2, 1)], axis=2)
  pairs_Zx2 = np.asarray(pairs_Zx2, np.int64).reshape(-1, 2)
  sim_ZxNxN = np.einsum("pnf,pmf->pnm", feats_SxNxJ[pairs_Zx2[:, 0]], feats_SxNxJ[pairs_Zx2[:, 1]])
  perm = np.empty(sim_ZxNxN.shape[:2], np.int64)
  for p, sim in enumerate(sim_ZxNxN):  # one assignment problem per pair (scipy, on the host)
    rows, cols = scipy.optimize.linear_sum_assignment(sim, maximize=True)
    perm[p, rows] = cols
  return perm


def path_losses(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, table_GxG, pairs_Zx2, perm_ZxN, *,
                points: int = DEFAULT_POINTS, batch: int = 4,
                memory_bytes: int = rep.DEFAULT_MEMORY_BYTES) -> dict:
  """Loss and accuracy on all pairs along the linear path from run i to run j (neurons of j reordered by
  ``perm``), and the barrier.

  Args:
    pre_a_SxGxN, pre_b_SxGxN: effective first-layer weights; unembed_SxVxN: unembedding rows per class
      (padded classes sliced off).
    table_GxG: the Cayley table; pairs_Zx2: (i, j) run indices; perm_ZxN: run j's neuron at position n.
    points: path points, λ = 0 and 1 included; batch: pairs evaluated together.
    memory_bytes: working memory of those pairs' blocks of inputs (``representation.loss_chunks``).

  Returns:
    dict of float32 ``loss_ZxO``, ``accuracy_ZxO``, ``lambda_O`` and ``barrier_Z``.
  """
  pa, pb, u = (jnp.asarray(x, jnp.float32) for x in (pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN))
  chex.assert_rank([pa, pb, u], 3)
  chex.assert_equal_shape([pa, pb])
  s, g, n = pa.shape
  chex.assert_shape(u, (s, g, n))
  pairs_Zx2 = jnp.asarray(pairs_Zx2, jnp.int32).reshape(-1, 2)
  perm_ZxN = jnp.asarray(perm_ZxN, jnp.int32)
  chex.assert_shape(perm_ZxN, (pairs_Zx2.shape[0], n))
  if points < 2:
    raise ValueError(f"points must be >= 2, got {points}")
  lam_O = jnp.linspace(0.0, 1.0, points, dtype=jnp.float32)
  batch = max(1, min(batch, pairs_Zx2.shape[0]))
  rows, runs = rep.loss_chunks(g, n, g, points, max(memory_bytes // batch, 1))
  loss, acc = _paths(pa, pb, u, jnp.asarray(table_GxG, jnp.int32), pairs_Zx2, perm_ZxN, lam_O, batch=batch,
                     rows=rows, runs=runs)
  ends = loss[:, :1] * (1.0 - lam_O)[None, :] + loss[:, -1:] * lam_O[None, :]
  return {"loss_ZxO": loss, "accuracy_ZxO": acc, "lambda_O": lam_O, "barrier_Z": jnp.max(loss - ends, axis=1)}


@functools.partial(jax.jit, static_argnames=("batch", "rows", "runs"))
def _paths(pa, pb, u, table_GxG, pairs_Zx2, perm_ZxN, lam_O, *, batch, rows, runs):
  def one_pair(args):
    (i, j), perm_N = args

    def path(x0_GxN, x1_GxN):  # the L points of the path, stacked like runs
      return (1 - lam_O)[:, None, None] * x0_GxN[None] + lam_O[:, None, None] * x1_GxN[None]

    return rep.mlp_loss(path(pa[i], pa[j][:, perm_N]), path(pb[i], pb[j][:, perm_N]),
                        path(u[i], u[j][:, perm_N]), table_GxG, rows=rows, runs=runs)

  return jax.lax.map(one_pair, (pairs_Zx2, perm_ZxN), batch_size=batch)


def connectivity(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, table_GxG, activation_perm_SxSxN=None, *,
                 points: int = DEFAULT_POINTS, memory_bytes: int = rep.DEFAULT_MEMORY_BYTES) -> dict:
  """Paths between every pair of runs under each alignment (``raw``, ``activation`` when
  ``activation_perm_SxSxN`` from ``cross_seed.match_neurons`` is given, ``weight``).

  Returns:
    ``{"pairs_Zx2", "lambda_O", alignment: {"perm_ZxN", "loss_ZxO", "accuracy_ZxO", "barrier_Z"}}`` as numpy.
  """
  s, _, n = np.shape(pre_a_SxGxN)
  pairs = pairs_of(s)
  perms = {"raw": np.tile(np.arange(n), (len(pairs), 1))}
  if activation_perm_SxSxN is not None:
    perms["activation"] = np.asarray(activation_perm_SxSxN)[pairs[:, 0], pairs[:, 1]]
  perms["weight"] = weight_matching(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, pairs)
  out: dict = {"pairs_Zx2": pairs}
  for name, perm in perms.items():
    res = {k: np.asarray(v) for k, v in path_losses(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, table_GxG, pairs,
                                                      perm, points=points).items()}
    out["lambda_O"] = res.pop("lambda_O")
    out[name] = dict(res, perm_ZxN=perm)
  return out


def cohort_record(res: dict, key_irreps: list[list[str]], generalised: list[bool]) -> dict:
  """JSON-ready: S×S barrier matrices per alignment, mean barriers over all pairs, over pairs of generalised
  runs with the same and with different key-irrep sets, the mean loss path, and the key-irrep Jaccard."""
  pairs = res["pairs_Zx2"]
  s = len(key_irreps)
  sets = [set(k) for k in key_irreps]
  jac = np.eye(s)
  for i, j in pairs:
    union = sets[i] | sets[j]
    jac[i, j] = jac[j, i] = len(sets[i] & sets[j]) / len(union) if union else 1.0
  both = np.asarray([generalised[i] and generalised[j] for i, j in pairs], bool)
  same = np.asarray([sets[i] == sets[j] for i, j in pairs], bool)
  mean = lambda x: float(np.mean(x)) if np.size(x) else None  # noqa: E731
  out = {"points": int(len(res["lambda_O"])), "weights": "effective (P_a, P_b, U)",
         "key_irrep_jaccard": jac, "alignments": {}}
  for name in ALIGNMENTS:
    if name not in res:
      continue
    r = res[name]
    mat = np.zeros((s, s))
    mat[pairs[:, 0], pairs[:, 1]] = mat[pairs[:, 1], pairs[:, 0]] = r["barrier_Z"]
    out["alignments"][name] = {
        "barrier": mat, "mean_barrier": mean(r["barrier_Z"]),
        "mean_barrier_same_key_irreps": mean(r["barrier_Z"][both & same]),
        "mean_barrier_different_key_irreps": mean(r["barrier_Z"][both & ~same]),
        "pairs_same_key_irreps": int(np.sum(both & same)), "pairs_different_key_irreps": int(np.sum(both & ~same)),
        "mean_loss_path": r["loss_ZxO"].mean(axis=0), "mean_min_accuracy": mean(r["accuracy_ZxO"].min(axis=1))}
  return out
