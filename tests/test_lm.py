"""The byte-level language-model family: corpus, model, training on the seam, the universal-neurons pass."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from universality.engine import checkpoint, config as config_lib, launch, replay, rundir, train
from universality.engine.analysis import cross_seed, neuron_stats
from universality.engine.families.lm import analysis, corpus, family, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_corpus(root, n_files=12, seed=0):
  """A directory of small Python-like text files (each different, so models have something to learn)."""
  rng = np.random.default_rng(seed)
  words = ["def", "return", "self", "import", "for", "in", "if", "else", "x", "y", "value", "print"]
  os.makedirs(root, exist_ok=True)
  for i in range(n_files):
    lines = [" ".join(rng.choice(words, size=rng.integers(2, 7))) for _ in range(rng.integers(40, 80))]
    with open(os.path.join(root, f"mod_{i:02d}.py"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return str(root)


def lm_config(corpus_dir, **fields):
  cfg = config_lib.default_config("lm")
  cfg.task.corpus = corpus_dir
  cfg.task.heldout_frac = 0.25
  cfg.task.eval_windows = 4
  cfg.seeds = 2
  cfg.steps = 20
  cfg.eval_every = 5
  cfg.batch_size = 4
  cfg.num_checkpoints = 4
  cfg.model.gpt.update(dict(n_layers=2, d_model=16, n_heads=2, d_mlp=32, context=16))
  cfg.opt.warmup_steps = 3
  cfg.exec.analyze = False
  cfg.analysis.tokens = 1024
  cfg.update_from_flattened_dict(fields)
  return cfg


# ---------------------------------------------------------------------------------------------------
# Corpus.


def test_corpus_is_deterministic_split_by_file_and_fingerprinted(tmp_path):
  root = _write_corpus(tmp_path / "c")
  a, b = corpus.load(root, 0.25), corpus.load(root, 0.25)
  assert a.files == tuple(sorted(a.files)) and a.fingerprint == b.fingerprint
  np.testing.assert_array_equal(a.train, b.train)
  assert 0 < len(a.test) and a.n_bytes == len(a.train) + len(a.test)
  # Held-out files are whole files, concatenated in corpus order.
  held = b"".join(open(os.path.join(root, f), "rb").read() for f, h in zip(a.files, a.heldout) if h)
  assert bytes(a.test) == held
  # Adding a file moves no other file across the split; changing a file's size changes the fingerprint.
  with open(os.path.join(root, "zz_new.py"), "w") as f:
    f.write("x = 1\n")
  c = corpus.load(root, 0.25)
  assert dict(zip(c.files, c.heldout))["mod_03.py"] == dict(zip(a.files, a.heldout))["mod_03.py"]
  assert c.fingerprint != a.fingerprint
  # One file: the last share of its bytes is held out.
  one = corpus.load(os.path.join(root, "mod_00.py"), 0.25)
  assert len(one.files) == 1 and abs(len(one.test) - 0.25 * one.n_bytes) <= 1


def test_stdlib_corpus_ships_with_python():
  a = corpus.load(corpus.STDLIB, 0.05, max_bytes=300_000)
  assert a.n_bytes == 300_000 and all(f.endswith(".py") for f in a.files)
  assert a.fingerprint == corpus.load(corpus.STDLIB, 0.05, max_bytes=300_000).fingerprint
  assert not any("site-packages" in f for f in corpus.list_files(corpus.STDLIB)[1])
  entropy, cross = corpus.unigram_bits(a.train, a.test)
  assert 3.0 < entropy < 6.0 and cross > entropy - 0.5


def test_corpus_is_held_once_and_the_size_estimate_counts_what_is_held(tmp_path):
  # A one-file corpus is a read-only map of the file that the task's training text is a view of (no copy on
  # the host); a directory is read once into its two arrays. The estimate counts exactly that on the host,
  # and one copy per device.
  rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
  one = tmp_path / "one.txt"
  one.write_bytes(rng.integers(32, 127, 50_000, dtype=np.uint8).tobytes())
  directory = _write_corpus(tmp_path / "dir")
  for name, mapped in ((str(one), True), (directory, False)):
    cfg = lm_config(name)
    c = family.corpus_of(cfg)
    assert corpus.is_mapped(name) == mapped
    assert corpus.held_in_memory(c) == (0 if mapped else c.n_bytes)
    if mapped:
      assert not c.train.flags.writeable and bytes(c.train) + bytes(c.test) == one.read_bytes()
    task = family.FAMILY.make_task(cfg, family.FAMILY.runs(cfg))
    assert np.shares_memory(task.shared["train"], c.train)
    windows = task.shared["eval_train"].nbytes + task.shared["eval_test"].nbytes
    fp = family.FAMILY.footprint(cfg)
    assert fp.host_shared == corpus.held_in_memory(c) + windows and fp.shared == c.n_bytes + windows
    # The unigram entropies, counted block by block, against the whole-array formula.
    counts = np.bincount(c.train, minlength=256) + 1.0
    p = counts / counts.sum()
    np.testing.assert_allclose(corpus.unigram_bits(c.train, c.test),
                               (-(p * np.log2(p)).sum(), -np.log2(p)[c.test].mean()), rtol=1e-12)


def _text(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("make,needle", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "has no files"),
    (lambda p: _text(p / "e.txt", ""), "is empty"),
    (lambda p: _text(p / "tiny.txt", "abc"), "need at least"),
])
def test_bad_corpus_is_a_one_line_error(tmp_path, make, needle):
  with pytest.raises(corpus.CorpusError, match=needle) as e:
    corpus.load(make(tmp_path), 0.25, min_bytes=17)
  assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_corpus_and_writes_nothing(tmp_path):
  work = tmp_path / "w"
  res = subprocess.run([sys.executable, "-m", "universality.experiments.lm_universality", f"--workdir={work}",
                        "--noprogress", f"--config.task.corpus={tmp_path / 'nope'}"],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 2
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert lines == [f"error: config.task.corpus: {str(tmp_path / 'nope')!r} does not exist"], res.stderr
  assert not (work / "config.json").exists()


# ---------------------------------------------------------------------------------------------------
# Model.


def test_causal_model_ignores_the_future_and_matches_a_float64_reference():
  cfg = ml_collections.ConfigDict(dict(n_layers=2, d_model=16, n_heads=4, d_mlp=24, context=12))
  params = models.init(jax.random.key(3), cfg)
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), params)
  tokens = np.random.default_rng(1).integers(0, 256, (3, 12))
  logits, acts = models.apply(params, jnp.asarray(tokens), cfg)
  assert logits.shape == (3, 12, 256) and acts["mlp_post"].shape == (3, 12, 2, 24)
  changed = tokens.copy()
  changed[:, 7:] = (changed[:, 7:] + 1) % 256
  logits2, _ = models.apply(params, jnp.asarray(changed), cfg)
  np.testing.assert_allclose(logits2[:, :7], logits[:, :7], atol=1e-5)
  assert np.abs(np.asarray(logits2[:, 7:] - logits[:, 7:])).max() > 1e-3
  np.testing.assert_allclose(acts["mlp_post"], _reference_post(params, tokens, cfg), rtol=1e-4, atol=1e-5)


def _reference_post(params, tokens, cfg):
  """float64 numpy forward pass, head by head and position by position (an independent implementation)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  d, h = cfg.d_model, cfg.n_heads
  e = d // h

  def ln(x, g, b):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b

  out = np.zeros(tokens.shape + (cfg.n_layers, cfg.d_mlp))
  for bi, seq in enumerate(tokens):
    x = p["embed"][seq] + p["pos"][:len(seq)]
    for l in range(cfg.n_layers):
      w = {k: v[l] for k, v in p["blocks"].items()}
      qkv = ln(x, w["ln1_g"], w["ln1_b"]) @ w["w_qkv"] + w["b_qkv"]
      att = np.zeros_like(x)
      for hh in range(h):
        q, k, v = (qkv[:, i * d + hh * e:i * d + (hh + 1) * e] for i in range(3))
        for t in range(len(seq)):
          s = q[t] @ k[:t + 1].T / np.sqrt(e)
          a = np.exp(s - s.max())
          att[t, hh * e:(hh + 1) * e] = (a / a.sum()) @ v[:t + 1]
      x = x + att @ w["w_o"] + w["b_o"]
      pre = ln(x, w["ln2_g"], w["ln2_b"]) @ w["w_in"] + w["b_in"]
      post = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
      out[bi, :, l] = post
      x = x + post @ w["w_out"] + w["b_out"]
  return out


