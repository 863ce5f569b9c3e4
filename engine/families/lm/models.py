"""A GPT-style byte transformer as pure functions: ``init(key, cfg)`` and ``apply(params, tokens, cfg)``.

Token and learned position embeddings; ``n_layers`` pre-LayerNorm blocks of causal multi-head attention and
a GELU MLP (GPT-2's tanh approximation), each added to the residual stream; a final LayerNorm; an
unembedding without bias. Block weights are stacked over layers (leading axis L); the blocks run as a
Python loop over that axis, so the program holds one copy of the block per layer (compile time grows with
depth): on XLA:CPU a ``lax.scan`` over layers spent about a third of the training step's op time stacking,
zero-filling and copying the per-layer residuals of the backward pass (benchmarks/README.md,
"Language-model training throughput").

``apply`` returns the logits and the MLP activations that analyses read, for every layer:
``mlp_pre`` (the input of the GELU) and ``mlp_post`` (its output), each ``[B, T, L, N]``.

Initialisation follows GPT-2: normal(0, 0.02) weights, the two projections into the residual stream
(attention output, MLP output) scaled by 1/√(2L), zero biases, unit LayerNorm gains.

Local shape letters:

  A  attention heads
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from universality.engine import optim
from universality.engine.families.lm import corpus

_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class GptSpec:
  """The byte transformer: ``n_layers`` pre-LayerNorm blocks of width ``d_model``, ``n_heads`` heads, ``d_mlp``
  GELU neurons, ``context`` bytes of context."""
  n_layers: int
  d_model: int
  n_heads: int
  d_mlp: int
  context: int


def spec_of(gpt) -> GptSpec:
  """The typed, frozen architecture of the config's ``model.gpt`` section (a spec is returned as it is)."""
  if isinstance(gpt, GptSpec):
    return gpt
  return GptSpec(**{f.name: int(gpt[f.name]) for f in dataclasses.fields(GptSpec)})


def param_roles(params) -> dict:
  """The role of each parameter for the optimiser (universality.engine.optim.ROLES); the blocks' matrices
  are stacked over layers ``[L, in, out]``."""
  return optim.roles_by_name(params, embed=("embed", "pos"), unembed=("unembed",), stacked=("blocks",))


def init(key: jax.Array, cfg) -> dict[str, Any]:
  """Parameters of the byte transformer described by ``cfg`` (a ``GptSpec``; the config's ``model.gpt``
  section reads the same)."""
  d, n, l, c, v = cfg.d_model, cfg.d_mlp, cfg.n_layers, cfg.context, corpus.VOCAB
  k = jax.random.split(key, 7)
  std, proj_std = 0.02, 0.02 / math.sqrt(2 * l)
  normal = lambda kk, shape, s: s * jax.random.normal(kk, shape, jnp.float32)
  zeros, ones = (lambda *shape: jnp.zeros(shape, jnp.float32)), (lambda *shape: jnp.ones(shape, jnp.float32))
  return {
      "embed": normal(k[0], (v, d), std), "pos": normal(k[1], (c, d), std),
      "blocks": {
          "ln1_g": ones(l, d), "ln1_b": zeros(l, d),
          "w_qkv": normal(k[2], (l, d, 3 * d), std), "b_qkv": zeros(l, 3 * d),
          "w_o": normal(k[3], (l, d, d), proj_std), "b_o": zeros(l, d),
          "ln2_g": ones(l, d), "ln2_b": zeros(l, d),
          "w_in": normal(k[4], (l, d, n), std), "b_in": zeros(l, n),
          "w_out": normal(k[5], (l, n, d), proj_std), "b_out": zeros(l, d),
      },
      "lnf_g": ones(d), "lnf_b": zeros(d),
      "unembed": normal(k[6], (d, v), std),
  }


def _lead(v, x):
  """``v`` (a vector over x's last axis) with x's leading axes, for explicit broadcasting."""
  return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def layer_norm(x, g, b):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPS) * _lead(g, x) + _lead(b, x)


def _flat(x):
  """``x`` with its leading axes merged: ``[..., K]`` -> ``[M, K]``."""
  return x.reshape(-1, x.shape[-1])


# Dense layers with a hand-written backward that only differs from autodiff's in one place: the output
# gradient passes an optimisation barrier before its two products. Without it XLA:CPU fuses the whole
# elementwise chain that produces the gradient (residual adds, LayerNorm backward) into the transposed copy
# that feeds the weight-gradient product, and evaluates that chain again for the input gradient: with the
# barrier the forward and backward take ~30% less CPU time (benchmarks/README.md). The products are the two
# autodiff emits. Reverse mode only (custom_vjp): nothing here takes forward-mode derivatives of the model.


@jax.custom_vjp
def _project(x, w):
  """``x @ w`` over x's last axis (no bias)."""
  return x @ w


def _project_fwd(x, w):
  return x @ w, (x, w)


def _project_bwd(res, g):
  x, w = res
  g = jax.lax.optimization_barrier(g)
  return g @ w.T, _flat(x).T @ _flat(g)


_project.defvjp(_project_fwd, _project_bwd)


@jax.custom_vjp
def _affine(x, w, b):
  """``x @ w + b`` over x's last axis."""
  out = x @ w
  return out + _lead(b, out)


def _affine_fwd(x, w, b):
  return _affine(x, w, b), (x, w)


