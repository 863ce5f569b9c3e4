"""universality.engine.optim: SGD and Muon against float64 references written from their definitions, the
state-size estimate against real states, validation, and a sweep over optimisers as buckets."""

import jax
import numpy as np
import pytest

from universality.engine import budget, config as config_lib, launch, optim, replay, train
from universality.engine.families.group import task as tasks
from universality.engine.families.lm import models as lm_models
from universality.engine import groups
from tests.helpers import group_config, set_fields

E, N = 6, 10  # embedding width and hidden neurons of the small MLP


def _cfg(name, **fields):
  cfg = group_config(groups="S3", embed_dim=E, hidden=N, lr="0.05", weight_decay="0.3", train_frac="0.7",
                     **{"opt.name": name})
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.seed = 1, 4, 4, 7
  return set_fields(cfg, **fields)


# --- float64 references ---------------------------------------------------------------------------


def _loss_grads(p, pairs_Px3):
  """Mean cross-entropy of the literal (concatenated) MLP and its gradients, in float64 numpy."""
  a, b, c = pairs_Px3[:, 0], pairs_Px3[:, 1], pairs_Px3[:, 2]
  x_Px2E = np.concatenate([p["embed_a"][a], p["embed_b"][b]], axis=1)
  pre_PxN = x_Px2E @ p["linear"]
  h_PxN = np.maximum(pre_PxN, 0)
  logits_PxV = h_PxN @ p["unembed"]
  z = logits_PxV - logits_PxV.max(1, keepdims=True)
  prob_PxV = np.exp(z) / np.exp(z).sum(1, keepdims=True)
  d_logits = prob_PxV.copy()
  d_logits[np.arange(len(c)), c] -= 1
  d_logits /= len(c)
  d_pre = (d_logits @ p["unembed"].T) * (pre_PxN > 0)
  dx = d_pre @ p["linear"].T
  g = {"unembed": h_PxN.T @ d_logits, "linear": x_Px2E.T @ d_pre,
       "embed_a": np.zeros_like(p["embed_a"]), "embed_b": np.zeros_like(p["embed_b"])}
  np.add.at(g["embed_a"], a, dx[:, :E])
  np.add.at(g["embed_b"], b, dx[:, E:])
  return g


def _reference(p, pairs_Px3, steps, update):
  """``steps`` full-batch steps of ``update(t, name, θ, g, state) -> (θ, state)`` from ``p`` (float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  states = {k: {} for k in p}
  for t in range(1, steps + 1):
    g = _loss_grads(p, pairs_Px3)
    for k in p:
      p[k], states[k] = update(t, k, p[k], g[k], states[k])
  return p


def _sgd_update(lr, wd, mu, nesterov):
  def update(t, name, theta, g, s):
    g = g + wd * theta                       # L2 decay enters the momentum (torch.optim.SGD)
    buf = mu * s.get("buf", 0.0) + g
    step = g + mu * buf if nesterov else buf
    return theta - lr * step, {"buf": buf}
  return update


def _adamw_update(lr, wd, b1, b2, eps):
  def update(t, name, theta, g, s):
    m = b1 * s.get("m", 0.0) + (1 - b1) * g
    v = b2 * s.get("v", 0.0) + (1 - b2) * g * g
    step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return theta - lr * (step + wd * theta), {"m": m, "v": v}
  return update


def _newton_schulz(g, steps, eps):
  """The quintic Newton–Schulz orthogonalisation of Muon (coefficients of Jordan et al. 2024)."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + eps)
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def _muon_update(lr, wd, beta, nesterov, ns_steps, adam, matrices):
  def update(t, name, theta, g, s):
    if name not in matrices:
      return adam(t, name, theta, g, s)
    m = beta * s.get("m", 0.0) + (1 - beta) * g
    if nesterov:  # bias-corrected look-ahead: β·m̂ₜ₊₁ + (1−β)·ĝₜ
      direction = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
    else:
      direction = m / (1 - beta ** t)
    o = _newton_schulz(direction, ns_steps, 1e-8) * np.sqrt(max(1.0, g.shape[1] / g.shape[0]))
    return theta - lr * (o + wd * theta), {"m": m}
  return update


def _trained(cfg):
  tr = train.make_train(cfg)
  p0 = jax.tree.map(lambda x: np.asarray(x[0]), tr.unpad(tr.init()).params)
  state, _ = tr.train()
  p1 = jax.tree.map(lambda x: np.asarray(x[0]), tr.unpad(state).params)
  r = tr.runs[0]
  pairs = tasks.split(groups.get(r["group"]), r["train_frac"], r["base_seed"], r["seed"]).train_Px3
  return p0, p1, pairs


def _assert_close(p0, p1, ref):
  """The trained change of every parameter equals the reference's to 1e-4 of its size (float32 training
  against float64: a wrong rule is off by O(1))."""
  for k in ref:
    moved = ref[k] - p0[k]
    err = np.linalg.norm((p1[k] - p0[k]) - moved) / np.linalg.norm(moved)
    assert err < 1e-4, (k, err)


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.8, True), (0.0, False)])
def test_sgd_matches_float64_reference(momentum, nesterov):
  cfg = _cfg("sgd", **{"opt.sgd.momentum": momentum, "opt.sgd.nesterov": nesterov})
  p0, p1, pairs = _trained(cfg)
  ref = _reference(p0, pairs, cfg.steps, _sgd_update(0.05, 0.3, momentum, nesterov))
  _assert_close(p0, p1, ref)


