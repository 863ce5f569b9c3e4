"""Where generalisation starts: the transition of a grokking phase diagram and its scaling with group order.

Tian (2025), *Provable Scaling Laws of Feature Emergence* ("Li2"), predicts that a 2-layer network on the
composition task of a group of order M memorises below and generalises above a training-set size
n ∼ M log M. Given per-run outcomes (group, order, optimiser, training pairs n, seed, generalised or not,
step it generalised), this module fits, per (group, optimiser), the logistic

  P(generalised | n) = σ(slope · (ln n − ln n*))

by maximum likelihood (a weak ridge on the slope keeps perfectly separated outcomes finite: n* then lies
between the largest size that failed and the smallest that generalised, and its interval spans that bracket),
so that n* is the size at which half the seeds generalise, with a percentile bootstrap interval that resamples
*seeds* (each seed's runs at every size travel together). Across the groups of one optimiser it fits ln(n*/s)
against ln M and ln ln M, beside the predicted form n*/s = C · M ln M (s: the law's group factor,
``task.law_s``).

Everything here is numpy on plain arrays, deterministic given its ``seed``.

Local shape letters:

  Q  the groups (their transitions) a scaling law is fitted to
  J  the coefficients of a fitted law
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

DEFAULT_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
RIDGE = 1e-3  # on the slope of the standardised logistic: finite n* when outcomes separate perfectly


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One run of a phase-diagram study.

  Attributes:
    group: the group spec ("C59", "S4").
    order: M, the group's order.
    optimiser: ``opt.name`` of its bucket.
    n: training pairs.
    mult: n in the law's units (the multiplier of ``task.size_mult``).
    s: the law's group factor s.
    seed: the seed number k.
    generalised: whether its test accuracy reached the family's bar by the end.
    steps: the first logged step at which it had, or None.
  """
  group: str
  order: int
  optimiser: str
  n: int
  mult: float
  s: float
  seed: int
  generalised: bool
  steps: int | None = None


def logistic_fit(x_S: np.ndarray, y_S: np.ndarray, ridge: float = RIDGE, iters: int = 100
                 ) -> tuple[float, float]:
  """``(a, b)`` maximising Σ log-likelihood of ``y ~ Bernoulli(σ(a + b·x))`` − ridge·n·b²·var(x)/2.

  Newton's method on standardised x; the ridge (scaled to the data) is what keeps a perfectly separated
  sample finite. Returns the coefficients on the original x.
  """
  x_S = np.asarray(x_S, np.float64)
  y_S = np.asarray(y_S, np.float64)
  if x_S.shape != y_S.shape or x_S.ndim != 1 or not x_S.size:
    raise ValueError(f"logistic_fit: x and y must be equal non-empty 1-D arrays, got {x_S.shape}, "
                     f"{y_S.shape}")
  mu, sd = float(x_S.mean()), float(x_S.std())
  sd = sd if sd > 0 else 1.0
  z_S = (x_S - mu) / sd
  design_Sx2 = np.stack([np.ones_like(z_S), z_S], axis=1)
  penalty_2x2 = np.diag([1e-8, ridge]) * len(z_S)
  theta = np.zeros(2)
  for _ in range(iters):
    p_S = 1.0 / (1.0 + np.exp(-(design_Sx2 @ theta)))
    grad = design_Sx2.T @ (y_S - p_S) - penalty_2x2 @ theta
    hess = (design_Sx2 * (p_S * (1 - p_S))[:, None]).T @ design_Sx2 + penalty_2x2
    step = np.linalg.solve(hess, grad)
    theta = theta + step
    if np.max(np.abs(step)) < 1e-10:
      break
  a, b = theta
  return float(a - b * mu / sd), float(b / sd)


