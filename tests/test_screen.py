"""universality.kernels.screen: the screened pass gives the exact pass's maxima and argmaxes, neuron by neuron."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from universality.kernels import correlation as kc
from universality.kernels import gathered
from universality.kernels import screen as ks


def _reference(acts_SxTxN, q_SxNxN=None):
  """float64 max and the gap to the runner-up per (neuron, model), self excluded unless rotated."""
  x = np.asarray(acts_SxTxN, np.float64)
  s, t, n = x.shape
  cols = x if q_SxNxN is None else np.einsum("stk,skn->stn", x, np.asarray(q_SxNxN, np.float64))

  def z(a):
    flat = a.transpose(1, 0, 2).reshape(t, s * n)
    flat = flat - flat.mean(0)
    sd = np.sqrt((flat * flat).sum(0))
    return np.where(sd > 1e-9 * np.sqrt(t), flat / np.where(sd > 0, sd, 1.0), 0.0)

  corr = (z(x).T @ z(cols)).reshape(s, n, s, n)
  if q_SxNxN is None:
    for i in range(s):
      corr[i, np.arange(n), i, np.arange(n)] = -np.inf
  srt = np.sort(corr, axis=-1)
  return srt[..., -1], srt[..., -1] - srt[..., -2]


def _compare(exact, screened, gap_SxNxS, *, within, atol=1e-6, refs=None):
  """Maxima within ``atol`` of the exact pass; the same argmax wherever the runner-up is more than 1e-6 below
  the max. With float64 maxima in ``refs`` (by field): the screened maxima within 5e-7 of them, and within
  the exact pass's own float32 error (its distance to them) + 5e-7 of the exact pass."""
  refs = refs or {}
  for mx, arg in (("max_SxNxS", "argmax_SxNxS"), ("baseline_max_SxNxS", "baseline_argmax_SxNxS")):
    if getattr(exact, mx) is None:
      assert getattr(screened, mx) is None
      continue
    got, want = np.asarray(getattr(screened, mx), np.float64), np.asarray(getattr(exact, mx), np.float64)
    if mx in refs:
      ref = refs[mx]
      wanted = np.broadcast_to(True if within else ~np.eye(ref.shape[0], dtype=bool)[:, None, :], ref.shape)
      np.testing.assert_allclose(got[wanted], ref[wanted], atol=5e-7, rtol=0)
      assert (np.abs(got - want)[wanted] <= np.abs(want - ref)[wanted] + 5e-7).all()
    else:
      np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    clear = gap_SxNxS > 1e-6
    if not within:
      clear &= ~np.eye(gap_SxNxS.shape[0], dtype=bool)[:, None, :]
    assert clear.mean() > 0.3
    np.testing.assert_array_equal(np.asarray(getattr(screened, arg))[clear], np.asarray(getattr(exact, arg))[clear])
  np.testing.assert_array_equal(np.asarray(screened.dead_SxN), np.asarray(exact.dead_SxN))


def _mixture(seed, s, t, n, *, dead=2):
  """Heavy-tailed mixtures: shared Student-t latents (3 degrees of freedom) mixed into every model with a
  per-input scale drawn from two Gaussians' variances, sparse ReLU-like neurons, and dead ones."""
  rng = np.random.default_rng(seed)
  k = max(4, n // 3)
  latent_TxQ = rng.standard_t(3, (t, k)) * np.where(rng.random((t, 1)) < 0.2, 3.0, 1.0)
  acts = np.empty((s, t, n))
  for i in range(s):
    mix_KxN = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.15)
    mix_KxN[rng.integers(0, k, n), np.arange(n)] += 2.0  # each neuron follows one latent most
    x = latent_TxQ @ mix_KxN + rng.standard_t(4, (t, n)) * rng.uniform(0.3, 1.5, n)
    sparse = rng.random(n) < 0.3
    x[:, sparse] = np.maximum(x[:, sparse] - 1.0, 0.0)
    x[:, rng.choice(n, dead, replace=False)] = rng.uniform(-3, 3)
    acts[i] = x + rng.standard_normal(n) * 5.0
  return acts.astype(np.float32)