@pytest.mark.parametrize("nesterov,roles", [(True, "hidden"), (False, "hidden,unembed")])
def test_muon_matches_float64_reference(nesterov, roles):
  cfg = _cfg("muon", lr="0.02", **{"opt.muon.nesterov": nesterov, "opt.muon.params": roles,
                                   "opt.muon.momentum": 0.9})
  p0, p1, pairs = _trained(cfg)
  adam = _adamw_update(0.02, 0.3, cfg.opt.b1, cfg.opt.b2, cfg.opt.eps)
  matrices = {"linear"} | ({"unembed"} if "unembed" in roles else set())
  ref = _reference(p0, pairs, cfg.steps, _muon_update(0.02, 0.3, 0.9, nesterov, 5, adam, matrices))
  _assert_close(p0, p1, ref)


def test_adamw_matches_float64_reference():
  cfg = _cfg("adamw", lr="0.01")
  p0, p1, pairs = _trained(cfg)
  ref = _reference(p0, pairs, cfg.steps, _adamw_update(0.01, 0.3, cfg.opt.b1, cfg.opt.b2, cfg.opt.eps))
  _assert_close(p0, p1, ref)


# --- the size check's state estimate --------------------------------------------------------------


@pytest.mark.parametrize("name", optim.NAMES)
@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_state_estimate_equals_the_real_state(name, model):
  cfg = _cfg(name, model=model, d_model=8, n_heads=2, d_mlp=12, **{"opt.clip_norm": 1.0,
                                                                     "opt.schedule": "cosine"})
  tr = train.make_train(cfg)
  state = tr.unpad(tr.init())
  real = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))) // tr.n_runs
  assert budget.estimate(cfg, 1, True).state == real


def test_lm_state_estimate_equals_the_real_state():
  cfg = config_lib.default_config("lm")
  gpt = cfg.model.gpt
  gpt.n_layers, gpt.d_model, gpt.n_heads, gpt.d_mlp, gpt.context = 2, 16, 2, 32, 8
  cfg.opt.name = "muon"
  params = lm_models.init(jax.random.key_data(jax.random.key(0)), gpt)
  roles = lm_models.param_roles(params)
  hidden = sorted(k for k, r in roles["blocks"].items() if r == "hidden")
  assert hidden == ["w_in", "w_o", "w_out", "w_qkv"] and roles["embed"] == "embed"
  assert roles["blocks"]["b_in"] == roles["lnf_g"] == "vector" and roles["unembed"] == "unembed"
  for name in optim.NAMES:
    cfg.opt.name = name
    tx = optim.make(cfg.opt, 10, 1e-3, 0.1, lm_models.param_roles)
    real = sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))
    assert optim.state_bytes(cfg.opt, 10, jax.eval_shape(lambda: params), lm_models.param_roles) == real


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("opt.name", "adamax", r"config.opt.name: 'adamax' is not one of"),
    ("opt.name", "sgd,sgd", r"config.opt.name: repeated values"),
    ("opt.sgd.momentum", 1.0, r"config.opt.sgd.momentum: must lie in \[0, 1\)"),
    ("opt.muon.ns_steps", 0, r"config.opt.muon.ns_steps: expected an integer in \[1, 20\]"),
    ("opt.muon.params", "hidden,bias", r"config.opt.muon.params: expected comma-separated roles"),
])
def test_bad_optimiser_fields_are_named(field, value, message):
  name = {"opt.sgd.momentum": "sgd", "opt.muon.ns_steps": "muon", "opt.muon.params": "muon"}.get(field, "adamw")
  cfg = _cfg(name)
  set_fields(cfg, **{field: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)


def test_fields_of_unused_optimisers_are_not_checked():
  config_lib.validate(_cfg("adamw", **{"opt.sgd.momentum": 5.0}))


def test_a_sweep_over_optimisers_trains_one_bucket_each_equal_to_its_own_launch(tmp_path):
  cfg = _cfg("adamw,muon", seeds=2, steps=20, eval_every=10, **{"exec.analyze": False})
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 20, 10, 2
  out = launch.run_study(cfg, str(tmp_path / "both"), progress=False)
  assert list(out["buckets"]) == ["adamw-order6", "muon-order6"]
  study = replay.open(str(tmp_path / "both"))
  for name in ("adamw", "muon"):
    alone = cfg.copy_and_resolve_references()
    alone.opt.name = name
    launch.run_study(alone, str(tmp_path / name), progress=False)
    mine, theirs = replay.open(str(tmp_path / name)), study.buckets[f"{name}-order6"]
    assert mine.config.opt.name == theirs.config.opt.name == name
    for a, b in zip(jax.tree.leaves(mine.params()), jax.tree.leaves(theirs.params())):
      np.testing.assert_array_equal(a, b)
  adamw, muon = (jax.tree.leaves(study.buckets[f"{n}-order6"].params()) for n in ("adamw", "muon"))
  assert any(not np.allclose(a, b) for a, b in zip(adamw, muon))  # the optimisers did differ
