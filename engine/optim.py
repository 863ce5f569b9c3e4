"""The optimiser seam: ``opt.name`` chooses the update rule of every run of a program.

  optim.add_config(cfg)                  # the ``opt`` section and its defaults
  optim.validate(cfg.opt)                # one-line ValueError naming the first bad field
  tx = optim.make(cfg.opt, steps, lr, weight_decay, roles)   # one run's optax transformation
  optim.state_bytes(cfg.opt, steps, params, roles)           # its state's size, from jax.eval_shape
  optim.describe(cfg.opt)                # the report's line

Optimisers (``NAMES``):
  adamw  AdamW with decoupled weight decay (decay step = lr · weight_decay · θ, as torch.optim.AdamW);
         ``opt.b1``, ``opt.b2``, ``opt.eps``.
  adam   Adam with L2 weight decay added to the gradient (torch.optim.Adam): g ← g + wd·θ, then the
         Adam update with ``opt.b1``, ``opt.b2``, ``opt.eps``, times lr (weight decay 0: plain Adam).
  sgd    SGD with heavy-ball momentum, Nesterov optional, and L2 weight decay added to the gradient before
         the momentum (torch.optim.SGD): buf ← μ·buf + (g + wd·θ); θ ← θ − lr·buf (Nesterov:
         θ ← θ − lr·(g + wd·θ + μ·buf)); ``opt.sgd.momentum``, ``opt.sgd.nesterov``.
  muon   Muon (optax.contrib.scale_by_muon) on the matrices whose role is in ``opt.muon.params``: a
         bias-corrected momentum m ← β·m + (1−β)·g (Nesterov: β·m̂ₜ₊₁ + (1−β)·ĝ), orthogonalised by
         ``opt.muon.ns_steps`` quintic Newton–Schulz steps after Frobenius normalisation, scaled by
         sqrt(max(1, fan_out / fan_in)), plus decoupled decay wd·θ, times lr; AdamW (``opt.b1/b2/eps``,
         the same lr and weight decay) on every other parameter, or Adam with L2 decay
         (``opt.muon.other = "adam"``).
         ``opt.muon.scale_by_shape = False`` drops the width scaling and ``opt.muon.ns_coeffs = "li2"`` uses
         the five per-step Newton–Schulz coefficients of Tian (2025)'s code (``ns_steps`` then ignored):
         with ``muon.params = "hidden"``, ``muon.momentum = 0.99``, ``muon.nesterov = False``,
         ``muon.other = "adam"``, ``b1, b2 = 0.9, 0.999`` this is that paper's split (Muon on W, torch's
         Adam on V); its momentum is not bias-corrected, which the Frobenius normalisation makes irrelevant.

The learning rate and weight decay are per-run values injected into the state (``optax.inject_hyperparams``),
so one compiled program covers a grid of them under vmap for every optimiser; everything else is shared by
the program. Gradient clipping (``opt.clip_norm``) and the schedule (``opt.warmup_steps``, ``opt.schedule``)
wrap any of them. Optimisers differ in state structure, so ``opt.name`` is not a per-run axis: a study with
``opt.name = "adamw,muon"`` trains one bucket per optimiser (``universality.engine.families.buckets``).

Roles: a family's model names the role of each parameter (``Family.param_roles``): ``hidden`` (a matrix
between hidden features), ``embed`` (an input lookup table or input projection), ``unembed`` (the output
head) or ``vector`` (biases, gains). Matrices are laid out ``[..., in, out]`` (leading axes, e.g. stacked
layers, are batch axes of the orthogonalisation).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax import contrib as optax_contrib

NAMES = ("adamw", "adam", "sgd", "muon")
SCHEDULES = ("constant", "cosine")
ROLES = ("hidden", "embed", "unembed", "vector")
MUON_COEFFS = (3.4445, -4.7750, 2.0315)  # the quintic Newton–Schulz iteration of Muon (Jordan et al. 2024)
# Per-step coefficients of the five Newton–Schulz steps in Tian (2025)'s code (cogo/muon_opt.py).
LI2_COEFFS = ((4.01, -9.22, 5.80), (3.49, -6.38, 3.23), (3.34, -6.21, 3.20), (3.64, -7.48, 4.43),
              (3.46, -5.35, 2.85))
MUON_NS = {"jordan": MUON_COEFFS, "li2": LI2_COEFFS}
MUON_OTHER = ("adamw", "adam")


def add_config(cfg: ml_collections.ConfigDict) -> None:
  """Adds the ``opt`` section (every optimiser's fields; ``opt.name`` picks which are read)."""
  opt = cfg.opt = ml_collections.ConfigDict()
  opt.name = "adamw"            # comma-separated optimisers (NAMES); several train as one bucket each
  opt.lr = "1e-3"               # comma-separated learning rates (a sweep axis)
  opt.weight_decay = "1.0"      # comma-separated weight decays (a sweep axis)
  opt.b1 = 0.9                  # AdamW (also Muon's AdamW on non-matrix parameters)
  opt.b2 = 0.98
  opt.eps = 1e-8
  opt.clip_norm = 0.0           # clip each run's gradient to this global norm; 0: no clipping
  opt.warmup_steps = 0          # linear warm-up of the learning rate from 0 over these steps
  opt.schedule = "constant"     # after warm-up: "constant", or "cosine" decay to final_lr_frac · lr
  opt.final_lr_frac = 0.1       # the cosine schedule's last learning rate, as a fraction of the peak
  opt.sgd = ml_collections.ConfigDict()
  opt.sgd.momentum = 0.9        # 0: plain SGD (no momentum buffer)
  opt.sgd.nesterov = False
  opt.muon = ml_collections.ConfigDict()
  opt.muon.momentum = 0.95
  opt.muon.nesterov = True
  opt.muon.ns_steps = 5
  opt.muon.params = "hidden"    # comma-separated roles orthogonalised by Muon; the rest get muon.other
  opt.muon.other = "adamw"      # the optimiser of the other parameters: "adamw" or "adam" (MUON_OTHER)
  opt.muon.scale_by_shape = True  # scale each update by sqrt(max(1, fan_out / fan_in))
  opt.muon.ns_coeffs = "jordan"   # Newton–Schulz coefficients: "jordan" (MUON_COEFFS) or "li2" (LI2_COEFFS)


def names(opt) -> tuple[str, ...]:
  """The optimisers of a study, in the order given (``opt.name`` is comma-separated)."""
  if not isinstance(opt.name, str):
    raise ValueError(f"config.opt.name: expected comma-separated names from {NAMES}, got {opt.name!r}")
  out = tuple(n.strip() for n in opt.name.split(",") if n.strip())
  if not out:
    raise ValueError("config.opt.name: empty list")
  bad = [n for n in out if n not in NAMES]
  if bad:
    raise ValueError(f"config.opt.name: {bad[0]!r} is not one of {NAMES}")
  if len(set(out)) != len(out):
    raise ValueError(f"config.opt.name: repeated values in {opt.name!r}")
  return out


def muon_roles(opt) -> tuple[str, ...]:
  out = tuple(r.strip() for r in str(opt.muon.params).split(",") if r.strip())
  bad = [r for r in out if r not in ROLES]
  if not out or bad:
    raise ValueError(f"config.opt.muon.params: expected comma-separated roles from {ROLES}, got "
                     f"{opt.muon.params!r}")
  return out


def roles_by_name(params, embed=(), unembed=(), stacked=()) -> Any:
  """Roles from each parameter's own name (the last key of its path): ``embed`` and ``unembed`` name the
  input tables and output heads, every other matrix is ``hidden`` and everything else a ``vector``.
  Parameters under a key in ``stacked`` carry one leading axis over layers (a matrix there has 3 axes)."""
  def role(path, p):
    keys = [getattr(k, "key", None) for k in path]
    name = keys[-1] if keys else None
    if name in embed:
      return "embed"
    if name in unembed:
      return "unembed"
    matrix_ndim = 3 if any(k in stacked for k in keys) else 2
    return "hidden" if len(p.shape) >= matrix_ndim else "vector"
  return jax.tree_util.tree_map_with_path(role, params)


def _number(section, name: str, prefix: str, ok: Callable[[float], bool], what: str) -> None:
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
    raise ValueError(f"config.opt.{prefix}{name}: {what}, got {value!r}")


def _flag(section, name: str, prefix: str) -> None:
  if not isinstance(section[name], bool):
    raise ValueError(f"config.opt.{prefix}{name}: expected True or False, got {section[name]!r}")


def validate(opt) -> None:
  """Raises ``ValueError`` with a one-line message naming the first bad field of the ``opt`` section.

  The fields of every optimiser named in ``opt.name`` are checked, and the shared ones; the sweep axes
  ``opt.lr`` and ``opt.weight_decay`` are checked where they are parsed (``universality.engine.config``).
  """
  chosen = names(opt)
  _number(opt, "clip_norm", "", lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0 (0: no clipping)")
  if isinstance(opt.warmup_steps, bool) or not isinstance(opt.warmup_steps, int) or opt.warmup_steps < 0:
    raise ValueError(f"config.opt.warmup_steps: expected an integer >= 0, got {opt.warmup_steps!r}")
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"config.opt.schedule: must be one of {SCHEDULES}, got {opt.schedule!r}")
  _number(opt, "final_lr_frac", "", lambda v: 0 <= v <= 1, "must lie in [0, 1]")
  if "adamw" in chosen or "adam" in chosen or "muon" in chosen:
    for name in ("b1", "b2"):
      _number(opt, name, "", lambda v: 0 <= v < 1, "must lie in [0, 1)")
    _number(opt, "eps", "", lambda v: math.isfinite(v) and v > 0, "must be finite and > 0")
  if "sgd" in chosen:
    _number(opt.sgd, "momentum", "sgd.", lambda v: 0 <= v < 1, "must lie in [0, 1)")
    _flag(opt.sgd, "nesterov", "sgd.")
    if opt.sgd.nesterov and not float(opt.sgd.momentum) > 0:
      raise ValueError("config.opt.sgd.nesterov: Nesterov momentum needs config.opt.sgd.momentum > 0")
  if "muon" in chosen:
    _number(opt.muon, "momentum", "muon.", lambda v: 0 <= v < 1, "must lie in [0, 1)")
    _flag(opt.muon, "nesterov", "muon.")
    steps = opt.muon.ns_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 20:
      raise ValueError(f"config.opt.muon.ns_steps: expected an integer in [1, 20], got {steps!r}")
    muon_roles(opt)
    if opt.muon.other not in MUON_OTHER:
      raise ValueError(f"config.opt.muon.other: must be one of {MUON_OTHER}, got {opt.muon.other!r}")
    _flag(opt.muon, "scale_by_shape", "muon.")
    if opt.muon.ns_coeffs not in MUON_NS:
      raise ValueError(f"config.opt.muon.ns_coeffs: must be one of {tuple(MUON_NS)}, got {opt.muon.ns_coeffs!r}")


def lr_multiplier(opt, total_steps: int):
  """The learning-rate schedule as a multiple of each run's peak rate, a function of the step count, or
  None for a constant rate. ``opt.warmup_steps`` of linear warm-up from 0, then ``opt.schedule``: "constant",
  or "cosine" decay to ``opt.final_lr_frac`` of the peak at ``total_steps``."""
  warmup, kind = int(opt.warmup_steps), opt.schedule
  if kind == "constant" and warmup == 0:
    return None
  final = float(opt.final_lr_frac)
  decay_steps = max(int(total_steps) - warmup, 1)

  def multiplier(count):
    t = count.astype(jnp.float32)
    warm = jnp.minimum((t + 1.0) / warmup, 1.0) if warmup else jnp.float32(1.0)
    if kind == "constant":
      return warm
    frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
    return warm * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))

  return multiplier


