"""The universal-neurons pass (Gurnee et al. 2024) on an imported suite, and the neuron families beside it.

Every run reads the same ``tokens`` ids of the corpus (``analysis.corpus``: ``.bin``, ``.npy`` or text with
a tokenizer; ``universality.engine.families.imported.tokens``), cut into windows of ``context`` tokens. The
forward pass runs ``batch_windows`` windows at a time; activations are never stored whole:

* tokens named by ``drop`` (BOS / EOS / pad from the models' config, tokens holding a newline) are left out
  of every statistic, as the paper did: each batch's kept rows are packed into fixed-size blocks on the
  device (one compiled shape), which stream into ``universality.kernels.correlation``;
* for each neuron, the maximum Pearson correlation with every neuron of every layer of each other run, and
  the same maximum against that run's neurons rotated **layer by layer** (a Haar-random orthogonal matrix
  per layer, as Gurnee et al. rotated); excess = max − baseline max. Two comparisons: the paper's (run 0
  against each other run: ``excess_paper``, the mean over runs 1..S−1, for run 0's neurons) and ours (every
  run against every other: ``excess``, the mean over the other runs); universal = mean excess above
  ``universal_threshold`` (0.5);
* in the same pass (``universality.engine.analysis.neuron_stats``): the moments of each neuron's
  *pre*-activation (skew, kurtosis, share >= 0) and the share of its post-activation variance explained by
  the current token (unigram), the previous token and the position, the tokens being the
  ``unigram_classes`` most frequent ones of the text read plus one class for all others;
* from the weights: input bias, ‖w_in‖, ‖w_out‖, cos(w_in, w_out); the moments over the vocabulary of
  cos(w_out, W_U[:, v]) (W_U with the final LayerNorm's gain folded in, centred): kurtosis above
  ``kurtosis_threshold`` with positive skew marks a prediction neuron, negative a suppression one; and the
  share of ‖w_out‖² in W_U's null space (its ``entropy_null_dims`` last right-singular directions): an
  *entropy neuron* has most of its output there (above ``entropy_null_share``) and a large ‖w_out‖ (above
  the ``entropy_norm_pct`` percentile of its layer);
* families: a *unigram*, *alphabet* (the token's first letter, from the tokenizer), *previous-token* or
  *position* neuron has more than ``family_threshold`` of its variance explained by that feature; an
  *attention-deactivating* neuron is one of the ``attn_candidates`` per layer with the largest ‖w_out‖
  whose ablation (post-activation 0) on the first ``attn_windows`` windows lowers some later head's mean
  attention to the window's first token by more than ``attn_threshold`` (``attention_deactivation``).

The forward may run in bfloat16 or float16 (``forward_dtype``, for accelerators); the activations are cast
to float32 and every statistic is accumulated in float32 as with a float32 forward. The correlation may be
screened (``screen``: ``universality.kernels.screen``, on a sample of ``screen_tokens`` tokens, the windows
taken in a seeded random order so that the sample spans the text): the same maxima at a fraction of the
products when T is large.

Per-neuron arrays ``[S, L, N]`` (and the ``[S, L·N, S]`` match tables) go to the cohort's arrays file;
summary.json holds per-layer fractions for both comparisons and the property contrasts.

Local shape letters:

  J  windows of the token corpus
  A  attention heads of a layer
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from universality.engine.analysis import cross_seed
from universality.engine.analysis import neuron_stats
from universality.engine.families.imported import family as family_lib
from universality.engine.families.imported import models
from universality.engine.families.imported import tokens as tokens_lib
from universality.engine.families.lm.analysis import percentile_within_layer  # noqa: F401 - the view's too
from universality.kernels import screen as screen_lib

LAST_STEP_ONLY = True
SETTINGS = family_lib.ANALYSIS_SETTINGS
PROPERTIES = ("pre_mean", "pre_var", "pre_skew", "pre_kurtosis", "act_freq", "input_bias", "w_in_norm",
              "w_out_norm", "cos_in_out", "vocab_kurtosis", "vocab_skew", "null_share", "var_token",
              "var_prev_token", "var_position")
MAX_CONTEXT = 512  # Gurnee et al.'s windows
# Neuron families by the share of a neuron's variance a token feature explains (above family_threshold).
FAMILIES = {"unigram": "var_token", "alphabet": "var_alphabet", "previous token": "var_prev_token",
            "position": "var_position"}


def context_of(spec: models.Spec, settings: dict) -> int:
  c = int(settings["context"]) or min(spec.context, MAX_CONTEXT)
  if not 2 <= c <= spec.context:
    raise ValueError(f"analysis.context: must lie in [2, {spec.context}] (the models' context), got {c}")
  return c


def tokenizer_of(cfg, settings: dict) -> str:
  """The tokenizer.json the pass uses: the setting, else the first model directory's when it has one."""
  if settings["tokenizer"]:
    return os.path.abspath(os.path.expanduser(str(settings["tokenizer"])))
  suite = family_lib.suite_of(cfg)
  first = os.path.join(suite[0]["path"], "tokenizer.json") if suite else ""
  return first if first and os.path.isfile(first) else ""


