"""The notebook view of an imported suite: ``universality.engine.view.Run`` plus tokens, activations, neurons.

  run = universality.engine.replay.open("runs/gpt2-small")  # a View
  run.runs                                   # model (directory name), name_or_path, seed_label, seed (k)
  params = run.params()                      # stacked parameters [S, ...] (the import's checkpoint)
  acts = run.activations(ids)                # {"mlp_pre", "mlp_post"}: [S, T, L, N] on token ids (or text)
  table = run.neurons()                      # excess (all pairs and the paper's), properties [S, L, N]
  run.plot.universal_by_layer(); run.plot.excess(); run.plot.properties()

There is no trainer: ``state`` restores the parameters alone (``family.ImportedState``), checked against the
shapes config.json describes before anything is read.
"""

from __future__ import annotations

import jax
import numpy as np

from universality.engine import rundir
from universality.engine import view as view_lib
from universality.engine.families.imported import analysis
from universality.engine.families.imported import family as family_lib
from universality.engine.families.imported import models
from universality.engine.families.imported import tokens as tokens_lib
from universality.engine.families.lm import plots


class View(view_lib.Run):
  """A read-only view of an imported suite's run directory (see the module docstring)."""

  def __init__(self, workdir: str, index=None, _shared: view_lib.Cache | None = None):
    super().__init__(workdir, index, _shared)
    self.plot = Plots(self)

  @property
  def spec(self) -> models.Spec:
    return models.spec_of(self.config.model.imported)

  def trainer(self):
    raise ValueError("an imported suite has no trainer (its models were trained elsewhere)")

  def state(self, step: int | None = None):
    """The stacked parameters of ALL runs at ``step`` (``family.ImportedState``), host numpy arrays."""
    key = self.resolve_step(step)
    cache = self._shared.states
    if key in cache:
      cache.move_to_end(key)
    else:
      spec = family_lib.abstract_state(self.config, len(self.rows))
      view_lib._check_shapes(self.workdir, key, self._checkpointer().stored_shapes(key), spec)
      _, cache[key] = self._checkpointer().restore(spec, step=key, fallback=False)
      while len(cache) > view_lib._STATE_CACHE:
        cache.popitem(last=False)
    return cache[key]

  def tokenize(self, text: str, tokenizer: str = "") -> np.ndarray:
    """Token ids of ``text`` by ``tokenizer`` (default: the analysis's, else the first model's)."""
    settings = dict(family_lib.ANALYSIS_SETTINGS, tokenizer=tokenizer)
    path = analysis.tokenizer_of(self.config, settings)
    if not path:
      raise tokens_lib.TokensError("no tokenizer.json: pass tokenizer=PATH, or token ids")
    return np.asarray(tokens_lib.load_tokenizer(path).encode(text, add_special_tokens=False).ids, np.int64)

  def _forward(self):
    if self._shared.forward is None:
      self._shared.forward = jax.jit(models.apply_stacked, static_argnums=2)
    return self._shared.forward

  def apply(self, tokens, step: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits ``[S, T, V]`` and ``{"mlp_pre", "mlp_post"}`` ``[S, T, L, N]`` of the selected runs on token ids
    (a str is tokenized first), read in consecutive windows of the models' context."""
    ids = self.tokenize(tokens) if isinstance(tokens, str) else np.asarray(tokens)
    spec = self.spec
    if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"apply: expected a non-empty 1-D array of token ids, got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= spec.vocab:
      raise ValueError(f"apply: token ids must lie in [0, {spec.vocab})")
    c = min(spec.context, len(ids))
    pad = -len(ids) % c
    windows = np.concatenate([ids, np.zeros(pad, ids.dtype)]).reshape(-1, c).astype(np.int32)
    logits, acts = self._forward()(self.params(step), windows, spec)
    flat = lambda x: np.asarray(x).reshape((x.shape[0], -1) + x.shape[3:])[:, :len(ids)]
    return flat(logits), {k: flat(v) for k, v in acts.items()}

  def activations(self, tokens, step: int | None = None) -> dict[str, np.ndarray]:
    """``{"mlp_pre", "mlp_post"}`` ``[S, T, L, N]`` of the selected runs on token ids (or text)."""
    return self.apply(tokens, step)[1]

  def neurons(self, **filters) -> dict[str, np.ndarray]:
    """The per-neuron table of the selected runs: every ``[S, L, N]`` array of the analysis plus ``seed``,
    ``layer`` and ``neuron`` index arrays of the same shape."""
    entry = self.cohort_summary(**filters)
    spec = self.spec
    n_cohort = len(self.summary()["cohorts"][entry["cohort"]]["runs"])
    arrays = rundir.read_cohort_arrays(self.workdir, entry["cohort"], (n_cohort,))
    want = (n_cohort, spec.n_layers, spec.d_mlp)
    for name in ("universal", "dead", "vocab_class", "entropy", *analysis.PROPERTIES):
      if name not in arrays or arrays[name].shape != want:
        have = arrays[name].shape if name in arrays else "missing"
        raise rundir.RunDirError(f"analysis arrays of cohort {entry['cohort']!r} in {self.workdir}: {name} "
                                 f"is {have}, expected {want}; run the analysis again")
    pos = np.asarray(entry["positions"])
    out = {k: v[pos] for k, v in arrays.items() if v.shape[:1] == (n_cohort,) and v.ndim == 3}
    s, l, n = out["pre_mean"].shape
    out["seed"] = np.broadcast_to(np.asarray([r["seed"] for r in entry["records"]])[:, None, None], (s, l, n))
    out["layer"] = np.broadcast_to(np.arange(l)[None, :, None], (s, l, n))
    out["neuron"] = np.broadcast_to(np.arange(n)[None, None, :], (s, l, n))
    return out


class Plots:
  """Figures of an imported suite's view (the report draws the same ones)."""

  def __init__(self, run: View):
    self._run = run

  def universal_by_layer(self, **filters):
    entry = self._run.cohort_summary(**filters)
    return plots.universal_by_layer(entry["aggregate"]["universal_by_layer"],
                                    [r["universal_by_layer"] for r in entry["records"]], entry["cohort"])

  def excess(self, **filters):
    table = self._run.neurons(**filters)
    return plots.excess_by_layer(table["excess"], table["dead"],
                                 self._run.summary()["settings"]["universal_threshold"])

  def properties(self, **filters):
    table = self._run.neurons(**filters)
    pct = {name: analysis.percentile_within_layer(np.asarray(table[name], np.float64))
           for name in analysis.PROPERTIES}
    return plots.property_percentiles(pct, table["universal"], table["dead"])
