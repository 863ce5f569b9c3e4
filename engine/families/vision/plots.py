"""Figures of a vision study, drawn from plain arrays and summary records (no pyplot; see
``universality.engine.plots``)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from universality.engine import plots


def learning_curves(step_E, train_ExS, test_ExS, runs: Sequence[Mapping], ylabel: str) -> Figure:
  """Test (solid) and training (dashed) values of one metric for every run."""
  fig = Figure(figsize=(6.4, 3.8), layout="constrained")
  ax = fig.subplots()
  step_E = np.asarray(step_E)
  for i, label in enumerate(plots.run_labels(runs)):
    line, = ax.plot(step_E, np.asarray(test_ExS)[:, i], lw=1.2, label=label)
    ax.plot(step_E, np.asarray(train_ExS)[:, i], lw=0.8, ls="--", color=line.get_color())
  ax.set_xscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  if len(runs) <= 12:
    ax.legend(fontsize=7, ncol=2)
  return fig


def one_to_one(layers: Sequence[Mapping], paper: Mapping[str, tuple[float, float]], title: str) -> Figure:
  """Mean correlation of matched units per layer, greedy and bipartite matching, beside Li et al.'s, and the
  mean max correlation with its rotation baseline over all pairs of runs."""
  fig = Figure(figsize=(7.0, 3.6), layout="constrained")
  ax = fig.subplots()
  names = [r["layer"] for r in layers]
  x = np.arange(len(names))
  val = lambda r, k: np.nan if r.get(k) is None else r[k]
  ax.plot(x, [val(r, "greedy_mean") for r in layers], "o-", color="C0", label="greedy (ours)")
  ax.plot(x, [val(r, "max_mean") for r in layers], "s-", color="C1", label="max matching (ours)")
  ax.plot(x, [val(r, "mean_baseline_max_corr") for r in layers], ":", color="C3",
          label="rotation baseline of the max")
  px = [i for i, n in enumerate(names) if n in paper]
  if px:
    ax.plot(px, [paper[names[i]][0] for i in px], "o--", color="C0", mfc="none", label="greedy (Li et al.)")
    ax.plot(px, [paper[names[i]][1] for i in px], "s--", color="C1", mfc="none", label="max (Li et al.)")
  ax.set_xticks(x, names)
  ax.set_ylim(0, 1)
  ax.set_ylabel("mean correlation of matched units")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  return fig


def sparse_prediction(layers: Sequence[Mapping], title: str) -> Figure:
  """Held-out loss (≈ 1 − R²) and units used against λ, one line per layer."""
  fig = Figure(figsize=(9.0, 3.4), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  for i, r in enumerate(layers):
    if not r.get("lambdas"):
      continue
    lam = np.asarray(r["lambdas"], float)
    fix = lambda xs: np.asarray([np.nan if v is None else v for v in xs], float)
    ax1.plot(lam, fix(r["heldout_loss"]), "o-", color=f"C{i}", label=r["layer"])
    ax2.plot(lam, fix(r["mean_units_used"]), "o-", color=f"C{i}", label=r["layer"])
  for ax, label in ((ax1, "held-out loss (standardised units)"), (ax2, "units of run a used per unit of b")):
    ax.set_xscale("log")
    ax.set_xlabel("λ (L1 penalty)")
    ax.set_ylabel(label)
  ax1.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  return fig
