"""Training configuration: one ``ml_collections.ConfigDict`` describes a whole sweep.

A sweep is the grid ``groups × lr × weight_decay × train_frac × seeds``. ``runs(cfg)`` flattens it into the
leading ``S`` axis in row-major order of that product — groups outermost, seeds innermost — so run
``s`` is::

  s = (((g · n_lr + i_lr) · n_wd + i_wd) · n_frac + i_frac) · seeds + k

when every group sweeps the same train fractions. A group named in ``train_frac_by_group`` trains at that
one fraction instead (n_frac = 1 for it), so the paper's studies, where each group has its own fraction, are
one program too.

A run's initial parameters, data split and minibatch stream depend only on ``(seed, seed index, group)``
where the seed index is ``seed_offset + k``; never on the run's position in the grid. Two runs that differ
only in lr, weight decay or train fraction therefore start from the same weights (a controlled comparison),
and the single run ``seeds=1, seed_offset=k`` reproduces member ``k`` of any sweep with the same ``seed``.
"""

from __future__ import annotations

import math

import ml_collections

from engine import groups

MODELS = ("mlp", "transformer")


def default_config() -> ml_collections.ConfigDict:
  """The Chughtai et al. (2023) MLP on S5: full-batch AdamW, lr 1e-3, weight decay 1, betas (0.9, 0.98)."""
  cfg = ml_collections.ConfigDict()
  # What to train.
  cfg.groups = "S5"          # comma-separated group specs (engine.groups.get), e.g. "C47,S4,D12"
  cfg.model = "mlp"          # 'mlp' (embed a, embed b, linear, ReLU, unembed) or 'transformer' (tokens a b =)
  cfg.seeds = 1              # seeds per grid point (the innermost sweep axis)
  cfg.seed = 0               # base seed: every random choice derives from it
  cfg.seed_offset = 0        # seed indices are seed_offset .. seed_offset + seeds - 1 (pick one seed of a sweep)
  # MLP widths.
  cfg.embed_dim = 256        # E: width of each of the two input embeddings
  cfg.hidden = 128           # N: ReLU neurons between the concatenated embeddings and the unembedding
  # Transformer widths.
  cfg.d_model = 128          # residual stream width (token and positional embeddings, attention output)
  cfg.n_heads = 4            # attention heads; must divide d_model
  cfg.d_mlp = 512            # N for the transformer: ReLU neurons of each MLP block
  cfg.n_layers = 1           # transformer blocks (attention + MLP, no LayerNorm)
  # Optimiser: AdamW with decoupled weight decay (decay step = lr · weight_decay · param, as torch.optim.AdamW).
  cfg.lr = "1e-3"            # comma-separated learning rates (a sweep axis)
  cfg.weight_decay = "1.0"   # comma-separated weight decays (a sweep axis)
  cfg.train_frac = "0.4"     # comma-separated fractions of the |G|² pairs used for training (a sweep axis)
  cfg.train_frac_by_group = ""  # per-group fractions overriding train_frac, e.g. "S5=0.4,S6=0.25" (as in
                                # the paper, where each group has its own); groups not named use train_frac
  cfg.b1 = 0.9               # Adam first-moment decay
  cfg.b2 = 0.98              # Adam second-moment decay
  cfg.eps = 1e-8             # Adam denominator epsilon
  # Schedule.
  cfg.steps = 1000           # optimiser steps per run
  cfg.eval_every = 100       # steps between metric evaluations; must divide steps
  cfg.batch_size = 0         # 0: full batch (the paper); otherwise pairs sampled with replacement per step
  # Launch (engine.launch): checkpoints and what happens at the end.
  cfg.num_checkpoints = 24   # log-spaced checkpoints (plus step 0 and the last step) for learning order
  cfg.analyze = True         # run engine.analysis and write the report when training ends
  # Execution (changes speed, not results beyond float rounding).
  cfg.run_chunk = 0          # runs vmapped together on each device; 0: auto (1 on CPU, where one model's
                             # activations then stay in cache: 2 and 4 measured 11% and 30% slower on the
                             # S5 MLP, benchmarks/README.md; all of a device's runs on GPU/TPU)
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


def group_specs(cfg) -> tuple[str, ...]:
  """The group specs of ``cfg.groups``, stripped, in order."""
  if not isinstance(cfg.groups, str):
    raise ValueError(f"config.groups: expected a comma-separated string, got {type(cfg.groups).__name__}")
  specs = tuple(s.strip() for s in cfg.groups.split(",") if s.strip())
  if not specs:
    raise ValueError("config.groups: no group given")
  if len(set(specs)) != len(specs):
    raise ValueError(f"config.groups: repeated group in {cfg.groups!r}")
  return specs


