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

The figures come from the notebook view's ``plot`` (one plotting code path for notebooks and reports).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from universality.engine import plots
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


def key_irrep_rows(group: Mapping, records: Sequence[Mapping]) -> list[dict]:
  """One row per irrep: name, dim, type, runs where it is key, runs that learned it first, mean logit
  similarity at the final step, and live neurons (over all runs) whose dominant irrep it is."""
  rows = []
  for irrep in group["irreps"]:
    name = irrep["name"]
    rows.append({
        "irrep": name, "dim": irrep["dim"], "type": _FS_TYPE.get(irrep["frobenius_schur"], "?"),
        "key": sum(name in r["key_irreps"] for r in records),
        "first": sum(r.get("first_learned") == name for r in records),
        "similarity": _mean(r["logit_similarity"].get(name) for r in records),
        "neurons": sum((r.get("neurons") or {}).get("dominant_counts", {}).get(name, 0) for r in records),
    })
  return rows


def key_irrep_table(group: Mapping, records: Sequence[Mapping]) -> str:
  """The key-irrep frequency table of *A Toy Model of Universality* as markdown: for each irrep, in how
  many of the runs it is a key irrep and in how many it was learned first."""
  n = len(records)
  header = ["irrep", "dim", "type", f"key irrep (of {n} runs)", f"learned first (of {n} runs)",
            "mean logit similarity", "neurons dominant"]
  rows = [[r["irrep"], r["dim"], r["type"], r["key"], r["first"], _fmt(r["similarity"]), r["neurons"]]
          for r in key_irrep_rows(group, records)]
  return markdown_table(header, rows)


def results_table(aggregate: Mapping, records: Sequence[Mapping]) -> str:
  """One-row table of a cohort's headline numbers."""
  n = len(records)
  gen = sum(bool(r.get("generalised")) for r in records)
  corr = aggregate.get("correlation") or {}
  agree = corr.get("irrep_agreement") or {}
  matching = aggregate.get("matching") or {}
  means = aggregate.get("similarity_means") or {}
  header = ["runs", "generalised", "mean test acc", "mean fraction explained", "explained by key irreps",
            "mean excess corr", "universal neurons", "best match shares dominant irrep (chance)",
            "matched neuron corr", "CKA", "Procrustes"]
  row = [n, f"{gen}/{n}", _fmt(_mean((r.get("final") or {}).get("test_acc") for r in records)),
         _fmt(aggregate.get("mean_fraction_explained")),
         _fmt(_mean(r.get("fraction_explained_key") for r in records)),
         _fmt(corr.get("mean_excess")),
         "–" if corr.get("universal_fraction") is None else f"{corr['universal_fraction']:.1%}",
         "–" if agree.get("rate") is None else f"{agree['rate']:.1%} ({agree['chance']:.1%})",
         _fmt(matching.get("mean_offdiagonal")), _fmt(means.get("cka")), _fmt(means.get("procrustes"))]
  return markdown_table(header, [row])


def key_irrep_sets_table(records: Sequence[Mapping], limit: int = 8) -> str:
  """The most frequent sets of key irreps and how many runs use each."""
  counts: dict[tuple, int] = {}
  for r in records:
    k = tuple(r["key_irreps"])
    counts[k] = counts.get(k, 0) + 1
  ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  rows = [[", ".join(k) or "(none)", c] for k, c in ordered[:limit]]
  if len(ordered) > limit:
    rows.append([f"… {len(ordered) - limit} more sets", sum(c for _, c in ordered[limit:])])
  return markdown_table(["key irreps", "runs"], rows)


def runs_table(records: Sequence[Mapping]) -> str:
  """Per run: seed number, final test accuracy, fraction explained, key irreps in learning order."""
  labels = plots.run_labels(records)
  rows = []
  for label, r in zip(labels, records):
    order = r.get("key_irreps_in_order") or []
    steps = [r["learning_order"].get(n) for n in order]
    rows.append([label, _fmt(r.get("generalised", True)), _fmt((r.get("final") or {}).get("test_acc")),
                 _fmt(r.get("fraction_explained")),
                 ", ".join(f"{n} ({s})" for n, s in zip(order, steps)) or "(none)",
                 _fmt((r.get("neurons") or {}).get("mean_excess"))])
  return markdown_table(["run", "generalised", "test acc", "fraction explained", "key irreps (step learned)",
                 "mean excess corr"], rows)


