"""GPT-2 and GPT-NeoX (Pythia) as pure JAX functions, for suites of models trained elsewhere.

``apply(params, tokens_BxT, spec)`` runs one model; ``apply_stacked`` runs S models stacked over a leading
run axis on the same tokens. Both return the logits and, for every layer, the MLP activations the
universal-neurons study reads: ``mlp_pre`` (the input of the GELU) and ``mlp_post`` (its output, before the
output projection: TransformerLens' ``blocks.{l}.mlp.hook_post``), each ``[B, T, L, N]``.

The two architectures, as Hugging Face's ``GPT2LMHeadModel`` and ``GPTNeoXForCausalLM`` compute them:

* ``gpt2``: token and learned position embeddings; pre-LayerNorm blocks ``x += attn(ln1 x)``,
  ``x += mlp(ln2 x)``; GELU with the tanh approximation (``gelu_new``); attention scores scaled by 1/√d_head
  and, with ``scale_by_layer`` (the Stanford CRFM seeds' ``scale_attn_by_inverse_layer_idx``), by 1/(l + 1)
  too; final LayerNorm; the unembedding tied to the token embedding.
* ``neox``: token embedding only; rotary position embedding on the first ``rotary_dims`` of each head's
  dimensions (``rotary_pct`` of them), rotating the two halves of that slice (``rotate_half``); with
  ``parallel_residual`` ``x += attn(ln1 x) + mlp(ln2 x)``, else sequential as GPT-2; exact (erf) GELU; final
  LayerNorm; an unembedding of its own.

Parameters (our layout; blocks stacked over layers, leading axis L; matrices ``[in, out]``)::

  embed [V, D]   pos [C, D] (gpt2)   lnf_g, lnf_b [D]   unembed [D, V] (untied models only)
  blocks: ln1_g, ln1_b, ln2_g, ln2_b [L, D]; w_qkv [L, D, 3D] (q | k | v, each head-major [H, d_head]),
          b_qkv [L, 3D]; w_o [L, D, D], b_o [L, D]; w_in [L, D, N], b_in [L, N]; w_out [L, N, D], b_out [L, D]

``universality.engine.families.imported.weights`` maps Hugging Face tensors onto this layout.

Local shape letters:

  A  attention heads of a layer
  Q  dimensions of one attention head
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

ARCHITECTURES = ("gpt2", "neox")
ACTIVATIONS = ("gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class Spec:
  """One imported architecture (every model of a suite shares it).

  Attributes:
    arch: "gpt2" or "neox".
    vocab: V, rows of the token embedding (any size, e.g. 50257 or 50304).
    n_layers, d_model, n_heads, d_mlp: L, D, A and N.
    context: positions the model was trained on (GPT-2's learned position table; NeoX's
      ``max_position_embeddings``).
    ln_eps: the LayerNorms' epsilon.
    activation: "gelu_tanh" (GPT-2's ``gelu_new``) or "gelu" (exact).
    tied: whether the unembedding is the token embedding transposed (no ``unembed`` parameter).
    scale_by_layer: GPT-2's ``scale_attn_by_inverse_layer_idx``.
    rotary_dims: NeoX: rotated dimensions of each head (``int(d_head · rotary_pct)``); 0 for GPT-2.
    rotary_base: NeoX: the rotary embedding's base (``rotary_emb_base`` / ``rope_theta``).
    parallel_residual: NeoX: ``use_parallel_residual``.
  """
  arch: str
  vocab: int
  n_layers: int
  d_model: int
  n_heads: int
  d_mlp: int
  context: int
  ln_eps: float = 1e-5
  activation: str = "gelu_tanh"
  tied: bool = True
  scale_by_layer: bool = False
  rotary_dims: int = 0
  rotary_base: float = 10000.0
  parallel_residual: bool = True

  @property
  def d_head(self) -> int:
    return self.d_model // self.n_heads


FIELDS = tuple(f.name for f in dataclasses.fields(Spec))
_TYPES = {f.name: f.type for f in dataclasses.fields(Spec)}


def spec_of(section) -> Spec:
  """The typed architecture of a config's ``model.imported`` section (a Spec is returned as it is)."""
  if isinstance(section, Spec):
    return section
  cast = {"str": str, "int": int, "float": float, "bool": bool}
  return Spec(**{name: cast[_TYPES[name]](section[name]) for name in FIELDS})


def param_shapes(spec: Spec) -> dict[str, Any]:
  """The parameters of one model as ``{name: shape}`` (nested like the parameters), float32."""
  v, l, d, n, c = spec.vocab, spec.n_layers, spec.d_model, spec.d_mlp, spec.context
  out: dict[str, Any] = {"embed": (v, d), "lnf_g": (d,), "lnf_b": (d,)}
  if spec.arch == "gpt2":
    out["pos"] = (c, d)
  if not spec.tied:
    out["unembed"] = (d, v)
  out["blocks"] = {"ln1_g": (l, d), "ln1_b": (l, d), "ln2_g": (l, d), "ln2_b": (l, d),
                   "w_qkv": (l, d, 3 * d), "b_qkv": (l, 3 * d), "w_o": (l, d, d), "b_o": (l, d),
                   "w_in": (l, d, n), "b_in": (l, n), "w_out": (l, n, d), "b_out": (l, d)}
  return out


def abstract_params(spec: Spec, n_runs: int | None = None) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` leaves of ``param_shapes``, with a leading run axis of ``n_runs`` if given."""
  lead = () if n_runs is None else (int(n_runs),)
  return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(lead + tuple(shape), jnp.float32),
                      param_shapes(spec), is_leaf=lambda x: isinstance(x, tuple))


def _lead(v, x):
  """``v`` (a vector over x's last axis) with x's leading axes, for explicit broadcasting."""
  return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


def layer_norm(x, g, b, eps: float):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * _lead(g, x) + _lead(b, x)


def _affine(x, w, b):
  out = x @ w
  return out + _lead(b, out)


def gelu(x, activation: str):
  return jax.nn.gelu(x, approximate=activation == "gelu_tanh")


def _rotary(x_BxTxAxQ, spec: Spec):
  """NeoX's rotary embedding of the first ``rotary_dims`` dimensions of each head (positions 0..T-1)."""
  r = spec.rotary_dims
  if r == 0:
    return x_BxTxAxQ
  t = x_BxTxAxQ.shape[1]
  inv_freq = 1.0 / (spec.rotary_base ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
  freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb)[None, :, None, :], jnp.sin(emb)[None, :, None, :]
  rot, rest = x_BxTxAxQ[..., :r], x_BxTxAxQ[..., r:]
  half = jnp.concatenate([-rot[..., r // 2:], rot[..., :r // 2]], axis=-1)
  return jnp.concatenate([rot * cos + half * sin, rest], axis=-1)


def attention_pattern(x_BxTxD, w, layer: int, spec: Spec):
  """``(pattern [B, A, T, T], values [B, T, A, Q])`` of one layer's attention on its normalised input."""
  b, t, d = x_BxTxD.shape
  h, e = spec.n_heads, spec.d_head
  qkv = _affine(x_BxTxD, w["w_qkv"], w["b_qkv"])
  q, k, v = (z.reshape(b, t, h, e) for z in jnp.split(qkv, 3, axis=-1))
  if spec.arch == "neox":
    q, k = _rotary(q, spec), _rotary(k, spec)
  scale = 1.0 / math.sqrt(e)
  if spec.scale_by_layer:
    scale /= float(layer + 1)
  scores_BxAxTxT = jnp.einsum("bqhe,bkhe->bhqk", q, k) * scale
  causal_TxT = jnp.tril(jnp.ones((t, t), bool))
  scores_BxAxTxT = jnp.where(causal_TxT[None, None], scores_BxAxTxT, -jnp.inf)
  return jax.nn.softmax(scores_BxAxTxT, axis=-1), v


def _block(x, w, layer: int, spec: Spec, neuron_scale_N=None):
  """One block: ``(x after it, mlp_pre, mlp_post, attention to position 0 [A] averaged over the batch and
  the queries after it)``."""
  b, t, d = x.shape
  pattern, v = attention_pattern(layer_norm(x, w["ln1_g"], w["ln1_b"], spec.ln_eps), w, layer, spec)
  attn = _affine(jnp.einsum("bhqk,bkhe->bqhe", pattern, v).reshape(b, t, d), w["w_o"], w["b_o"])
  bos_A = jnp.mean(pattern[:, :, 1:, 0], axis=(0, 2)) if t > 1 else jnp.zeros((spec.n_heads,), x.dtype)
  sequential = spec.arch == "gpt2" or not spec.parallel_residual
  mlp_in = x + attn if sequential else x
  pre = _affine(layer_norm(mlp_in, w["ln2_g"], w["ln2_b"], spec.ln_eps), w["w_in"], w["b_in"])
  post = gelu(pre, spec.activation)
  scaled = post if neuron_scale_N is None else post * _lead(neuron_scale_N, post)
  mlp = _affine(scaled, w["w_out"], w["b_out"])
  return x + attn + mlp, pre, post, bos_A


def unembedding(params, spec: Spec) -> jax.Array:
  """``W_U [D, V]`` of one model (the token embedding transposed when tied)."""
  return params["embed"].T if spec.tied else params["unembed"]


def residual(params, tokens_BxT: jax.Array, spec: Spec, neuron_scale_LxN=None):
  """The residual stream after the last block, the MLP activations ``{"mlp_pre", "mlp_post"}``
  ``[B, T, L, N]`` and every head's attention to position 0 ``[L, A]`` (mean over the batch and the queries
  after it). ``neuron_scale_LxN`` multiplies every post-activation before the output projection (1: the
  model; 0 at one neuron: that neuron ablated)."""
  tokens = tokens_BxT.astype(jnp.int32)
  t = tokens.shape[-1]
  x = params["embed"][tokens]
  if spec.arch == "gpt2":
    x = x + _lead(params["pos"][:t], x)
  pres, posts, bos = [], [], []
  for layer in range(spec.n_layers):
    w = jax.tree.map(lambda a: a[layer], params["blocks"])
    scale_N = None if neuron_scale_LxN is None else neuron_scale_LxN[layer]
    x, pre, post, bos_A = _block(x, w, layer, spec, scale_N)
    pres.append(pre)
    posts.append(post)
    bos.append(bos_A)
  acts = {"mlp_pre": jnp.stack(pres, axis=2), "mlp_post": jnp.stack(posts, axis=2)}
  return x, acts, jnp.stack(bos)


def apply(params, tokens_BxT: jax.Array, spec: Spec) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits ``[B, T, V]`` of one model at every position and ``{"mlp_pre", "mlp_post"}`` ``[B, T, L, N]``.
  ``tokens_BxT``: token ids below ``spec.vocab``, T at most ``spec.context``."""
  x, acts, _ = residual(params, tokens_BxT, spec)
  logits = layer_norm(x, params["lnf_g"], params["lnf_b"], spec.ln_eps) @ unembedding(params, spec)
  return logits, acts


def bos_attention(params, tokens_BxT: jax.Array, spec: Spec, neuron_scale_LxN=None) -> jax.Array:
  """``[L, A]``: every head's mean attention to position 0 (the first token, BOS where the text starts with
  one) from the queries after it, with post-activations scaled by ``neuron_scale_LxN``."""
  return residual(params, tokens_BxT, spec, neuron_scale_LxN)[2]


def apply_stacked(params_S, tokens_BxT: jax.Array, spec: Spec):
  """``apply`` of S models stacked over the leading axis on the same tokens: logits ``[S, B, T, V]``,
  activations ``[S, B, T, L, N]``."""
  return jax.vmap(lambda p: apply(p, tokens_BxT, spec))(params_S)
