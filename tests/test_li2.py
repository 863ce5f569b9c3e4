"""The Li2 network and losses of Tian (2025), *Provable Scaling Laws of Feature Emergence*, in the group family:
forward and gradients against float64 numpy, the training-size law n = mult · c · s · M ln M, Adam and the
paper's Muon split (Muon on W, Adam on V) against float64 references written from their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from universality.engine import config as config_lib, groups, optim, train
from universality.engine.families.group import family as family_lib, models, task as tasks
from tests.helpers import group_config, set_fields
from tests.test_optim import _adamw_update, _assert_close, _cfg, _reference, _trained

K = 12  # hidden nodes of the small Li2 network


# --- float64 references ---------------------------------------------------------------------------


def _act(x, name):
  """(activation, its derivative) in float64."""
  sig = 1 / (1 + np.exp(-x))
  return {"square": (x * x, 2 * x), "relu": (np.maximum(x, 0), (x > 0) * 1.0),
          "silu": (x * sig, sig * (1 + x * (1 - sig))),
          "relu2": (np.maximum(x, 0) ** 2, 2 * np.maximum(x, 0))}[name]


def _li2_loss_grads(w, v, a, b, c, order, activation, loss):
  """Mean loss of the literal network (one-hot(a) ⊕ one-hot(b) times W) and its gradients, float64 numpy.
  ``w`` [2M, K], ``v`` [K, M], all M classes real."""
  x = np.zeros((len(a), 2 * order))
  x[np.arange(len(a)), a] = 1
  x[np.arange(len(a)), order + b] = 1
  pre = x @ w
  h, dh_dpre = _act(pre, activation)
  o = h @ v
  n = len(c)
  if loss == "xent":
    z = np.exp(o - o.max(1, keepdims=True))
    p = z / z.sum(1, keepdims=True)
    value = np.mean(-np.log(p[np.arange(n), c]))
    d_o = p.copy()
    d_o[np.arange(n), c] -= 1
    d_o /= n
  else:  # the paper's compute_loss, literally
    oz = o - o.mean(1, keepdims=True)
    value = (oz ** 2).sum(1).mean() - 2 * oz[np.arange(n), c].mean() + 1 - 1 / order
    target = np.eye(order)[c] - 1 / order
    e = oz - target
    d_o = 2 * (e - e.mean(1, keepdims=True)) / n
  d_pre = (d_o @ v.T) * dh_dpre
  return value, o, x.T @ d_pre, h.T @ d_o


def _li2_spec(activation="square"):
  return models.Li2Spec(hidden=K, activation=activation)


@pytest.mark.parametrize("activation", models.ACTIVATIONS)
@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_li2_forward_and_gradients_equal_float64_reference_padded_or_not(activation, loss):
  order, vocab, n = 7, 10, 30
  rng = np.random.default_rng(3)
  a, b, c = (rng.integers(0, order, n) for _ in range(3))
  params = models.init(jax.random.PRNGKey(5), _li2_spec(activation), vocab, order)
  # rows/columns of the padding classes are zero; the real ones random
  assert not np.any(np.asarray(params["w"][order:vocab])) and not np.any(np.asarray(params["unembed"][:, order:]))
  w = np.asarray(params["w"], np.float64)
  w64 = np.concatenate([w[:order], w[vocab:vocab + order]])
  v64 = np.asarray(params["unembed"][:, :order], np.float64)
  ref_loss, ref_o, ref_dw, ref_dv = _li2_loss_grads(w64, v64, a, b, c, order, activation, loss)
  w_B = jnp.full((n,), 1.0 / n, jnp.float32)

  def f(p):
    logits, _ = models.apply(p, jnp.asarray(a), jnp.asarray(b), _li2_spec(activation))
    return tasks.LOSSES[loss](logits, jnp.asarray(c), w_B, order)[0]

  logits, hidden = models.apply(params, jnp.asarray(a), jnp.asarray(b), _li2_spec(activation))
  np.testing.assert_allclose(np.asarray(logits)[:, :order], ref_o, rtol=1e-4, atol=1e-5)
  value, grads = jax.value_and_grad(f)(params)
  np.testing.assert_allclose(float(value), ref_loss, rtol=1e-4)
  dw = np.concatenate([np.asarray(grads["w"][:order]), np.asarray(grads["w"][vocab:vocab + order])])
  scale = np.abs(ref_dw).max()
  assert scale > 1e-3
  np.testing.assert_allclose(dw, ref_dw, atol=1e-4 * scale)
  np.testing.assert_allclose(np.asarray(grads["unembed"][:, :order]), ref_dv, atol=1e-4 * np.abs(ref_dv).max())
  assert not np.any(np.asarray(grads["w"][order:vocab])) and not np.any(np.asarray(grads["unembed"][:, order:]))


def test_li2_padding_leaves_the_run_unchanged():
  """A group padded into a larger bucket gets the weights it gets alone."""
  alone = models.init(jax.random.PRNGKey(9), _li2_spec(), 7, 7)
  padded = models.init(jax.random.PRNGKey(9), _li2_spec(), 11, 7)
  np.testing.assert_array_equal(np.asarray(alone["w"][:7]), np.asarray(padded["w"][:7]))
  np.testing.assert_array_equal(np.asarray(alone["w"][7:]), np.asarray(padded["w"][11:18]))
  np.testing.assert_array_equal(np.asarray(alone["unembed"]), np.asarray(padded["unembed"][:, :7]))


def test_li2_roles_put_w_under_muon_and_v_as_unembed():
  params = models.init(jax.random.PRNGKey(0), _li2_spec(), 5)
  assert models.param_roles(params) == {"w": "hidden", "unembed": "unembed"}


# --- the training-size law -------------------------------------------------------------------------


@pytest.mark.parametrize("spec, s", [("C23", 1.0), ("C127", 1.0), ("A5", 2.5), ("S4", 1.0), ("D7", 1.0)])
def test_law_s_and_pairs_equal_the_formula(spec, s):
  group = groups.get(spec)
  assert tasks.law_s(group, spec) == s  # A5: irreps of degrees 1, 3, 3, 4, 5; D7: 1, 2; S_n: 1 by fiat
  m = group.order
  for mult in (0.5, 1.0, 1.7):
    n = tasks.n_train_law(m, mult, tasks.LAW_C, s)
    exact = mult * tasks.LAW_C * s * m * math.log(m)
    assert n == min(m * m, math.floor(exact + 1e-9)), (spec, mult, n, exact)


def test_a_multiplier_sweep_gives_the_pairs_it_says():
  cfg = group_config(groups="C23,A5", **{"task.size_mult": "0.5,1,2", "model.name": "li2", "model.li2.hidden": K})
  config_lib.validate(cfg)
  fam = family_lib.FAMILY
  rows = fam.runs(cfg)
  assert len(rows) == fam.n_runs(cfg) == 2 * 3 * int(cfg.seeds)
  for r in rows:
    g = groups.get(r["group"])
    want = tasks.n_train_law(g.order, r["size_mult"], tasks.LAW_C, 2.5 if r["group"] == "A5" else 1.0)
    assert tasks.split(g, r["train_frac"], r["base_seed"], r["seed"]).n_train == want
    assert f"mult{r['size_mult']:g}" in r["name"]
  data = fam.make_task(cfg, rows).data
  assert [int(x) for x in data.n_train_S] == [
      tasks.n_train_law(groups.get(r["group"]).order, r["size_mult"], tasks.LAW_C,
                        2.5 if r["group"] == "A5" else 1.0) for r in rows]
  # overrides of c and s
  set_fields(cfg, **{"task.size_c": 1.0, "task.size_s": 2.0})
  n = [int(round(r["train_frac"] * 23 * 23)) for r in fam.runs(cfg) if r["group"] == "C23"]
  assert sorted(set(n)) == [math.floor(m * 2.0 * 23 * math.log(23)) for m in (0.5, 1, 2)]


@pytest.mark.parametrize("fields, message", [
    ({"task.size_mult": "1", "task.train_frac": "0.3"}, "not both"),
    ({"task.size_mult": "1,-2"}, "size_mult"),
    ({"task.loss": "hinge"}, "task.loss"),
    ({"model.li2.activation": "tanh"}, "model.li2.activation"),
])
def test_bad_li2_fields_are_named(fields, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(group_config(**fields))


# --- optimisers ------------------------------------------------------------------------------------


def _adam_update(lr, wd, b1, b2, eps):
  def update(t, name, theta, g, s):
    g = g + wd * theta                       # L2 decay enters the moments (torch.optim.Adam)
    m = b1 * s.get("m", 0.0) + (1 - b1) * g
    v = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    return theta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps), {"m": m, "v": v}
  return update


def test_adam_matches_float64_reference_and_differs_from_adamw():
  cfg = _cfg("adam")
  p0, p1, pairs = _trained(cfg)
  o = cfg.opt
  _assert_close(p0, p1, _reference(p0, pairs, cfg.steps, _adam_update(0.05, 0.3, o.b1, o.b2, o.eps)))
  adamw = _reference(p0, pairs, cfg.steps, _adamw_update(0.05, 0.3, o.b1, o.b2, o.eps))
  assert np.linalg.norm(p1["linear"] - adamw["linear"]) > 1e-3 * np.linalg.norm(adamw["linear"] - p0["linear"])


def _li2_newton_schulz(g, eps=1e-8):
  """Newton–Schulz with the five per-step coefficients of the paper's cogo/muon_opt.py."""
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + eps)
  for a, b, c in optim.LI2_COEFFS:
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("steps", [1, 3])
def test_li2_muon_split_matches_float64_reference(steps):
  """Muon on W (momentum, no Nesterov, Li2 coefficients, no width scaling, decoupled decay) and Adam with L2
  decay on V, on the Li2 network with the MSE loss, full batch."""
  lr, wd, beta, b1, b2, eps = 0.02, 0.3, 0.99, 0.9, 0.999, 1e-8
  cfg = group_config(groups="C7", lr=str(lr), weight_decay=str(wd), train_frac="0.6")
  cfg = set_fields(cfg, **{"model.name": "li2", "model.li2.hidden": K, "task.loss": "mse", "opt.name": "muon",
                           "opt.b1": b1, "opt.b2": b2, "opt.eps": eps, "opt.muon.momentum": beta,
                           "opt.muon.nesterov": False, "opt.muon.other": "adam", "opt.muon.scale_by_shape": False,
                           "opt.muon.ns_coeffs": "li2"})
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.seed = 1, steps, steps, 4
  p0, p1, pairs = _trained(cfg)
  a, b, c = pairs[:, 0], pairs[:, 1], pairs[:, 2]
  w, v = p0["w"].astype(np.float64), p0["unembed"].astype(np.float64)
  mom, adam_state, adam = 0.0, {}, _adam_update(lr, wd, b1, b2, eps)
  for t in range(1, steps + 1):
    _, _, g_w, g_v = _li2_loss_grads(w, v, a, b, c, 7, "square", "mse")
    mom = beta * mom + (1 - beta) * g_w
    w = w * (1 - lr * wd) - lr * _li2_newton_schulz(mom)
    v, adam_state = adam(t, "unembed", v, g_v, adam_state)
  _assert_close(p0, p1, {"w": w, "unembed": v})
  assert "Li2 coefficients" in optim.describe(cfg.opt) and "Adam (L2 decay)" in optim.describe(cfg.opt)


