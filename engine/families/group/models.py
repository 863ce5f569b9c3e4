"""The two architectures of *A Toy Model of Universality* (Chughtai, Chan, Nanda 2023), as pure functions.

``init(key, model_cfg, vocab, order)`` returns a dict of float32 arrays; ``apply(params, a_B, b_B,
model_cfg)`` returns ``(logits_BxV, hidden_BxN)``, ``hidden`` being the ReLU layer the analyses read (MLP: its
``hidden`` neurons; transformer: the ``d_mlp`` neurons of the last block at the ``=`` position). ``model_cfg``
is a frozen ``ModelSpec`` (``MlpSpec`` or ``TransformerSpec``), built from the config's ``model`` section once
at the boundary by ``spec_of`` (which the functions here also apply to a section they are given).

MLP: ``logits = ReLU(concat(W_a[a], W_b[b]) · W1) · U``, computed in the factorised form
``ReLU(P_a[a] + P_b[b]) · U`` with ``P_a = W_a · W1[:E]``, ``P_b = W_b · W1[E:]``: the same function and the
same gradients, but the first layer costs two ``V×E×N`` products instead of a ``B×2E×N`` one.

Transformer: tokens ``a b =``, learned positional embeddings, ``n_layers`` blocks of causal multi-head
attention and a ReLU MLP (with biases), residual connections, no LayerNorm; logits read at ``=``.

Initialisation follows the paper's code base (Nanda's grokking transformer): every weight is
``N(0, 1/fan_in)`` with ``fan_in`` the input width of its matrix product; embedding tables are
``N(0, 1/width)``; biases start at 0. Each row of a table indexed by a group element (and each unembedding
column) is drawn from its own key ``fold_in(key, row)``, so a group of order ``n`` padded into a bucket of
vocabulary ``V > n`` gets exactly the weights it gets alone; rows ``>= order`` are zero and, having zero
gradient and zero weight-decay pull, stay zero.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from universality.engine import optim


NAMES = ("mlp", "transformer", "li2")
ACTIVATIONS = ("square", "relu", "silu", "relu2")


@dataclasses.dataclass(frozen=True)
class MlpSpec:
  """The Chughtai et al. MLP: embeddings of width ``embed_dim`` per input, ``hidden`` ReLU neurons."""
  embed_dim: int
  hidden: int


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
  """The one-path transformer on ``a b =``: ``n_layers`` blocks, ``n_heads`` heads, ``d_mlp`` ReLU neurons."""
  d_model: int
  n_heads: int
  d_mlp: int
  n_layers: int


@dataclasses.dataclass(frozen=True)
class Li2Spec:
  """The network of Tian (2025), *Provable Scaling Laws of Feature Emergence*: the one-hot codes of a and b
  straight into ``W`` (2M -> ``hidden``, no bias), ``activation``, then ``V`` (``hidden`` -> M, no bias)."""
  hidden: int
  activation: str


ModelSpec = MlpSpec | TransformerSpec | Li2Spec


def spec_of(model_cfg) -> ModelSpec:
  """The typed, frozen architecture of the config's ``model`` section (a spec is returned as it is): the
  one place a ConfigDict becomes model code's input."""
  if isinstance(model_cfg, (MlpSpec, TransformerSpec, Li2Spec)):
    return model_cfg
  if model_cfg.name not in NAMES:
    raise ValueError(f"config.model.name: must be one of {NAMES}, got {model_cfg.name!r}")
  if model_cfg.name == "mlp":
    return MlpSpec(embed_dim=int(model_cfg.mlp.embed_dim), hidden=int(model_cfg.mlp.hidden))
  if model_cfg.name == "li2":
    if model_cfg.li2.activation not in ACTIVATIONS:
      raise ValueError(f"config.model.li2.activation: must be one of {ACTIVATIONS}, got "
                       f"{model_cfg.li2.activation!r}")
    return Li2Spec(hidden=int(model_cfg.li2.hidden), activation=str(model_cfg.li2.activation))
  t = model_cfg.transformer
  return TransformerSpec(d_model=int(t.d_model), n_heads=int(t.n_heads), d_mlp=int(t.d_mlp),
                         n_layers=int(t.n_layers))


