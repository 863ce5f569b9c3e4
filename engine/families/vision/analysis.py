"""The vision family's analysis of one cohort: do conv nets trained from different seeds learn the same units,
layer by layer? (Li et al. 2016, *Convergent Learning*.)

Every run of the cohort reads the same ``images`` test images. For every conv layer and dense layer the
activations after the ReLU (``models.apply``'s named activations) become samples × units:

* a conv channel's samples are the images × spatial positions (``conv_samples = "positions"``, as Li et al.
  did) or one per image, the channel's mean over positions (``"mean"``); a dense unit's samples are the
  images. At most ``max_samples`` samples per layer (a subset seeded by the cohort key) are kept.
* cross-seed unit correlation through ``universality.kernels.correlation``
  (``universality.engine.analysis.cross_seed.neuron_correlations``): each unit's maximum Pearson correlation
  with the units of every other run, against the same maximum over that run's units mixed by a random
  orthogonal rotation (the baseline), the excess (mean over the other runs of max − baseline max) and the
  share of units above ``universal_threshold``;
* linear CKA and the orthogonal Procrustes distance between every pair of runs (``cross_seed``);
* the three Convergent Learning passes (``universality.engine.analysis.convergent``: one-to-one greedy and
  bipartite matching, sparse prediction over the ``lambdas``, spectral clusters) on run 0 against runs
  1 .. ``convergent_pairs``, on at most ``convergent_inputs`` samples;
* mode connectivity (``connectivity``): the loss barrier on the straight path from run 0 to each of those
  runs, on ``images`` training images, with run j's units as they are (raw), reordered by activation
  matching (per layer, the bipartite matching of the units' correlations on the test images) and by weight
  matching (``universality.engine.families.vision.symmetry``; with GroupNorm, within groups);
* iterative feature merging (``merging``) of every hidden layer of every run on the same training images,
  within ``merge_tolerance`` of the loss (``symmetry.merge_channels``); nets without normalisation only.

Only the last checkpoint is analysed (``LAST_STEP_ONLY``). summary.json holds per cohort ``aggregate.layers``:
one record per layer (``LAYER_FIELDS``, with the Convergent Learning records under ``convergent``), and per
run ``layers``: its mean max correlation with the other runs and its universal share per layer. Per-unit
arrays go to the cohort's arrays file as ``<layer>__<name>`` (``ARRAYS``).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from universality.engine.analysis import convergent
from universality.engine.analysis import cross_seed
from universality.engine.families.vision import family as family_lib
from universality.engine.families.vision import models
from universality.engine.families.vision import symmetry

LAST_STEP_ONLY = True
SETTINGS = family_lib.ANALYSIS_SETTINGS
# Li et al. 2016, Net1 vs Net2 (AlexNet on ImageNet), mean correlation of matched units:
# (greedy, max matching).
PAPER_ONE_TO_ONE = {"conv1": (0.703, 0.663), "conv2": (0.556, 0.507), "conv3": (0.478, 0.446),
                    "conv4": (0.369, 0.342), "conv5": (0.416, 0.385)}
LAYER_FIELDS = ("layer", "units", "samples", "dead_fraction", "mean_max_corr", "mean_baseline_max_corr",
                "mean_excess", "universal_fraction", "cka", "procrustes", "greedy_mean", "max_mean",
                "same_partner_share", "lambdas", "heldout_loss", "mean_units_used", "mixed_share", "svcca",
                "mean_feature_width")
ARRAYS = ("excess", "universal", "dead", "max_corr", "baseline_max_corr", "argmax", "cka")


@functools.lru_cache(maxsize=8)
def forward(spec: models.ConvSpec):
  """Jitted ``(params_S, images_BxHxWxC, mean_C, std_C) -> (logits [S, B, V], {layer: [S, B, ...]})``: every
  run on the same raw images, standardised with the training set's channel statistics."""
  def one(params, images, mean, std):
    return models.apply(params, family_lib.standardise(images, mean, std), spec)
  return jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))


def layer_samples(params_S, images_TxHxWxC, spec: models.ConvSpec, mean_C, std_C, *, mode: str,
                  max_samples: int, batch: int, key) -> dict[str, np.ndarray]:
  """``{layer: acts_SxTxN}`` float32: each layer's units over its samples (module docstring); a layer with
  more than ``max_samples`` samples keeps a subset drawn with ``key`` (the same for every run)."""
  chex.assert_shape(images_TxHxWxC, (None, spec.height, spec.width, spec.channels))
  s = jax.tree.leaves(params_S)[0].shape[0]
  chex.assert_tree_shape_prefix(params_S, (s,))
  n_images = len(images_TxHxWxC)
  shapes = dict(zip(spec.layers, [s for s in spec.feature_shapes()] + [(1, 1, n) for n in spec.dense]))
  keep = {}
  for i, layer in enumerate(spec.layers):
    h, w, _ = shapes[layer]
    per_image = h * w if (mode == "positions" and layer.startswith("conv")) else 1
    total = n_images * per_image
    idx = np.arange(total) if total <= max_samples else np.sort(np.asarray(
        jax.random.choice(jax.random.fold_in(key, i), total, (max_samples,), replace=False)))
    keep[layer] = (per_image, idx)
  parts = {layer: [] for layer in spec.layers}
  fn = forward(spec)
  for a in range(0, n_images, batch):
    x = images_TxHxWxC[a:a + batch]
    _, acts = fn(params_S, jnp.asarray(x, jnp.float32), jnp.asarray(mean_C), jnp.asarray(std_C))
    for layer, value in acts.items():
      per_image, idx = keep[layer]
      v = np.asarray(value)
      if v.ndim == 5:  # [S, B, H, W, C]
        v = v.reshape(v.shape[0], -1, v.shape[-1]) if per_image > 1 else v.mean(axis=(2, 3))
      lo, hi = a * per_image, (a + len(x)) * per_image
      sel = idx[(idx >= lo) & (idx < hi)] - lo
      parts[layer].append(v[:, sel])
  return {layer: np.concatenate(p, axis=1).astype(np.float32) for layer, p in parts.items()}


