"""The size check of a launch: what a sweep needs in memory, estimated from its config before anything is built.

  budget.check(cfg, devices)     # raises BudgetError (one line) when the estimate exceeds the budget

The estimate counts, per device, the train state of its runs (parameters and the optimiser's state), their
task data and the activations of one step of the runs it vmaps together (``exec.run_chunk``; one at a time
on the CPU), and on the host its copies of the task data and of the state (checkpoints are written from
it) plus the per-run records. The family supplies the run count and one run's footprint from the config
(``Family.n_runs``, ``Family.footprint``), so a sweep of 10⁷ seeds or a group whose step needs a terabyte is
refused in well under a second, before a row, a group table or an array exists.

The budget is ``exec.memory_budget_gb`` when it is set (> 0), else what the machine reports: on an
accelerator the smallest ``memory_stats()['bytes_limit']`` of the local devices (the host's available RAM is
checked too), on the CPU the host's available RAM (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``),
which the CPU devices share.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import jax

from universality.engine import config as config_lib
from universality.engine import families, optim

ROW_BYTES = 4096      # host memory per run outside the arrays: its rows, key and runs.json text (~2.5 kB seen)
_GB = 1e9


class BudgetError(ValueError):
  """A launch that does not fit in the memory it may use; the message is one line."""


class Estimate(NamedTuple):
  """Bytes a launch needs: ``device`` on each device, ``host`` in host RAM besides the devices' memory."""
  n_runs: int
  runs_per_device: int
  state: int            # one run's train state
  data: int             # one run's task data
  step: int             # one run's activations of one step
  device: int
  host: int


def _bytes(n: float) -> str:
  for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


def host_ram_available() -> int:
  """Bytes of host RAM a new allocation can get (MemAvailable), else the physical RAM."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_limit(devices: Sequence) -> int | None:
  """The smallest ``bytes_limit`` of ``devices``; None where a device does not report one (the CPU)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # backends without memory stats raise various errors
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def state_bytes(cfg, params, family: families.Family | None = None) -> int:
  """One run's train state: its parameters (shapes) and its optimiser's state (``jax.eval_shape``).
  ``family``: the study's family when the caller has it (default: looked up from ``cfg.family``)."""
  family = family or families.get(cfg.family)
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
  return param_bytes + optim.state_bytes(cfg.opt, cfg.steps, params, family.param_roles)


def estimate(cfg, n_devices: int, on_cpu: bool, family: families.Family | None = None) -> Estimate | None:
  """The memory a launch of ``cfg`` on ``n_devices`` devices needs; None when its family gives no footprint."""
  family = family or families.get(cfg.family)
  footprint = family.footprint(cfg)
  if footprint is None:
    return None
  n_runs = family.n_runs(cfg)
  per_device = math.ceil(n_runs / n_devices)
  chunk = min(per_device, cfg[config_lib.EXECUTION].run_chunk or (1 if on_cpu else per_device))
  state = state_bytes(cfg, footprint.params, family)
  # The update of the runs in flight holds the old and the new state besides their activations.
  device = per_device * (state + footprint.data) + chunk * (2 * state + footprint.step) + footprint.shared
  host_shared = footprint.shared if footprint.host_shared is None else footprint.host_shared
  host = n_runs * (state + footprint.data + ROW_BYTES) + host_shared
  return Estimate(n_runs, per_device, state, footprint.data, footprint.step, device, host)


def check(cfg, devices: Sequence, family: families.Family | None = None) -> Estimate | None:
  """Raises ``BudgetError`` when ``cfg`` does not fit on ``devices`` (every device of the launch, over which
  its runs are spread); returns the estimate (None: the family gives no footprint)."""
  on_cpu = all(d.platform == "cpu" for d in devices)
  est = estimate(cfg, len(devices), on_cpu, family)
  if est is None:
    return None
  local = [d for d in devices if d.process_index == jax.process_index()]
  flag = float(cfg[config_lib.EXECUTION].memory_budget_gb) * _GB
  host = ("in host RAM", flag or host_ram_available(), "host RAM available")
  if on_cpu:  # the CPU devices are the host's RAM
    checks = [(est.host + len(local) * est.device, *host)]
  else:
    checks = [(est.device, "per device", flag or device_memory_limit(local), "device memory"),
              (est.host, *host)]
  for need, scope, limit, where in checks:
    if limit and need > limit:
      source = f"config.{config_lib.EXECUTION}.memory_budget_gb" if flag else where
      raise BudgetError(
          f"launch needs about {_bytes(need)} {scope} but the budget is {_bytes(limit)} ({source}): "
          f"train state {_bytes(est.state)}, task data {_bytes(est.data)} and activations of one step "
          f"{_bytes(est.step)} per run, {est.n_runs} runs ({est.runs_per_device} per device); shrink the "
          f"sweep, or raise config.{config_lib.EXECUTION}.memory_budget_gb to launch anyway")
  return est
