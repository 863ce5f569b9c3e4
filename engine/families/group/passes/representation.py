"""Representation-theoretic passes over stacked runs: which irreps does each model use, and how much?

Every pass takes arrays with a leading run axis ``S`` and the real irreps of ``universality.engine.irreps``
for any finite group (trivial irrep first), and is jitted; the group enters as constant tables built once per
call (``irrep_tables``), so a second call with the same shapes does not recompile.

Definitions (following *A Toy Model of Universality*, Chughtai et al. 2023, and its code):

* **Logit similarity** of irrep ρ: for every input pair (a, b), the cosine over the classes c between the
  logits centred over c and the character tr ρ(a·b·c⁻¹) (also centred over c, which only matters for the
  trivial irrep, whose similarity is therefore 0); the mean over all |G|² pairs. A model implementing the
  paper's algorithm with irreps ρ₁, ρ₂, … has L(a, b, c) ∝ Σ_k w_k tr ρ_k(a·b·c⁻¹) and similarity
  w_k √k_ρ / ‖w√k‖ (k_ρ = 1, 2, 4 the Frobenius–Schur type).
* **Fraction of logits explained**: Σ over non-trivial irreps of similarity². Characters of inequivalent
  real irreps are orthogonal functions of c, so this is at most 1 for every pair, and exactly 1 for logits
  that are sums of characters.
* **Key irreps**: similarity at the final checkpoint above a threshold (0.005, the paper's code:
  ``utils/metrics.py: determine_key_reps``). A run that has not generalised has a small similarity with every
  irrep, so at this threshold it lists nearly all of them: key irreps of such runs mean little.
* **FVE** (fraction of variance explained) of a matrix whose rows are indexed by group elements (embeddings
  a and b, the unembedding rows c, the pre-activations P_a, P_b): the share of its squared Frobenius norm in
  the span of each irrep's matrix entries g ↦ ρ_ij(g) (``Irrep.basis``). The spans of all irreps are
  orthogonal and together span every function on G, so the FVEs of one matrix sum to 1. As in the paper's
  code the matrices are not centred: the trivial irrep carries the mean.
* **Hidden FVE**: the hidden activations are a function of the pair (a, b). The paper's algorithm computes
  ρ(a)ρ(b) = ρ(a·b) in the hidden layer, and the logits of a correct model depend on a·b alone, so the
  function space that matters is the functions of a·b: the hidden FVE of ρ is the share of ‖H‖² (over all
  pairs, not centred, as in the paper's code) in the span of the functions (a, b) ↦ ρ_ij(a·b). Its sum over
  irreps is the share of the hidden layer that is a function of a·b at all (``hidden_fve`` returns it too);
  the rest depends on a and b separately and is read out only through the ReLU interactions.
* **Restricted / excluded loss** (MLP, as in the paper's code): project the total embeddings
  P_a = W_a·W₁[:E] and P_b (rows a, b) onto the span of the key irreps (restricted) or onto its orthogonal
  complement (excluded), recompute ReLU(P_a[a] + P_b[b]) and the logits, and take the cross-entropy over all
  |G|² pairs. A model that uses exactly its key irreps keeps a low restricted loss and a high excluded loss.
  ``excluded_each`` removes one irrep at a time.
* **Learning order**: the first checkpointed step at which an irrep's logit similarity exceeds a threshold of
  its own (0.05, the paper's ``determine_key_rep_order.py``), higher than the key-irrep one so that the date
  is that of the irrep's rise, not of its first trace.
* **Per-neuron irrep**: a neuron's pre-activation f(a, b) = P_a[a, n] + P_b[b, n] is a function on G × G.
  Writing P_a = ū + u′ with u′ of mean 0 (likewise P_b), ‖f‖² = |G|²(ū + v̄)² + |G|‖u′‖² + |G|‖v′‖² exactly,
  and u′, v′ split over the non-trivial irreps. The neuron's share in a non-trivial irrep ρ is
  |G|(‖Π_ρ P_a‖² + ‖Π_ρ P_b‖²)/‖f‖²; the trivial share is the constant part. The dominant irrep is the
  non-trivial irrep of largest share, and its ``dominant_share`` is relative to the non-constant part.

Local shape letters:

  J  the functions on G a pass decomposes (a model's neurons or output classes)
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from universality.engine import groups as groups_lib

DEFAULT_KEY_THRESHOLD = 0.005    # Chughtai et al.'s determine_key_reps
DEFAULT_ORDER_THRESHOLD = 0.05   # Chughtai et al.'s learning order
DEFAULT_MEMORY_BYTES = 10 ** 9    # working memory of one block of pairs in the streamed passes
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------
# Constant tables.


@dataclasses.dataclass(frozen=True, eq=False)
class IrrepTables:
  """The irreps of one group stacked into arrays that jitted passes take as arguments.

  Attributes:
    names: irrep names, trivial first.
    dims: int ``[R]`` dimensions D.
    frobenius_schur: int ``[R]`` indicators (1 real, 0 complex, -1 quaternionic type).
    character_RxG: float64 characters.
    entries_GxF: every irrep's matrix entries g ↦ ρ_ij(g), concatenated (F = Σ d_ρ² = |G| columns).
    entry_member_FxR: one-hot, which irrep each entry column belongs to.
    basis_GxF: every irrep's ``basis`` concatenated; an orthogonal matrix (F = |G|).
    basis_member_FxR: one-hot, which irrep each basis column belongs to.
    table: int32 ``[G, G]`` the group's Cayley table; inverse: int32 ``[G]``.
    irreps: the irreps these tables were built from.
  """

  names: tuple[str, ...]
  dims: np.ndarray
  frobenius_schur: np.ndarray
  character_RxG: np.ndarray
  entries_GxF: np.ndarray
  entry_member_FxR: np.ndarray
  basis_GxF: np.ndarray
  basis_member_FxR: np.ndarray
  table: np.ndarray
  inverse: np.ndarray
  irreps: tuple

  @property
  def num_irreps(self) -> int:
    return len(self.names)

  @property
  def order(self) -> int:
    return int(self.table.shape[0])


def irrep_tables(group: groups_lib.Group, irreps) -> IrrepTables:
  """Checks ``irreps`` against ``group`` and stacks them (see ``IrrepTables``).

  Every pass accepts either the list of irreps or these tables; build the tables once when calling many
  passes on a large group (the checks cost O(|G|³)). Raises ValueError if the irreps are empty, have the
  wrong number of elements, are not orthogonal, do not put the trivial irrep first, or if their bases do
  not together form an orthonormal basis of functions on the group (a missing or repeated irrep).
  """
  if not isinstance(group, groups_lib.Group):
    raise ValueError(f"expected an universality.engine.groups.Group, got {type(group).__name__}")
  if isinstance(irreps, IrrepTables):
    if not np.array_equal(irreps.table, group.table):
      raise ValueError(f"the irrep tables were built for another group than {group.name}")
    return irreps
  irreps = list(irreps)
  if not irreps:
    raise ValueError("irreps is empty: pass universality.engine.irreps.real_irreps(group)")
  n = group.order
  entries, entry_owner, bases, basis_owner, chars = [], [], [], [], []
  for r, irrep in enumerate(irreps):
    mats = np.asarray(irrep.matrices, dtype=np.float64)
    if mats.ndim != 3 or mats.shape[0] != n or mats.shape[1] != mats.shape[2]:
      raise ValueError(f"irrep {irrep.name!r}: matrices must be [{n}, D, D], got {mats.shape}")
    d = mats.shape[1]
    gram = np.einsum("gij,gkj->gik", mats, mats)
    if not np.allclose(gram, np.eye(d)[None], atol=1e-6):
      raise ValueError(f"irrep {irrep.name!r}: matrices are not orthogonal")
    basis = np.asarray(irrep.basis, dtype=np.float64)
    if basis.ndim != 2 or basis.shape[0] != n:
      raise ValueError(f"irrep {irrep.name!r}: basis must be [{n}, M], got {basis.shape}")
    entries.append(mats.reshape(n, d * d))
    entry_owner += [r] * (d * d)
    bases.append(basis)
    basis_owner += [r] * basis.shape[1]
    chars.append(np.asarray(irrep.character, dtype=np.float64).reshape(n))
  character = np.stack(chars)
  if not np.allclose(character[0], 1.0):
    raise ValueError(f"the first irrep must be the trivial one, got {irreps[0].name!r}")
  basis_GxF = np.concatenate(bases, axis=1)
  if basis_GxF.shape[1] != n or not np.allclose(basis_GxF.T @ basis_GxF, np.eye(n), atol=1e-6):
    raise ValueError(f"the irreps' bases do not form an orthonormal basis of functions on {group.name} "
                     f"({basis_GxF.shape[1]} columns for order {n}): an irrep is missing or repeated")
  r_count = len(irreps)
  return IrrepTables(
      names=tuple(str(ir.name) for ir in irreps),
      dims=np.asarray([ir.matrices.shape[1] for ir in irreps], dtype=np.int32),
      frobenius_schur=np.asarray([int(ir.frobenius_schur) for ir in irreps], dtype=np.int32),
      character_RxG=character,
      entries_GxF=np.concatenate(entries, axis=1),
      entry_member_FxR=np.eye(r_count)[np.asarray(entry_owner)],
      basis_GxF=basis_GxF,
      basis_member_FxR=np.eye(r_count)[np.asarray(basis_owner)],
      table=np.asarray(group.table, dtype=np.int32),
      inverse=np.asarray(group.inverse, dtype=np.int32),
      irreps=tuple(irreps),
  )


def _f32(x: np.ndarray) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _check_group_axis(name: str, size: int, tables: IrrepTables) -> None:
  if size != tables.order:
    raise ValueError(f"{name}: axis of size {size} does not match the group order {tables.order} "
                     "(slice padded classes off first)")


# ---------------------------------------------------------------------------------------------------
# Logit similarity.


def logit_similarity(logits_SxGxGxV, group: groups_lib.Group, irreps) -> jax.Array:
  """float32 ``[S, R]``: mean over pairs (a, b) of cos_c(centred L[a, b, :], tr ρ(a·b·c⁻¹)) per irrep."""
  tables = irrep_tables(group, irreps)
  logits_SxGxGxV = jnp.asarray(logits_SxGxGxV)
  chex.assert_rank(logits_SxGxGxV, 4)
  _, a, b, c = logits_SxGxGxV.shape
  for name, size in (("A", a), ("B", b), ("C", c)):
    _check_group_axis(f"logits axis {name}", size, tables)
  c_of_GxG, character_GxR, char_norm_R = similarity_constants(tables)
  return _logit_similarity(logits_SxGxGxV, c_of_GxG, character_GxR, jnp.asarray(tables.table), char_norm_R)


@jax.jit
def _logit_similarity(logits_SxGxGxV, c_of_GxG, character_GxR, table_GxG, char_norm_R):
  s, a, b, c = logits_SxGxGxV.shape
  cos_SxPxR = pair_cosines(logits_SxGxGxV.reshape(s, a * b, c), table_GxG.reshape(a * b), c_of_GxG,
                           character_GxR, char_norm_R)
  return cos_SxPxR.mean(axis=1)


def pair_cosines(logits_SxPxV, product_P, c_of_GxG, character_GxR, char_norm_R):
  """float32 ``[S, P, R]``: per pair, cos_c(centred logits, tr ρ(m·c⁻¹)) with m = ``product_P`` (= a·b).

  Traceable building block of ``logit_similarity`` for any set of pairs
  (``universality.engine.families.group.passes.pipeline`` streams all |G|² pairs through it in blocks); the
  constants are ``similarity_constants``.
  """
  # Σ_c L[c] χ(m·c⁻¹) = Σ_y L[y⁻¹·m] χ(y): reorder each pair's logits by y, then one product with the
  # characters ([P, G] × [G, R]); the G³ trace cube is never built, nor a |G|²-wide projection per pair.
  logits = logits_SxPxV.astype(jnp.float32)
  centred = logits - logits.mean(-1, keepdims=True)
  by_y_SxPxG = centred[:, jnp.arange(product_P.shape[0])[:, None], c_of_GxG[product_P]]
  dot_SxPxR = jnp.einsum("spy,yr->spr", by_y_SxPxG, character_GxR, precision=jax.lax.Precision.HIGHEST)
  logit_norm_SxP = jnp.sqrt(jnp.sum(centred * centred, axis=-1))
  # Non-trivial characters sum to 0 over c, so centring them changes nothing; the trivial one centres to 0.
  denom = logit_norm_SxP[..., None] * char_norm_R[None, None, :]
  return jnp.where(denom > _EPS, dot_SxPxR / jnp.maximum(denom, _EPS), 0.0)


def similarity_constants(tables: "IrrepTables") -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(c_of_GxG, character_GxR, char_norm_R)``: the constants of ``pair_cosines`` (int32 y⁻¹·m; float32
  characters and the norms of the centred characters)."""
  n = tables.order
  c_of_GxG = tables.table[tables.inverse[None, :], np.arange(n)[:, None]]  # [m, y] = y⁻¹·m
  char_norm_R = np.linalg.norm(tables.character_RxG - tables.character_RxG.mean(1, keepdims=True), axis=1)
  return jnp.asarray(c_of_GxG, jnp.int32), _f32(tables.character_RxG.T), _f32(char_norm_R)