def _int_field(cfg, name: str, minimum: int) -> int:
  value = cfg[name]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"config.{name}: expected an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"config.{name}: must be >= {minimum}, got {value}")
  return value


def validate(cfg) -> None:
  """Raises ``ValueError`` with a one-line message naming the first bad field of ``cfg``."""
  missing = [k for k in default_config() if k not in cfg]
  if missing:
    raise ValueError(f"config: missing fields {missing}")
  for spec in group_specs(cfg):
    try:
      groups.parse(spec)
    except groups.GroupError as e:
      raise ValueError(f"config.groups: {e}") from None
  if cfg.model not in MODELS:
    raise ValueError(f"config.model: must be one of {MODELS}, got {cfg.model!r}")
  _int_field(cfg, "seeds", 1)
  _int_field(cfg, "seed", 0)
  _int_field(cfg, "seed_offset", 0)
  for name in ("embed_dim", "hidden", "d_model", "n_heads", "d_mlp", "n_layers", "steps", "eval_every"):
    _int_field(cfg, name, 1)
  _int_field(cfg, "batch_size", 0)
  _int_field(cfg, "run_chunk", 0)
  if cfg.d_model % cfg.n_heads:
    raise ValueError(f"config.n_heads: {cfg.n_heads} does not divide d_model={cfg.d_model}")
  if cfg.steps % cfg.eval_every:
    raise ValueError(f"config.eval_every: {cfg.eval_every} does not divide steps={cfg.steps}")
  for v in parse_floats(cfg.lr, "lr"):
    if not (v > 0 and math.isfinite(v)):
      raise ValueError(f"config.lr: learning rates must be finite and > 0, got {v}")
  for v in parse_floats(cfg.weight_decay, "weight_decay"):
    if not (v >= 0 and math.isfinite(v)):
      raise ValueError(f"config.weight_decay: must be finite and >= 0, got {v}")
  for v in parse_floats(cfg.train_frac, "train_frac"):
    if not 0 < v <= 1:
      raise ValueError(f"config.train_frac: must lie in (0, 1], got {v}")
  by_group = train_frac_by_group(cfg)
  unknown = sorted(set(by_group) - set(group_specs(cfg)))
  if unknown:
    raise ValueError(f"config.train_frac_by_group: {unknown} not in config.groups")
  _int_field(cfg, "num_checkpoints", 2)
  if not isinstance(cfg.analyze, bool):
    raise ValueError(f"config.analyze: expected True or False, got {cfg.analyze!r}")
  for name in ("b1", "b2"):
    if not 0 <= float(cfg[name]) < 1:
      raise ValueError(f"config.{name}: must lie in [0, 1), got {cfg[name]}")
  if not float(cfg.eps) > 0:
    raise ValueError(f"config.eps: must be > 0, got {cfg.eps}")


def train_frac_by_group(cfg) -> dict[str, float]:
  """``"S5=0.4, S6=0.25"`` -> ``{"S5": 0.4, "S6": 0.25}`` (validated)."""
  text = cfg.train_frac_by_group
  if not isinstance(text, str):
    raise ValueError(f"config.train_frac_by_group: expected a string like 'S5=0.4,S6=0.25', got {text!r}")
  out = {}
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    spec, sep, value = item.partition("=")
    try:
      frac = float(value)
    except ValueError:
      frac = None
    if not sep or frac is None or not 0 < frac <= 1:
      raise ValueError(f"config.train_frac_by_group: cannot read {item!r}; expected GROUP=FRACTION with "
                       "the fraction in (0, 1]")
    out[spec.strip()] = frac
  return out


def runs(cfg) -> list[dict]:
  """The flattened sweep: one dict per run (group, seed, seed_index, lr, weight_decay, train_frac).

  ``seed`` is the base seed and ``seed_index`` the run's seed index (``seed_offset + k``); together with the
  group they fix the run's initialisation and split.
  """
  validate(cfg)
  out = []
  by_group = train_frac_by_group(cfg)
  for spec in group_specs(cfg):
    fracs = (by_group[spec],) if spec in by_group else parse_floats(cfg.train_frac, "train_frac")
    for lr in parse_floats(cfg.lr, "lr"):
      for wd in parse_floats(cfg.weight_decay, "weight_decay"):
        for frac in fracs:
          for k in range(cfg.seeds):
            out.append(dict(group=spec, seed=int(cfg.seed), seed_index=int(cfg.seed_offset) + k, lr=lr,
                            weight_decay=wd, train_frac=frac))
  return out
