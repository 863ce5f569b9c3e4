"""universality.engine.models: factorised MLP == literal MLP, transformer == float64 numpy reference, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from universality.engine import config
from universality.engine.families.group import models
from universality.engine.families.group import task as tasks
from tests.helpers import group_config, set_fields


def _cfg(model="mlp", **kw):
  """The config's model section (what the model functions take)."""
  cfg = group_config(model=model, embed_dim=24, hidden=20, d_model=16, n_heads=4, d_mlp=24, n_layers=1)
  return set_fields(cfg, **kw).model


def _init(key, cfg, vocab, order=None):
  """Jitted init: one compilation instead of hundreds of eager dispatches."""
  return jax.jit(lambda k, o: models.init(k, cfg, vocab, o))(key, vocab if order is None else order)


def _apply(cfg):
  return jax.jit(lambda p, a, b: models.apply(p, a, b, cfg))


def _pairs(seed, n, b=37):
  rng = np.random.default_rng(seed)
  return rng.integers(0, n, b).astype(np.int32), rng.integers(0, n, b).astype(np.int32)


def _xent(params, a, b, c, cfg, fn):
  logits, _ = fn(params, a, b)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, c[:, None], -1)[:, 0])


def test_factorised_mlp_equals_concat_form_values_and_grads():
  cfg = _cfg()
  params = _init(jax.random.PRNGKey(3), cfg, 11)
  a, b = _pairs(0, 11)
  c = (a + b) % 11
  fast = lambda p, x, y: models.apply(p, x, y, cfg)
  grad = jax.jit(jax.grad(_xent), static_argnums=(4, 5))
  logits, hidden = jax.jit(fast)(params, a, b)
  ref_logits, ref_hidden = models.mlp_apply_concat(params, a, b)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-5, atol=1e-6)
  g = grad(params, a, b, c, None, fast)
  g_ref = grad(params, a, b, c, None, models.mlp_apply_concat)
  for k in params:
    assert float(jnp.abs(g_ref[k]).max()) > 0
    np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_mlp_matches_float64_numpy():
  cfg = _cfg()
  params = _init(jax.random.PRNGKey(5), cfg, 9)
  a, b = _pairs(1, 9)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.maximum(np.concatenate([p["embed_a"][a], p["embed_b"][b]], 1) @ p["linear"], 0)
  logits, hidden = _apply(cfg)(params, a, b)
  np.testing.assert_allclose(hidden, h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, h @ p["unembed"], rtol=1e-5, atol=1e-5)


