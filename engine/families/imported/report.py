"""The report sections of an imported suite: per cohort, the universal neurons in both comparisons.

Images (``<c>`` is a cohort's position and a filename-safe name)::

  <c>_universal.png          universal fraction per layer (all pairs; cohort and runs) beside the paper's
  <c>_excess.png             excess correlation of every live neuron, per layer
  <c>_properties.png         within-layer percentiles of each property, universal vs other neurons
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from universality.engine.families.lm import report as lm_report
from universality.engine.markdown import file_prefix, markdown_table

_PROPERTY_TEXT = dict(lm_report._PROPERTY_TEXT, var_token="var. explained by the token",
                      var_prev_token="var. explained by the previous token",
                      null_share="share of ‖w_out‖² in W_U's null space")
# attn_deactivation is measured for candidates only (NaN elsewhere): counted in the layer table, not
# contrasted with the other properties.


def _pct(x) -> str:
  return "–" if x is None else f"{100 * float(x):.2f}%"


def settings_line(settings: Mapping[str, Any], threshold: float) -> str:
  del threshold
  return (f"- Analysis: {settings['tokens']:,} tokens of `{settings['corpus']}` per model (dropped from the "
          f"statistics: {settings['drop'] or 'nothing'}); universal when the mean excess correlation exceeds "
          f"{settings['universal_threshold']:g}, against a rotation of each layer; prediction / suppression "
          f"neurons: W_U kurtosis above {settings['kurtosis_threshold']:g}; entropy neurons: more than "
          f"{settings['entropy_null_share']:g} of ‖w_out‖² in W_U's null space and ‖w_out‖ above the "
          f"{settings['entropy_norm_pct']:g}th percentile of the layer.")


def runs_table(records) -> str:
  rows = [[r["seed"], f"`{r['model']}`", r["seed_label"], r.get("name_or_path") or "–",
           _pct(r.get("universal_fraction")), " / ".join(_pct(x) for x in r.get("universal_by_layer", [])),
           r.get("prediction", 0), r.get("suppression", 0), r.get("entropy", 0), r.get("dead", 0)]
          for r in records]
  return markdown_table(["run", "model", "seed", "name_or_path", "universal (all pairs)", "by layer",
                         "prediction", "suppression", "entropy", "dead"], rows)


def layer_table(agg: Mapping) -> str:
  rows = []
  paper = agg.get("paper_universal_by_layer")
  excess = agg.get("mean_excess_by_layer")
  fams = agg.get("families_by_layer") or {}
  deact = agg.get("attention_deactivating_by_layer") or [0.0] * len(agg["universal_by_layer"])
  for j, frac in enumerate(agg["universal_by_layer"]):
    counts = [agg["prediction_by_layer"][j], agg["suppression_by_layer"][j], agg["entropy_by_layer"][j],
              deact[j]] + [fams[k][j] for k in fams]
    rows.append([j, _pct(paper[j]) if paper else "–", _pct(frac),
                 "–" if not excess or excess[j] is None else f"{excess[j]:.3f}"]
                + [f"{c:.1f}" for c in counts])
  return markdown_table(["layer", "universal, run 0 vs others (paper)", "universal, all pairs", "mean excess",
                         "prediction", "suppression", "entropy", "attention-deactivating"] + list(fams), rows)


def property_table(agg: Mapping) -> str:
  contrast = agg.get("property_percentiles") or {}
  rows = [[_PROPERTY_TEXT.get(k, k), f"{v['universal']:.0f}", f"{v['other']:.0f}"]
          for k, v in contrast.items()]
  if not rows:
    return "(no contrast)\n"
  return markdown_table(["property", "universal (median percentile)", "other"], rows)


_FAMILIES_TEXT = (
    "Beside them, neuron families per layer, counted per model over live neurons: prediction and "
    "suppression (W_U kurtosis), entropy (output in W_U's null space), attention-deactivating (ablating it "
    "lowers a later head's attention to the first token; largest-‖w_out‖ candidates only), unigram, alphabet "
    "(the token's first letter), previous-token and position (variance explained by that feature).")


def sections(run, summary: Mapping, save: Callable[[Any, str], str]) -> list[str]:
  """Markdown lines of the family's sections; ``save(fig, name)`` writes a PNG and returns its name."""
  md = []
  for ci, (cohort, entry) in enumerate(summary["cohorts"].items()):
    sub = run.select(index=entry["runs"])
    ce = sub.cohort_summary()
    agg, records, task = ce["aggregate"], ce["records"], ce["task"]
    prefix = file_prefix(ci, cohort)
    notes = "".join(f" {n[0].upper() + n[1:]}." for n in task.get("notes", []))
    md += [f"## {cohort}", "", runs_table(records),
           f"Every model read the same {task['tokens']:,} tokens ({task['windows']} windows of "
           f"{task['context']}) of `{task['corpus']}` ({task['corpus_kind']}, fingerprint "
           f"{task['corpus_fingerprint']}); {task['dropped_ids']} token ids left out of the "
           f"statistics.{notes}",
           ""]
    if len(records) < 2:
      md += ["(One model: no cross-seed comparison.)", ""]
      continue
    md += ["### Universal neurons", "",
           f"Run 0 against each other run (Gurnee et al.'s comparison): {agg['paper_universal_count']:,} "
           f"universal neurons, {_pct(agg['paper_universal_fraction'])} of its live neurons (the paper: "
           "GPT2-small 4.16%, GPT2-medium 1.23%, Pythia-160m 1.26%). Every run against every other: "
           f"{_pct(agg['universal_fraction'])}. Mean max correlation with another model "
           f"{agg.get('mean_max_corr') or 0:.3f}, its per-layer rotation baseline "
           f"{agg.get('mean_baseline_max_corr') or 0:.3f}. " + _FAMILIES_TEXT, "", layer_table(agg),
           f"![universal by layer]({save(sub.plot.universal_by_layer(), prefix + '_universal.png')})", "",
           f"![excess correlation]({save(sub.plot.excess(), prefix + '_excess.png')})", "",
           "### What sets universal neurons apart", "",
           "Within-layer percentile of each property (pooled over the models), median over universal and "
           "over other live neurons.", "", property_table(agg)]
    if agg.get("property_percentiles"):
      md += [f"![properties]({save(sub.plot.properties(), prefix + '_properties.png')})", ""]
  return md
