"""The phase-diagram section of a study that sweeps ``task.size_mult`` (Tian 2025, "Li2"): where
generalisation starts across group orders, training sizes, optimisers and seeds, and which features emerge.

``study_sections(study, save)`` reads every bucket of a study (``universality.engine.replay.Study``): each
run's final metrics and first step at the generalisation bar (``metrics.jsonl``) and its final parameters
(the per-neuron irrep features, ``passes.emergence``), fits the transition per (group, optimiser)
(``phase``) and returns markdown with these figures:

  phase_share.png      generalised share against n / (s · M ln M), one curve per group, a panel per optimiser
  phase_heatmap.png    generalised share over (group by order, multiplier), a panel per optimiser
  phase_n_star.png     n* / (s · M ln M) against M with its bootstrap interval, per optimiser
  phase_steps.png      steps to generalise against n / (s · M ln M)
  phase_features.png   single-irrep neurons and neuron entropy against the multiplier, generalised or not

and ``phase.json`` (``phase.summary`` plus the features per run) beside them. Runs trained on every pair
(n = M², no test pairs) carry no test accuracy and are left out of the diagram.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure

from universality.engine import groups as groups_lib
from universality.engine import irreps as irreps_lib
from universality.engine import markdown
from universality.engine import optim
from universality.engine import plots
from universality.engine.families.group import family as family_lib
from universality.engine.families.group import models
from universality.engine.families.group import phase
from universality.engine.families.group.passes import emergence


def _label(opt: str, row: dict, varies: bool) -> str:
  """A cell's optimiser: the bucket's, with lr and weight decay when the study sweeps them."""
  return f"{opt} lr{row['lr']:g} wd{row['weight_decay']:g}" if varies else opt


def _weights(view, params_S) -> tuple[np.ndarray, np.ndarray] | None:
  """Each run's input functions ``[S, V, N]`` of both sides: Li2's W rows, the MLP's effective weights."""
  spec = models.spec_of(view.config.model)
  if isinstance(spec, models.TransformerSpec):
    return None
  stacked = models.stacked(spec)
  if isinstance(spec, models.MlpSpec):
    eff = stacked.effective(params_S)
    return np.asarray(eff.pre_a), np.asarray(eff.pre_b)
  mats = stacked.matrices(params_S)
  return np.asarray(mats["embed_a"]), np.asarray(mats["embed_b"])


def collect(study, *, threshold: float = emergence.DEFAULT_THRESHOLD
            ) -> tuple[list[phase.Outcome], list[dict | None]]:
  """Every run of the study with a test set as a ``phase.Outcome``, and beside it its features
  (``emergence.run_summaries``; None for models without additive inputs)."""
  cfg = study.config
  family = study.family
  rows_all = [r for v in study.buckets.values() for r in v.runs]
  varies = len({(r["lr"], r["weight_decay"]) for r in rows_all}) > 1
  outcomes, features = [], []
  for view in study.buckets.values():
    opt = optim.names(view.config.opt)[0]
    metrics = view.metrics()
    if not len(metrics["step"]):
      continue
    last = {k: v[-1] for k, v in metrics.items() if k != "step"}
    gen_S = family.generalised_mask(last)
    first = phase.first_step(metrics["step"], metrics[family.progress_metric], family.generalised_threshold)
    params = view.params()
    inputs = _weights(view, params)
    for spec in view.groups:
      group = groups_lib.get(spec)
      at = [i for i, r in enumerate(view.runs) if r["group"] == spec]
      reps = irreps_lib.real_irreps(group)
      summ = [None] * len(at)
      if inputs is not None:
        sel = np.asarray(at)
        feats = emergence.neuron_features(inputs[0][sel, :group.order], inputs[1][sel, :group.order], reps,
                                          threshold=threshold)
        summ = emergence.run_summaries(feats, reps)
      s = family_lib.law_s(cfg, spec)
      for j, i in enumerate(at):
        r = view.runs[i]
        n = int(round(r["train_frac"] * group.order ** 2))
        if n >= group.order ** 2:
          continue
        unit = float(cfg.task.size_c) * s * group.order * math.log(group.order)
        mult = float(r.get("size_mult", n / unit))
        outcomes.append(phase.Outcome(group=spec, order=group.order, optimiser=_label(opt, r, varies), n=n,
                                      mult=mult, s=s, seed=int(r["seed"]), generalised=bool(gen_S[i]),
                                      steps=first[i] if gen_S[i] else None))
        features.append(summ[j])
  return outcomes, features