def fraction_explained(sim_SxR) -> jax.Array:
  """float32 ``[S]``: Σ over non-trivial irreps (index ≥ 1) of similarity²."""
  sim_SxR = jnp.asarray(sim_SxR)
  chex.assert_rank(sim_SxR, 2)
  return jnp.sum(jnp.square(sim_SxR[:, 1:]), axis=1)


def key_irreps(sim_SxR, threshold: float = DEFAULT_KEY_THRESHOLD) -> jax.Array:
  """bool ``[S, R]``: irreps whose logit similarity exceeds ``threshold`` (never the trivial one)."""
  sim_SxR = jnp.asarray(sim_SxR)
  chex.assert_rank(sim_SxR, 2)
  if not np.isfinite(threshold):
    raise ValueError(f"threshold must be finite, got {threshold}")
  return _key_irreps(sim_SxR, jnp.float32(threshold))


@jax.jit
def _key_irreps(sim_SxR, threshold):
  return (sim_SxR > threshold).at[:, 0].set(False)


def logit_fourier_power(logits_SxGxGxV, group: groups_lib.Group, irreps) -> jax.Array:
  """float32 ``[S, R]``: each irrep's share of the Fourier power of g ↦ mean centred L[a, b, c], a·b·c⁻¹ = g.

  The paper's logits are functions of a·b·c⁻¹; averaging the centred logits over the |G|² triples of each
  g keeps that part, and ``universality.engine.irreps.fourier_power`` splits it over irreps. Shares are normalised over
  the non-trivial irreps (the trivial share is 0 after centring), so on key irreps they should agree with
  sim² / Σ sim² from ``logit_similarity``.
  """
  from universality.engine import irreps as irreps_lib  # pylint: disable=import-outside-toplevel

  tables = irrep_tables(group, irreps)
  logits_SxGxGxV = jnp.asarray(logits_SxGxGxV)
  chex.assert_rank(logits_SxGxGxV, 4)
  for name, size in zip("ABC", logits_SxGxGxV.shape[1:]):
    _check_group_axis(f"logits axis {name}", size, tables)
  f_SxG = _mean_over_abcinv(logits_SxGxGxV, jnp.asarray(tables.table), jnp.asarray(tables.inverse))
  power_SxR = jnp.asarray(irreps_lib.fourier_power(np.asarray(f_SxG, dtype=np.float64), list(tables.irreps)))
  power_SxR = power_SxR.at[:, 0].set(0.0)
  total = power_SxR.sum(axis=1, keepdims=True)
  return jnp.where(total > _EPS, power_SxR / jnp.maximum(total, _EPS), 0.0).astype(jnp.float32)


