"""Buckets: groups of very different orders in one launch, one program per bucket, each bucket's run directory
equal bit for bit to a launch of the bucket's config alone; relaunch, preemption, replay, older directories."""

import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from universality.engine import checkpoint, launch, replay, report, rundir, train
from universality.engine import budget
from universality.engine import config as config_lib
from universality.engine import families
from universality.engine.families.group import family as group_family
from universality.experiments.configs import chughtai_mlp
from tests.helpers import group_config, set_fields

GROUP = families.get("group")


def _config(**fields):
  """C5 and S3 (orders 5, 6) share a bucket under the default padding 0.25; C7 (7 > 1.25 x 5) is its own."""
  cfg = group_config(groups="C5,C7,S3", embed_dim=8, hidden=8, lr="1e-2", train_frac="0.6",
                     train_frac_by_group="S3=0.7", analyze=False)
  cfg.seeds, cfg.steps, cfg.eval_every, cfg.num_checkpoints = 2, 3000, 100, 3
  return set_fields(cfg, **fields)


def _state(workdir, cfg, step=None):
  trainer = train.make_train(cfg)
  with checkpoint.Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS), read_only=True) as ckpt:
    got, state = ckpt.restore(train.host_state_spec(trainer), step=step, fallback=False)
  return got, jax.tree.map(np.asarray, state)


def _assert_same_run_directory(a, b, cfg, files=(rundir.CONFIG, rundir.RUNS)):
  """Same config.json, runs.json, metrics, checkpointed steps and final train state, bit for bit."""
  for name in files:
    assert json.load(open(rundir.path(a, name))) == json.load(open(rundir.path(b, name))), name
  ma, mb = rundir.read_metrics(a), rundir.read_metrics(b)
  assert ma.keys() == mb.keys() and len(ma["step"]) == cfg.steps // cfg.eval_every
  for k in ma:
    np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
  with checkpoint.Checkpointer(rundir.path(a, rundir.CHECKPOINTS), read_only=True) as ca, \
      checkpoint.Checkpointer(rundir.path(b, rundir.CHECKPOINTS), read_only=True) as cb:
    assert ca.steps() == cb.steps() == checkpoint.log_spaced_steps(cfg.steps, cfg.num_checkpoints, cfg.eval_every)
  (sa, xa), (sb, xb) = _state(a, cfg), _state(b, cfg)
  assert sa == sb == cfg.steps
  jax.tree.map(np.testing.assert_array_equal, xa, xb)


def _files(workdir):
  """Every file under ``workdir`` (but locks) with its bytes and modification time."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      if name != rundir.LOCK:
        path = os.path.join(root, name)
        out[os.path.relpath(path, workdir)] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
  """One mixed launch and a launch of each bucket's config alone."""
  root = tmp_path_factory.mktemp("buckets")
  cfg = _config()
  out = launch.run_study(cfg, str(root / "mixed"), progress=False)
  alone = {}
  for name, cfg_b in GROUP.buckets(cfg):
    launch.run_study(cfg_b, str(root / name), progress=False)
    alone[name] = (str(root / name), cfg_b)
  return str(root / "mixed"), out, alone


# ---------------------------------------------------------------------------------------------------
# The rule.


def _reference_cut(orders, padding):
  """Brute force: the sorted orders cut wherever an order exceeds (1 + padding) x the open cut's first."""
  ranked = sorted(range(len(orders)), key=lambda i: (orders[i], i))
  cuts, first = [], None
  for i in ranked:
    if first is None or orders[i] > (1 + padding) * first:
      cuts.append([])
      first = orders[i]
    cuts[-1].append(i)
  return cuts


def test_bucketing_rule_bounds_padding_and_is_greedy():
  rng = np.random.default_rng(int(time.time_ns()) % 2**32)
  for _ in range(200):
    orders = rng.integers(1, 800, size=int(rng.integers(1, 12))).tolist()
    padding = float(rng.choice([0.0, 0.05, 0.25, 1.0, rng.uniform(0, 2)]))
    cut = group_family.order_buckets([(f"g{i}", n) for i, n in enumerate(orders)], padding)
    got = [[int(s[1:]) for s in bucket] for bucket in cut]
    assert sorted(i for b in got for i in b) == list(range(len(orders)))  # a partition
    for b in got:
      assert max(orders[i] for i in b) <= (1 + padding) * min(orders[i] for i in b)  # the padding bound
    for prev, nxt in zip(got, got[1:]):  # greedy: the next bucket could not have joined, orders ascend
      assert min(orders[i] for i in nxt) > (1 + padding) * min(orders[i] for i in prev)
      assert max(orders[i] for i in prev) < min(orders[i] for i in nxt)
    assert got == _reference_cut(orders, padding)


