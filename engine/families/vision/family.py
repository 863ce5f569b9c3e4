"""Image classification with conv nets on the engine's seam (``universality.engine.families.Family``), as in
*Convergent Learning* (Li et al. 2016), at the scale of handwritten digits on a CPU and of CIFAR-10 on an
accelerator.

Config sections::

  task.data              "digits" (scikit-learn's 8×8 digits), a directory of MNIST IDX or CIFAR binary
                         files, or an .npz (universality.engine.families.vision.data)
  task.format            "auto" or the format to expect (digits, idx, cifar10, cifar100, npz)
  task.classes           0: the format's number of classes; else labels must lie below it
  task.test_frac         share held out of a source without its own test split (seeded by task.split_seed)
  task.split_seed        the permutation of that split and of the subsets below
  task.max_train, task.max_test   keep a random subset of each split (0: all)
  task.fingerprint       the data's fingerprint; "" is filled in at launch, then other data is refused
  task.augment_pad       random crops from images zero-padded by this many pixels (0: none)
  task.augment_flip      random horizontal flips
  task.vary_data_order   False: every seed sees the same minibatches; True: each its own
  task.eval_examples     training and test images evaluated at every evaluation (0: all of each split)
  task.eval_batch        images per chunk of an evaluation (bounds its memory)
  model.name             "conv"
  model.conv.widths, .dense, .pool_every, .pool, .norm, .norm_groups
                         (universality.engine.families.vision.models)

The sweep is ``lr × weight_decay × seeds`` (seeds innermost). Each step draws ``batch_size`` training images
uniformly (with replacement) from ``fold_in(data_key, step)`` and augments them inside the compiled step from
the same key, so a resumed run draws the same minibatch and the same crops and flips. Images are
standardised per channel with the training images' mean and std. Logged metrics: ``train_loss``,
``train_acc``, ``test_loss`` and ``test_acc``; a run has generalised when its test accuracy reaches
``generalised_threshold`` (0.9).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from universality.engine import families
from universality.engine import fields
from universality.engine.families.vision import data as data_lib
from universality.engine.families.vision import models

MODELS = ("conv",)
# The analysis settings and their defaults (config section ``analysis``;
# universality.engine.families.vision.analysis).
ANALYSIS_SETTINGS = {
    "images": 512,                # test images every run reads (the first ones of the test split)
    "batch_images": 256,          # images per forward pass
    "conv_samples": "positions",  # a conv channel's samples: "positions" (images × positions) or "mean"
    "max_samples": 16384,         # samples per layer at most (a seeded subset) for the correlations
    "universal_threshold": 0.5,   # excess correlation above which a unit is universal (Gurnee et al.)
    "convergent_pairs": 3,        # Convergent Learning passes on run 0 against runs 1 .. this
    "convergent_inputs": 2048,    # samples those passes read at most
    "lambdas": "0.003,0.01,0.03,0.1,0.3",   # the sparse prediction's L1 penalties
    "fista_iterations": 300,
    "clusters": 8,                # spectral clusters per pair of runs
    "memory_gb": 1.0,             # budget of the correlation kernel's co-moment tiles
    "connectivity": True,         # loss barriers between run 0 and runs 1 .. convergent_pairs (raw, matched)
    "path_points": 13,            # values of λ along each path, ends included
    "merging": True,              # iterative feature merging of every conv and dense layer of every run
    "merge_tolerance": 0.01,      # the loss rise a merge may cause (on the analysis' training images)
}


SAMPLES = ("positions", "mean")


def check_analysis(settings) -> None:
  """A one-line ValueError naming the first bad analysis setting (checked before a launch trains)."""
  if settings["conv_samples"] not in SAMPLES:
    raise ValueError(f"config.analysis.conv_samples: must be one of {SAMPLES}, got "
                     f"{settings['conv_samples']!r}")
  for name, least in (("images", 1), ("batch_images", 1), ("max_samples", 4), ("convergent_inputs", 4),
                      ("clusters", 1), ("fista_iterations", 1), ("path_points", 2), ("convergent_pairs", 0)):
    fields.int_field(settings, name, least, "analysis.")
  lambdas(settings)


def lambdas(settings) -> tuple[float, ...]:
  """The sparse prediction's L1 penalties, from ``analysis.lambdas``."""
  text = settings["lambdas"]
  try:
    out = tuple(float(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    raise ValueError(f"config.analysis.lambdas: cannot read {text!r} as comma-separated numbers") from None
  if not out or not all(np.isfinite(v) and v > 0 for v in out):
    raise ValueError(f"config.analysis.lambdas: expected positive numbers, got {text!r}")
  return out


def cohort_name(row: Mapping[str, Any]) -> str:
  return f"vision/lr{row['lr']:g}/wd{row['weight_decay']:g}"


def run_name(row: Mapping[str, Any]) -> str:
  return f"vision/seed{row['seed']}/lr{row['lr']:g}/wd{row['weight_decay']:g}"


def dataset_of(cfg) -> data_lib.Dataset:
  """The study's images, checked against the fingerprint in its config (when one is set)."""
  t = cfg.task
  d = data_lib.load(str(t.data), str(t.format), float(t.test_frac), int(t.split_seed), int(t.max_train),
                    int(t.max_test), int(t.classes))
  if t.fingerprint and t.fingerprint != d.fingerprint:
    raise data_lib.DataError(f"data {t.data!r} has fingerprint {d.fingerprint}, the study was made on "
                             f"{t.fingerprint} (other files, contents or split settings)")
  return d


def spec_of(cfg, dataset: data_lib.Dataset | None = None) -> models.ConvSpec:
  """The typed net of ``cfg`` on its images (read to learn their shape and classes unless given)."""
  d = dataset if dataset is not None else dataset_of(cfg)
  h, w, c = d.image_shape
  spec = models.spec_of(cfg.model.conv, h, w, c, d.classes)
  models.check_spec(spec)
  return spec


def eval_chunks(images, labels, n: int, chunk: int) -> dict[str, np.ndarray]:
  """The first ``n`` images (0: all) as ``[C, chunk, ...]`` chunks, the last padded with weight 0."""
  n = len(images) if n <= 0 else min(n, len(images))
  chunk = min(chunk, n)
  c = -(-n // chunk)
  pad = c * chunk - n
  x = np.concatenate([images[:n], np.zeros((pad,) + images.shape[1:], images.dtype)])
  y = np.concatenate([labels[:n], np.zeros(pad, labels.dtype)])
  w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  return {"x": x.reshape((c, chunk) + images.shape[1:]), "y": y.reshape(c, chunk), "w": w.reshape(c, chunk)}


def standardise(images_BxHxWxC, mean_C, std_C):
  """float32 images with the training set's per-channel mean and std."""
  x = images_BxHxWxC.astype(jnp.float32)
  return (x - mean_C.reshape(1, 1, 1, -1)) / std_C.reshape(1, 1, 1, -1)


class VisionFamily(families.Family):
  """Conv nets on images; see the module docstring."""
  name = "vision"
  progress_metric = "test_acc"
  generalised_threshold = 0.9
  metrics = ("train_loss", "train_acc", "test_loss", "test_acc")
  analysis_module = "universality.engine.families.vision.analysis"
  report_module = "universality.engine.families.vision.report"
  view_module = "universality.engine.families.vision.view"

  def add_config(self, cfg) -> None:
    cfg.task = ml_collections.ConfigDict()
    cfg.task.data = data_lib.DIGITS
    cfg.task.format = "auto"
    cfg.task.classes = 0
    cfg.task.test_frac = 0.2
    cfg.task.split_seed = 0
    cfg.task.max_train = 0
    cfg.task.max_test = 0
    cfg.task.fingerprint = ""
    cfg.task.augment_pad = 0
    cfg.task.augment_flip = False
    cfg.task.vary_data_order = False
    cfg.task.eval_examples = 0
    cfg.task.eval_batch = 512
    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = "conv"
    cfg.model.conv = ml_collections.ConfigDict()
    cfg.model.conv.widths = "16,32,32"    # output channels of the 3×3 conv layers
    cfg.model.conv.dense = "64"           # hidden dense layers before the head ("" for none)
    cfg.model.conv.pool_every = 1         # 2×2 pooling after every this many conv layers (0: never)
    cfg.model.conv.pool = "max"           # or "avg"
    cfg.model.conv.norm = "none"          # "group" (GroupNorm) or "layer" (over positions and channels)
    cfg.model.conv.norm_groups = 4        # groups of GroupNorm
    cfg.batch_size = 64
    cfg.opt.lr = "3e-3"
    cfg.opt.weight_decay = "1e-4"
    cfg.opt.b2 = 0.999
    cfg.analysis.update(ANALYSIS_SETTINGS)

  def validate(self, cfg) -> None:
    t, m = cfg.task, cfg.model
    if not isinstance(t.data, str) or not t.data:
      raise ValueError(f"config.task.data: expected 'digits' or a path, got {t.data!r}")
    if t.data != data_lib.DIGITS and not os.path.exists(os.path.expanduser(t.data)):
      raise ValueError(f"config.task.data: {t.data!r} does not exist")
    if t.format not in data_lib.FORMATS:
      raise ValueError(f"config.task.format: must be one of {data_lib.FORMATS}, got {t.format!r}")
    if not isinstance(t.test_frac, (int, float)) or isinstance(t.test_frac, bool) or not 0 < t.test_frac < 1:
      raise ValueError(f"config.task.test_frac: must lie in (0, 1), got {t.test_frac!r}")
    for name in ("classes", "split_seed", "max_train", "max_test", "augment_pad", "eval_examples"):
      fields.int_field(t, name, 0, "task.")
    fields.int_field(t, "eval_batch", 1, "task.")
    for name in ("augment_flip", "vary_data_order"):
      if not isinstance(t[name], bool):
        raise ValueError(f"config.task.{name}: expected True or False, got {t[name]!r}")
    if m.name not in MODELS:
      raise ValueError(f"config.model.name: must be one of {MODELS}, got {m.name!r}")
    models.parse_ints(m.conv.widths, "model.conv.widths")
    models.parse_ints(m.conv.dense, "model.conv.dense")
    fields.int_field(m.conv, "pool_every", 0, "model.conv.")
    fields.int_field(m.conv, "norm_groups", 1, "model.conv.")
    if m.conv.pool not in models.POOLS:
      raise ValueError(f"config.model.conv.pool: must be one of {models.POOLS}, got {m.conv.pool!r}")
    if m.conv.norm not in models.NORMS:
      raise ValueError(f"config.model.conv.norm: must be one of {models.NORMS}, got {m.conv.norm!r}")
    check_analysis(cfg.analysis)
    if cfg.batch_size < 1:
      raise ValueError("config.batch_size: the vision family trains on minibatches of images; must be >= 1, "
                       f"got {cfg.batch_size}")

  def resolve(self, cfg):
    """``cfg`` with ``task.fingerprint`` filled in from the data (a one-line error if it is unusable)."""
    d = dataset_of(cfg)
    spec_of(cfg, d)
    if cfg.task.fingerprint == d.fingerprint:
      return cfg
    out = cfg.copy_and_resolve_references()
    out.task.fingerprint = d.fingerprint
    return out

  def runs(self, cfg) -> list[dict]:
    return families.optimiser_sweep(cfg, cohort_name, run_name)

  def n_runs(self, cfg) -> int:
    return families.optimiser_sweep_size(cfg)

  def footprint(self, cfg) -> families.Footprint:
    """The net's abstract init, the images (shared by every run, held twice: the host's and the devices'
    copy) and the activations of one training step or evaluation chunk. The data are read to learn the
    image shape (once per process: the reader caches them)."""
    d = dataset_of(cfg)
    spec = spec_of(cfg, d)
    params = jax.eval_shape(lambda k: models.init(k, spec), jax.ShapeDtypeStruct((2,), jnp.uint32))
    n_bytes = d.train_images.nbytes + d.test_images.nbytes
    batch = max(int(cfg.batch_size), int(cfg.task.eval_batch))
    return families.Footprint(params=params, data=8, step=4 * models.activation_floats(spec, batch),
                              shared=3 * n_bytes)

  def param_roles(self, params):
    return models.param_roles(params)

  def cohort_name(self, row) -> str:
    return cohort_name(row)

  def run_key(self, row):
    return families.key_of(int(row["base_seed"]), int(row["seed"]), 0x1C0E)

  def data_key(self, cfg, row) -> np.ndarray:
    """The key of a run's minibatches and augmentation: shared by every seed unless task.vary_data_order."""
    return families.data_key_of(cfg, row)

  def make_task(self, cfg, rows) -> families.Task:
    d = dataset_of(cfg)
    spec = spec_of(cfg, d)
    mean, std = d.channel_stats()
    t = cfg.task
    n_eval, chunk = int(t.eval_examples), int(t.eval_batch)
    shared = {"train_x": d.train_images, "train_y": d.train_labels, "mean": mean, "std": std,
              "eval_train": eval_chunks(d.train_images, d.train_labels, n_eval, chunk),
              "eval_test": eval_chunks(d.test_images, d.test_labels, n_eval, chunk)}
    data = {"data_key": np.stack([self.data_key(cfg, r) for r in rows])}
    batch, pad, flip = int(cfg.batch_size), int(t.augment_pad), bool(t.augment_flip)
    n_train = len(d.train_images)
    return families.Task(data=data, init=lambda key, d_, sh: models.init(jax.random.fold_in(key, 0), spec),
                         loss_and_grads=functools.partial(_loss_and_grads, spec=spec, batch=batch,
                                                          n_train=n_train, pad=pad, flip=flip),
                         evaluate=functools.partial(_evaluate, spec=spec),
                         apply=functools.partial(_apply, spec=spec), metrics=self.metrics, shared=shared)

  def check_inputs(self, data, inputs, n_runs: int):
    """``(images_SxBxHxWxC,)``: raw images (as the data hold them), standardised by the model's apply."""
    if len(inputs) != 1:
      raise ValueError(f"apply: expected inputs (images,), got {len(inputs)} arrays")
    images = np.asarray(inputs[0])
    if images.ndim != 5 or images.shape[0] != n_runs:
      raise ValueError(f"apply: images must be [{n_runs}, B, H, W, C], got {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
      raise ValueError(f"apply: images must be numbers, got {images.dtype}")
    return (images.astype(np.float32),)

  def describe(self, cfg) -> list[str]:
    t, c = cfg.task, cfg.model.conv
    d = dataset_of(cfg)
    spec = spec_of(cfg, d)
    h, w, ch = d.image_shape
    source = ("scikit-learn's handwritten digits" if t.data == data_lib.DIGITS
              else f"`{t.data}` ({d.format})")
    aug = ", ".join(([f"random crops (padding {t.augment_pad})"] if t.augment_pad else [])
                    + (["horizontal flips"] if t.augment_flip else [])) or "none"
    order = "its own" if t.vary_data_order else "the same"
    pools = f"{c.pool} pooling 2×2 after every {c.pool_every} conv layer(s)" if c.pool_every else "no pooling"
    norm = {"none": "no normalisation", "layer": "LayerNorm", "group": f"GroupNorm ({c.norm_groups} groups)"}
    return [f"- Task: {d.classes}-class image classification on {source}: {len(d.train_images):,} training "
            f"and {len(d.test_images):,} test images of {h}×{w}×{ch} (fingerprint {d.fingerprint})",
            f"- Model: conv net, 3×3 conv widths {list(spec.widths)} with ReLU, {norm[c.norm]}, {pools}; "
            f"dense {list(spec.dense)}; head onto {d.classes} classes",
            f"- Augmentation: {aug}; every seed sees {order} sequence of minibatches"]


def _loss_and_grads(params, key, step, d, shared, *, spec, batch, n_train, pad, flip):
  k = jax.random.fold_in(d["data_key"], step)
  k_idx, k_aug = jax.random.split(k)
  idx_B = jax.random.randint(k_idx, (batch,), 0, n_train)
  x = standardise(shared["train_x"][idx_B], shared["mean"], shared["std"])
  x = models.augment(k_aug, x, pad, flip)
  y = shared["train_y"][idx_B]

  def loss(p):
    logits, _ = models.apply(p, x, spec)
    return models.xent_and_acc(logits, y)[0]

  return jax.value_and_grad(loss)(params)


def _eval_split(params, split, shared, spec):
  def chunk(args):
    x, y, w = args
    logits, _ = models.apply(params, standardise(x, shared["mean"], shared["std"]), spec)
    loss, acc = models.xent_and_acc(logits, y, w)
    n = jnp.sum(w)
    return loss * n, acc * n, n

  loss, acc, n = jax.lax.map(chunk, (split["x"], split["y"], split["w"]))
  total = jnp.sum(n)
  return jnp.sum(loss) / total, jnp.sum(acc) / total


def _evaluate(params, d, shared, *, spec):
  train_loss, train_acc = _eval_split(params, shared["eval_train"], shared, spec)
  test_loss, test_acc = _eval_split(params, shared["eval_test"], shared, spec)
  return dict(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)


def _apply(params, inputs, d, shared, *, spec):
  (images_BxHxWxC,) = inputs
  return models.apply(params, standardise(images_BxHxWxC, shared["mean"], shared["std"]), spec)


FAMILY = VisionFamily()
