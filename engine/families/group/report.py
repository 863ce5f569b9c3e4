"""The group family's report sections: per cohort, headline numbers, key-irrep tables and figures.

Images (``<c>`` is a cohort's position and a filename-safe name, e.g. ``c0_S5_lr0.001_wd1_frac0.4``)::

  learning_curves.png           train / test accuracy of every run, one panel per group, log-x
  <c>_similarity.png            runs × irreps logit similarity (key irreps outlined)
  <c>_key_irreps.png            key-irrep and learned-first counts per irrep
  <c>_learning_order.png        step at which each run learned each irrep
  <c>_learning_order_seed<k>.png  one run's similarity curves over the checkpoints
  <c>_correlation.png           max cross-seed neuron correlation vs its rotation baseline; excess
  <c>_cka.png                   linear CKA between the runs' hidden representations
  <c>_connectivity.png          mean loss over seed pairs along the linear path between their weights
  <c>_convergent.png            sparse prediction against λ (analysis setting ``convergent``)

The figures come from the notebook view's ``plot`` (one plotting code path for notebooks and reports).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from universality.engine import plots
from universality.engine.analysis import convergent
from universality.engine.families.group.passes import records
from universality.engine.markdown import file_prefix, markdown_table

_FS_TYPE = {1: "real", 0: "complex", -1: "quaternionic"}


def _fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return "–"
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{float(x):.{digits}f}"


def _mean(values) -> float | None:
  vals = [float(v) for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------------------
# Markdown tables (also used by the notebook).


def _labels(runs) -> list[str]:
  return plots.run_labels([r.row for r in runs])


def key_irrep_rows(task: records.Task, runs: Sequence[records.RunRecord]) -> list[dict]:
  """One row per irrep: name, dim, type, runs where it is key, runs that learned it first, mean logit
  similarity at the final step, and live neurons (over all runs) whose dominant irrep it is."""
  rows = []
  for irrep in task.irreps:
    name = irrep.name
    rows.append({
        "irrep": name, "dim": irrep.dim, "type": _FS_TYPE.get(irrep.frobenius_schur, "?"),
        "key": sum(name in r.key_irreps for r in runs),
        "first": sum(r.first_learned == name for r in runs),
        "similarity": _mean(r.logit_similarity.get(name) for r in runs),
        "neurons": sum((r.neurons.dominant_counts or {}).get(name, 0) for r in runs if r.neurons),
    })
  return rows


def key_irrep_table(task: records.Task, runs: Sequence[records.RunRecord]) -> str:
  """The key-irrep frequency table of *A Toy Model of Universality* as markdown: for each irrep, in how
  many of the runs it is a key irrep and in how many it was learned first."""
  n = len(runs)
  header = ["irrep", "dim", "type", f"key irrep (of {n} runs)", f"learned first (of {n} runs)",
            "mean logit similarity", "neurons dominant"]
  rows = [[r["irrep"], r["dim"], r["type"], r["key"], r["first"], _fmt(r["similarity"]), r["neurons"]]
          for r in key_irrep_rows(task, runs)]
  return markdown_table(header, rows)


def results_table(aggregate: records.Aggregate, runs: Sequence[records.SummaryRun]) -> str:
  """One-row table of a cohort's headline numbers."""
  n = len(runs)
  gen = sum(bool(r.generalised) for r in runs)
  corr = aggregate.correlation
  agree = corr.irrep_agreement if corr else None
  means = aggregate.similarity_means or {}
  header = ["runs", "generalised", "mean test acc", "mean fraction explained", "explained by key irreps",
            "mean excess corr", "universal neurons", "best match shares dominant irrep (chance)",
            "matched neuron corr", "CKA", "Procrustes"]
  row = [n, f"{gen}/{n}", _fmt(_mean(r.test_acc for r in runs)),
         _fmt(aggregate.mean_fraction_explained),
         _fmt(_mean(r.fraction_explained_key for r in runs)),
         _fmt(corr.mean_excess if corr else None),
         "–" if corr is None or corr.universal_fraction is None else f"{corr.universal_fraction:.1%}",
         "–" if agree is None or agree.rate is None else f"{agree.rate:.1%} ({agree.chance:.1%})",
         _fmt(aggregate.matching.mean_offdiagonal if aggregate.matching else None),
         _fmt(means.get("cka")), _fmt(means.get("procrustes"))]
  return markdown_table(header, [row])


