"""universality.engine.config, universality.engine.tasks, universality.engine.train: validation, splits, one step vs optax, equivalences, divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from universality.engine import config, groups, train
from universality.engine.families.group import models
from universality.engine.families.group import task as tasks
from tests.helpers import group_config, set_fields


def _cfg(**kw):
  cfg = group_config()
  set_fields(cfg, **dict(groups="C5,S3", embed_dim=16, hidden=16, d_model=16, n_heads=2, d_mlp=16, train_frac="0.5",
                  steps=6, eval_every=2, lr="3e-3", weight_decay="1.0"))
  set_fields(cfg, **kw)
  return cfg


def _assert_trees_equal(x, y):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("groups", "S5,Z9", "groups"), ("groups", "", "groups"), ("groups", "C5,C5", "repeated"),
    ("seeds", 0, "seeds"), ("seeds", -3, "seeds"), ("seed", -1, "seed"), ("train_frac", "0.5,0", "train_frac"),
    ("train_frac", "1.5", "train_frac"), ("steps", 0, "steps"), ("lr", "1e-3,0", "lr"), ("lr", "abc", "lr"),
    ("lr", "-1e-3", "lr"), ("weight_decay", "-1", "weight_decay"), ("eval_every", 0, "eval_every"),
    ("eval_every", 4, "does not divide"), ("model", "rnn", "model"), ("n_heads", 3, "n_heads"),
    ("batch_size", -2, "batch_size"), ("b2", 1.0, "b2"),
])
def test_validate_rejects_bad_fields(field, value, match):
  cfg = _cfg()
  set_fields(cfg, **{field: value})
  with pytest.raises(ValueError, match=match) as info:
    config.validate(cfg)
  assert "\n" not in str(info.value)


def test_default_config_is_the_paper_setup_and_valid():
  cfg = config.default_config()
  config.validate(cfg)
  m = cfg.model
  assert (m.mlp.embed_dim, m.mlp.hidden, m.transformer.d_model, m.transformer.n_heads,
          m.transformer.d_mlp) == (256, 128, 128, 4, 512)
  o = cfg.opt
  assert (o.b1, o.b2, float(o.lr), float(o.weight_decay), cfg.batch_size) == (0.9, 0.98, 1e-3, 1.0, 0)


def test_runs_grid_order():
  cfg = _cfg(groups="C5,S3", lr="1e-3,2e-3", weight_decay="0,1", train_frac="0.3,0.5,0.7", seeds=2,
             seed=4, seed_offset=3)
  runs = config.runs(cfg)
  assert len(runs) == 2 * 2 * 2 * 3 * 2
  for g, spec in enumerate(["C5", "S3"]):
    for i, lr in enumerate([1e-3, 2e-3]):
      for j, wd in enumerate([0.0, 1.0]):
        for f, frac in enumerate([0.3, 0.5, 0.7]):
          for k in range(2):
            s = (((g * 2 + i) * 2 + j) * 3 + f) * 2 + k
            cohort = f"{spec}/lr{lr:g}/wd{wd:g}/frac{frac:g}"
            assert runs[s] == dict(group=spec, seed=3 + k, base_seed=4, lr=lr, weight_decay=wd, train_frac=frac,
                                   cohort=cohort, name=f"{spec}/seed{3 + k}/lr{lr:g}/wd{wd:g}/frac{frac:g}")


# --- tasks ----------------------------------------------------------------------------------------


def test_split_partitions_every_pair_and_is_seeded():
  g = groups.get("D4")
  sp = tasks.split(g, 0.3, base_seed=0, seed=2)
  n = g.order
  assert sp.n_train == round(0.3 * n * n)
  codes = sp.pairs_Px3[:, 0] * n + sp.pairs_Px3[:, 1]
  np.testing.assert_array_equal(np.sort(codes), np.arange(n * n))
  np.testing.assert_array_equal(sp.pairs_Px3[:, 2], [g.table[a, b] for a, b, _ in sp.pairs_Px3])
  again = tasks.split(g, 0.3, base_seed=0, seed=2)
  np.testing.assert_array_equal(sp.pairs_Px3, again.pairs_Px3)
  other = tasks.split(g, 0.3, base_seed=0, seed=3)
  assert not np.array_equal(sp.train_Px3, other.train_Px3)
  bigger = tasks.split(g, 0.6, base_seed=0, seed=2)  # splits of one seed are nested
  np.testing.assert_array_equal(bigger.train_Px3[:sp.n_train], sp.train_Px3)


def test_stack_pads_train_and_test_separately():
  sps = [tasks.split(groups.get("C5"), 0.5, 0, 0), tasks.split(groups.get("S3"), 0.25, 0, 0)]
  d = tasks.stack(sps)
  assert d.vocab == 6 and d.train_a_SxP.shape == (2, 12) and d.test_a_SxP.shape == (2, 27)
  np.testing.assert_allclose(d.train_w_SxP.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(d.test_w_SxP.sum(1), 1.0, rtol=1e-6)
  assert (d.train_w_SxP[1, 9:] == 0).all() and (d.train_w_SxP[1, :9] > 0).all()
  np.testing.assert_array_equal(d.test_c_SxP[1, :27], sps[1].test_Px3[:, 2])


def test_masked_xent_matches_float64():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(9, 7)).astype(np.float32) * 3
  c = rng.integers(0, 5, 9).astype(np.int32)
  w = rng.uniform(size=9).astype(np.float32)
  loss, acc = jax.jit(tasks.masked_xent)(logits, c, w, 5)
  lg = logits[:, :5].astype(np.float64)
  ref = np.log(np.exp(lg).sum(1)) - lg[np.arange(9), c]
  np.testing.assert_allclose(loss, (w * ref).sum(), rtol=1e-5)
  np.testing.assert_allclose(acc, (w * (lg.argmax(1) == c)).sum(), rtol=1e-6)


# --- trainer --------------------------------------------------------------------------------------


@jax.jit
def _ref_adamw_step(params, pairs_Px3, lr, wd):
  """One full-batch AdamW step by a separate path: the literal (concat) MLP, its own loss, plain optax."""
  a, b, c = pairs_Px3[:, 0], pairs_Px3[:, 1], pairs_Px3[:, 2]

  def loss(p):
    logits, _ = models.mlp_apply_concat(p, a, b)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, c[:, None], -1)[:, 0])

  cfg = config.default_config()
  tx = optax.adamw(lr, b1=cfg.opt.b1, b2=cfg.opt.b2, eps=cfg.opt.eps, weight_decay=wd)
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_one_step_matches_optax_reference_in_a_mixed_bucket():
  cfg = _cfg(steps=1, eval_every=1, lr="1e-2,3e-2", weight_decay="0.5")
  tr = train.make_train(cfg)
  state0 = tr.unpad(tr.init())
  state, _ = tr.run(tr.init(), 1)
  state = tr.unpad(state)
  for s, r in enumerate(tr.runs):
    g = groups.get(r["group"])
    n = g.order
    p0 = {"embed_a": state0.params["embed_a"][s, :n], "embed_b": state0.params["embed_b"][s, :n],
          "linear": state0.params["linear"][s], "unembed": state0.params["unembed"][s, :, :n]}
    p1 = _ref_adamw_step(p0, tasks.split(g, r["train_frac"], r["base_seed"], r["seed"]).train_Px3, r["lr"],
                         r["weight_decay"])
    np.testing.assert_allclose(state.params["embed_a"][s, :n], p1["embed_a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["linear"][s], p1["linear"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["unembed"][s, :, :n], p1["unembed"], rtol=1e-5, atol=1e-6)
    assert not state.params["unembed"][s, :, n:].any()  # padded classes stay exactly zero


def test_solo_run_equals_member_of_the_sweep():
  """Bitwise with one run per device loop (the CPU default); ~1e-6 when runs are vmapped together."""
  sweep = train.make_train(_cfg(groups="C5,S3", seeds=3, lr="1e-3,3e-3"))
  solo = train.make_train(_cfg(groups="S3", seeds=1, seed_offset=2, lr="3e-3"))
  vmapped = train.make_train(_cfg(groups="C5,S3", seeds=3, lr="1e-3,3e-3", run_chunk=4))
  s = [i for i, r in enumerate(sweep.runs) if r == solo.runs[0]]
  assert s == [11] and sweep.runs[11]["seed"] == 2
  st_sweep, m_sweep = sweep.train()
  st_solo, m_solo = solo.train()
  st_vmap, m_vmap = vmapped.train()
  st_sweep, st_solo, st_vmap = sweep.unpad(st_sweep), solo.unpad(st_solo), vmapped.unpad(st_vmap)
  for k in m_solo:
    np.testing.assert_array_equal(m_sweep[k][:, 11], m_solo[k][:, 0], err_msg=k)
    np.testing.assert_allclose(m_vmap[k], m_sweep[k], rtol=2e-6, atol=1e-6, err_msg=k)
  for k in st_solo.params:  # S3 has the bucket's largest order, so the shapes agree
    np.testing.assert_array_equal(st_sweep.params[k][11], st_solo.params[k][0], err_msg=k)
    np.testing.assert_allclose(st_vmap.params[k], st_sweep.params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_chunked_calls_are_bitwise_equal_and_compile_once():
  cfg = _cfg(batch_size=0)
  tr = train.make_train(cfg)
  state = tr.init()
  parts = []
  for _ in range(3):
    state, m = tr.run(state, 1)
    parts.append(m)
  assert tr.trace_count == 1  # three calls, one compilation
  whole_state, whole = tr.train()
  _assert_trees_equal(tr.unpad(state), tr.unpad(whole_state))
  resumed, _ = tr.run(tr.shard(tr.unpad(tr.run(tr.init(), 2)[0])), 1)  # host round trip, as a checkpoint
  _assert_trees_equal(tr.unpad(resumed), tr.unpad(whole_state))
  for k in whole:
    # The parameters above are bit-identical; a metric is evaluated inside whichever program ran the
    # interval, which XLA may fuse differently for another chunking: equal within float32 rounding.
    np.testing.assert_allclose(np.concatenate([p[k] for p in parts]), whole[k], rtol=2e-6, atol=0, err_msg=k)
    assert whole[k].shape == (3, len(tr.runs)) and whole[k].dtype == np.float32
  assert np.isfinite(whole["train_loss"]).all() and (whole["train_loss"][-1] < whole["train_loss"][0]).all()
  assert int(tr.unpad(whole_state).step[0]) == cfg.steps


def test_minibatches_are_deterministic_and_chunk_independent():
  cfg = _cfg(batch_size=5, groups="C5", seeds=2)
  tr = train.make_train(cfg)
  a, ma = tr.run(tr.run(tr.init(), 1)[0], 2)
  b, mb = tr.train()
  _assert_trees_equal(tr.unpad(a), tr.unpad(b))
  np.testing.assert_array_equal(ma["train_loss"], mb["train_loss"][1:])
  assert (mb["train_loss"][-1] < mb["train_loss"][0]).all()


def test_diverging_member_is_frozen_and_isolated():
  cfg = _cfg(groups="C5", seeds=2, lr="3e-3,1e3", steps=8, eval_every=2)
  tr = train.make_train(cfg)
  state, m = tr.train()
  assert (m["diverged"][-1] == [0, 0, 1, 1]).all()
  p = tr.unpad(state).params
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(p))  # the last finite parameters are kept
  later, m2 = tr.run(state, 2)
  p2 = tr.unpad(later).params
  for k in p:  # frozen: the diverged runs' parameters no longer move
    np.testing.assert_array_equal(p[k][2:], p2[k][2:])
    assert not np.array_equal(p[k][:2], p2[k][:2])
  solo = train.make_train(_cfg(groups="C5", seeds=2, lr="3e-3", steps=8, eval_every=2))
  solo_state, ms = solo.train()
  for k in ms:
    np.testing.assert_array_equal(m[k][:, :2], ms[k], err_msg=k)
  _assert_trees_equal(jax.tree.map(lambda x: x[:2], p), solo.unpad(solo_state).params)


def test_learns_a_cyclic_group():
  cfg = _cfg(groups="C7", seeds=2, embed_dim=32, hidden=64, lr="1e-2", weight_decay="0.1", train_frac="0.8",
             steps=300, eval_every=100)
  _, m = train.make_train(cfg).train()
  assert (m["train_acc"][-1] == 1.0).all() and (m["train_loss"][-1] < 0.05).all()
  assert (m["train_loss"][-1] < m["train_loss"][0]).all()


def test_transformer_trains_and_full_fraction_has_no_test_set():
  cfg = _cfg(model="transformer", groups="C5", train_frac="1.0,0.5", steps=4, eval_every=2)
  tr = train.make_train(cfg)
  _, m = tr.train()
  assert np.isnan(m["test_loss"][:, 0]).all() and np.isfinite(m["test_loss"][:, 1]).all()
  assert np.isfinite(m["train_loss"]).all() and (m["train_loss"][-1] < m["train_loss"][0]).all()


def test_apply_matches_models_apply_and_masks_padding():
  cfg = _cfg(groups="C5,S3", seeds=2)
  tr = train.make_train(cfg)
  state = tr.init()
  rng = np.random.default_rng(0)
  orders = tr.data.order_S
  a = np.stack([rng.integers(0, o, 11) for o in orders]).astype(np.int32)
  b = np.stack([rng.integers(0, o, 11) for o in orders]).astype(np.int32)
  logits, acts = tr.apply(state.params, a, b)
  hidden = acts["hidden"]
  assert logits.shape == (tr.n_padded, 11, 6) and hidden.shape == (tr.n_padded, 11, cfg.model.mlp.hidden)
  params = tr.unpad(state.params)
  for s in range(tr.n_runs):
    p = jax.tree.map(lambda x: x[s], params)
    ref_logits, ref_hidden = jax.jit(lambda p, a, b: models.apply(p, a, b, tr.cfg.model))(p, a[s], b[s])
    np.testing.assert_allclose(np.asarray(hidden)[s], ref_hidden, rtol=1e-5, atol=1e-6)
    o = orders[s]
    np.testing.assert_allclose(np.asarray(logits)[s, :, :o], np.asarray(ref_logits)[:, :o], rtol=1e-5,
                               atol=1e-6)
    assert np.isneginf(np.asarray(logits)[s, :, o:]).all()
  with pytest.raises(ValueError, match="group elements"):
    tr.apply(state.params, a + 6, b)
  with pytest.raises(ValueError, match="apply"):
    tr.apply(state.params, a[:, 0], b[:, 0])


def test_run_rejects_bad_n_evals():
  tr = train.make_train(_cfg(groups="C5"))
  with pytest.raises(ValueError, match="n_evals"):
    tr.run(tr.init(), 0)
