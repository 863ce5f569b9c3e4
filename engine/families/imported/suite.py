"""The import of several model directories as one run directory (``universality.experiments.import_models``).

  cfg = suite.import_models(workdir, ["dir/alias-gpt2-small-x21", "dir/battlestar-gpt2-small-x49"])

Every directory is opened and checked first (config, architecture, every tensor's name and shape, from the
safetensors headers alone): a directory that cannot be imported, or two that differ in architecture or
shapes, is refused in one line naming the first difference, before anything is written. Then each
parameter of the stacked suite is a float32 memory map ``[S, ...]`` in a scratch folder of the run
directory, filled tensor by tensor (one tensor of one model read at a time), and handed to Orbax as the
checkpoint at step 0: the import's own memory is one copy of the suite, Orbax's write buffers, the stacked
arrays being file-backed (benchmarks/README.md); config.json, runs.json and an empty metrics log
follow, and the scratch folder is removed. A failed import removes what it wrote (the whole directory when it
created it). Importing the same models into the same directory again finds them there and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import tqdm

from universality.engine import checkpoint as checkpoint_lib
from universality.engine import config as config_lib
from universality.engine import rundir
from universality.engine.families.imported import family as family_lib
from universality.engine.families.imported import models
from universality.engine.families.imported import weights

STEP = 0  # the imported parameters' checkpoint step (nothing is trained here)
_SCRATCH = ".import-stacking"


class SuiteError(ValueError):
  """An import that cannot be done; the message is one line."""


def open_suite(paths: list[str]) -> list[weights.Model]:
  """The model directories, opened and checked against each other (module docstring)."""
  if not paths:
    raise SuiteError("--models: name at least one model directory")
  opened = [weights.open_model(p) for p in paths]
  names = [m.name for m in opened]
  dup = next((n for n in names if names.count(n) > 1), None)
  if dup is not None:
    raise SuiteError(f"two model directories are named {dup!r}: runs are named by their directory")
  for m in opened[1:]:
    diff = weights.first_difference(opened[0], m)
    if diff:
      raise SuiteError(f"mismatched architectures: {diff}")
  return opened


def config_for(opened: list[weights.Model], labels: list[str] | None = None):
  """The study config of an imported suite."""
  if labels is not None and len(labels) != len(opened):
    raise SuiteError(f"--labels: {len(labels)} labels for {len(opened)} models")
  cfg = config_lib.default_config(family_lib.FAMILY.name)
  cfg.seeds = len(opened)
  cfg.task.suite = json.dumps([{"model": m.name, "name_or_path": m.name_or_path, "path": m.path,
                                "seed_label": labels[k] if labels else family_lib.seed_label(m.name, k)}
                               for k, m in enumerate(opened)])
  cfg.task.special_ids = ",".join(str(i) for i in opened[0].special_ids)
  cfg.model.imported.update(family_lib.spec_section(opened[0].spec))
  config_lib.validate(cfg)
  return cfg


def _stack(opened: list[weights.Model], scratch: str, progress: bool):
  """The suite's parameters as float32 memory maps ``[S, ...]`` in ``scratch``, filled tensor by tensor."""
  spec = opened[0].spec
  s = len(opened)
  shapes = models.param_shapes(spec)
  os.makedirs(scratch)

  def leaf(name, shape):
    return np.lib.format.open_memmap(os.path.join(scratch, f"{name}.npy"), mode="w+", dtype=np.float32,
                                     shape=(s,) + tuple(shape))

  out = {k: leaf(k, v) for k, v in shapes.items() if k != "blocks"}
  out["blocks"] = {k: leaf(f"blocks.{k}", v) for k, v in shapes["blocks"].items()}
  steps = weights.plan(spec)
  bar = tqdm.tqdm(total=s * len(steps), desc="import", unit="tensor", disable=not progress)
  for i, m in enumerate(opened):
    for key, layer in steps:
      if layer is None:
        out[key][i] = m.tensor(key, None)
      else:
        out["blocks"][key][i, layer] = m.tensor(key, layer)
      bar.update()
  bar.close()
  for x in [v for v in out.values() if not isinstance(v, dict)] + list(out["blocks"].values()):
    x.flush()
  return out


def import_models(workdir: str, paths: list[str], labels: list[str] | None = None, progress: bool = True):
  """Imports the model directories ``paths`` (in that order, one run each) into ``workdir``; returns the
  study config. See the module docstring."""
  opened = open_suite(paths)
  cfg = config_for(opened, labels)
  workdir = rundir.resolve(workdir)
  if rundir.is_rundir(workdir):
    if config_lib.check_workdir(workdir, cfg):  # the same suite: imported already
      return cfg
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise SuiteError(f"workdir {workdir} exists and is not an empty directory: import into a new one")
  created = not os.path.exists(workdir)
  scratch = os.path.join(workdir, _SCRATCH)
  try:
    os.makedirs(workdir, exist_ok=True)
    stacked = _stack(opened, scratch, progress)
    with checkpoint_lib.Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS), async_save=False) as ckpt:
      ckpt.save(STEP, family_lib.ImportedState(params=stacked))
    del stacked
    rundir.atomic_write(rundir.path(workdir, rundir.METRICS), "")
    rundir.write_runs(workdir, family_lib.FAMILY.runs(cfg))
    rundir.write_config(workdir, config_lib.identity(cfg))  # last: a directory without it is no run directory
  except BaseException:
    if created:
      shutil.rmtree(workdir, ignore_errors=True)
    else:
      for name in os.listdir(workdir):
        full = os.path.join(workdir, name)
        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
    raise
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return cfg