def _mean(x) -> float | None:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else None


def _mean_lists(lists) -> list[float | None]:
  rows = np.asarray([[np.nan if v is None else v for v in row] for row in lists], np.float64)
  return [_mean(rows[:, j]) for j in range(rows.shape[1])] if rows.size else []


def analyse_layer(acts_SxTxN: np.ndarray, key, settings: dict, layer: str) -> tuple[dict, dict, list]:
  """One layer of a cohort: its summary record (``LAYER_FIELDS`` and ``convergent``), its arrays and one
  record per run."""
  chex.assert_rank(acts_SxTxN, 3)
  s, t, n = acts_SxTxN.shape
  k_corr, k_sim, k_conv = jax.random.split(key, 3)
  rec: dict[str, Any] = {"layer": layer, "units": int(n), "samples": int(t)}
  live = np.asarray(cross_seed.live_neurons(jnp.asarray(acts_SxTxN)))
  rec["dead_fraction"] = float(1.0 - live.mean())
  arrays: dict[str, np.ndarray] = {"dead": ~live}
  runs = [{} for _ in range(s)]
  if s < 2:
    return rec, arrays, runs
  corr = cross_seed.neuron_correlations(jnp.asarray(acts_SxTxN), key=k_corr,
                                        universal_threshold=float(settings["universal_threshold"]),
                                        memory_bytes=int(float(settings["memory_gb"]) * (1 << 30)),
                                        within=False)
  mx, base = np.asarray(corr["max_SxNxS"], np.float64), np.asarray(corr["baseline_max_SxNxS"], np.float64)
  excess, universal = np.asarray(corr["excess_SxN"], np.float64), np.asarray(corr["universal_SxN"])
  other = ~np.eye(s, dtype=bool)
  mx_other = np.where(other[:, None, :] & live[:, :, None], mx, np.nan)
  base_other = np.where(other[:, None, :] & live[:, :, None], base, np.nan)
  sim = cross_seed.representation_similarity(jnp.asarray(acts_SxTxN), k=min(10, t - 1),
                                             knn_inputs=min(1024, t), key=k_sim)
  cka, procrustes = np.asarray(sim["cka"], np.float64), np.asarray(sim["procrustes"], np.float64)
  rec.update(mean_max_corr=_mean(mx_other), mean_baseline_max_corr=_mean(base_other),
             mean_excess=_mean(excess[live]),
             universal_fraction=float(universal[live].mean()) if live.any() else None,
             cka=_mean(cka[other]), procrustes=_mean(procrustes[other]))
  arrays.update(excess=excess.astype(np.float32), universal=universal, max_corr=mx.astype(np.float32),
                baseline_max_corr=base.astype(np.float32), argmax=np.asarray(corr["argmax_SxNxS"], np.int32),
                cka=cka.astype(np.float32))
  for i in range(s):
    runs[i] = {"mean_max_corr": _mean(mx_other[i]),
               "universal_fraction": float(universal[i][live[i]].mean()) if live[i].any() else None}
  pairs = [(0, j) for j in range(1, min(int(settings["convergent_pairs"]), s - 1) + 1)]
  conv_settings = convergent.Settings(max_inputs=max(4, int(settings["convergent_inputs"])),
                                      lambdas=family_lib.lambdas(settings),
                                      iterations=int(settings["fista_iterations"]),
                                      clusters=min(int(settings["clusters"]), 2 * n))
  res = convergent.analyse(acts_SxTxN, pairs, key=k_conv, settings=conv_settings)
  o2o, sp, sc = res["one_to_one"], res["sparse_prediction"], res["clusters"]
  svcca = [c.svcca for r in sc for c in r.clusters if c.svcca is not None]
  rec.update(greedy_mean=_mean([r.greedy_mean for r in o2o if r.greedy_mean is not None]),
             max_mean=_mean([r.max_mean for r in o2o if r.max_mean is not None]),
             same_partner_share=_mean([r.same_partner_share for r in o2o
                                       if r.same_partner_share is not None]),
             lambdas=list(conv_settings.lambdas), heldout_loss=_mean_lists([r.heldout_loss for r in sp]),
             mean_units_used=_mean_lists([r.mean_units_used for r in sp]),
             mixed_share=_mean([r.mixed_share for r in sc if r.mixed_share is not None]),
             svcca=_mean(svcca) if svcca else None)
  rec["convergent"] = {"one_to_one": [r.to_json() for r in o2o],
                       "sparse_prediction": [r.to_json() for r in sp], "clusters": [r.to_json() for r in sc]}
  return rec, arrays, runs