def coset_lines(group: Mapping, aggregate: Mapping, records: Sequence[Mapping], limit: int = 10) -> list[str]:
  """The cosets section of a cohort: coset neurons per input side, and the subgroup classes they use."""
  if "subgroups" not in group or aggregate.get("cosets") is None:
    return []
  md = ["### Cosets", ""]
  if not group["proper_nontrivial"]:
    return md + [f"The group has no proper non-trivial subgroup ({group['subgroups']} subgroups): no coset "
                 "neurons.", ""]
  source = (records[0].get("cosets") or {}).get("source") if records else None
  what = "P_a[:, n] and P_b[:, n]" if source == "pre_activation" else "the activation's mean over the other input"
  md += [f"For each live neuron and input side, the share of the variance of its input function ({what}) "
         f"explained by the left or right cosets of each of the {group['proper_nontrivial']} proper "
         f"non-trivial subgroups (of {group['subgroups']} subgroups in {group['subgroup_classes']} conjugacy "
         "classes, counting the trivial one and the whole group); the best subgroup maximises the adjusted "
         f"share; a coset neuron's best share is ≥ {group['coset_threshold']:g}. Induced share: the part of "
         "the neuron's non-constant input in the "
         "irreps of Ind_H^G 1 of its best subgroup H.", ""]
  rows = []
  for side in ("a", "b"):
    per = [(r.get("cosets") or {}).get("sides", {}).get(side) for r in records]
    per = [p for p in per if p]
    rows.append([side, sum(p["coset_neurons"] for p in per),
                 _fmt(_mean(p["coset_fraction"] for p in per)),
                 sum(p["left"] for p in per), sum(p["right"] for p in per),
                 _fmt(_mean(p["mean_best_share"] for p in per)),
                 _fmt(_mean(p["mean_induced_share"] for p in per))])
  md += [markdown_table(["input", "coset neurons (all runs)", "mean fraction of live neurons", "left cosets",
                 "right cosets", "mean best share", "mean induced share"], rows)]
  classes = list(aggregate["cosets"]["by_subgroup"].items())
  if classes:
    rows = [[label, c["order"], c["conjugates"], _fmt(c["normal"]), c["neurons"], c["runs"],
             " + ".join(f"{m}·{n}" if m > 1 else n for n, m in c["induced"].items())]
            for label, c in classes[:limit]]
    if len(classes) > limit:
      rows.append([f"… {len(classes) - limit} more classes", "", "", "", sum(c["neurons"] for _, c in
                                                                            classes[limit:]), "", ""])
    md += ["Subgroup classes used by coset neurons:", "",
           markdown_table(["subgroup class", "order", "conjugates", "normal", "coset neurons", "runs",
                   "Ind_H^G 1"], rows)]
  return md


def margin_lines(group: Mapping, aggregate: Mapping, records: Sequence[Mapping]) -> list[str]:
  """The margins section of a cohort (MLP only): normalised margin, single-irrep neurons, irrep coverage."""
  agg = aggregate.get("margins")
  if not agg:
    return []
  pred = group.get("predicted_coverage")
  md = ["### Margins", "",
        "Normalised margin: min over all pairs of (correct logit − best wrong logit) / Σ‖θ_n‖² over the "
        "effective per-neuron weights θ_n = (P_a[:, n], P_b[:, n], U[n]) (the MLP is 2-homogeneous in them). "
        f"Single-irrep neurons: ≥ {group['single_threshold']:g} of the non-constant pre-activation in one "
        "irrep. Coverage: share of the non-trivial irreps that some single-irrep neuron uses; the max-margin "
        "prediction of *Feature emergence via margin maximization* is "
        + ("every irrep (coverage 1) for cyclic groups." if pred is not None else
           "not stated for this group."), ""]
  header = ["runs with positive margin", "mean normalised margin", "mean single-irrep neurons",
            "mean coverage (generalised runs)", "max-margin coverage"]
  row = [f"{agg['positive_margin_runs']}/{len(records)}", _fmt(agg["mean_normalised_margin"], 6),
         "–" if agg["mean_single_irrep_fraction"] is None else f"{agg['mean_single_irrep_fraction']:.1%}",
         _fmt(agg["mean_irrep_coverage_generalised"]), _fmt(pred)]
  md += [markdown_table(header, [row])]
  rows = [[label, _fmt(r["margins"]["margin"]), _fmt(r["margins"]["normalised_margin"], 6),
           f"{r['margins']['single_irrep_fraction']:.1%}", _fmt(r["margins"]["irrep_coverage"]),
           ", ".join(r["margins"]["covered_irreps"]) or "(none)"]
          for label, r in zip(plots.run_labels(records), records) if r.get("margins")]
  md += ["<details><summary>Margins per run</summary>", "",
         markdown_table(["run", "margin", "normalised margin", "single-irrep neurons", "coverage", "irreps covered"],
                rows), "</details>", ""]
  return md


