"""An imported suite end to end: the per-layer rotation baseline against float64, token corpora, the import
command's refusals, and import -> universal-neurons pass -> report -> ``replay.open`` on tiny random models
(built with ``transformers`` from configs, saved as safetensors; nothing is downloaded)."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from absl import flags  # noqa: E402

from tests.test_imported_models import gpt2_config, neox_config, save_model  # noqa: E402
from universality.engine import replay  # noqa: E402
from universality.engine.families.imported import analysis  # noqa: E402
from universality.engine.families.imported import family  # noqa: E402
from universality.engine.families.imported import models  # noqa: E402
from universality.engine.families.imported import tokens  # noqa: E402
from universality.engine.families.imported import weights  # noqa: E402
from universality.experiments import import_models  # noqa: E402
from universality.kernels import correlation  # noqa: E402
from universality.kernels import screen as screen_lib  # noqa: E402


def run_cli(argv, capsys):
  """``import_models`` in this process: ``(exit status, stderr)``."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["import_models"] + argv)
  try:
    import_models.main(["import_models"])
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The rotation baseline, layer by layer.


def test_per_layer_rotation_baseline_against_float64():
  """Planted activations: run 1 holds run 0's neurons permuted within each layer plus noise. The kernel's
  max and baseline max (each layer's neurons mixed by its own Haar matrix) equal a float64 reference built
  from the same block-diagonal rotations, which are orthogonal and mix no two layers."""
  rng = np.random.default_rng(0)
  s, l, n, t = 2, 3, 8, 400
  mixed = rng.standard_normal((t, l * n)) @ rng.standard_normal((l * n, l * n))
  base = 0.3 * mixed + rng.standard_normal((t, l * n))
  perm = np.concatenate([j * n + rng.permutation(n) for j in range(l)])
  acts = np.stack([base, base[:, perm] + 0.3 * rng.standard_normal((t, l * n))]).astype(np.float32)
  key = jax.random.PRNGKey(3)
  q = np.asarray(correlation.rotations(key, s, l * n, blocks=l), np.float64)
  for j in range(s):
    np.testing.assert_allclose(q[j].T @ q[j], np.eye(l * n), atol=1e-5)
    mask = np.kron(np.eye(l), np.ones((n, n))) > 0
    assert np.all(q[j][~mask] == 0) and np.abs(q[j][mask]).max() > 0.1
  res = correlation.max_correlation(acts, baseline="rotation", key=key, rotation_blocks=l, within=False)
  x = acts.astype(np.float64)

  def corr(a, b):
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    return a.T @ b / len(a)

  for i in range(s):
    for j in range(s):
      if i == j:
        continue
      want_max = corr(x[i], x[j]).max(axis=1)
      want_base = corr(x[i], x[j] @ q[j]).max(axis=1)
      np.testing.assert_allclose(np.asarray(res.max_SxNxS)[i, :, j], want_max, atol=2e-5)
      np.testing.assert_allclose(np.asarray(res.baseline_max_SxNxS)[i, :, j], want_base, atol=2e-5)
  assert np.asarray(res.max_SxNxS)[0, :, 1].min() > 0.9  # the planted matches
  with pytest.raises(correlation.CorrelationError, match="rotation blocks must divide"):
    correlation.rotations(key, s, l * n, blocks=5)


# ---------------------------------------------------------------------------------------------------
# Token corpora.


def _text_files(root, rng):
  words = ["def", "return", "self", "value", "(x)", "=", "+", "if", "else:", "for", "in", "range", "print"]
  os.makedirs(root)
  for f in range(3):
    lines = [" ".join(rng.choice(words, size=rng.integers(2, 9))) for _ in range(120)]
    with open(os.path.join(root, f"f{f}.txt"), "w") as fh:
      fh.write("\n".join(lines) + "\n")


