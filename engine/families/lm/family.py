"""Byte-level language modelling on the engine's seam (``universality.engine.families.Family``), as in *Universal Neurons
in GPT2* (Gurnee et al. 2024), with the seeds trained here rather than downloaded.

Config sections::

  task.corpus            "stdlib" (the running interpreter's standard library sources) or a file/directory
  task.heldout_frac      share of the corpus's files held out (universality.engine.families.lm.corpus)
  task.max_bytes         read at most this many bytes of the corpus (0: all of it)
  task.fingerprint       the corpus's fingerprint; "" is filled in at launch, then a different corpus is refused
  task.vary_data_order   False: every seed sees the same windows in the same order; True: each its own
  task.eval_windows      context windows of training and of held-out text evaluated at every evaluation
  model.name             "gpt"
  model.gpt.n_layers, .d_model, .n_heads, .d_mlp, .context
  analysis.*             the analysis settings (``ANALYSIS_SETTINGS``), among them ``convergent`` and
                         ``convergent_*``: the Convergent Learning passes on every MLP layer (off by default)

The sweep is ``lr × weight_decay × seeds`` (seeds innermost); ``batch_size`` is the number of context windows
per step, drawn uniformly from the training text with ``fold_in(data_key, step)`` inside the compiled step.
Logged metrics: ``train_bpb`` and ``test_bpb`` (bits per byte on the fixed evaluation windows), ``test_acc``
(next-byte accuracy on held-out text) and ``unigram_bpb`` (the held-out text coded with the training text's
byte frequencies: the bar a model must clear). A run has *learned* (``generalised``) when its held-out bits
per byte are below the unigram's.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from universality.engine import fields
from universality.engine import families
from universality.engine.families.lm import corpus as corpus_lib
from universality.engine.families.lm import models

MODELS = ("gpt",)
# The analysis settings and their defaults (config section ``analysis``; universality.engine.families.lm.analysis).
ANALYSIS_SETTINGS = {
    "tokens": 1 << 17,            # held-out bytes every run reads (rounded down to whole windows)
    "batch_windows": 32,          # context windows per forward pass
    "universal_threshold": 0.5,   # excess correlation above which a neuron is universal (Gurnee et al.)
    "kurtosis_threshold": 10.0,   # W_U kurtosis above which a neuron predicts or suppresses (Gurnee et al.)
    "top_neurons": 8,             # universal neurons of the first run shown with their top windows
    "top_examples": 3,            # windows per shown neuron
    "memory_gb": 1.0,             # budget of the correlation's co-moment tiles
    "screen": "auto",             # screened correlation (kernels/screen.py): auto | on | off
    "screen_tokens": 1 << 15,     # T₁: the screen's sample of held-out bytes
    "screen_z": 5.0,              # its margin, in standard errors of a sample correlation
    "screen_k": 1,                # candidates kept per neuron and model at least
    # Convergent Learning (one-to-one, sparse prediction, spectral clusters) on every MLP layer; off.
    **fields.CONVERGENT,
}
_LN2 = math.log(2.0)


def cohort_name(row: Mapping[str, Any]) -> str:
  return f"lm/lr{row['lr']:g}/wd{row['weight_decay']:g}"


def run_name(row: Mapping[str, Any]) -> str:
  return f"lm/seed{row['seed']}/lr{row['lr']:g}/wd{row['weight_decay']:g}"


@functools.lru_cache(maxsize=4)
def load_corpus(name: str, heldout_frac: float, max_bytes: int, context: int) -> corpus_lib.Corpus:
  return corpus_lib.load(name, heldout_frac, max_bytes, min_bytes=context + 1)


def corpus_of(cfg) -> corpus_lib.Corpus:
  """The study's corpus, checked against the fingerprint in its config (when one is set)."""
  t = cfg.task
  c = load_corpus(t.corpus, float(t.heldout_frac), int(t.max_bytes), int(cfg.model.gpt.context))
  # A run directory written before the fingerprint covered contents holds the legacy one: still accepted.
  if t.fingerprint and t.fingerprint not in (c.fingerprint, c.legacy_fingerprint):
    raise corpus_lib.CorpusError(
        f"corpus {t.corpus!r} has fingerprint {c.fingerprint}, the study was made on {t.fingerprint} "
        "(other files or sizes, e.g. another Python version's standard library)")
  return c


def eval_windows(text: np.ndarray, n: int, context: int) -> np.ndarray:
  """uint8 ``[n, context + 1]``: windows at evenly spaced starts over ``text`` (the same for every run)."""
  starts = np.linspace(0, len(text) - context - 1, n).round().astype(np.int64)
  return np.stack([text[s:s + context + 1] for s in starts])


