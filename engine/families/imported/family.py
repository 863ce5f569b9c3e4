"""Suites of language models trained elsewhere, on the engine's seam
(``universality.engine.families.Family``).

An imported suite is a run directory like a trained one: config.json, runs.json, an Orbax checkpoint of the
stacked parameters (at step 0: nothing is trained here), an empty metrics log. Only the trainer is missing:
``make_task`` refuses, and the view restores the parameters without a train state
(``universality.engine.families.imported.view``). ``universality.engine.families.imported.suite`` writes one.

Config sections::

  task.suite             JSON list, one entry per run in import order: {"model": the directory's name,
                         "name_or_path": config.json's ``_name_or_path``, "seed_label", "path"}
  task.special_ids       comma-separated BOS / EOS / pad ids of the first model's config (dropped from the
                         statistics with ``analysis.drop``)
  model.name             "imported"
  model.imported.*       the architecture (``universality.engine.families.imported.models.Spec``)
  analysis.*             ``ANALYSIS_SETTINGS``: the token corpus the pass reads and the pass's settings

Every run is one cohort (``imported/<arch>``): the models differ only in their seeds.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, NamedTuple

import ml_collections
import numpy as np

from universality.engine import families
from universality.engine.families.imported import models

ANALYSIS_SETTINGS = {
    "corpus": "",                 # token ids (.bin, .npy) or text (a file or directory: needs a tokenizer)
    "tokenizer": "",              # tokenizer.json for text; "": the first model directory's, if it has one
    "dtype": "auto",              # of a .bin: uint16 | uint32 | auto (uint16 when the vocabulary fits)
    "tokens": 1 << 17,            # tokens every run reads (rounded down to whole windows)
    "context": 0,                 # tokens per window; 0: the model's context, at most 512 (Gurnee et al.)
    "batch_windows": 4,           # windows per forward pass
    "forward_dtype": "float32",   # the forward's dtype: float32 | bfloat16 | float16 (statistics in float32)
    "drop": "bos,pad,newline",    # tokens left out of every statistic (Gurnee et al. dropped these)
    "universal_threshold": 0.5,   # mean excess correlation above which a neuron is universal
    "kurtosis_threshold": 10.0,   # W_U kurtosis above which a neuron predicts or suppresses
    "unigram_classes": 256,       # most frequent tokens kept as categories of the token statistics
    "entropy_null_dims": 0,       # W_U's null space: its last singular directions; 0: d_model / 64
    "entropy_null_share": 0.5,    # entropy neuron: more than this share of ‖w_out‖² in that null space
    "entropy_norm_pct": 90.0,     # and ‖w_out‖ above this percentile of its layer
    "family_threshold": 0.5,      # token / previous-token / position neuron: that share of variance explained
    "attn_candidates": 8,         # neurons per layer (largest ‖w_out‖) ablated to find attention deactivation
    "attn_windows": 4,            # windows of the sample they are ablated on
    "attn_threshold": 0.05,       # attention-deactivating: ablating it lowers a later head's attention to the
                                  # first token by more than this (mean over the sample's queries)
    "memory_gb": 1.0,             # budget of the correlation's co-moment tiles
    "screen": "auto",             # screened correlation (kernels/screen.py): auto | on | off
    "screen_tokens": 1 << 15,     # T₁: the screen's sample of tokens
    "screen_z": 5.0,              # its margin, in standard errors of a sample correlation
    "screen_k": 1,                # candidates kept per neuron and model at least
}


def cohort_name(row: Mapping[str, Any]) -> str:
  return str(row["cohort"])


def seed_label(name: str, k: int) -> str:
  """The seed in a model's directory name (``...-x21``, ``...-seed3``, PolyPythias' ``...-data-seed3`` and
  ``...-weight-seed3``), else ``run<k>``."""
  m = re.search(r"(?:^|[-_.])((?:(?:data|weight)[-_])?(?:seed|x)\d+)$", name)
  return m.group(1) if m else f"run{k}"


def suite_of(cfg) -> list[dict]:
  """The suite's entries (``task.suite``), checked."""
  try:
    suite = json.loads(cfg.task.suite)
  except ValueError:
    raise ValueError("config.task.suite: not a JSON list") from None
  keys = {"model", "name_or_path", "seed_label", "path"}
  if not isinstance(suite, list) or not all(isinstance(e, dict) and set(e) == keys for e in suite):
    raise ValueError(f"config.task.suite: expected a list of objects with keys {sorted(keys)}")
  return suite


def special_ids(cfg) -> list[int]:
  text = str(cfg.task.special_ids).strip()
  return [int(x) for x in text.split(",") if x.strip()] if text else []