def analysis_images(cfg, n: int) -> np.ndarray:
  """The first ``n`` test images of the study's data (raw, as stored)."""
  return family_lib.dataset_of(cfg).test_images[:int(n)]


def analyze_cohort(view, params_by_step, key, settings: dict, batch_size: int | None = None) -> dict:
  """One cohort: ``{"task", "aggregate", "runs", "arrays"}`` (see the module docstring)."""
  family_lib.check_analysis(settings)
  cfg = view.config
  d = family_lib.dataset_of(cfg)
  spec = family_lib.spec_of(cfg, d)
  mean, std = d.channel_stats()
  step = max(params_by_step)
  params = jax.tree.map(jnp.asarray, params_by_step[step])
  images = d.test_images[:int(settings["images"])]
  k_samples, k_layers = jax.random.split(key)
  acts = layer_samples(params, images, spec, mean, std, mode=settings["conv_samples"],
                       max_samples=int(settings["max_samples"]),
                       batch=int(batch_size or settings["batch_images"]), key=k_samples)
  s = len(view)
  layers, arrays, runs = [], {}, [{"layers": {}} for _ in range(s)]
  for i, layer in enumerate(spec.layers):
    rec, arr, per_run = analyse_layer(acts[layer], jax.random.fold_in(k_layers, i), settings, layer)
    layers.append(rec)
    arrays.update({f"{layer}__{k}": v for k, v in arr.items()})
    for r, pr in zip(runs, per_run):
      r["layers"][layer] = pr
  aggregate: dict[str, Any] = {"layers": layers}
  train_x = family_lib.standardise(jnp.asarray(d.train_images[:int(settings["images"])]), mean, std)
  train_y = d.train_labels[:int(settings["images"])]
  if settings["merging"] and spec.norm == "none":
    widths = merging(params, spec, train_x, train_y, float(settings["merge_tolerance"]))
    for r, w in zip(runs, widths):
      r["feature_widths"] = w
    for rec in layers:
      rec["mean_feature_width"] = _mean([w[rec["layer"]] for w in widths])
  if settings["connectivity"] and s >= 2:
    pairs = [(0, j) for j in range(1, min(int(settings["convergent_pairs"]), s - 1) + 1)]
    aggregate["connectivity"] = connectivity(params, spec, acts, pairs, train_x, train_y,
                                             int(settings["path_points"]))
  task = {"images": int(len(images)), "train_images": int(len(train_y)), "step": int(step),
          "layers": list(spec.layers), "conv_samples": settings["conv_samples"]}
  return {"task": task, "aggregate": aggregate, "runs": runs, "arrays": arrays}


ALIGNMENTS = ("raw", "activation", "weight")


def connectivity(params_S, spec, acts: dict[str, np.ndarray], pairs, images, labels, points: int) -> dict:
  """Barriers of the paths from run a to run b per alignment (module docstring), JSON-ready."""
  one = lambda i: jax.tree.map(lambda x: np.asarray(x)[i], params_S)
  out: dict[str, Any] = {"pairs": [list(p) for p in pairs], "points": points}
  paths = {name: [] for name in ALIGNMENTS}
  for a, b in pairs:
    pa, pb = one(a), one(b)
    perms = {"raw": {}, "weight": symmetry.weight_matching(pa, pb, spec)}
    matched = {}
    for layer in spec.layers:
      corr = convergent.cross_correlation(acts[layer][a], acts[layer][b])
      matched[layer] = symmetry.match(corr, symmetry.allowed(spec, layer))
    perms["activation"] = matched
    for name in ALIGNMENTS:
      aligned = symmetry.permute(pb, perms[name], spec)
      paths[name].append(symmetry.path_losses(pa, aligned, spec, images, labels, points=points))
  for name in ALIGNMENTS:
    barriers = [p["barrier"] for p in paths[name]]
    out[name] = {"barrier": barriers, "mean_barrier": _mean(barriers),
                 "mean_loss_path": np.mean([p["loss_O"] for p in paths[name]], axis=0).tolist(),
                 "min_accuracy": [float(np.min(p["accuracy_O"])) for p in paths[name]]}
  return out


def merging(params_S, spec, images, labels, tolerance: float) -> list[dict[str, int]]:
  """Per run, the width each hidden layer keeps under iterative feature merging (module docstring)."""
  s = jax.tree.leaves(params_S)[0].shape[0]
  out = []
  for i in range(s):
    p = jax.tree.map(lambda x: np.asarray(x)[i], params_S)
    out.append({layer: symmetry.merge_channels(p, spec, layer, images, labels, tolerance=tolerance)["width"]
                for layer in spec.layers})
  return out
