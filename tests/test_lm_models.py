"""universality.engine.families.lm.models: the byte transformer against straightforward float64 references.

The model is written for XLA:CPU speed (layers unrolled, dense layers with a hand-written backward, the
training loss without its accuracy); these tests pin it to the plain formulation: a gather embedding,
attention head by head with an explicit causal mask, a loop over layers, ``take_along_axis`` cross-entropy,
in float64 numpy for values and float64 JAX autodiff for gradients. Tolerances are ~1e-4 of each array's
scale, against float32 rounding errors of ~1e-6.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from universality.engine.families.lm import models

_RTOL = 1e-4


def _cfg():
  return ml_collections.ConfigDict(dict(n_layers=2, d_model=16, n_heads=4, d_mlp=24, context=12))


def _params(cfg, seed=0):
  """Init, then every parameter perturbed, so zero biases and unit gains do not hide a wrong term."""
  params = models.init(jax.random.PRNGKey(seed), cfg)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, jnp.float32)
                                   for x, k in zip(leaves, keys)])


def _windows(cfg, b=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, cfg.context + 1)).astype(np.uint8)


def _close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(float(np.max(np.abs(expected))), 1e-30)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= _RTOL * scale, f"{what}: max deviation {err:.3g} vs scale {scale:.3g}"


# --- references -------------------------------------------------------------------------------------


def _ref_forward(xp, params, tokens_BxT, cfg):
  """The plain model in the array module ``xp`` (numpy or jax.numpy): logits, mlp_pre, mlp_post."""
  def ln(x, g, b):
    mean = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + 1e-5) * g[None, None, :] + b[None, None, :]

  def gelu(z):
    return 0.5 * z * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))

  b, t = tokens_BxT.shape
  d, h = cfg.d_model, cfg.n_heads
  e = d // h
  x = params["embed"][tokens_BxT] + params["pos"][None, :t, :]
  causal_TxT = np.tril(np.ones((t, t), bool))
  pres, posts = [], []
  for layer in range(cfg.n_layers):
    w = {k: v[layer] for k, v in params["blocks"].items()}
    y = ln(x, w["ln1_g"], w["ln1_b"])
    qkv = y @ w["w_qkv"] + w["b_qkv"][None, None, :]
    heads = []
    for i in range(h):  # one head at a time: its slices of q, k and v
      q, k, v = (qkv[:, :, j * d + i * e: j * d + (i + 1) * e] for j in range(3))
      scores = q @ xp.swapaxes(k, 1, 2) / math.sqrt(e)
      scores = xp.where(causal_TxT[None], scores, -xp.inf)
      p = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
      heads.append((p / xp.sum(p, axis=-1, keepdims=True)) @ v)
    x = x + xp.concatenate(heads, axis=-1) @ w["w_o"] + w["b_o"][None, None, :]
    pre = ln(x, w["ln2_g"], w["ln2_b"]) @ w["w_in"] + w["b_in"][None, None, :]
    post = gelu(pre)
    x = x + post @ w["w_out"] + w["b_out"][None, None, :]
    pres.append(pre)
    posts.append(post)
  logits = ln(x, params["lnf_g"], params["lnf_b"]) @ params["unembed"]
  return logits, xp.stack(pres, axis=2), xp.stack(posts, axis=2)


def _ref_xent(xp, params, windows_BxC1, cfg):
  logits, _, _ = _ref_forward(xp, params, windows_BxC1[:, :-1].astype(np.int32), cfg)
  targets = windows_BxC1[:, 1:].astype(np.int32)
  top = xp.max(logits, axis=-1, keepdims=True)
  lse = xp.log(xp.sum(xp.exp(logits - top), axis=-1)) + top[..., 0]
  picked = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return xp.mean(lse - picked)


def _float64(params):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), params)


# --- tests --------------------------------------------------------------------------------------------


def test_apply_matches_float64_numpy():
  cfg = _cfg()
  params = _params(cfg)
  tokens = _windows(cfg)[:, :-1]
  logits, acts = jax.jit(lambda p, x: models.apply(p, x, cfg))(params, tokens)
  ref_logits, ref_pre, ref_post = _ref_forward(np, _float64(params), tokens.astype(np.int64), cfg)
  assert logits.shape == (3, cfg.context, 256) and acts["mlp_pre"].shape == (3, cfg.context, 2, 24)
  _close(logits, ref_logits, "logits")
  _close(acts["mlp_pre"], ref_pre, "mlp_pre")
  _close(acts["mlp_post"], ref_post, "mlp_post")


def test_losses_match_float64_numpy():
  cfg = _cfg()
  params, windows = _params(cfg), _windows(cfg)
  xent = jax.jit(lambda p, w: models.next_byte_xent(p, w, cfg))(params, windows)
  loss, acc = jax.jit(lambda p, w: models.next_byte_loss(p, w, cfg))(params, windows)
  ref = _ref_xent(np, _float64(params), windows, cfg)
  _close(xent, ref, "next_byte_xent")
  _close(loss, ref, "next_byte_loss")
  logits, _, _ = _ref_forward(np, _float64(params), windows[:, :-1].astype(np.int64), cfg)
  assert float(acc) == pytest.approx(np.mean(np.argmax(logits, -1) == windows[:, 1:]))


def test_gradients_match_float64_autodiff():
  """The hand-written dense backward and the unrolled layers give autodiff's gradients of the plain model."""
  cfg = _cfg()
  params, windows = _params(cfg), _windows(cfg)
  grads = jax.jit(jax.grad(lambda p, w: models.next_byte_xent(p, w, cfg)))(params, windows)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), params)
    ref = jax.jit(jax.grad(lambda p, w: _ref_xent(jnp, p, w, cfg)))(p64, jnp.asarray(windows))
    ref = jax.tree.map(np.asarray, ref)
  assert ref["blocks"]["w_qkv"].dtype == np.float64
  flat, _ = jax.tree.flatten_with_path(grads)
  ref_flat = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree.flatten_with_path(ref)[0])
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert g.dtype == jnp.float32
    _close(g, ref_flat[name], f"d loss / d {name}")


def test_dense_layers_match_plain_products_under_vmap():
  """``_affine`` and ``_project`` (custom backward) equal ``x @ w + b`` in value and in all three gradients,
  batched over runs as the trainer batches them."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 3, 5, 7)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)

  def objective(dense):
    return lambda x, w, b: jnp.sum(jnp.sin(dense(x, w, b)) * c)

  fast = {"affine": lambda x, w, b: models._affine(x, w, b),
          "project": lambda x, w, b: models._project(x, w) + b[None, None, :]}
  plain = lambda x, w, b: x @ w + b[None, None, :]
  for name, dense in fast.items():
    got = jax.jit(jax.vmap(jax.value_and_grad(objective(dense), argnums=(0, 1, 2))))(x, w, b)
    want = jax.jit(jax.vmap(jax.value_and_grad(objective(plain), argnums=(0, 1, 2))))(x, w, b)
    for g, r, what in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("value", "dx", "dw", "db")):
      _close(g, r, f"{name} {what}")
