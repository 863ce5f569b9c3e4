"""Study configuration: one nested ``ml_collections.ConfigDict`` describes a whole sweep of any task family.

Sections by concern::

  family                 the task family (universality.engine.families): "group" (composition in finite groups) or "lm"
                         (byte-level language modelling)
  seeds, seed, seed_offset   seeds per grid point, the base seed, the first seed number
  steps, eval_every, batch_size, num_checkpoints   the schedule, shared by every run
  task.*                 the family's task and its sweep axes (e.g. task.groups, task.train_frac)
  model.name, model.<name>.*   the architecture and the widths of each of the family's models
  opt.*                  the optimiser (universality.engine.optim): opt.name (adamw, sgd, muon; several
                         train as one bucket each), opt.lr and opt.weight_decay (sweep axes) and the
                         optimiser's own fields, gradient clipping and the lr schedule (shared)
  exec.*                 how to run, not what: changing them never changes a result beyond float rounding
                         and never stops a relaunch from resuming (they are not part of config.json)
  analysis.*             the family's analysis settings (e.g. held-out tokens per run): they change the
                         analysis, not the training, so they are not part of config.json either; the
                         settings used are recorded in analysis/summary.json

``runs(cfg)`` flattens the sweep into the leading ``S`` axis (its order is the family's, seeds innermost).
A run's initial parameters, data and minibatch stream depend only on its family's task fields, the base seed
and its seed number ``seed_offset + k``, never on its position in the grid: the single run
``seeds=1, seed_offset=k`` reproduces member ``k`` of any sweep with the same base seed.

Runs that differ only in their seed number form a *cohort*; cross-seed statistics are computed per cohort.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import ml_collections

from universality.engine import families, optim, rundir
from universality.engine.fields import int_field, parse_floats, seed_numbers  # noqa: F401 - re-exported

EXECUTION = "exec"          # how to run: not part of a study's identity
ANALYSIS = "analysis"       # the family's analysis settings: not part of a study's identity either


def default_config(family: str | families.Family = "group") -> ml_collections.ConfigDict:
  """The defaults of ``family`` (a name or the family itself; for "group": the Chughtai et al. (2023) MLP on
  S5, full-batch AdamW; for "lm": a 2-layer byte transformer on the Python standard library, minibatch AdamW
  with a cosine schedule)."""
  if isinstance(family, str):
    family = families.get(family)
  cfg = ml_collections.ConfigDict()
  cfg.family = family.name
  cfg.seeds = 1              # seeds per grid point (the innermost sweep axis)
  cfg.seed = 0               # base seed: every random choice derives from it
  cfg.seed_offset = 0        # seed numbers are seed_offset .. seed_offset + seeds - 1 (pick one seed of a sweep)
  cfg.steps = 1000           # optimiser steps per run
  cfg.eval_every = 100       # steps between metric evaluations; must divide steps
  cfg.batch_size = 0         # 0: full batch; otherwise examples sampled per step with fold_in(key, step)
  cfg.num_checkpoints = 24   # log-spaced checkpoints (plus step 0 and the last step) for learning order
  optim.add_config(cfg)          # the optimiser and its sweep axes opt.lr, opt.weight_decay
  cfg[EXECUTION] = ml_collections.ConfigDict()
  cfg[EXECUTION].run_chunk = 0   # runs vmapped together on each device; 0: auto (1 on CPU, all on GPU/TPU;
                                 # benchmarks/README.md)
  cfg[EXECUTION].analyze = True  # run the analysis and write the report when training ends
  cfg[ANALYSIS] = ml_collections.ConfigDict()  # filled by the family (its analysis settings)
  cfg[EXECUTION].memory_budget_gb = 0.0  # memory a launch may use (universality.engine.budget): per device on accelerators,
                                         # host RAM on the CPU; 0: what the machine reports
  # The rolling resume checkpoint (checkpoints_resume/, the whole train state, only the newest kept), so that a
  # crash loses bounded work: at the end of the first eval interval that reaches a multiple of
  # resume_every_steps, and of the first interval ending resume_every_minutes after the last checkpoint of
  # either kind; 0 turns a trigger off. SIGTERM and SIGINT always write one.
  cfg[EXECUTION].resume_every_steps = 0
  cfg[EXECUTION].resume_every_minutes = 10.0
  cfg[EXECUTION].tensorboard = False  # also write every run's metrics as TensorBoard scalars
                                      # (universality.engine.events)
  family.add_config(cfg)
  return cfg


def _check_fields(cfg, reference, prefix: str = "") -> None:
  """Every field of ``reference`` is present in ``cfg`` (recursively)."""
  for k, v in reference.items():
    if k not in cfg:
      raise ValueError(f"config: missing field {prefix}{k}")
    if isinstance(v, ml_collections.ConfigDict):
      if not isinstance(cfg[k], ml_collections.ConfigDict):
        raise ValueError(f"config.{prefix}{k}: expected a section, got {cfg[k]!r}")
      _check_fields(cfg[k], v, f"{prefix}{k}.")


def validate(cfg) -> families.Family:
  """Raises ``ValueError`` with a one-line message naming the first bad field of ``cfg``; returns its family."""
  if "family" not in cfg or cfg.family not in families.NAMES:
    raise ValueError(f"config.family: must be one of {families.NAMES}, got {cfg.get('family')!r}")
  family = families.get(cfg.family)
  _check_fields(cfg, default_config(family))
  int_field(cfg, "seeds", 1)
  int_field(cfg, "seed", 0)
  int_field(cfg, "seed_offset", 0)
  for name in ("steps", "eval_every"):
    int_field(cfg, name, 1)
  int_field(cfg, "batch_size", 0)
  int_field(cfg, "num_checkpoints", 2)
  if cfg.steps % cfg.eval_every:
    raise ValueError(f"config.eval_every: {cfg.eval_every} does not divide steps={cfg.steps}")
  for v in parse_floats(cfg.opt.lr, "opt.lr"):
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"config.opt.lr: learning rates must be finite and > 0, got {v}")
  for v in parse_floats(cfg.opt.weight_decay, "opt.weight_decay"):
    if not (v >= 0 and math.isfinite(v)):
      raise ValueError(f"config.opt.weight_decay: must be finite and >= 0, got {v}")
  optim.validate(cfg.opt)
  int_field(cfg[EXECUTION], "run_chunk", 0, f"{EXECUTION}.")
  if not isinstance(cfg[EXECUTION].analyze, bool):
    raise ValueError(f"config.{EXECUTION}.analyze: expected True or False, got {cfg[EXECUTION].analyze!r}")
  budget = cfg[EXECUTION].memory_budget_gb
  if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 or math.isinf(budget):
    raise ValueError(f"config.{EXECUTION}.memory_budget_gb: expected a finite number of GB >= 0 (0: what the "
                     f"machine reports), got {budget!r}")
  if not isinstance(cfg[EXECUTION].tensorboard, bool):
    raise ValueError(f"config.{EXECUTION}.tensorboard: expected True or False, got {cfg[EXECUTION].tensorboard!r}")
  int_field(cfg[EXECUTION], "resume_every_steps", 0, f"{EXECUTION}.")
  minutes = cfg[EXECUTION].resume_every_minutes
  if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0 or math.isinf(minutes):
    raise ValueError(f"config.{EXECUTION}.resume_every_minutes: expected a finite number of minutes >= 0 (0: "
                     f"off), got {minutes!r}")
  _check_bounds(cfg)
  family.validate(cfg)
  return family


# Upper bounds of the schedule, checked before anything is sized from it: more checkpoints than this is no
# learning-order study but a typo (each one is the whole state on disk), and step counters are int32.
MAX_CHECKPOINTS = 10_000
MAX_STEPS = 2**31 - 1


def _check_bounds(cfg) -> None:
  if cfg.num_checkpoints > MAX_CHECKPOINTS:
    raise ValueError(f"config.num_checkpoints: at most {MAX_CHECKPOINTS}, got {cfg.num_checkpoints}")
  if cfg.steps > MAX_STEPS:
    raise ValueError(f"config.steps: at most {MAX_STEPS}, got {cfg.steps}")


def runs(cfg) -> list[dict]:
  """The flattened sweep: one row per run, in the family's order (seeds innermost).

  Every row holds ``seed`` (the seed number k), ``base_seed``, ``lr``, ``weight_decay``, the family's task
  fields, ``cohort`` (the name of the run's cohort: every field but the seed) and ``name``.
  """
  return validate(cfg).runs(cfg)


class Study(NamedTuple):
  """A study checked once: its config, its family and the programs it trains (``families.buckets``).

  A launch builds it once (``study``) and passes it along, so that nothing below the launcher validates the
  config again or looks its family up by name.
  """
  cfg: Any
  family: families.Family
  programs: tuple[tuple[str, Any], ...]

  def n_runs(self) -> int:
    return sum(self.family.n_runs(cfg_b) for _, cfg_b in self.programs)

  def resolved(self) -> Study:
    """The study with the fields its family derives from the outside world filled in (``Family.resolve``:
    e.g. a corpus' fingerprint), its programs split again from the resolved config when it changed."""
    cfg = self.family.resolve(self.cfg)
    if cfg is self.cfg:
      return self
    return Study(cfg, self.family, tuple(families.buckets(cfg, self.family)))


def study(cfg) -> Study:
  """``cfg`` validated (``validate``: a one-line ``ValueError`` naming the first bad field), as a ``Study``;
  a ``Study`` is returned as it is."""
  if isinstance(cfg, Study):
    return cfg
  family = validate(cfg)
  return Study(cfg, family, tuple(families.buckets(cfg, family)))


def identity(cfg) -> dict:
  """The study's identity as plain JSON types: the config without its execution and analysis sections
  (config.json)."""
  out = json.loads(cfg.to_json_best_effort(sort_keys=True))
  out.pop(EXECUTION, None)
  out.pop(ANALYSIS, None)
  return out


# ---------------------------------------------------------------------------------------------------
# config.json: what a run directory holds, read back into today's config.


def flatten(d: dict, prefix: str = "") -> dict:
  """A nested config dict as ``{"task.groups": ..., ...}`` (dotted field names, as ``--config.*`` flags)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def field_names() -> list[str]:
  """Every dotted field of every family's config (what ``--config.FIELD`` may name)."""
  return sorted({f for name in families.NAMES for f in flatten(default_config(name).to_dict())})


def with_defaults(stored: dict, defaults: dict) -> dict:
  """``stored`` with the fields it lacks taken from ``defaults`` (recursively): a field added to the engine
  after a run directory was written reads as its default, which reproduces the engine's earlier behaviour."""
  out = dict(stored)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = with_defaults(out[k], v)
  return out


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two nested config dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += differences(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(prefix + k)
  return out


def stored(workdir: str) -> dict:
  """The study config.json of ``workdir`` holds, migrated to today's nesting by its family (format 1 was
  the group family's alone) but without today's defaults filled in."""
  version, data = rundir.read_config(workdir)
  family = "group" if version == 1 else data.get("family")
  if family not in families.NAMES:
    raise rundir.RunDirError(f"{workdir}: unknown task family {family!r} in {rundir.CONFIG}")
  return families.get(family).migrate(data, version)


def load(workdir: str) -> ml_collections.ConfigDict:
  """config.json of ``workdir`` as a locked ConfigDict: today's defaults of its family (execution and
  analysis sections included, which config.json does not hold) overridden by every stored field."""
  data = stored(workdir)
  cfg = default_config(data["family"])
  cfg.update_from_flattened_dict(flatten(data))
  cfg.lock()
  return cfg


def check_workdir(workdir: str, cfg) -> bool:
  """Checks that an existing config.json (its missing fields read as today's defaults) holds the study
  ``cfg``; it is never rewritten. True when it exists, False when there is none.

  A launch calls this first and writes config.json only once it is known to start, so a refused or crashed
  launch leaves no config.json that would bind the directory to a study that never ran.
  """
  if not rundir.is_rundir(workdir):
    return False
  old = with_defaults(stored(workdir), identity(default_config(cfg.family)))
  diff = differences(old, identity(cfg))
  if diff:
    raise rundir.RunDirError(f"workdir {workdir} belongs to a different config (differs in: "
                             f"{', '.join(diff)}); use a new workdir or the same config")
  return True