def hidden_size(model_cfg) -> int:
  """N: the number of ReLU neurons ``apply`` returns."""
  spec = spec_of(model_cfg)
  return spec.hidden if isinstance(spec, (MlpSpec, Li2Spec)) else spec.d_mlp


def activation_floats(model_cfg, batch: int, vocab: int) -> int:
  """Floats live at once in one training step on ``batch`` pairs (forward, kept activations, backward),
  rounded up: an estimate for the launch's size check, not an account of XLA's buffers."""
  t = spec_of(model_cfg)
  if isinstance(t, (MlpSpec, Li2Spec)):  # pre-activations, hidden and its gradient; logits, softmax and gradient
    return batch * 4 * (t.hidden + vocab)
  # per layer, at 3 positions: residual stream, q/k/v/attention output and their gradients (~12 d_model),
  # the MLP's pre-activation, activation and gradient (3 d_mlp); attention weights are [heads, 3, 3]
  per_layer = 3 * (12 * t.d_model + 3 * t.d_mlp) + 2 * 9 * t.n_heads
  return batch * (t.n_layers * per_layer + 4 * vocab + 6 * t.d_model)


def _key(key, name: str):
  """A key per parameter name (stable across versions: crc32 of the name)."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _normal(key, name: str, shape, fan_in: int):
  return jax.random.normal(_key(key, name), shape, jnp.float32) / jnp.sqrt(jnp.float32(fan_in))


def _rows(key, name: str, vocab: int, order, width: int, fan_in: int):
  """``[vocab, width]`` with row r drawn from ``fold_in(key_name, r)``; rows ``>= order`` are zero."""
  k = _key(key, name)
  rows = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(k, r), (width,), jnp.float32))(
      jnp.arange(vocab))
  keep = (jnp.arange(vocab) < order)[:, None]
  return jnp.where(keep, rows / jnp.sqrt(jnp.float32(fan_in)), 0.0)


def param_roles(params) -> dict:
  """The role of each parameter for the optimiser (universality.engine.optim.ROLES)."""
  return optim.roles_by_name(params, embed=("embed_a", "embed_b", "embed", "embed_eq", "pos"),
                             unembed=("unembed",))  # li2: "w" is a hidden matrix (Muon's), "unembed" V


def init(key, model_cfg, vocab: int, order=None) -> dict:
  """Parameters of the model ``model_cfg.name`` for a group of ``order`` elements padded to ``vocab`` classes.

  Args:
    key: a PRNG key; the whole initialisation is a function of it.
    model_cfg: the architecture: a ``ModelSpec`` or the config's ``model`` section (``spec_of``).
    vocab: V, static: the padded number of classes (the bucket's largest group order).
    order: the run's true group order (an int or a traced int32 scalar); defaults to ``vocab``.
  """
  if vocab < 1:
    raise ValueError(f"vocab must be >= 1, got {vocab}")
  order = vocab if order is None else order
  spec = spec_of(model_cfg)
  if isinstance(spec, Li2Spec):
    # W [2V, K] (rows 0..V-1 read a, rows V..2V-1 read b), N(0, 1/(2·order)); V [K, V], N(0, 1/K).
    # Rows of padding classes stay zero under every optimiser, Muon included; Muon's width scaling
    # (opt.muon.scale_by_shape) reads the padded shape, so for exact padding use it off, as the paper does.
    k = spec.hidden
    fan_in = 2 * order
    w_a = _rows(key, "w_a", vocab, order, k, 1) / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))
    w_b = _rows(key, "w_b", vocab, order, k, 1) / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))
    return {"w": jnp.concatenate([w_a, w_b]), "unembed": _rows(key, "unembed", vocab, order, k, k).T}
  if isinstance(spec, MlpSpec):
    e, n = spec.embed_dim, spec.hidden
    return {
        "embed_a": _rows(key, "embed_a", vocab, order, e, e),
        "embed_b": _rows(key, "embed_b", vocab, order, e, e),
        "linear": _normal(key, "linear", (2 * e, n), 2 * e),
        "unembed": _rows(key, "unembed", vocab, order, n, n).T,   # [N, V]: column c reads out class c
    }
  t = spec
  d, h, m = t.d_model, t.n_heads, t.d_mlp
  dh = d // h
  blocks = []
  for l in range(t.n_layers):
    p = f"block{l}/"
    blocks.append({
        "wq": _normal(key, p + "wq", (h, d, dh), d),
        "wk": _normal(key, p + "wk", (h, d, dh), d),
        "wv": _normal(key, p + "wv", (h, d, dh), d),
        "wo": _normal(key, p + "wo", (h, dh, d), d),
        "w_in": _normal(key, p + "w_in", (d, m), d),
        "b_in": jnp.zeros((m,), jnp.float32),
        "w_out": _normal(key, p + "w_out", (m, d), m),
        "b_out": jnp.zeros((d,), jnp.float32),
    })
  return {
      "embed": _rows(key, "embed", vocab, order, d, d),           # token rows of the group elements
      "embed_eq": _normal(key, "embed_eq", (d,), d),              # the '=' token
      "pos": _normal(key, "pos", (3, d), d),
      "blocks": blocks,
      "unembed": _rows(key, "unembed", vocab, order, d, d).T,     # [d_model, V]
  }


def _mlp(params, a_B, b_B):
  e = params["embed_a"].shape[1]
  w1 = params["linear"]
  # Project the tables once (V×E×N) instead of every pair (B×2E×N): the gather commutes with the product.
  pa_VxN = params["embed_a"] @ w1[:e]
  pb_VxN = params["embed_b"] @ w1[e:]
  hidden_BxN = jax.nn.relu(pa_VxN[a_B] + pb_VxN[b_B])
  return hidden_BxN @ params["unembed"], hidden_BxN


def mlp_xent_grads(params, a_B, b_B, c_B, w_B, order):
  """``(Σ w·cross-entropy, gradients)`` of the MLP, its backward pass written out by hand.

  The loss is ``universality.engine.train.masked_xent`` of ``apply``'s logits (classes ``>= order`` masked to
  −inf) and the gradients are those ``jax.grad`` derives, to float rounding. Written out, the step reads and
  writes the ``[B, V]`` activations fewer times than the derived one: the softmax and the one-hot of the
  cross-entropy gradient are one elementwise pass, ``w · (softmax − onehot)``, over the exponentials that the
  forward pass already holds, the target logit is a gather (no ``[B, V]`` one-hot select and its transpose)
  and nothing of the accuracy is computed.
  """
  shapes = [jnp.shape(x) for x in (a_B, b_B, c_B, w_B)]
  if len(shapes[0]) != 1 or any(s != shapes[0] for s in shapes):
    raise ValueError(f"a, b, c and w must be 1-D batches of equal length, got {shapes}")
  e = params["embed_a"].shape[1]
  w1_a, w1_b, unembed_NxV = params["linear"][:e], params["linear"][e:], params["unembed"]
  pa_VxN = params["embed_a"] @ w1_a
  pb_VxN = params["embed_b"] @ w1_b
  hidden_BxN = jax.nn.relu(pa_VxN[a_B] + pb_VxN[b_B])
  logits_BxV = hidden_BxN @ unembed_NxV
  classes_1xV = jnp.arange(logits_BxV.shape[-1])[None, :]
  masked_BxV = jnp.where(classes_1xV < order, logits_BxV, -jnp.inf)
  max_B = jnp.max(masked_BxV, axis=-1)
  exp_BxV = jnp.exp(masked_BxV - max_B[:, None])
  sum_B = jnp.sum(exp_BxV, axis=-1)
  picked_B = jnp.take_along_axis(logits_BxV, c_B[:, None], axis=-1)[:, 0]
  loss = jnp.sum(w_B * (max_B + jnp.log(sum_B) - picked_B))
  scale_Bx1 = (w_B / sum_B)[:, None]
  dlogits_BxV = jnp.where(classes_1xV == c_B[:, None], exp_BxV * scale_Bx1 - w_B[:, None], exp_BxV * scale_Bx1)
  dhidden_BxN = jnp.where(hidden_BxN > 0, dlogits_BxV @ unembed_NxV.T, 0.0)
  # The gathers' transposes: the rows of dhidden summed by the index that selected them.
  dpa_VxN = jnp.zeros_like(pa_VxN).at[a_B].add(dhidden_BxN)
  dpb_VxN = jnp.zeros_like(pb_VxN).at[b_B].add(dhidden_BxN)
  grads = {
      "embed_a": dpa_VxN @ w1_a.T,
      "embed_b": dpb_VxN @ w1_b.T,
      "linear": jnp.concatenate([params["embed_a"].T @ dpa_VxN, params["embed_b"].T @ dpb_VxN]),
      "unembed": hidden_BxN.T @ dlogits_BxV,
  }
  return loss, grads


def mlp_apply_concat(params, a_B, b_B):
  """The MLP in its literal form (concatenate, then multiply): the reference the factorised form must equal."""
  x_Bx2E = jnp.concatenate([params["embed_a"][a_B], params["embed_b"][b_B]], axis=-1)
  hidden_BxN = jax.nn.relu(x_Bx2E @ params["linear"])
  return hidden_BxN @ params["unembed"], hidden_BxN


def activate(x, activation: str):
  """The Li2 network's activation: ``square`` x², ``relu``, ``silu`` x·σ(x), ``relu2`` ReLU(x)²."""
  if activation == "square":
    return x * x
  if activation == "relu":
    return jax.nn.relu(x)
  if activation == "silu":
    return jax.nn.silu(x)
  if activation == "relu2":
    return jnp.square(jax.nn.relu(x))
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _li2(params, a_B, b_B, activation: str):
  vocab = params["unembed"].shape[1]
  # one-hot(a) ⊕ one-hot(b) times W is the sum of two rows of W.
  hidden_BxN = activate(params["w"][a_B] + params["w"][vocab + b_B], activation)
  return hidden_BxN @ params["unembed"], hidden_BxN


