"""The language-model family's analysis of one cohort: universal neurons (Gurnee et al. 2024) and the
properties that set them apart.

Every run of the cohort (runs that differ only in seed) reads the same ``tokens`` held-out bytes, cut into
context windows. The MLP activations of every layer are computed batch by batch and never stored whole:

* post-GELU activations of all layers of every run stream into ``universality.kernels.correlation`` (via
  ``universality.engine.analysis.cross_seed.neuron_correlations``): for each neuron, the maximum Pearson correlation with
  every neuron of every layer of each other run, its layer and index, the same maximum against that run's
  neurons mixed by a random orthogonal matrix (the baseline), and the excess = mean over the other runs of
  (max − baseline max). A neuron is *universal* when its excess exceeds ``universal_threshold``. Gurnee et
  al.'s baseline was a row-normalised Gaussian matrix, not a rotation, so their baseline maxima differ
  from ours.
* in the same pass (``universality.engine.analysis.neuron_stats``): the moments of each neuron's *pre*-activation
  (mean, variance, skew, kurtosis, share >= 0), and the share of its post-activation variance explained by
  the current byte, its class (letter, digit, space, ...), the previous byte and the position in the window.
* from the weights: input bias, ‖w_in‖, ‖w_out‖, cos(w_in, w_out), and the moments over the 256 bytes of
  cos(w_out, W_U[:, v]) with W_U centred and the final LayerNorm's gain folded in: kurtosis above
  ``kurtosis_threshold`` with positive skew marks a prediction neuron, with negative skew a suppression one.
* a second pass over the same text for the first run: the windows that drive its ``top_neurons`` most
  universal neurons hardest, as text snippets.
* with the setting ``convergent``: the Convergent Learning passes
  (``universality.engine.analysis.convergent``) on every MLP layer, over a sample of the same windows
  (``convergent_of``).

Only the last checkpoint is analysed (``LAST_STEP_ONLY``): universality is a property of trained models.
Per-neuron arrays (``[S, L, N]`` and the ``[S, L·N, S]`` match tables) go to the cohort's arrays file
(``universality.engine.rundir``); summary.json holds per-layer fractions, property contrasts and the top
neurons.

Local shape letters:

  J  the neurons whose top-activating windows are collected
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from universality.engine.analysis import convergent
from universality.engine.analysis import cross_seed
from universality.engine.analysis import neuron_stats
from universality.engine.families.lm import family as family_lib
from universality.engine.families.lm import models
from universality.kernels import screen as screen_lib

LAST_STEP_ONLY = True

SETTINGS = family_lib.ANALYSIS_SETTINGS

# Per-neuron properties compared between universal and other neurons (report and view).
PROPERTIES = ("pre_mean", "pre_var", "pre_skew", "pre_kurtosis", "act_freq", "input_bias", "w_in_norm",
              "w_out_norm", "cos_in_out", "vocab_kurtosis", "vocab_skew", "var_byte", "var_byte_class",
              "var_prev_byte", "var_position")
SNIPPET_BEFORE, SNIPPET_AFTER = 48, 12


def analysis_windows(cfg, tokens: int) -> np.ndarray:
  """uint8 ``[W, context + 1]``: consecutive windows of held-out text, each with the byte before it (column 0,
  the previous byte of the window's first position). At most ``tokens`` bytes in all."""
  test = family_lib.corpus_of(cfg).test
  c = int(cfg.model.gpt.context)
  n = min(int(tokens), len(test) - 1) // c
  if n < 1:
    raise ValueError(f"the held-out text ({len(test)} bytes) holds no analysis window of {c} bytes")
  return np.lib.stride_tricks.sliding_window_view(test, c + 1)[0:n * c:c].copy()


def _forward(model_cfg):
  """Jitted ``(params_S, tokens_BxT) -> (pre, post)``, each ``[S, B·T, L·N]`` (``models.stacked``)."""
  return models.stacked(model_cfg).activations


@jax.jit
def _update_stats(stats, pre_SxBxN, post_SxBxN, byte_B, prev_B, pos_B):
  """One batch into the moment and category accumulators (neurons flattened as S·M)."""
  s, b, m = pre_SxBxN.shape
  pre_BxM = jnp.moveaxis(pre_SxBxN, 1, 0).reshape(b, s * m)
  post_BxM = jnp.moveaxis(post_SxBxN, 1, 0).reshape(b, s * m)
  moments, by_byte, by_prev, by_pos = stats
  return (neuron_stats.moments_update(moments, pre_BxM),
          neuron_stats.categories_update(by_byte, post_BxM, byte_B),
          neuron_stats.categories_update(by_prev, post_BxM, prev_B),
          neuron_stats.categories_update(by_pos, post_BxM, pos_B))


class _Stream:
  """A re-iterable source of post-activation batches for ``universality.kernels.correlation``. The first iteration that
  runs to its end also yields the per-neuron statistics (``stats``); an abandoned iteration (the kernel
  peeks at one batch for the shapes) and later passes, when the correlation needs several, only yield."""

  def __init__(self, params_S, windows_WxC1, model_cfg, batch_windows: int, n_neurons: int, s: int):
    self.params, self.windows, self.bw = params_S, windows_WxC1, batch_windows
    self.forward = _forward(model_cfg)
    c = windows_WxC1.shape[1] - 1
    k = s * n_neurons
    self.empty = (neuron_stats.moments_init(k), neuron_stats.categories_init(256, k),
                  neuron_stats.categories_init(256, k), neuron_stats.categories_init(c, k))
    self.stats = None
    self.pos = np.tile(np.arange(c, dtype=np.int32), batch_windows)

  def __call__(self):
    collect = self.stats is None
    stats = self.empty
    for a in range(0, len(self.windows), self.bw):
      w = self.windows[a:a + self.bw]
      pre, post = self.forward(self.params, jnp.asarray(w[:, 1:], jnp.int32))
      if collect:
        stats = _update_stats(stats, pre, post, jnp.asarray(w[:, 1:].reshape(-1), jnp.int32),
                              jnp.asarray(w[:, :-1].reshape(-1), jnp.int32), jnp.asarray(self.pos[:post.shape[1]]))
      yield post
    if collect:
      self.stats = stats


def weight_properties(params_S, model_cfg) -> dict[str, np.ndarray]:
  """Per-neuron weight statistics, each ``[S, L, N]`` (see the module docstring)."""
  blocks = params_S["blocks"]
  w_in_SxLxDxN = np.asarray(blocks["w_in"], np.float64)
  w_out_SxLxNxD = np.asarray(blocks["w_out"], np.float64)
  in_norm = np.linalg.norm(w_in_SxLxDxN, axis=2)
  out_norm = np.linalg.norm(w_out_SxLxNxD, axis=3)
  dot = np.einsum("sldn,slnd->sln", w_in_SxLxDxN, w_out_SxLxNxD)
  s, l, n, d = w_out_SxLxNxD.shape
  w_u_SxDxV = jax.vmap(models.unembedding)(params_S)
  vocab = neuron_stats.vocab_composition(jnp.asarray(w_out_SxLxNxD.reshape(s, l * n, d), jnp.float32),
                                         w_u_SxDxV)
  return {"input_bias": np.asarray(blocks["b_in"], np.float64), "w_in_norm": in_norm,
          "w_out_norm": out_norm, "cos_in_out": dot / np.maximum(in_norm * out_norm, 1e-30),
          "vocab_skew": np.asarray(vocab["skew"]).reshape(s, l, n),
          "vocab_kurtosis": np.asarray(vocab["kurtosis"]).reshape(s, l, n)}


def top_windows(params_one, windows_WxC1, model_cfg, flat_J, k: int, batch_windows: int):
  """For neurons ``flat_J`` (indices into L·N) of one run: the ``k`` (value, window, position) of their
  largest post-activations over the windows, as arrays ``[K, k]``."""
  forward = _forward(model_cfg)
  params = jax.tree.map(lambda x: x[None], params_one)
  c = windows_WxC1.shape[1] - 1
  best_v = np.full((len(flat_J), 0), -np.inf)
  best_i = np.zeros((len(flat_J), 0), np.int64)
  for a in range(0, len(windows_WxC1), batch_windows):
    _, post = forward(params, jnp.asarray(windows_WxC1[a:a + batch_windows, 1:], jnp.int32))
    sel_JxB = np.asarray(post[0][:, np.asarray(flat_J)]).T
    best_v = np.concatenate([best_v, sel_JxB], axis=1)
    best_i = np.concatenate([best_i, np.broadcast_to(a * c + np.arange(sel_JxB.shape[1]), sel_JxB.shape)],
                            axis=1)
    order = np.argsort(-best_v, axis=1, kind="stable")[:, :k]
    best_v, best_i = np.take_along_axis(best_v, order, 1), np.take_along_axis(best_i, order, 1)
  return best_v, best_i // c, best_i % c


def snippet(window_C1: np.ndarray, position: int) -> dict[str, str]:
  """The text around byte ``position`` of a window (its input bytes are ``window_C1[1:]``)."""
  text = window_C1[1:]
  dec = lambda b: bytes(b).decode("utf-8", errors="replace")
  return {"before": dec(text[max(0, position - SNIPPET_BEFORE):position]), "byte": dec(text[position:position + 1]),
          "after": dec(text[position + 1:position + 1 + SNIPPET_AFTER])}


def percentile_within_layer(x_SxLxN: np.ndarray) -> np.ndarray:
  """Each neuron's percentile (0..100) among the neurons of its layer, pooled over the cohort's runs."""
  s, l, n = x_SxLxN.shape
  x = np.moveaxis(x_SxLxN, 1, 0).reshape(l, s * n)
  ranks = np.argsort(np.argsort(x, axis=1, kind="stable"), axis=1, kind="stable")
  return np.moveaxis((100.0 * ranks / max(s * n - 1, 1)).reshape(l, s, n), 0, 1)


def neuron_table(params_S, windows_WxC1, model_cfg, key, settings: dict,
                 batch_windows: int | None = None) -> dict[str, np.ndarray]:
  """Every per-neuron statistic of S stacked runs read on the same windows (module docstring): arrays
  ``[S, L, N]`` (properties, ``excess``, ``universal``, ``dead``, ``vocab_class``) and, with S >= 2, the match
  tables ``max_corr``, ``baseline_max_corr``, ``argmax`` ``[S, L·N, S]``."""
  l, n = int(model_cfg.n_layers), int(model_cfg.d_mlp)
  s = jax.tree.leaves(params_S)[0].shape[0]
  screen = screen_lib.settings(settings["screen"], settings["screen_tokens"], settings["screen_z"],
                               settings["screen_k"], inputs=windows_WxC1.shape[0] * (windows_WxC1.shape[1] - 1))
  if screen.may_screen():  # the screen's sample is the stream's start: spread it over the text
    windows_WxC1 = windows_WxC1[np.random.default_rng(0).permutation(len(windows_WxC1))]
  stream = _Stream(params_S, windows_WxC1, model_cfg, int(batch_windows or settings["batch_windows"]), l * n, s)
  if s >= 2:  # each neuron against the other runs only: the statistic needs no block of a run with itself
    corr = cross_seed.neuron_correlations(stream, key=key, universal_threshold=settings["universal_threshold"],
                                          memory_bytes=int(settings["memory_gb"] * (1 << 30)), within=False,
                                          screen=screen)
  else:  # one run: no cross-seed statistic, only the properties
    for _ in stream():
      pass
    corr = None
  shape = lambda x: np.asarray(x).reshape(s, l, n)
  moments = {k: shape(v) for k, v in neuron_stats.moments_finalize(stream.stats[0]).items()}
  _, class_of_byte = neuron_stats.byte_classes()
  props = {"pre_mean": moments["mean"], "pre_var": moments["var"], "pre_skew": moments["skew"],
           "pre_kurtosis": moments["kurtosis"], "act_freq": moments["freq_nonneg"],
           "var_byte": shape(neuron_stats.variance_explained(stream.stats[1])),
           "var_byte_class": shape(neuron_stats.variance_explained(stream.stats[1], class_of_byte)),
           "var_prev_byte": shape(neuron_stats.variance_explained(stream.stats[2])),
           "var_position": shape(neuron_stats.variance_explained(stream.stats[3]))}
  props.update(weight_properties(params_S, model_cfg))
  out = {k: np.asarray(v, np.float32) for k, v in props.items()}
  out["vocab_class"] = shape(neuron_stats.prediction_class(props["vocab_skew"], props["vocab_kurtosis"],
                                                           settings["kurtosis_threshold"])).astype(np.int8)
  if corr is None:
    out.update(universal=np.zeros((s, l, n), bool), dead=moments["kurtosis"] == 0)
    return out
  out.update(excess=shape(corr["excess_SxN"]).astype(np.float32), universal=shape(corr["universal_SxN"]),
             dead=shape(corr["dead_SxN"]), max_corr=np.asarray(corr["max_SxNxS"], np.float32),
             baseline_max_corr=np.asarray(corr["baseline_max_SxNxS"], np.float32),
             argmax=np.asarray(corr["argmax_SxNxS"], np.int32))
  if corr.get("screen_margin") is not None:
    out["screen_settled"] = shape(corr["settled_SxN"]).astype(np.int8)
  return out


def analyze_cohort(view, params_by_step, key, settings: dict, batch_size: int | None = None) -> dict:
  """One cohort: ``{"task", "aggregate", "runs", "arrays"}`` (see the module docstring)."""
  cfg = view.config
  gpt = cfg.model.gpt
  step = max(params_by_step)
  params = jax.tree.map(jnp.asarray, params_by_step[step])
  s = len(view)
  l = int(gpt.n_layers)
  windows = analysis_windows(cfg, settings["tokens"])
  bw = int(batch_size or settings["batch_windows"])
  arrays = neuron_table(params, windows, gpt, key, settings, bw)
  universal, dead, vocab_class = arrays["universal"], arrays["dead"], arrays["vocab_class"]
  props = {k: arrays[k] for k in PROPERTIES}
  have_corr = "excess" in arrays
  task = {"tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "windows": int(windows.shape[0]),
          "layers": l, "d_mlp": int(gpt.d_mlp), "step": int(step)}
  aggregate = _aggregate(props, vocab_class, universal, dead, arrays, have_corr)
  if have_corr and universal[0].any():
    aggregate["top_neurons"] = _top_neurons(params, windows, gpt, arrays, settings, bw, view.runs)
  conv = convergent_of(params, windows, gpt, key, settings, bw)
  if conv is not None:  # only when asked for: summaries without it stay as they were
    aggregate["convergent"] = conv
  runs = []
  for i in range(s):
    live = ~dead[i]
    runs.append({"universal_by_layer": [_frac(universal[i, j], live[j]) for j in range(l)],
                 "universal_fraction": _frac(universal[i], live),
                 "prediction_by_layer": [int((vocab_class[i, j] == 1).sum()) for j in range(l)],
                 "suppression_by_layer": [int((vocab_class[i, j] == -1).sum()) for j in range(l)],
                 "dead": int(dead[i].sum())})
  return {"task": task, "aggregate": aggregate, "runs": runs, "arrays": arrays}


def convergent_windows(windows_WxC1: np.ndarray, key, max_inputs: int) -> np.ndarray:
  """The indices (ascending) of the analysis windows the Convergent Learning passes read: enough whole
  windows for ``max_inputs`` bytes, drawn from ``key`` over the held-out text (all of them if fewer)."""
  c = windows_WxC1.shape[1] - 1
  n = min(len(windows_WxC1), -(-int(max_inputs) // c))
  if n == len(windows_WxC1):
    return np.arange(n)
  return np.sort(np.asarray(jax.random.permutation(jax.random.fold_in(key, 0x57D0), len(windows_WxC1)))[:n])


def convergent_of(params_S, windows_WxC1, model_cfg, key, settings: dict, batch_windows: int) -> dict | None:
  """The Convergent Learning passes on every MLP layer (post-GELU): ``{"layer<j>": convergent.to_json(...)
  plus "inputs"}``, or None when the setting is off or the cohort has one run.

  The runs read the windows ``convergent_windows`` picks (their bytes are ``convergent_text``) and each
  layer's activations ``[S, T, N]`` go to ``convergent.analyse`` with the layer's key
  (``convergent.key_of``); the sparse prediction's solver stays within ``convergent_memory_gb`` (b's units
  in blocks). One layer's activations are held at a time, S·T·N floats: the model reads the T bytes once
  per layer (T is small beside the analysis' tokens)."""
  conv = convergent.settings_of(settings)
  s = jax.tree.leaves(params_S)[0].shape[0]
  if not conv.enabled or s < 2:
    return None
  l, n = int(model_cfg.n_layers), int(model_cfg.d_mlp)
  sel = windows_WxC1[convergent_windows(windows_WxC1, key, conv.max_inputs)]
  forward = _forward(model_cfg)
  pairs = convergent.pairs_of(settings, s)
  out = {}
  for j in range(l):
    cols = slice(j * n, (j + 1) * n)
    parts = [forward(params_S, jnp.asarray(sel[a:a + batch_windows, 1:], jnp.int32))[1][:, :, cols]
             for a in range(0, len(sel), batch_windows)]
    acts_SxTxN = np.concatenate([np.asarray(p) for p in parts], axis=1)
    res = convergent.analyse(acts_SxTxN, pairs, key=convergent.key_of(key, j), settings=conv)
    out[f"layer{j}"] = dict(convergent.to_json(res), inputs=int(min(acts_SxTxN.shape[1], conv.max_inputs)))
  return out


def convergent_text(windows_WxC1: np.ndarray, key, max_inputs: int) -> bytes:
  """The held-out bytes the Convergent Learning passes read (``convergent_windows``, in order)."""
  return windows_WxC1[convergent_windows(windows_WxC1, key, max_inputs), 1:].tobytes()


def _frac(mask, live) -> float:
  return float(np.sum(mask & live) / max(int(np.sum(live)), 1))


def _aggregate(props, vocab_class, universal, dead, arrays, have_corr: bool) -> dict[str, Any]:
  s, l, n = universal.shape
  live = ~dead
  out: dict[str, Any] = {
      "universal_by_layer": [_frac(universal[:, j], live[:, j]) for j in range(l)],
      "universal_fraction": _frac(universal, live),
      "prediction_by_layer": [float((vocab_class[:, j] == 1).sum() / s) for j in range(l)],
      "suppression_by_layer": [float((vocab_class[:, j] == -1).sum() / s) for j in range(l)],
      "dead_fraction": float(dead.mean()),
  }
  if have_corr:
    excess = arrays["excess"]
    out["mean_excess_by_layer"] = [float(np.nanmean(np.where(live[:, j], excess[:, j], np.nan)))
                                   for j in range(l)]
    # Mean over other runs of each neuron's max correlation and baseline, averaged over live neurons.
    other = ~np.eye(s, dtype=bool)
    mx = (arrays["max_corr"] * other[:, None, :]).sum(-1) / max(s - 1, 1)
    base = (arrays["baseline_max_corr"] * other[:, None, :]).sum(-1) / max(s - 1, 1)
    out["mean_max_corr"] = float(mx.reshape(s, l, n)[live].mean()) if live.any() else None
    out["mean_baseline_max_corr"] = float(base.reshape(s, l, n)[live].mean()) if live.any() else None
  contrast = {}
  if universal.any() and (live & ~universal).any():
    for name in PROPERTIES:
      pct = percentile_within_layer(np.asarray(props[name], np.float64))
      contrast[name] = {"universal": float(np.median(pct[universal & live])),
                        "other": float(np.median(pct[~universal & live]))}
  out["property_percentiles"] = contrast
  return out


def _top_neurons(params, windows, gpt, arrays, settings, bw, rows) -> list[dict]:
  """The first run's most universal neurons, their best matches in the other runs and their top windows."""
  n = int(gpt.d_mlp)
  excess0 = np.where(arrays["universal"][0], arrays["excess"][0], -np.inf).reshape(-1)
  k = int(min(settings["top_neurons"], np.isfinite(excess0).sum()))
  flat = np.argsort(-excess0, kind="stable")[:k]
  params0 = jax.tree.map(lambda x: x[0], params)
  vals, win, pos = top_windows(params0, windows, gpt, flat, int(settings["top_examples"]), bw)
  out = []
  for r, f in enumerate(flat):
    matches = [{"seed": int(rows[j]["seed"]), "layer": int(arrays["argmax"][0, f, j] // n),
                "neuron": int(arrays["argmax"][0, f, j] % n), "corr": float(arrays["max_corr"][0, f, j])}
               for j in range(1, len(rows))]
    out.append({"seed": int(rows[0]["seed"]), "layer": int(f // n), "neuron": int(f % n),
                "excess": float(excess0[f]), "matches": matches,
                "examples": [dict(snippet(windows[w], p), activation=float(v))
                             for v, w, p in zip(vals[r], win[r], pos[r])]})
  return out
