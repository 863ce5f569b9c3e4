"""The notebook view of a vision run directory: ``universality.engine.view.Run`` plus image and layer
accessors.

  run = universality.engine.replay.open("runs/vision")     # a View
  images, labels = run.test_images(16)               # the study's test images (raw) and labels
  logits, acts = run.apply(images)                   # logits [S, B, V]; {layer: [S, B, H, W, C] or [S, B, N]}
  acts = run.activations(images, step=run.steps[2])  # the named activations of any checkpoint
  run.layers()                                       # the cohort's per-layer records (summary.json)
  run.units("conv2")                                 # per-unit arrays: excess, max_corr, argmax, dead, ...
  run.convergent("conv1")                            # typed one-to-one, sparse-prediction and cluster records
  run.connectivity()                                 # loss barriers run 0 -> others: raw, activation, weight
  run.feature_widths()                               # {layer: [S] units left after feature merging}
  run.plot.one_to_one(); run.plot.sparse_prediction(); run.plot.learning_curves()

Per-cohort accessors need the selection to hold one cohort (``select(lr=...)`` narrows a sweep).
"""

from __future__ import annotations

import numpy as np

from universality.engine import rundir
from universality.engine import view as view_lib
from universality.engine.families.vision import analysis
from universality.engine.families.vision import family as family_lib
from universality.engine.families.vision import plots
from universality.engine.families.vision import report


class View(view_lib.Run):
  """A read-only view of a vision run directory (see the module docstring)."""

  def __init__(self, workdir: str, index=None, _shared: view_lib.Cache | None = None):
    super().__init__(workdir, index, _shared)
    self.plot = Plots(self)

  def dataset(self):
    """The study's images (``universality.engine.families.vision.data.Dataset``), checked against the
    fingerprint in config.json."""
    return family_lib.dataset_of(self.config)

  def spec(self):
    return family_lib.spec_of(self.config, self.dataset())

  def test_images(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` (default: all) test images, raw as stored, and their labels."""
    d = self.dataset()
    return d.test_images[:n], d.test_labels[:n]

  def apply(self, images, step: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``[S, B, V]`` and the named activations of the selected runs on raw ``images``
    (``[B, H, W, C]``, or ``[B, H, W]`` for one channel), standardised as in training."""
    d = self.dataset()
    x = np.asarray(images)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != d.train_images.shape[1:]:
      shape = ", ".join(map(str, d.image_shape))
      raise ValueError(f"apply: images must be [B, {shape}], got {np.shape(images)}")
    mean, std = d.channel_stats()
    logits, acts = analysis.forward(self.spec())(self.params(step), x.astype(np.float32), mean, std)
    return np.asarray(logits), {k: np.asarray(v) for k, v in acts.items()}

  def activations(self, images, step: int | None = None) -> dict[str, np.ndarray]:
    """``{layer: [S, B, H, W, C] or [S, B, N]}`` of the selected runs on raw ``images``."""
    return self.apply(images, step)[1]

  def layers(self, **filters) -> list[dict]:
    """The cohort's per-layer records (``analysis.LAYER_FIELDS`` and ``convergent``)."""
    return self.cohort_summary(**filters)["aggregate"]["layers"]

  def units(self, layer: str, **filters) -> dict[str, np.ndarray]:
    """Per-unit arrays of one layer for the selected runs: ``excess``, ``universal``, ``dead`` ``[S, N]``,
    ``max_corr``, ``baseline_max_corr``, ``argmax`` ``[S, N, S_cohort]`` and ``cka`` ``[S, S_cohort]``."""
    entry = self.cohort_summary(**filters)
    if layer not in entry["task"]["layers"]:
      raise ValueError(f"units: no layer {layer!r}; layers: {', '.join(entry['task']['layers'])}")
    n_cohort = len(self.summary()["cohorts"][entry["cohort"]]["runs"])
    arrays = rundir.read_cohort_arrays(self.workdir, entry["cohort"], (n_cohort,))
    pos = np.asarray(entry["positions"])
    prefix = f"{layer}__"
    return {k[len(prefix):]: v[pos] for k, v in arrays.items() if k.startswith(prefix)}

  def convergent(self, layer: str, **filters) -> dict:
    """``{"one_to_one", "sparse_prediction", "clusters"}``: the typed records
    (``universality.engine.analysis.convergent``) of one layer."""
    for rec in self.layers(**filters):
      if rec["layer"] == layer:
        return report.convergent_records(rec)
    raise ValueError(f"convergent: no layer {layer!r}")

  def connectivity(self, **filters) -> dict | None:
    """The cohort's loss barriers per alignment (``analysis.connectivity``); None when not computed."""
    return self.cohort_summary(**filters)["aggregate"].get("connectivity")

  def feature_widths(self, **filters) -> dict[str, np.ndarray]:
    """``{layer: int [S]}``: units each selected run keeps per layer after iterative feature merging."""
    records = self.cohort_summary(**filters)["records"]
    if not all(r.get("feature_widths") for r in records):
      return {}
    return {layer: np.asarray([r["feature_widths"][layer] for r in records])
            for layer in records[0]["feature_widths"]}


class Plots:
  """Figures of a vision view (the report draws the same ones)."""

  def __init__(self, run: View):
    self._run = run

  def learning_curves(self, metric: str = "acc"):
    m = self._run.metrics()
    return plots.learning_curves(m["step"], m[f"train_{metric}"], m[f"test_{metric}"], self._run.runs,
                                 "accuracy" if metric == "acc" else "cross-entropy (nats)")

  def one_to_one(self, **filters):
    entry = self._run.cohort_summary(**filters)
    return plots.one_to_one(entry["aggregate"]["layers"], analysis.PAPER_ONE_TO_ONE, entry["cohort"])

  def sparse_prediction(self, **filters):
    entry = self._run.cohort_summary(**filters)
    return plots.sparse_prediction(entry["aggregate"]["layers"], entry["cohort"])
