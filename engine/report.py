"""The report of an analysed run directory: PNG plots and a markdown index, written to ``report/``.

``write_report(workdir)`` runs after the analysis (``universality.engine.analysis.driver.analyze``): it reads
``analysis/summary.json``, ``metrics.jsonl``, ``runs.json``, ``config.json`` and, for figures recomputed from
weights, the final Orbax checkpoint (nothing is executed or unpickled), and writes ``report/index.md`` — the
study header, then the task family's sections (``Family.report_module``: ``sections``) with their images.

A study of several buckets (universality.engine.rundir) has a report per bucket, in the bucket's run
directory, and at the top ``report/index.md`` (``write_study_report``): the study header and one row per
bucket (its runs, task, share of runs generalised at the last logged step) linked to the bucket's report.

The output is a function of the run directory alone: no timestamps, PNGs without version metadata, files
replaced atomically; stale files of an earlier report are removed. Only process 0 writes.
"""

from __future__ import annotations

import importlib
import os
import posixpath
from typing import Mapping, Sequence

import jax
import numpy as np

from universality.engine import config as config_lib
from universality.engine import markdown
from universality.engine import optim
from universality.engine import paths
from universality.engine import plots
from universality.engine import replay
from universality.engine import rundir


def _header(run, summary: Mapping, steps: Sequence[int]) -> str:
  cfg, runs, family = run.config, run.runs, run.family
  lines = [f"# Universality study: {os.path.basename(os.path.normpath(run.workdir))}", ""]
  lines.append(f"- Run directory: `{run.workdir}`")
  lines += family.describe(cfg)
  seeds = sorted({r["seed"] for r in runs})
  lines.append(f"- Seeds: {cfg.seeds} per grid point (base seed {cfg.seed}, seed numbers "
               f"{seeds[0]}–{seeds[-1]}); {len(runs)} runs in {len(run.cohorts)} cohorts")
  batch = "full batch" if not cfg.batch_size else f"batch {cfg.batch_size}"
  lines.append(f"- Training: {cfg.steps} steps, {batch}, evaluated every {cfg.eval_every} steps, "
               f"{len(steps)} checkpoints ({', '.join(str(s) for s in steps)})")
  lrs = ", ".join(f"{v:g}" for v in config_lib.parse_floats(cfg.opt.lr, "opt.lr"))
  wds = ", ".join(f"{v:g}" for v in config_lib.parse_floats(cfg.opt.weight_decay, "opt.weight_decay"))
  lines.append(f"- Optimiser: {optim.describe(cfg.opt)}; lr {lrs}, weight decay {wds}")
  module = importlib.import_module(family.report_module)
  lines.append(module.settings_line(summary["settings"], family.generalised_threshold))
  return "\n".join(lines) + "\n"


def _write_png(fig, path: str) -> None:
  paths.write_png(fig, path, plots.save)  # rendered in memory, written atomically (local or gs://)


def write_report(workdir: str) -> str:
  """Writes ``report/`` for an analysed run directory and returns the path of ``report/index.md`` (for a
  study of several buckets: every bucket's report, then the study's index).

  Raises FileNotFoundError when the directory has no analysis/summary.json (run the analysis first). On
  processes other than 0 nothing is written.
  """
  if jax.process_index() != 0:
    return paths.join(rundir.report_dir(paths.resolve(workdir)), "index.md")
  with replay.open(workdir) as run:
    if isinstance(run, replay.Study):
      for view in run.buckets.values():
        write_report_of(view)
      return write_study_report_of(run)
    return write_report_of(run)


def has_report(workdir: str) -> bool:
  """Whether ``workdir`` holds a written ``report/index.md``."""
  return paths.isfile(paths.join(rundir.report_dir(workdir), "index.md"))


def write_study_report(workdir: str) -> str:
  """Writes the ``report/index.md`` of a study of several buckets (module docstring); returns its path."""
  with replay.Study(workdir) as study:
    return write_study_report_of(study)


def write_study_report_of(study) -> str:
  """``write_study_report`` for an open ``universality.engine.replay.Study``."""
  out_dir = rundir.report_dir(study.workdir)
  index_path = paths.join(out_dir, "index.md")
  if jax.process_index() != 0:
    return index_path
  cfg, family = study.config, study.family
  lines = [f"# Universality study: {os.path.basename(os.path.normpath(study.workdir))}", "",
           f"- Study directory: `{study.workdir}`"]
  lines += family.describe(cfg)
  lines.append(f"- Seeds: {cfg.seeds} per grid point (base seed {cfg.seed}); {cfg.steps} steps")
  lines.append(f"- Trained in {len(study.names)} buckets, one program each, so that no group is padded far "
               "beyond its own size; each bucket's report covers its runs")
  lines.append("")
  rows = []
  for name in study.names:
    view = study.buckets.get(name)
    if view is None:
      rows.append([name, "not started", "", "", ""])
      continue
    metrics = view.metrics()
    last = {k: v[-1] for k, v in metrics.items() if k != "step" and len(v)}
    done = f"{int(metrics['step'][-1])}" if len(metrics["step"]) else "0"
    gen = f"{float(np.mean(family.generalised_mask(last))):.0%}" if last else ""
    task = family.describe(view.config)[0].lstrip("- ").removeprefix("Task: ")
    link = posixpath.relpath(paths.join(rundir.report_dir(view.workdir), "index.md"), out_dir)
    rows.append([name, task, len(view), f"{done} / {view.config.steps}", gen,
                 f"[report]({link})" if has_report(view.workdir) else "not written"])
  header = ["bucket", "task", "runs", "steps", f"{family.progress_metric} ≥ {family.generalised_threshold:g}",
            "report"]
  rows = [r if len(r) == len(header) else r + [""] * (len(header) - len(r)) for r in rows]
  lines.append(markdown.markdown_table(header, rows))
  paths.makedirs(out_dir)
  lines += _study_sections(study, out_dir)
  rundir.atomic_write(index_path, "\n".join(lines).rstrip("\n") + "\n")
  return index_path


def _study_sections(study, out_dir: str) -> list[str]:
  """The family's sections across buckets (its report module's ``study_sections(study, save)``, if any);
  ``save(obj, name)`` writes a figure as PNG or a string as text into ``out_dir`` and returns the name."""
  hook = getattr(importlib.import_module(study.family.report_module), "study_sections", None)
  if hook is None:
    return []

  def save(obj, name: str) -> str:
    path = paths.join(out_dir, name)
    if isinstance(obj, str):
      rundir.atomic_write(path, obj)
    else:
      _write_png(obj, path)
    return name

  return [""] + hook(study, save)


def write_report_of(run) -> str:
  """``write_report`` for an open view (``universality.engine.replay.open``) of the whole run directory."""
  out_dir = rundir.report_dir(run.workdir)
  index_path = paths.join(out_dir, "index.md")
  if jax.process_index() != 0:
    return index_path
  summary = run.summary()
  paths.makedirs(out_dir)
  written: list[str] = []

  def save(fig, name: str) -> str:
    _write_png(fig, paths.join(out_dir, name))
    written.append(name)
    return name

  md = [_header(run, summary, summary["steps"])]
  md += importlib.import_module(run.family.report_module).sections(run, summary, save)
  text = "\n".join(md).rstrip("\n") + "\n"
  rundir.atomic_write(index_path, text)
  keep = set(written) | {"index.md"}
  for name in paths.listdir(out_dir):
    if name not in keep and (name.endswith(".png") or ".tmp-" in name):
      paths.remove(paths.join(out_dir, name))
  return index_path