def _adamw(opt, lr, weight_decay) -> optax.GradientTransformation:
  return optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps"))(
      learning_rate=lr, weight_decay=weight_decay, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps))


def _adam_rule(learning_rate, weight_decay, *, b1: float, b2: float, eps: float):
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.scale_by_learning_rate(learning_rate))


def _adam(opt, lr, weight_decay) -> optax.GradientTransformation:
  rule = lambda learning_rate, weight_decay: _adam_rule(
      learning_rate, weight_decay, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps))
  return optax.inject_hyperparams(rule)(learning_rate=lr, weight_decay=weight_decay)


def _sgd_rule(learning_rate, weight_decay, *, momentum: float, nesterov: bool):
  decay = optax.add_decayed_weights(weight_decay)
  return optax.chain(decay, optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def _sgd(opt, lr, weight_decay) -> optax.GradientTransformation:
  rule = lambda learning_rate, weight_decay: _sgd_rule(
      learning_rate, weight_decay, momentum=float(opt.sgd.momentum), nesterov=bool(opt.sgd.nesterov))
  return optax.inject_hyperparams(rule)(learning_rate=lr, weight_decay=weight_decay)


def _muon_dims(tree):
  """Muon's dimension numbers of every matrix of ``tree``: contract ``in`` (the second-to-last axis)."""
  return jax.tree.map(lambda x: optax_contrib.MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), tree)