# ---------------------------------------------------------------------------------------------------
# Training on the seam.


def test_vmapped_seed_equals_solo_run_and_learning_beats_unigram(tmp_path):
  cfg = lm_config(_write_corpus(tmp_path / "c"), steps=60, eval_every=20, batch_size=8)
  cfg.opt.lr = "1e-2"
  state, metrics = train.make_train(cfg).train()
  solo = lm_config(cfg.task.corpus, seeds=1, seed_offset=1, steps=60, eval_every=20, batch_size=8)
  solo.opt.lr = "1e-2"
  solo_state, _ = train.make_train(solo).train()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], rtol=2e-5, atol=2e-6),
               state.params, solo_state.params)
  # The two seeds differ in initialisation only, and both learn the byte statistics of the corpus.
  assert not np.allclose(np.asarray(state.params["embed"][0]), np.asarray(state.params["embed"][1]))
  test = metrics["test_bpb"][-1]
  assert (test < metrics["unigram_bpb"][-1]).all(), (test, metrics["unigram_bpb"][-1])
  assert family.FAMILY.generalised_mask({k: v[-1] for k, v in metrics.items()}).all()


def test_relaunch_after_a_lost_checkpoint_resumes_bit_identically(tmp_path):
  cfg = lm_config(_write_corpus(tmp_path / "c"), steps=30, eval_every=5, num_checkpoints=6)
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  launch.run_study(cfg, str(whole), progress=False)
  shutil.copytree(whole, resumed)
  ckdir = resumed / "checkpoints"
  steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())
  for s in steps[-2:]:  # as if the launch had died after the third-newest checkpoint
    shutil.rmtree(ckdir / str(s))
  out = launch.run_study(cfg, str(resumed), progress=False)
  assert out["step"] == 30
  trainer = train.make_train(family.FAMILY.resolve(cfg))
  spec = train.host_state_spec(trainer)
  with checkpoint.Checkpointer(str(whole / "checkpoints"), read_only=True) as a, \
       checkpoint.Checkpointer(str(ckdir), read_only=True) as b:
    assert a.steps() == b.steps()
    (_, sa), (_, sb) = a.restore(spec), b.restore(spec)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), sa, sb)
  ma, mb = rundir.read_metrics(str(whole)), rundir.read_metrics(str(resumed))
  np.testing.assert_array_equal(ma["step"], mb["step"])
  np.testing.assert_array_equal(ma["test_bpb"], mb["test_bpb"])
  written = json.loads((whole / "config.json").read_text())["config"]["task"]["fingerprint"]
  assert written == family.corpus_of(cfg).fingerprint


