"""The analysis driver: every cohort of a run directory at every checkpoint, into analysis/summary.json.

A *cohort* is a set of runs that differ only in seed; cross-seed statistics (neuron correlations, matching,
CKA, key-irrep counts, learning-order tables) are computed within a cohort, never across hyperparameters.
``analyze(view)`` (run at the end of every launch, or by hand on ``universality.engine.replay.open(workdir)``)
restores each checkpoint once, hands each cohort to its family's analysis (``Family.analysis_module``:
``analyze_cohort``) and writes::

  analysis/summary.json = {
    "workdir": str, "family": str, "steps": [checkpoint steps], "settings": {name: value},
    "runs": [ {"index": leading index in the run directory, **the runs.json row (seed = seed number k,
               base_seed, cohort, name, task fields), "final": the logged metrics at the last step,
               "generalised": bool (Family.generalised), **the family's per-run record} ],
    "cohorts": {cohort: {"task": the family's record of the cohort's task, "aggregate": cross-seed numbers
                         over the cohort's runs, "runs": [indices of its runs]}}
  }

A family's ``analyze_cohort`` may also return ``"arrays"`` (numeric arrays too large for JSON, e.g. one row
per neuron): they are written to the cohort's arrays file
(``universality.engine.rundir.write_cohort_arrays``). A module with ``LAST_STEP_ONLY = True`` gets only the
last checkpoint's parameters.

The family's per-run and aggregate fields are documented by its analysis module (group composition: the
record types of ``engine/families/group/passes/records.py``). The view is duck-typed
(``universality.engine.view.Run``: ``rows``, ``runs``, ``index``, ``steps``, ``resolve_step``, ``select``,
``params``, ``metrics_at``): this module does no I/O of its own beyond ``universality.engine.rundir`` and
imports no view.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any

import jax

from universality.engine import rundir
from universality.engine.analysis.jsonable import to_json


def family_analysis(view):
  """The analysis module of the view's task family."""
  return importlib.import_module(view.family.analysis_module)


def settings_of(view, **overrides) -> dict[str, Any]:
  """The analysis settings: the family's defaults with ``overrides`` (unknown names are refused)."""
  defaults = dict(family_analysis(view).SETTINGS)
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f"unknown analysis setting {unknown[0]!r}; settings: {', '.join(sorted(defaults))}")
  out = dict(defaults)
  out.update({k: v for k, v in overrides.items() if v is not None})
  return out


def cohort_key(seed: int, cohort: str):
  """The PRNG key of a cohort's analysis (rotation baseline, subsamples): a function of the analysis seed
  and the cohort's name only, so a cohort gets the same numbers in any study that contains it."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(cohort.encode()) & 0x7FFFFFFF)


def analyze_cohorts(view, step: int | None = None, *, seed: int = 0, progress: bool = False,
                    batch_size: int | None = None, **settings) -> dict[str, dict]:
  """``{cohort: {"task", "aggregate", "runs": [record, ...]}}`` for the selected runs at checkpoints up to
  ``step`` (default: all), as if ``step`` were the last; writes nothing."""
  module = family_analysis(view)
  settings = settings_of(view, **settings)
  final = view.resolve_step(step)
  steps = [s for s in view.steps if s <= final]
  if getattr(module, "LAST_STEP_ONLY", False):  # the family analyses trained models, not their history
    steps = steps[-1:]
  subs = {name: view.select(cohort=name) for name in view.cohorts}
  if progress:
    print(f"Analysing {len(view)} runs in {len(subs)} cohorts at {len(steps)} checkpoints", flush=True)
  params_by_cohort: dict[str, dict] = {name: {} for name in subs}
  for s in steps:  # restore each checkpoint once for all cohorts
    for name, sub in subs.items():
      params_by_cohort[name][s] = sub.params(s)
  logged = view.metrics_at(final)
  out = {}
  for name, sub in subs.items():
    res = module.analyze_cohort(sub, params_by_cohort[name], cohort_key(seed, name), settings,
                                batch_size=batch_size)
    records = []
    for i, rec in zip(sub.index, res["runs"]):
      row = dict(view.rows[int(i)], index=int(i))
      row["final"] = logged[int(i)]
      row["generalised"] = view.family.generalised(row["final"])
      row.update({k: v for k, v in rec.items() if k != "run"})
      records.append(row)
    out[name] = {"task": res["task"], "aggregate": res["aggregate"], "runs": records}
    if "arrays" in res:
      out[name]["arrays"] = res["arrays"]
  return out


def analyze(view, *, step: int | None = None, seed: int = 0, progress: bool = False,
            **settings) -> dict[str, Any]:
  """Analyses every cohort of the view; writes (process 0) and returns the summary (module docstring)."""
  per_cohort = analyze_cohorts(view, step, seed=seed, progress=progress, **settings)
  records = sorted((rec for res in per_cohort.values() for rec in res["runs"]), key=lambda r: r["index"])
  all_steps = view.steps
  final = step if step is not None else all_steps[-1]
  summary = {"workdir": rundir.resolve(view.workdir), "family": view.family.name,
             "steps": [s for s in all_steps if s <= final], "settings": settings_of(view, **settings),
             "runs": records,
             "cohorts": {name: {"task": res["task"], "aggregate": res["aggregate"],
                                "runs": [r["index"] for r in res["runs"]]}
                         for name, res in per_cohort.items()}}
  summary = to_json(summary)
  if jax.process_index() == 0:
    for name, res in per_cohort.items():
      if "arrays" in res:
        rundir.write_cohort_arrays(view.workdir, name, res["arrays"])
    rundir.write_summary(view.workdir, summary)
  return summary