def _scale_by_shape() -> optax.GradientTransformation:
  """sqrt(max(1, fan_out / fan_in)) per matrix (Muon's width scaling)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2])), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _muon_settings(opt) -> tuple[Any, bool, str]:
  """(Newton–Schulz coefficients, width scaling, optimiser of the rest), defaults for older configs."""
  muon = opt.muon
  return (MUON_NS[muon.get("ns_coeffs", "jordan")], bool(muon.get("scale_by_shape", True)),
          muon.get("other", "adamw"))


def _muon_rule(learning_rate, weight_decay, *, opt):
  coeffs, by_shape, _ = _muon_settings(opt)
  return optax.chain(
      optax_contrib.scale_by_muon(ns_coeffs=coeffs, ns_steps=int(opt.muon.ns_steps),
                                  beta=float(opt.muon.momentum), eps=float(opt.eps),
                                  nesterov=bool(opt.muon.nesterov), weight_dimension_numbers=_muon_dims),
      *([_scale_by_shape()] if by_shape else []), optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))


def _muon(opt, lr, weight_decay, roles) -> optax.GradientTransformation:
  chosen = set(muon_roles(opt))
  labels = lambda params: jax.tree.map(
      lambda role, p: "muon" if role in chosen and p.ndim >= 2 else "adamw", roles(params), params)
  muon = optax.inject_hyperparams(lambda learning_rate, weight_decay: _muon_rule(
      learning_rate, weight_decay, opt=opt))(learning_rate=lr, weight_decay=weight_decay)
  rest = _adam(opt, lr, weight_decay) if _muon_settings(opt)[2] == "adam" else _adamw(opt, lr, weight_decay)
  return optax.partition({"muon": muon, "adamw": rest}, labels)


def make(opt, total_steps: int, lr, weight_decay, roles: Callable[[Any], Any],
         name: str | None = None) -> optax.GradientTransformation:
  """One run's optimiser: ``name`` (default: the single ``opt.name``) with the run's own lr and weight
  decay, inside optional global-norm clipping and the lr schedule.

  ``roles(params)`` names each parameter's role (``ROLES``; only Muon reads it). A schedule scales the
  whole update, decay included, as torch optimisers with a scheduled lr do; with neither clipping nor a
  schedule the transformation (and its state) is the optimiser's own, so AdamW's state is that of
  ``optax.inject_hyperparams(optax.adamw)`` alone.
  """
  if name is None:
    (name,) = names(opt)
  if name == "adamw":
    core = _adamw(opt, lr, weight_decay)
  elif name == "adam":
    core = _adam(opt, lr, weight_decay)
  elif name == "sgd":
    core = _sgd(opt, lr, weight_decay)
  else:
    core = _muon(opt, lr, weight_decay, roles)
  multiplier = lr_multiplier(opt, total_steps)
  clip = float(opt.clip_norm)
  if multiplier is None and not clip:
    return core
  parts = ([optax.clip_by_global_norm(clip)] if clip else []) + [core]
  if multiplier is not None:
    parts.append(optax.scale_by_schedule(multiplier))
  return optax.chain(*parts)


def state_bytes(opt, total_steps: int, params, roles: Callable[[Any], Any]) -> int:
  """Bytes of one run's optimiser state for parameters ``params`` (arrays or ``jax.ShapeDtypeStruct``s),
  from ``jax.eval_shape`` of the optimiser's init: nothing is allocated."""
  sizes = []
  for name in names(opt):  # a study of several optimisers: its largest state
    shapes = jax.eval_shape(make(opt, total_steps, 0.0, 0.0, roles, name).init, params)
    sizes.append(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))
  return max(sizes)


