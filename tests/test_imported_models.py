"""universality.engine.families.imported.models and .weights against PyTorch (transformers) on tiny random
models.

Each model is built from a config with ``transformers`` (no download), every parameter perturbed so that
zero biases and unit gains hide no wrong term, saved with ``save_pretrained(safe_serialization=True)`` into a
temporary directory, read back by ``weights.open_model`` (safetensors, no torch) and run by our JAX
functions. Logits and every layer's post-GELU activations (``mlp.act``'s output, TransformerLens'
``hook_post``) must equal PyTorch's within 1e-5 of each array's scale in float32.
"""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from universality.engine.families.imported import models  # noqa: E402
from universality.engine.families.imported import weights  # noqa: E402

_RTOL = 1e-5


def gpt2_config(vocab=61, layers=2, d=16, heads=4, positions=20, tied=True, scale_by_layer=False, d_mlp=24):
  return transformers.GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=d, n_layer=layers,
                                 n_head=heads, n_inner=d_mlp, activation_function="gelu_new",
                                 tie_word_embeddings=tied,
                                 scale_attn_by_inverse_layer_idx=scale_by_layer, resid_pdrop=0.0,
                                 bos_token_id=None, eos_token_id=None,
                                 embd_pdrop=0.0, attn_pdrop=0.0)


def neox_config(vocab=53, layers=2, d=16, heads=2, rotary_pct=0.25, parallel=True, tied=False):
  return transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=40, rotary_pct=rotary_pct,
                                    rotary_emb_base=10000, max_position_embeddings=32, hidden_act="gelu",
                                    use_parallel_residual=parallel, tie_word_embeddings=tied,
                                    hidden_dropout=0.0, attention_dropout=0.0)


def save_model(config, path, seed=0, noise=0.1):
  """A random model of ``config`` with every parameter perturbed, saved as safetensors in ``path``."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(noise * torch.randn_like(p))
  model.save_pretrained(path, safe_serialization=True)
  return model


def torch_forward(model, tokens_BxT):
  """Logits ``[B, T, V]``, post-GELU activations ``[B, T, L, N]`` and each head's mean attention to position 0
  from the later queries ``[L, H]`` of a PyTorch model."""
  posts = []
  blocks = model.transformer.h if hasattr(model, "transformer") else model.gpt_neox.layers
  hooks = [b.mlp.act.register_forward_hook(lambda m, i, o: posts.append(o.detach().numpy())) for b in blocks]
  with torch.no_grad():
    out = model(torch.as_tensor(tokens_BxT, dtype=torch.long), output_attentions=True)
  for h in hooks:
    h.remove()
  bos = np.stack([a.numpy()[:, :, 1:, 0].mean(axis=(0, 2)) for a in out.attentions])
  return out.logits.numpy(), np.stack(posts, axis=2), bos


def _close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = float(np.max(np.abs(expected)))
  assert scale > 1e-3, what  # never a comparison of zeros
  err = float(np.max(np.abs(actual - expected)))
  assert err <= _RTOL * scale, f"{what}: max error {err:.3g} > {_RTOL:g} x {scale:.3g}"


CASES = {  # vocabularies not a multiple of 8; GPT-2 as the Stanford CRFM seeds configure it
    "gpt2_layer_scaled": lambda: gpt2_config(vocab=61, layers=3, scale_by_layer=True),
    "neox_partial_rotary_untied": lambda: neox_config(),
    "neox_full_rotary_sequential_tied": lambda: neox_config(vocab=45, layers=3, rotary_pct=1.0,
                                                            parallel=False, tied=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_activations_equal_pytorch(case, tmp_path):
  config = CASES[case]()
  path = str(tmp_path / case)
  model = save_model(config, path, seed=len(case))
  assert not any(f.endswith(".bin") for f in os.listdir(path))
  m = weights.open_model(path)
  assert m.spec.vocab % 8 != 0
  if case.startswith("neox"):
    assert m.spec.rotary_dims == int(m.spec.d_head * config.rope_parameters["partial_rotary_factor"])
    assert not m.spec.tied or case.endswith("tied")
  params = m.load()
  tokens = np.random.default_rng(1).integers(0, m.spec.vocab, (3, 11))
  want_logits, want_post, want_bos = torch_forward(model, tokens)
  # Two runs stacked over the leading axis: each must be the model.
  params_S = jax.tree.map(lambda x: np.stack([x, x]), params)
  logits, acts = jax.jit(models.apply_stacked, static_argnums=2)(params_S, tokens, m.spec)
  for s in range(2):
    _close(logits[s], want_logits, f"{case} logits run {s}")
    _close(acts["mlp_post"][s], want_post, f"{case} mlp_post run {s}")
  np.testing.assert_allclose(np.asarray(acts["mlp_post"]),
                             np.asarray(models.gelu(acts["mlp_pre"], m.spec.activation)),
                             rtol=1e-6, atol=1e-7)
  assert acts["mlp_pre"].shape == (2, 3, 11, m.spec.n_layers, m.spec.d_mlp)
  _close(models.bos_attention(params, tokens, m.spec), want_bos, f"{case} attention to position 0")


def test_sharded_safetensors_and_fp16(tmp_path):
  """A model saved in float16 in several shards reads as the same float32 numbers."""
  model = save_model(neox_config(), str(tmp_path / "full"), seed=3)
  model.half().save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="2KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  a = weights.open_model(str(tmp_path / "full")).load()
  b = weights.open_model(str(tmp_path / "sharded")).load()
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=2e-3, atol=2e-3)


def test_refusals(tmp_path):
  """Pickled weights only, a wrong tensor shape, an unsupported architecture: one line each."""
  model = save_model(gpt2_config(), str(tmp_path / "pickled"))
  os.remove(tmp_path / "pickled" / "model.safetensors")
  torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
  with pytest.raises(weights.ModelDirError, match=r"pytorch_model.bin.*never unpickled.*safe_serialization"):
    weights.open_model(str(tmp_path / "pickled"))
  save_model(gpt2_config(), str(tmp_path / "bad"))
  cfg_file = tmp_path / "bad" / "config.json"
  cfg_file.write_text(cfg_file.read_text().replace('"n_inner": 24', '"n_inner": 28'))
  with pytest.raises(weights.ModelDirError, match=r"c_fc.weight' has shape \[16, 24\], config.json implies"):
    weights.open_model(str(tmp_path / "bad"))
  cfg_file.write_text(cfg_file.read_text().replace("GPT2LMHeadModel", "LlamaForCausalLM").replace(
      '"model_type": "gpt2"', '"model_type": "llama"'))
  with pytest.raises(weights.ModelDirError, match="LlamaForCausalLM.*not supported"):
    weights.open_model(str(tmp_path / "bad"))