def key_irrep_sets_table(runs: Sequence[records.RunRecord], limit: int = 8) -> str:
  """The most frequent sets of key irreps and how many runs use each."""
  counts: dict[tuple, int] = {}
  for r in runs:
    k = tuple(r.key_irreps)
    counts[k] = counts.get(k, 0) + 1
  ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  rows = [[", ".join(k) or "(none)", c] for k, c in ordered[:limit]]
  if len(ordered) > limit:
    rows.append([f"… {len(ordered) - limit} more sets", sum(c for _, c in ordered[limit:])])
  return markdown_table(["key irreps", "runs"], rows)


def runs_table(runs: Sequence[records.SummaryRun]) -> str:
  """Per run: seed number, final test accuracy, fraction explained, key irreps in learning order."""
  rows = []
  for label, r in zip(_labels(runs), runs):
    order = r.key_irreps_in_order or []
    steps = [r.learning_order.get(n) for n in order]
    rows.append([label, _fmt(r.done), _fmt(r.test_acc), _fmt(r.fraction_explained),
                 ", ".join(f"{n} ({s})" for n, s in zip(order, steps)) or "(none)",
                 _fmt(r.neurons.mean_excess if r.neurons else None)])
  return markdown_table(["run", "generalised", "test acc", "fraction explained", "key irreps (step learned)",
                 "mean excess corr"], rows)


def coset_lines(task: records.Task, aggregate: records.Aggregate, runs: Sequence[records.RunRecord],
                limit: int = 10) -> list[str]:
  """The cosets section of a cohort: coset neurons per input side, and the subgroup classes they use."""
  if task.subgroups is None or aggregate.cosets is None:
    return []
  md = ["### Cosets", ""]
  if not task.proper_nontrivial:
    return md + [f"The group has no proper non-trivial subgroup ({task.subgroups} subgroups): no coset "
                 "neurons.", ""]
  source = runs[0].cosets.source if runs and runs[0].cosets else None
  what = "P_a[:, n] and P_b[:, n]" if source == "pre_activation" else "the activation's mean over the other input"
  md += [f"For each live neuron and input side, the share of the variance of its input function ({what}) "
         f"explained by the left or right cosets of each of the {task.proper_nontrivial} proper "
         f"non-trivial subgroups (of {task.subgroups} subgroups in {task.subgroup_classes} conjugacy "
         "classes, counting the trivial one and the whole group); the best subgroup maximises the adjusted "
         f"share; a coset neuron's best share is ≥ {task.coset_threshold:g}. Induced share: the part of "
         "the neuron's non-constant input in the "
         "irreps of Ind_H^G 1 of its best subgroup H.", ""]
  rows = []
  for side in ("a", "b"):
    per = [r.cosets.sides.get(side) for r in runs if r.cosets and r.cosets.sides]
    per = [p for p in per if p]
    rows.append([side, sum(p.coset_neurons for p in per), _fmt(_mean(p.coset_fraction for p in per)),
                 sum(p.left for p in per), sum(p.right for p in per),
                 _fmt(_mean(p.mean_best_share for p in per)), _fmt(_mean(p.mean_induced_share for p in per))])
  md += [markdown_table(["input", "coset neurons (all runs)", "mean fraction of live neurons", "left cosets",
                 "right cosets", "mean best share", "mean induced share"], rows)]
  return md + _subgroup_lines(list(aggregate.cosets.by_subgroup.items()), limit)


def _subgroup_lines(classes: list, limit: int) -> list[str]:
  if not classes:
    return []
  rows = [[label, c.order, c.conjugates, _fmt(c.normal), c.neurons, c.runs,
           " + ".join(f"{m}·{n}" if m > 1 else n for n, m in c.induced.items())]
          for label, c in classes[:limit]]
  if len(classes) > limit:
    rows.append([f"… {len(classes) - limit} more classes", "", "", "", sum(c.neurons for _, c in classes[limit:]),
                 "", ""])
  return ["Subgroup classes used by coset neurons:", "",
          markdown_table(["subgroup class", "order", "conjugates", "normal", "coset neurons", "runs",
                          "Ind_H^G 1"], rows)]