def _source(acts, batch):
  return lambda: (acts[:, a:a + batch] for a in range(0, acts.shape[1], batch))


@pytest.mark.parametrize("seed,baseline,within,as_source,path", [
    (0, None, False, True, "cpu loop"), (1, "rotation", False, False, "cpu loop"),
    (2, None, True, False, "cpu loop"), (3, "rotation", True, True, "cpu loop"),
    (1, "rotation", False, False, "xla"), (3, "rotation", True, True, "xla")])
def test_screen_matches_exact_on_heavy_tailed_mixtures(seed, baseline, within, as_source, path, monkeypatch):
  """Both ways of running the passes over all inputs: the CPU loop (kernels.gathered) and XLA's gathered
  product (the accelerators' path)."""
  assert gathered.available()
  if path == "xla":
    monkeypatch.setattr(gathered, "available", lambda: False)
  acts = _mixture(seed, 3, 12_000, 24)
  key = jax.random.key(seed)
  data = _source(acts, 1_000) if as_source else acts
  exact = kc.max_correlation(data, baseline=baseline, key=key, within=within)
  stats = {}
  screened = ks.max_correlation(data, screen=ks.Screen("on", tokens=1_024, z=6.0, k=2), baseline=baseline,
                                key=key, within=within, stats=stats)
  assert stats["ran"] == "screen"
  ref, gap = _reference(acts)
  wanted = np.broadcast_to(np.ones((), bool) if within else ~np.eye(3, dtype=bool)[:, None, :], ref.shape)
  np.testing.assert_allclose(np.asarray(exact.max_SxNxS)[wanted], ref[wanted], atol=2e-5)
  refs = {"max_SxNxS": ref}
  if baseline:
    refs["baseline_max_SxNxS"] = _reference(acts, kc.rotations(key, 3, 24))[0]
  _compare(exact, screened, gap, within=within, refs=refs)
  settled = np.asarray(screened.settled_SxN)
  assert set(np.unique(settled)) <= {ks.SETTLED_SCREEN, ks.SETTLED_FULL_ROW}
  assert screened.margin == pytest.approx(6.0 / 32.0)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_screen_never_changes_a_result_on_random_cases(seed):
  rng = np.random.default_rng(seed)
  s, n, t = int(rng.integers(2, 5)), int(rng.integers(5, 40)), int(rng.integers(3_000, 9_000))
  acts = _mixture(seed, s, t, n, dead=int(rng.integers(0, 3)))
  key = jax.random.key(seed)
  baseline = [None, "rotation"][seed % 2]
  within = bool(seed % 3)
  screen = ks.Screen("on", tokens=int(rng.integers(256, 1_024)), z=float(rng.uniform(4, 8)),
                     k=int(rng.integers(1, 4)), max_candidates=int(rng.integers(4, 12)))
  data = _source(acts, 700) if seed % 2 else acts
  exact = kc.max_correlation(data, baseline=baseline, key=key, within=within)
  screened = ks.max_correlation(data, screen=screen, baseline=baseline, key=key, within=within)
  q = kc.rotations(key, s, n) if baseline else None
  ref, gap = _reference(acts)
  refs = {"max_SxNxS": ref}
  if baseline:
    refs["baseline_max_SxNxS"] = _reference(acts, q)[0]
  _compare(exact, screened, gap, within=within, refs=refs)
  if baseline:
    _, gap_rot = _reference(acts, q)
    clear = (gap_rot > 1e-6) & ~(np.eye(s, dtype=bool)[:, None, :] if not within else False)
    np.testing.assert_array_equal(np.asarray(screened.baseline_argmax_SxNxS)[clear],
                                  np.asarray(exact.baseline_argmax_SxNxS)[clear])