def describe(opt) -> str:
  """The optimiser of one program and its shared settings, in words (the report's line)."""
  (name,) = names(opt)
  if name == "adamw":
    text = f"AdamW, betas ({float(opt.b1):g}, {float(opt.b2):g}), eps {float(opt.eps):g}"
  elif name == "adam":
    text = f"Adam with L2 weight decay, betas ({float(opt.b1):g}, {float(opt.b2):g}), eps {float(opt.eps):g}"
  elif name == "sgd":
    text = (f"SGD, momentum {float(opt.sgd.momentum):g}{' (Nesterov)' if opt.sgd.nesterov else ''}, "
            f"L2 weight decay")
  else:
    coeffs, by_shape, other = _muon_settings(opt)
    steps = len(coeffs) if coeffs is LI2_COEFFS else int(opt.muon.ns_steps)
    text = (f"Muon on {', '.join(muon_roles(opt))} matrices (momentum {float(opt.muon.momentum):g}"
            f"{', Nesterov' if opt.muon.nesterov else ''}, {steps} Newton–Schulz steps"
            f"{' (Li2 coefficients)' if coeffs is LI2_COEFFS else ''}"
            f"{'' if by_shape else ', no width scaling'}), "
            f"{'Adam (L2 decay)' if other == 'adam' else 'AdamW'} on the rest "
            f"(betas ({float(opt.b1):g}, {float(opt.b2):g}), eps {float(opt.eps):g})")
  if float(opt.clip_norm):
    text += f", gradients clipped to norm {float(opt.clip_norm):g}"
  if int(opt.warmup_steps):
    text += f", {int(opt.warmup_steps)} warm-up steps"
  if opt.schedule == "cosine":
    text += f", cosine decay to {float(opt.final_lr_frac):g} of the peak"
  return text
