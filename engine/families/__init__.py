"""Task families: what a run learns, and the one place the engine plugs a family in.

A family is a package ``universality.engine.families.<name>`` whose ``FAMILY`` is a ``Family``. The trainer,
launcher, checkpoints, analysis driver, report and notebook view speak to a study only through it:

  config      ``add_config(cfg)`` adds the family's ``task`` and ``model`` sections; ``validate(cfg)``
  sweep       ``runs(cfg)``: one row per run (``seed``, ``base_seed``, ``lr``, ``weight_decay``, the task
              fields, ``cohort``, ``name``); rows that differ only in ``seed`` share a cohort
  size        ``n_runs(cfg)`` and ``footprint(cfg)``: how many runs and what one of them holds, from the
              config alone (universality.engine.budget checks a launch against the memory it has before building it)
  buckets     ``buckets(cfg)`` -> ``[(name, cfg_b)]``: the study split into programs trained one after another
              (each compiled once), each ``cfg_b`` a study of its own; by default one bucket, ``cfg`` itself
  task        ``make_task(cfg, rows)`` -> a ``Task``: the runs' data stacked over S, data shared by every run
              (e.g. a corpus, replicated on every device rather than copied per run) and the pure per-run
              functions the trainer vmaps (init, loss and gradients of a step, evaluation, apply)
  analysis    ``analysis_module``: a module with ``SETTINGS`` (named settings and defaults) and
              ``analyze_cohort(view, params_by_step, key, settings, batch_size)`` -> the cohort's JSON-ready
              ``{"task", "aggregate", "runs"}`` (universality.engine.analysis.driver calls it once per cohort)
  report      ``report_module``: ``settings_line(settings, generalised_threshold)`` and
              ``sections(view, summary, save)`` -> markdown lines of the family's report sections
  notebook    ``view_module``: a module whose ``View`` (an ``universality.engine.replay.Run``) opens its run directories

The hooks are named by module path so that the trainer never imports analysis, plotting or Orbax code.

Adding a family: see "Adding a task family" in README.md.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from universality.engine import fields, optim

NAMES = ("group", "lm", "vision", "imported")


class Task(NamedTuple):
  """The runs of one sweep as the trainer sees them (everything per run; the trainer vmaps over S).

  Attributes:
    data: a pytree of host numpy arrays with a leading axis over the (padded) runs; ``data_one`` below is
      one run's slice of it, as traced values.
    init: ``(key, data_one, shared) -> params``.
    loss_and_grads: ``(params, key, step, data_one, shared) -> (loss, grads)`` of one optimiser step; the
      step's minibatch is drawn from ``fold_in(key, step)`` so a resumed run draws the same one.
    evaluate: ``(params, data_one, shared) -> {metric: scalar}`` with the keys ``metrics``.
    apply: ``(params, inputs_one, data_one, shared) -> (logits, activations)``: the model on given inputs.
    metrics: metric names logged at every evaluation (the trainer adds "diverged").
    shared: a pytree of host numpy arrays that every run reads (no run axis), replicated on every device.
  """
  data: Any
  init: Callable
  loss_and_grads: Callable
  evaluate: Callable
  apply: Callable
  metrics: tuple[str, ...]
  shared: Any = ()


class Footprint(NamedTuple):
  """What one run of a sweep holds, in bytes, estimated from the config without building any array.

  Attributes:
    params: one run's parameters as shapes (``jax.eval_shape`` of the model's init); the train state holds
      them and the optimiser's state, whose size ``universality.engine.budget`` takes from them.
    data: one run's task data (padded to the largest run of the sweep).
    step: the live activations of one training step or one evaluation of one run, whichever is larger.
    shared: the data every run reads (``Task.shared``), held once per device and once on the host.
    host_shared: what the host holds of it besides the devices' copies, where that differs from ``shared``
      (None: as much), e.g. a corpus memory-mapped from its file, which the kernel may drop from RAM.
  """
  params: Any
  data: int
  step: int
  shared: int = 0
  host_shared: int | None = None


class Family:
  """The seam. Subclasses implement every method; see the module docstring."""
  name: str = ""
  metrics: tuple[str, ...] = ()         # logged at every evaluation (the trainer adds "diverged")
  analysis_module: str = ""
  report_module: str = ""
  view_module: str = ""
  progress_metric: str = "test_acc"     # shown by the progress bar
  generalised_threshold: float = 0.99   # a run has generalised when progress_metric reaches this
  trained: bool = True                  # False: models trained elsewhere (no schedule, optimiser, metrics)

  def add_config(self, cfg) -> None:
    raise NotImplementedError

  def validate(self, cfg) -> None:
    raise NotImplementedError

  def resolve(self, cfg):
    """``cfg`` with the fields the launch derives from the outside world filled in (e.g. the fingerprint
    of a corpus read from disk), so that config.json pins them; by default ``cfg`` itself."""
    return cfg

  def runs(self, cfg) -> list[dict]:
    raise NotImplementedError

  def n_runs(self, cfg) -> int:
    """``len(runs(cfg))``; families override it to count without building a row per run."""
    return len(self.runs(cfg))

  def buckets(self, cfg) -> list[tuple[str, Any]]:
    """The study as buckets ``[(name, cfg_b)]``, each trained as one program (compiled once).

    Each ``cfg_b`` is a whole study config whose own buckets are ``[(name, cfg_b)]``, so a bucket launched
    alone writes the run directory the bucket writes inside its study (universality.engine.rundir); the rule
    that splits a study must be a function of the study's identity (``universality.engine.config.identity``).
    A family whose runs all share one program keeps this default: one bucket, ``cfg`` itself.
    """
    return [(self.name, cfg)]

  def migrate(self, stored: dict, version: int) -> dict:
    """A config.json of run-directory format ``version`` (``universality.engine.rundir.read_config``) as
    today's nested config of this family; by default as it is."""
    return stored

  def param_roles(self, params) -> Any:
    """The role of every parameter (``universality.engine.optim.ROLES``: hidden, embed, unembed, vector),
    a tree like ``params`` (arrays or shapes); Muon orthogonalises the roles ``opt.muon.params`` names.
    By default every matrix is ``hidden`` and everything else a ``vector``; families name their
    embeddings and output heads."""
    return jax.tree.map(lambda p: "hidden" if len(p.shape) >= 2 else "vector", params)

  def footprint(self, cfg) -> Footprint | None:
    """One run's ``Footprint`` from the config alone; None: not estimated (the size check is skipped)."""
    return None

  def cohort_name(self, row: Mapping[str, Any]) -> str:
    """The name of a run's cohort: every field of its row but the seed."""
    raise NotImplementedError

  def run_key(self, row: Mapping[str, Any]):
    """The PRNG key (uint32 [2]) of a run: a function of its row's seed fields and task only."""
    raise NotImplementedError

  def make_task(self, cfg, rows) -> Task:
    raise NotImplementedError

  def check_inputs(self, data, inputs: tuple, n_runs: int) -> Any:
    """Host inputs of ``Trainer.apply`` checked against the runs' data: a pytree stacked over ``n_runs``."""
    raise NotImplementedError

  def generalised_mask(self, metrics: Mapping[str, Any]) -> np.ndarray:
    """bool ``[S]``: which runs have generalised, from metrics given as arrays over runs (NaN: missing)."""
    value = np.asarray(metrics[self.progress_metric], np.float64)
    return np.nan_to_num(value, nan=-np.inf) >= self.generalised_threshold

  def generalised(self, final: Mapping[str, Any] | None) -> bool:
    """Whether one run has generalised, from its final logged metrics (None: a missing value)."""
    if final is None:
      return False
    as_arrays = {k: [np.nan if v is None else v] for k, v in final.items()}
    return bool(self.generalised_mask(as_arrays)[0]) if self.progress_metric in as_arrays else False

  def describe(self, cfg) -> list[str]:
    """Markdown bullet lines describing the task and model of ``cfg`` (the report's first section)."""
    raise NotImplementedError