def connectivity_lines(aggregate: Mapping, save: Callable[[Any, str], str] | None = None, fig=None,
                       name: str = "") -> list[str]:
  """The mode-connectivity section of a cohort: barriers per alignment, split by shared key irreps."""
  conn = aggregate.get("connectivity")
  if not conn:
    return []
  md = ["### Mode connectivity", "",
        f"Loss on all pairs along the straight line between two seeds' {conn['weights']} weights "
        f"({conn['points']} points); barrier = max over the path of the loss minus the line between the end "
        "losses. The second run's neurons are left as they are (raw), or reordered by activation matching "
        "(Hungarian on neuron correlations) or by weight matching (one linear assignment on the neurons' "
        "effective weights). Same / different key irreps: pairs of generalised runs whose key-irrep sets "
        "are equal / differ.", ""]
  rows = []
  for align, a in conn["alignments"].items():
    rows.append([align, _fmt(a["mean_barrier"]),
                 f"{_fmt(a['mean_barrier_same_key_irreps'])} ({a['pairs_same_key_irreps']})",
                 f"{_fmt(a['mean_barrier_different_key_irreps'])} ({a['pairs_different_key_irreps']})",
                 _fmt(a["mean_min_accuracy"])])
  md += [markdown_table(["alignment", "mean barrier", "same key irreps (pairs)", "different key irreps (pairs)",
                 "mean lowest accuracy on the path"], rows)]
  if save is not None and fig is not None:
    md += [f"![loss along the path]({save(fig, name)})", ""]
  return md


def redundancy_lines(aggregate: Mapping, records: Sequence[Mapping], tolerance: float | None) -> list[str]:
  """The redundancy section of a cohort: feature complexity per run beside its number of key irreps."""
  agg = aggregate.get("redundancy")
  if not agg:
    return []
  tol = "" if tolerance is None else f" by more than {tolerance:g}"
  md = ["### Redundancy", "",
        "Iterative feature merging: neurons never active on any pair are dropped, then the two neurons with "
        "the most similar incoming weights (cosine) are merged, the outgoing weights folded in, until the "
        f"loss on all pairs would rise{tol}. The neurons left are the run's feature complexity.", ""]
  by_keys = agg.get("feature_complexity_by_key_irreps") or {}
  md += [markdown_table(["mean feature complexity", "generalised runs", "by number of key irreps (generalised)"],
                [[_fmt(agg["mean_feature_complexity"], 1), _fmt(agg["mean_feature_complexity_generalised"], 1),
                  ", ".join(f"{k}: {v:.1f}" for k, v in by_keys.items()) or "–"]])]
  rows = [[label, r["redundancy"]["width"], r["redundancy"]["never_active"], r["redundancy"]["feature_complexity"],
           len(r["key_irreps"]) if r.get("generalised", True) else "–", _fmt(r["redundancy"]["loss"], 4),
           _fmt(r["redundancy"]["merged_loss"], 4)]
          for label, r in zip(plots.run_labels(records), records) if r.get("redundancy")]
  md += ["<details><summary>Feature complexity per run</summary>", "",
         markdown_table(["run", "width", "never active", "feature complexity", "key irreps", "loss", "merged loss"],
                rows), "</details>", ""]
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
          "group, lr, weight decay and train fraction; different seeds)")


