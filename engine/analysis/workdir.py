"""Analyse a run directory: every group's runs at every checkpoint, written to analysis/summary.json.

``analyze(workdir)`` (run at the end of every launch, or by hand) restores the checkpoints through
``engine.replay``, runs ``pipeline.analyze_group`` on the runs of each group and writes::

  analysis/summary.json = {
    "workdir": str, "steps": [checkpoint steps], "threshold": float, "universal_threshold": float,
    "runs": [ {"index": leading index in the run directory, "name", "group", "seed", "seed_index", "lr",
               "weight_decay", "train_frac", "final": {train_loss, train_acc, test_loss, test_acc,
               diverged} from metrics.jsonl, "generalised": test_acc >= 0.99,
               **the per-run record of pipeline.analyze_group (logit_similarity, fraction_explained,
               key_irreps, learning_order, fve, losses, neurons, ...)} ],
    "groups": {spec: {"group": ..., "aggregate": ..., "runs": [indices of its runs]}}
  }

Every field of the per-run records and of ``group``/``aggregate`` is documented in
``engine/analysis/pipeline.py``. The file is written atomically by process 0.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from engine import groups as groups_lib
from engine import irreps as irreps_lib
from engine import launch
from engine import models
from engine.analysis import pipeline

SUMMARY = os.path.join("analysis", "summary.json")


def _apply_fn(cfg):
  """Vmapped, jitted ``models.apply`` over any number of runs (a subset of the run directory)."""
  return jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg)))


def analyze(workdir: str, *, step: int | None = None, threshold: float = 0.05,
            universal_threshold: float = 0.5, seed: int = 0, progress: bool = False) -> dict[str, Any]:
  """Analyses every group of the run directory; writes and returns the summary (see module docstring).

  ``step`` limits the analysis to checkpoints up to that step (default: all of them), so that any earlier
  checkpoint can be re-analysed as if it were the last.
  """
  from engine import replay
  run = replay.open(workdir)
  cfg = run.config
  steps = [s for s in run.steps if step is None or s <= step]
  if not steps:
    raise ValueError(f"no checkpoint at or before step {step} in {workdir}")
  metrics = run.metrics()
  final = {k: v[-1] for k, v in metrics.items() if k != "step"} if len(metrics["step"]) else {}
  apply_fn = _apply_fn(cfg)
  matrices_fn = pipeline.matrices_fn_for(cfg)
  rows = run.runs
  records: list[dict] = [dict(r, index=i) for i, r in enumerate(rows)]
  for i, rec in enumerate(records):
    rec["final"] = {k: _num(v[i]) for k, v in final.items()}
    acc = rec["final"].get("test_acc")
    rec["generalised"] = bool(acc is not None and acc >= launch.GENERALISED_ACC)
  out_groups = {}
  specs = list(dict.fromkeys(r["group"] for r in rows))
  for gi, spec in enumerate(specs):
    sub = run.select(group=spec)
    group = groups_lib.get(spec)
    irreps = irreps_lib.real_irreps(group)
    params_by_step = {s: sub.params(s) for s in steps}
    if progress:
      print(f"analysing {spec}: {len(sub)} runs x {len(steps)} checkpoints", flush=True)
    res = pipeline.analyze_group(group, irreps, apply_fn, matrices_fn, params_by_step, sub.runs,
                                 threshold=threshold, universal_threshold=universal_threshold,
                                 key=jax.random.fold_in(jax.random.PRNGKey(seed), gi))
    for i, rec in zip(sub.index, res["runs"]):
      rec = {k: v for k, v in rec.items() if k != "run"}
      records[int(i)].update(rec)
    out_groups[spec] = {"group": res["group"], "aggregate": res["aggregate"],
                        "runs": [int(i) for i in sub.index]}
  summary = {"workdir": os.path.abspath(workdir), "steps": steps, "threshold": threshold,
             "universal_threshold": universal_threshold, "runs": records, "groups": out_groups}
  summary = pipeline._clean(summary)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "analysis"), exist_ok=True)
    launch._atomic_write(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=1) + "\n")
  return summary


def _num(x):
  x = float(np.asarray(x))
  return x if np.isfinite(x) else None


def load_summary(workdir: str) -> dict[str, Any]:
  """analysis/summary.json of a run directory (plain JSON)."""
  with open(os.path.join(workdir, SUMMARY)) as f:
    return json.load(f)
