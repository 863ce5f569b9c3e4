"""The conv net's permutation and scaling symmetries, put to work: mode connectivity with weight matching
(*Git Re-Basin*, Ainsworth et al. 2023) and iterative feature merging on conv channels (*Network Feature
Complexity*).

A hidden layer's units (a conv layer's output channels, a dense layer's units) can be reordered by any
permutation π without changing the function, if everything that reads them is reordered too: the layer's
kernel columns, bias and (with normalisation) gain and bias; the next conv layer's input channels; and, for
the last conv layer, the rows of the first dense layer (or of the head) that read each channel at every
position of the flattened map. ``permute`` does that for every hidden layer at once. GroupNorm with several
groups allows only permutations that keep every channel in its group (``allowed``: the matchings here are
solved within groups); LayerNorm over all channels of an image is invariant to any.

* ``weight_matching(params_a, params_b, spec)``: the permutations of b's hidden layers that maximise the
  summed inner products of the two nets' weights, Git Re-Basin's coordinate descent (each step one linear
  assignment per layer, given the neighbours' current permutations), until no layer changes.
* ``path_losses(params_a, params_b, spec, images, labels)``: loss and accuracy along
  (1 − λ)θ_a + λθ_b at ``points`` values of λ, and the barrier max_λ L(λ) − ((1 − λ)L(0) + λL(1)).
* ``merge_channels(params, spec, layer, images, labels)``: iterative feature merging of one layer of one
  net without normalisation. A unit m whose incoming weights (kernel and bias) are c·w_n with c > 0 computes
  c·h_n (ReLU and both poolings are positively homogeneous), so it can be removed and its outgoing weights
  folded into n's with factor c. Repeatedly the two live units with the most similar incoming weights
  (cosine) are merged — the one with the smaller norm into the other, with the least-squares c — while the
  loss on the given images stays within ``tolerance`` of the unmerged net's and, when ``max_distance`` is
  set, while the pair's cosine distance 1 − cos is at most that (the IFM paper's distance threshold); the
  width left is the layer's feature complexity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from universality.engine.families.vision import models

DEFAULT_POINTS = 25


def allowed(spec: models.ConvSpec, layer: str) -> np.ndarray | None:
  """bool ``[N, N]``: which unit of b may take the place of which unit of a in ``layer`` (GroupNorm: the same
  group); None when any permutation is allowed."""
  if not (layer.startswith("conv") and spec.norm == "group" and spec.norm_groups > 1):
    return None
  n = spec.widths[int(layer[4:]) - 1]
  group = np.arange(n) // (n // spec.norm_groups)
  return group[:, None] == group[None, :]


def match(sim_NxN: np.ndarray, allowed_NxN: np.ndarray | None = None) -> np.ndarray:
  """The permutation maximising the summed similarity (a linear assignment), within the allowed pairs."""
  sim = np.asarray(sim_NxN, np.float64)
  if allowed_NxN is not None:
    sim = np.where(allowed_NxN, sim, sim.min() - 1.0 - np.abs(sim).sum())  # never worth a forbidden pair
  _, cols = scipy.optimize.linear_sum_assignment(sim, maximize=True)
  return cols


def _check_permutable(spec: models.ConvSpec, perms: dict[str, np.ndarray]) -> None:
  for layer, perm in perms.items():
    ok = allowed(spec, layer)
    if ok is not None and not ok[np.arange(len(perm)), np.asarray(perm)].all():
      raise ValueError(f"permute: {layer}'s permutation moves channels across GroupNorm groups")


def _next_reader(spec: models.ConvSpec, layer: str) -> str:
  names = list(spec.layers) + ["head"]
  return names[names.index(layer) + 1]


def _flat_positions(spec: models.ConvSpec) -> int:
  """Positions of the flattened map of the last conv layer (its rows in the first dense layer or head)."""
  return spec.flat_features() // spec.widths[-1]


def permute(params, perms: dict[str, np.ndarray], spec: models.ConvSpec):
  """``params`` with the units of each hidden layer named in ``perms`` reordered: new unit n is old unit
  ``perms[layer][n]``; the function is unchanged (module docstring)."""
  _check_permutable(spec, perms)
  p = jax.tree.map(np.asarray, params)
  p = {k: dict(v) for k, v in p.items()}
  for layer, perm in perms.items():
    perm = np.asarray(perm)
    q = p[layer]
    q["w"] = q["w"][..., perm]
    for k in ("b", "g", "beta"):
      if k in q:
        q[k] = q[k][perm]
    reader = _next_reader(spec, layer)
    w = p[reader]["w"]
    if reader.startswith("conv"):
      p[reader]["w"] = w[:, :, perm, :]
    elif layer.startswith("conv"):  # the flattened map: rows ordered (position, channel)
      c = spec.widths[-1]
      p[reader]["w"] = w.reshape(-1, c, w.shape[-1])[:, perm, :].reshape(w.shape)
    else:
      p[reader]["w"] = w[perm, :]
  return p


def _incoming(p, layer: str) -> np.ndarray:
  """``[N, F]``: each unit's incoming weights (kernel or matrix column, bias, gain and bias if any)."""
  q = p[layer]
  w = np.asarray(q["w"], np.float64)
  cols = [w.reshape(-1, w.shape[-1]).T] + [np.asarray(q[k], np.float64)[:, None] for k in ("b", "g", "beta")
                                            if k in q]
  return np.concatenate(cols, axis=1)


