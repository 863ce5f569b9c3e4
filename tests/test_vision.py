"""The vision family: conv nets against float64 loops, training on the seam, resume, data readers."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from universality.engine import checkpoint, config as config_lib, launch, replay, rundir, train
from universality.engine.analysis import convergent, cross_seed
from universality.engine.families.vision import data as data_lib
from universality.engine.families.vision import analysis, family, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vision_config(**fields):
  cfg = config_lib.default_config("vision")
  cfg.seeds = 2
  cfg.steps = 20
  cfg.eval_every = 5
  cfg.batch_size = 16
  cfg.num_checkpoints = 4
  cfg.task.max_train = 256
  cfg.task.max_test = 64
  cfg.model.conv.widths = "8,16"
  cfg.model.conv.dense = "16"
  cfg.exec.analyze = False
  cfg.update_from_flattened_dict(fields)
  return cfg


# ---------------------------------------------------------------------------------------------------
# The net against float64 loops.


def _conv_ref(x_BxHxWxC, w_3x3xCxN, b_N):
  """A 3×3 'same' convolution by direct loops over images, positions, taps and channels (float64)."""
  b, h, w, c = x_BxHxWxC.shape
  d = w_3x3xCxN.shape[-1]
  out = np.zeros((b, h, w, d))
  for n in range(b):
    for i in range(h):
      for j in range(w):
        for di in range(3):
          for dj in range(3):
            y, x = i + di - 1, j + dj - 1
            if 0 <= y < h and 0 <= x < w:
              for ci in range(c):
                out[n, i, j] += x_BxHxWxC[n, y, x, ci] * w_3x3xCxN[di, dj, ci]
        out[n, i, j] += b_N
  return out


def _net_ref(params, images, spec):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  acts = {}
  for i in range(len(spec.widths)):
    q = p[f"conv{i + 1}"]
    x = _conv_ref(x, q["w"], q["b"])
    if spec.norm != "none":
      g = spec.norm_groups if spec.norm == "group" else 1
      b, h, w, c = x.shape
      out = np.zeros_like(x)
      for n in range(b):
        for k in range(g):
          sl = x[n, :, :, k * c // g:(k + 1) * c // g]
          out[n, :, :, k * c // g:(k + 1) * c // g] = (sl - sl.mean()) / np.sqrt(sl.var() + 1e-5)
      x = out * q["g"] + q["beta"]
    x = np.maximum(x, 0)
    acts[f"conv{i + 1}"] = x
    if spec.pools_after(i):
      b, h, w, c = x.shape
      pooled = np.zeros((b, h // 2, w // 2, c))
      for r in range(h // 2):
        for s in range(w // 2):
          win = x[:, 2 * r:2 * r + 2, 2 * s:2 * s + 2]
          pooled[:, r, s] = win.max(axis=(1, 2)) if spec.pool == "max" else win.mean(axis=(1, 2))
      x = pooled
  x = x.reshape(len(x), -1)
  for i in range(len(spec.dense)):
    x = np.maximum(x @ p[f"fc{i + 1}"]["w"] + p[f"fc{i + 1}"]["b"], 0)
    acts[f"fc{i + 1}"] = x
  return x @ p["head"]["w"] + p["head"]["b"], acts


def test_conv_layer_matches_direct_loops():
  rng = np.random.default_rng(0)
  x, w, b = rng.standard_normal((2, 5, 6, 3)), rng.standard_normal((3, 3, 3, 4)), rng.standard_normal(4)
  got = models.conv3x3(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(got, _conv_ref(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm,pool,pool_every",
                         [("none", "max", 1), ("group", "avg", 1), ("layer", "max", 2)])
def test_whole_net_matches_float64_loops(norm, pool, pool_every):
  spec = models.ConvSpec(height=7, width=6, channels=2, classes=5, widths=(4, 6), dense=(5,),
                         pool_every=pool_every, pool=pool, norm=norm, norm_groups=2)
  models.check_spec(spec)
  params = models.init(jax.random.key(1), spec)
  # Random biases and gains, so every term of the reference is exercised.
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params)
  images = np.random.default_rng(2).standard_normal((3, 7, 6, 2))
  logits, acts = models.apply(params, jnp.asarray(images, jnp.float32), spec)
  ref_logits, ref_acts = _net_ref(params, images, spec)
  assert list(acts) == list(spec.layers) == ["conv1", "conv2", "fc1"]
  for name in spec.layers:
    np.testing.assert_allclose(acts[name], ref_acts[name], rtol=1e-4, atol=1e-4, err_msg=name)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_augmentation_crops_padded_images_and_flips():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 5, 5, 2)).astype(np.float32)
  out = np.asarray(models.augment(jax.random.key(3), jnp.asarray(x), 2, True))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flipped = 0
  for n in range(6):  # every output is one crop of the padded image, flipped or not
    hits = [(oy, ox, f) for oy in range(5) for ox in range(5) for f in (False, True)
            if np.array_equal(out[n], (lambda c: c[:, ::-1] if f else c)(padded[n, oy:oy + 5, ox:ox + 5]))]
    assert hits, n
    flipped += all(f for _, _, f in hits)
  assert 0 < flipped < 6
  np.testing.assert_array_equal(models.augment(jax.random.key(3), jnp.asarray(x), 0, False), x)


# ---------------------------------------------------------------------------------------------------
# Training on the seam.


def test_vmapped_seed_equals_solo_run_and_digits_are_learned():
  # SGD with momentum here (the optimiser seam); the resume test below trains with AdamW.
  cfg = vision_config(steps=60, eval_every=20, seeds=3, **{"opt.name": "sgd"})
  cfg.opt.lr = "2e-2"
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (train.AXIS,))  # no padding runs to train
  state, metrics = train.make_train(cfg, mesh=one_device).train()
  solo = vision_config(steps=60, eval_every=20, seeds=1, seed_offset=2, **{"opt.name": "sgd"})
  solo.opt.lr = cfg.opt.lr
  solo_state, _ = train.make_train(solo, mesh=one_device).train()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[2], np.asarray(b)[0], rtol=2e-5,
                                                       atol=2e-6), state.params, solo_state.params)
  assert not np.allclose(np.asarray(state.params["conv1"]["w"][0]), np.asarray(state.params["conv1"]["w"][1]))
  assert (metrics["test_acc"][-1] > 0.3).all(), metrics["test_acc"][-1]  # chance: 0.1
  assert (metrics["train_loss"][-1] < metrics["train_loss"][0]).all()


def test_relaunch_after_a_lost_checkpoint_resumes_bit_identically_with_augmentation(tmp_path):
  cfg = vision_config(steps=20, eval_every=10, num_checkpoints=3, **{"task.augment_pad": 1,
                                                                     "task.augment_flip": True})
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  launch.run_study(cfg, str(whole), progress=False)
  shutil.copytree(whole, resumed)
  ckdir = resumed / "checkpoints"
  steps = sorted(int(p) for p in os.listdir(ckdir) if p.isdigit())
  assert steps == [0, 10, 20]
  shutil.rmtree(ckdir / "20")  # as if the launch had died after the checkpoint of step 10
  assert launch.run_study(cfg, str(resumed), progress=False)["step"] == 20
  trainer = train.make_train(family.FAMILY.resolve(cfg))
  spec = train.host_state_spec(trainer)
  with checkpoint.Checkpointer(str(whole / "checkpoints"), read_only=True) as a, \
       checkpoint.Checkpointer(str(ckdir), read_only=True) as b:
    assert a.steps() == b.steps()
    (_, sa), (_, sb) = a.restore(spec), b.restore(spec)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), sa, sb)
  ma, mb = rundir.read_metrics(str(whole)), rundir.read_metrics(str(resumed))
  np.testing.assert_array_equal(ma["test_acc"], mb["test_acc"])
  written = json.loads((whole / "config.json").read_text())["config"]["task"]["fingerprint"]
  assert written == family.dataset_of(cfg).fingerprint


# ---------------------------------------------------------------------------------------------------
# Data readers (files written here, a few hundred records each).


def _images(n, h, w, c, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c)).astype(np.uint8)


def _write_mnist(root, n_train=300, n_test=100, gz=False, labels=None):
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(1)
  out = {"train": (_images(n_train, 28, 28, 1, 2)[..., 0], rng.integers(0, 10, n_train).astype(np.uint8)),
         "test": (_images(n_test, 28, 28, 1, 3)[..., 0], rng.integers(0, 10, n_test).astype(np.uint8))}
  if labels is not None:
    out["train"][1][7] = labels
  ext = ".gz" if gz else ""
  for split, (img, lab) in out.items():
    prefix = "train" if split == "train" else "t10k"
    data_lib.write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), img)
    data_lib.write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), lab)
  return str(root), out


def test_idx_reader_reads_mnist_files_plain_and_gzipped(tmp_path):
  for gz in (False, True):
    root, arrays = _write_mnist(tmp_path / f"m{gz}", gz=gz)
    d = data_lib.load(root)
    assert d.format == "idx" and d.classes == 10 and d.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(d.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(d.test_labels, arrays["test"][1])


def test_cifar_readers_read_both_versions(tmp_path):
  rng = np.random.default_rng(0)
  c10 = tmp_path / "cifar10" / "cifar-10-batches-bin"
  os.makedirs(c10)
  parts = []
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    img, lab = _images(40, 32, 32, 3, len(parts)), rng.integers(0, 10, 40)
    data_lib.write_cifar(str(c10 / name), img, lab)
    parts.append((img, lab))
  d = data_lib.load(str(tmp_path / "cifar10"))
  assert d.format == "cifar10" and d.classes == 10 and d.image_shape == (32, 32, 3)
  np.testing.assert_array_equal(d.train_images, np.concatenate([p[0] for p in parts[:5]]))
  np.testing.assert_array_equal(d.train_labels, np.concatenate([p[1] for p in parts[:5]]))
  np.testing.assert_array_equal(d.test_images, parts[5][0])
  # The red plane of the record is the first 1,024 pixel bytes.
  raw = np.frombuffer((c10 / "test_batch.bin").read_bytes(), np.uint8).reshape(40, 3073)
  np.testing.assert_array_equal(raw[:, 1:1025].reshape(40, 32, 32), d.test_images[..., 0])
  c100 = tmp_path / "cifar100"
  os.makedirs(c100)
  fine = rng.integers(0, 100, 50)
  data_lib.write_cifar(str(c100 / "train.bin"), _images(50, 32, 32, 3, 9), fine, coarse_T=fine // 5)
  data_lib.write_cifar(str(c100 / "test.bin"), _images(30, 32, 32, 3, 8), rng.integers(0, 100, 30),
                       coarse_T=np.zeros(30))
  d = data_lib.load(str(c100))
  assert d.format == "cifar100" and d.classes == 100
  np.testing.assert_array_equal(d.train_labels, fine)


def test_npz_is_split_by_a_seeded_permutation_and_fingerprinted(tmp_path):
  images, labels = _images(200, 6, 5, 1, 0)[..., 0], np.arange(200) % 7
  path = str(tmp_path / "d.npz")
  np.savez(path, images=images, labels=labels)
  a = data_lib.load(path, test_frac=0.25, split_seed=3)
  assert a.classes == 7 and len(a.test_images) == 50 and len(a.train_images) == 150
  # Every image lands in exactly one split, with its label.
  both = np.concatenate([a.train_images[..., 0], a.test_images[..., 0]]).reshape(200, -1)
  order = np.lexsort(both.T[::-1])
  flat = images.reshape(200, -1)
  np.testing.assert_array_equal(both[order], flat[np.lexsort(flat.T[::-1])])
  assert a.fingerprint != data_lib.load(path, test_frac=0.25, split_seed=4).fingerprint
  images[0, 0, 0] ^= 1
  other = str(tmp_path / "e.npz")
  np.savez(other, images=images, labels=labels)
  assert data_lib.load(other, test_frac=0.25, split_seed=3).fingerprint != a.fingerprint


def _truncated_idx(p):
  root, _ = _write_mnist(p / "m")
  f = os.path.join(root, "train-images-idx3-ubyte")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) - 100)
  return root


def _wrong_magic(p):
  root, _ = _write_mnist(p / "m")
  f = os.path.join(root, "t10k-labels-idx1-ubyte")
  raw = bytearray(open(f, "rb").read())
  raw[0] = 7
  open(f, "wb").write(bytes(raw))
  return root


def _pickled_npz(p):
  path = str(p / "x.npz")
  np.savez(path, images=np.zeros((4, 3, 3), np.uint8), labels=np.array([0, 1, "a", None], dtype=object))
  return path


def _truncated_cifar(p):
  root = p / "c"
  os.makedirs(root)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    data_lib.write_cifar(str(root / name), _images(3, 32, 32, 3, 0), [1, 2, 3])
  with open(root / "data_batch_3.bin", "r+b") as fh:
    fh.truncate(3073 * 2 + 1000)
  return str(root)


BAD_DATA = [(_truncated_idx, "truncated"), (_wrong_magic, "not an IDX file"),
            (lambda p: _write_mnist(p / "m", labels=12)[0], r"label 12 out of range \[0, 10\)"),
            (_pickled_npz, "pickled"), (_truncated_cifar, "not a whole number of 3073-byte CIFAR records")]


@pytest.mark.parametrize("make,needle", BAD_DATA)
def test_bad_data_is_one_line_and_a_launch_writes_nothing(tmp_path, make, needle):
  source = make(tmp_path)
  with pytest.raises(data_lib.DataError, match=needle) as e:
    data_lib.load(source)
  assert "\n" not in str(e.value)
  work = tmp_path / "w"
  with pytest.raises(ValueError, match=needle):
    launch.run_study(vision_config(**{"task.data": source}), str(work), progress=False)
  assert not work.exists() or not os.listdir(work)


def test_cli_refuses_bad_data_with_exit_status_2_and_writes_nothing(tmp_path):
  work = tmp_path / "w"
  res = subprocess.run([sys.executable, "-m", "universality.experiments.vision_universality",
                        f"--workdir={work}", "--noprogress", f"--config.task.data={_pickled_npz(tmp_path)}"],
                       cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 2
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "pickled" in lines[0], res.stderr
  assert not work.exists() or not os.listdir(work)


# ---------------------------------------------------------------------------------------------------
# The analysis.

SPEC = models.ConvSpec(height=8, width=8, channels=1, classes=10, widths=(6, 8), dense=(7,))


def _params(seed):
  p = models.init(jax.random.key(seed), SPEC)
  return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(seed + 50), a.shape), p)


def _stack(*trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@pytest.mark.parametrize("mode", ["positions", "mean"])
def test_layer_samples_are_images_by_positions_or_spatial_means(mode):
  params = _stack(_params(0), _params(1))
  images = np.random.default_rng(0).integers(0, 17, (10, 8, 8, 1)).astype(np.uint8)
  mean, std = np.float32([5.0]), np.float32([4.0])
  got = analysis.layer_samples(params, images, SPEC, mean, std, mode=mode, max_samples=10**6, batch=3,
                               key=jax.random.key(0))
  x = (images.astype(np.float64) - 5.0) / 4.0
  for s in range(2):
    _, ref = _net_ref(jax.tree.map(lambda a: a[s], params), x, SPEC)
    conv1 = ref["conv1"].reshape(-1, 6) if mode == "positions" else ref["conv1"].mean(axis=(1, 2))
    np.testing.assert_allclose(got["conv1"][s], conv1, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["fc1"][s], ref["fc1"], rtol=1e-4, atol=1e-4)
  assert got["conv2"].shape == ((2, 10 * 16, 8) if mode == "positions" else (2, 10, 8))
  sub = analysis.layer_samples(params, images, SPEC, mean, std, mode=mode, max_samples=7, batch=4,
                               key=jax.random.key(1))
  assert sub["conv1"].shape == (2, 7, 6)
  rows = {tuple(np.round(r, 4)) for r in got["conv1"][0]}
  assert all(tuple(np.round(r, 4)) in rows for r in sub["conv1"][0])  # a subset of the samples


def test_layer_pass_finds_identical_seeds_identical_and_agrees_with_the_generic_passes():
  rng = np.random.default_rng(0)
  base = rng.standard_normal((600, 12))
  acts = np.stack([base, base[:, rng.permutation(12)], rng.standard_normal((600, 12))]).astype(np.float32)
  settings = dict(family.ANALYSIS_SETTINGS, convergent_pairs=2, convergent_inputs=512, fista_iterations=100)
  rec, arrays, runs = analysis.analyse_layer(acts, jax.random.key(0), settings, "conv1")
  assert rec["units"] == 12 and rec["samples"] == 600 and rec["dead_fraction"] == 0
  # Run 1 is run 0 with its units permuted: every unit finds its copy (correlation 1) in both matchings.
  o2o = [convergent.OneToOne.from_json(r) for r in rec["convergent"]["one_to_one"]]
  assert o2o[0].run_b == 1 and abs(o2o[0].greedy_mean - 1) < 1e-5 and abs(o2o[0].max_mean - 1) < 1e-5
  assert o2o[0].same_partner_share == 1.0 and o2o[1].greedy_mean < 0.3
  np.testing.assert_allclose(arrays["max_corr"][0, :, 1], 1.0, atol=1e-5)
  assert arrays["universal"][0].all() is not None and runs[2]["mean_max_corr"] < 0.3
  ref = cross_seed.neuron_correlations(jnp.asarray(acts), key=jax.random.split(jax.random.key(0), 3)[0])
  np.testing.assert_allclose(arrays["excess"], np.asarray(ref["excess_SxN"]), atol=1e-5)
  corr = np.corrcoef(acts[0].T.astype(np.float64), acts[2].T.astype(np.float64))[:12, 12:]
  np.testing.assert_allclose(arrays["max_corr"][0, :, 2], corr.max(axis=1), atol=1e-4)


def test_launch_analysis_report_and_notebook_view(tmp_path):
  cfg = vision_config(steps=20, eval_every=10, num_checkpoints=3, seeds=3)
  cfg.exec.analyze = True
  cfg.analysis.images = 32
  cfg.analysis.fista_iterations = 50
  work = tmp_path / "w"
  out = launch.run_study(cfg, str(work), progress=False)
  text = open(out["report"]).read()
  assert "### One-to-one matching, beside Li et al. (2016)" in text and "| conv3 | – |" in text
  assert "0.703" in text and "#### Convergent learning (conv2): sparse prediction" in text
  assert "### Mode connectivity" in text and "### Feature complexity" in text
  with replay.open(str(work)) as run:
    assert type(run).__module__ == "universality.engine.families.vision.view"
    layers = run.layers()
    assert [r["layer"] for r in layers] == ["conv1", "conv2", "fc1"]
    assert layers[0]["samples"] == 32 * 64 and layers[1]["samples"] == 32 * 16
    units = run.units("conv2")
    assert units["excess"].shape == (3, 16) and units["max_corr"].shape == (3, 16, 3)
    assert len(run.convergent("conv1")["one_to_one"]) == 2
    conn = run.connectivity()
    assert conn["pairs"] == [[0, 1], [0, 2]] and len(conn["weight"]["barrier"]) == 2
    widths = run.feature_widths()
    assert set(widths) == {"conv1", "conv2", "fc1"}
    assert (widths["conv2"] <= 16).all() and (widths["conv2"] >= 1).all()
    images, labels = run.test_images(5)
    logits, acts = run.apply(images, step=run.steps[1])
    assert logits.shape == (3, 5, 10) and acts["conv1"].shape == (3, 5, 8, 8, 8)
    assert acts["fc1"].shape == (3, 5, 16)
    # The replayed forward pass is the trainer's: same logits as Trainer.apply on the last checkpoint.
    trainer = run.trainer()
    t_logits, _ = trainer.apply(run.params(), np.broadcast_to(images, (3,) + images.shape))
    np.testing.assert_allclose(run.apply(images)[0], np.asarray(t_logits), rtol=1e-5, atol=1e-5)
    summary = run.summary()
    assert summary["family"] == "vision" and "layers" in summary["runs"][0]
    # Re-analysing the last checkpoint reproduces the summary.
    again = run.analyze(images=32, fista_iterations=50)[run.cohorts[0]]["aggregate"]["layers"]
    assert again[0]["greedy_mean"] == pytest.approx(layers[0]["greedy_mean"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# Symmetries: weight matching for mode connectivity, feature merging on conv channels.

from universality.engine.families.vision import symmetry  # noqa: E402

SYM = models.ConvSpec(height=8, width=8, channels=1, classes=10, widths=(6, 8), dense=(7,), norm="layer")


def _confident_net(spec, seed):
  """A random net with a scaled-up head, so its own argmax labels are predicted with low loss."""
  p = models.init(jax.random.key(seed), spec)
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(seed + 7), a.shape), p)
  return dict(p, head={"w": 8.0 * p["head"]["w"], "b": p["head"]["b"]})


def test_permuted_copy_has_zero_barrier_after_weight_matching_and_a_positive_one_before():
  rng = np.random.default_rng(0)
  params = _confident_net(SYM, 1)
  images = rng.standard_normal((128, 8, 8, 1)).astype(np.float32)
  logits, _ = models.apply(params, jnp.asarray(images), SYM)
  labels = np.asarray(jnp.argmax(logits, axis=-1))
  perms = {layer: rng.permutation(n) for layer, n in zip(SYM.layers, (6, 8, 7))}
  copy = symmetry.permute(params, perms, SYM)
  np.testing.assert_allclose(models.apply(copy, jnp.asarray(images), SYM)[0], logits, rtol=1e-4, atol=1e-4)
  assert not np.allclose(copy["conv2"]["w"], params["conv2"]["w"])
  before = symmetry.path_losses(params, copy, SYM, images, labels, points=9)
  found = symmetry.weight_matching(params, copy, SYM)
  for layer in SYM.layers:  # the copy's unit perm^-1[n] is the original's unit n
    np.testing.assert_array_equal(found[layer], np.argsort(perms[layer]))
  after = symmetry.path_losses(params, symmetry.permute(copy, found, SYM), SYM, images, labels, points=9)
  assert abs(after["barrier"]) < 1e-4 and before["barrier"] > 0.1, (before["barrier"], after["barrier"])
  # GroupNorm: only permutations within groups keep the function; the matching stays within them.
  grouped = models.ConvSpec(**dict(SYM.__dict__, norm="group", norm_groups=2))
  with pytest.raises(ValueError, match="across GroupNorm groups"):
    symmetry.permute(params, {"conv1": np.array([3, 1, 2, 0, 4, 5])}, grouped)
  within = {"conv1": np.array([2, 0, 1, 4, 5, 3]), "conv2": np.array([1, 3, 0, 2, 7, 4, 6, 5]),
            "fc1": perms["fc1"]}
  copy = symmetry.permute(params, within, grouped)
  np.testing.assert_allclose(models.apply(copy, jnp.asarray(images), grouped)[0],
                             models.apply(params, jnp.asarray(images), grouped)[0], rtol=1e-4, atol=1e-4)
  found = symmetry.weight_matching(params, copy, grouped)
  for layer in SYM.layers:
    np.testing.assert_array_equal(found[layer], np.argsort(within[layer]))


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_feature_merging_removes_exactly_the_duplicated_channels(layer):
  spec = models.ConvSpec(height=8, width=8, channels=1, classes=10, widths=(6, 6), dense=(5,))
  p = jax.tree.map(np.array, _confident_net(spec, 3))
  scales = np.array([2.0, 0.5, 1.5])
  p[layer]["w"][..., 3:] = p[layer]["w"][..., :3] * scales  # channels 3-5: positive multiples of 0-2
  p[layer]["b"][3:] = p[layer]["b"][:3] * scales
  images = np.random.default_rng(1).standard_normal((64, 8, 8, 1)).astype(np.float32)
  logits, _ = models.apply(p, jnp.asarray(images), spec)
  labels = np.asarray(jnp.argmax(logits, axis=-1))
  res = symmetry.merge_channels(p, spec, layer, images, labels, tolerance=1e-3, max_distance=1e-5)
  assert res["width"] == 3 and res["merges"] == 3
  assert res["merged_loss"] == pytest.approx(res["loss"], abs=1e-5)
  assert all(res["alive"][k] != res["alive"][k + 3] for k in range(3))  # one of each pair is left
  merged_logits, _ = models.apply(res["params"], jnp.asarray(images), spec)
  np.testing.assert_allclose(merged_logits, logits, rtol=1e-4, atol=1e-4)  # the same function


@pytest.mark.parametrize("field,value,needle", [
    ("analysis.conv_samples", "pixels", "conv_samples: must be one of"),
    ("analysis.lambdas", "0.1,-1", "lambdas: expected positive numbers"),
    ("model.conv.widths", "16,x", "cannot read '16,x'"),
    ("model.conv.norm", "batch", "norm: must be one of")])
def test_bad_config_fields_are_refused_before_anything_is_built(field, value, needle):
  with pytest.raises(ValueError, match=needle) as e:
    config_lib.validate(vision_config(**{field: value}))
  assert "\n" not in str(e.value) and str(e.value).startswith(f"config.{field}")