def _np_transformer(params, a, b):
  """Float64 reference: full causal attention at every position, MLP at every position, read at '='."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x = np.stack([p["embed"][a], p["embed"][b], np.broadcast_to(p["embed_eq"], (len(a), p["pos"].shape[1]))],
               1) + p["pos"][None]
  for blk in p["blocks"]:
    h, _, dh = blk["wq"].shape
    out = np.zeros_like(x)
    for head in range(h):
      q, k, v = (x @ blk[w][head] for w in ("wq", "wk", "wv"))
      s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
      s = np.where(np.tril(np.ones((3, 3), bool))[None], s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      s /= s.sum(-1, keepdims=True)
      out += (s @ v) @ blk["wo"][head]
    x = x + out
    hidden = np.maximum(x @ blk["w_in"] + blk["b_in"], 0)
    x = x + hidden @ blk["w_out"] + blk["b_out"]
  return x[:, -1] @ p["unembed"], hidden[:, -1]


@pytest.mark.parametrize("n_layers", [1, 2])
def test_transformer_matches_float64_numpy(n_layers):
  cfg = _cfg("transformer", n_layers=n_layers)
  params = _init(jax.random.PRNGKey(7), cfg, 10)
  # Non-zero biases so that they are exercised too.
  params["blocks"] = [dict(blk, b_in=0.1 * jnp.arange(24.0) / 24, b_out=-0.05 * jnp.ones(16))
                      for blk in params["blocks"]]
  a, b = _pairs(2, 10)
  logits, hidden = _apply(cfg)(params, a, b)
  ref_logits, ref_hidden = _np_transformer(params, a, b)
  assert logits.shape == (37, 10) and hidden.shape == (37, 24)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(hidden, ref_hidden, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_padded_init_equals_solo_init(model):
  cfg = _cfg(model)
  key = jax.random.PRNGKey(11)
  solo = _init(key, cfg, 6)
  padded = _init(key, cfg, 10, 6)
  for path, x in jax.tree_util.tree_leaves_with_path(solo):
    x, y = np.asarray(x), np.asarray(dict(jax.tree_util.tree_leaves_with_path(padded))[path])
    name = jax.tree_util.keystr(path)
    if x.shape == y.shape:
      np.testing.assert_array_equal(x, y, err_msg=name)
    else:  # a group-indexed axis: the first 6 entries agree, the padding is zero
      axis = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n][0]
      np.testing.assert_array_equal(x, np.take(y, np.arange(6), axis=axis), err_msg=name)
      assert not np.take(y, np.arange(6, 10), axis=axis).any(), name
  a, b = _pairs(4, 6)
  np.testing.assert_allclose(_apply(cfg)(solo, a, b)[0], _apply(cfg)(padded, a, b)[0][:, :6],
                             rtol=1e-5, atol=1e-6)


def test_init_scales_follow_fan_in():
  cfg = config.default_config().model  # the paper's widths: E = 256, N = 128
  p = _init(jax.random.PRNGKey(0), cfg, 120)
  np.testing.assert_allclose(np.std(p["linear"]), 1 / np.sqrt(512), rtol=0.05)
  np.testing.assert_allclose(np.std(p["embed_a"]), 1 / np.sqrt(256), rtol=0.05)
  np.testing.assert_allclose(np.std(p["unembed"]), 1 / np.sqrt(128), rtol=0.05)
  assert abs(np.corrcoef(np.ravel(p["embed_a"]), np.ravel(p["embed_b"]))[0, 1]) < 0.02


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_embedding_matrices_read_out_the_logits(model):
  cfg = _cfg(model)
  params = _init(jax.random.PRNGKey(1), cfg, 8)
  mats = models.embedding_matrices(params, cfg)
  n = models.hidden_size(cfg)
  width = cfg.mlp.embed_dim if model == "mlp" else cfg.transformer.d_model
  assert mats["embed_a"].shape == mats["embed_b"].shape == (8, width)
  assert mats["unembed"].shape == (8, n)
  a, b = _pairs(3, 8)
  logits, hidden = _apply(cfg)(params, a, b)
  if model == "mlp":  # the readout is exactly hidden · unembedᵀ
    np.testing.assert_allclose(logits, hidden @ mats["unembed"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mats["embed_a"], params["embed_a"])
  else:  # the neurons' contribution to the logits is hidden · unembedᵀ
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    direct = np.asarray(hidden, np.float64) @ p["blocks"][-1]["w_out"] @ p["unembed"]
    np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(mats["unembed"]).T, direct, rtol=1e-4,
                               atol=1e-5)


def test_bad_inputs_raise():
  cfg = _cfg()
  params = _init(jax.random.PRNGKey(0), cfg, 5)
  with pytest.raises(ValueError, match="model.name"):
    models.apply(params, np.zeros(3, np.int32), np.zeros(3, np.int32), _cfg("rnn"))
  with pytest.raises(ValueError, match="vocab"):
    models.init(jax.random.PRNGKey(0), cfg, 0)
  with pytest.raises(ValueError, match="1-D batches"):
    models.apply(params, np.zeros(3, np.int32), np.zeros(4, np.int32), cfg)


@pytest.mark.parametrize("order", [11, 8])
def test_hand_written_mlp_backward_equals_autodiff_of_concat_form(order):
  """models.mlp_xent_grads (the training step's backward) against jax.grad of the literal model."""
  cfg = _cfg()
  vocab = 11
  params = _init(jax.random.PRNGKey(7), cfg, vocab, order)
  rng = np.random.default_rng(order)
  a, b = _pairs(order, order, b=53)
  c = rng.integers(0, order, a.shape[0]).astype(np.int32)
  w = rng.random(a.shape[0]).astype(np.float32)
  w /= w.sum()

  def reference(p):
    logits, _ = models.mlp_apply_concat(p, a, b)
    return tasks.masked_xent(logits, c, w, order)[0]

  ref_loss, ref_grads = jax.value_and_grad(reference)(params)
  loss, grads = jax.jit(models.mlp_xent_grads, static_argnums=5)(params, a, b, c, w, order)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name in ref_grads:
    scale = float(np.abs(ref_grads[name]).max())
    assert scale > 0
    np.testing.assert_allclose(grads[name], ref_grads[name], rtol=0, atol=2e-5 * scale, err_msg=name)
  if order < vocab:  # padded classes get no gradient at all
    assert not np.any(np.asarray(grads["unembed"])[:, order:])


def test_effective_weights_reproduce_the_mlp_and_the_stacked_model_equals_the_solo_one():
  cfg = _cfg()
  keys = jax.random.split(jax.random.key(7), 3)
  params_S = jax.vmap(lambda k: models.init(k, cfg, 11, 9))(keys)
  a_B, b_B = (np.random.default_rng(5).integers(0, 9, size=29).astype(np.int32) for _ in range(2))
  stacked = models.stacked(cfg)
  eff = stacked.effective(params_S)
  logits_SxBxV, hidden_SxBxN = stacked.apply(params_S, np.broadcast_to(a_B, (3, 29)), np.broadcast_to(b_B, (3, 29)))
  for s in range(3):
    one = jax.tree.map(lambda x: np.asarray(x[s], np.float64), params_S)
    e = one["embed_a"].shape[1]
    # float64 reference of the concatenated form, from the raw parameters.
    h = np.maximum(np.concatenate([one["embed_a"][a_B], one["embed_b"][b_B]], -1) @ one["linear"], 0.0)
    np.testing.assert_allclose(np.maximum(eff.pre_a[s][a_B] + eff.pre_b[s][b_B], 0.0), h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(eff.unembed[s]), one["unembed"].T, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(eff.pre_a[s]), one["embed_a"] @ one["linear"][:e], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits_SxBxV[s], h @ one["unembed"], rtol=1e-4, atol=1e-4)
    solo = _apply(cfg)(jax.tree.map(lambda x: x[s], params_S), a_B, b_B)
    np.testing.assert_array_equal(np.asarray(hidden_SxBxN[s]), np.asarray(solo[1]))
  assert models.effective_weights(jax.tree.map(lambda x: x[0], params_S), cfg) is not None
  assert models.stacked(_cfg("transformer")).effective is None
  assert models.effective_weights({}, _cfg("transformer")) is None