class LMFamily(families.Family):
  """Byte-level language modelling; see the module docstring."""
  name = "lm"
  progress_metric = "test_bpb"
  metrics = ("train_bpb", "test_bpb", "test_acc", "unigram_bpb")
  analysis_module = "universality.engine.families.lm.analysis"
  report_module = "universality.engine.families.lm.report"
  view_module = "universality.engine.families.lm.view"

  def add_config(self, cfg) -> None:
    cfg.task = ml_collections.ConfigDict()
    cfg.task.corpus = corpus_lib.STDLIB
    cfg.task.heldout_frac = 0.05
    cfg.task.max_bytes = 0
    cfg.task.fingerprint = ""
    cfg.task.vary_data_order = False
    cfg.task.eval_windows = 32
    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = "gpt"
    cfg.model.gpt = ml_collections.ConfigDict()
    cfg.model.gpt.n_layers = 2
    cfg.model.gpt.d_model = 128
    cfg.model.gpt.n_heads = 4
    cfg.model.gpt.d_mlp = 512       # N: GELU neurons of each MLP block
    cfg.model.gpt.context = 128     # bytes of context
    cfg.batch_size = 16
    cfg.opt.lr = "3e-3"
    cfg.opt.weight_decay = "0.1"
    cfg.opt.b2 = 0.95
    cfg.opt.clip_norm = 1.0
    cfg.opt.schedule = "cosine"
    cfg.analysis.update(ANALYSIS_SETTINGS)

  def validate(self, cfg) -> None:
    t, m = cfg.task, cfg.model
    if not isinstance(t.corpus, str) or not t.corpus:
      raise ValueError(f"config.task.corpus: expected 'stdlib' or a path, got {t.corpus!r}")
    if t.corpus != corpus_lib.STDLIB and not os.path.exists(os.path.expanduser(t.corpus)):
      raise ValueError(f"config.task.corpus: {t.corpus!r} does not exist")
    if not 0 < float(t.heldout_frac) < 1:
      raise ValueError(f"config.task.heldout_frac: must lie in (0, 1), got {t.heldout_frac}")
    fields.int_field(t, "max_bytes", 0, "task.")
    fields.int_field(t, "eval_windows", 1, "task.")
    if not isinstance(t.vary_data_order, bool):
      raise ValueError(f"config.task.vary_data_order: expected True or False, got {t.vary_data_order!r}")
    if m.name not in MODELS:
      raise ValueError(f"config.model.name: must be one of {MODELS}, got {m.name!r}")
    for name in ("n_layers", "d_model", "n_heads", "d_mlp"):
      fields.int_field(m.gpt, name, 1, "model.gpt.")
    fields.int_field(m.gpt, "context", 2, "model.gpt.")
    if m.gpt.d_model % m.gpt.n_heads:
      raise ValueError(f"config.model.gpt.n_heads: {m.gpt.n_heads} does not divide d_model={m.gpt.d_model}")
    fields.convergent_values(cfg.analysis)
    if cfg.batch_size < 1:
      raise ValueError("config.batch_size: the language model trains on minibatches of context windows; "
                       f"must be >= 1, got {cfg.batch_size}")

  def resolve(self, cfg):
    """``cfg`` with ``task.fingerprint`` filled in from the corpus (a one-line error if it is unusable)."""
    corpus = corpus_of(cfg)
    fingerprint = corpus.fingerprint
    if cfg.task.fingerprint in (fingerprint, corpus.legacy_fingerprint):  # set, and checked by corpus_of
      return cfg
    out = cfg.copy_and_resolve_references()
    out.task.fingerprint = fingerprint
    return out

  def runs(self, cfg) -> list[dict]:
    return families.optimiser_sweep(cfg, cohort_name, run_name)

  def n_runs(self, cfg) -> int:
    return families.optimiser_sweep_size(cfg)

  def footprint(self, cfg) -> families.Footprint:
    """The model's abstract init, the corpus (shared by every run) and the activations of one step.

    The corpus is sized from its files (``corpus.size_on_disk``), not read, so a corpus too large for memory
    is refused before it is loaded. Each device holds one copy of it (the text the compiled step reads; on
    the CPU, JAX reads an aligned host array in place, so there this is an upper bound); the host holds a
    directory's text once (``corpus.load`` reads it into its training and held-out arrays) and a one-file
    corpus not at all: it is memory-mapped, and the kernel pages it in from the file and may drop it again
    (``corpus.held_in_memory``). Both count the evaluation windows. A 256 MiB corpus file raised the peak
    RSS of a CPU launch by 1.2x its size (pages of the map), 7.1x before it was mapped
    (benchmarks/README.md, "LM corpus memory")."""
    gpt = models.spec_of(cfg.model.gpt)
    params = jax.eval_shape(lambda k: models.init(k, gpt), jax.ShapeDtypeStruct((2,), jnp.uint32))
    n_bytes = corpus_lib.size_on_disk(cfg.task.corpus, int(cfg.task.max_bytes))
    mapped = corpus_lib.is_mapped(cfg.task.corpus)
    windows = 2 * int(cfg.task.eval_windows) * (int(gpt.context) + 1)
    tokens = max(int(cfg.batch_size), 2 * int(cfg.task.eval_windows)) * int(gpt.context)
    return families.Footprint(
        params=params, data=8,
        step=4 * tokens * models.activation_floats_per_token(gpt),
        shared=n_bytes + windows, host_shared=(0 if mapped else n_bytes) + windows)

  def param_roles(self, params):
    return models.param_roles(params)

  def cohort_name(self, row) -> str:
    return cohort_name(row)

  def run_key(self, row):
    return families.key_of(int(row["base_seed"]), int(row["seed"]), 0x1B7E)

  def data_key(self, cfg, row) -> np.ndarray:
    """The key of a run's stream of training windows: shared by every seed unless task.vary_data_order."""
    return families.data_key_of(cfg, row)

  def make_task(self, cfg, rows) -> families.Task:
    corpus = corpus_of(cfg)
    gpt = models.spec_of(cfg.model.gpt)  # typed and frozen from here on
    context, batch = gpt.context, int(cfg.batch_size)
    _, unigram = corpus_lib.unigram_bits(corpus.train, corpus.test)
    shared = {"train": corpus.train,
              "eval_train": eval_windows(corpus.train, cfg.task.eval_windows, context),
              "eval_test": eval_windows(corpus.test, cfg.task.eval_windows, context),
              "unigram_bpb": np.float32(unigram)}
    data = {"data_key": np.stack([self.data_key(cfg, r) for r in rows])}
    n_starts = len(corpus.train) - context

    def init(key, d, shared):
      return models.init(jax.random.fold_in(key, 0), gpt)

    def loss_and_grads(params, key, step, d, shared):
      starts_B = jax.random.randint(jax.random.fold_in(d["data_key"], step), (batch,), 0, n_starts)
      windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(shared["train"], s, context + 1))(starts_B)
      return jax.value_and_grad(models.next_byte_xent)(params, windows, gpt)

    def evaluate(params, d, shared):
      train_loss, _ = models.next_byte_loss(params, shared["eval_train"], gpt)
      test_loss, test_acc = models.next_byte_loss(params, shared["eval_test"], gpt)
      return dict(train_bpb=train_loss / _LN2, test_bpb=test_loss / _LN2, test_acc=test_acc,
                  unigram_bpb=shared["unigram_bpb"])

    def apply(params, inputs, d, shared):
      (tokens_BxT,) = inputs
      return models.apply(params, tokens_BxT, gpt)

    return families.Task(data=data, init=init, loss_and_grads=loss_and_grads, evaluate=evaluate,
                         apply=apply, metrics=self.metrics, shared=shared)

  def check_inputs(self, data, inputs, n_runs: int):
    """``(tokens_SxBxT,)``: byte values, T at most the context."""
    if len(inputs) != 1:
      raise ValueError(f"apply: expected inputs (tokens,), got {len(inputs)} arrays")
    tokens = np.asarray(inputs[0])
    if tokens.ndim != 3 or tokens.shape[0] != n_runs or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"apply: tokens must be integers [{n_runs}, B, T], got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= corpus_lib.VOCAB):
      raise ValueError("apply: tokens must be byte values 0 .. 255")
    return (tokens.astype(np.int32),)

  def generalised_mask(self, metrics) -> np.ndarray:
    test = np.nan_to_num(np.asarray(metrics["test_bpb"], np.float64), nan=np.inf)
    return test < np.asarray(metrics["unigram_bpb"], np.float64)

  def describe(self, cfg) -> list[str]:
    t, g = cfg.task, cfg.model.gpt
    c = corpus_of(cfg)
    entropy, cross = corpus_lib.unigram_bits(c.train, c.test)
    source = ("the Python standard library's sources" if t.corpus == corpus_lib.STDLIB else f"`{t.corpus}`")
    order = "its own" if t.vary_data_order else "the same"
    return [f"- Task: next-byte prediction on {source} ({len(c.files)} files, {c.n_bytes:,} bytes; "
            f"{len(c.train):,} training and {len(c.test):,} held-out bytes, split by file; fingerprint "
            f"{c.fingerprint}); unigram entropy {entropy:.3f} bits/byte, {cross:.3f} on held-out text",
            f"- Model: byte transformer, {g.n_layers} layers, d_model {g.d_model}, {g.n_heads} heads, "
            f"d_mlp {g.d_mlp} GELU neurons per layer, context {g.context}",
            f"- Data order: every seed sees {order} sequence of training windows"]


FAMILY = LMFamily()
