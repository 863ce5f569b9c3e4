"""Figures of a study, drawn from plain data: metrics arrays, summary.json records, numpy matrices.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing is shown, no global
figure registry grows, and saving a PNG uses the Agg renderer whatever backend is active (no display
needed). A family's view (``plot``) feeds them from a run directory and its report saves the very same
figures, so a notebook and the report draw through one code path.

Here are the figures any family may draw (correlation distributions against a baseline, run-by-run
matrices) and the helpers of the families' own figures (``engine/families/<name>/plots.py``). Runs are
labelled by their seed number ``k`` (``runs.json`` "seed"), and step axes are logarithmic (symmetric-log
where step 0, the initialisation, is on the axis).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure


def grid(n: int, ncols_max: int = 3, panel=(4.6, 3.4)) -> tuple[Figure, list]:
  ncols = min(n, ncols_max)
  nrows = -(-n // ncols)
  fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
  for ax in axes[n:]:
    ax.set_visible(False)
  return fig, axes[:n]


def step_axis(ax, steps: Sequence[int], axis: str = "x") -> None:
  """Log scale; symmetric-log with a linear piece below the first positive step when 0 is plotted."""
  steps = np.asarray(steps)
  positive = steps[steps > 0]
  set_scale = ax.set_xscale if axis == "x" else ax.set_yscale
  if positive.size == 0:
    return
  if (steps <= 0).any():
    set_scale("symlog", linthresh=float(positive.min()), linscale=0.5)
  else:
    set_scale("log")


def run_labels(runs: Sequence[Mapping]) -> list[str]:
  """Short labels for runs: the seed number ``k``, plus lr / weight decay / train fraction where they vary."""
  fields = [("lr", "lr"), ("weight_decay", "wd"), ("train_frac", "frac")]
  varying = [(f, short) for f, short in fields if len({r.get(f) for r in runs}) > 1]
  out = []
  for r in runs:
    label = f"seed {r['seed']}"
    out.append(" ".join([label] + [f"{short}={r.get(f):g}" for f, short in varying]))
  return out


# ---------------------------------------------------------------------------------------------------
# Neurons and representations.


def correlation_distribution(max_flat, baseline_flat, excess_flat, universal_threshold: float,
                             title: str = "") -> Figure:
  """Left: max correlation of each (neuron, other run) against its rotation baseline. Right: the excess
  correlation per neuron, with the universality threshold."""
  max_flat, baseline_flat = np.asarray(max_flat, float), np.asarray(baseline_flat, float)
  excess_flat = np.asarray(excess_flat, float)
  max_flat, baseline_flat, excess_flat = (x[np.isfinite(x)] for x in (max_flat, baseline_flat, excess_flat))
  fig = Figure(figsize=(9.0, 3.2), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  lo = min(0.0, float(np.floor(10 * min(max_flat.min(initial=0.0), baseline_flat.min(initial=0.0))) / 10))
  bins = np.linspace(lo, 1.0, int(round((1.0 - lo) * 40)) + 1)
  ax1.hist(max_flat, bins=bins, histtype="stepfilled", alpha=0.5, color="C0",
           label=f"max corr (mean {max_flat.mean():.2f})" if max_flat.size else "max corr")
  ax1.hist(baseline_flat, bins=bins, histtype="step", lw=1.5, color="C3",
           label=f"rotation baseline (mean {baseline_flat.mean():.2f})" if baseline_flat.size else "baseline")
  ax1.set_xlabel("max correlation with the other run's neurons")
  ax1.set_ylabel("neuron × other run")
  ax1.legend(fontsize=7)
  ebins = np.linspace(-0.5, 1.0, 31)
  ax2.hist(np.clip(excess_flat, -0.5, 1.0), bins=ebins, color="C2", alpha=0.75)
  ax2.axvline(universal_threshold, color="k", ls=":", lw=1)
  frac = float(np.mean(excess_flat > universal_threshold)) if excess_flat.size else float("nan")
  ax2.set_xlabel("excess correlation (mean over other runs)")
  ax2.set_ylabel("live neurons")
  ax2.set_title(f"universal (> {universal_threshold:g}): {frac:.1%}", fontsize=8)
  fig.suptitle(title, fontsize=9)
  return fig


def matrix(m_SxS, labels: Sequence[str], title: str = "", vmin: float = 0.0, vmax: float = 1.0,
           cmap: str = "viridis") -> Figure:
  """An annotated run × run matrix (CKA, matched correlation, Procrustes distance)."""
  m_SxS = np.asarray(m_SxS, float)
  s = m_SxS.shape[0]
  if m_SxS.shape != (s, s) or len(labels) != s:
    raise ValueError(f"matrix: expected [S, S] with S = {len(labels)} labels, got {m_SxS.shape}")
  size = 2.2 + 0.38 * s
  fig = Figure(figsize=(size + 0.8, size), layout="constrained")
  ax = fig.subplots()
  im = ax.imshow(m_SxS, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
  if s <= 24:
    norm = mcolors.Normalize(vmin, vmax)
    for i in range(s):
      for j in range(s):
        v = m_SxS[i, j]
        ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="black" if np.isfinite(v) and norm(v) > 0.6 else "white")
  ax.set_xticks(range(s), labels, rotation=90, fontsize=7)
  ax.set_yticks(range(s), labels, fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, shrink=0.8)
  return fig


def save(fig: Figure, path, dpi: int = 100):
  """Writes ``fig`` as a PNG with the Agg renderer and no timestamp or version metadata (reproducible) to a
  local path or a binary file object (``universality.engine.paths.write_png`` renders into memory for gs://)."""
  fig.savefig(path, format="png", dpi=dpi, metadata={"Software": None})
  return path


def sparse_prediction_curves(by_layer: Mapping[str, Mapping], title: str = "") -> Figure:
  """The Convergent Learning sparse prediction against λ (log-x), one line per layer: held-out loss of
  run b's units predicted from run a's, and the units of a each uses; means over the pairs compared
  (``universality.engine.analysis.convergent.layer_means``: ``lambdas``, ``heldout_loss``,
  ``mean_units_used``)."""
  fig = Figure(figsize=(9.2, 3.4), layout="constrained")
  ax_loss, ax_used = fig.subplots(1, 2)
  for layer, m in by_layer.items():
    lam = np.asarray(m["lambdas"], float)
    for ax, key in ((ax_loss, "heldout_loss"), (ax_used, "mean_units_used")):
      ax.plot(lam, np.asarray([np.nan if v is None else v for v in m[key]], float), marker="o", ms=3,
              label=layer)
  for ax, label in ((ax_loss, "held-out loss (≈ 1 − R²)"), (ax_used, "units of run a used per unit of b")):
    ax.set_xscale("log")
    ax.set_xlabel("L1 penalty λ")
    ax.set_ylabel(label)
  ax_loss.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  return fig