def test_the_papers_mlp_study_is_three_buckets_each_its_own_study():
  cfg = chughtai_mlp.get_config()
  buckets = GROUP.buckets(cfg)
  assert [(name, c.task.groups, c.task.train_frac_by_group) for name, c in buckets] == [
      ("order60", "A5", "A5=0.5"),
      ("order113-122", "C113,C118,D59,D61,S5", "C113=0.3,C118=0.3,D59=0.3,D61=0.3,S5=0.4"),
      ("order720", "S6", "S6=0.25")]
  assert sum(GROUP.n_runs(c) for _, c in buckets) == GROUP.n_runs(cfg) == 7 * 50
  rows = {r["name"]: r for r in config_lib.runs(cfg)}
  for name, c in buckets:
    assert GROUP.buckets(c) == [(name, c)]  # a bucket's config alone is one bucket: itself
    assert all(rows[r["name"]] == r for r in config_lib.runs(c))  # the study's own runs
  assert config_lib.identity(cfg)["task"]["bucket_padding"] == 0.25  # the rule is part of the identity
  assert len(GROUP.buckets(set_fields(cfg, **{"task.bucket_padding": 12.0}))) == 1  # 720 <= 13 x 60
  assert [n for n, _ in GROUP.buckets(set_fields(cfg, **{"task.bucket_padding": 0.0}))][:3] == \
      ["order60", "order113", "order118"]
  lines = launch.describe(chughtai_mlp.get_config())
  assert lines[0].startswith("3 buckets") and "order720: 50 runs; Task: composition a·b in S6" in lines[3]
  for bad in (-0.1, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="^config.task.bucket_padding: "):
      config_lib.validate(set_fields(group_config(), **{"task.bucket_padding": bad}))


def test_memory_check_covers_every_bucket_and_names_the_one_that_does_not_fit():
  cfg = group_config(groups="C5,S5")
  buckets, devices = GROUP.buckets(cfg), jax.devices()

  def need(c):  # on the CPU the devices share the host's memory (universality.engine.budget.check)
    est = budget.estimate(c, len(devices), True)
    return est.host + len(devices) * est.device

  need = {name: need(c) for name, c in buckets} | {"padded": need(cfg)}
  assert need["padded"] > need["order120"] > need["order5"]
  cfg.exec.memory_budget_gb = (need["order120"] - 1) / 1e9
  with pytest.raises(budget.BudgetError, match=r"^bucket order120: launch needs about"):
    launch.run_study(cfg, "/nonexistent/never/written", progress=False)
  cfg.exec.memory_budget_gb = need["order120"] / 1e9 * 1.001
  launch.check_size(cfg)  # the largest bucket fits: so does the launch, padded or not
  with pytest.raises(budget.BudgetError):
    budget.check(cfg, devices)


# ---------------------------------------------------------------------------------------------------
# A mixed launch.


def test_mixed_launch_equals_launches_of_each_bucket_and_relaunch_does_nothing(launches, capsys):
  mixed, out, alone = launches
  assert sorted(os.listdir(mixed)) == sorted([rundir.CONFIG, rundir.BUCKETS, rundir.LOCK])
  assert json.load(open(rundir.path(mixed, rundir.CONFIG)))["config"] == config_lib.identity(_config())
  assert sorted(os.listdir(rundir.path(mixed, rundir.BUCKETS))) == sorted(alone) == ["order5-6", "order7"]
  for name, (workdir, cfg_b) in alone.items():
    _assert_same_run_directory(rundir.bucket_dir(mixed, name), workdir, cfg_b)
  assert [r["group"] for r in rundir.read_runs(rundir.bucket_dir(mixed, "order5-6"))] == ["C5"] * 2 + ["S3"] * 2
  assert out["step"] == 3000 and set(out["buckets"]) == set(alone)
  before = _files(mixed)
  capsys.readouterr()
  again = launch.run_study(_config(), mixed, progress=False)
  printed = capsys.readouterr().out
  assert "Bucket 1/2 order5-6 (4 runs): finished, skipped" in printed and "Resuming" not in printed
  assert all(r["skipped"] for r in again["buckets"].values())
  assert _files(mixed) == before
  with pytest.raises(launch.LaunchError, match=r"differs in: task.bucket_padding"):
    launch.run_study(_config(**{"task.bucket_padding": 0.5}), mixed, progress=False)
  assert _files(mixed) == before


