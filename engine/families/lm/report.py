"""The language-model family's report sections: learning curves, then per cohort the universal neurons.

Images (``<c>`` is a cohort's position and a filename-safe name)::

  learning_curves.png        held-out and training bits per byte of every run, with the unigram bar
  <c>_universal.png          universal fraction per layer (cohort, runs) beside Gurnee et al.'s figures
  <c>_excess.png             excess correlation of every live neuron, per layer
  <c>_properties.png         within-layer percentiles of each property, universal vs other neurons
  <c>_convergent.png         sparse prediction against λ per layer (analysis setting ``convergent``)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from universality.engine.analysis import convergent
from universality.engine.markdown import file_prefix, markdown_table

_PROPERTY_TEXT = {
    "pre_mean": "pre-activation mean", "pre_var": "pre-activation variance",
    "pre_skew": "pre-activation skew", "pre_kurtosis": "pre-activation kurtosis",
    "act_freq": "activation frequency (pre >= 0)", "input_bias": "input bias", "w_in_norm": "‖w_in‖",
    "w_out_norm": "‖w_out‖", "cos_in_out": "cos(w_in, w_out)", "vocab_kurtosis": "W_U kurtosis",
    "vocab_skew": "W_U skew", "var_byte": "var. explained by the byte",
    "var_byte_class": "var. explained by the byte's class", "var_prev_byte": "var. explained by the previous byte",
    "var_position": "var. explained by the position"}


def _pct(x) -> str:
  return "–" if x is None else f"{100 * float(x):.2f}%"


def settings_line(settings: Mapping[str, Any], threshold: float) -> str:
  del threshold  # a language model has "learned" when it beats the unigram code, not at a metric threshold
  return (f"- Analysis: {settings['tokens']:,} held-out bytes per run; universal when the excess correlation "
          f"exceeds {settings['universal_threshold']:g}; prediction / suppression neurons: W_U kurtosis above "
          f"{settings['kurtosis_threshold']:g}. A run has learned when its held-out bits per byte beat the "
          "unigram code" + convergent.settings_text(settings) + ".")


def results_table(records: Sequence[Mapping]) -> str:
  rows = []
  for r in records:
    f = r.get("final") or {}
    fmt = lambda k: "–" if f.get(k) is None else f"{f[k]:.3f}"
    rows.append([r["seed"], fmt("train_bpb"), fmt("test_bpb"), fmt("unigram_bpb"), fmt("test_acc"),
                 "yes" if r.get("generalised") else "no", _pct(r.get("universal_fraction")),
                 " / ".join(_pct(x) for x in r.get("universal_by_layer", []))])
  return markdown_table(["seed", "train bpb", "held-out bpb", "unigram bpb", "next-byte acc.", "learned",
                 "universal", "universal by layer"], rows)


def layer_table(agg: Mapping) -> str:
  rows = []
  for j, frac in enumerate(agg["universal_by_layer"]):
    excess = agg.get("mean_excess_by_layer")
    rows.append([j, _pct(frac), "–" if not excess else f"{excess[j]:.3f}",
                 f"{agg['prediction_by_layer'][j]:.1f}", f"{agg['suppression_by_layer'][j]:.1f}"])
  return markdown_table(["layer", "universal", "mean excess", "prediction neurons / run", "suppression neurons / run"],
                rows)


def property_table(agg: Mapping) -> str:
  contrast = agg.get("property_percentiles") or {}
  rows = [[_PROPERTY_TEXT.get(k, k), f"{v['universal']:.0f}", f"{v['other']:.0f}"] for k, v in contrast.items()]
  return markdown_table(["property", "universal (median percentile)", "other"], rows) if rows else "(no contrast)\n"


def _md_escape(text: str) -> str:
  text = text.replace("\\", "\\\\").replace("`", "\\`").replace("|", "\\|").replace("*", "\\*")
  return text.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


def top_neurons_md(top: Sequence[Mapping]) -> list[str]:
  md = []
  for t in top:
    matches = ", ".join(f"seed {m['seed']} L{m['layer']}.{m['neuron']} ({m['corr']:.2f})" for m in t["matches"])
    md += [f"**Seed {t['seed']}, layer {t['layer']}, neuron {t['neuron']}** — excess {t['excess']:.3f}; "
           f"best matches: {matches}", ""]
    for ex in t["examples"]:
      md.append(f"- {ex['activation']:.2f}: {_md_escape(ex['before'])}**⟦{_md_escape(ex['byte'])}⟧**"
                f"{_md_escape(ex['after'])}")
    md.append("")
  return md


def sections(run, summary: Mapping, save: Callable[[Any, str], str]) -> list[str]:
  """Markdown lines of the family's sections; ``save(fig, name)`` writes a PNG and returns its name."""
  md = ["## Learning curves", "",
        "Held-out (solid) and training (dashed) bits per byte of every run; dotted: the unigram code.", "",
        f"![learning curves]({save(run.plot.learning_curves(), 'learning_curves.png')})", ""]
  for ci, (cohort, entry) in enumerate(summary["cohorts"].items()):
    sub = run.select(index=entry["runs"])
    ce = sub.cohort_summary()
    agg, records, task = ce["aggregate"], ce["records"], ce["task"]
    prefix = file_prefix(ci, cohort)
    md += [f"## {cohort}", "", results_table(records),
           f"Every run read the same {task['tokens']:,} held-out bytes ({task['windows']} windows) at step "
           f"{task['step']}.", ""]
    if len(records) < 2:
      md += ["(One run: no cross-seed comparison.)", ""]
      continue
    md += ["### Universal neurons", "",
           f"Universal: {_pct(agg['universal_fraction'])} of live neurons over the {len(records)} seeds "
           f"(Gurnee et al. 2024: GPT2-small 4.16%, GPT2-medium 1.23%, Pythia-160m 1.26%, over 5 seeds). Their "
           "baseline mixed the other model's neurons with a row-normalised Gaussian matrix; ours with a random "
           "orthogonal rotation, which keeps the neurons' variances, so our baseline maxima are the fairer "
           f"bar. Mean max correlation with another seed {agg.get('mean_max_corr', 0):.3f}, its rotation "
           f"baseline {agg.get('mean_baseline_max_corr', 0):.3f}.", "", layer_table(agg),
           f"![universal by layer]({save(sub.plot.universal_by_layer(), prefix + '_universal.png')})", "",
           f"![excess correlation]({save(sub.plot.excess(), prefix + '_excess.png')})", "",
           "### What sets universal neurons apart", "",
           "Within-layer percentile of each property (pooled over the cohort's seeds), median over universal "
           "and over other live neurons. Gurnee et al. found universal neurons sparser (lower activation "
           "frequency), with higher pre-activation skew and kurtosis, more negative input bias, larger weight "
           "norms and higher W_U kurtosis.", "", property_table(agg)]
    if agg.get("property_percentiles"):
      md += [f"![properties]({save(sub.plot.properties(), prefix + '_properties.png')})", ""]
    top = agg.get("top_neurons") or []
    if top:
      md += ["### Top universal neurons", "",
             "The first seed's most universal neurons, the neuron each other seed matches best (layer.index, "
             "correlation), and the held-out text where each fires hardest; ⟦ ⟧ marks the byte at which it "
             "fires (⏎ newline, ⇥ tab).", ""] + top_neurons_md(top)
    if agg.get("convergent"):
      md += convergent_md(agg["convergent"], save(sub.plot.convergent(), prefix + "_convergent.png"))
  return md


def convergent_md(conv: Mapping | None, figure: str | None = None) -> list[str]:
  """The Convergent Learning section of a cohort (analysis setting ``convergent``): Li et al.'s table with
  one row per MLP layer, the saved figure ``figure`` (sparse prediction against λ), then each layer's
  one-to-one, sparse-prediction and cluster tables; none when off."""
  if not conv:
    return []
  by_layer = {layer: convergent.from_json(entry) for layer, entry in conv.items()}
  inputs = sorted({entry.get("inputs") for entry in conv.values()} - {None})
  md = ["### Convergent learning", "",
        f"Post-GELU MLP activations of every layer on {', '.join(map(str, inputs)) or '?'} held-out bytes, "
        "pairs of seeds compared as in *Convergent Learning* (Li et al. 2016; AlexNet conv1 greedy / max "
        "matching 0.703 / 0.663, conv5 0.416 / 0.385). Means over the pairs:", "",
        convergent.layer_table(by_layer)]
  if figure:
    md += [f"![sparse prediction against λ]({figure})", ""]
  for layer, res in by_layer.items():
    md += [f"<details><summary>Convergent learning, {layer}</summary>", "",
           convergent.sections(res, layer=layer, heading="####"), "</details>", ""]
  return md