def margin_lines(task: records.Task, aggregate: records.Aggregate, runs: Sequence[records.SummaryRun]
                 ) -> list[str]:
  """The margins section of a cohort (MLP only): normalised margin, single-irrep neurons, irrep coverage."""
  agg = aggregate.margins
  if not agg:
    return []
  pred = task.predicted_coverage
  md = ["### Margins", "",
        "Normalised margin: min over all pairs of (correct logit − best wrong logit) / Σ‖θ_n‖² over the "
        "effective per-neuron weights θ_n = (P_a[:, n], P_b[:, n], U[n]) (the MLP is 2-homogeneous in them). "
        f"Single-irrep neurons: ≥ {task.single_threshold:g} of the non-constant pre-activation in one "
        "irrep. Coverage: share of the non-trivial irreps that some single-irrep neuron uses; the max-margin "
        "prediction of *Feature emergence via margin maximization* is "
        + ("every irrep (coverage 1) for cyclic groups." if pred is not None else
           "not stated for this group."), ""]
  header = ["runs with positive margin", "mean normalised margin", "mean single-irrep neurons",
            "mean coverage (generalised runs)", "max-margin coverage"]
  row = [f"{agg.positive_margin_runs}/{len(runs)}", _fmt(agg.mean_normalised_margin, 6),
         "–" if agg.mean_single_irrep_fraction is None else f"{agg.mean_single_irrep_fraction:.1%}",
         _fmt(agg.mean_irrep_coverage_generalised), _fmt(pred)]
  md += [markdown_table(header, [row])]
  rows = [[label, _fmt(r.margins.margin), _fmt(r.margins.normalised_margin, 6),
           f"{r.margins.single_irrep_fraction:.1%}", _fmt(r.margins.irrep_coverage),
           ", ".join(r.margins.covered_irreps) or "(none)"]
          for label, r in zip(_labels(runs), runs) if r.margins]
  md += ["<details><summary>Margins per run</summary>", "",
         markdown_table(["run", "margin", "normalised margin", "single-irrep neurons", "coverage", "irreps covered"],
                rows), "</details>", ""]
  return md


def connectivity_lines(aggregate: records.Aggregate, save: Callable[[Any, str], str] | None = None, fig=None,
                       name: str = "") -> list[str]:
  """The mode-connectivity section of a cohort: barriers per alignment, split by shared key irreps."""
  conn = aggregate.connectivity
  if not conn:
    return []
  md = ["### Mode connectivity", "",
        f"Loss on all pairs along the straight line between two seeds' {conn.weights} weights "
        f"({conn.points} points); barrier = max over the path of the loss minus the line between the end "
        "losses. The second run's neurons are left as they are (raw), or reordered by activation matching "
        "(Hungarian on neuron correlations) or by weight matching (one linear assignment on the neurons' "
        "effective weights). Same / different key irreps: pairs of generalised runs whose key-irrep sets "
        "are equal / differ.", ""]
  rows = [[align, _fmt(a.mean_barrier), f"{_fmt(a.mean_barrier_same_key_irreps)} ({a.pairs_same_key_irreps})",
           f"{_fmt(a.mean_barrier_different_key_irreps)} ({a.pairs_different_key_irreps})",
           _fmt(a.mean_min_accuracy)] for align, a in conn.alignments.items()]
  md += [markdown_table(["alignment", "mean barrier", "same key irreps (pairs)", "different key irreps (pairs)",
                 "mean lowest accuracy on the path"], rows)]
  if save is not None and fig is not None:
    md += [f"![loss along the path]({save(fig, name)})", ""]
  return md


