"""The report of an analysed run directory: PNG plots and a markdown index, written to ``report/``.

``write_report(workdir)`` runs after ``engine.analysis.workdir.analyze`` (it reads ``analysis/summary.json``,
``metrics.jsonl``, ``runs.json``, ``config.json`` and, for the per-neuron correlation distribution, the
final Orbax checkpoint; nothing is executed or unpickled) and writes::

  report/index.md                      study header, per-group results and key-irrep tables, images
  report/learning_curves.png           train / test accuracy of every run, one panel per group, log-x
  report/<g>_similarity.png            runs × irreps logit similarity (key irreps outlined)
  report/<g>_key_irreps.png            key-irrep and learned-first counts per irrep
  report/<g>_learning_order.png        step at which each run learned each irrep
  report/<g>_learning_order_seed<k>.png  one run's similarity curves over the checkpoints
  report/<g>_correlation.png           max cross-seed neuron correlation vs its rotation baseline; excess
  report/<g>_cka.png                   linear CKA between the runs' hidden representations

``<g>`` is the group's position and a filename-safe spec (``g0_S5``). The figures come from
``engine.replay.Run.plot`` (one plotting code path for notebooks and reports). The output is a function of
the run directory alone: no timestamps, PNGs without version metadata, files replaced atomically; stale
files of an earlier report are removed. Only process 0 writes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from engine import launch
from engine import plots

REPORT_DIR = "report"
_FS_TYPE = {1: "real", 0: "complex", -1: "quaternionic"}


def _fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return "–"
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{float(x):.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _mean(values) -> float | None:
  vals = [float(v) for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(vals)) if vals else None


def file_prefix(position: int, spec: str) -> str:
  """Filename-safe prefix of a group's images: its position among the groups and its sanitised spec."""
  return f"g{position}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


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
  return _table(header, rows)


def results_table(aggregate: Mapping, records: Sequence[Mapping]) -> str:
  """One-row table of a group's headline numbers."""
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
  return _table(header, [row])


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
  return _table(["key irreps", "runs"], rows)


def runs_table(records: Sequence[Mapping]) -> str:
  """Per run: seed number, final test accuracy, fraction explained, key irreps in learning order."""
  labels = plots.run_labels(records)
  rows = []
  for label, r in zip(labels, records):
    order = r.get("key_irreps_in_order") or []
    steps = [r["learning_order"].get(n) for n in order]
    rows.append([label, _fmt((r.get("final") or {}).get("test_acc")), _fmt(r.get("fraction_explained")),
                 ", ".join(f"{n} ({s})" for n, s in zip(order, steps)) or "(none)",
                 _fmt((r.get("neurons") or {}).get("mean_excess"))])
  return _table(["run", "test acc", "fraction explained", "key irreps (step learned)", "mean excess corr"],
                rows)


def _header(workdir: str, cfg, summary: Mapping, runs: Sequence[Mapping], steps: Sequence[int]) -> str:
  from engine import config as config_lib
  lines = [f"# Universality study: {os.path.basename(os.path.normpath(workdir))}", ""]
  lines.append(f"- Run directory: `{workdir}`")
  group_bits = []
  for spec, entry in summary["groups"].items():
    g = entry["group"]
    group_bits.append(f"{spec} (order {g['order']}, {len(g['irreps'])} real irreps, {len(entry['runs'])} runs)")
  lines.append(f"- Groups: {', '.join(group_bits)}")
  if cfg.model == "mlp":
    lines.append(f"- Model: MLP, embeddings {cfg.embed_dim} per input, {cfg.hidden} hidden ReLU neurons")
  else:
    lines.append(f"- Model: transformer, {cfg.n_layers} layer(s), d_model {cfg.d_model}, {cfg.n_heads} heads, "
                 f"d_mlp {cfg.d_mlp}")
  seed_ids = sorted({r["seed_index"] for r in runs})
  lines.append(f"- Seeds: {cfg.seeds} per grid point (base seed {cfg.seed}, seed numbers "
               f"{seed_ids[0]}–{seed_ids[-1]}); {len(runs)} runs in all")
  batch = "full batch" if not cfg.batch_size else f"batch {cfg.batch_size}"
  lines.append(f"- Training: {cfg.steps} steps, {batch}, evaluated every {cfg.eval_every} steps, "
               f"{len(steps)} checkpoints ({', '.join(str(s) for s in steps)})")
  lrs = ", ".join(f"{v:g}" for v in config_lib.parse_floats(cfg.lr, "lr"))
  wds = ", ".join(f"{v:g}" for v in config_lib.parse_floats(cfg.weight_decay, "weight_decay"))
  fracs = ", ".join(f"{v:g}" for v in config_lib.parse_floats(cfg.train_frac, "train_frac"))
  lines.append(f"- Optimiser: AdamW, lr {lrs}, weight decay {wds}, betas ({cfg.b1:g}, {cfg.b2:g}), "
               f"eps {float(cfg.eps):g}")
  lines.append(f"- Train fraction: {fracs} of the |G|² pairs")
  lines.append(f"- Analysis: key irreps have logit similarity > {summary['threshold']:g}; a neuron is universal "
               f"when its excess correlation over the rotation baseline is > {summary['universal_threshold']:g}; "
               f"a run has generalised when its test accuracy is ≥ {launch.GENERALISED_ACC:g}")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Writing.