@jax.jit
def _mean_over_abcinv(logits_SxGxGxV, table, inverse):
  n = table.shape[0]
  logits = logits_SxGxGxV.astype(jnp.float32)
  centred = logits - logits.mean(-1, keepdims=True)
  # First the mean over pairs with a·b = m (each m has |G| pairs (a, a⁻¹m)), then over c = g⁻¹·m.
  b_of_GxG = table[inverse[:, None], jnp.arange(n)[None, :]]
  by_m_SxGxGxV = jnp.take_along_axis(centred, b_of_GxG[None, :, :, None], axis=2)
  by_m_SxGxV = by_m_SxGxGxV.mean(axis=1)
  c_of_GxG = table[inverse[:, None], jnp.arange(n)[None, :]]  # c = g⁻¹·m
  f_SxGxG = jnp.take_along_axis(by_m_SxGxV[:, None, :, :], c_of_GxG[None, :, :, None], axis=3)[..., 0]
  return f_SxGxG.mean(axis=2)


# ---------------------------------------------------------------------------------------------------
# Fractions of variance explained.


def fve(x_SxGxJ, group: groups_lib.Group, irreps) -> jax.Array:
  """float32 ``[S, R]``: share of ‖x‖² (rows indexed by group element, not centred) in each irrep's span.

  Use it for embeddings ``[S, G, E]``, unembeddings ``[S, G, N]`` (rows c; slice padded classes off) and
  total embeddings P_a, P_b ``[S, G, N]``. Rows sum to 1 (up to rounding) for any non-zero input.
  """
  tables = irrep_tables(group, irreps)
  x_SxGxJ = jnp.asarray(x_SxGxJ)
  chex.assert_rank(x_SxGxJ, 3)
  _check_group_axis("fve rows", x_SxGxJ.shape[1], tables)
  return _fve(x_SxGxJ, _f32(tables.basis_GxF), _f32(tables.basis_member_FxR))


