r"""Import a multi-seed suite of language models trained elsewhere, then find the neurons they share.

  python -m universality.experiments.import_models --workdir=runs/gpt2-small \
      --models=models/alias-gpt2-small-x21,models/battlestar-gpt2-small-x49,models/caprica-gpt2-small-x81 \
      --corpus=data/pile_test.bin --tokens=1000000

Each directory of ``--models`` (a local Hugging Face model: config.json and safetensors weights; GPT-2 or
GPT-NeoX) becomes one run, in that order, stacked into one Orbax checkpoint
(``universality.engine.families.imported.suite``). With ``--corpus`` (token ids in a .bin or .npy, or text
with a tokenizer.json) the universal-neurons pass runs on it and the report is written
(``universality.engine.families.imported.analysis``); ``universality.engine.replay.open(workdir)`` opens the
result. Running the command again on the same directory and models re-analyses without importing again.
Before anything is written the pass's memory is counted (``analysis.pass_bytes``: 67 GB for five GPT-2-small
models at the defaults) and a pass larger than the device (host RAM on the CPU) is refused. Bad flags,
directories, corpora: one line ``error: ...`` and exit status 2, nothing written.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to create (or re-analyse).")
_MODELS = flags.DEFINE_list("models", None, "Comma-separated model directories, one run each.")
_LABELS = flags.DEFINE_list("labels", None, "Seed labels, one per model (default: from the directory names).")
_ANALYZE = flags.DEFINE_bool("analyze", None,
                             "Run the pass and the report (default: when --corpus is given).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_CORPUS = flags.DEFINE_string("corpus", None,
                              "Token ids (.bin uint16/uint32, .npy) or text (a file or directory).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the first model directory's).")
_DTYPE = flags.DEFINE_string("dtype", None, "dtype of a .bin: uint16, uint32 or auto.")
_TOKENS = flags.DEFINE_integer("tokens", None, "Tokens every model reads.")
_CONTEXT = flags.DEFINE_integer("context", None, "Tokens per window (0: the models' context, at most 512).")
_BATCH = flags.DEFINE_integer("batch_windows", None, "Windows per forward pass.")
_DROP = flags.DEFINE_string("drop", None, "Tokens left out of the statistics: bos,pad,newline or ''.")
_MEMORY = flags.DEFINE_float("memory_gb", None, "Budget of the correlation's co-moment tiles.")
_SCREEN = flags.DEFINE_string("screen", None, "Screened correlation: auto, on or off.")
_FORWARD_DTYPE = flags.DEFINE_string("forward_dtype", None, "The forward's dtype: float32, bfloat16, float16.")


def _settings() -> dict:
  names = {"corpus": _CORPUS, "tokenizer": _TOKENIZER, "dtype": _DTYPE, "tokens": _TOKENS,
           "context": _CONTEXT, "batch_windows": _BATCH, "drop": _DROP, "memory_gb": _MEMORY,
           "screen": _SCREEN, "forward_dtype": _FORWARD_DTYPE}
  return {k: f.value for k, f in names.items() if f.value is not None}


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  if not _MODELS.value:
    _fail("--models is required (comma-separated model directories)")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger("absl").addFilter(lambda record: "orbax" not in record.pathname)
  # Imported here, after the flags: JAX and Orbax load only for a command that will run.
  from universality.engine import budget, checkpoint, replay, report, rundir  # noqa: PLC0415
  from universality.engine.analysis import driver  # noqa: PLC0415
  from universality.engine.families.imported import analysis, family, models, suite  # noqa: PLC0415
  settings = _settings()
  analyze = _ANALYZE.value if _ANALYZE.value is not None else "corpus" in settings
  try:
    cfg = suite.config_for(suite.open_suite(_MODELS.value), _LABELS.value)
    if analyze:  # the corpus and the pass's memory are checked before anything is written
      full = dict(family.ANALYSIS_SETTINGS, **settings)
      analysis.check_settings(cfg, full)
      analysis.corpus_windows(cfg, full)
      need = sum(analysis.pass_bytes(models.spec_of(cfg.model.imported), cfg.seeds, full).values())
      import jax  # pylint: disable=import-outside-toplevel
      have = budget.device_memory_limit(jax.local_devices()) or budget.host_ram_available()
      print(f"the pass holds about {need / 1e9:.1f} GB ({have / 1e9:.1f} GB available)", flush=True)
      if need > have:
        _fail(f"the pass needs about {need / 1e9:.1f} GB, more than the {have / 1e9:.1f} GB available: fewer "
              "models, a smaller --batch_windows or --memory_gb, or a larger device")
    suite.import_models(_WORKDIR.value, _MODELS.value, _LABELS.value, progress=_PROGRESS.value)
    print(f"imported {cfg.seeds} models into {rundir.resolve(_WORKDIR.value)}", flush=True)
    if analyze:
      with replay.open(_WORKDIR.value) as run:
        driver.analyze(run, progress=_PROGRESS.value, **settings)
        print(f"report: {report.write_report_of(run)}", flush=True)
  except (ValueError, checkpoint.CheckpointError, rundir.RunDirError) as e:
    _fail(str(e))
  except OSError as e:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    _fail(f"{where}{e.strerror or e}")


if __name__ == "__main__":
  app.run(main)