@pytest.mark.parametrize("refine", [False, True])
def test_planted_weak_in_sample_winner_forces_a_full_row(refine):
  """Neuron 0 of model 0 matches neuron 5 of model 1 (r ≈ 0.8), but only after the sample's inputs; in the
  sample a decoy (neuron 9) tracks it closely and neuron 5 is noise. Without a refinement, the decoy's exact
  correlation falls below neuron 5's upper bound, so the check must send the row to a full pass; with one
  (a prefix of 16 × T₁ inputs), the decoy's interval there falls below that bound, so the pass over all
  inputs takes the row in full. Either way the row's maximum is found in full: neuron 5."""
  rng = np.random.default_rng(4)
  t, n, t1 = 20_000, 16, 1_024
  a = rng.standard_normal((2, t, n)).astype(np.float32)
  src = a[0, :, 0]
  a[1, t1:, 5] = 0.8 * src[t1:] + 0.6 * a[1, t1:, 5]
  a[1, :t1, 9] = 0.9 * src[:t1] + 0.3 * a[1, :t1, 9]
  stats = {}
  screen = ks.Screen("on", tokens=t1, z=5.0, k=1, growth=16 if refine else 1 << 20)
  screened = ks.max_correlation(_source(a, 512), screen=screen, within=False, stats=stats)
  exact = kc.max_correlation(_source(a, 512), within=False)
  assert int(np.asarray(exact.argmax_SxNxS)[0, 0, 1]) == 5
  assert int(np.asarray(screened.argmax_SxNxS)[0, 0, 1]) == 5
  np.testing.assert_allclose(np.asarray(screened.max_SxNxS), np.asarray(exact.max_SxNxS), atol=1e-6, rtol=0)
  assert np.asarray(screened.settled_SxN)[0, 0] == ks.SETTLED_FULL_ROW
  if refine:
    assert [r["tokens"] for r in stats["refine"]] == [16 * t1] and stats["passes"] == 1
    assert stats["full_rows_sample"] >= 1 and stats["full_rows_check"] == 0
  else:
    assert stats["refine"] == [] and stats["full_rows_check"] >= 1 and stats["passes"] == 2
  assert (np.asarray(screened.settled_SxN) == ks.SETTLED_SCREEN).mean() > 0.5  # the rest was screened


@pytest.mark.parametrize("squares,precise,in_loop", [(True, True, True), (False, True, False),
                                                     (True, True, False), (True, False, False)])
