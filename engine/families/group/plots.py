"""Figures of a group study: similarity to irreps, key irreps, learning order, loss paths between seeds,
neuron-by-neuron comparison. Drawn from plain data without pyplot, as ``universality.engine.plots`` (which
holds the figures every family shares); irrep ``r`` of a group is drawn in colour ``r`` everywhere.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from universality.engine import plots


def irrep_colors(n: int) -> list[tuple]:
  """``n`` distinct RGBA colours; irrep ``r`` of a group is drawn in colour ``r`` everywhere."""
  if n <= 10:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i) for i in range(n)]
  if n <= 20:
    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i) for i in range(n)]
  cmap = matplotlib.colormaps["hsv"]
  return [cmap(i / n) for i in range(n)]


def similarity_heatmap(sim_SxR, labels: Sequence[str], irrep_names: Sequence[str], key_SxR=None,
                       title: str = "") -> Figure:
  """Runs × irreps heatmap of the logit similarity; key irreps are outlined in black."""
  sim_SxR = np.asarray(sim_SxR, float)
  s, r = sim_SxR.shape
  if len(labels) != s or len(irrep_names) != r:
    raise ValueError(f"similarity_heatmap: {sim_SxR.shape} does not match {len(labels)} runs x "
                     f"{len(irrep_names)} irreps")
  fig = Figure(figsize=(1.6 + 0.62 * r, 1.3 + 0.3 * s), layout="constrained")
  ax = fig.subplots()
  vmax = max(0.1, float(np.nanmax(np.abs(sim_SxR))) if sim_SxR.size else 0.1)
  im = ax.imshow(np.nan_to_num(sim_SxR), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                 interpolation="nearest")
  if s * r <= 600:
    for i in range(s):
      for j in range(r):
        v = sim_SxR[i, j]
        ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6,
                color="white" if abs(v) > 0.6 * vmax else "black")
  if key_SxR is not None:
    for i, j in zip(*np.nonzero(np.asarray(key_SxR))):
      ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2, ec="k"))
  ax.set_xticks(range(r), irrep_names, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(s), labels, fontsize=7)
  ax.set_title(title or "logit similarity (outlined: key irreps)", fontsize=9)
  fig.colorbar(im, ax=ax, shrink=0.8, label="cosine")
  return fig


def key_irrep_bars(irrep_names: Sequence[str], key_counts: Mapping[str, int],
                   first_counts: Mapping[str, int], n_runs: int, title: str = "") -> Figure:
  """For each irrep: in how many runs it is a key irrep, and in how many it was learned first."""
  names = list(irrep_names)
  x = np.arange(len(names))
  fig = Figure(figsize=(1.5 + 0.55 * len(names), 3.0), layout="constrained")
  ax = fig.subplots()
  cols = irrep_colors(len(names))
  ax.bar(x - 0.2, [key_counts.get(n, 0) for n in names], 0.4, color=cols, label="key irrep")
  ax.bar(x + 0.2, [first_counts.get(n, 0) for n in names], 0.4, color=cols, alpha=0.45, hatch="//",
         label="learned first")
  ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
  ax.set_ylim(0, max(n_runs, 1) * 1.3)  # headroom for the legend above full bars
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel(f"runs (of {n_runs})")
  handles = [Patch(fc="0.5", label="key irrep"), Patch(fc="0.5", alpha=0.45, hatch="//", label="learned first")]
  ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)
  ax.set_title(title, fontsize=9)
  return fig


def learning_order_run(steps_K, sim_KxR, irrep_names: Sequence[str], threshold: float,
                       learned: Mapping[str, int | None], key_irreps: Sequence[str] = (), title: str = "",
                       metric_steps=None, test_acc=None, train_acc=None) -> Figure:
  """One run: logit similarity of every non-trivial irrep over the checkpoints, the threshold, the step each
  irrep crossed it (dots; filled for the final key irreps), and the accuracies on a second axis."""
  steps_K = np.asarray(steps_K)
  sim_KxR = np.asarray(sim_KxR, float)
  if sim_KxR.shape != (steps_K.size, len(irrep_names)):
    raise ValueError(f"learning_order_run: similarities {sim_KxR.shape} do not match {steps_K.size} steps x "
                     f"{len(irrep_names)} irreps")
  fig = Figure(figsize=(7.0, 3.8), layout="constrained")
  ax = fig.subplots()
  cols = irrep_colors(len(irrep_names))
  for r, name in enumerate(irrep_names):
    if r == 0 and name == "trivial":
      continue  # centred logits: the trivial irrep's similarity is 0 by construction
    is_key = name in key_irreps
    ax.plot(steps_K, sim_KxR[:, r], color=cols[r], lw=1.8 if is_key else 1.0, alpha=1.0 if is_key else 0.6,
            label=name + (" (key)" if is_key else ""))
    at = learned.get(name)
    if at is not None and at in steps_K:
      k = int(np.flatnonzero(steps_K == at)[0])
      ax.plot([at], [sim_KxR[k, r]], "o", ms=6, color=cols[r], mfc=cols[r] if is_key else "white")
  ax.axhline(threshold, color="k", lw=0.8, ls=":", label=f"threshold {threshold:g}")
  plots.step_axis(ax, steps_K)
  ax.set_xlabel("step")
  ax.set_ylabel("logit similarity")
  ax.grid(alpha=0.25)
  if test_acc is not None and metric_steps is not None:
    ax2 = ax.twinx()
    ax2.plot(metric_steps, test_acc, color="0.35", lw=1.0, label="test acc")
    if train_acc is not None:
      ax2.plot(metric_steps, train_acc, color="0.35", lw=0.8, ls="--", label="train acc")
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_ylabel("accuracy", color="0.35")
    h2, l2 = ax2.get_legend_handles_labels()
  else:
    h2, l2 = [], []
  h1, l1 = ax.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left", ncol=2 if len(l1) > 6 else 1)
  ax.set_title(title, fontsize=9)
  return fig


def learning_order_group(records: Sequence, irrep_names: Sequence[str], steps_K,
                         title: str = "") -> Figure:
  """All runs of a group (``records.SummaryRun``): for each irrep, the checkpoint at which each run's
  similarity first crossed the threshold (filled: a key irrep of that run at the end; star: the run's first
  learned irrep)."""
  steps_K = np.asarray(steps_K)
  names = [n for i, n in enumerate(irrep_names) if not (i == 0 and n == "trivial")]
  cols = irrep_colors(len(irrep_names))
  offset = 1 if len(names) < len(irrep_names) else 0
  fig = Figure(figsize=(7.0, 1.4 + 0.42 * len(names)), layout="constrained")
  ax = fig.subplots()
  n = len(records)
  for y, name in enumerate(names):
    c = cols[y + offset]
    for j, rec in enumerate(records):
      at = (rec.learning_order or {}).get(name)
      if at is None:
        continue
      dy = (j - (n - 1) / 2) / max(n, 1) * 0.5  # spread the runs so equal steps stay visible
      first = rec.first_learned == name
      key = name in (rec.key_irreps or ())
      ax.plot([at], [y + dy], "*" if first else "o", ms=9 if first else 5, color=c,
              mfc=c if key else "white", alpha=0.85)
    key_n = sum(name in (r.key_irreps or ()) for r in records)
    first_n = sum(r.first_learned == name for r in records)
    ax.text(1.01, y, f"key {key_n}/{n}, first {first_n}", transform=ax.get_yaxis_transform(), fontsize=7,
            va="center")
  ax.set_yticks(range(len(names)), names, fontsize=7)
  ax.set_ylim(-0.7, len(names) - 0.3)
  ax.invert_yaxis()
  plots.step_axis(ax, steps_K)
  if steps_K.size:
    ax.set_xlim(steps_K.min() if steps_K.min() > 0 else 0, steps_K.max() * 1.3)
  ax.set_xlabel("first checkpoint with similarity above the threshold")
  ax.grid(alpha=0.25, axis="x")
  ax.legend(handles=[Line2D([], [], marker="o", ls="", color="0.3", label="key irrep at the end"),
                     Line2D([], [], marker="o", ls="", color="0.3", mfc="white", label="not key at the end"),
                     Line2D([], [], marker="*", ms=9, ls="", color="0.3", label="learned first")],
            fontsize=7, loc="lower right")
  ax.set_title(title, fontsize=9)
  return fig


def loss_paths(lambda_O, paths: Mapping[str, Sequence[float]], title: str = "") -> Figure:
  """Mean loss over pairs of runs along the linear path between their weights, one line per alignment."""
  fig = Figure(figsize=(4.6, 3.4), layout="constrained")
  ax = fig.subplots()
  for name, path in paths.items():
    ax.plot(lambda_O, path, marker=".", ms=3, label=name)
  ax.set_xlabel("λ (run i → aligned run j)")
  ax.set_ylabel("loss on all pairs (mean over pairs)")
  ax.legend(fontsize=7)
  ax.set_title(title, fontsize=9)
  return fig


def neuron_comparison(corr_NxN, dominant_a_N, dominant_b_N, perm_N, irrep_names: Sequence[str],
                      live_a_N=None, live_b_N=None, labels: tuple[str, str] = ("run A", "run B"),
                      title: str = "") -> Figure:
  """Two runs' hidden neurons side by side.

  Left: their correlation matrix with run A's neurons sorted by dominant irrep (then by matched correlation)
  and run B's columns in the order of the one-to-one matching (``perm_N[n]``: B's partner of A's neuron n),
  so the diagonal holds the matched pairs; the strips give each neuron's dominant irrep. Middle: the matched
  correlations, coloured by whether the two neurons share their dominant irrep. Right: dominant irrep of
  each live A neuron against that of its partner.
  """
  corr_NxN = np.asarray(corr_NxN, float)
  n, m = corr_NxN.shape
  dom_a, dom_b, perm = (np.asarray(x, int) for x in (dominant_a_N, dominant_b_N, perm_N))
  if dom_a.shape != (n,) or dom_b.shape != (m,) or perm.shape != (n,):
    raise ValueError(f"neuron_comparison: corr {corr_NxN.shape} does not match dominant {dom_a.shape}, "
                     f"{dom_b.shape} and perm {perm.shape}")
  live_a = np.ones(n, bool) if live_a_N is None else np.asarray(live_a_N, bool)
  live_b = np.ones(m, bool) if live_b_N is None else np.asarray(live_b_N, bool)
  matched = np.where(live_a & live_b[perm], corr_NxN[np.arange(n), perm], np.nan)
  # Live neurons first, grouped by dominant irrep, strongest matches first inside a group.
  order = np.lexsort((-np.nan_to_num(matched, nan=-2.0), dom_a, ~live_a))
  cols_b = perm[order]
  rest_b = np.setdiff1d(np.arange(m), cols_b)  # B has more neurons than A: unmatched ones at the end
  cols_b = np.concatenate([cols_b, rest_b])
  r = len(irrep_names)
  palette = irrep_colors(r)
  cmap_irrep = mcolors.ListedColormap(palette + [(0.85, 0.85, 0.85, 1.0)])  # last colour: dead neuron
  strip_a = np.where(live_a, dom_a, r)[order]
  strip_b = np.where(live_b, dom_b, r)[cols_b]

  fig = Figure(figsize=(14.0, 4.8), layout="constrained")
  gs = fig.add_gridspec(2, 4, width_ratios=[0.04, 1.0, 0.9, 0.8], height_ratios=[0.04, 1.0])
  ax_top = fig.add_subplot(gs[0, 1])
  ax_left = fig.add_subplot(gs[1, 0])
  ax = fig.add_subplot(gs[1, 1])
  im = ax.imshow(np.nan_to_num(corr_NxN[order][:, cols_b]), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                 interpolation="nearest")
  ax.set_xlabel(f"{labels[1]} neurons (matched order)")
  ax.set_yticks([])
  ax_top.imshow(strip_b[None, :], cmap=cmap_irrep, vmin=-0.5, vmax=r + 0.5, aspect="auto",
                interpolation="nearest")
  ax_left.imshow(strip_a[:, None], cmap=cmap_irrep, vmin=-0.5, vmax=r + 0.5, aspect="auto",
                 interpolation="nearest")
  ax_top.set_axis_off()
  ax_left.set_xticks([])
  ax_left.set_yticks([])
  ax_left.set_ylabel(f"{labels[0]} neurons (by dominant irrep)")
  fig.colorbar(im, ax=ax, shrink=0.8, label="Pearson correlation")

  both = live_a & live_b[perm]
  same = dom_a == dom_b[perm]
  _matched_bars(fig.add_subplot(gs[:, 2]), matched[order], same[order], float(np.mean(same[both])) if both.any()
                else float("nan"), labels[0])
  _matched_irreps(fig.add_subplot(gs[:, 3]), dom_a[both], dom_b[perm][both], irrep_names, palette, labels)
  fig.suptitle(title, fontsize=9)
  return fig


def _matched_bars(ax_m, vals, same, agree: float, label_a: str) -> None:
  """The matched correlation of each of A's neurons (in the matrix rows' order), coloured by whether the
  pair shares its dominant irrep; ``agree``: the share of live pairs that do."""
  n = vals.shape[0]
  x = np.arange(n)
  ok = np.isfinite(vals)
  ax_m.bar(x[ok], vals[ok], width=1.0, color=np.where(same[ok], "C2", "C7"))
  ax_m.set_xlim(-0.5, n - 0.5)
  ax_m.set_ylim(min(-0.1, float(np.nanmin(vals)) if ok.any() else 0.0), 1.0)
  ax_m.set_xlabel(f"{label_a} neuron (same order as the matrix rows)")
  ax_m.set_ylabel("matched correlation")
  ax_m.set_title(f"mean matched corr {np.nanmean(vals) if ok.any() else float('nan'):.2f}; same dominant "
                 f"irrep {agree:.0%}", fontsize=8)
  ax_m.legend(handles=[Patch(fc="C2", label="same dominant irrep"), Patch(fc="C7", label="different")],
              fontsize=7, loc="lower left")


def _matched_irreps(ax_c, dom_a, dom_partner, irrep_names, palette, labels) -> None:
  """Counts of (dominant irrep of a live neuron of A, that of its partner in B)."""
  r = len(irrep_names)
  conf = np.zeros((r, r), int)
  np.add.at(conf, (dom_a, dom_partner), 1)
  ax_c.imshow(conf, cmap="Greys", interpolation="nearest")
  for i in range(r):
    for j in range(r):
      if conf[i, j]:
        ax_c.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=7,
                  color="white" if conf[i, j] > 0.6 * conf.max() else "black")
  ax_c.set_xticks(range(r), irrep_names, rotation=45, ha="right", fontsize=7)
  ax_c.set_yticks(range(r), irrep_names, fontsize=7)
  for tick, c in zip(ax_c.get_xticklabels(), palette):
    tick.set_color(c)
  for tick, c in zip(ax_c.get_yticklabels(), palette):
    tick.set_color(c)
  ax_c.set_xlabel(f"dominant irrep in {labels[1]}")
  ax_c.set_ylabel(f"dominant irrep in {labels[0]}")
  ax_c.set_title("matched pairs", fontsize=8)


def learning_curves(step_E, train_acc_ExS, test_acc_ExS, runs: Sequence[Mapping],
                    generalised: float = 0.99) -> Figure:
  """Train (dashed) and test (solid) accuracy of every run against steps (log-x), one panel per group.

  Args:
    step_E: evaluation steps; train_acc_ExS, test_acc_ExS: accuracies per step and run.
    runs: one row per run (``runs.json``), giving its group and seed number.
    generalised: the test accuracy at which a run counts as generalised (a dotted line).
  """
  step_E = np.asarray(step_E)
  train_acc_ExS, test_acc_ExS = np.asarray(train_acc_ExS, float), np.asarray(test_acc_ExS, float)
  if train_acc_ExS.shape != test_acc_ExS.shape or train_acc_ExS.shape != (step_E.size, len(runs)):
    raise ValueError(f"learning_curves: accuracies {train_acc_ExS.shape}, {test_acc_ExS.shape} do not match "
                     f"{step_E.size} steps x {len(runs)} runs")
  specs = list(dict.fromkeys(r["group"] for r in runs))
  labels = plots.run_labels(runs)
  fig, axes = plots.grid(len(specs))
  for ax, spec in zip(axes, specs):
    idx = [i for i, r in enumerate(runs) if r["group"] == spec]
    cmap = matplotlib.colormaps["viridis"]
    alpha = 0.9 if len(idx) <= 8 else max(0.25, 8.0 / len(idx))
    for j, i in enumerate(idx):
      c = cmap(j / max(len(idx) - 1, 1) * 0.9)
      ax.plot(step_E, test_acc_ExS[:, i], color=c, lw=1.3, alpha=alpha, label=labels[i])
      ax.plot(step_E, train_acc_ExS[:, i], color=c, lw=1.0, ls="--", alpha=alpha * 0.8)
    ax.axhline(generalised, color="0.6", lw=0.8, ls=":")
    final = test_acc_ExS[-1, idx] if step_E.size else np.zeros(0)
    n_gen = int(np.sum(final >= generalised))
    ax.set_title(f"{spec}: {n_gen}/{len(idx)} runs generalised")
    plots.step_axis(ax, step_E)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.25)
    handles = [Line2D([], [], color="k", lw=1.3, label="test"),
               Line2D([], [], color="k", lw=1.0, ls="--", label="train")]
    if len(idx) <= 8:
      handles += ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
  return fig