def buckets(cfg, family: Family | None = None) -> list[tuple[str, Any]]:
  """The programs of a study, ``[(name, cfg_b)]``, trained one after another.

  Optimisers differ in state structure, so a study naming several (``opt.name = "adamw,muon"``) trains one
  bucket per optimiser, each split further by its family (``Family.buckets``) and named
  ``<optimiser>-<family bucket>``; with one optimiser the family's buckets are the study's. Each ``cfg_b``
  names one optimiser, so launched alone it is one bucket again (its name then lacks the prefix).
  ``family``: the study's family when the caller has it (default: looked up from ``cfg.family``).
  """
  family = family or get(cfg.family)
  names = optim.names(cfg.opt)
  if len(names) == 1:
    return family.buckets(cfg)
  out = []
  for name in names:
    cfg_o = cfg.copy_and_resolve_references()
    cfg_o.opt.name = name
    out += [(f"{name}-{b}", cfg_b) for b, cfg_b in family.buckets(cfg_o)]
  return out


def key_of(*entropy: int) -> np.ndarray:
  """A uint32 [2] PRNG key from integers (NumPy's SeedSequence: no collisions between nearby seeds)."""
  return np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)


def data_key_of(cfg, row) -> np.ndarray:
  """The key of a run's minibatch stream (and augmentation): shared by every seed of a cohort, so that seeds
  differ only in their initialisation, unless ``task.vary_data_order``."""
  if cfg.task.vary_data_order:
    return key_of(int(row["base_seed"]), int(row["seed"]), 0xDA7A)
  return key_of(int(row["base_seed"]), 0xDA7A)


def optimiser_sweep(cfg, cohort_name: Callable[[dict], str], run_name: Callable[[dict], str]) -> list[dict]:
  """The rows of a family whose task has no sweep axes of its own: one per (lr, weight decay, seed number),
  seeds innermost, each with ``seed``, ``base_seed``, ``lr``, ``weight_decay``, ``cohort`` and ``name``."""
  out = []
  for lr in fields.parse_floats(cfg.opt.lr, "opt.lr"):
    for wd in fields.parse_floats(cfg.opt.weight_decay, "opt.weight_decay"):
      for k in fields.seed_numbers(cfg):
        row = dict(seed=k, base_seed=int(cfg.seed), lr=lr, weight_decay=wd)
        row["cohort"] = cohort_name(row)
        row["name"] = run_name(row)
        out.append(row)
  return out


def optimiser_sweep_size(cfg) -> int:
  """``len(optimiser_sweep(cfg, ...))`` without building the rows."""
  return (len(fields.parse_floats(cfg.opt.lr, "opt.lr"))
          * len(fields.parse_floats(cfg.opt.weight_decay, "opt.weight_decay")) * int(cfg.seeds))


def get(name: str) -> Family:
  """The family called ``name`` (one of ``NAMES``)."""
  if name not in NAMES:
    raise ValueError(f"config.family: must be one of {NAMES}, got {name!r}")
  return importlib.import_module(f"universality.engine.families.{name}").FAMILY
