"""The absl entry point shared by the studies' launch scripts: flags, optional jax.distributed, one-line errors.

  define(default_config_path)   # at import of a launch script: the flags, with that script's default config
  app.run(main)

Relaunching the same command resumes from the newest checkpoint. On a TPU pod or a multi-GPU cluster add
``--distributed`` (every process runs the same command; see BUILD.md).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_CONFIG = None


def define(default_config: str) -> None:
  """Defines ``--config`` with ``default_config`` (a file in experiments/configs/) as its default."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(CONFIGS, default_config), "Study config file (get_config()).", lock_config=True)


_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints, report.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() before anything else (a TPU pod or a multi-host "
    "GPU job). Default: only when a cluster environment is detected.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for --distributed outside an auto-detected "
    "cluster (TPU pods, SLURM and Open MPI are detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a --distributed job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a --distributed job.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_ANALYZE = flags.DEFINE_bool("analyze", None, "Analyse and report at the end (default: config.analyze).")


def _cluster_detected() -> bool:
  keys = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
          "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
  return any(os.environ.get(k) for k in keys)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  import jax
  distributed = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else _cluster_detected()
  if distributed:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from engine import checkpoint, launch
  try:
    launch.run_study(_CONFIG.value, _WORKDIR.value, progress=_PROGRESS.value, analyze=_ANALYZE.value)
  except (ValueError, launch.LaunchError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

