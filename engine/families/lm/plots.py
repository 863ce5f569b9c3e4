"""Figures of a language-model study, drawn from plain arrays (no pyplot; see ``universality.engine.plots``)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from universality.engine import plots

# Universal fractions reported by Gurnee et al. (2024), excess correlation > 0.5 over 5 seeds (their
# baseline: a row-normalised Gaussian mixing matrix, not a rotation).
PAPER_UNIVERSAL = {"GPT2-small": 0.0416, "GPT2-medium": 0.0123, "Pythia-160m": 0.0126}


def learning_curves(step_E, train_ExS, test_ExS, unigram_ExS, runs: Sequence[Mapping]) -> Figure:
  """Held-out (solid) and training (dashed) bits per byte of every run; the unigram bar dotted."""
  fig = Figure(figsize=(6.4, 3.8), layout="constrained")
  ax = fig.subplots()
  step_E = np.asarray(step_E)
  for i, label in enumerate(plots.run_labels(runs)):
    line, = ax.plot(step_E, np.asarray(test_ExS)[:, i], lw=1.2, label=label)
    ax.plot(step_E, np.asarray(train_ExS)[:, i], lw=0.8, ls="--", color=line.get_color())
  if len(step_E):
    ax.axhline(float(np.asarray(unigram_ExS)[-1, 0]), color="k", ls=":", lw=1, label="unigram")
  ax.set_xscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("bits per byte")
  if len(runs) <= 12:
    ax.legend(fontsize=7, ncol=2)
  return fig


def universal_by_layer(cohort_L: Sequence[float], per_run_SxL: Sequence[Sequence[float]], title: str) -> Figure:
  """Share of live neurons that are universal, per layer: the cohort (bars), each run (dots), and the
  paper's whole-model figures (dashed lines)."""
  fig = Figure(figsize=(6.0, 3.4), layout="constrained")
  ax = fig.subplots()
  l = len(cohort_L)
  ax.bar(np.arange(l), np.asarray(cohort_L) * 100, color="C0", alpha=0.6, label="this cohort")
  runs = np.asarray(per_run_SxL, float) * 100
  for row in runs:
    ax.plot(np.arange(l), row, "o", color="C0", ms=3, alpha=0.7)
  for i, (name, frac) in enumerate(PAPER_UNIVERSAL.items()):
    ax.axhline(frac * 100, color=f"C{i + 1}", ls="--", lw=1, label=f"{name} (Gurnee et al.)")
  ax.set_xticks(np.arange(l))
  ax.set_xlabel("layer")
  ax.set_ylabel("universal neurons (%)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  return fig


def excess_by_layer(excess_SxLxN, dead_SxLxN, threshold: float) -> Figure:
  """Histogram of the excess correlation of live neurons, one line per layer, with the threshold."""
  fig = Figure(figsize=(6.0, 3.4), layout="constrained")
  ax = fig.subplots()
  excess, live = np.asarray(excess_SxLxN, float), ~np.asarray(dead_SxLxN, bool)
  bins = np.linspace(-0.2, 1.0, 49)
  for j in range(excess.shape[1]):
    x = excess[:, j][live[:, j]]
    ax.hist(np.clip(x, -0.2, 1.0), bins=bins, histtype="step", lw=1.3, label=f"layer {j}")
  ax.axvline(threshold, color="k", ls=":", lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("excess correlation (mean over other seeds of max − rotation baseline)")
  ax.set_ylabel("neurons")
  ax.legend(fontsize=7)
  return fig


def property_percentiles(pct_by_name: Mapping[str, np.ndarray], universal_SxLxN, dead_SxLxN) -> Figure:
  """Within-layer percentiles of each property: universal neurons against the other live neurons."""
  names = list(pct_by_name)
  universal, live = np.asarray(universal_SxLxN, bool), ~np.asarray(dead_SxLxN, bool)
  fig = Figure(figsize=(max(6.0, 0.62 * len(names)), 3.8), layout="constrained")
  ax = fig.subplots()
  pos = np.arange(len(names))
  groups = ((universal & live, "universal", "C3", -0.18), (~universal & live, "other", "C0", 0.18))
  for mask, label, color, off in groups:
    data = [np.asarray(pct_by_name[k])[mask] for k in names]
    if not any(d.size for d in data):
      continue
    parts = ax.boxplot([d if d.size else [np.nan] for d in data], positions=pos + off, widths=0.3,
                       showfliers=False, patch_artist=True)
    for box in parts["boxes"]:
      box.set_facecolor(color)
      box.set_alpha(0.5)
    ax.plot([], [], color=color, lw=6, alpha=0.5, label=label)
  ax.set_xticks(pos)
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
  ax.set_ylabel("percentile within layer")
  ax.legend(fontsize=7)
  return fig
