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

from engine import launch
from engine.analysis import cross_seed
from engine.analysis import pipeline
from engine.analysis import representation
from engine.replay import SUMMARY


def analyze(workdir: str, *, step: int | None = None,
            threshold: float = representation.DEFAULT_THRESHOLD,
            universal_threshold: float = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD, seed: int = 0,
            progress: bool = False) -> dict[str, Any]:
  """Analyses every group of the run directory; writes and returns the summary (see module docstring).

  ``step`` limits the analysis to checkpoints up to that step (default: all of them), so that any earlier
  checkpoint can be re-analysed as if it were the last.
  """
  from engine import replay
  with replay.open(workdir) as run:
    if progress:
      print(f"Analysing {len(run)} runs of {', '.join(run.groups)} at {len(run.steps)} checkpoints",
            flush=True)
    per_group = run.analyze(step, threshold=threshold, universal_threshold=universal_threshold, seed=seed)
    all_steps = run.steps
  records = sorted((rec for res in per_group.values() for rec in res["runs"]), key=lambda r: r["index"])
  final = step if step is not None else all_steps[-1]
  summary = {"workdir": os.path.abspath(workdir), "steps": [s for s in all_steps if s <= final],
             "threshold": threshold, "universal_threshold": universal_threshold, "runs": records,
             "groups": {spec: {"group": res["group"], "aggregate": res["aggregate"],
                               "runs": [r["index"] for r in res["runs"]]}
                        for spec, res in per_group.items()}}
  summary = pipeline.to_json(summary)
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "analysis"), exist_ok=True)
    launch.atomic_write(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=1) + "\n")
  return summary


def load_summary(workdir: str) -> dict[str, Any]:
  """analysis/summary.json of a run directory (plain JSON)."""
  with open(os.path.join(workdir, SUMMARY)) as f:
    return json.load(f)
