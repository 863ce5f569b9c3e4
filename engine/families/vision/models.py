"""Conv nets as pure functions: ``init(key, spec)`` and ``apply(params, images, spec)``.

The net is ``len(widths)`` blocks of a 3×3 convolution (stride 1, zero "same" padding, bias), an optional
normalisation, ReLU and, after every ``pool_every``-th block, 2×2 pooling with stride 2 (max or average);
then the feature map is flattened (row-major over height, width, channel) and passes ``dense`` ReLU layers
and a linear head onto the classes. Normalisation keeps a run a pure function of its parameters: ``group``
is GroupNorm over ``norm_groups`` groups of channels of each image, ``layer`` normalises each image over all
its positions and channels (GroupNorm with one group); both with a learned per-channel gain and bias.

``apply`` returns the logits and the named activations analyses read, after the ReLU and before pooling
(the blobs Li et al. 2016 compared): ``conv1`` … ``convK`` ``[B, H, W, C]`` and ``fc1`` … ``[B, N]``.

Initialisation: He normal (std √(2 / fan_in)) for the convolutions and hidden dense layers, std √(1 / fan_in)
for the head, zero biases, unit gains. Images enter as float32 ``[B, H, W, C]``, already standardised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp

from universality.engine import optim

NORMS = ("none", "group", "layer")
POOLS = ("max", "avg")
_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A conv net on ``height × width × channels`` images with ``classes`` outputs (module docstring)."""
  height: int
  width: int
  channels: int
  classes: int
  widths: tuple[int, ...]
  dense: tuple[int, ...] = ()
  pool_every: int = 1
  pool: str = "max"
  norm: str = "none"
  norm_groups: int = 1

  @property
  def layers(self) -> tuple[str, ...]:
    """The names of the activations ``apply`` returns, input to output."""
    return (tuple(f"conv{i + 1}" for i in range(len(self.widths)))
            + tuple(f"fc{i + 1}" for i in range(len(self.dense))))

  def pools_after(self, i: int) -> bool:
    return self.pool_every > 0 and (i + 1) % self.pool_every == 0

  def feature_shapes(self) -> list[tuple[int, int, int]]:
    """``(H, W, C)`` of each conv layer's activation (before its pooling)."""
    h, w, out = self.height, self.width, []
    for i, c in enumerate(self.widths):
      out.append((h, w, c))
      if self.pools_after(i):
        h, w = h // 2, w // 2
    return out

  def flat_features(self) -> int:
    h, w, c = self.feature_shapes()[-1]
    if self.pools_after(len(self.widths) - 1):
      h, w = h // 2, w // 2
    return h * w * c


def parse_ints(text, name: str) -> tuple[int, ...]:
  """``"16,32"`` -> ``(16, 32)``; "" -> ``()``; a one-line ValueError naming ``config.<name>`` otherwise."""
  if isinstance(text, int) and not isinstance(text, bool):
    values = (text,)
  elif isinstance(text, str):
    try:
      values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
      raise ValueError(f"config.{name}: cannot read {text!r} as comma-separated integers") from None
  else:
    raise ValueError(f"config.{name}: expected comma-separated integers, got {type(text).__name__}")
  if any(v < 1 for v in values):
    raise ValueError(f"config.{name}: widths must be >= 1, got {text!r}")
  return values


def spec_of(conv, height: int, width: int, channels: int, classes: int) -> ConvSpec:
  """The typed, frozen net of the config's ``model.conv`` section on images of the given shape."""
  return ConvSpec(height=int(height), width=int(width), channels=int(channels), classes=int(classes),
                  widths=parse_ints(conv.widths, "model.conv.widths"),
                  dense=parse_ints(conv.dense, "model.conv.dense"), pool_every=int(conv.pool_every),
                  pool=str(conv.pool), norm=str(conv.norm), norm_groups=int(conv.norm_groups))


def check_spec(spec: ConvSpec) -> None:
  """A one-line ValueError when the net cannot be built on its images."""
  if not spec.widths:
    raise ValueError("config.model.conv.widths: at least one conv layer")
  if spec.pool not in POOLS:
    raise ValueError(f"config.model.conv.pool: must be one of {POOLS}, got {spec.pool!r}")
  if spec.norm not in NORMS:
    raise ValueError(f"config.model.conv.norm: must be one of {NORMS}, got {spec.norm!r}")
  if spec.pool_every < 0:
    raise ValueError(f"config.model.conv.pool_every: must be >= 0, got {spec.pool_every}")
  if spec.norm == "group" and any(c % spec.norm_groups for c in spec.widths):
    raise ValueError(f"config.model.conv.norm_groups: {spec.norm_groups} does not divide every conv width "
                     f"{spec.widths}")
  h, w = spec.height, spec.width
  for i in range(len(spec.widths)):
    if spec.pools_after(i):
      if h < 2 or w < 2:
        raise ValueError(f"config.model.conv.pool_every: conv{i + 1} sees {h}x{w} maps, too small to pool "
                         f"(images {spec.height}x{spec.width})")
      h, w = h // 2, w // 2


def param_roles(params) -> dict:
  """Roles for the optimiser (universality.engine.optim.ROLES): kernels and dense matrices ``hidden``, the
  head ``unembed``, biases and gains ``vector``."""
  roles = optim.roles_by_name(params)
  roles["head"] = {"w": "unembed", "b": "vector"}
  return roles


