"""Study configuration: one nested ``ml_collections.ConfigDict`` describes a whole sweep of any task family.

Sections by concern::

  family                 the task family (universality.engine.families): "group" (composition in finite groups) or "lm"
                         (byte-level language modelling)
  seeds, seed, seed_offset   seeds per grid point, the base seed, the first seed number
  steps, eval_every, batch_size, num_checkpoints   the schedule, shared by every run
  task.*                 the family's task and its sweep axes (e.g. task.groups, task.train_frac)
  model.name, model.<name>.*   the architecture and the widths of each of the family's models
  opt.*                  AdamW: opt.lr and opt.weight_decay are sweep axes; betas, eps, gradient clipping
                         and the lr schedule (warm-up, cosine decay) are shared
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

import ml_collections

from universality.engine import families

EXECUTION = "exec"          # how to run: not part of a study's identity
ANALYSIS = "analysis"       # the family's analysis settings: not part of a study's identity either
SCHEDULES = ("constant", "cosine")


def default_config(family: str = "group") -> ml_collections.ConfigDict:
  """The defaults of ``family`` (for "group": the Chughtai et al. (2023) MLP on S5, full-batch AdamW; for
  "lm": a 2-layer byte transformer on the Python standard library, minibatch AdamW with a cosine schedule)."""
  cfg = ml_collections.ConfigDict()
  cfg.family = family
  cfg.seeds = 1              # seeds per grid point (the innermost sweep axis)
  cfg.seed = 0               # base seed: every random choice derives from it
  cfg.seed_offset = 0        # seed numbers are seed_offset .. seed_offset + seeds - 1 (pick one seed of a sweep)
  cfg.steps = 1000           # optimiser steps per run
  cfg.eval_every = 100       # steps between metric evaluations; must divide steps
  cfg.batch_size = 0         # 0: full batch; otherwise examples sampled per step with fold_in(key, step)
  cfg.num_checkpoints = 24   # log-spaced checkpoints (plus step 0 and the last step) for learning order
  # AdamW with decoupled weight decay (decay step = lr · weight_decay · param, as torch.optim.AdamW).
  cfg.opt = ml_collections.ConfigDict()
  cfg.opt.lr = "1e-3"            # comma-separated learning rates (a sweep axis)
  cfg.opt.weight_decay = "1.0"   # comma-separated weight decays (a sweep axis)
  cfg.opt.b1 = 0.9
  cfg.opt.b2 = 0.98
  cfg.opt.eps = 1e-8
  cfg.opt.clip_norm = 0.0        # clip each run's gradient to this global norm; 0: no clipping
  cfg.opt.warmup_steps = 0       # linear warm-up of the learning rate from 0 over these steps
  cfg.opt.schedule = "constant"  # after warm-up: "constant", or "cosine" decay to final_lr_frac · lr
  cfg.opt.final_lr_frac = 0.1    # the cosine schedule's last learning rate, as a fraction of the peak
  cfg[EXECUTION] = ml_collections.ConfigDict()
  cfg[EXECUTION].run_chunk = 0   # runs vmapped together on each device; 0: auto (1 on CPU, all on GPU/TPU;
                                 # benchmarks/README.md)
  cfg[EXECUTION].analyze = True  # run the analysis and write the report when training ends
  cfg[ANALYSIS] = ml_collections.ConfigDict()  # filled by the family (none for group composition)
  cfg[EXECUTION].memory_budget_gb = 0.0  # memory a launch may use (universality.engine.budget): per device on accelerators,
                                         # host RAM on the CPU; 0: what the machine reports
  # The rolling resume checkpoint (checkpoints_resume/, the whole train state, only the newest kept), so that a
  # crash loses bounded work: at the end of the first eval interval that reaches a multiple of
  # resume_every_steps, and of the first interval ending resume_every_minutes after the last checkpoint of
  # either kind; 0 turns a trigger off. SIGTERM and SIGINT always write one.
  cfg[EXECUTION].resume_every_steps = 0
  cfg[EXECUTION].resume_every_minutes = 10.0
  cfg[EXECUTION].tensorboard = False  # also write every run's metrics as TensorBoard scalars (universality.engine.events)
  families.get(family).add_config(cfg)
  return cfg


def parse_floats(text, name: str) -> tuple[float, ...]:
  """``"1e-3, 3e-3"`` -> ``(0.001, 0.003)``; a bare number is accepted too."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    values = (float(text),)
  elif isinstance(text, str):
    try:
      values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
      raise ValueError(f"config.{name}: cannot read {text!r} as comma-separated floats") from None
  else:
    raise ValueError(f"config.{name}: expected comma-separated floats, got {type(text).__name__}")
  if not values:
    raise ValueError(f"config.{name}: empty list")
  if len(set(values)) != len(values):
    raise ValueError(f"config.{name}: repeated values in {text!r}")
  return values


