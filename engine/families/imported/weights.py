"""Hugging Face-format model directories read without PyTorch: ``config.json`` and safetensors weights.

A directory holds ``config.json`` and ``model.safetensors``, or shards named by
``model.safetensors.index.json``. Weights are read with ``safetensors``' NumPy API, tensor by tensor (each a
memory map of its file), converted to float32 and mapped onto the layout of
``universality.engine.families.imported.models``. Pickled checkpoints (``pytorch_model.bin``, ``*.pt``) are
never opened: a directory that holds only those is refused with the command that converts it.

``open_model(path)`` reads a directory's config and the names, shapes and dtypes of its tensors (no
weights); ``Model.load()`` returns its parameters; ``Model.tensor(name, layer)`` one parameter of one layer,
as the importer streams them into the stacked suite (``universality.engine.families.imported.suite``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from universality.engine.families.imported import models


class ModelDirError(ValueError):
  """A model directory that cannot be imported; the message is one line."""


CONVERT_HINT = ("convert it once where PyTorch is installed: python -c \"import transformers as t; "
                "t.AutoModelForCausalLM.from_pretrained('DIR')"
                ".save_pretrained('DIR', safe_serialization=True)\"")
# The model directory's config file (Hugging Face's name; the run directory's own names belong to
# universality.engine.rundir alone).
HF_CONFIG = os.extsep.join(("config", "json"))
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "neox"}
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _cfg_get(cfg: dict, *names, default=None):
  for name in names:
    if cfg.get(name) is not None:
      return cfg[name]
  return default


def spec_from_config(cfg: dict, where: str) -> models.Spec:
  """The ``models.Spec`` of a Hugging Face ``config.json`` (GPT2LMHeadModel or GPTNeoXForCausalLM)."""
  archs = cfg.get("architectures") or []
  arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
  if arch is None:
    arch = {"gpt2": "gpt2", "gpt_neox": "neox"}.get(cfg.get("model_type"))
  if arch is None:
    raise ModelDirError(f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported "
                       f"(supported: {', '.join(_ARCHITECTURES)})")
  try:
    if arch == "gpt2":
      if not cfg.get("scale_attn_weights", True):
        raise ModelDirError(f"{where}: scale_attn_weights=false is not supported")
      d = int(cfg["n_embd"])
      act = cfg.get("activation_function", "gelu_new")
      spec = dict(arch=arch, vocab=int(cfg["vocab_size"]), n_layers=int(cfg["n_layer"]), d_model=d,
                  n_heads=int(cfg["n_head"]), d_mlp=int(cfg.get("n_inner") or 4 * d),
                  context=int(cfg["n_positions"]), ln_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                  tied=bool(cfg.get("tie_word_embeddings", True)),
                  scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)))
    else:
      d, h = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
      rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
      if rope.get("rope_type", "default") != "default":
        raise ModelDirError(f"{where}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
      pct = float(_cfg_get(rope, "partial_rotary_factor", default=_cfg_get(cfg, "rotary_pct", default=0.25)))
      base = float(_cfg_get(rope, "rope_theta", default=_cfg_get(cfg, "rotary_emb_base", "rope_theta",
                                                                   default=10000.0)))
      act = cfg.get("hidden_act", "gelu")
      spec = dict(arch=arch, vocab=int(cfg["vocab_size"]), n_layers=int(cfg["num_hidden_layers"]), d_model=d,
                  n_heads=h, d_mlp=int(cfg["intermediate_size"]), context=int(cfg["max_position_embeddings"]),
                  ln_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                  tied=bool(cfg.get("tie_word_embeddings", False)),
                  rotary_dims=int((d // h) * pct), rotary_base=base,
                  parallel_residual=bool(cfg.get("use_parallel_residual", True)))
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ModelDirError):
      raise
    raise ModelDirError(f"{where}: config.json lacks or mangles {e}") from None
  if act not in _ACTIVATIONS:
    raise ModelDirError(f"{where}: activation {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
  spec["activation"] = _ACTIVATIONS[act]
  out = models.Spec(**spec)
  if out.d_model % out.n_heads or min(out.vocab, out.n_layers, out.d_model, out.d_mlp, out.context) < 1:
    raise ModelDirError(f"{where}: inconsistent sizes in config.json ({out})")
  if out.rotary_dims % 2:
    raise ModelDirError(f"{where}: rotary dimensions per head must be even, got {out.rotary_dims}")
  return out


# For each parameter of our layout: the Hugging Face tensor name (``{l}``: the layer) and the map from that
# tensor to ours. NeoX's fused qkv is [heads, 3, d_head] along its output axis; ours is [3, heads, d_head].
def _neox_qkv_weight(x, spec):
  h, e, d = spec.n_heads, spec.d_head, spec.d_model
  return x.reshape(h, 3, e, d).transpose(1, 0, 2, 3).reshape(3 * d, d).T


def _neox_qkv_bias(x, spec):
  h, e, d = spec.n_heads, spec.d_head, spec.d_model
  return x.reshape(h, 3, e).transpose(1, 0, 2).reshape(3 * d)


_same = lambda x, spec: x
_transpose = lambda x, spec: x.T

_GPT2 = {"embed": ("wte.weight", _same), "pos": ("wpe.weight", _same), "lnf_g": ("ln_f.weight", _same),
         "lnf_b": ("ln_f.bias", _same), "unembed": ("lm_head.weight", _transpose),
         "ln1_g": ("h.{l}.ln_1.weight", _same), "ln1_b": ("h.{l}.ln_1.bias", _same),
         "ln2_g": ("h.{l}.ln_2.weight", _same), "ln2_b": ("h.{l}.ln_2.bias", _same),
         "w_qkv": ("h.{l}.attn.c_attn.weight", _same), "b_qkv": ("h.{l}.attn.c_attn.bias", _same),
         "w_o": ("h.{l}.attn.c_proj.weight", _same), "b_o": ("h.{l}.attn.c_proj.bias", _same),
         "w_in": ("h.{l}.mlp.c_fc.weight", _same), "b_in": ("h.{l}.mlp.c_fc.bias", _same),
         "w_out": ("h.{l}.mlp.c_proj.weight", _same), "b_out": ("h.{l}.mlp.c_proj.bias", _same)}
_NEOX = {"embed": ("embed_in.weight", _same), "lnf_g": ("final_layer_norm.weight", _same),
         "lnf_b": ("final_layer_norm.bias", _same), "unembed": ("embed_out.weight", _transpose),
         "ln1_g": ("layers.{l}.input_layernorm.weight", _same),
         "ln1_b": ("layers.{l}.input_layernorm.bias", _same),
         "ln2_g": ("layers.{l}.post_attention_layernorm.weight", _same),
         "ln2_b": ("layers.{l}.post_attention_layernorm.bias", _same),
         "w_qkv": ("layers.{l}.attention.query_key_value.weight", _neox_qkv_weight),
         "b_qkv": ("layers.{l}.attention.query_key_value.bias", _neox_qkv_bias),
         "w_o": ("layers.{l}.attention.dense.weight", _transpose),
         "b_o": ("layers.{l}.attention.dense.bias", _same),
         "w_in": ("layers.{l}.mlp.dense_h_to_4h.weight", _transpose),
         "b_in": ("layers.{l}.mlp.dense_h_to_4h.bias", _same),
         "w_out": ("layers.{l}.mlp.dense_4h_to_h.weight", _transpose),
         "b_out": ("layers.{l}.mlp.dense_4h_to_h.bias", _same)}
_PREFIX = {"gpt2": "transformer.", "neox": "gpt_neox."}
_HEAD = ("lm_head.weight", "embed_out.weight")  # stored outside the base model's prefix
_OPTIONAL_BIASES = ("b_qkv", "b_o")  # NeoX with attention_bias=false has none: zeros


@dataclasses.dataclass
class Model:
  """One model directory: its config, architecture and tensor index (names to shard files), no weights.

  Attributes:
    path: the directory.
    name: its base name (the run's name).
    name_or_path: config.json's ``_name_or_path`` ("" when absent).
    spec: the architecture.
    files: tensor name (without the base model's prefix) -> (file, stored name, shape, dtype).
    special_ids: the BOS, EOS and pad token ids config.json names.
  """
  path: str
  name: str
  name_or_path: str
  spec: models.Spec
  files: dict[str, tuple[str, str, tuple[int, ...], str]]
  special_ids: tuple[int, ...] = ()

  def _entry(self, key: str, layer: int | None):
    table = _GPT2 if self.spec.arch == "gpt2" else _NEOX
    hf, convert = table[key]
    return hf.format(l=layer), convert

  def expected_shape(self, key: str) -> tuple[int, ...]:
    """The Hugging Face shape of one layer's tensor of parameter ``key``."""
    shape = models.param_shapes(self.spec)
    shape = shape["blocks"][key][1:] if key in shape["blocks"] else shape[key]
    transposed = (self.spec.arch == "neox" and key in ("w_qkv", "w_o", "w_in", "w_out", "unembed")) or \
        (self.spec.arch == "gpt2" and key == "unembed")
    return tuple(reversed(shape)) if transposed else tuple(shape)

  def check(self) -> None:
    """Every tensor the architecture needs is present with its shape (from the headers; no data read)."""
    for key, layer in plan(self.spec):
      hf, _ = self._entry(key, layer)
      if hf not in self.files:
        if key in _OPTIONAL_BIASES:
          continue
        raise ModelDirError(f"{self.path}: tensor {hf!r} is missing from its safetensors")
      _, _, shape, dtype = self.files[hf]
      want = self.expected_shape(key)
      if shape != want:
        raise ModelDirError(f"{self.path}: tensor {hf!r} has shape {list(shape)}, config.json implies "
                            f"{list(want)}")
      if dtype not in ("F32", "F16", "BF16", "F64"):
        raise ModelDirError(f"{self.path}: tensor {hf!r} has dtype {dtype}, expected a float")

  def tensor(self, key: str, layer: int | None) -> np.ndarray:
    """Parameter ``key`` (of ``layer`` for block parameters) in our layout, float32."""
    from safetensors import safe_open  # a run-time dependency of importing only
    hf, convert = self._entry(key, layer)
    if hf not in self.files:  # an optional bias (checked by ``check``)
      return np.zeros(models.param_shapes(self.spec)["blocks"][key][1:], np.float32)
    file, stored, _, _ = self.files[hf]
    with safe_open(file, framework="numpy") as f:
      x = f.get_tensor(stored)
    return np.ascontiguousarray(convert(np.asarray(x, np.float32), self.spec))

  def load(self) -> dict[str, Any]:
    """The whole model's parameters (one model, no run axis), float32 numpy."""
    shapes = models.param_shapes(self.spec)
    out: dict[str, Any] = {k: None for k in shapes if k != "blocks"}
    out["blocks"] = {k: np.zeros(v, np.float32) for k, v in shapes["blocks"].items()}
    for key, layer in plan(self.spec):
      if layer is None:
        out[key] = self.tensor(key, None)
      else:
        out["blocks"][key][layer] = self.tensor(key, layer)
    return out


def plan(spec: models.Spec) -> list[tuple[str, int | None]]:
  """``(parameter, layer)`` in the order the importer reads them: top-level parameters, then each block
  parameter layer by layer (``layer`` None for top-level ones)."""
  shapes = models.param_shapes(spec)
  top = [(k, None) for k in shapes if k != "blocks"]
  return top + [(k, layer) for k in shapes["blocks"] for layer in range(spec.n_layers)]


def _pickled(path: str) -> list[str]:
  return sorted(f for f in os.listdir(path) if f.endswith(_PICKLED) and not f.startswith("."))


def _safetensor_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      raise ModelDirError(f"{path}: model.safetensors.index.json is not a safetensors index") from None
    for name in files:
      if os.path.basename(name) != name or not os.path.isfile(os.path.join(path, name)):
        raise ModelDirError(f"{path}: shard {name!r} named by model.safetensors.index.json is missing")
    return [os.path.join(path, name) for name in files]
  single = os.path.join(path, "model.safetensors")
  return [single] if os.path.isfile(single) else []


def open_model(path: str, read_header: Callable | None = None) -> Model:
  """The model directory ``path``: config, architecture and tensor index (module docstring). Raises
  ModelDirError (one line) for a missing directory or config, an unsupported architecture, pickled weights
  only, or unreadable safetensors."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise ModelDirError(f"{path}: no such model directory")
  config_file = os.path.join(path, HF_CONFIG)
  try:
    with open(config_file) as f:
      cfg = json.load(f)
    if not isinstance(cfg, dict):
      raise ValueError
  except FileNotFoundError:
    raise ModelDirError(f"{path}: no config.json (a Hugging Face model directory holds one)") from None
  except (OSError, ValueError):
    raise ModelDirError(f"{path}: config.json is not a JSON object") from None
  spec = spec_from_config(cfg, path)
  files = _safetensor_files(path)
  if not files:
    pickled = _pickled(path)
    if pickled:
      raise ModelDirError(f"{path}: holds only pickled weights ({pickled[0]}), which are never unpickled "
                          "here; " + CONVERT_HINT.replace("DIR", path))
    raise ModelDirError(f"{path}: no model.safetensors (nor a sharded index) in the directory")
  from safetensors import safe_open
  table: dict[str, tuple[str, str, tuple[int, ...], str]] = {}
  prefix = _PREFIX[spec.arch]
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for stored in f.keys():
          s = f.get_slice(stored)
          name = stored[len(prefix):] if stored.startswith(prefix) and stored not in _HEAD else stored
          table[name] = (file, stored, tuple(int(n) for n in s.get_shape()), str(s.get_dtype()))
    except Exception as e:  # safetensors raises its own error types for a damaged header
      reason = str(e).splitlines()[0][:120]
      raise ModelDirError(f"{file}: not a readable safetensors file ({reason})") from None
  model = Model(path=path, name=os.path.basename(path.rstrip(os.sep)),
                name_or_path=str(cfg.get("_name_or_path", "")), spec=spec, files=table,
                special_ids=_special_ids(cfg))
  model.check()
  return model


def _special_ids(cfg: dict) -> tuple[int, ...]:
  """BOS, EOS and pad ids named by a config.json (the tokens Gurnee et al. dropped from the statistics)."""
  out: list[int] = []
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    v = cfg.get(key)
    for x in (v if isinstance(v, list) else [v]):
      if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x not in out:
        out.append(x)
  return tuple(out)


def first_difference(a: Model, b: Model) -> str | None:
  """The first field in which two models' architectures differ, as a phrase; None when they agree."""
  for name in models.FIELDS:
    x, y = getattr(a.spec, name), getattr(b.spec, name)
    if x != y:
      return f"{b.path} has {name}={y!r}, {a.path} has {name}={x!r}"
  return None