def _outgoing(p, spec: models.ConvSpec, layer: str) -> np.ndarray:
  """``[N, F]``: the weights that read each unit in the next layer."""
  reader = _next_reader(spec, layer)
  w = np.asarray(p[reader]["w"], np.float64)
  if reader.startswith("conv"):
    return w.transpose(2, 0, 1, 3).reshape(w.shape[2], -1)
  if layer.startswith("conv"):
    c = spec.widths[-1]
    return w.reshape(-1, c, w.shape[-1]).transpose(1, 0, 2).reshape(c, -1)
  return w


def weight_matching(params_a, params_b, spec: models.ConvSpec, *, max_sweeps: int = 50,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """``{layer: perm}``: b's units reordered by ``permute(params_b, perms)`` to match a's (module docstring).

  Coordinate descent: each layer's permutation maximises
  Σ_n ⟨in_a[n], in_b'[π(n)]⟩ + ⟨out_a[n], out_b'[π(n)]⟩, where b' is b with every other layer's current
  permutation applied; layers are visited in a random order (``seed``) per sweep, until a sweep changes
  nothing or ``max_sweeps``.
  """
  layers = list(spec.layers)
  perms = {layer: np.arange(np.asarray(params_b[layer]["b"]).shape[0]) for layer in layers}
  rng = np.random.default_rng(seed)
  for _ in range(max_sweeps):
    changed = False
    for layer in rng.permutation(layers):
      others = {k: v for k, v in perms.items() if k != layer}
      pb = permute(params_b, others, spec)
      sim = _incoming(params_a, layer) @ _incoming(pb, layer).T + _outgoing(params_a, spec, layer) @ \
          _outgoing(pb, spec, layer).T
      cols = match(sim, allowed(spec, layer))
      if not np.array_equal(cols, perms[layer]):
        old = sim[np.arange(len(cols)), perms[layer]].sum()
        if sim[np.arange(len(cols)), cols].sum() > old + 1e-9 * max(abs(old), 1.0):
          perms[layer], changed = cols, True
    if not changed:
      break
  return perms


@functools.lru_cache(maxsize=8)
def _loss_fn(spec: models.ConvSpec):
  def one(params, images, labels):
    logits, _ = models.apply(params, images, spec)
    return models.xent_and_acc(logits, labels)
  return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def losses(params_S, spec: models.ConvSpec, images_BxHxWxC, labels_B) -> tuple[np.ndarray, np.ndarray]:
  """Cross-entropy and accuracy ``[S]`` of stacked nets on standardised images."""
  loss, acc = _loss_fn(spec)(params_S, jnp.asarray(images_BxHxWxC, jnp.float32), jnp.asarray(labels_B))
  return np.asarray(loss), np.asarray(acc)


def path_losses(params_a, params_b, spec: models.ConvSpec, images_BxHxWxC, labels_B, *,
                points: int = DEFAULT_POINTS) -> dict:
  """Loss and accuracy along the straight path from a to b (``points`` values of λ, ends included) and
  the barrier (module docstring): ``loss_O``, ``accuracy_O``, ``lambda_O``, ``barrier``."""
  if points < 2:
    raise ValueError(f"points must be >= 2, got {points}")
  lam = np.linspace(0.0, 1.0, points)
  path = jax.tree.map(lambda a, b: np.stack([(1 - t) * np.asarray(a) + t * np.asarray(b) for t in lam])
                      .astype(np.float32), params_a, params_b)
  loss, acc = losses(path, spec, images_BxHxWxC, labels_B)
  ends = (1 - lam) * loss[0] + lam * loss[-1]
  return {"loss_O": loss, "accuracy_O": acc, "lambda_O": lam, "barrier": float(np.max(loss - ends))}


def merge_channels(params, spec: models.ConvSpec, layer: str, images_BxHxWxC, labels_B, *,
                   tolerance: float = 0.01, max_distance: float | None = None) -> dict:
  """Iterative feature merging of one hidden layer of one net (module docstring).

  Returns:
    dict: ``alive`` (bool ``[N]``), ``width`` (units left), ``merges``, ``loss`` (before), ``merged_loss``
    and ``params`` (the merged net: removed units' outgoing weights zero, folded into their partners).
  """
  if spec.norm != "none":
    raise ValueError("feature merging needs a net without normalisation (a normalised unit is not "
                     "positively homogeneous in its incoming weights)")
  if not np.isfinite(tolerance) or tolerance < 0:
    raise ValueError(f"tolerance must be finite and >= 0, got {tolerance}")
  p = {k: {kk: np.array(vv, np.float64) for kk, vv in v.items()} for k, v in jax.tree.map(np.asarray,
                                                                                            params).items()}
  w_in = _incoming(p, layer)
  n = w_in.shape[0]
  norm = np.linalg.norm(w_in, axis=1)
  unit = w_in / np.maximum(norm, 1e-30)[:, None]
  cos = unit @ unit.T
  alive = np.ones(n, bool)
  reader = _next_reader(spec, layer)
  flat_conv = layer.startswith("conv") and not reader.startswith("conv")

  def out_rows(q):  # a view [N, ...] of the reader's weights per unit of ``layer``
    w = q[reader]["w"]
    if reader.startswith("conv"):
      return np.moveaxis(w, 2, 0)
    if flat_conv:
      return np.moveaxis(w.reshape(-1, spec.widths[-1], w.shape[-1]), 1, 0)
    return w

  def set_rows(q, rows):
    w = q[reader]["w"]
    if reader.startswith("conv"):
      q[reader]["w"] = np.moveaxis(rows, 0, 2)
    elif flat_conv:
      q[reader]["w"] = np.moveaxis(rows, 0, 1).reshape(w.shape)
    else:
      q[reader]["w"] = rows

  stack = lambda q: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)[None], q)
  loss0 = float(losses(stack(p), spec, images_BxHxWxC, labels_B)[0][0])
  merges = 0
  while alive.sum() > 1:
    ok = alive[:, None] & alive[None, :] & ~np.eye(n, dtype=bool)
    score = np.where(ok, cos, -np.inf)
    i, j = np.unravel_index(np.argmax(score), score.shape)
    if max_distance is not None and 1.0 - score[i, j] > max_distance:
      break
    keep, drop = (i, j) if norm[i] >= norm[j] else (j, i)
    c = float(w_in[keep] @ w_in[drop]) / max(float(norm[keep]) ** 2, 1e-30)
    trial = {k: dict(v) for k, v in p.items()}
    rows = out_rows(trial).copy()
    rows[keep] = rows[keep] + c * rows[drop]
    rows[drop] = 0.0
    set_rows(trial, rows)
    loss = float(losses(stack(trial), spec, images_BxHxWxC, labels_B)[0][0])
    if loss > loss0 + tolerance:
      break
    p, merges = trial, merges + 1
    alive[drop] = False
  merged = float(losses(stack(p), spec, images_BxHxWxC, labels_B)[0][0])
  return {"alive": alive, "width": int(alive.sum()), "merges": merges, "loss": loss0, "merged_loss": merged,
          "params": jax.tree.map(lambda x: np.asarray(x, np.float32), p)}