@jax.jit
def _fve(x_SxGxJ, basis_GxF, member_FxR):
  x = x_SxGxJ.astype(jnp.float32)
  coef_SxFxJ = jnp.einsum("gm,sgf->smf", basis_GxF, x)
  energy_SxR = jnp.einsum("smf,mr->sr", coef_SxFxJ * coef_SxFxJ, member_FxR)
  total_S = jnp.sum(x * x, axis=(1, 2))
  return energy_SxR / jnp.maximum(total_S, _EPS)[:, None]


def hidden_fve(hidden_SxGxGxN, group: groups_lib.Group, irreps) -> jax.Array:
  """float32 ``[S, R]``: share of ‖H‖² over all pairs in the span of (a, b) ↦ ρ_ij(a·b), per irrep.

  The sum over irreps is the share of the hidden layer that is a function of a·b (see module docstring).
  """
  tables = irrep_tables(group, irreps)
  hidden_SxGxGxN = jnp.asarray(hidden_SxGxGxN)
  chex.assert_rank(hidden_SxGxGxN, 4)
  for name, size in zip("AB", hidden_SxGxGxN.shape[1:3]):
    _check_group_axis(f"hidden axis {name}", size, tables)
  return _hidden_fve(hidden_SxGxGxN, _f32(tables.basis_GxF), _f32(tables.basis_member_FxR),
                     jnp.asarray(tables.table), jnp.asarray(tables.inverse))