def _write_png(fig, path: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}.png"
  plots.save(fig, tmp)
  os.replace(tmp, path)


def write_report(workdir: str) -> str:
  """Writes ``report/`` for an analysed run directory and returns the path of ``report/index.md``.

  Raises FileNotFoundError when the directory has no analysis/summary.json (run
  ``engine.analysis.workdir.analyze`` first). On processes other than 0 nothing is written.
  """
  from engine import replay
  workdir = os.path.abspath(workdir)
  out_dir = os.path.join(workdir, REPORT_DIR)
  index_path = os.path.join(out_dir, "index.md")
  if jax.process_index() != 0:
    return index_path
  with replay.open(workdir) as run:
    return _write_report(run, out_dir, index_path)


def _write_report(run, out_dir: str, index_path: str) -> str:
  workdir = run.workdir
  summary = run.summary()
  os.makedirs(out_dir, exist_ok=True)
  written: list[str] = []

  def save(fig, name: str) -> str:
    _write_png(fig, os.path.join(out_dir, name))
    written.append(name)
    return name

  steps = summary["steps"]
  md = [_header(workdir, run.config, summary, run.runs, steps)]
  md += ["## Learning curves", "",
         "Test (solid) and train (dashed) accuracy of every run; the dotted line is the generalisation bar.",
         "", f"![learning curves]({save(run.plot.learning_curves(), 'learning_curves.png')})", ""]
  for gi, (spec, entry) in enumerate(summary["groups"].items()):
    sub = run.select(index=entry["runs"])
    gs = sub.group_summary(spec)
    records, agg, group = gs["records"], gs["aggregate"], gs["group"]
    prefix = file_prefix(gi, spec)
    md += [f"## {spec} (order {group['order']})", "", results_table(agg, records),
           "### Key irreps", "",
           f"Key irreps: logit similarity above {group['threshold']:g} at step {group['steps'][-1]}. "
           "Learned first: the key irrep whose similarity crossed the threshold at the earliest checkpoint.",
           "", key_irrep_table(group, records),
           "Most frequent sets of key irreps:", "", key_irrep_sets_table(records),
           f"![key irreps]({save(sub.plot.key_irreps(spec), prefix + '_key_irreps.png')})", "",
           f"![logit similarity]({save(sub.plot.similarity_heatmap(spec), prefix + '_similarity.png')})", "",
           "### Learning order", "",
           f"![learning order]({save(sub.plot.learning_order_group(spec), prefix + '_learning_order.png')})",
           ""]
    first = sub.runs[0]
    name = f"{prefix}_learning_order_seed{first['seed_index']}.png"
    fig = sub.plot.learning_order(group=spec, index=int(sub.index[0]))
    md += [f"One run ({plots.run_labels([first])[0]}): similarity of each irrep over the checkpoints.", "",
           f"![learning order of one run]({save(fig, name)})", ""]
    if len(records) >= 2:
      md += ["### Neurons across seeds", "",
             "Max correlation of each live neuron with the neurons of each other run, against the same "
             "maximum after a random orthogonal rotation of the other run's neurons; excess = mean over the "
             "other runs of the difference.", "",
             f"![neuron correlations]({save(sub.plot.correlation_distribution(spec), prefix + '_correlation.png')})",
             "", f"![CKA]({save(sub.plot.cka(spec), prefix + '_cka.png')})", ""]
    else:
      md += ["(One run: no cross-seed comparison.)", ""]
    md += ["<details><summary>Runs</summary>", "", runs_table(records), "</details>", ""]
  text = "\n".join(md).rstrip("\n") + "\n"
  launch.atomic_write(index_path, text)  # pylint: disable=protected-access
  keep = set(written) | {"index.md"}
  for name in sorted(os.listdir(out_dir)):
    if name not in keep and (name.endswith(".png") or ".tmp-" in name):
      os.remove(os.path.join(out_dir, name))
  return index_path