def int_field(section, name: str, minimum: int, prefix: str = "") -> int:
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"config.{prefix}{name}: expected an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"config.{prefix}{name}: must be >= {minimum}, got {value}")
  return value


def _check_fields(cfg, reference, prefix: str = "") -> None:
  """Every field of ``reference`` is present in ``cfg`` (recursively)."""
  for k, v in reference.items():
    if k not in cfg:
      raise ValueError(f"config: missing field {prefix}{k}")
    if isinstance(v, ml_collections.ConfigDict):
      if not isinstance(cfg[k], ml_collections.ConfigDict):
        raise ValueError(f"config.{prefix}{k}: expected a section, got {cfg[k]!r}")
      _check_fields(cfg[k], v, f"{prefix}{k}.")


def validate(cfg) -> None:
  """Raises ``ValueError`` with a one-line message naming the first bad field of ``cfg``."""
  if "family" not in cfg or cfg.family not in families.NAMES:
    raise ValueError(f"config.family: must be one of {families.NAMES}, got {cfg.get('family')!r}")
  _check_fields(cfg, default_config(cfg.family))
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
  for name in ("b1", "b2"):
    if not 0 <= float(cfg.opt[name]) < 1:
      raise ValueError(f"config.opt.{name}: must lie in [0, 1), got {cfg.opt[name]}")
  if not float(cfg.opt.eps) > 0:
    raise ValueError(f"config.opt.eps: must be > 0, got {cfg.opt.eps}")
  if not (math.isfinite(float(cfg.opt.clip_norm)) and float(cfg.opt.clip_norm) >= 0):
    raise ValueError(f"config.opt.clip_norm: must be finite and >= 0 (0: no clipping), got {cfg.opt.clip_norm}")
  int_field(cfg.opt, "warmup_steps", 0, "opt.")
  if cfg.opt.schedule not in SCHEDULES:
    raise ValueError(f"config.opt.schedule: must be one of {SCHEDULES}, got {cfg.opt.schedule!r}")
  if not 0 <= float(cfg.opt.final_lr_frac) <= 1:
    raise ValueError(f"config.opt.final_lr_frac: must lie in [0, 1], got {cfg.opt.final_lr_frac}")
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
  families.get(cfg.family).validate(cfg)


# Upper bounds of the schedule, checked before anything is sized from it: more checkpoints than this is no
# learning-order study but a typo (each one is the whole state on disk), and step counters are int32.
MAX_CHECKPOINTS = 10_000
MAX_STEPS = 2**31 - 1


def _check_bounds(cfg) -> None:
  if cfg.num_checkpoints > MAX_CHECKPOINTS:
    raise ValueError(f"config.num_checkpoints: at most {MAX_CHECKPOINTS}, got {cfg.num_checkpoints}")
  if cfg.steps > MAX_STEPS:
    raise ValueError(f"config.steps: at most {MAX_STEPS}, got {cfg.steps}")


def seed_numbers(cfg) -> range:
  return range(int(cfg.seed_offset), int(cfg.seed_offset) + int(cfg.seeds))


def runs(cfg) -> list[dict]:
  """The flattened sweep: one row per run, in the family's order (seeds innermost).

  Every row holds ``seed`` (the seed number k), ``base_seed``, ``lr``, ``weight_decay``, the family's task
  fields, ``cohort`` (the name of the run's cohort: every field but the seed) and ``name``.
  """
  validate(cfg)
  return families.get(cfg.family).runs(cfg)


def identity(cfg) -> dict:
  """The study's identity as plain JSON types: the config without its execution and analysis sections
  (config.json)."""
  out = json.loads(cfg.to_json_best_effort(sort_keys=True))
  out.pop(EXECUTION, None)
  out.pop(ANALYSIS, None)
  return out