def corpus_windows(cfg, settings: dict) -> tuple[np.ndarray, tokens_lib.Tokens]:
  """``(ids [J, T], corpus)``: consecutive windows of the corpus's first ``tokens`` ids (a memory-map
  view)."""
  spec = models.spec_of(cfg.model.imported)
  c = context_of(spec, settings)
  corpus = tokens_lib.open_tokens(str(settings["corpus"]), spec.vocab, tokenizer_of(cfg, settings),
                                  str(settings["dtype"]), int(settings["tokens"]))
  n = min(int(settings["tokens"]), len(corpus.ids)) // c
  if n < 1:
    raise tokens_lib.TokensError(f"corpus {settings['corpus']!r} ({len(corpus.ids)} tokens) holds no "
                                 f"window of {c} tokens")
  return corpus.ids[:n * c].reshape(n, c), corpus


def check_settings(cfg, settings: dict) -> None:
  """Refuses, in one line, settings the pass cannot run with (before an import writes anything)."""
  if settings["forward_dtype"] not in FORWARD_DTYPES:
    raise ValueError(f"analysis.forward_dtype: must be one of {', '.join(FORWARD_DTYPES)}, got "
                     f"{settings['forward_dtype']!r}")
  bad = [k for k in str(settings["drop"]).split(",") if k.strip() and k.strip() not in tokens_lib.DROP_KINDS]
  if bad:
    raise ValueError(f"analysis.drop: {bad[0]!r} is not one of {', '.join(tokens_lib.DROP_KINDS)}")
  for name in ("tokens", "batch_windows", "unigram_classes"):
    if int(settings[name]) < 1:
      raise ValueError(f"analysis.{name}: must be >= 1, got {settings[name]}")
  context_of(models.spec_of(cfg.model.imported), settings)
  screen_lib.settings(settings["screen"], settings["screen_tokens"], settings["screen_z"], settings["screen_k"])


def token_classes(windows_JxT: np.ndarray, vocab: int, k: int) -> np.ndarray:
  """int32 ``[V]``: the class of every id, its rank among the ``k`` most frequent ids of the windows (ties:
  smaller id first), ``k`` for every other id."""
  counts = np.zeros(vocab, np.int64)
  for a in range(0, len(windows_JxT), 4096):
    counts += np.bincount(np.asarray(windows_JxT[a:a + 4096]).reshape(-1).astype(np.int64), minlength=vocab)
  top = np.argsort(-counts, kind="stable")[:k]
  top = top[counts[top] > 0]
  out = np.full(vocab, len(top), np.int32)
  out[top] = np.arange(len(top), dtype=np.int32)
  return out


FORWARD_DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=8)
def _forward(spec: models.Spec, dtype: str = "float32"):
  """Jitted ``(params_S, ids_BxT) -> (pre, post)``, each ``[S, B·T, L·N]`` float32; the model runs in
  ``dtype`` (its weights cast to it), the activations it returns are float32 again."""
  def one(params, ids_BxT):
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    _, acts = models.apply(params, ids_BxT, spec)
    b, t, l, n = acts["mlp_pre"].shape
    flat = lambda x: x.reshape(b * t, l * n).astype(jnp.float32)
    return flat(acts["mlp_pre"]), flat(acts["mlp_post"])
  return jax.jit(jax.vmap(one, in_axes=(0, None)))


