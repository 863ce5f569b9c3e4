"""universality.engine.analysis.neuron_stats: streamed moments, variance explained and vocabulary composition against
float64 numpy / scipy references, on planted neurons, over uneven and padded batches, traced once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from universality.engine.analysis import neuron_stats as ns


def _rng(*salt):
  return np.random.default_rng([20240117, *salt])


def _planted_acts(seed, t, offset):
  """Neurons with known shape: Gaussian, ±exponential (skew sign), Student-t (heavy tails), uniform
  (light tails), sparse spikes, and one constant; all shifted by ``offset`` plus a per-neuron mean."""
  rng = _rng(seed)
  cols = [rng.normal(0.3, 1.0, t),
          rng.exponential(1.0, t),
          -rng.exponential(2.0, t),
          0.5 * rng.standard_t(5, t),
          rng.uniform(-1.0, 1.0, t),
          np.where(rng.random(t) < 0.05, rng.exponential(3.0, t), -0.1 + 0.01 * rng.standard_normal(t)),
          np.full(t, 3.7)]
  x = np.stack(cols, axis=1) + offset + rng.uniform(-0.5, 0.5, len(cols))
  x[:, -1] = 3.7 + offset  # constant exactly, even after the per-neuron mean
  return x.astype(np.float32)


CONSTANT = 6  # index of the constant neuron in _planted_acts


def _reference_moments(x):
  x = np.asarray(x, np.float64)
  return {"mean": x.mean(0), "var": x.var(0), "skew": scipy.stats.skew(x[:, :CONSTANT], axis=0),
          "kurtosis": scipy.stats.kurtosis(x[:, :CONSTANT], axis=0, fisher=False),
          "freq_nonneg": (x >= 0).mean(0)}


def _padded_batches(x, sizes, bmax, seed):
  """Batches of ``sizes`` rows, each padded to ``bmax`` rows of NaN at random places (a valid mask)."""
  rng = _rng(seed)
  m = x.shape[1]
  start = 0
  for b in sizes:
    valid = np.zeros(bmax, bool)
    valid[rng.choice(bmax, b, replace=False)] = True
    batch = np.full((bmax, m), np.nan, np.float32)
    batch[valid] = x[start:start + b]
    start += b
    yield batch, valid
  assert start == len(x)


def _assert_moments(stats, ref):
  stats = {k: np.asarray(v) for k, v in stats.items()}
  assert all(np.isfinite(v).all() for v in stats.values())
  np.testing.assert_allclose(stats["mean"], ref["mean"], rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(stats["var"][:CONSTANT], ref["var"][:CONSTANT], rtol=1e-4)
  np.testing.assert_allclose(stats["skew"][:CONSTANT], ref["skew"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["kurtosis"][:CONSTANT], ref["kurtosis"], rtol=1e-4)
  np.testing.assert_allclose(stats["freq_nonneg"], ref["freq_nonneg"], rtol=1e-6)
  # The planted shapes are there (so the comparison above is not vacuous).
  assert stats["skew"][1] > 1.0 and stats["skew"][2] < -1.0 and stats["skew"][5] > 2.0
  assert stats["kurtosis"][3] > 4.0 and stats["kurtosis"][4] < 2.0 and stats["kurtosis"][5] > 10.0
  # The constant neuron: zero variance, skew and kurtosis 0 by convention.
  assert stats["var"][CONSTANT] <= 1e-10
  assert stats["skew"][CONSTANT] == 0.0 and stats["kurtosis"][CONSTANT] == 0.0


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_moments_streamed_over_uneven_batches_match_float64(offset):
  x = _planted_acts(1, 3000, offset)
  ref = _reference_moments(x)
  if offset == 0.0:
    assert 0.2 < ref["freq_nonneg"][0] < 0.9  # a non-trivial share of non-negative inputs
  state = ns.moments_init(x.shape[1])
  start = 0
  for b in (1, 7, 500, 1201, 291, 1000):  # a single row first: the first merge starts from one input
    state = ns.moments_update(state, x[start:start + b])
    start += b
  assert start == len(x) and int(state.count) == len(x)
  _assert_moments(ns.moments_finalize(state), ref)


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_moments_over_padded_batches_match_float64_and_trace_once(offset):
  x = _planted_acts(2, 2600, offset)
  ref = _reference_moments(x)
  chex.clear_trace_counter()  # counted per function, across the parametrized cases
  update = jax.jit(chex.assert_max_traces(ns.moments_update, n=1))
  state = ns.moments_init(x.shape[1])
  # An empty batch (all padding) both before any data and in the middle must change nothing.
  for batch, valid in _padded_batches(x, (0, 3, 512, 0, 400, 512, 173, 500, 500), 512, seed=3):
    state = update(state, batch, valid)
  assert int(state.count) == len(x)
  _assert_moments(ns.moments_finalize(state), ref)


def test_moments_of_an_empty_state_are_zero_not_nan():
  stats = ns.moments_finalize(ns.moments_init(3))
  for v in stats.values():
    np.testing.assert_array_equal(np.asarray(v), np.zeros(3))


# --------------------------------------------------------------------------------------------------
# Variance explained


def _brute_force_ve(x, cat, groups=None):
  """float64: Σ_g n_g (mean_g - mean)² / Σ (x - mean)², one group at a time."""
  x = np.asarray(x, np.float64)
  keys = cat if groups is None else groups[cat]
  mean = x.mean(0)
  total = ((x - mean) ** 2).sum(0)
  between = np.zeros(x.shape[1])
  for g in np.unique(keys):
    xs = x[keys == g]
    between += len(xs) * (xs.mean(0) - mean) ** 2
  return np.where(total > 0, between / np.where(total > 0, total, 1.0), 0.0)


def _byte_acts(seed, t):
  """Bytes and neurons: a function of the byte, an independent one (offset 1e3), a function of the byte
  class, a byte function plus equal noise far from zero, a constant, and independent heavy-tailed noise."""
  rng = _rng(seed)
  _, cls = ns.byte_classes()
  cat = rng.integers(0, 256, t)
  table = rng.normal(0.0, 2.0, 256)
  class_table = rng.normal(0.0, 1.0, len(ns.BYTE_CLASS_NAMES))
  x = np.stack([table[cat] + 0.01 * rng.standard_normal(t),
                1e3 + rng.standard_normal(t),
                class_table[cls[cat]] + 0.02 * rng.standard_normal(t),
                1e3 + 0.5 * table[cat] + rng.standard_normal(t),
                np.full(t, 5.0),
                rng.exponential(1.0, t)], axis=1).astype(np.float32)
  return x, cat


def test_variance_explained_matches_brute_force_per_byte_and_per_class():
  x, cat = _byte_acts(4, 12000)
  names, cls = ns.byte_classes()
  # Out-of-range categories are dropped, as if the rows were padding.
  cat_in = cat.copy()
  drop = _rng(5).random(len(cat)) < 0.02
  cat_in[drop] = np.where(_rng(6).random(drop.sum()) < 0.5, -1, 300)
  keep = ~drop
  chex.clear_trace_counter()
  update = jax.jit(chex.assert_max_traces(ns.categories_update, n=1))
  state = ns.categories_init(256, x.shape[1])
  bmax = 1024
  for batch, valid in _padded_batches(np.concatenate([x, cat_in[:, None].astype(np.float32)], 1),
                                      (0, 700, 1024, 1024, 300) + (1000,) * 8 + (952,), bmax, seed=7):
    batch_cat = np.where(valid, np.nan_to_num(batch[:, -1], nan=0.0), 0).astype(np.int32)
    state = update(state, batch[:, :-1], batch_cat, valid)
  assert int(state.count) == keep.sum() == int(np.asarray(state.count_Q).sum())

  ve = np.asarray(ns.variance_explained(state))
  ve_cls = np.asarray(ns.variance_explained(state, cls))
  ref = _brute_force_ve(x[keep], cat[keep])
  ref_cls = _brute_force_ve(x[keep], cat[keep], cls)
  ref[4] = ref_cls[4] = 0.0  # the constant neuron: 0 by convention
  np.testing.assert_allclose(ve, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ve_cls, ref_cls, rtol=1e-4, atol=1e-5)
  # Planted structure: byte functions are explained by the byte, class functions by the class too.
  assert ve[0] > 0.99 and ve[2] > 0.99 and ve_cls[2] > 0.99
  assert 0.15 < ve[3] < 0.85 and ve_cls[0] < 0.5
  assert ve[1] < 0.05 and ve[5] < 0.05 and ve_cls[1] < 0.01
  assert ve[4] == 0.0 and ve_cls[4] == 0.0


def test_variance_explained_by_position_with_traced_groups():
  """Position in a window as the category; groups (halves of the window) passed as a traced array."""
  rng = _rng(8)
  t, window = 4096, 64
  pos = np.arange(t) % window
  x = np.stack([np.sin(pos / 5.0) + 0.05 * rng.standard_normal(t),
                -2e3 + rng.standard_normal(t)], axis=1).astype(np.float32)
  halves = (np.arange(window) >= window // 2).astype(np.int32) * 7 - 3  # arbitrary group ids
  state = ns.categories_init(window, 2)
  for a in range(0, t, 1000):
    state = ns.categories_update(state, x[a:a + 1000], pos[a:a + 1000])
  ve = np.asarray(jax.jit(ns.variance_explained)(state, halves))
  np.testing.assert_allclose(ve, _brute_force_ve(x, pos, halves), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ns.variance_explained(state)), _brute_force_ve(x, pos),
                             rtol=1e-4, atol=1e-5)
  assert np.asarray(ns.variance_explained(state))[0] > 0.99


def test_byte_classes_partition_all_bytes():
  names, cls = ns.byte_classes()
  assert cls.shape == (256,) and cls.dtype == np.int32
  assert set(cls.tolist()) == set(range(len(names))) and len(set(names)) == len(names)

  def name(ch):
    return names[cls[ord(ch) if isinstance(ch, str) else ch]]

  assert [name(c) for c in "aqzAQZ059 \n\r\t!~.,_@"] == (
      ["lowercase"] * 3 + ["uppercase"] * 3 + ["digit"] * 3 + ["space", "newline", "newline", "tab"]
      + ["punctuation"] * 6)
  assert name(0) == name(0x0B) == name(0x1F) == name(0x7F) == "control"
  assert name(0x80) == name(0xC3) == name(0xFF) == "non_ascii"
  counts = {n: int((cls == i).sum()) for i, n in enumerate(names)}
  assert counts == {"lowercase": 26, "uppercase": 26, "digit": 10, "space": 1, "newline": 2, "tab": 1,
                    "punctuation": 32, "control": 30, "non_ascii": 128}
  cls[0] = 99  # a fresh copy each call
  assert ns.byte_classes()[1][0] == names.index("control")


# --------------------------------------------------------------------------------------------------
# Vocabulary composition


def _reference_composition(w_out, w_u):
  w_out, w_u = np.asarray(w_out, np.float64), np.asarray(w_u, np.float64)
  s, n, _ = w_out.shape
  out = {k: np.zeros((s, n)) for k in ("mean", "var", "skew", "kurtosis")}
  for i in range(s):
    wc = w_u[i] - w_u[i].mean(1, keepdims=True)
    for j in range(n):
      cos = np.array([w_out[i, j] @ wc[:, v] / (np.linalg.norm(w_out[i, j]) * np.linalg.norm(wc[:, v]))
                      for v in range(wc.shape[1])])
      out["mean"][i, j], out["var"][i, j] = cos.mean(), cos.var()
      out["skew"][i, j] = scipy.stats.skew(cos)
      out["kurtosis"][i, j] = scipy.stats.kurtosis(cos, fisher=False)
  return out


def test_vocab_composition_matches_loop_and_finds_prediction_and_suppression():
  rng = _rng(9)
  s, n, d, v = 2, 5, 128, 256
  # A direction shared by every token: centring must remove it, or every cosine would share it.
  w_u = rng.standard_normal((s, d, v)) + 3.0 * rng.standard_normal((s, d, 1))
  w_out = rng.standard_normal((s, n, d))
  wc = w_u - w_u.mean(2, keepdims=True)
  w_out[0, 1] = 2.5 * wc[0, :, 17]     # promotes token 17: prediction neuron
  w_out[1, 3] = -0.7 * wc[1, :, 200]   # pushes token 200 down: suppression neuron
  w_out, w_u = w_out.astype(np.float32), w_u.astype(np.float32)
  got = {k: np.asarray(val) for k, val in jax.jit(ns.vocab_composition)(w_out, w_u).items()}
  ref = _reference_composition(w_out, w_u)
  for k in ("var", "skew", "kurtosis"):
    assert got[k].shape == (s, n)
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-4, atol=1e-6)
  assert got["kurtosis"][0, 1] > 10.0 and got["skew"][0, 1] > 0
  assert got["kurtosis"][1, 3] > 10.0 and got["skew"][1, 3] < 0
  expected = np.zeros((s, n), np.int32)
  expected[0, 1], expected[1, 3] = 1, -1
  np.testing.assert_array_equal(np.asarray(ns.prediction_class(got["skew"], got["kurtosis"])), expected)


def test_vocab_composition_checks_shapes():
  with pytest.raises(AssertionError):
    ns.vocab_composition(np.ones((2, 3, 8), np.float32), np.ones((2, 9, 16), np.float32))
  with pytest.raises(AssertionError):
    ns.vocab_composition(np.ones((2, 3, 8), np.float32), np.ones((1, 8, 16), np.float32))


def test_prediction_class_thresholds():
  skew = jnp.array([2.0, -2.0, 2.0, 0.0, -0.5, 3.0])
  kurt = jnp.array([11.0, 11.0, 10.0, 50.0, 9.0, 20.0])
  np.testing.assert_array_equal(np.asarray(ns.prediction_class(skew, kurt)), [1, -1, 0, 0, 0, 1])
  np.testing.assert_array_equal(np.asarray(ns.prediction_class(skew, kurt, kurtosis_threshold=25.0)),
                                [0, 0, 0, 0, 0, 0])
