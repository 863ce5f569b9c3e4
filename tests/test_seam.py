"""The task-family seam and the run-directory contract: layering, golden numbers, cohorts, old formats."""

import ast
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from universality.engine import checkpoint, config as config_lib, launch, replay, rundir, train
from tests.helpers import group_config, set_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "kernels", "experiments")


# ---------------------------------------------------------------------------------------------------
# Layering.


def _modules() -> dict[str, str]:
  """Dotted module name -> file, for every module of the project's packages."""
  out = {}
  for pkg in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
          rel = "universality." + rel
          out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
  return out


def _import_graph() -> dict[str, set[str]]:
  """Every import (module level or not) of one project module by another."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(open(path).read())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
      for t in targets:
        while t and t not in modules:
          t = t.rpartition(".")[0]
        if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
          graph[name].add(t)
  return graph


# The modules that load a family's hook by its module path (importlib), and which hook each loads.
HOOK_LOADERS = {"analysis_module": "universality.engine.analysis.driver",
                "report_module": "universality.engine.report",
                "view_module": "universality.engine.replay"}


def _hook_edges(overrides=None) -> set[tuple[str, str]]:
  """Import edges hidden in hook strings: ``families.get`` loads each family package, and each loader of
  ``HOOK_LOADERS`` the module its family names (``overrides``: {(family, hook): module} planted by a test)."""
  from universality.engine import families  # pylint: disable=import-outside-toplevel
  edges = set()
  for name in families.NAMES:
    edges.add(("universality.engine.families", f"universality.engine.families.{name}"))
    for hook, loader in HOOK_LOADERS.items():
      module = (overrides or {}).get((name, hook), getattr(families.get(name), hook))
      edges.add((loader, module.partition(":")[0]))
  return edges


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}

  def visit(m, path):
    state[m] = 1
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return path[path.index(n):] + [n]
      if n not in state:
        found = visit(n, path + [n])
        if found:
          return found
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m, [m])
      if found:
        return found
  return None


def _graph_with_hooks(overrides=None) -> dict[str, set[str]]:
  graph = _import_graph()
  for a, b in _hook_edges(overrides):
    assert a in graph and b in graph, (a, b)
    graph[a].add(b)
  return graph


def test_no_import_cycle_through_imports_or_hook_strings():
  cycle = _find_cycle(_graph_with_hooks())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_loop_planted_through_a_hook_string_is_found():
  # The report loads the family's report module by name; a report module that imports the report writer
  # back (here: the launcher, which imports it) closes a loop no import statement shows.
  planted = {("group", "report_module"): "universality.engine.launch"}
  assert _find_cycle(_import_graph()) is None
  cycle = _find_cycle(_graph_with_hooks(planted))
  assert cycle is not None and "universality.engine.report" in cycle and "universality.engine.launch" in cycle


def test_every_importlib_site_is_a_known_hook_loader():
  """A new importlib site would hide edges from the cycle test: it must be listed above."""
  sites = set()
  for name, path in _modules().items():
    if "importlib" in open(path).read():
      sites.add(name)
  assert sites <= set(HOOK_LOADERS.values()) | {"universality.engine.families"}, sites


def test_nothing_below_the_launcher_imports_it():
  graph = _import_graph()
  importers = sorted(m for m, deps in graph.items() if "universality.engine.launch" in deps)
  assert all(m.startswith("universality.experiments") for m in importers), importers


def test_passes_and_trainer_load_no_io_or_plotting():
  code = ("import sys, universality.engine.families.group.passes.representation, universality.engine.analysis.cross_seed, universality.engine.families.group.passes.cosets, "
          "universality.engine.families.group.passes.margins, universality.engine.families.group.passes.connectivity, universality.engine.families.group.passes.redundancy, "
          "universality.engine.train; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'matplotlib', 'tensorstore'}))")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == "[]"


def _sources(*folders):
  for folder in folders:
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      for f in files:
        if f.endswith(".py"):
          yield os.path.join(dirpath, f)


def test_run_directory_names_and_model_branches_have_one_owner():
  names = ['"config.json"', '"runs.json"', '"metrics.jsonl"', '"summary.json"', '"checkpoints"']
  for path in _sources("engine", "experiments"):
    text = open(path).read()
    rel = os.path.relpath(path, ROOT)
    if rel != os.path.join("engine", "rundir.py"):
      assert not [n for n in names if n in text], f"{rel} names a run-directory file"
    if not rel.startswith(os.path.join("engine", "families")):
      assert "model ==" not in text and "model.name ==" not in text, f"{rel} branches on the model"


# ---------------------------------------------------------------------------------------------------
# The small study pinned before the seam: same parameters, same analysis numbers.


def _golden_config(model):
  cfg = group_config(groups="C5,S3", model=model, embed_dim=8, hidden=16, d_model=16, n_heads=2, d_mlp=16,
                     lr="1e-2", train_frac="0.6")
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 3, 60, 20, 3
  return cfg


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_small_study_equals_the_numbers_pinned_before_the_seam(tmp_path, model):
  gold = json.load(open(os.path.join(ROOT, "tests", "data", "golden_small_study.json")))[model]
  gold_params = np.load(os.path.join(ROOT, "tests", "data", f"golden_{model}_params.npz"))
  cfg = _golden_config(model)
  launch.run_study(cfg, str(tmp_path), progress=False)
  trainer = train.make_train(cfg)
  with checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
    step, state = ckpt.restore(train.host_state_spec(trainer), fallback=False)
  assert step == gold["step"]
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert len(leaves) == len(gold_params.files)
  for path, value in leaves:
    # Bitwise on the machine that pinned them; across CPU kinds XLA may round differently.
    np.testing.assert_allclose(np.asarray(value), gold_params[jax.tree_util.keystr(path).replace("'", "")],
                               rtol=1e-4, atol=1e-5)
  summary = json.load(open(tmp_path / "analysis" / "summary.json"))
  for rec, ref in zip(summary["runs"], gold["runs"]):
    assert rec["key_irreps"] == ref["key_irreps"]
    for k in ("fraction_explained", "loss_all", "accuracy_all"):
      assert rec[k] == pytest.approx(ref[k], abs=1e-4)
    for name, v in ref["logit_similarity"].items():
      assert rec["logit_similarity"][name] == pytest.approx(v, abs=1e-4)
  assert len(summary["cohorts"]) == len(gold["groups"])
  for (cohort, entry), (spec, ref) in zip(summary["cohorts"].items(), gold["groups"].items()):
    assert cohort.startswith(spec + "/")
    agg = entry["aggregate"]
    np.testing.assert_allclose(np.array(agg["cka"], float), np.array(ref["cka"], float), atol=1e-4)
    np.testing.assert_allclose(np.array(agg["matching"]["mean_matched_corr"], float),
                               np.array(ref["matching"], float), atol=1e-4)
    assert agg["correlation"]["mean_max"] == pytest.approx(ref["mean_max"], abs=1e-4)
    # The rotation baseline is a random draw keyed by the cohort's name (it was keyed by the group's
    # position in the launch): the same statistic, a different sample.
    assert agg["correlation"]["mean_baseline_max"] == pytest.approx(ref["mean_baseline_max"], abs=0.1)


# ---------------------------------------------------------------------------------------------------
# Cohorts, execution settings, older run directories.


def _small(**fields):
  cfg = group_config(groups="C5", embed_dim=8, hidden=12, train_frac="0.6", **fields)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 3, 40, 20, 3
  return cfg


def test_two_learning_rates_are_two_cohorts_equal_to_separate_launches(tmp_path):
  both = launch.run_study(_small(lr="1e-2,3e-2"), str(tmp_path / "both"), progress=False)["summary"]
  assert list(both["cohorts"]) == ["C5/lr0.01/wd1/frac0.6", "C5/lr0.03/wd1/frac0.6"]
  for lr in ("1e-2", "3e-2"):
    alone = launch.run_study(_small(lr=lr), str(tmp_path / lr), progress=False)["summary"]
    (name, entry), = alone["cohorts"].items()
    mixed = both["cohorts"][name]
    assert mixed["aggregate"] == entry["aggregate"]  # bit for bit: every cross-seed number
    assert mixed["task"] == entry["task"]
    assert len(mixed["runs"]) == 3
    for i, j in zip(mixed["runs"], entry["runs"]):
      a, b = dict(both["runs"][i]), dict(alone["runs"][j])
      a.pop("index"), b.pop("index")
      assert a == b
  # Each cohort's matrices are over its own three seeds only.
  for entry in both["cohorts"].values():
    assert np.asarray(entry["aggregate"]["cka"]).shape == (3, 3)


def test_execution_settings_do_not_change_a_studys_identity(tmp_path):
  cfg = _small(lr="1e-2")
  launch.run_study(cfg, str(tmp_path), progress=False, analyze=False)
  stored = json.load(open(tmp_path / "config.json"))
  assert stored["format_version"] == rundir.FORMAT_VERSION and "exec" not in stored["config"]
  again = set_fields(_small(lr="1e-2"), run_chunk=3, analyze=False)
  out = launch.run_study(again, str(tmp_path), progress=False)  # resumes instead of being refused
  assert out["step"] == cfg.steps
  with pytest.raises(launch.LaunchError, match="differs in: opt.lr"):
    launch.run_study(_small(lr="2e-2"), str(tmp_path), progress=False)


def test_a_launch_validates_once_and_resolves_its_family_once(tmp_path, monkeypatch):
  from universality.engine import families
  calls = {"validate": 0, "get": 0}

  def counted(name, real):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return real(*args, **kwargs)
    return wrapper

  cfg = _small(lr="1e-2")
  cfg.opt.name = "adamw,sgd"  # two buckets, trained one after another
  monkeypatch.setattr(config_lib, "validate", counted("validate", config_lib.validate))
  monkeypatch.setattr(families, "get", counted("get", families.get))
  study = launch.check_size(cfg)  # as the command line launches: check, describe, train
  lines = launch.describe(study)
  out = launch.run_study(study, str(tmp_path), progress=False, analyze=False)
  assert lines[0].startswith("2 buckets") and sorted(out["buckets"]) == ["adamw-order5", "sgd-order5"]
  assert calls == {"validate": 1, "get": 1}


def test_format_1_run_directory_is_read_and_unknown_formats_refused(tmp_path):
  cfg = _small(lr="1e-2")
  new = tmp_path / "new"
  launch.run_study(cfg, str(new), progress=False, analyze=False)
  old = tmp_path / "old"
  shutil.copytree(new, old, ignore=shutil.ignore_patterns(".lock"))
  # Rewrite config.json and runs.json as format 1 wrote them.
  flat = {"groups": "C5", "model": "mlp", "seeds": 3, "seed": 0, "seed_offset": 0, "embed_dim": 8,
          "hidden": 12, "d_model": 128, "n_heads": 4, "d_mlp": 512, "n_layers": 1, "lr": "1e-2",
          "weight_decay": "1.0", "train_frac": "0.6", "train_frac_by_group": "", "b1": 0.9, "b2": 0.98,
          "eps": 1e-8, "steps": 40, "eval_every": 20, "batch_size": 0, "num_checkpoints": 3, "analyze": False,
          "run_chunk": 0}
  (old / "config.json").write_text(json.dumps(flat))
  rows = json.load(open(new / "runs.json"))
  v1 = [{"group": r["group"], "seed": r["base_seed"], "seed_index": r["seed"], "lr": r["lr"],
         "weight_decay": r["weight_decay"], "train_frac": r["train_frac"], "name": r["name"]} for r in rows]
  (old / "runs.json").write_text(json.dumps(v1))
  with replay.open(str(old)) as a, replay.open(str(new)) as b:
    assert [r["seed"] for r in a.runs] == [0, 1, 2] and all(r["base_seed"] == 0 for r in a.runs)
    assert config_lib.identity(a.config) == config_lib.identity(b.config)
    jax.tree.map(np.testing.assert_array_equal, a.params(), b.params())
  (old / "config.json").write_text(json.dumps({"format_version": 99, "config": {}}))
  with pytest.raises(rundir.RunDirError, match="format 99"):
    replay.open(str(old))