def test_cpu_loop_sums_equal_float64(squares, precise, in_loop, monkeypatch):
  """kernels.gathered against float64 numpy on one layout's sums over padded batches: per neuron, rotated
  union and every rotated neuron; the pairs (rows against real and rotated columns) and the full rows, held
  by the loop or taken as products over the batch (float32 ones where not ``precise``)."""
  if not in_loop:
    monkeypatch.setattr(gathered, "ROW_ENTRIES", 0)
  rng = np.random.default_rng(20)
  s, n, t, u, bmax = 3, 17, 2_300, 4, 1_000
  m = s * n
  acts = _mixture(21, s, t, n, dead=1)
  shift = (acts[:, :300].mean(1) + rng.normal(0, 0.5, (s, n))).astype(np.float32)
  q = np.asarray(kc.rotations(jax.random.key(4), s, n))
  union = np.stack([rng.choice(n, u, replace=False) for _ in range(s)])
  q_sel = np.take_along_axis(q, union[:, None, :], axis=2)
  rows_P, cols_P = rng.integers(0, m, 40), rng.integers(0, m + s * u, 40)
  full_F, rot_F = rng.choice(m, 3, replace=False), rng.choice(m, 2, replace=False)
  # A large offset (the shift must be applied exactly) and padding beyond each batch's b (never counted).
  acts, shift = (acts + 1e3).astype(np.float32), (shift + 1e3).astype(np.float32)
  sums = gathered.Sums(rows_P, cols_P, full_F, rot_F, q_sel, q, s, n, squares, precise)
  for a in range(0, t, bmax):
    x = rng.normal(0, 1e4, (s, bmax, n)).astype(np.float32)
    x[:, :min(bmax, t - a)] = acts[:, a:a + bmax]
    sums.add(x, min(bmax, t - a), shift)
  xs = np.asarray(acts, np.float64) - shift[:, None, :]
  real = xs.transpose(1, 0, 2).reshape(t, m)
  rot_u = np.einsum("stn,snu->tsu", xs, q_sel).reshape(t, s * u)
  rot_all = np.einsum("stk,skn->tsn", xs, q).reshape(t, m)
  cols = np.concatenate([real, rot_u], axis=1)
  prod = real[:, rows_P] * cols[:, cols_P]
  want = {"s1": real.sum(0), "s2": (real ** 2).sum(0), "r2": (rot_u ** 2).sum(0),
          "rall2": (rot_all ** 2).sum(0), "pairs": prod.sum(0), "full": real[:, full_F].T @ real, "rot_full": real[:, rot_F].T @ rot_all}
  if squares:
    want.update(pairs2=(prod ** 2).sum(0), full2=(real[:, full_F] ** 2).T @ real ** 2,
                rot_full2=(real[:, rot_F] ** 2).T @ rot_all ** 2)
  acc = sums.as_acc()
  assert acc["count"] == t and acc["finite"]
  assert set(acc["sums"]) == set(want)
  for name, w in want.items():
    # x - shift is exact here, rotated values are rounded to float32 in the loop; not ``precise``: float32
    # products for the full rows.
    rtol = 1e-9 if name in ("s1", "s2", "full", "full2") else 1e-6
    rtol = rtol if precise or not name.endswith(("full", "full2")) else 1e-5
    np.testing.assert_allclose(ks._value(acc, name), w, atol=rtol * np.abs(w).max(), rtol=0, err_msg=name)


def test_constant_on_the_sample_but_live_later():
  """A neuron that is constant on the sample and a clear match afterwards: as a row it takes its full row, as
  a column it is a candidate of every row, so both directions are exact."""
  rng = np.random.default_rng(5)
  t, n, t1 = 8_000, 12, 512
  a = rng.standard_normal((2, t, n)).astype(np.float32)
  a[1, :, 3] = 0.9 * a[0, :, 7] + 0.3 * a[1, :, 3]
  a[1, :t1, 3] = 1.5
  screened = ks.max_correlation(_source(a, 1_000), screen=ks.Screen("on", tokens=t1), within=False)
  exact = kc.max_correlation(_source(a, 1_000), within=False)
  np.testing.assert_allclose(np.asarray(screened.max_SxNxS), np.asarray(exact.max_SxNxS), atol=1e-6, rtol=0)
  assert int(np.asarray(screened.argmax_SxNxS)[0, 7, 1]) == 3
  assert int(np.asarray(screened.argmax_SxNxS)[1, 3, 0]) == 7
  assert np.asarray(screened.settled_SxN)[1, 3] == ks.SETTLED_FULL_ROW


def test_lm_activations():
  """Post-GELU activations of two freshly initialised default-config byte models on held-out text (a trained
  launch is too slow for a test), windows in a shuffled order."""
  from universality.engine import config as config_lib  # noqa: PLC0415
  from universality.engine.families.lm import analysis, models  # noqa: PLC0415
  cfg = config_lib.default_config("lm")
  gpt = cfg.model.gpt
  gpt.d_mlp, gpt.d_model, gpt.n_heads = 64, 32, 2
  params = jax.vmap(lambda k: models.init(k, gpt))(jax.random.split(jax.random.key(1), 2))
  windows = analysis.analysis_windows(cfg, 1 << 14)
  windows = windows[np.random.default_rng(0).permutation(len(windows))]
  fwd = analysis._forward(gpt)  # pylint: disable=protected-access
  batches = [np.asarray(fwd(params, jnp.asarray(windows[a:a + 16, 1:], jnp.int32))[1])
             for a in range(0, len(windows), 16)]
  acts = np.concatenate(batches, axis=1)
  key = jax.random.key(2)
  exact = kc.max_correlation(lambda: iter(batches), baseline="rotation", key=key, within=False)
  stats = {}
  screened = ks.max_correlation(lambda: iter(batches), screen=ks.Screen("on", tokens=2_048), baseline="rotation",
                                key=key, within=False, stats=stats)
  ref, gap = _reference(acts)
  _compare(exact, screened, gap, within=False, refs={"max_SxNxS": ref})
  assert stats["pairs"] > 0


