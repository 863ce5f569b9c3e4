"""The notebook view of a language-model run directory: ``universality.engine.view.Run`` plus text and neuron accessors.

  run = universality.engine.replay.open("runs/lm")            # a View
  params = run.params(step=run.steps[3])         # stacked parameters at any checkpoint
  acts = run.activations("def f(x):\\n    return x")   # {"mlp_pre", "mlp_post"}: [S, T, L, N] on any text
  table = run.neurons()                          # one row per neuron of the cohort: excess, properties
  run.top_neurons()                              # the summary's most universal neurons and their snippets
  run.convergent()["layer0"]["one_to_one"]       # Convergent Learning records (analysis.convergent=True)
  run.plot.universal_by_layer(); run.plot.properties()

Per-cohort accessors need the selection to hold one cohort (``select(lr=...)`` narrows a sweep).
"""

from __future__ import annotations

import numpy as np

from universality.engine import plots as plots_lib
from universality.engine import view as view_lib
from universality.engine.analysis import convergent
from universality.engine.analysis import driver
from universality.engine import rundir
from universality.engine.families.lm import analysis
from universality.engine.families.lm import family as family_lib
from universality.engine.families.lm import models
from universality.engine.families.lm import plots


class View(view_lib.Run):
  """A read-only view of a language-model run directory (see the module docstring)."""

  def __init__(self, workdir: str, index=None, _shared: view_lib.Cache | None = None):
    super().__init__(workdir, index, _shared)
    self.plot = Plots(self)

  def corpus(self):
    """The study's corpus (``universality.engine.families.lm.corpus.Corpus``), checked against config.json's fingerprint."""
    return family_lib.corpus_of(self.config)

  @property
  def model(self) -> models.Stacked:
    """The model over stacked runs (``models.stacked``): the forward the analysis and training evaluate."""
    if self._shared.forward is None:
      self._shared.forward = models.stacked(self.config.model.gpt)
    return self._shared.forward

  def apply(self, text: str | bytes, step: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``[S, T, 256]`` and activations ``{"mlp_pre", "mlp_post"}`` ``[S, T, L, N]`` of the selected
    runs on ``text`` (str is UTF-8 encoded), read in consecutive windows of the model's context."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    if not data:
      raise ValueError("apply: empty text")
    c = int(self.config.model.gpt.context)
    tokens = np.frombuffer(data, np.uint8)
    pad = -len(tokens) % c
    windows = np.concatenate([tokens, np.zeros(pad, np.uint8)]).reshape(-1, c).astype(np.int32)
    logits, acts = self.model.apply(self.params(step), windows)
    flat = lambda x: np.asarray(x).reshape((x.shape[0], -1) + x.shape[3:])[:, :len(tokens)]
    return flat(logits), {k: flat(v) for k, v in acts.items()}

  def activations(self, text: str | bytes, step: int | None = None) -> dict[str, np.ndarray]:
    """``{"mlp_pre", "mlp_post"}`` ``[S, T, L, N]`` of the selected runs on ``text``."""
    return self.apply(text, step)[1]

  def neurons(self, **filters) -> dict[str, np.ndarray]:
    """The per-neuron table of one cohort for the selected runs: every array of the analysis (``excess``,
    ``universal``, the properties of ``analysis.PROPERTIES``, ``vocab_class``; each ``[S, L, N]``) plus
    ``seed``, ``layer`` and ``neuron`` index arrays of the same shape."""
    entry = self.cohort_summary(**filters)
    gpt = self.config.model.gpt  # the file is data: its shapes are checked against the run directory's own
    n_cohort = len(self.summary()["cohorts"][entry["cohort"]]["runs"])
    arrays = rundir.read_cohort_arrays(self.workdir, entry["cohort"], (n_cohort,))
    for name in ("excess", "universal", "dead", "vocab_class", *analysis.PROPERTIES):
      if name not in arrays or arrays[name].shape != (n_cohort, gpt.n_layers, gpt.d_mlp):
        raise rundir.RunDirError(f"analysis arrays of cohort {entry['cohort']!r} in {self.workdir}: {name} is "
                                 f"{arrays[name].shape if name in arrays else 'missing'}, expected "
                                 f"{(n_cohort, gpt.n_layers, gpt.d_mlp)}; run the analysis again")
    pos = np.asarray(entry["positions"])
    out = {k: v[pos] for k, v in arrays.items()}
    s, l, n = out["pre_mean"].shape
    out["seed"] = np.broadcast_to(np.asarray([r["seed"] for r in entry["records"]])[:, None, None], (s, l, n))
    out["layer"] = np.broadcast_to(np.arange(l)[None, :, None], (s, l, n))
    out["neuron"] = np.broadcast_to(np.arange(n)[None, None, :], (s, l, n))
    return out

  def convergent(self, **filters) -> dict:
    """The summary's Convergent Learning records of one cohort (analysis setting ``convergent``):
    ``{"layer<j>": {"one_to_one": [convergent.OneToOne], "sparse_prediction": [convergent.SparsePrediction],
    "clusters": [convergent.Clusters], "means": {...}}}``."""
    entry = self.cohort_summary(**filters)
    conv = entry["aggregate"].get("convergent")
    if not conv:
      raise ValueError(f"summary.json has no Convergent Learning records for {entry['cohort']}: analyse with "
                       "--config.analysis.convergent=True (or run.analyze(convergent=True))")
    return {layer: convergent.from_json(v) for layer, v in conv.items()}

  def _convergent_named(self, overrides: dict) -> dict:
    """The analysis settings: the defaults, the summary's (when there is one), ``overrides``; passes on."""
    unknown = sorted(set(overrides) - set(analysis.SETTINGS))
    if unknown:
      raise ValueError(f"unknown analysis setting {unknown[0]!r}; settings: {', '.join(analysis.SETTINGS)}")
    named = dict(analysis.SETTINGS)
    try:
      named.update({k: v for k, v in self.summary()["settings"].items() if k in named})
    except FileNotFoundError:
      pass
    named.update(overrides)
    named["convergent"] = True
    return named

  def convergent_text(self, *, seed: int = 0, **settings) -> bytes:
    """The held-out bytes the Convergent Learning passes of the selection's cohort read, with the
    analysis' key for ``seed`` and its settings (the summary's; ``settings`` override them):
    ``activations(text)["mlp_post"][:, :, j]`` is layer j's ``acts_SxTxN``."""
    sub = self.one_cohort()
    named = self._convergent_named(settings)
    windows = analysis.analysis_windows(self.config, named["tokens"])
    return analysis.convergent_text(windows, driver.cohort_key(seed, sub.cohorts[0]),
                                    convergent.settings_of(named).max_inputs)

  def compute_convergent(self, step: int | None = None, *, seed: int = 0, **settings) -> dict:
    """The Convergent Learning passes recomputed on the selection's cohort at ``step`` (``convergent_text``'s
    bytes, each MLP layer with its key ``convergent.key_of``): ``{"layer<j>": analyse's records}``. On all
    runs of a cohort at its last checkpoint these are the summary's (``convergent``)."""
    sub = self.one_cohort()
    if len(sub) < 2:
      raise ValueError("the Convergent Learning passes compare two or more runs of a cohort")
    named = self._convergent_named(settings)
    conv = convergent.settings_of(named)
    key = driver.cohort_key(seed, sub.cohorts[0])
    acts = sub.activations(sub.convergent_text(seed=seed, **settings), step)["mlp_post"]
    pairs = convergent.pairs_of(named, len(sub))
    return {f"layer{j}": convergent.analyse(acts[:, :, j], pairs, key=convergent.key_of(key, j),
                                            settings=conv) for j in range(acts.shape[2])}

  def top_neurons(self, **filters) -> list[dict]:
    """The cohort's most universal neurons of its first run, with their matches and top text windows."""
    return self.cohort_summary(**filters)["aggregate"].get("top_neurons", [])


class Plots:
  """Figures of a language-model view (the report draws the same ones)."""

  def __init__(self, run: View):
    self._run = run

  def learning_curves(self):
    m = self._run.metrics()
    return plots.learning_curves(m["step"], m["train_bpb"], m["test_bpb"], m["unigram_bpb"], self._run.runs)

  def universal_by_layer(self, **filters):
    entry = self._run.cohort_summary(**filters)
    return plots.universal_by_layer(entry["aggregate"]["universal_by_layer"],
                                    [r["universal_by_layer"] for r in entry["records"]], entry["cohort"])

  def convergent(self, **filters):
    """The Convergent Learning sparse prediction against λ, one line per layer: held-out loss and units
    used, means over the pairs compared (summary.json; analysis setting ``convergent``)."""
    conv = self._run.convergent(**filters)
    return plots_lib.sparse_prediction_curves({layer: r["means"] for layer, r in conv.items()},
                                              title="sparse prediction between seeds, per layer")

  def excess(self, **filters):
    table = self._run.neurons(**filters)
    return plots.excess_by_layer(table["excess"], table["dead"],
                                 self._run.summary()["settings"]["universal_threshold"])

  def properties(self, **filters):
    table = self._run.neurons(**filters)
    pct = {name: analysis.percentile_within_layer(np.asarray(table[name], np.float64))
           for name in analysis.PROPERTIES}
    return plots.property_percentiles(pct, table["universal"], table["dead"])
