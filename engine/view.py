"""The base notebook view of one run directory, below every family's view: config, runs, cohorts,
checkpoints, metrics, and the analysis of any step. A family's ``View`` (``Family.view_module``) subclasses
``Run``; ``universality.engine.replay.open`` picks that class from the directory's config (module docstring of
``universality.engine.replay``: selection fields, what is checked before anything is read).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from universality.engine import budget
from universality.engine import checkpoint as checkpoint_lib
from universality.engine import config as config_lib
from universality.engine import families
from universality.engine import rundir
from universality.engine import train
from universality.engine.analysis import driver

_STATE_CACHE = 2  # restored train states kept in memory (each holds params and two Adam moments)


def _matches(value, accepted) -> bool:
  if isinstance(accepted, (list, tuple, set, frozenset, range, np.ndarray)):
    return any(_matches(value, a) for a in accepted)
  if isinstance(value, float) or isinstance(accepted, float):
    try:
      return math.isclose(float(value), float(accepted), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
      return False
  return value == accepted


def _check_run_count(workdir: str, cfg, n_rows: int) -> None:
  """runs.json must list the runs config.json describes (counted, not built): a mismatch is refused."""
  if not n_rows:
    raise rundir.RunDirError(f"{workdir}: {rundir.RUNS} lists no run")
  n_cfg = families.get(cfg.family).n_runs(cfg)
  if n_cfg != n_rows:
    raise rundir.RunDirError(f"{workdir}: {rundir.CONFIG} describes {n_cfg} runs but {rundir.RUNS} lists "
                             f"{n_rows}; the run directory is inconsistent")


def _check_rows(workdir: str, cfg, rows: list[dict]) -> None:
  """Each runs.json row must be the run config.json's sweep puts at its index (every field both name; floats
  to 1e-9): a row moved or edited would make ``select`` serve another run's weights, or ``apply`` evaluate
  one group's inputs on another group's model."""
  for i, (want, have) in enumerate(zip(families.get(cfg.family).runs(cfg), rows)):
    bad = next((k for k in want if k in have and not _matches(have[k], want[k])), None)
    if bad is not None:
      raise rundir.RunDirError(f"{workdir}: {rundir.RUNS} row {i} has {bad}={have[bad]!r} but {rundir.CONFIG}'s "
                               f"sweep puts {bad}={want[bad]!r} there; the run directory is inconsistent")


def _check_shapes(workdir: str, step: int, stored: list, spec) -> None:
  """The checkpoint's own array shapes must be those config.json describes, before anything is restored."""
  expected = sorted((tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(spec))
  if stored != expected:
    lead = sorted({s[0][0] for s in stored if s[0]})
    diff = next((f"{a} stored, {b} expected" for a, b in zip(stored, expected) if a != b),
                f"{len(stored)} arrays stored, {len(expected)} expected")
    raise rundir.RunDirError(f"{workdir}: checkpoint {step} does not match {rundir.CONFIG} (runs stored: "
                             f"{lead}; {diff})")


@dataclasses.dataclass
class Cache:
  """What every view of one run directory shares, owned by the views of that directory alone: the config
  and runs.json rows (read once), the trainer (its state layout), the checkpoint reader, the last restored
  states, summary.json (with the mtime it was read at) and the family's stacked forward functions
  (``forward``: whatever the family's view builds from the config, e.g. ``models.Stacked``)."""
  config: ml_collections.ConfigDict
  rows: list
  trainer: Any = None
  checkpointer: Any = None
  states: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
  summary: tuple | None = None
  forward: Any = None


class Run:
  """A read-only view of a run directory, optionally restricted to a subset of its runs."""

  def __init__(self, workdir: str, index: Sequence[int] | None = None, _shared: Cache | None = None):
    self.workdir = rundir.resolve(workdir)
    if _shared is None:
      config = config_lib.load(self.workdir)
      family = families.get(config.family)
      # Format-1 rows carry no cohort: it is a function of the row.
      rows = [r if "cohort" in r else dict(r, cohort=family.cohort_name(r))
              for r in rundir.read_runs(self.workdir)]
      _check_run_count(self.workdir, config, len(rows))
      _check_rows(self.workdir, config, rows)
      _shared = Cache(config=config, rows=rows)
    self._shared = _shared
    n = len(self._shared.rows)
    self.index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)

  # --- Metadata ------------------------------------------------------------------------------------

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self._shared.config

  @property
  def family(self) -> families.Family:
    return families.get(self.config.family)

  @property
  def runs(self) -> list[dict]:
    """One row per selected run (runs.json): ``seed`` is the seed number k, ``base_seed`` the config's."""
    rows = self._shared.rows
    return [rows[i] for i in self.index]

  @property
  def rows(self) -> list[dict]:
    """Every row of runs.json (not only the selected runs'), by leading index."""
    return self._shared.rows

  @property
  def cohorts(self) -> list[str]:
    """The cohorts of the selected runs (runs that differ only in seed), in run order."""
    return list(dict.fromkeys(r["cohort"] for r in self.runs))

  @property
  def steps(self) -> list[int]:
    """Checkpointed steps, ascending."""
    return self._checkpointer().steps()

  def __len__(self) -> int:
    return len(self.index)

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.workdir!r}, runs={len(self)}, cohorts={len(self.cohorts)}, "
            f"steps={self.steps[-1:]})")

  def _view(self, index) -> "Run":
    return type(self)(self.workdir, index, self._shared)

  def select(self, **filters) -> "Run":
    """The selected runs whose fields equal the given values (see the module docstring for the fields).

    Raises ValueError for an unknown field or when no run matches.
    """
    rows = self._shared.rows
    fields = {"index"} | {k for r in rows for k in r}
    unknown = sorted(set(filters) - fields)
    if unknown:
      raise ValueError(f"select: unknown field {unknown[0]!r}; fields: {', '.join(sorted(fields))}")

    def field(i, name):
      return int(i) if name == "index" else rows[i].get(name)

    keep = [int(i) for i in self.index
            if all(_matches(field(i, k), v) for k, v in filters.items())]
    if not keep:
      have = {k: sorted({field(i, k) for i in self.index}, key=str) for k in filters}
      raise ValueError(f"select: no run matches {filters}; the selection has "
                       + "; ".join(f"{k} in {v}" for k, v in have.items()))
    return self._view(keep)

  def one_cohort(self, **filters) -> "Run":
    """The selected runs of one cohort (after ``filters``); a one-line error lists them when several remain."""
    sub = self.select(**filters) if filters else self
    if len(sub.cohorts) != 1:
      raise ValueError(f"the selection spans {len(sub.cohorts)} cohorts {sub.cohorts[:6]}: narrow it "
                       "(e.g. select(cohort=...) or by lr / weight_decay / task fields)")
    return sub

  # --- Checkpoints ---------------------------------------------------------------------------------

  def trainer(self):
    """The trainer rebuilt from config.json on one local host device, cached.

    Only its run layout is used here (the shapes of the checkpointed state), so it never spans processes
    or accelerators: a replay on one process of a multi-host job needs no other process.
    """
    if self._shared.trainer is None:
      try:
        device = jax.local_devices(backend="cpu")[0]
      except RuntimeError:  # a platform list without the CPU backend
        device = jax.local_devices()[0]
      budget.check(self.config, [device])  # config.json is data: bound what it makes us allocate
      mesh = jax.sharding.Mesh(np.asarray([device]), (train.AXIS,))
      self._shared.trainer = train.make_train(self.config, mesh=mesh)
    return self._shared.trainer

  def _checkpointer(self) -> checkpoint_lib.Checkpointer:
    if self._shared.checkpointer is None:
      self._shared.checkpointer = checkpoint_lib.Checkpointer(
          rundir.path(self.workdir, rundir.CHECKPOINTS), read_only=True, this_process_only=True)
    return self._shared.checkpointer

  def resolve_step(self, step: int | None) -> int:
    """``step`` if it is a checkpointed step, the newest for None; a ValueError names the steps otherwise."""
    steps = self.steps
    if not steps:
      raise ValueError(f"{self.workdir} has no checkpoint")
    if step is None:
      return steps[-1]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in steps:
      raise ValueError(f"no checkpoint at step {step!r}; checkpointed steps: {steps}")
    return int(step)

  def state(self, step: int | None = None) -> Any:
    """The stacked train state of ALL runs at ``step`` (default: newest) as host numpy arrays."""
    key = self.resolve_step(step)
    cache = self._shared.states
    if key in cache:
      cache.move_to_end(key)
    else:
      spec = train.host_state_spec(self.trainer())
      _check_shapes(self.workdir, key, self._checkpointer().stored_shapes(key), spec)
      _, cache[key] = self._checkpointer().restore(spec, step=key, fallback=False)
      while len(cache) > _STATE_CACHE:
        cache.popitem(last=False)
    return cache[key]

  def params(self, step: int | None = None) -> Any:
    """Stacked parameters of the selected runs at ``step`` (default: the newest checkpoint)."""
    return jax.tree.map(lambda x: np.asarray(x)[self.index], self.state(step).params)

  def metrics(self) -> dict[str, np.ndarray]:
    """metrics.jsonl as arrays: "step" [E] and every metric [E, S] for the selected runs."""
    m = rundir.read_metrics(self.workdir, len(self._shared.rows))
    return {k: (v if k == "step" else v[:, self.index]) for k, v in m.items()}

  def metrics_at(self, step: int) -> dict[int, dict | None]:
    """Logged metrics of every run at ``step`` (None where that step was not logged, e.g. step 0)."""
    m = rundir.read_metrics(self.workdir, len(self._shared.rows))
    rows = np.flatnonzero(m["step"] == step)
    out: dict[int, dict | None] = {}
    for i in range(len(self._shared.rows)):
      if not rows.size:
        out[i] = None
        continue
      vals = {k: float(v[rows[-1], i]) for k, v in m.items() if k != "step"}
      out[i] = {k: (v if np.isfinite(v) else None) for k, v in vals.items()}
    return out

  def close(self) -> None:
    """Releases the checkpoint reader (shared by every view of this run directory)."""
    ckpt, self._shared.checkpointer = self._shared.checkpointer, None
    if ckpt is not None:
      ckpt.close()

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- Analysis ------------------------------------------------------------------------------------

  def summary(self) -> dict:
    """analysis/summary.json as written at the end of the launch (schema: universality.engine.analysis.driver)."""
    mtime = rundir.summary_mtime(self.workdir) if rundir.has_summary(self.workdir) else None
    cached = self._shared.summary
    if cached is None or cached[0] != mtime:
      cached = (mtime, rundir.read_summary(self.workdir))
      self._shared.summary = cached
    return cached[1]

  def cohort_summary(self, **filters) -> dict:
    """The summary's entry for one cohort restricted to the selected runs.

    Returns ``{"cohort", "task", "aggregate", "records", "positions"}``: ``records`` are the summary's run
    records of the selected runs, ``positions`` their places in the cohort's S×S matrices (``aggregate`` is
    the saved one, over all runs of the cohort).
    """
    sub = self.one_cohort(**filters)
    name = sub.cohorts[0]
    summary = self.summary()
    if name not in summary["cohorts"]:
      raise ValueError(f"summary.json has no cohort {name!r}; it has {sorted(summary['cohorts'])}")
    entry = summary["cohorts"][name]
    where = {int(i): p for p, i in enumerate(entry["runs"])}
    missing = [int(i) for i in sub.index if int(i) not in where]
    if missing:
      raise ValueError(f"summary.json does not cover runs {missing} of cohort {name}: re-run the analysis")
    return {"cohort": name, "task": entry["task"], "aggregate": entry["aggregate"],
            "records": [summary["runs"][int(i)] for i in sub.index],
            "positions": [where[int(i)] for i in sub.index]}

  def analyze(self, step: int | None = None, *, seed: int = 0, progress: bool = False,
              **settings) -> dict[str, dict]:
    """Re-runs the analysis on the selected runs as if ``step`` were the last checkpoint; writes nothing.

    ``settings`` override the family's analysis settings (``Family.analysis_settings``). Returns ``{cohort:
    {"task": ..., "aggregate": ..., "runs": [record, ...]}}`` (universality.engine.analysis.driver); with all
    runs of a cohort selected and ``step`` the last checkpoint this equals the cohort's summary entry.
    """
    return driver.analyze_cohorts(self, step, seed=seed, progress=progress, **settings)