@dataclasses.dataclass(frozen=True)
class Transition:
  """The fitted transition of one (group, optimiser).

  Attributes:
    n_star: training pairs at which half the seeds generalise (None: all sizes on one side, see ``where``).
    low, high: the bootstrap interval of n_star (±inf where bootstrap samples put it outside the sizes).
    slope: the logistic's slope in ln n.
    where: "fit", "below" (every size tried generalised in half the seeds or more: n* below the smallest)
      or "above" (none did: n* above the largest).
    runs, seeds: the outcomes and distinct seeds fitted.
    boot_outside: bootstrap samples whose n* fell outside the sizes tried.
  """
  n_star: float | None
  low: float
  high: float
  slope: float | None
  where: str
  runs: int
  seeds: int
  boot_outside: int = 0

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    for k in ("low", "high"):
      out[k] = None if not np.isfinite(out[k]) else out[k]
    return out


def _n_star(log_n_S: np.ndarray, gen_S: np.ndarray) -> tuple[float | None, float | None, str]:
  """(ln n*, slope, where) of one sample of outcomes."""
  lo, hi = float(log_n_S.min()), float(log_n_S.max())
  if gen_S.all() or (lo == hi and gen_S.mean() >= 0.5):
    return None, None, "below"
  if not gen_S.any() or lo == hi:
    return None, None, "above"
  a, b = logistic_fit(log_n_S, gen_S)
  if b <= 0:  # larger sets generalise less often: no transition of the predicted kind
    return None, b, "above" if gen_S.mean() < 0.5 else "below"
  x = -a / b
  if x < lo:
    return None, b, "below"
  if x > hi:
    return None, b, "above"
  return x, b, "fit"


def transition(n_S, generalised_S, seed_S, *, n_boot: int = DEFAULT_BOOTSTRAP, level: float = DEFAULT_LEVEL,
               seed: int = 0) -> Transition:
  """The logistic transition in ln n of one (group, optimiser), with a bootstrap interval over seeds.

  Args:
    n_S: training pairs of each run.
    generalised_S: whether each run generalised.
    seed_S: each run's seed number; the bootstrap resamples these with replacement, taking all runs of a
      drawn seed (the sizes it was trained at), as a fresh study with those seeds would.
    n_boot: bootstrap samples.
    level: the interval's coverage (percentile interval).
    seed: the bootstrap's random seed.
  """
  n_S = np.asarray(n_S, np.float64)
  gen_S = np.asarray(generalised_S, bool)
  seed_S = np.asarray(seed_S)
  if not (n_S.shape == gen_S.shape == seed_S.shape) or n_S.ndim != 1 or not n_S.size:
    raise ValueError(f"transition: n, generalised and seed must be equal non-empty 1-D arrays, got "
                     f"{n_S.shape}, {gen_S.shape}, {seed_S.shape}")
  if not (n_S > 0).all():
    raise ValueError("transition: training sizes must be > 0")
  log_n_S = np.log(n_S)
  x, b, where = _n_star(log_n_S, gen_S)
  seeds = np.unique(seed_S)
  rows_by_seed = [np.flatnonzero(seed_S == s) for s in seeds]
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A5E]))
  boot = np.empty(n_boot)
  outside = 0
  for i in range(n_boot):
    rows = np.concatenate([rows_by_seed[j] for j in rng.integers(0, len(seeds), len(seeds))])
    xb, _, wb = _n_star(log_n_S[rows], gen_S[rows])
    if xb is None:
      outside += 1
      boot[i] = -np.inf if wb == "below" else np.inf
    else:
      boot[i] = xb
  alpha = (1.0 - level) / 2
  if n_boot:
    q_lo, q_hi = np.quantile(boot, [alpha, 1 - alpha], method="inverted_cdf")
  else:
    q_lo, q_hi = (-np.inf, np.inf)
  if x is not None and log_n_S[~gen_S].max() < log_n_S[gen_S].min():
    # Perfectly separated: the likelihood is flat between the largest size that failed and the smallest
    # that generalised, so the interval spans at least that bracket (bootstrap samples agree on the fit).
    q_lo, q_hi = min(q_lo, log_n_S[~gen_S].max()), max(q_hi, log_n_S[gen_S].min())
  return Transition(n_star=None if x is None else float(np.exp(x)), low=float(np.exp(q_lo)),
                    high=float(np.exp(q_hi)), slope=None if b is None else float(b), where=where,
                    runs=int(n_S.size), seeds=int(seeds.size), boot_outside=int(outside))