@jax.jit
def _update_stats(stats, pre_SxBxN, post_SxBxN, cls_B, prev_B, pos_B, keep_B, letter_B):
  s, b, m = pre_SxBxN.shape
  pre_BxM = jnp.moveaxis(pre_SxBxN, 1, 0).reshape(b, s * m)
  post_BxM = jnp.moveaxis(post_SxBxN, 1, 0).reshape(b, s * m)
  out = (neuron_stats.moments_update(stats[0], pre_BxM, keep_B),
         neuron_stats.categories_update(stats[1], post_BxM, cls_B, keep_B),
         neuron_stats.categories_update(stats[2], post_BxM, prev_B, keep_B),
         neuron_stats.categories_update(stats[3], post_BxM, pos_B, keep_B))
  if len(stats) == 5:  # the tokens' first letters, when a tokenizer gives them
    out += (neuron_stats.categories_update(stats[4], post_BxM, letter_B, keep_B),)
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _pack(buf, fill, post_SxBxN, keep_B):
  """The batch's kept rows written at row ``fill`` of the buffer (rows after them are overwritten later)."""
  order = jnp.argsort(~keep_B, stable=True)
  return jax.lax.dynamic_update_slice(buf, post_SxBxN[:, order], (0, fill, 0))


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _shift(buf, r: int):
  return jnp.roll(buf, -r, axis=1)