def _attention(blk, x_BxTxD, q_BxTxD):
  """Causal multi-head attention of the last ``Q`` positions of ``x`` (queries ``q``) over all positions."""
  n_pos, n_q = x_BxTxD.shape[1], q_BxTxD.shape[1]
  dh = blk["wq"].shape[-1]
  q = jnp.einsum("bqd,hde->bhqe", q_BxTxD, blk["wq"])
  k = jnp.einsum("bld,hde->bhle", x_BxTxD, blk["wk"])
  v = jnp.einsum("bld,hde->bhle", x_BxTxD, blk["wv"])
  scores = jnp.einsum("bhqe,bhle->bhql", q, k) / jnp.sqrt(jnp.float32(dh))
  causal_TxT = jnp.arange(n_pos)[None, :] <= jnp.arange(n_pos - n_q, n_pos)[:, None]
  scores = jnp.where(causal_TxT[None, None], scores, -jnp.inf)
  z = jnp.einsum("bhql,bhle->bhqe", jax.nn.softmax(scores, axis=-1), v)
  return jnp.einsum("bhqe,hed->bqd", z, blk["wo"])


def _transformer(params, a_B, b_B):
  d = params["pos"].shape[1]
  eq_BxD = jnp.broadcast_to(params["embed_eq"], (a_B.shape[0], d))
  x_BxTxD = jnp.stack([params["embed"][a_B], params["embed"][b_B], eq_BxD], axis=1) + params["pos"][None]
  hidden_BxN = None
  for l, blk in enumerate(params["blocks"]):
    last = l == len(params["blocks"]) - 1
    # Only the '=' position feeds the logits, so the last block computes queries and MLP there alone.
    q_BxTxD = x_BxTxD[:, -1:] if last else x_BxTxD
    r_BxTxD = q_BxTxD + _attention(blk, x_BxTxD, q_BxTxD)
    hidden = jax.nn.relu(r_BxTxD @ blk["w_in"] + blk["b_in"][None, None])
    r_BxTxD = r_BxTxD + hidden @ blk["w_out"] + blk["b_out"][None, None]
    x_BxTxD = r_BxTxD
    hidden_BxN = hidden[:, -1]
  return x_BxTxD[:, -1] @ params["unembed"], hidden_BxN