def init(key: jax.Array, spec: ConvSpec) -> dict[str, Any]:
  """Parameters of the net ``spec`` (module docstring)."""
  params: dict[str, Any] = {}
  keys = jax.random.split(key, len(spec.widths) + len(spec.dense) + 1)
  c_in = spec.channels
  for i, c in enumerate(spec.widths):
    layer = {"w": math.sqrt(2.0 / (9 * c_in)) * jax.random.normal(keys[i], (3, 3, c_in, c), jnp.float32),
             "b": jnp.zeros((c,), jnp.float32)}
    if spec.norm != "none":
      layer.update(g=jnp.ones((c,), jnp.float32), beta=jnp.zeros((c,), jnp.float32))
    params[f"conv{i + 1}"] = layer
    c_in = c
  n_in = spec.flat_features()
  for i, n in enumerate(spec.dense):
    k = keys[len(spec.widths) + i]
    params[f"fc{i + 1}"] = {"w": math.sqrt(2.0 / n_in) * jax.random.normal(k, (n_in, n), jnp.float32),
                            "b": jnp.zeros((n,), jnp.float32)}
    n_in = n
  head = math.sqrt(1.0 / n_in) * jax.random.normal(keys[-1], (n_in, spec.classes), jnp.float32)
  params["head"] = {"w": head, "b": jnp.zeros((spec.classes,), jnp.float32)}
  return params


def conv3x3(x_BxHxWxC, w_3x3xCxN, b_N):
  """3×3 convolution, stride 1, zero padding keeping the size, plus bias (cross-correlation, as every
  deep-learning library computes it).

  Written as one matrix product of the nine shifted copies of the input (im2col) with the kernel as a
  ``[9·C, D]`` matrix: on XLA:CPU its forward and backward ran 1.1-5.8x faster than
  ``lax.conv_general_dilated`` on this family's shapes (benchmarks/README.md, "Vision training throughput").
  """
  b, h, w, c = x_BxHxWxC.shape
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols_BxYxXx9E = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
  out = cols_BxYxXx9E.reshape(b * h * w, 9 * c) @ w_3x3xCxN.reshape(9 * c, -1)
  return out.reshape(b, h, w, -1) + b_N.reshape(1, 1, 1, -1)


def group_norm(x_BxHxWxC, g_N, beta_N, groups: int):
  """Each image's channels in ``groups`` groups, each normalised over its positions and channels."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h, w, groups, c // groups)
  mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
  x = ((x - mean) * jax.lax.rsqrt(var + _EPS)).reshape(b, h, w, c)
  return x * g_N.reshape(1, 1, 1, c) + beta_N.reshape(1, 1, 1, c)


def pool2x2(x_BxHxWxC, kind: str):
  """2×2 pooling with stride 2 (an odd last row or column is dropped)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, :h - h % 2, :w - w % 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return jnp.max(x, axis=(2, 4)) if kind == "max" else jnp.mean(x, axis=(2, 4))


def apply(params, images_BxHxWxC: jax.Array, spec: ConvSpec) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits ``[B, classes]`` and the named activations (module docstring) of standardised images."""
  chex.assert_shape(images_BxHxWxC, (None, spec.height, spec.width, spec.channels))
  x = images_BxHxWxC
  acts = {}
  for i in range(len(spec.widths)):
    p = params[f"conv{i + 1}"]
    x = conv3x3(x, p["w"], p["b"])
    if spec.norm != "none":
      x = group_norm(x, p["g"], p["beta"], spec.norm_groups if spec.norm == "group" else 1)
    x = jax.nn.relu(x)
    acts[f"conv{i + 1}"] = x
    if spec.pools_after(i):
      x = pool2x2(x, spec.pool)
  x = x.reshape(x.shape[0], -1)
  for i in range(len(spec.dense)):
    p = params[f"fc{i + 1}"]
    x = jax.nn.relu(x @ p["w"] + p["b"].reshape(1, -1))
    acts[f"fc{i + 1}"] = x
  logits = x @ params["head"]["w"] + params["head"]["b"].reshape(1, -1)
  return logits, acts


def xent_and_acc(logits_BxV, labels_B, weight_B=None) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy (nats) and accuracy, weighted by ``weight_B`` (1 for every example by default)."""
  logp = jax.nn.log_softmax(logits_BxV, axis=-1)
  nll_B = -jnp.take_along_axis(logp, labels_B[:, None].astype(jnp.int32), axis=-1)[:, 0]
  correct_B = (jnp.argmax(logits_BxV, axis=-1) == labels_B).astype(jnp.float32)
  if weight_B is None:
    return jnp.mean(nll_B), jnp.mean(correct_B)
  total = jnp.maximum(jnp.sum(weight_B), 1.0)
  return jnp.sum(nll_B * weight_B) / total, jnp.sum(correct_B * weight_B) / total


def activation_floats(spec: ConvSpec, batch: int) -> int:
  """Floats one forward and backward pass keeps alive for ``batch`` images (for size estimates): per conv
  layer its input, pre-activation, normalised and ReLU maps and their gradients (~8 per value), then the
  dense layers and the logits."""
  per_image = spec.height * spec.width * spec.channels
  for h, w, c in spec.feature_shapes():
    per_image += 8 * h * w * c
  per_image += 4 * (sum(spec.dense) + spec.classes)
  return batch * per_image


def augment(key, images_BxHxWxC, pad: int, flip: bool):
  """Random crops from the images zero-padded by ``pad`` pixels, and horizontal flips with probability ½,
  drawn independently per image from ``key`` (identity when ``pad`` is 0 and ``flip`` False)."""
  if not pad and not flip:
    return images_BxHxWxC
  b, h, w, c = images_BxHxWxC.shape
  k_crop, k_flip = jax.random.split(key)
  x = images_BxHxWxC
  if pad:
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets_Bx2 = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets_Bx2)
  if flip:
    flips_B = jax.random.bernoulli(k_flip, 0.5, (b,))
    x = jnp.where(flips_B[:, None, None, None], x[:, :, ::-1], x)
  return x