@jax.jit
def _hidden_fve(hidden_SxGxGxN, basis_GxF, member_FxR, table, inverse):
  n = table.shape[0]
  h = hidden_SxGxGxN.astype(jnp.float32)
  # Orthogonal projection onto functions of a·b = the mean over each fibre {(a, a⁻¹m)}.
  b_of_GxG = table[inverse[:, None], jnp.arange(n)[None, :]]
  by_m_SxGxN = jnp.take_along_axis(h, b_of_GxG[None, :, :, None], axis=2).mean(axis=1)
  return fibre_fve(by_m_SxGxN, jnp.sum(h * h, axis=(1, 2, 3)), basis_GxF, member_FxR)


def fibre_fve(by_m_SxGxN, total_S, basis_GxF, member_FxR):
  """float32 ``[S, R]``: ``hidden_fve`` from the fibre means of H (mean over the pairs with a·b = m) and
  ‖H‖² over all pairs; traceable, so a streamed pass that accumulates those two gives the same numbers."""
  n = basis_GxF.shape[0]
  # Lifting a function of a·b back to pairs multiplies squared norms by the fibre size |G|.
  coef_SxFxN = jnp.einsum("gm,sgn->smn", basis_GxF, by_m_SxGxN.astype(jnp.float32))
  energy_SxR = n * jnp.einsum("smn,mr->sr", coef_SxFxN * coef_SxFxN, member_FxR)
  return energy_SxR / jnp.maximum(total_S, _EPS)[:, None]


# ---------------------------------------------------------------------------------------------------
# Per-neuron irreps.