def _bpe(root, path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train([os.path.join(root, f) for f in sorted(os.listdir(root))], trainer)
  tok.save(path)
  return tok


def test_tokenizer_text_and_bin_give_the_same_statistics(tmp_path):
  rng = np.random.default_rng(0)
  _text_files(str(tmp_path / "text"), rng)
  tok_path = str(tmp_path / "tokenizer.json")
  tok = _bpe(str(tmp_path / "text"), tok_path)
  vocab = tok.get_vocab_size()
  model_dir = str(tmp_path / "m")
  save_model(gpt2_config(vocab=vocab + 3, layers=1, d=16, positions=32), model_dir)
  m = weights.open_model(model_dir)
  text = tokens.open_tokens(str(tmp_path / "text"), m.spec.vocab, tok_path)
  assert text.kind == "text" and len(text.ids) > 1000
  text.ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
  np.save(tmp_path / "ids.npy", text.ids.astype(np.int32))
  for name in ("ids.bin", "ids.npy"):
    other = tokens.open_tokens(str(tmp_path / name), m.spec.vocab)
    assert isinstance(other.ids, np.memmap) and other.fingerprint == text.fingerprint
    np.testing.assert_array_equal(np.asarray(other.ids), text.ids)
  newline = tokens.newline_ids(tok_path, m.spec.vocab)
  assert len(newline) and all("\n" in tok.decode([int(i)]) for i in newline)
  drop, notes = tokens.drop_ids("bos,pad,newline", [vocab - 1], tok_path, m.spec.vocab)
  assert not notes and set(newline.tolist()) | {vocab - 1} == set(drop.tolist())

  params = jax.tree.map(lambda x: x[None], m.load())
  settings = dict(family.ANALYSIS_SETTINGS, tokens=1024, context=32, tokenizer=tok_path)
  cfg = _config([m])
  tables = []
  for corpus in (str(tmp_path / "text"), str(tmp_path / "ids.bin")):
    windows, _ = analysis.corpus_windows(cfg, dict(settings, corpus=corpus))
    tables.append(analysis.neuron_table(params, windows, m.spec, jax.random.PRNGKey(0), settings, drop))
  for k in ("pre_mean", "pre_kurtosis", "var_token", "var_prev_token", "var_position"):
    np.testing.assert_array_equal(tables[0][k], tables[1][k])
    assert np.abs(tables[0][k]).max() > 0
  half = analysis.neuron_table(params, windows, m.spec, jax.random.PRNGKey(0),
                               dict(settings, forward_dtype="bfloat16"), drop)
  for k in ("pre_mean", "pre_var", "var_token"):  # a bfloat16 forward: float32 statistics of rounder inputs
    scale = np.abs(tables[0][k]).max()
    assert np.abs(half[k] - tables[0][k]).max() < 0.05 * scale and not np.array_equal(half[k], tables[0][k])
  kept = analysis.neuron_table(params, windows, m.spec, jax.random.PRNGKey(0), settings, [])
  assert not np.array_equal(kept["pre_mean"], tables[0]["pre_mean"])  # the dropped tokens are left out

  # Alphabet neurons: each token's first letter. Every token its own class refines that partition, so the
  # token explains at least the variance its first letter does.
  letters = tokens.letter_classes(tok_path, m.spec.vocab)
  assert letters[tok.token_to_id("def")] == 3 and letters[tok.token_to_id("Ġreturn")] == ord("r") - ord("a")
  fine = dict(settings, unigram_classes=m.spec.vocab)
  both = analysis.neuron_table(params, windows, m.spec, jax.random.PRNGKey(0), fine, drop, letters_V=letters)
  assert both["var_alphabet"].max() > 0.01
  assert np.all(both["var_alphabet"] <= both["var_token"] + 1e-5)


def test_attention_deactivation_equals_zeroed_output_weights(tmp_path):
  """Each candidate's score equals the drop of a later head's attention to the first token when the neuron's
  output weights are zeroed instead (the same ablation by another route); last-layer neurons are not
  scored."""
  save_model(gpt2_config(vocab=61, layers=3, d=16, positions=32, d_mlp=12), str(tmp_path / "m"), noise=0.3)
  m = weights.open_model(str(tmp_path / "m"))
  params = m.load()
  ids = np.random.default_rng(0).integers(0, 61, (2, 32))
  got = analysis.attention_deactivation(jax.tree.map(lambda x: x[None], params), ids, m.spec, candidates=3)[0]
  assert np.isnan(got[-1]).all() and (~np.isnan(got[:-1])).sum(axis=1).tolist() == [3, 3]
  base = np.asarray(models.bos_attention(params, ids, m.spec), np.float64)
  for layer, neuron in zip(*np.nonzero(~np.isnan(got))):
    zeroed = jax.tree.map(np.copy, params)
    zeroed["blocks"]["w_out"][layer, neuron] = 0.0
    drop = base - np.asarray(models.bos_attention(zeroed, ids, m.spec), np.float64)
    np.testing.assert_allclose(got[layer, neuron], drop[layer + 1:].max(), atol=1e-6)
  assert np.nanmax(np.abs(got)) > 1e-3


def test_screened_pass_equals_the_exact_one(tmp_path):
  """The screened correlation (a sample of 512 of 4,096 tokens picks candidates) gives the exact pass's
  maxima, baselines and excess; the neuron statistics do not depend on the window order it reads."""
  for k in range(3):
    save_model(gpt2_config(vocab=61, layers=2, d=32, positions=64, d_mlp=48), str(tmp_path / f"m{k}"), seed=k,
               noise=0.2)
  opened = [weights.open_model(str(tmp_path / f"m{k}")) for k in range(3)]
  loaded = [m.load() for m in opened]
  rng = np.random.default_rng(1)
  loaded[1] = jax.tree.map(lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), loaded[0])
  params = jax.tree.map(lambda *x: np.stack(x), *loaded)  # run 1: run 0 perturbed; run 2 independent
  ids = np.random.default_rng(0).integers(0, 61, (64, 64))
  out = {}
  for mode in ("off", "on"):
    settings = dict(family.ANALYSIS_SETTINGS, screen=mode, screen_tokens=512, attn_candidates=0)
    out[mode] = analysis.neuron_table(params, ids, opened[0].spec, jax.random.PRNGKey(0), settings, [])
  for k in ("max_corr", "baseline_max_corr", "excess", "pre_kurtosis", "var_token"):
    np.testing.assert_allclose(out["on"][k], out["off"][k], atol=2e-5, err_msg=k)
  assert out["off"]["max_corr"][0, :, 1].min() > 0.5 and out["off"]["max_corr"][0, :, 2].max() < 0.5
  assert "screen_settled" in out["on"] and "screen_settled" not in out["off"]
  assert (out["on"]["screen_settled"] != screen_lib.SETTLED_EXACT).any()  # the screen did settle rows


