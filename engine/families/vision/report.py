"""The vision family's report sections: learning curves, then per cohort the layer-by-layer comparison of
the seeds' units, Li et al.'s one-to-one table beside ours, and the Convergent Learning passes.

Images (``<c>`` is a cohort's position and a filename-safe name)::

  learning_curves.png        test and training accuracy of every run
  <c>_one_to_one.png         matched-unit correlation per layer (greedy, max matching) beside Li et al.'s
  <c>_sparse.png             sparse prediction: held-out loss and units used against λ, per layer
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from universality.engine.analysis import convergent
from universality.engine.families.vision import analysis
from universality.engine.markdown import file_prefix, markdown_table


def _f(x, digits: int = 3) -> str:
  return "–" if x is None else f"{float(x):.{digits}f}"


def _pct(x) -> str:
  return "–" if x is None else f"{100 * float(x):.1f}%"


def settings_line(settings: Mapping[str, Any], threshold: float) -> str:
  samples = ("images × positions" if settings["conv_samples"] == "positions" else "images (spatial means)")
  return (f"- Analysis: {settings['images']:,} test images per run; a conv channel's samples are {samples}, "
          f"at most {settings['max_samples']:,} per layer; universal when the excess correlation exceeds "
          f"{settings['universal_threshold']:g}; Convergent Learning passes on run 0 against "
          f"{settings['convergent_pairs']} other runs, λ ∈ {{{settings['lambdas']}}}. A run has generalised "
          f"when its test accuracy reaches {threshold:g}.")


def results_table(records: Sequence[Mapping]) -> str:
  rows = []
  for r in records:
    f = r.get("final") or {}
    fmt = lambda k: "–" if f.get(k) is None else f"{f[k]:.3f}"
    rows.append([r["seed"], fmt("train_loss"), fmt("train_acc"), fmt("test_loss"), fmt("test_acc"),
                 "yes" if r.get("generalised") else "no",
                 " / ".join(_f((v or {}).get("mean_max_corr"), 2) for v in (r.get("layers") or {}).values())])
  return markdown_table(["seed", "train loss", "train acc.", "test loss", "test acc.", "generalised",
                         "mean max corr. by layer"], rows)


def one_to_one_table(layers: Sequence[Mapping]) -> str:
  """Ours per layer beside Li et al.'s AlexNet Net1 vs Net2 (conv1–conv5; their conv layers beyond our depth
  follow our last conv layer)."""
  ours = {r["layer"] for r in layers}
  rows, last_conv = [], max((i for i, r in enumerate(layers) if r["layer"].startswith("conv")), default=-1)
  for i, r in enumerate(layers):
    paper = analysis.PAPER_ONE_TO_ONE.get(r["layer"])
    rows.append([r["layer"], r["units"], _f(r.get("greedy_mean")), _f(r.get("max_mean")),
                 _f(r.get("same_partner_share"), 2), _f(paper[0]) if paper else "–",
                 _f(paper[1]) if paper else "–"])
    if i == last_conv:
      rows += [[name, "–", "–", "–", "–", _f(g), _f(m)] for name, (g, m) in analysis.PAPER_ONE_TO_ONE.items()
               if name not in ours]
  return markdown_table(["layer", "units", "greedy (ours)", "max matching (ours)", "same partner (ours)",
                         "greedy (Li et al.)", "max matching (Li et al.)"], rows)


def cross_seed_table(layers: Sequence[Mapping]) -> str:
  rows = [[r["layer"], r["units"], f"{r['samples']:,}", _pct(r.get("dead_fraction")),
           _f(r.get("mean_max_corr")), _f(r.get("mean_baseline_max_corr")), _f(r.get("mean_excess")),
           _pct(r.get("universal_fraction")),
           _f(r.get("cka")), _f(r.get("svcca")), _f(r.get("mixed_share"), 2)] for r in layers]
  return markdown_table(["layer", "units", "samples", "dead", "mean max corr.", "rotation baseline",
                         "mean excess", "universal", "CKA", "SVCCA (mixed clusters)", "mixed clusters"], rows)


def connectivity_table(conn: Mapping) -> str:
  pairs = [f"{a}–{b}" for a, b in conn["pairs"]]
  rows = [[name, _f(conn[name]["mean_barrier"])] + [_f(v) for v in conn[name]["barrier"]]
          + [_f(min(conn[name]["min_accuracy"]), 2)] for name in analysis.ALIGNMENTS if name in conn]
  header = ["alignment", "mean barrier"] + [f"barrier {p}" for p in pairs] + ["min. accuracy on paths"]
  return markdown_table(header, rows)


def widths_table(layers: Sequence[Mapping], records: Sequence[Mapping]) -> str:
  rows = []
  for r in layers:
    w = [rec["feature_widths"][r["layer"]] for rec in records if rec.get("feature_widths")]
    rows.append([r["layer"], r["units"], _f(r.get("mean_feature_width"), 1),
                 f"{min(w)}–{max(w)}" if w else "–"])
  return markdown_table(["layer", "units", "mean width after merging", "range over runs"], rows)


def convergent_records(rec: Mapping) -> dict:
  """The typed Convergent Learning records of one layer's summary record."""
  c = rec.get("convergent") or {}
  return {"one_to_one": [convergent.OneToOne.from_json(r) for r in c.get("one_to_one", [])],
          "sparse_prediction": [convergent.SparsePrediction.from_json(r)
                                for r in c.get("sparse_prediction", [])],
          "clusters": [convergent.Clusters.from_json(r) for r in c.get("clusters", [])]}