def test_auto_runs_the_exact_pass_when_screening_does_not_pay_and_under_jit():
  acts = _mixture(6, 2, 3_000, 10)
  res = ks.max_correlation(acts, screen="auto")
  assert (np.asarray(res.settled_SxN) == ks.SETTLED_EXACT).all()
  exact = kc.max_correlation(acts)
  np.testing.assert_array_equal(np.asarray(res.max_SxNxS), np.asarray(exact.max_SxNxS))
  jitted = jax.jit(lambda x: ks.max_correlation(x, screen="on", backend="xla"))(jnp.asarray(acts))
  # One shot over all inputs under jit against batches of 1,024 eagerly: float32 rounding differs.
  np.testing.assert_allclose(np.asarray(jitted.max_SxNxS), np.asarray(exact.max_SxNxS), atol=1e-5)
  assert (np.asarray(jitted.settled_SxN) == ks.SETTLED_EXACT).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(screen="sometimes"), "screen mode"), (dict(screen=ks.Screen("on", tokens=4)), "tokens"),
    (dict(screen=ks.Screen("on", z=0.0)), "z"), (dict(screen=ks.Screen("on", k=5, max_candidates=2)), "k"),
    (dict(screen="on", baseline="rotation"), "PRNG key")])
def test_bad_settings_are_refused(kwargs, match):
  with pytest.raises(kc.CorrelationError, match=match):
    ks.max_correlation(_mixture(7, 2, 200, 4), **kwargs)


def test_universal_neurons_pass_with_the_screen_equals_the_exact_pass():
  """The language-model family's pass (``analysis.screen``): screened and exact tables agree neuron by neuron;
  the default 'auto' on the default study's size runs the exact pass."""
  from universality.engine.families.lm import analysis, family, models  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  small = ml_collections.ConfigDict(dict(n_layers=2, d_model=32, n_heads=2, d_mlp=24, context=16))
  params = jax.vmap(lambda k: models.init(k, small))(jax.random.split(jax.random.key(3), 2))
  windows = np.random.default_rng(1).integers(0, 256, (600, small.context + 1)).astype(np.uint8)
  base = dict(family.ANALYSIS_SETTINGS, batch_windows=50)
  exact = analysis.neuron_table(params, windows, small, jax.random.key(0), dict(base, screen="off"))
  auto = analysis.neuron_table(params, windows, small, jax.random.key(0), base)
  assert "screen_settled" not in auto
  np.testing.assert_array_equal(auto["max_corr"], exact["max_corr"])
  screened = analysis.neuron_table(params, windows, small, jax.random.key(0),
                                   dict(base, screen="on", screen_tokens=1_024))
  assert set(np.unique(screened["screen_settled"])) <= {ks.SETTLED_SCREEN, ks.SETTLED_FULL_ROW}
  # The screened stream reads the windows in another order: the same sums, rounded differently.
  for name in ("max_corr", "baseline_max_corr"):
    np.testing.assert_allclose(screened[name], exact[name], atol=2e-6, err_msg=name)
  same = np.abs(screened["max_corr"] - exact["max_corr"]) < 1e-6
  assert same.mean() > 0.9
  np.testing.assert_allclose(screened["pre_mean"], exact["pre_mean"], rtol=1e-4, atol=1e-5)