@dataclasses.dataclass(frozen=True)
class ScalingFit:
  """Least squares of y = ln(n*/s) over the groups of one optimiser.

  Attributes:
    groups: the groups fitted (those with an n* inside their sizes).
    coefficients: {"ln M", "ln ln M", "1"} of the free fit y = α ln M + β ln ln M + γ (None with fewer than
      four groups: three coefficients need a residual to mean anything).
    stderr: their standard errors (None likewise).
    slope_m_log_m: α of the fit ln(n*/(s ln M)) = α ln M + γ, whose prediction is α = 1 (None with fewer than
      two groups); ``slope_stderr`` its standard error (None with fewer than three).
    ratio: {group: n*/(s · M ln M)}, flat across M under the law.
  """
  groups: tuple[str, ...]
  coefficients: dict | None
  stderr: dict | None
  slope_m_log_m: float | None
  slope_stderr: float | None
  ratio: dict

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), groups=list(self.groups))


def _ols(design_QxJ: np.ndarray, y_Q: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  coef, *_ = np.linalg.lstsq(design_QxJ, y_Q, rcond=None)
  dof = len(y_Q) - design_QxJ.shape[1]
  if dof <= 0:
    return coef, None
  resid = y_Q - design_QxJ @ coef
  cov = np.linalg.pinv(design_QxJ.T @ design_QxJ) * float(resid @ resid) / dof
  return coef, np.sqrt(np.maximum(np.diag(cov), 0.0))


def scaling_fit(points: Sequence[tuple[str, int, float, float]]) -> ScalingFit:
  """Fits ln(n*/s) against ln M and ln ln M; ``points`` are ``(group, M, s, n*)`` with n* > 0, M ≥ 3."""
  points = [p for p in points if p[3] is not None and p[3] > 0 and p[1] >= 3]
  groups = tuple(p[0] for p in points)
  m_Q = np.asarray([p[1] for p in points], np.float64)
  y_Q = np.log(np.asarray([p[3] / p[2] for p in points], np.float64)) if points else np.zeros(0)
  ratio = {p[0]: p[3] / (p[2] * p[1] * math.log(p[1])) for p in points}
  coefficients = stderr = None
  if len(points) >= 4 and len(np.unique(m_Q)) >= 3:
    design = np.stack([np.log(m_Q), np.log(np.log(m_Q)), np.ones_like(m_Q)], axis=1)
    coef, se = _ols(design, y_Q)
    names = ("ln M", "ln ln M", "1")
    coefficients = dict(zip(names, map(float, coef)))
    stderr = None if se is None else dict(zip(names, map(float, se)))
  slope = slope_se = None
  if len(np.unique(m_Q)) >= 2:
    design = np.stack([np.log(m_Q), np.ones_like(m_Q)], axis=1)
    coef, se = _ols(design, y_Q - np.log(np.log(m_Q)))
    slope = float(coef[0])
    slope_se = None if se is None else float(se[0])
  return ScalingFit(groups=groups, coefficients=coefficients, stderr=stderr, slope_m_log_m=slope,
                    slope_stderr=slope_se, ratio=ratio)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (group, optimiser) of the diagram: its sizes and outcomes, and its transition."""
  group: str
  order: int
  optimiser: str
  s: float
  mults: tuple[float, ...]
  n: tuple[int, ...]
  generalised_share: tuple[float, ...]
  runs_per_size: tuple[int, ...]
  median_steps: tuple[float | None, ...]
  transition: Transition

  @property
  def mult_star(self) -> float | None:
    """n* in the law's units: n* / (c·s·M ln M), read off the cell's own (n, mult) pairs."""
    if self.transition.n_star is None:
      return None
    per_unit = np.median(np.asarray(self.n, np.float64) / np.asarray(self.mults, np.float64))
    return float(self.transition.n_star / per_unit)

  def to_json(self) -> dict:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    out["transition"] = self.transition.to_json()
    out["mult_star"] = self.mult_star
    return out


def cells(outcomes: Sequence[Outcome], *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> list[Cell]:
  """One ``Cell`` per (group, optimiser) in order of appearance, sizes ascending."""
  keys: dict[tuple[str, str], list[Outcome]] = {}
  for o in outcomes:
    keys.setdefault((o.group, o.optimiser), []).append(o)
  out = []
  for (group, opt), rows in keys.items():
    sizes = sorted({(o.n, o.mult) for o in rows})
    share, count, med = [], [], []
    for n, mult in sizes:
      at = [o for o in rows if o.n == n and o.mult == mult]
      share.append(float(np.mean([o.generalised for o in at])))
      count.append(len(at))
      steps = [o.steps for o in at if o.generalised and o.steps is not None]
      med.append(float(np.median(steps)) if steps else None)
    tr = transition([o.n for o in rows], [o.generalised for o in rows], [o.seed for o in rows], n_boot=n_boot,
                    seed=seed)
    out.append(Cell(group=group, order=rows[0].order, optimiser=opt, s=rows[0].s,
                    mults=tuple(m for _, m in sizes), n=tuple(n for n, _ in sizes),
                    generalised_share=tuple(share), runs_per_size=tuple(count), median_steps=tuple(med), transition=tr))
  return out


def scaling_by_optimiser(cells_: Sequence[Cell]) -> dict[str, ScalingFit]:
  """``scaling_fit`` of the cells of each optimiser."""
  out = {}
  for opt in dict.fromkeys(c.optimiser for c in cells_):
    points = [(c.group, c.order, c.s, c.transition.n_star) for c in cells_ if c.optimiser == opt]
    out[opt] = scaling_fit(points)
  return out


def paired_shares(outcomes: Sequence[Outcome], a: str, b: str) -> list[dict]:
  """Optimiser ``a`` against ``b`` at equal n: per (group, n) seen under both, each one's generalised share,
  runs and median steps to generalise (of its generalised runs)."""
  by: dict[tuple, list[Outcome]] = {}
  for o in outcomes:
    by.setdefault((o.group, o.n, o.optimiser), []).append(o)
  out = []
  for (group, n, opt), rows in by.items():
    if opt != a or (group, n, b) not in by:
      continue
    other = by[(group, n, b)]
    entry = {"group": group, "order": rows[0].order, "n": n, "mult": rows[0].mult}
    for name, rs in ((a, rows), (b, other)):
      steps = [o.steps for o in rs if o.generalised and o.steps is not None]
      entry[name] = {"share": float(np.mean([o.generalised for o in rs])), "runs": len(rs),
                     "median_steps": float(np.median(steps)) if steps else None}
    out.append(entry)
  return out


def first_step(steps_E: np.ndarray, value_ExS: np.ndarray, threshold: float) -> list[int | None]:
  """Per run, the first logged step at which ``value >= threshold`` (None: never)."""
  hit_ExS = np.nan_to_num(np.asarray(value_ExS, np.float64), nan=-np.inf) >= threshold
  out = []
  for s in range(hit_ExS.shape[1]):
    rows = np.flatnonzero(hit_ExS[:, s])
    out.append(int(steps_E[rows[0]]) if rows.size else None)
  return out


def summary(outcomes: Sequence[Outcome], *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
            cells_: Sequence[Cell] | None = None) -> dict:
  """The diagram as JSON: cells (``cells_`` if given, else fitted here), the scaling fit per optimiser, and
  every optimiser pair at equal n."""
  cs = cells(outcomes, n_boot=n_boot, seed=seed) if cells_ is None else cells_
  opts = list(dict.fromkeys(o.optimiser for o in outcomes))
  pairs = {f"{a} vs {b}": paired_shares(outcomes, a, b) for i, a in enumerate(opts) for b in opts[i + 1:]}
  return {"cells": [c.to_json() for c in cs],
          "scaling": {k: v.to_json() for k, v in scaling_by_optimiser(cs).items()},
          "pairs": pairs, "bootstrap": n_boot}