# ---------------------------------------------------------------------------------------------------
# The universal-neurons pass.


def _model(seed, cfg):
  params = models.init(jax.random.key(seed), cfg)
  # Untrained GPT-2 initialisation gives near-zero biases; spread them so neurons differ more.
  return jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(seed + 100), x.shape), params)


def _detector_model(seed, cfg):
  """A model whose every MLP neuron detects one byte (a distinct byte per neuron, no attention, no MLP
  output): sparse, nearly uncorrelated neurons, as trained models have and untrained ones do not."""
  params = jax.tree.map(jnp.zeros_like, models.init(jax.random.key(seed), cfg))
  rng = np.random.default_rng(seed)
  d, l, n = cfg.d_model, cfg.n_layers, cfg.d_mlp
  embed = rng.standard_normal((256, d))
  normed = (embed - embed.mean(1, keepdims=True)) / embed.std(1, keepdims=True)  # what the LayerNorm sees
  detects = rng.permutation(256)[:l * n].reshape(l, n)
  blocks = dict(params["blocks"], ln1_g=jnp.ones((l, d)), ln2_g=jnp.ones((l, d)),
                w_in=jnp.asarray(4.0 / d * np.moveaxis(normed[detects], 2, 1), jnp.float32),
                b_in=jnp.full((l, n), -2.0))
  return dict(params, embed=jnp.asarray(embed, jnp.float32), blocks=blocks, lnf_g=jnp.ones((d,)),
              unembed=jnp.asarray(rng.standard_normal((d, 256)), jnp.float32))


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


SMALL = ml_collections.ConfigDict(dict(n_layers=2, d_model=64, n_heads=2, d_mlp=32, context=16))


def _windows(n, seed=0, low=32, high=127):
  return np.random.default_rng(seed).integers(low, high, (n, SMALL.context + 1)).astype(np.uint8)