def neuron_irreps(pre_a_SxGxN, pre_b_SxGxN, group: groups_lib.Group, irreps) -> dict:
  """Splits each neuron's pre-activation P_a[a, n] + P_b[b, n] over irreps (see module docstring).

  Returns a dict of ``share_SxNxR`` (float32, rows sum to 1; index 0 is the constant part),
  ``dominant_SxN`` (int32, the non-trivial irrep of largest share; 0 only for a trivial group) and
  ``dominant_share_SxN`` (float32, its share of the non-constant part of the pre-activation).
  """
  tables = irrep_tables(group, irreps)
  pre_a_SxGxN, pre_b_SxGxN = jnp.asarray(pre_a_SxGxN), jnp.asarray(pre_b_SxGxN)
  chex.assert_rank([pre_a_SxGxN, pre_b_SxGxN], 3)
  chex.assert_equal_shape([pre_a_SxGxN, pre_b_SxGxN])
  _check_group_axis("pre-activation rows", pre_a_SxGxN.shape[1], tables)
  share, dominant, dom_share = _neuron_irreps(pre_a_SxGxN, pre_b_SxGxN, _f32(tables.basis_GxF),
                                              _f32(tables.basis_member_FxR))
  return {"share_SxNxR": share, "dominant_SxN": dominant, "dominant_share_SxN": dom_share}


@jax.jit
def _neuron_irreps(pre_a_SxGxN, pre_b_SxGxN, basis_GxF, member_FxR):
  n = pre_a_SxGxN.shape[1]
  u, v = pre_a_SxGxN.astype(jnp.float32), pre_b_SxGxN.astype(jnp.float32)

  def energies(x_SxGxN):
    coef_SxFxN = jnp.einsum("gm,sgn->smn", basis_GxF, x_SxGxN)
    return jnp.einsum("smn,mr->snr", coef_SxFxN * coef_SxFxN, member_FxR)

  e_SxNxR = n * (energies(u) + energies(v))
  const_SxN = (n * (u.mean(axis=1) + v.mean(axis=1))) ** 2
  e_SxNxR = e_SxNxR.at[..., 0].set(const_SxN)
  total_SxN = e_SxNxR.sum(axis=-1)
  share_SxNxR = e_SxNxR / jnp.maximum(total_SxN, _EPS)[..., None]
  if share_SxNxR.shape[-1] == 1:
    return share_SxNxR, jnp.zeros(share_SxNxR.shape[:2], jnp.int32), share_SxNxR[..., 0]
  nontrivial = share_SxNxR[..., 1:]
  dominant_SxN = (jnp.argmax(nontrivial, axis=-1) + 1).astype(jnp.int32)
  rest_SxN = nontrivial.sum(axis=-1)
  dom_share_SxN = jnp.where(rest_SxN > _EPS, nontrivial.max(axis=-1) / jnp.maximum(rest_SxN, _EPS), 0.0)
  return share_SxNxR, dominant_SxN, dom_share_SxN


# ---------------------------------------------------------------------------------------------------
# Restricted and excluded losses (MLP).


