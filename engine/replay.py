"""Open a run directory in a notebook: config, runs, cohorts, checkpoints, metrics; re-analyse any step.

  run = universality.engine.replay.open("runs/default")   # the view of the directory's task family (a Run subclass)
  run.runs                       # one row per leading index of the stacked state (runs.json)
  run.cohorts                    # cohort names: runs that differ only in seed
  sub = run.select(lr=1e-2)      # a view on some runs; every accessor below respects it
  one = sub.select(seed=3)       # seed = the seed number k; base_seed = the config's base seed
  params = sub.params()          # stacked params of the newest checkpoint, numpy, on the host
  res = sub.analyze(step=run.steps[5])   # the analysis (universality.engine.analysis.driver) as if that step were last
  run.summary()                  # analysis/summary.json as saved at the end of the launch

Selection fields: every field of a runs.json row (for group composition: ``group``, ``seed``, ``base_seed``,
``lr``, ``weight_decay``, ``train_frac``, ``cohort``, ``name``) and ``index`` (the run's leading index in the
run directory). A value may be a list of accepted values; floats compare with a relative tolerance of 1e-9.
The family's view adds its own accessors (group composition: ``universality.engine.families.group.view``).

A study trained in several buckets (universality.engine.rundir: ``buckets/<name>/``, one run directory each)
opens as a
``Study``, a view across them::

  study = universality.engine.replay.open("runs/chughtai_mlp")
  study.buckets                  # {name: the family's view of that bucket's run directory}, in launch order
  study.runs                     # every run of every bucket, each row with its ``bucket`` name added
  s6 = study.select(group="S6")  # runs of one bucket: that bucket's family view (a Run), as above
  both = study.select(seed=0)    # runs of several buckets: a Study of the selected views
  study.summary()                # {bucket: its analysis/summary.json}

Its ``select`` takes the fields above and ``bucket``; ``index`` there is a run's index in its bucket's run
directory. Buckets not started yet are listed in ``missing``.

Everything is read from JSON files and Orbax checkpoints; nothing in a run directory is executed or unpickled,
and nothing it says is trusted before it is checked: a config.json whose run count disagrees with runs.json,
whose shapes disagree with a checkpoint's own (Orbax metadata), or whose sweep would not fit in memory
(universality.engine.budget) is refused with a one-line ``RunDirError`` / ``BudgetError`` before anything is
allocated. Checkpoints hold the unpadded stacked state as numpy arrays (``train.host_state_spec``), so they
restore onto the local host whatever device layout (devices, processes) wrote them.
"""

from __future__ import annotations

import importlib

from universality.engine import config as config_lib
from universality.engine import families
from universality.engine import rundir
from universality.engine.view import Run, _matches  # noqa: F401 - Run is part of this API

class Study:
  """A read-only view of a study of several buckets (module docstring), optionally restricted to some of
  their runs: ``views`` maps each bucket with selected runs to its family view."""

  def __init__(self, workdir: str, views: dict[str, Run] | None = None, _config=None):
    self.workdir = rundir.resolve(workdir)
    self.config = _config if _config is not None else config_lib.load(self.workdir)
    self.family = families.get(self.config.family)
    self.names = [name for name, _ in families.buckets(self.config)]
    if views is None:
      views = {}
      for name, cfg_b in families.buckets(self.config):
        bucket = rundir.bucket_dir(self.workdir, name)
        if rundir.is_rundir(bucket):
          views[name] = _open_view(bucket)
          if config_lib.identity(views[name].config) != config_lib.identity(cfg_b):
            raise rundir.RunDirError(f"{bucket}: its {rundir.CONFIG} is not bucket {name} of the study in "
                                     f"{self.workdir}")
    self.buckets: dict[str, Run] = views

  @property
  def missing(self) -> list[str]:
    """Buckets of the study without a run directory yet (not started)."""
    return [name for name in self.names if not rundir.is_rundir(rundir.bucket_dir(self.workdir, name))]

  @property
  def runs(self) -> list[dict]:
    """The selected runs of every bucket, in bucket order, each row with its ``bucket`` added."""
    return [dict(r, bucket=name) for name, view in self.buckets.items() for r in view.runs]

  @property
  def cohorts(self) -> list[str]:
    return [c for view in self.buckets.values() for c in view.cohorts]

  def __len__(self) -> int:
    return sum(len(view) for view in self.buckets.values())

  def __repr__(self) -> str:
    return f"Study({self.workdir!r}, buckets={list(self.buckets)}, runs={len(self)})"

  def bucket(self, name: str) -> Run:
    """The family view of one bucket."""
    if name not in self.buckets:
      raise ValueError(f"no bucket {name!r} in this view; buckets: {', '.join(self.buckets)}"
                       + (f" (not started: {', '.join(self.missing)})" if self.missing else ""))
    return self.buckets[name]

  def select(self, **filters) -> "Run | Study":
    """The selected runs matching ``filters`` (``Run.select``, plus ``bucket``): the family view of their
    bucket when they lie in one, else a Study of the views. ValueError for an unknown field or no match."""
    names = list(self.buckets)
    if "bucket" in filters:
      names = [n for n in names if _matches(n, filters["bucket"])]
    rest = {k: v for k, v in filters.items() if k != "bucket"}
    fields = {"index", "bucket"} | {k for view in self.buckets.values() for r in view.runs for k in r}
    unknown = sorted(set(rest) - fields)
    if unknown:
      raise ValueError(f"select: unknown field {unknown[0]!r}; fields: {', '.join(sorted(fields))}")
    views = {}
    for name in names:
      view = self.buckets[name]
      keep = [int(i) for i, r in zip(view.index, view.runs)
              if all(_matches(int(i) if k == "index" else r.get(k), v) for k, v in rest.items())]
      if keep:
        views[name] = view._view(keep)
    if not views:
      raise ValueError(f"select: no run matches {filters} in buckets {', '.join(self.buckets)}")
    if len(views) == 1:
      return next(iter(views.values()))
    return Study(self.workdir, views, self.config)

  def summary(self) -> dict[str, dict]:
    """Each bucket's analysis/summary.json, by bucket."""
    return {name: view.summary() for name, view in self.buckets.items()}

  def close(self) -> None:
    for view in self.buckets.values():
      view.close()

  def __enter__(self) -> "Study":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _open_view(workdir: str) -> Run:
  cfg = config_lib.load(workdir)
  module, _, cls = families.get(cfg.family).view_module.partition(":")
  view_class = getattr(importlib.import_module(module), cls or "View")
  return view_class(workdir)


def is_study_of_buckets(workdir: str) -> bool:
  """Whether ``workdir`` is a study of several buckets (no runs.json of its own; universality.engine.rundir)."""
  workdir = rundir.resolve(workdir)
  if rundir.has_runs(workdir):  # one run directory, whatever its config would split into today
    return False
  cfg = config_lib.load(workdir)
  return len(families.buckets(cfg)) > 1


def open(workdir: str) -> Run | Study:  # noqa: A001 - mirrors the builtin on purpose: replay.open(workdir)
  """Opens a run directory (read-only) in the notebook view of its task family, or a study of several
  buckets as a ``Study`` (module docstring)."""
  if is_study_of_buckets(workdir):
    return Study(workdir)
  return _open_view(workdir)