def test_li2_muon_run_padded_into_a_bucket_equals_its_own_launch():
  """Padding rows of W stay zero under Muon (Newton–Schulz maps zero rows to zero rows and keeps the
  Frobenius norm), so C5 trained beside C7 in one bucket follows the trajectory it follows alone. Without
  the width scaling, which reads W's padded shape [2V, K] (the paper's Muon has none)."""
  def trained(groups_text):
    cfg = group_config(groups=groups_text, lr="0.02", weight_decay="0.1", train_frac="0.6")
    cfg = set_fields(cfg, **{"model.name": "li2", "model.li2.hidden": K, "task.bucket_padding": 1.0,
                             "opt.name": "muon", "opt.muon.other": "adam", "opt.muon.ns_coeffs": "li2",
                             "opt.muon.scale_by_shape": False})
    cfg.seeds, cfg.steps, cfg.eval_every, cfg.seed = 1, 3, 3, 2
    tr = train.make_train(cfg)
    state, _ = tr.train()
    return jax.tree.map(lambda x: np.asarray(x[0]), tr.unpad(state).params)
  alone, bucket = trained("C5"), trained("C5,C7")
  assert bucket["w"].shape[0] == 14 and not np.any(bucket["w"][5:7]) and not np.any(bucket["w"][12:])
  for got, want in [(bucket["w"][:5], alone["w"][:5]), (bucket["w"][7:12], alone["w"][5:]),
                    (bucket["unembed"][:, :5], alone["unembed"])]:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