def apply(params, a_B, b_B, model_cfg):
  """Logits ``[B, V]`` (unmasked; classes ``>= order`` are padding) and the ReLU layer ``[B, N]``."""
  if jnp.ndim(a_B) != 1 or jnp.shape(a_B) != jnp.shape(b_B):
    raise ValueError(f"a and b must be 1-D batches of equal length, got {jnp.shape(a_B)}, {jnp.shape(b_B)}")
  spec = spec_of(model_cfg)
  if isinstance(spec, Li2Spec):
    return _li2(params, a_B, b_B, spec.activation)
  return (_mlp if isinstance(spec, MlpSpec) else _transformer)(params, a_B, b_B)


def embedding_matrices(params, model_cfg) -> dict:
  """The maps the irrep analyses project: 'embed_a', 'embed_b' ``[V, E]`` and 'unembed' ``[V, N]``.

  Rows index group elements / classes. For the transformer both embeddings are the token embedding rows of
  the group elements, 'unembed' is the neuron-to-logit map ``(W_out · W_U)ᵀ`` of the last block (row c: the
  direction in neuron space that raises logit c), and 'unembed_resid' ``[V, d_model]`` is ``W_Uᵀ`` itself.
  """
  spec = spec_of(model_cfg)
  if isinstance(spec, Li2Spec):
    vocab = params["unembed"].shape[1]
    return {"embed_a": params["w"][:vocab], "embed_b": params["w"][vocab:], "unembed": params["unembed"].T}
  if isinstance(spec, MlpSpec):
    return {"embed_a": params["embed_a"], "embed_b": params["embed_b"], "unembed": params["unembed"].T}
  w_out = params["blocks"][-1]["w_out"]
  return {"embed_a": params["embed"], "embed_b": params["embed"],
          "unembed": (w_out @ params["unembed"]).T, "unembed_resid": params["unembed"].T}