def test_replay_across_buckets(launches):
  mixed, _, alone = launches
  with replay.open(mixed) as study:
    assert isinstance(study, replay.Study) and list(study.buckets) == ["order5-6", "order7"]
    assert not study.missing and len(study) == 6
    assert [(r["bucket"], r["group"]) for r in study.runs] == \
        [("order5-6", "C5")] * 2 + [("order5-6", "S3")] * 2 + [("order7", "C7")] * 2
    c7 = study.select(group="C7")
    assert isinstance(c7, replay.Run) and not isinstance(c7, replay.Study)
    assert c7.workdir == rundir.bucket_dir(mixed, "order7") and len(c7) == 2
    _, state = _state(*alone["order7"])
    jax.tree.map(np.testing.assert_array_equal, c7.params(), state.params)
    s3 = study.select(group="S3", seed=1)
    assert s3.index.tolist() == [3] and s3.runs[0]["train_frac"] == 0.7
    np.testing.assert_array_equal(s3.metrics()["test_acc"][:, 0],
                                  rundir.read_metrics(alone["order5-6"][0])["test_acc"][:, 3])
    both = study.select(seed=0)
    assert isinstance(both, replay.Study) and [r["group"] for r in both.runs] == ["C5", "S3", "C7"]
    assert both.select(bucket="order7").runs[0]["name"] == study.runs[4]["name"]
    with pytest.raises(ValueError, match="unknown field 'colour'"):
      study.select(colour=1)
    with pytest.raises(ValueError, match="no run matches"):
      study.select(group="A5")
  index = report.write_study_report(mixed)
  text = open(index).read()
  assert "| order5-6 | composition a·b in C5 (order 5), S3 (order 6) | 4 | 3000 / 3000 |" in text
  assert "| order7 |" in text and "not written" in text  # analyze=False: no bucket report yet


def test_replay_refuses_a_bucket_whose_runs_json_disagrees_with_its_sweep(launches, tmp_path):
  mixed, _, _ = launches
  copy = tmp_path / "mixed"
  shutil.copytree(mixed, copy, ignore=shutil.ignore_patterns(".lock"))
  runs_path = os.path.join(rundir.bucket_dir(str(copy), "order5-6"), rundir.RUNS)
  rows = json.load(open(runs_path))
  rows[0], rows[2] = rows[2], rows[0]  # C5 seed 0 and S3 seed 0 swap places: each points at the other's weights
  with open(runs_path, "w") as f:
    json.dump(rows, f)
  with pytest.raises(rundir.RunDirError, match=r"order5-6.*runs\.json") as e:
    replay.open(str(copy))
  assert "\n" not in str(e.value)
  with replay.open(mixed) as study:  # the original still opens
    assert len(study) == 6


@pytest.mark.slow
def test_preempted_mixed_launch_resumes_the_bucket_in_progress(launches, tmp_path, capsys):
  _, _, alone = launches
  workdir = tmp_path / "w"
  second = rundir.bucket_dir(str(workdir), "order7")

  def interrupt_in_second_bucket():
    while not (os.path.exists(rundir.path(second, rundir.METRICS))
               and len(rundir.read_metrics(second)["step"]) >= 2):
      time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGINT)

  threading.Thread(target=interrupt_in_second_bucket, daemon=True).start()
  with pytest.raises(launch.Preempted) as e:
    launch.run_study(_config(), str(workdir), progress=False)
  assert e.value.step < 3000
  capsys.readouterr()
  launch.run_study(_config(), str(workdir), progress=False)
  printed = capsys.readouterr().out
  assert "Bucket 1/2 order5-6 (4 runs): finished, skipped" in printed
  assert f"Resuming from checkpoint at step {e.value.step}" in printed
  for name, (alone_dir, cfg_b) in alone.items():
    _assert_same_run_directory(rundir.bucket_dir(str(workdir), name), alone_dir, cfg_b)


# ---------------------------------------------------------------------------------------------------
# A run directory written before buckets existed.


def test_old_config_without_the_key_resumes_as_one_program(tmp_path):
  one = _config(steps=400, **{"task.bucket_padding": 1.0})  # C5, C7, S3 in one program, as before buckets
  whole = tmp_path / "whole"
  launch.run_study(one, str(whole), progress=False)
  old = tmp_path / "old"
  shutil.copytree(whole, old, ignore=shutil.ignore_patterns(rundir.LOCK))
  stored = json.load(open(old / rundir.CONFIG))
  del stored["config"]["task"]["bucket_padding"]
  (old / rundir.CONFIG).write_text(json.dumps(stored))
  last = checkpoint.log_spaced_steps(400, 3, 100)[-1]
  os.rename(old / rundir.CHECKPOINTS / str(last), tmp_path / "aside")  # the relaunch has work to do
  assert len(GROUP.buckets(_config())) == 2  # what the default rule would make of it today
  with replay.open(str(old)) as run:
    assert isinstance(run, replay.Run) and len(run) == 6
  out = launch.run_study(_config(steps=400), str(old), progress=False)  # the same command, default padding
  assert out["step"] == 400 and not (old / rundir.BUCKETS).exists()
  _assert_same_run_directory(str(old), str(whole), one, files=(rundir.RUNS,))
  assert json.load(open(old / rundir.CONFIG)) == stored  # never rewritten