def sections(run, summary: Mapping, save: Callable[[Any, str], str]) -> list[str]:
  """Markdown lines of the family's sections; ``save(fig, name)`` writes a PNG and returns its name."""
  md = ["## Learning curves", "", "Test (solid) and training (dashed) accuracy of every run.", "",
        f"![learning curves]({save(run.plot.learning_curves(), 'learning_curves.png')})", ""]
  for ci, (cohort, entry) in enumerate(summary["cohorts"].items()):
    sub = run.select(index=entry["runs"])
    ce = sub.cohort_summary()
    layers, records, task = ce["aggregate"]["layers"], ce["records"], ce["task"]
    prefix = file_prefix(ci, cohort)
    md += [f"## {cohort}", "", results_table(records),
           f"Every run read the same {task['images']:,} test images at step {task['step']}.", ""]
    if len(records) < 2:
      md += ["(One run: no cross-seed comparison.)", ""]
      continue
    md += ["### One-to-one matching, beside Li et al. (2016)", "",
           "Mean correlation of each unit of run 0 with its partner in another run, by greedy semi-matching "
           "(each unit's most correlated unit) and by maximum bipartite matching, averaged over the pairs; "
           "Li et al.'s figures are AlexNet Net1 vs Net2 on ImageNet's validation set (their conv layers "
           "sit beside ours by depth only); both matchings gave 0.58–0.73 of their units the same partner.",
           "", one_to_one_table(layers),
           f"![one-to-one]({save(sub.plot.one_to_one(), prefix + '_one_to_one.png')})", "",
           "### Cross-seed correlation per layer", "",
           "For each unit, its maximum correlation with the units of every other run, beside the same "
           "maximum over that run's units mixed by a random rotation; excess = mean over the other runs of "
           "the difference; CKA and SVCCA compare whole layers.", "", cross_seed_table(layers),
           "Sparse prediction of each unit of another run from all units of run 0 (held-out loss of the "
           "standardised unit, ≈ 1 − R², and units used, against λ; per pair below): Li et al. predicted "
           "conv1 with a loss of 0.170 at λ = 0, 0.162 at 1e-4, 0.235 at 10^-2.6 and 0.485 at 1e-2, an L1 "
           "penalty on a 1×1 convolution trained by SGD, so their λ scale is not ours.", "",
           f"![sparse prediction]({save(sub.plot.sparse_prediction(), prefix + '_sparse.png')})", ""]
    conn = ce["aggregate"].get("connectivity")
    if conn:
      md += ["### Mode connectivity", "",
             f"Loss barrier on the straight path from run 0 to another run ({conn['points']} points, on "
             f"{task.get('train_images', 0):,} training images): max over λ of the loss minus the line "
             "between the ends; the other run's units as they are (raw), reordered by activation matching or "
             "by weight matching (Git Re-Basin's coordinate descent over every conv and dense layer).", "",
             connectivity_table(conn)]
    if any(r.get("mean_feature_width") is not None for r in layers):
      md += ["### Feature complexity", "",
             "Units left in each layer of each run after iterative feature merging (the most similar units "
             "by incoming weights merged, the outgoing weights folded, while the loss rises by at most the "
             "tolerance).", "", widths_table(layers, records)]
    for rec in layers:
      text = convergent.sections(convergent_records(rec), layer=rec["layer"], heading="####")
      if text:
        md += [text, ""]
  return md