def generalised_records(records: Sequence[Mapping]) -> list[Mapping]:
  """The runs that generalised: the only ones whose key irreps and learning order mean something."""
  return [r for r in records if r.get("generalised", True)]


def not_generalised_table(records: Sequence[Mapping]) -> str:
  """The runs that did not generalise, apart: seed, test accuracy, loss and fraction of logits explained."""
  rows = [[label, _fmt((r.get("final") or {}).get("test_acc")), _fmt(r.get("loss_all")),
           _fmt(r.get("fraction_explained"))]
          for label, r in zip(plots.run_labels(records), records) if not r.get("generalised", True)]
  return markdown_table(["run", "test acc", "loss (all pairs)", "fraction explained"], rows)


def sections(run, summary: Mapping, save: Callable[[Any, str], str]) -> list[str]:
  """Markdown lines of the family's sections; ``save(fig, name)`` writes a PNG and returns its name."""
  md = ["## Learning curves", "",
        "Test (solid) and train (dashed) accuracy of every run; the dotted line is the generalisation bar.",
        "", f"![learning curves]({save(run.plot.learning_curves(), 'learning_curves.png')})", ""]
  for ci, (cohort, entry) in enumerate(summary["cohorts"].items()):
    sub = run.select(index=entry["runs"])
    spec = sub.groups[0]
    gs = sub.group_summary(spec)
    records, agg, group = gs["records"], gs["aggregate"], gs["group"]
    done = generalised_records(records)
    prefix = file_prefix(ci, cohort)
    md += [f"## {cohort} (order {group['order']})", "", results_table(agg, records),
           "### Key irreps", "",
           f"Key irreps: logit similarity above {group['key_threshold']:g} at step {group['steps'][-1]}. "
           f"Learned first: the key irrep whose similarity crossed {group['order_threshold']:g} at the "
           f"earliest checkpoint. Over the {len(done)} of {len(records)} runs that generalised.", "",
           "Irreps: " + ", ".join(f"{r['name']} (dim {r['dim']}, {_FS_TYPE.get(r['frobenius_schur'], '?')})"
                                   for r in group["irreps"]), ""]
    if len(done) < len(records):
      md += ["Runs that did not generalise (left out of the key-irrep and learning-order tables):", "",
             not_generalised_table(records)]
    if done:
      md += [key_irrep_table(group, done),
             "Most frequent sets of key irreps:", "", key_irrep_sets_table(done),
             f"![key irreps]({save(sub.plot.key_irreps(spec), prefix + '_key_irreps.png')})", ""]
    md += [f"![logit similarity]({save(sub.plot.similarity_heatmap(spec), prefix + '_similarity.png')})", ""]
    if done:
      first = done[0]
      name = f"{prefix}_learning_order_seed{first['seed']}.png"
      fig = sub.plot.learning_order(group=spec, index=int(first["index"]))
      md += ["### Learning order", "",
             f"![learning order]({save(sub.plot.learning_order_group(spec), prefix + '_learning_order.png')})",
             "", f"One run ({plots.run_labels([first])[0]}): similarity of each irrep over the checkpoints.",
             "", f"![learning order of one run]({save(fig, name)})", ""]
    if len(records) >= 2:
      md += ["### Neurons across seeds", "",
             "Max correlation of each live neuron with the neurons of each other run of the cohort, against "
             "the same maximum after a random orthogonal rotation of the other run's neurons; excess = mean "
             "over the other runs of the difference.", "",
             f"![neuron correlations]({save(sub.plot.correlation_distribution(spec), prefix + '_correlation.png')})",
             "", f"![CKA]({save(sub.plot.cka(spec), prefix + '_cka.png')})", ""]
    else:
      md += ["(One run: no cross-seed comparison.)", ""]
    md += coset_lines(group, agg, records)
    md += margin_lines(group, agg, records)
    md += redundancy_lines(agg, records, summary.get("settings", {}).get("merge_tolerance"))
    if agg.get("connectivity"):
      md += connectivity_lines(agg, save, sub.plot.connectivity(spec), prefix + "_connectivity.png")
    md += ["<details><summary>Runs</summary>", "", runs_table(records), "</details>", ""]
  return md
