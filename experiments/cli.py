"""The absl entry point shared by the studies' launch scripts: flags, optional jax.distributed, one-line errors.

  cli.define("default.py")                      # at import of a launch script: its default config file
  app.run(cli.main, flags_parser=cli.parse_flags)

The study's buckets are printed first (``universality.engine.launch.describe``: groups of very different
orders train one bucket after another, each one program). Relaunching the same command resumes from the newest
checkpoint. On a TPU pod or a multi-GPU cluster add ``--distributed`` (every process runs the same command;
see BUILD.md). Bad flags, config files and configs end with one line ``error: ...`` on stderr and exit status
2.
"""

import atexit
import difflib
import logging as pylogging
import os
import re
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_DEFAULT_CONFIG = None  # the launch script's default config file (``define``)
_CONFIG = None  # the --config flag's holder; defined while parsing (see parse_flags)


def define(default_config: str) -> None:
  """Names the launch script's default config, a file of experiments/configs/ (``--config`` overrides it)."""
  global _DEFAULT_CONFIG
  _DEFAULT_CONFIG = os.path.join(CONFIGS, default_config)


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


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _config_path(argv) -> str:
  """The --config file named on the command line (without a ``:args`` suffix), or the default."""
  path = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path.split(":", 1)[0]


def _config_file_error(path: str, error: BaseException) -> str:
  """Why the config file ``path`` failed to load with ``error``, checked without running the file again."""
  if not os.path.isfile(path):
    return f"--config: no such config file {path}"
  try:
    with open(path) as f:
      compile(f.read(), path, "exec")
  except SyntaxError as e:
    return f"--config: syntax error in {path} line {e.lineno}: {e.msg}"
  except (OSError, ValueError) as e:
    return f"--config: cannot read {path}: {e}"
  chain = []  # ml_collections wraps the file's own exception, sometimes twice
  while error is not None and len(chain) < 8:
    chain.append(str(error))
    error = error.__cause__ or error.__context__
  if any("get_config" in text for text in chain):
    return f"--config: {path} does not define get_config()"
  lines = [line.strip() for text in chain for line in text.splitlines() if line.strip()]
  return f"--config: cannot load {path}: {lines[-1] if lines else 'unknown error'}"


def _unknown_field_error(e: Exception, argv) -> str:
  """An unknown ``--config.FIELD`` override, named with its closest existing field."""
  while e.args and isinstance(e.args[0], Exception):  # ml_collections wraps a KeyError in an AttributeError
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  key = text.strip().splitlines()[0].strip("\"' ")
  flag = next((a.split("=", 1)[0] for a in argv if re.match(rf"--config\.(\w+\.)*{re.escape(key)}(=|$)", a)),
              f"--config.{key}")
  from universality.engine import config as config_lib  # every family's field names, for the suggestion
  fields = config_lib.field_names()
  close = difflib.get_close_matches(flag[len("--config."):], fields, n=1) or \
      [f for f in fields if difflib.get_close_matches(key, [f.rsplit(".", 1)[-1]])][:1]
  return f"{flag}: no such config field" + (f" (did you mean --config.{close[0]}?)" if close else "")


def parse_flags(argv):
  """absl flag parsing with every bad flag, config file or override reported as one ``error:`` line.

  The --config flag is defined here rather than at import: ml_collections applies the ``--config.*``
  overrides when the flag is defined, and an unknown field would otherwise end the import in a traceback.
  """
  global _CONFIG
  try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Study config file (get_config()).", lock_config=True)
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    if "get_config" in str(e):
      _fail(_config_file_error(_config_path(argv), e))
    _fail(_unknown_field_error(e, argv))
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except Exception as e:  # ml_collections raises OSError, SyntaxError and more for a config file that fails
    _fail(_config_file_error(_config_path(argv), e))
  try:
    _CONFIG.value.lock()  # a config file that failed to load raises here, on first access
  except Exception as e:
    _fail(_config_file_error(_config_path(argv), e))
  return rest


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    # A failed save (a full disk) is raised to us and printed in one line; Orbax's own log of it is a
    # traceback per thread. --verbosity shows it again.
    pylogging.getLogger("absl").addFilter(lambda record: "orbax" not in record.pathname)
    pylogging.getLogger("gcsfs").setLevel(pylogging.CRITICAL)  # each retry of a dead server, with a traceback
  import jax
  distributed = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else _cluster_detected()
  if distributed:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from universality.engine import checkpoint, launch
  try:
    study = launch.check_size(_CONFIG.value)  # validated once: the family and buckets are passed along
    if jax.process_index() == 0:
      print("\n".join(launch.describe(study)), flush=True)
    launch.run_study(study, _WORKDIR.value, progress=_PROGRESS.value, analyze=_ANALYZE.value)
  except checkpoint.SaveAbandoned as e:  # Orbax's threads still wait on the storage: exit without them
    _error_exit(str(e))
  except launch.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)  # every process: each host keeps its own log
    sys.exit(launch.PREEMPTED_EXIT)
  except (ValueError, launch.LaunchError, checkpoint.CheckpointError) as e:
    _error_exit(str(e))
  except OSError as e:  # a full disk, a read-only or vanished directory: what was written is kept
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    _error_exit(f"{where}{e.strerror or e}")


def _error_exit(message: str) -> None:
  """The one ``error:`` line and exit status 2, without the interpreter's teardown: every context manager
  of the launch has closed by now (locks released, files written atomically), and what is left are Orbax's
  and TensorStore's threads, whose writes still in flight after a failed save (a full disk) would print
  their own tracebacks below the line."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  atexit._run_exitfuncs()  # the exit handlers still run (a caller's, absl's); the teardown does not
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)