class EffectiveWeights(NamedTuple):
  """The MLP as ``logits = ReLU(pre_a[a] + pre_b[b]) · unembedᵀ``: ``pre_a = W_a · W1[:E]`` and
  ``pre_b = W_b · W1[E:]`` ``[V, N]`` (rows: group elements), ``unembed`` ``[V, N]`` (row c reads out class
  c). The passes that need a model of that form (ablation losses, margins, feature merging, mode
  connectivity, the per-neuron split of the pre-activation, coset neurons) read these."""
  pre_a: Any
  pre_b: Any
  unembed: Any


def effective_weights(params, model_cfg) -> EffectiveWeights | None:
  """The MLP's effective weights; None for the transformer (its pre-activations are not additive in a, b)."""
  if not isinstance(spec_of(model_cfg), MlpSpec):
    return None
  e = params["embed_a"].shape[1]
  return EffectiveWeights(params["embed_a"] @ params["linear"][:e], params["embed_b"] @ params["linear"][e:],
                          params["unembed"].T)


class Stacked(NamedTuple):
  """The model over a stack of runs (leading axis S of the parameters), jitted once: what training's
  ``Task.apply``, the analysis and the notebook view evaluate.

  ``apply(params_S, a_SxB, b_SxB) -> (logits_SxBxV, hidden_SxBxN)`` (logits unmasked);
  ``matrices(params_S) -> embedding_matrices`` stacked ``[S, V, X]``; ``effective(params_S) ->
  EffectiveWeights`` stacked ``[S, V, N]``, or None (not a function) for models without them.
  """
  apply: Callable
  matrices: Callable
  effective: Callable | None


def stacked(model_cfg) -> Stacked:
  """``Stacked`` for the config's ``model`` section or a ``ModelSpec`` (read once here, not on every call)."""
  model_cfg = spec_of(model_cfg)
  is_mlp = isinstance(model_cfg, MlpSpec)
  effective = jax.jit(jax.vmap(lambda p: effective_weights(p, model_cfg))) if is_mlp else None
  return Stacked(apply=jax.jit(jax.vmap(lambda p, a, b: apply(p, a, b, model_cfg))),
                 matrices=jax.jit(jax.vmap(lambda p: embedding_matrices(p, model_cfg))), effective=effective)