def redundancy_lines(aggregate: records.Aggregate, runs: Sequence[records.SummaryRun],
                     tolerance: float | None) -> list[str]:
  """The redundancy section of a cohort: feature complexity per run beside its number of key irreps."""
  agg = aggregate.redundancy
  if not agg:
    return []
  tol = "" if tolerance is None else f" by more than {tolerance:g}"
  md = ["### Redundancy", "",
        "Iterative feature merging: neurons never active on any pair are dropped, then the two neurons with "
        "the most similar incoming weights (cosine) are merged, the outgoing weights folded in, until the "
        f"loss on all pairs would rise{tol}. The neurons left are the run's feature complexity.", ""]
  by_keys = agg.feature_complexity_by_key_irreps or {}
  md += [markdown_table(["mean feature complexity", "generalised runs", "by number of key irreps (generalised)"],
                [[_fmt(agg.mean_feature_complexity, 1), _fmt(agg.mean_feature_complexity_generalised, 1),
                  ", ".join(f"{k}: {v:.1f}" for k, v in by_keys.items()) or "–"]])]
  rows = [[label, r.redundancy.width, r.redundancy.never_active, r.redundancy.feature_complexity,
           len(r.key_irreps) if r.done else "–", _fmt(r.redundancy.loss, 4), _fmt(r.redundancy.merged_loss, 4)]
          for label, r in zip(_labels(runs), runs) if r.redundancy]
  md += ["<details><summary>Feature complexity per run</summary>", "",
         markdown_table(["run", "width", "never active", "feature complexity", "key irreps", "loss", "merged loss"],
                rows), "</details>", ""]
  return md


def convergent_lines(aggregate: records.Aggregate, save: Callable[[Any, str], str] | None = None, fig=None,
                     name: str = "") -> list[str]:
  """The Convergent Learning sections of a cohort (analysis setting ``convergent``): per layer, the
  one-to-one table, held-out loss and units used against λ (a table, and the figure ``fig`` saved as
  ``name``), and the spectral clusters; none when off."""
  conv = aggregate.convergent
  if not conv:
    return []
  md = []
  if save is not None and fig is not None:
    md += [f"![sparse prediction against λ]({save(fig, name)})", ""]
  for layer, entry in conv.items():
    md += [f"Convergent learning on the {layer} layer: {entry.get('inputs', '?')} input pairs sampled from "
           "the group's |G|² pairs at the last checkpoint.", "",
           convergent.sections(convergent.from_json(entry), layer=layer)]
  return md


def settings_line(settings: Mapping[str, Any], threshold: float) -> str:
  return (f"- Analysis: key irreps have final logit similarity > {settings['key_threshold']:g} and an irrep "
          f"is learned at the first checkpoint with similarity > {settings['order_threshold']:g} (the "
          "thresholds of *A Toy Model of Universality*'s code: 0.005 and 0.05); a neuron is universal "
          f"when its excess correlation over the rotation baseline is > {settings['universal_threshold']:g}; "
          f"a coset neuron's best subgroup explains ≥ {settings['coset_threshold']:g} of an input's variance; "
          f"a single-irrep neuron has ≥ {settings['single_threshold']:g} of its pre-activation in one irrep; "
          f"mode connectivity on {settings['connectivity_points']} path points; feature merging stops at a "
          f"loss rise of {settings['merge_tolerance']:g}; "
          f"a run has generalised when its test accuracy is ≥ {threshold:g}, and only generalised runs enter "
          "the key-irrep and learning-order tables; cross-seed numbers compare the runs of one cohort (same "
          "group, lr, weight decay and train fraction; different seeds)" + convergent.settings_text(settings))


def generalised_records(runs: Sequence[records.SummaryRun]) -> list[records.SummaryRun]:
  """The runs that generalised: the only ones whose key irreps and learning order mean something."""
  return [r for r in runs if r.done]


def not_generalised_table(runs: Sequence[records.SummaryRun]) -> str:
  """The runs that did not generalise, apart: seed, test accuracy, loss and fraction of logits explained."""
  rows = [[label, _fmt(r.test_acc), _fmt(r.loss_all), _fmt(r.fraction_explained)]
          for label, r in zip(_labels(runs), runs) if not r.done]
  return markdown_table(["run", "test acc", "loss (all pairs)", "fraction explained"], rows)