def ablation_losses(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, keep_SxR, group: groups_lib.Group,
                    irreps, *, hidden_bias_SxN=None, out_bias_SxV=None,
                    per_irrep: bool = True, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> dict:
  """Cross-entropy over all |G|² pairs of the MLP ReLU(P_a[a] + P_b[b] + b₁)·Uᵀ + b₂ with projected P_a, P_b.

  Args:
    pre_a_SxGxN, pre_b_SxGxN: total embeddings (embedding times the first layer's half for that operand).
    unembed_SxVxN: unembedding rows per class; V ≥ |G|, padded classes are ignored.
    keep_SxR: bool, the irreps to keep in the restricted loss (usually the key irreps).
    hidden_bias_SxN, out_bias_SxV: optional biases of the hidden and output layers.
    per_irrep: also compute ``excluded_each_SxR`` (remove one irrep at a time).
    memory_bytes: working memory of one block of pairs (``loss_chunks``).

  Returns:
    dict of float32 ``full_S`` (no projection), ``restricted_S`` (keep only ``keep``), ``excluded_S``
    (remove ``keep``) and, if ``per_irrep``, ``excluded_each_SxR``.
  """
  tables = irrep_tables(group, irreps)
  pre_a_SxGxN, pre_b_SxGxN = jnp.asarray(pre_a_SxGxN), jnp.asarray(pre_b_SxGxN)
  unembed_SxVxN, keep_SxR = jnp.asarray(unembed_SxVxN), jnp.asarray(keep_SxR)
  chex.assert_rank([pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN, keep_SxR], [3, 3, 3, 2])
  chex.assert_equal_shape([pre_a_SxGxN, pre_b_SxGxN])
  s, n_g, n_hidden = pre_a_SxGxN.shape
  _check_group_axis("pre-activation rows", n_g, tables)
  if unembed_SxVxN.shape[0] != s or unembed_SxVxN.shape[2] != n_hidden or unembed_SxVxN.shape[1] < n_g:
    raise ValueError(f"unembed must be [{s}, V>={n_g}, {n_hidden}], got {unembed_SxVxN.shape}")
  if keep_SxR.shape != (s, tables.num_irreps):
    raise ValueError(f"keep must be [{s}, {tables.num_irreps}], got {keep_SxR.shape}")
  hb = jnp.zeros((s, n_hidden)) if hidden_bias_SxN is None else jnp.asarray(hidden_bias_SxN)
  ob = jnp.zeros((s, unembed_SxVxN.shape[1])) if out_bias_SxV is None else jnp.asarray(out_bias_SxV)
  chex.assert_shape(hb, (s, n_hidden))
  chex.assert_shape(ob, (s, unembed_SxVxN.shape[1]))
  rows, runs = loss_chunks(n_g, n_hidden, n_g, s, memory_bytes)
  return _ablation_losses(pre_a_SxGxN, pre_b_SxGxN, unembed_SxVxN[:, :n_g], hb, ob[:, :n_g],
                          keep_SxR.astype(jnp.float32), _f32(tables.basis_GxF),
                          _f32(tables.basis_member_FxR), jnp.asarray(tables.table), per_irrep=per_irrep,
                          rows=rows, runs=runs)


def loss_chunks(order: int, n_hidden: int, n_classes: int, n_runs: int, memory_bytes: int) -> tuple[int, int]:
  """``(rows, runs)`` for ``mlp_loss``: values of a per block and runs evaluated together, so that the
  block's hidden layer and logits (and their log-softmax) stay within ``memory_bytes``."""
  # float32 per pair: the hidden layer before and after the ReLU, the logits, their log-softmax and what
  # XLA keeps beside them (measured: ~2 of each at once).
  per_row = 4 * order * (2 * n_hidden + 4 * n_classes)
  rows = int(min(max(memory_bytes // per_row, 1), order))
  if rows < order:
    return rows, 1
  runs = int(min(max(memory_bytes // (per_row * order), 1), n_runs))
  # Equal batches of runs: a remainder would be a second program beside the first.
  while n_runs % runs:
    runs -= 1
  return rows, runs


def mlp_loss(u_SxGxN, v_SxGxN, unembed_SxVxN, table_GxG, hb_SxN=None, ob_SxV=None, *, rows: int, runs: int):
  """float32 ``(loss_S, accuracy_S)`` over all |G|² pairs of the MLP ReLU(u[a] + v[b] + b₁)·Uᵀ + b₂.

  Traceable; the pairs go ``rows`` values of a at a time (a scan, the last block padded) and the runs
  ``runs`` at a time (``lax.map``), so memory is that of ``runs × rows × |G|`` pairs, not of S·|G|³
  logits (``loss_chunks`` picks both from a budget).
  """
  s, g, n = u_SxGxN.shape
  hb_SxN = jnp.zeros((s, n), jnp.float32) if hb_SxN is None else hb_SxN
  ob_SxV = jnp.zeros((s, unembed_SxVxN.shape[1]), jnp.float32) if ob_SxV is None else ob_SxV
  rows = min(rows, g)
  blocks = -(-g // rows)
  a_KxR = jnp.arange(blocks * rows).reshape(blocks, rows)
  valid_KxR = a_KxR < g
  a_KxR = jnp.minimum(a_KxR, g - 1)

  def one_run(args):
    u_GxN, v_GxN, w_VxN, hb_N, ob_V = args

    def block(carry, xs):
      a_R, valid_R = xs
      hidden_RxGxN = jax.nn.relu(u_GxN[a_R][:, None, :] + v_GxN[None] + hb_N[None, None, :])
      logits_RxGxV = jnp.einsum("abn,cn->abc", hidden_RxGxN, w_VxN) + ob_V[None, None, :]
      target_RxG = table_GxG[a_R]
      logp = jax.nn.log_softmax(logits_RxGxV, axis=-1)
      nll_R = -jnp.take_along_axis(logp, target_RxG[..., None], axis=-1)[..., 0].sum(axis=1)
      hit_R = jnp.sum(jnp.argmax(logits_RxGxV, axis=-1) == target_RxG, axis=1).astype(jnp.float32)
      nll, hit = carry
      return (nll + jnp.where(valid_R, nll_R, 0.0).sum(), hit + jnp.where(valid_R, hit_R, 0.0).sum()), None

    (nll, hit), _ = jax.lax.scan(block, (jnp.float32(0.0), jnp.float32(0.0)), (a_KxR, valid_KxR))
    return nll / (g * g), hit / (g * g)

  args = tuple(x.astype(jnp.float32) for x in (u_SxGxN, v_SxGxN, unembed_SxVxN, hb_SxN, ob_SxV))
  return jax.lax.map(one_run, args, batch_size=min(runs, s))


def _project(x_SxGxN, weight_SxF, basis_GxF):
  coef_SxFxN = jnp.einsum("gm,sgn->smn", basis_GxF, x_SxGxN)
  return jnp.einsum("gm,smn->sgn", basis_GxF, coef_SxFxN * weight_SxF[:, :, None])


@functools.partial(jax.jit, static_argnames=("per_irrep", "rows", "runs"))
def _ablation_losses(u, v, unembed, hb, ob, keep_SxR, basis_GxF, member_FxR, table, *, per_irrep, rows, runs):
  u, v = u.astype(jnp.float32), v.astype(jnp.float32)
  loss = lambda u_, v_: mlp_loss(u_, v_, unembed, table, hb, ob, rows=rows, runs=runs)[0]  # noqa: E731

  def loss_keeping(keep):
    w_SxF = jnp.einsum("sr,mr->sm", keep, member_FxR)
    return loss(_project(u, w_SxF, basis_GxF), _project(v, w_SxF, basis_GxF))

  out = {"full_S": loss(u, v),
         "restricted_S": loss_keeping(keep_SxR),
         "excluded_S": loss_keeping(1.0 - keep_SxR)}
  if per_irrep:
    r_count = keep_SxR.shape[1]
    # One irrep at a time with lax.map: memory stays that of one block of pairs.
    drop_RxSxR = 1.0 - jnp.broadcast_to(jnp.eye(r_count)[:, None, :], (r_count,) + keep_SxR.shape)
    out["excluded_each_SxR"] = jax.lax.map(loss_keeping, drop_RxSxR).T
  return out


# ---------------------------------------------------------------------------------------------------
# Learning order.


def learning_order(steps_K, sim_KxSxR, threshold: float = DEFAULT_ORDER_THRESHOLD) -> jax.Array:
  """int32 ``[S, R]``: the first step whose similarity exceeds ``threshold``; -1 where it never does.

  ``steps_K`` must be strictly increasing (checkpoint steps, e.g. log-spaced).
  """
  steps_K = np.asarray(steps_K)
  sim_KxSxR = jnp.asarray(sim_KxSxR)
  chex.assert_rank(sim_KxSxR, 3)
  if steps_K.ndim != 1 or steps_K.shape[0] != sim_KxSxR.shape[0]:
    raise ValueError(f"steps must be [{sim_KxSxR.shape[0]}], got shape {steps_K.shape}")
  if steps_K.size > 1 and not np.all(np.diff(steps_K) > 0):
    raise ValueError("steps must be strictly increasing")
  return _learning_order(jnp.asarray(steps_K, jnp.int32), sim_KxSxR, jnp.float32(threshold))


@jax.jit
def _learning_order(steps_K, sim_KxSxR, threshold):
  crossed_KxSxR = sim_KxSxR > threshold
  first_SxR = jnp.argmax(crossed_KxSxR, axis=0)
  return jnp.where(crossed_KxSxR.any(axis=0), steps_K[first_SxR], -1).astype(jnp.int32)