class ImportedFamily(families.Family):
  """Models trained elsewhere; see the module docstring."""
  name = "imported"
  trained = False
  metrics = ()
  progress_metric = "none"
  analysis_module = "universality.engine.families.imported.analysis"
  report_module = "universality.engine.families.imported.report"
  view_module = "universality.engine.families.imported.view"

  def add_config(self, cfg) -> None:
    cfg.task = ml_collections.ConfigDict()
    cfg.task.suite = "[]"
    cfg.task.special_ids = ""
    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = "imported"
    cfg.model.imported = ml_collections.ConfigDict(default_spec_section())
    cfg.steps = 1
    cfg.eval_every = 1
    cfg.num_checkpoints = 2
    cfg.analysis.update(ANALYSIS_SETTINGS)

  def validate(self, cfg) -> None:
    suite = suite_of(cfg)
    if len(suite) != int(cfg.seeds):
      raise ValueError(f"config.seeds: {cfg.seeds}, but task.suite lists {len(suite)} models")
    if cfg.model.name != "imported":
      raise ValueError(f"config.model.name: must be 'imported', got {cfg.model.name!r}")
    spec = models.spec_of(cfg.model.imported)
    if spec.arch not in models.ARCHITECTURES:
      raise ValueError(f"config.model.imported.arch: must be one of {models.ARCHITECTURES}, got "
                       f"{spec.arch!r}")
    try:
      special_ids(cfg)
    except ValueError:
      raise ValueError(f"config.task.special_ids: expected comma-separated ids, got {cfg.task.special_ids!r}")

  def runs(self, cfg) -> list[dict]:
    arch = str(cfg.model.imported.arch)
    out = []
    for k, entry in enumerate(suite_of(cfg)):
      out.append(dict(seed=k, base_seed=int(cfg.seed), lr=0.0, weight_decay=0.0, model=entry["model"],
                      name_or_path=entry["name_or_path"], seed_label=entry["seed_label"],
                      cohort=f"imported/{arch}", name=f"imported/{entry['model']}"))
    return out

  def n_runs(self, cfg) -> int:
    return len(suite_of(cfg))

  def footprint(self, cfg) -> families.Footprint:
    spec = models.spec_of(cfg.model.imported)
    return families.Footprint(params=models.abstract_params(spec), data=0, step=0)

  def cohort_name(self, row) -> str:
    return cohort_name(row)

  def run_key(self, row):
    seq = np.random.SeedSequence([int(row["base_seed"]), int(row["seed"]), 0x1A7])
    return seq.generate_state(2, np.uint32)

  def make_task(self, cfg, rows) -> families.Task:
    raise ValueError("an imported suite holds models trained elsewhere: it is not trained here (open it "
                     "with universality.engine.replay.open, analyse it with "
                     "universality.experiments.import_models)")

  def check_inputs(self, data, inputs, n_runs: int):
    raise ValueError("an imported suite has no trainer: use its view's apply(tokens)")

  def generalised_mask(self, metrics) -> np.ndarray:
    return np.zeros(np.shape(next(iter(metrics.values()), [])), bool)

  def generalised(self, final) -> bool:
    return False

  def describe(self, cfg) -> list[str]:
    spec = models.spec_of(cfg.model.imported)
    suite = suite_of(cfg)
    kind = {"gpt2": "GPT-2", "neox": "GPT-NeoX"}[spec.arch]
    extra = (f"rotary on {spec.rotary_dims} of {spec.d_head} head dimensions, "
             f"{'parallel' if spec.parallel_residual else 'sequential'} residual"
             if spec.arch == "neox" else "learned positions")
    names = ", ".join(f"`{e['model']}` ({e['seed_label']})" for e in suite)
    return [f"- Models: {len(suite)} imported {kind} models: {names}",
            f"- Architecture: {spec.n_layers} layers, d_model {spec.d_model}, {spec.n_heads} heads, d_mlp "
            f"{spec.d_mlp} neurons per layer ({spec.n_layers * spec.d_mlp:,} per model), vocabulary "
            f"{spec.vocab:,}, context {spec.context}; {extra}; "
            f"{'tied' if spec.tied else 'untied'} unembedding"]


def default_spec_section() -> dict:
  """The config section of a default ``models.Spec`` (a one-layer GPT-2 shape until an import fills it)."""
  spec = models.Spec(arch="gpt2", vocab=1, n_layers=1, d_model=1, n_heads=1, d_mlp=1, context=1)
  return {name: getattr(spec, name) for name in models.FIELDS}


def spec_section(spec: models.Spec) -> dict:
  return {name: getattr(spec, name) for name in models.FIELDS}


def abstract_state(cfg, n_runs: int):
  """The checkpointed tree of an imported suite: ``ImportedState`` of float32 parameters ``[S, ...]``."""
  return ImportedState(params=models.abstract_params(models.spec_of(cfg.model.imported), n_runs))


class ImportedState(NamedTuple):
  """The checkpointed state: only the stacked parameters (there is no optimiser)."""
  params: Any


FAMILY = ImportedFamily()