class _Stream:
  """A re-iterable source of kept post-activation rows in blocks of ``B·T`` rows
  (``universality.kernels.correlation``). The first iteration that runs to its end also fills ``stats``;
  later ones only yield."""

  def __init__(self, params_S, windows_JxT, spec, batch_windows: int, classes_V, drop_ids, letters_V=None,
               dtype: str = "float32"):
    self.params, self.windows, self.bw, self.spec = params_S, windows_JxT, batch_windows, spec
    self.dtype = dtype
    self.classes, self.drop, self.letters = classes_V, np.asarray(drop_ids, np.int64), letters_V
    s = jax.tree.leaves(params_S)[0].shape[0]
    c = windows_JxT.shape[1]
    self.k, self.rows = s * spec.n_layers * spec.d_mlp, batch_windows * c
    n_cls = int(classes_V.max()) + 1
    self.empty = (neuron_stats.moments_init(self.k), neuron_stats.categories_init(n_cls, self.k),
                  neuron_stats.categories_init(n_cls, self.k), neuron_stats.categories_init(c, self.k))
    if letters_V is not None:
      self.empty += (neuron_stats.categories_init(27, self.k),)
    self.stats, self.kept, self.passes = None, 0, 0

  def _batches(self):
    c = self.windows.shape[1]
    for a in range(0, len(self.windows), self.bw):
      w = np.asarray(self.windows[a:a + self.bw]).astype(np.int32)
      b = len(w)
      if b < self.bw:  # the last batch: padded with copies, their rows not kept (one compiled shape)
        w = np.concatenate([w, np.repeat(w[-1:], self.bw - b, axis=0)])
      keep = ~np.isin(w, self.drop)
      keep[b:] = False
      prev = np.concatenate([np.full((len(w), 1), -1, np.int64), w[:, :-1]], axis=1)
      cls = self.classes[w].reshape(-1)
      prev_cls = np.where(prev >= 0, self.classes[np.maximum(prev, 0)], -1).reshape(-1)
      pos = np.tile(np.arange(c, dtype=np.int32), len(w))
      letter = (self.letters[w] if self.letters is not None else np.zeros_like(w)).reshape(-1)
      yield w, keep.reshape(-1), cls, prev_cls.astype(np.int32), pos, letter.astype(np.int32)

  def __call__(self):
    collect = self.stats is None
    stats, kept = self.empty, 0
    forward = _forward(self.spec, self.dtype)
    buf, fill = None, 0
    self.passes += 1
    bar = tqdm.tqdm(total=-(-len(self.windows) // self.bw), unit="batch", leave=False, disable=None,
                    desc=f"pass {self.passes}: {self.windows.size:,} tokens")  # shown on a terminal only
    for w, keep, cls, prev_cls, pos, letter in self._batches():
      bar.update()
      pre, post = forward(self.params, jnp.asarray(w))
      keep_dev = jnp.asarray(keep)
      if collect:
        stats = _update_stats(stats, pre, post, jnp.asarray(cls), jnp.asarray(prev_cls), jnp.asarray(pos),
                              keep_dev, jnp.asarray(letter))
      if buf is None:
        buf = jnp.zeros((post.shape[0], 2 * self.rows, post.shape[2]), jnp.float32)
      buf = _pack(buf, jnp.int32(fill), post, keep_dev)
      fill += int(keep.sum())
      kept += int(keep.sum())
      if fill >= self.rows:
        yield buf[:, :self.rows]
        buf, fill = _shift(buf, self.rows), fill - self.rows
    bar.close()
    if fill:
      yield buf[:, :fill]
    if collect:
      self.stats, self.kept = stats, kept


def null_share(w_out_SxNxD, w_u_SxDxV, null_dims: int) -> np.ndarray:
  """``[S, M]``: share of ‖w_out‖² in the span of W_U's ``null_dims`` last right-singular directions (in
  the residual space; W_U centred over the vocabulary first)."""
  out = []
  for w_out, w_u in zip(np.asarray(w_out_SxNxD, np.float64), np.asarray(w_u_SxDxV, np.float64)):
    w_u = w_u - w_u.mean(axis=1, keepdims=True)
    u, _, _ = np.linalg.svd(w_u, full_matrices=True)  # u [D, D]: residual directions by singular value
    null_dirs = u[:, w_u.shape[0] - null_dims:]
    proj = np.square(w_out @ null_dirs).sum(axis=1)
    out.append(proj / np.maximum(np.square(w_out).sum(axis=1), 1e-30))
  return np.stack(out)


def weight_properties(params_S, spec: models.Spec, settings: dict) -> dict[str, np.ndarray]:
  """Per-neuron weight statistics, each ``[S, L, N]`` (module docstring)."""
  blocks = params_S["blocks"]
  w_in = np.asarray(blocks["w_in"], np.float64)
  w_out = np.asarray(blocks["w_out"], np.float64)
  in_norm, out_norm = np.linalg.norm(w_in, axis=2), np.linalg.norm(w_out, axis=3)
  dot = np.einsum("sldn,slnd->sln", w_in, w_out)
  s, l, n, d = w_out.shape
  w_u_SxDxV = np.stack([np.asarray(params_S["lnf_g"][i])[:, None]
                        * np.asarray(models.unembedding(jax.tree.map(lambda x: x[i], params_S), spec))
                        for i in range(s)])
  skew, kurt = np.zeros((s, l * n)), np.zeros((s, l * n))
  flat = w_out.reshape(s, l * n, d).astype(np.float32)
  chunk = max(1, (1 << 26) // max(spec.vocab, 1))  # cosines of at most 64 M entries at a time
  for i in range(s):
    for a in range(0, l * n, chunk):
      v = neuron_stats.vocab_composition(flat[i:i + 1, a:a + chunk], w_u_SxDxV[i:i + 1])
      skew[i, a:a + chunk], kurt[i, a:a + chunk] = np.asarray(v["skew"])[0], np.asarray(v["kurtosis"])[0]
  k = int(settings["entropy_null_dims"]) or max(1, d // 64)
  return {"input_bias": np.asarray(blocks["b_in"], np.float64), "w_in_norm": in_norm, "w_out_norm": out_norm,
          "cos_in_out": dot / np.maximum(in_norm * out_norm, 1e-30), "vocab_skew": skew.reshape(s, l, n),
          "vocab_kurtosis": kurt.reshape(s, l, n),
          "null_share": null_share(flat, w_u_SxDxV, min(k, d)).reshape(s, l, n)}


@functools.lru_cache(maxsize=8)
def _ablated_bos(spec: models.Spec):
  """Jitted ``(params, ids, flat) -> [len(flat), L, A]``: attention to position 0, each neuron of ``flat``
  ablated in turn."""
  def one(params, ids, flat):
    scale = jnp.ones((spec.n_layers * spec.d_mlp,), jnp.float32).at[flat].set(0.0)
    return models.bos_attention(params, ids, spec, scale.reshape(spec.n_layers, spec.d_mlp))
  return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))


def attention_deactivation(params_S, ids_BxT, spec: models.Spec, candidates: int) -> np.ndarray:
  """``[S, L, N]``: for the ``candidates`` neurons of each layer with the largest ‖w_out‖, the largest drop,
  over the heads of later layers, of the mean attention to position 0 when the neuron is ablated (its
  post-activation set to 0) on the sample ``ids_BxT``; NaN for neurons not ablated (and the last layer's)."""
  s = jax.tree.leaves(params_S)[0].shape[0]
  l, n = spec.n_layers, spec.d_mlp
  out = np.full((s, l, n), np.nan)
  k = min(int(candidates), n)
  if k < 1 or l < 2:
    return out
  ids = jnp.asarray(ids_BxT, jnp.int32)
  base_fn = jax.jit(lambda p, x: models.bos_attention(p, x, spec))
  for i in range(s):
    params = jax.tree.map(lambda x: x[i], params_S)
    norms = np.linalg.norm(np.asarray(params["blocks"]["w_out"]), axis=2)  # [L, N]
    flat = np.concatenate([j * n + np.argsort(-norms[j], kind="stable")[:k] for j in range(l - 1)])
    base_LxA = np.asarray(base_fn(params, ids), np.float64)
    ablated = np.asarray(_ablated_bos(spec)(params, ids, jnp.asarray(flat)), np.float64)
    drops = base_LxA[None] - ablated
    for f, drop in zip(flat, drops):
      out[i, f // n, f % n] = drop[f // n + 1:].max()
  return out


def excess_against(max_SxNxS, base_SxNxS, dead_SxN, others) -> np.ndarray:
  """``[S, M]``: mean over the runs ``others[i]`` of (max − baseline max); NaN for dead neurons."""
  s = max_SxNxS.shape[0]
  out = np.full(max_SxNxS.shape[:2], np.nan)
  for i in range(s):
    js = list(others[i])
    if js:
      out[i] = (max_SxNxS[i][:, js] - base_SxNxS[i][:, js]).mean(axis=1)
  return np.where(dead_SxN, np.nan, out)


def neuron_table(params_S, windows_JxT, spec: models.Spec, key, settings: dict, drop_ids,
                 batch_windows: int | None = None, letters_V=None) -> dict[str, np.ndarray]:
  """Every per-neuron statistic of S stacked runs on the same windows (module docstring): arrays
  ``[S, L, N]`` and, with S >= 2, the match tables ``[S, L·N, S]``."""
  l, n = spec.n_layers, spec.d_mlp
  s = jax.tree.leaves(params_S)[0].shape[0]
  classes = token_classes(windows_JxT, spec.vocab, int(settings["unigram_classes"]))
  screen = screen_lib.settings(settings["screen"], settings["screen_tokens"], settings["screen_z"],
                               settings["screen_k"], inputs=windows_JxT.size)
  if screen.may_screen():  # the screen's sample is the stream's start: spread it over the text
    windows_JxT = windows_JxT[np.random.default_rng(0).permutation(len(windows_JxT))]
  stream = _Stream(params_S, windows_JxT, spec, int(batch_windows or settings["batch_windows"]), classes,
                   drop_ids, letters_V, str(settings["forward_dtype"]))
  corr = None
  if s >= 2:
    corr = cross_seed.neuron_correlations(stream, key=key,
                                          universal_threshold=settings["universal_threshold"],
                                          memory_bytes=int(settings["memory_gb"] * (1 << 30)), within=False,
                                          rotation_blocks=l, screen=screen)
  else:
    for _ in stream():
      pass
  if stream.kept < 2:
    raise tokens_lib.TokensError("fewer than 2 tokens are left once analysis.drop is applied")
  shape = lambda x: np.asarray(x).reshape(s, l, n)
  moments = {k: shape(v) for k, v in neuron_stats.moments_finalize(stream.stats[0]).items()}
  props = {"pre_mean": moments["mean"], "pre_var": moments["var"], "pre_skew": moments["skew"],
           "pre_kurtosis": moments["kurtosis"], "act_freq": moments["freq_nonneg"],
           "var_token": shape(neuron_stats.variance_explained(stream.stats[1])),
           "var_prev_token": shape(neuron_stats.variance_explained(stream.stats[2])),
           "var_position": shape(neuron_stats.variance_explained(stream.stats[3]))}
  if letters_V is not None:  # not a PROPERTY: absent without a tokenizer
    props["var_alphabet"] = shape(neuron_stats.variance_explained(stream.stats[4]))
  props.update(weight_properties(params_S, spec, settings))
  out = {k: np.asarray(v, np.float32) for k, v in props.items()}
  out["vocab_class"] = shape(neuron_stats.prediction_class(props["vocab_skew"], props["vocab_kurtosis"],
                                                           settings["kurtosis_threshold"])).astype(np.int8)
  norm_bar = np.percentile(props["w_out_norm"], float(settings["entropy_norm_pct"]), axis=(0, 2),
                           keepdims=True)
  out["entropy"] = ((props["null_share"] > float(settings["entropy_null_share"]))
                    & (props["w_out_norm"] > norm_bar))
  sample = windows_JxT[:max(1, int(settings["attn_windows"]))]
  out["attn_deactivation"] = attention_deactivation(params_S, np.asarray(sample), spec,
                                                    int(settings["attn_candidates"])).astype(np.float32)
  if corr is None:
    out.update(universal=np.zeros((s, l, n), bool), dead=moments["kurtosis"] == 0)
    return out
  max_SxNxS = np.asarray(corr["max_SxNxS"], np.float64)
  base_SxNxS = np.asarray(corr["baseline_max_SxNxS"], np.float64)
  dead = np.asarray(corr["dead_SxN"], bool)
  thr = float(settings["universal_threshold"])
  paper = excess_against(max_SxNxS, base_SxNxS, dead, [range(1, s)] + [[0]] * (s - 1))
  out.update(excess=shape(corr["excess_SxN"]).astype(np.float32), universal=shape(corr["universal_SxN"]),
             excess_paper=shape(paper).astype(np.float32),
             universal_paper=shape(np.nan_to_num(paper, nan=-np.inf) > thr) & ~shape(dead),
             dead=shape(dead), max_corr=max_SxNxS.astype(np.float32),
             baseline_max_corr=base_SxNxS.astype(np.float32),
             argmax=np.asarray(corr["argmax_SxNxS"], np.int32))
  if corr.get("screen_margin") is not None:
    out["screen_settled"] = shape(corr["settled_SxN"]).astype(np.int8)
  return out


def pass_bytes(spec: models.Spec, n_runs: int, settings: dict) -> dict[str, int]:
  """What the pass holds at once, in bytes (float32), from the sizes alone: the per-layer rotations (dense,
  as the kernel takes them) and each model's own co-moment for the rotated variances, the co-moment tiles
  (``memory_gb``), one batch of pre- and post-activations and the buffer that packs kept tokens, the token
  statistics, the forward's largest intermediates (attention patterns, residual streams) and the weights."""
  s, m = int(n_runs), spec.n_layers * spec.d_mlp
  rows = int(settings["batch_windows"]) * context_of(spec, settings)
  classes = int(settings["unigram_classes"]) + 1
  weights = sum(int(np.prod(x)) for x in jax.tree.leaves(models.param_shapes(spec),
                                                          is_leaf=lambda x: isinstance(x, tuple)))
  return {"rotations": 4 * s * m * m, "own_comoments": 4 * s * m * m,
          "tiles": int(float(settings["memory_gb"]) * (1 << 30)), "activations": 4 * 4 * s * rows * m,
          "statistics": 4 * s * m * (2 * classes + context_of(spec, settings) + 27 + 6),
          "forward": 4 * s * rows * (spec.n_heads * context_of(spec, settings) + 8 * spec.d_model
                                     + spec.vocab),
          "weights": 4 * s * weights}


def _frac(mask, live) -> float:
  return float(np.sum(mask & live) / max(int(np.sum(live)), 1))


def analyze_cohort(view, params_by_step, key, settings: dict, batch_size: int | None = None) -> dict:
  """One cohort: ``{"task", "aggregate", "runs", "arrays"}`` (see the module docstring)."""
  cfg = view.config
  check_settings(cfg, settings)
  spec = models.spec_of(cfg.model.imported)
  step = max(params_by_step)
  params = jax.tree.map(jnp.asarray, params_by_step[step])
  windows, corpus = corpus_windows(cfg, settings)
  tokenizer = tokenizer_of(cfg, settings)
  drop, notes = tokens_lib.drop_ids(settings["drop"], family_lib.special_ids(cfg), tokenizer, spec.vocab)
  letters = tokens_lib.letter_classes(tokenizer, spec.vocab) if tokenizer else None
  if letters is None:
    notes.append("no alphabet neurons: no tokenizer.json to read the tokens' letters")
  arrays = neuron_table(params, windows, spec, key, settings, drop, batch_size, letters)
  s, l = len(view), spec.n_layers
  universal, dead, vocab_class = arrays["universal"], arrays["dead"], arrays["vocab_class"]
  live = ~dead
  fam = float(settings["family_threshold"])
  attn = np.nan_to_num(arrays["attn_deactivation"], nan=-np.inf) > float(settings["attn_threshold"])
  task = {"tokens": int(windows.size), "windows": int(windows.shape[0]), "context": int(windows.shape[1]),
          "corpus": corpus.path, "corpus_kind": corpus.kind, "corpus_fingerprint": corpus.fingerprint,
          "tokenizer": tokenizer, "dropped_ids": int(len(drop)), "notes": notes, "layers": l,
          "d_mlp": spec.d_mlp, "step": int(step)}
  agg: dict[str, Any] = {
      "universal_by_layer": [_frac(universal[:, j], live[:, j]) for j in range(l)],
      "universal_fraction": _frac(universal, live),
      "prediction_by_layer": [float((vocab_class[:, j] == 1).sum() / s) for j in range(l)],
      "suppression_by_layer": [float((vocab_class[:, j] == -1).sum() / s) for j in range(l)],
      "entropy_by_layer": [float(arrays["entropy"][:, j].sum() / s) for j in range(l)],
      "attention_deactivating_by_layer": [float(attn[:, j].sum() / s) for j in range(l)],
      "families_by_layer": {name: [float((live[:, j] & (arrays[key][:, j] > fam)).sum() / s)
                                   for j in range(l)]
                            for name, key in FAMILIES.items() if key in arrays},
      "dead_fraction": float(dead.mean())}
  if "excess" in arrays:
    up = arrays["universal_paper"]
    agg["paper_universal_by_layer"] = [_frac(up[0, j], live[0, j]) for j in range(l)]
    agg["paper_universal_fraction"] = _frac(up[0], live[0])
    agg["paper_universal_count"] = int((up[0] & live[0]).sum())
    agg["mean_excess_by_layer"] = [float(np.nanmean(np.where(live[:, j], arrays["excess"][:, j], np.nan)))
                                   if live[:, j].any() else None for j in range(l)]
    other = ~np.eye(s, dtype=bool)
    mx = (arrays["max_corr"] * other[:, None, :]).sum(-1) / max(s - 1, 1)
    base = (arrays["baseline_max_corr"] * other[:, None, :]).sum(-1) / max(s - 1, 1)
    agg["mean_max_corr"] = float(mx.reshape(s, l, -1)[live].mean()) if live.any() else None
    agg["mean_baseline_max_corr"] = float(base.reshape(s, l, -1)[live].mean()) if live.any() else None
  contrast = {}
  if universal.any() and (live & ~universal).any():
    for name in PROPERTIES:
      pct = percentile_within_layer(np.asarray(arrays[name], np.float64))
      contrast[name] = {"universal": float(np.median(pct[universal & live])),
                        "other": float(np.median(pct[~universal & live]))}
  agg["property_percentiles"] = contrast
  runs = []
  for i in range(s):
    rec = {"universal_by_layer": [_frac(universal[i, j], live[i, j]) for j in range(l)],
           "universal_fraction": _frac(universal[i], live[i]), "dead": int(dead[i].sum()),
           "prediction": int((vocab_class[i] == 1).sum()), "suppression": int((vocab_class[i] == -1).sum()),
           "entropy": int(arrays["entropy"][i].sum()), "attention_deactivating": int(attn[i].sum())}
    runs.append(rec)
  return {"task": task, "aggregate": agg, "runs": runs, "arrays": arrays}