def _x(o_or_cell, n) -> float:
  """n in units of s · M ln M."""
  return n / (o_or_cell.s * o_or_cell.order * math.log(o_or_cell.order))


def _panels(n: int) -> tuple[Figure, list]:
  return plots.grid(n, ncols_max=2, panel=(5.2, 3.6))


def share_figure(cells: list[phase.Cell], c: float) -> Figure:
  opts = list(dict.fromkeys(x.optimiser for x in cells))
  fig, axes = _panels(len(opts))
  for ax, opt in zip(axes, opts):
    for cell in sorted((x for x in cells if x.optimiser == opt), key=lambda x: x.order):
      ax.plot([_x(cell, n) for n in cell.n], cell.generalised_share, "o-", ms=3,
              label=f"{cell.group} (M={cell.order})")
    ax.axvline(c, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("n / (s · M ln M)  (dotted: the law's c)")
    ax.set_ylabel("share of seeds generalised")
    ax.set_title(opt, fontsize=9)
    ax.legend(fontsize=6)
  return fig


def heatmap_figure(cells: list[phase.Cell]) -> Figure:
  opts = list(dict.fromkeys(x.optimiser for x in cells))
  fig, axes = _panels(len(opts))
  mults = sorted({m for x in cells for m in x.mults})
  for ax, opt in zip(axes, opts):
    rows = sorted((x for x in cells if x.optimiser == opt), key=lambda x: (x.order, x.group))
    grid = np.full((len(rows), len(mults)), np.nan)
    for i, cell in enumerate(rows):
      for m, v in zip(cell.mults, cell.generalised_share):
        grid[i, mults.index(m)] = v
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        if np.isfinite(grid[i, j]):
          ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                  color="black" if grid[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(mults)), [f"{m:g}" for m in mults], fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{x.group} ({x.order})" for x in rows], fontsize=7)
    ax.set_xlabel("size multiplier (n = mult · c · s · M ln M)")
    ax.set_title(opt, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
  return fig


def n_star_figure(cells: list[phase.Cell]) -> Figure:
  fig = Figure(figsize=(5.6, 3.8), layout="constrained")
  ax = fig.subplots()
  opts = list(dict.fromkeys(x.optimiser for x in cells))
  for k, opt in enumerate(opts):
    pts = [x for x in cells if x.optimiser == opt and x.transition.n_star is not None]
    if not pts:
      continue
    m = np.asarray([x.order for x in pts], float) * (1 + 0.015 * (k - (len(opts) - 1) / 2))
    y = np.asarray([_x(x, x.transition.n_star) for x in pts])
    lo = np.asarray([_x(x, x.transition.low) if x.transition.low > 0 else 0.0 for x in pts])
    hi = np.asarray([_x(x, x.transition.high) if np.isfinite(x.transition.high) else np.nan for x in pts])
    hi = np.where(np.isfinite(hi), hi, 2 * y)
    yerr = [np.maximum(y - lo, 0), np.maximum(hi - y, 0)]
    ax.errorbar(m, y, yerr=yerr, fmt="o", ms=4, capsize=2, label=opt)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("group order M")
  ax.set_ylabel("n* / (s · M ln M)")
  ax.set_title("transition (half the seeds generalise); flat if n* ∼ M ln M", fontsize=9)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  return fig


def steps_figure(outcomes: list[phase.Outcome]) -> Figure:
  opts = list(dict.fromkeys(o.optimiser for o in outcomes))
  fig, axes = _panels(len(opts))
  for ax, opt in zip(axes, opts):
    groups = sorted({(o.order, o.group) for o in outcomes if o.optimiser == opt})
    for k, (_, g) in enumerate(groups):
      pts = [o for o in outcomes if o.optimiser == opt and o.group == g and o.generalised and o.steps]
      if pts:
        ax.scatter([_x(o, o.n) for o in pts], [o.steps for o in pts], s=8, alpha=0.6, color=f"C{k % 10}",
                   label=g)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n / (s · M ln M)")
    ax.set_ylabel("first step at the generalisation bar")
    ax.set_title(opt, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  return fig


def features_figure(outcomes: list[phase.Outcome], features: list[dict | None]) -> Figure:
  fig = Figure(figsize=(10.0, 3.6), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  opts = list(dict.fromkeys(o.optimiser for o in outcomes))
  for k, opt in enumerate(opts):
    for gen, style in ((True, "o-"), (False, "x--")):
      mults = sorted({o.mult for o in outcomes if o.optimiser == opt})
      single, ent = [], []
      for m in mults:
        f = [ft for o, ft in zip(outcomes, features)
             if ft and o.optimiser == opt and o.mult == m and o.generalised == gen and ft["live"]]
        single.append(np.mean([ft["single_fraction"] for ft in f]) if f else np.nan)
        ent.append(np.mean([ft["mean_entropy"] for ft in f]) if f else np.nan)
      label = f"{opt}, {'generalised' if gen else 'not generalised'}"
      ax1.plot(mults, single, style, color=f"C{k}", ms=4, label=label)
      ax2.plot(mults, ent, style, color=f"C{k}", ms=4, label=label)
  for ax, what in ((ax1, "share of live neurons single-irrep"), (ax2, "mean neuron entropy (nats)")):
    ax.set_xscale("log")
    ax.set_xlabel("size multiplier")
    ax.set_ylabel(what)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  return fig


def _fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return "–"
  return f"{x:.{digits}g}"


def _interval(cell: phase.Cell) -> str:
  t = cell.transition
  if t.n_star is None:
    return f"{t.where} the sizes tried"
  return f"{t.n_star:.0f} [{t.low:.0f}, {t.high:.0f}]"


def _scaling_lines(fits: dict[str, phase.ScalingFit]) -> list[str]:
  rows = []
  for opt, fit in fits.items():
    co, se = fit.coefficients, fit.stderr or {}
    free = ("–" if co is None else ", ".join(f"{k} {co[k]:.2f}" + (f" ± {se[k]:.2f}" if k in se else "")
                                             for k in ("ln M", "ln ln M", "1")))
    slope = "–" if fit.slope_m_log_m is None else (
        f"{fit.slope_m_log_m:.2f}" + (f" ± {fit.slope_stderr:.2f}" if fit.slope_stderr is not None else ""))
    ratios = [v for v in fit.ratio.values()]
    spread = "–" if not ratios else f"{min(ratios):.2f} – {max(ratios):.2f}"
    rows.append([opt, len(fit.groups), free, slope, spread])
  return [markdown.markdown_table(
      ["optimiser", "groups with n*", "ln(n*/s) = a ln M + b ln ln M + γ (predicted a = b = 1)",
       "ln(n*/(s ln M)) = a ln M + γ: a (predicted 1)", "n*/(s·M ln M) across groups"], rows)]


def _pair_lines(summ: dict) -> list[str]:
  md = []
  for name, pairs in summ["pairs"].items():
    a, b = name.split(" vs ")
    if not pairs:
      continue
    rows = [[p["group"], p["order"], f"{p['mult']:g}", p["n"], f"{p[a]['share']:.2f} ({p[a]['runs']})",
             f"{p[b]['share']:.2f} ({p[b]['runs']})", _fmt(p[a]["median_steps"]), _fmt(p[b]["median_steps"])]
            for p in sorted(pairs, key=lambda p: (p["order"], p["group"], p["n"]))]
    wins = sum(p[b]["share"] > p[a]["share"] for p in pairs)
    losses = sum(p[b]["share"] < p[a]["share"] for p in pairs)
    md += [f"**{b} against {a} at equal n**: {b} generalises in more seeds at {wins} of {len(pairs)} sizes, "
           f"in fewer at {losses}.", "",
           "<details><summary>Every size</summary>", "",
           markdown.markdown_table(["group", "M", "mult", "n", f"{a} share (runs)", f"{b} share (runs)",
                                    f"{a} median steps", f"{b} median steps"], rows), "</details>", ""]
  return md


def _feature_lines(outcomes: list[phase.Outcome], features: list[dict | None], cells: list[phase.Cell]
                   ) -> list[str]:
  if not any(features):
    return ["The model's inputs are not additive in a and b (transformer): no per-neuron irrep features.", ""]
  rows = []
  for cell in cells:
    per = [(o, f) for o, f in zip(outcomes, features)
           if f and f["live"] and o.group == cell.group and o.optimiser == cell.optimiser]
    t = cell.transition
    bar = t.n_star if t.n_star is not None else (0.0 if t.where == "below" else math.inf)
    above = [f for o, f in per if o.n > bar and o.generalised]
    below = [f for o, f in per if not o.generalised]
    counts: dict[str, int] = {}
    for f in above:
      for name, c in f["single_irreps"].items():
        counts[name] = counts.get(name, 0) + 1
    n_irreps = len(irreps_lib.real_irreps(groups_lib.get(cell.group)))
    every = [k for k, v in counts.items() if v == len(above)]
    rest = sorted(((k, v) for k, v in counts.items() if v < len(above)), key=lambda kv: (-kv[1], kv[0]))
    used = (f"{len(every)} of {n_irreps - 1} in every run" if above else "–") + "".join(
        f"; {k} ({v})" for k, v in rest[:6]) + ("; …" if len(rest) > 6 else "")

    def mean(fs, key):
      vals = [f[key] for f in fs if f[key] is not None]
      return float(np.mean(vals)) if vals else None

    rows.append([cell.group, cell.optimiser, len(above), _fmt(mean(above, "single_fraction")),
                 _fmt(mean(above, "mean_entropy")), len(below), _fmt(mean(below, "single_fraction")),
                 _fmt(mean(below, "mean_entropy")), f"{math.log(n_irreps):.2f}", used])
  return [markdown.markdown_table(
      ["group", "optimiser", "generalised runs above n*", "single-irrep share", "mean entropy",
       "runs not generalised", "single-irrep share", "mean entropy", "max entropy (log R)",
       "non-trivial irreps some single-irrep neuron uses, in every run above n*; others (runs)"], rows)]


def study_sections(study, save: Callable[[Any, str], str], *, n_boot: int = phase.DEFAULT_BOOTSTRAP
                   ) -> list[str]:
  """The phase-diagram section of a study sweeping ``task.size_mult`` (module docstring); [] otherwise.
  ``save(fig, name)`` writes a PNG (or, for a ``str``, the text) and returns its name."""
  cfg = study.config
  if not family_lib.size_mults(cfg) or not study.buckets:
    return []
  outcomes, features = collect(study)
  if not outcomes:
    return []
  seed = int(cfg.seed)
  cells = phase.cells(outcomes, n_boot=n_boot, seed=seed)
  summ = phase.summary(outcomes, n_boot=n_boot, seed=seed, cells_=cells)
  fits = phase.scaling_by_optimiser(cells)
  c = float(cfg.task.size_c)
  summ["features"] = [dict(group=o.group, optimiser=o.optimiser, n=o.n, seed=o.seed, **(f or {}))
                      for o, f in zip(outcomes, features)]
  text = json.dumps(summ, indent=1, sort_keys=True, allow_nan=False, default=_json_default)
  data = save(text, "phase.json")
  md = ["## Phase diagram", "",
        f"Tian (2025) predicts generalisation above n ∼ M ln M training pairs (its code trains on "
        f"c · s · M ln M with c = {c:g}). Each run counts as generalised when its final test accuracy "
        f"reaches {study.family.generalised_threshold:g}; {len(outcomes)} runs with a test set, in "
        f"{len(cells)} (group, optimiser) cells. n* is the size at which the logistic fit in ln n crosses "
        f"one half, with a {phase.DEFAULT_LEVEL:.0%} bootstrap interval over seeds ({n_boot} samples); "
        f"every number is in [{data}]({data}).", "",
        f"![generalised share]({save(share_figure(cells, c), 'phase_share.png')})", "",
        f"![heatmap]({save(heatmap_figure(cells), 'phase_heatmap.png')})", "",
        "### The transition n*(M)", ""]
  rows = [[x.group, x.order, f"{x.s:g}", x.optimiser, x.transition.runs, _interval(x), _fmt(x.mult_star),
           _fmt(None if x.transition.n_star is None else _x(x, x.transition.n_star)),
           _fmt(x.transition.slope)] for x in sorted(cells, key=lambda x: (x.optimiser, x.order, x.group))]
  md += [markdown.markdown_table(["group", "M", "s", "optimiser", "runs", "n* [interval]",
                                  "n* / (c·s·M ln M)", "n* / (s·M ln M)", "slope in ln n"], rows)]
  md += _scaling_lines(fits)
  md += ["", f"![n* against M]({save(n_star_figure(cells), 'phase_n_star.png')})", "",
         "### Steps to generalise", "",
         f"![steps to generalise]({save(steps_figure(outcomes), 'phase_steps.png')})", ""]
  md += ["### Optimisers at equal n", ""] + _pair_lines(summ) if summ["pairs"] else []
  md += ["### Features that emerge", "",
         "Per neuron: the share of its input weights' Fourier power (both inputs) in each real irrep, and "
         "that distribution's entropy in nats; a single-irrep neuron has ≥ "
         f"{emergence.DEFAULT_THRESHOLD:g} of its non-constant power in one irrep (``passes/emergence``). "
         "Li2's energy E is not computed: its formula could not be established from the paper's code.", "",
         f"![features]({save(features_figure(outcomes, features), 'phase_features.png')})", ""]
  md += _feature_lines(outcomes, features, cells)
  return md + [""]


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  raise TypeError(f"not JSON: {type(x).__name__}")