def test_identical_seeds_make_every_live_neuron_universal_and_independent_ones_almost_none():
  settings = dict(family.ANALYSIS_SETTINGS, batch_windows=64)
  windows = _windows(192, low=0, high=256)
  same = analysis.neuron_table(_stack(_detector_model(0, SMALL), _detector_model(0, SMALL)), windows, SMALL,
                               jax.random.key(0), settings)
  live = ~same["dead"]
  assert live.mean() > 0.9 and same["universal"][live].all(), np.nanmin(same["excess"])
  flat_live = live[0].reshape(-1)
  np.testing.assert_allclose(same["max_corr"][0, :, 1][flat_live], 1.0, atol=1e-4)
  np.testing.assert_array_equal(same["argmax"][0, :, 1][flat_live], np.flatnonzero(flat_live))
  other = analysis.neuron_table(_stack(*(_model(k, SMALL) for k in range(3))), windows, SMALL,
                                jax.random.key(0), settings)
  assert other["universal"][~other["dead"]].mean() < 0.02


def test_streamed_pass_equals_float64_statistics_of_the_activations_in_memory():
  settings = dict(family.ANALYSIS_SETTINGS, batch_windows=7)   # uneven batches: 40 = 5·7 + 5
  n = SMALL.d_mlp
  params = _stack(_model(1, SMALL), _model(2, SMALL))
  windows = _windows(40, seed=3)
  table = analysis.neuron_table(params, windows, SMALL, jax.random.key(1), settings)
  _, acts = jax.vmap(lambda p: models.apply(p, jnp.asarray(windows[:, 1:], jnp.int32), SMALL))(params)
  pre = np.asarray(acts["mlp_pre"], np.float64).reshape(2, -1, 2 * n)     # [S, T, L·N]
  post = np.asarray(acts["mlp_post"], np.float64).reshape(2, -1, 2 * n)
  shape = lambda x: np.asarray(x).reshape(2, 2, n)
  mean, var = pre.mean(1), pre.var(1)
  z = (pre - mean[:, None]) / np.sqrt(var)[:, None]
  np.testing.assert_allclose(table["pre_mean"], shape(mean), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(table["pre_var"], shape(var), rtol=1e-3)
  np.testing.assert_allclose(table["pre_skew"], shape((z ** 3).mean(1)), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(table["pre_kurtosis"], shape((z ** 4).mean(1)), rtol=1e-3)
  np.testing.assert_allclose(table["act_freq"], shape((pre >= 0).mean(1)), atol=1e-6)

  def explained(cat_T):
    total = ((post - post.mean(1, keepdims=True)) ** 2).sum(1)
    between = sum((cat_T == c).sum() * (post[:, cat_T == c].mean(1) - post.mean(1)) ** 2
                  for c in np.unique(cat_T))
    return shape(between / total)

  cur, prev = windows[:, 1:].reshape(-1), windows[:, :-1].reshape(-1)
  _, class_of_byte = neuron_stats.byte_classes()
  position = np.tile(np.arange(SMALL.context), len(windows))
  for name, cat in (("var_byte", cur), ("var_prev_byte", prev), ("var_byte_class", class_of_byte[cur]),
                    ("var_position", position)):
    np.testing.assert_allclose(table[name], explained(cat), atol=2e-4, err_msg=name)
  # Cross-seed numbers equal those of the activations held in memory.
  mem = cross_seed.neuron_correlations(jnp.asarray(post, jnp.float32), key=jax.random.key(1))
  np.testing.assert_allclose(table["excess"], shape(np.nan_to_num(np.asarray(mem["excess_SxN"]))),
                             atol=1e-4)
  w_in = np.asarray(params["blocks"]["w_in"], np.float64)
  np.testing.assert_allclose(table["w_in_norm"], np.linalg.norm(w_in, axis=2), rtol=1e-5)


def test_launch_analysis_report_and_notebook_view(tmp_path):
  cfg = lm_config(_write_corpus(tmp_path / "c"), steps=20, eval_every=10, num_checkpoints=3)
  cfg.exec.analyze = True
  cfg.analysis.tokens = 512
  work = tmp_path / "w"
  out = launch.run_study(cfg, str(work), progress=False)
  text = open(out["report"]).read()
  assert "### Universal neurons" in text and "GPT2-small 4.16%" in text
  with replay.open(str(work)) as run:
    assert type(run).__module__ == "universality.engine.families.lm.view"
    table = run.neurons()
    assert table["excess"].shape == (2, 2, 32) and table["layer"][0, 1, 5] == 1
    text = "def f(x):\n    return x\n"
    acts = run.activations(text, step=run.steps[1])
    assert acts["mlp_post"].shape == (2, len(text), 2, 32)
    summary = run.summary()
    assert summary["family"] == "lm" and summary["settings"]["tokens"] == 512
    assert len(summary["runs"]) == 2 and "universal_by_layer" in summary["runs"][0]