def _key_irrep_lines(cs: records.CohortSummary, sub, prefix: str, save) -> list[str]:
  """A cohort's key-irrep tables, similarity heatmap and learning order."""
  task, runs, spec = cs.task, cs.runs, cs.spec
  done = generalised_records(runs)
  md = ["### Key irreps", "",
        f"Key irreps: logit similarity above {task.key_threshold:g} at step {task.steps[-1]}. "
        f"Learned first: the key irrep whose similarity crossed {task.order_threshold:g} at the "
        f"earliest checkpoint. Over the {len(done)} of {len(runs)} runs that generalised.", "",
        "Irreps: " + ", ".join(f"{r.name} (dim {r.dim}, {_FS_TYPE.get(r.frobenius_schur, '?')})"
                                for r in task.irreps), ""]
  if len(done) < len(runs):
    md += ["Runs that did not generalise (left out of the key-irrep and learning-order tables):", "",
           not_generalised_table(runs)]
  if done:
    md += [key_irrep_table(task, done), "Most frequent sets of key irreps:", "", key_irrep_sets_table(done),
           f"![key irreps]({save(sub.plot.key_irreps(spec), prefix + '_key_irreps.png')})", ""]
  md += [f"![logit similarity]({save(sub.plot.similarity_heatmap(spec), prefix + '_similarity.png')})", ""]
  if done:
    first = done[0]
    name = f"{prefix}_learning_order_seed{first.row['seed']}.png"
    fig = sub.plot.learning_order(group=spec, index=int(first.index))
    md += ["### Learning order", "",
           f"![learning order]({save(sub.plot.learning_order_group(spec), prefix + '_learning_order.png')})",
           "", f"One run ({_labels([first])[0]}): similarity of each irrep over the checkpoints.",
           "", f"![learning order of one run]({save(fig, name)})", ""]
  return md


def _cross_seed_lines(cs: records.CohortSummary, sub, prefix: str, save) -> list[str]:
  if len(cs.runs) < 2:
    return ["(One run: no cross-seed comparison.)", ""]
  spec = cs.spec
  return ["### Neurons across seeds", "",
          "Max correlation of each live neuron with the neurons of each other run of the cohort, against "
          "the same maximum after a random orthogonal rotation of the other run's neurons; excess = mean "
          "over the other runs of the difference.", "",
          f"![neuron correlations]({save(sub.plot.correlation_distribution(spec), prefix + '_correlation.png')})",
          "", f"![CKA]({save(sub.plot.cka(spec), prefix + '_cka.png')})", ""]


def sections(run, summary: Mapping, save: Callable[[Any, str], str]) -> list[str]:
  """Markdown lines of the family's sections; ``save(fig, name)`` writes a PNG and returns its name."""
  md = ["## Learning curves", "",
        "Test (solid) and train (dashed) accuracy of every run; the dotted line is the generalisation bar.",
        "", f"![learning curves]({save(run.plot.learning_curves(), 'learning_curves.png')})", ""]
  for ci, (cohort, entry) in enumerate(summary["cohorts"].items()):
    sub = run.select(index=entry["runs"])
    spec = sub.groups[0]
    cs = sub.cohort_records(spec)
    agg, runs = cs.aggregate, cs.runs
    prefix = file_prefix(ci, cohort)
    md += [f"## {cohort} (order {cs.task.order})", "", results_table(agg, runs)]
    md += _key_irrep_lines(cs, sub, prefix, save)
    md += _cross_seed_lines(cs, sub, prefix, save)
    md += coset_lines(cs.task, agg, runs)
    md += margin_lines(cs.task, agg, runs)
    md += redundancy_lines(agg, runs, summary.get("settings", {}).get("merge_tolerance"))
    if agg.connectivity:
      md += connectivity_lines(agg, save, sub.plot.connectivity(spec), prefix + "_connectivity.png")
    if agg.convergent:
      md += convergent_lines(agg, save, sub.plot.convergent(spec), prefix + "_convergent.png")
    md += ["<details><summary>Runs</summary>", "", runs_table(runs), "</details>", ""]
  return md


def study_sections(study, save: Callable[[Any, str], str]) -> list[str]:
  """The phase diagram of a study sweeping task.size_mult, across its buckets (``phase_report``)."""
  from universality.engine.families.group import phase_report  # its figures only where a study has them
  return phase_report.study_sections(study, save)