def _config(opened):
  from universality.engine.families.imported import suite  # pylint: disable=import-outside-toplevel
  return suite.config_for(opened)


def test_bad_corpora_and_model_directories_one_line_exit_2_nothing_written(tmp_path, capsys):
  save_model(gpt2_config(vocab=61, positions=32), str(tmp_path / "a-x1"))
  save_model(gpt2_config(vocab=61, positions=32), str(tmp_path / "b-x2"), seed=1)
  save_model(gpt2_config(vocab=61, positions=32, d_mlp=28), str(tmp_path / "wide-x3"))
  save_model(neox_config(vocab=61), str(tmp_path / "neox"))
  pickled = save_model(gpt2_config(vocab=61, positions=32), str(tmp_path / "pickled"))
  os.remove(tmp_path / "pickled" / "model.safetensors")
  torch.save(pickled.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
  np.asarray([1, 2, 61, 3], np.uint16).tofile(tmp_path / "oov.bin")
  (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03\x00")
  np.save(tmp_path / "float.npy", np.arange(100, dtype=np.float32))
  (tmp_path / "empty.bin").write_bytes(b"")
  np.arange(60, dtype=np.uint16).tofile(tmp_path / "good.bin")
  np.save(tmp_path / "obj.npy", np.asarray([{"a": 1}], dtype=object), allow_pickle=True)
  good = f"{tmp_path / 'a-x1'},{tmp_path / 'b-x2'}"
  cases = [
      (["--models=" + good, f"--corpus={tmp_path / 'oov.bin'}"], "token id 61 at position 2 is outside"),
      (["--models=" + good, f"--corpus={tmp_path / 'odd.bin'}", "--dtype=uint32"],
       "not a whole number of uint32 ids: wrong dtype"),
      (["--models=" + good, f"--corpus={tmp_path / 'odd.bin'}", "--dtype=float32"],
       "must be uint16 or uint32"),
      (["--models=" + good, f"--corpus={tmp_path / 'float.npy'}"],
       "float32 values: token ids must be integers"),
      (["--models=" + good, f"--corpus={tmp_path / 'empty.bin'}"], "is empty"),
      (["--models=" + good, f"--corpus={tmp_path / 'obj.npy'}"], "not a plain .npy array"),
      (["--models=" + good, f"--corpus={tmp_path / 'good.bin'}", "--forward_dtype=int8"],
       "forward_dtype: must be one of float32, bfloat16, float16"),
      (["--models=" + good, f"--corpus={tmp_path / 'good.bin'}", "--drop=bos,eos"], "'eos' is not one of"),
      (["--models=" + good, f"--corpus={tmp_path / 'good.bin'}", "--context=64"], "context: must lie in"),
      (["--models=" + good, f"--corpus={tmp_path / 'good.bin'}", "--memory_gb=1000000"],
       "the pass needs about 1073.*GB, more than the"),
      ([f"--models={tmp_path / 'pickled'}"], r"pytorch_model.bin\), which are never unpickled here; convert"),
      ([f"--models={tmp_path / 'a-x1'},{tmp_path / 'wide-x3'}"],
       "mismatched architectures: .*wide-x3 has d_mlp=28"),
      ([f"--models={tmp_path / 'a-x1'},{tmp_path / 'neox'}"],
       "mismatched architectures: .*neox has arch='neox'"),
      ([f"--models={tmp_path / 'a-x1'},{tmp_path / 'nowhere'}"], "no such model directory"),
  ]
  capsys.readouterr()
  for argv, message in cases:
    work = tmp_path / "w"
    code, err = run_cli([f"--workdir={work}", "--noprogress"] + argv, capsys)
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), (argv, err)
    assert not work.exists(), argv


# ---------------------------------------------------------------------------------------------------
# End to end.


def test_import_pass_report_replay_identical_and_independent_models(tmp_path, capsys):
  """Three models: A, an identical copy of A, and B initialised independently (wide enough layers that a
  rotation of one model's neurons matches none of them: d_model = d_mlp = 512)."""
  cfg = gpt2_config(vocab=1021, layers=1, d=512, heads=4, positions=64, d_mlp=512)
  save_model(cfg, str(tmp_path / "a-x21"), seed=0, noise=0.05)
  shutil.copytree(tmp_path / "a-x21", tmp_path / "a-copy-x49")
  save_model(cfg, str(tmp_path / "b-x81"), seed=1, noise=0.05)
  ids = np.random.default_rng(0).integers(0, 1021, 4096).astype(np.uint16)
  ids.tofile(tmp_path / "ids.bin")
  capsys.readouterr()
  work = tmp_path / "suite"
  dirs = [str(tmp_path / d) for d in ("a-x21", "a-copy-x49", "b-x81")]
  code, err = run_cli([f"--workdir={work}", "--noprogress", "--models=" + ",".join(dirs),
                       f"--corpus={tmp_path / 'ids.bin'}", "--tokens=4096", "--batch_windows=16"], capsys)
  assert code == 0, err
  rows = json.loads((work / "runs.json").read_text())
  assert [r["model"] for r in rows] == ["a-x21", "a-copy-x49", "b-x81"]
  assert [r["seed_label"] for r in rows] == ["x21", "x49", "x81"]
  names = ("pythia-160m-data-seed3", "pythia-160m-weight-seed1", "pythia-160m", "alias-gpt2-small-x343")
  assert [family.seed_label(n, 4) for n in names] == ["data-seed3", "weight-seed1", "run4", "x343"]
  report = (work / "report" / "index.md").read_text()
  assert "Run 0 against each other run" in report and "universal, all pairs" in report

  run = replay.open(str(work))
  assert type(run).__module__.endswith("imported.view") and run.steps == [0]
  probe = ids[:100].astype(np.int64)
  acts = run.activations(probe)
  assert acts["mlp_post"].shape == (3, 100, 1, 512)
  b = weights.open_model(dirs[2])
  _, direct = models.apply(b.load(), probe[None, :64], b.spec)
  np.testing.assert_allclose(acts["mlp_post"][2, :64], np.asarray(direct["mlp_post"])[0], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(acts["mlp_post"][0], acts["mlp_post"][1])

  table = run.neurons()
  arrays = run.summary()["cohorts"]
  assert list(arrays) == ["imported/gpt2"]
  live = ~table["dead"]
  assert live.sum() > 0.9 * live.size
  entry = run.cohort_summary()
  from universality.engine import rundir  # pylint: disable=import-outside-toplevel
  m = rundir.read_cohort_arrays(str(work), entry["cohort"], (3,))
  excess_ab = (m["max_corr"] - m["baseline_max_corr"])
  same = excess_ab[0, :, 1][live[0].reshape(-1)]
  other = excess_ab[0, :, 2][live[0].reshape(-1)]
  assert same.min() > 0.5  # identical models: every live neuron universal
  assert (other > 0.5).mean() < 0.01  # independent ones: near none
  # All pairs: each of A's neurons has excess (same + other) / 2; the paper's comparison for run 0 the same.
  np.testing.assert_allclose(table["excess"][0].reshape(-1)[live[0].reshape(-1)], (same + other) / 2,
                             atol=1e-5)
  np.testing.assert_allclose(table["excess_paper"][0], table["excess"][0], atol=1e-6)
  run.close()

  # Again on the same directory and models: nothing imported again, the analysis rerun.
  before = sorted(os.listdir(work / "checkpoints" / "0"))
  code, err = run_cli([f"--workdir={work}", "--noprogress", "--models=" + ",".join(dirs), "--analyze=false"],
                      capsys)
  assert code == 0 and sorted(os.listdir(work / "checkpoints" / "0")) == before
  code, err = run_cli([f"--workdir={work}", "--noprogress", "--models=" + ",".join(dirs[:2])], capsys)
  assert code == 2 and "belongs to a different config" in err