def _affine_bwd(res, g):
  x, w = res
  g = jax.lax.optimization_barrier(g)
  g_TxN = _flat(g)
  return g @ w.T, _flat(x).T @ g_TxN, jnp.sum(g_TxN, axis=0)


_affine.defvjp(_affine_fwd, _affine_bwd)


def _attention(x_BxTxD, w, n_heads: int):
  b, t, d = x_BxTxD.shape
  h = n_heads
  qkv = _affine(x_BxTxD, w["w_qkv"], w["b_qkv"])
  q, k, v = (z.reshape(b, t, h, d // h) for z in jnp.split(qkv, 3, axis=-1))
  scores_BxAxTxT = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // h)
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  scores_BxAxTxT = jnp.where(causal_TxT[None, None], scores_BxAxTxT, -jnp.inf)
  out = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores_BxAxTxT, axis=-1), v).reshape(b, t, d)
  return _affine(out, w["w_o"], w["b_o"])


def apply(params, tokens_BxT: jax.Array, cfg) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits ``[B, T, 256]`` for the next byte at every position, and ``{"mlp_pre", "mlp_post"}``
  ``[B, T, L, N]``. ``tokens_BxT`` are byte values (any int dtype); T <= cfg.context."""
  t = tokens_BxT.shape[-1]
  x = params["embed"][tokens_BxT.astype(jnp.int32)]
  x = x + _lead(params["pos"][:t], x)

  pres, posts = [], []
  for layer in range(params["blocks"]["w_in"].shape[0]):
    w = jax.tree.map(lambda a: a[layer], params["blocks"])
    x = x + _attention(layer_norm(x, w["ln1_g"], w["ln1_b"]), w, cfg.n_heads)
    pre = _affine(layer_norm(x, w["ln2_g"], w["ln2_b"]), w["w_in"], w["b_in"])
    post = jax.nn.gelu(pre, approximate=True)
    x = x + _affine(post, w["w_out"], w["b_out"])
    pres.append(pre)
    posts.append(post)
  logits = _project(layer_norm(x, params["lnf_g"], params["lnf_b"]), params["unembed"])
  acts = {"mlp_pre": jnp.stack(pres, axis=2), "mlp_post": jnp.stack(posts, axis=2)}
  return logits, acts


class Stacked(NamedTuple):
  """The model over a stack of runs (leading axis S of the parameters), jitted once per architecture: what
  training's ``Task.apply``, the analysis and the notebook view evaluate.

  ``apply(params_S, tokens_BxT) -> (logits_SxBxTxV, {"mlp_pre", "mlp_post"}: [S, B, T, L, N])``;
  ``activations(params_S, tokens_BxT) -> (pre, post)``, each ``[S, B·T, L·N]`` (the logits are never formed).
  """
  apply: Callable
  activations: Callable


def _activations(params, tokens_BxT, spec: GptSpec):
  _, acts = apply(params, tokens_BxT, spec)
  b, t, l, n = acts["mlp_pre"].shape
  return acts["mlp_pre"].reshape(b * t, l * n), acts["mlp_post"].reshape(b * t, l * n)


@functools.lru_cache(maxsize=8)
def _stacked(spec: GptSpec) -> Stacked:
  return Stacked(apply=jax.jit(jax.vmap(lambda p, t: apply(p, t, spec), in_axes=(0, None))),
                 activations=jax.jit(jax.vmap(lambda p, t: _activations(p, t, spec), in_axes=(0, None))))


def stacked(gpt) -> Stacked:
  """``Stacked`` for the config's ``model.gpt`` section or a ``GptSpec`` (one per architecture)."""
  return _stacked(spec_of(gpt))


def activation_floats_per_token(cfg) -> int:
  """Floats a training step keeps alive per token (forward values and their gradients), for size estimates:
  per layer the residual stream and LayerNorm copies (~12·D), the MLP's pre- and post-activations with their
  gradients (4·N) and the attention probabilities with theirs (3·H·T); then the logits and their gradient."""
  return cfg.n_layers * (12 * cfg.d_model + 4 * cfg.d_mlp + 3 * cfg.n_heads * cfg.context) + 3 * corpus.VOCAB


def _next_byte_nll(logits_BxTxV, targets_BxT):
  logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def next_byte_xent(params, windows_BxC1: jax.Array, cfg) -> jax.Array:
  """Mean cross-entropy (nats) of predicting bytes 1..C of each window from the bytes before (the
  training loss: ``next_byte_loss`` without the accuracy, whose argmax the step does not need)."""
  logits, _ = apply(params, windows_BxC1[:, :-1], cfg)
  return jnp.mean(_next_byte_nll(logits, windows_BxC1[:, 1:].astype(jnp.int32)))


def next_byte_loss(params, windows_BxC1: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy (nats) and accuracy of predicting bytes 1..C of each window from the bytes before."""
  logits, _ = apply(params, windows_BxC1[:, :-1], cfg)
  targets = windows_BxC1[:, 1:].astype(jnp.int32)
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  return jnp.mean(_next_byte_nll(logits, targets)), acc


def unembedding(params) -> jax.Array:
  """``W_U [D, 256]`` with the final LayerNorm's gain folded in (the map from a normalised residual
  direction to the logits, as in TransformerLens' folded weights)."""
  return params["lnf_g"][:, None] * params["unembed"]
