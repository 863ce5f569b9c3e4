"""The save pipeline of universality.engine.checkpoint: checksums sealed by a background thread, uncompressed chunks that
older compressed checkpoints restore beside, device copies that training may donate past, and a save from
several processes that each write their own runs."""

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from universality.engine import checkpoint, rundir, train
from tests.helpers import group_config
from tests.test_distributed import run_two_workers


def _random_tree(rng):
  return {"w": rng.standard_normal((8, 33, 5)).astype(np.float32),
          "key": rng.integers(0, 2**32, (8, 2), dtype=np.uint32), "flag": rng.random(8) < 0.5}


def _spec(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _digests(step_dir):
  """sha256 of every file of a step directory but the checksum file, computed here independently."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != rundir.CHECKSUMS:
        with open(os.path.join(root, name), "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _bytes(step_dir):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(step_dir) for f in fs)


def test_a_save_without_overlap_returns_committed_and_sealed_from_the_state_itself(tmp_path):
  # As a launch on the CPU saves: no copy of the state, and a step that is on disk and verifies when save
  # returns, so that the next jitted call may donate the arrays it wrote.
  seed = int.from_bytes(os.urandom(4), "little")
  tree = _random_tree(np.random.default_rng(seed))
  ckpt = checkpoint.Checkpointer(tmp_path, overlap=False)
  ckpt.save(5, jax.tree.map(jax.numpy.asarray, tree))
  assert ckpt._sealer is None and ckpt.timings[0]["sealed_s"] >= ckpt.timings[0]["checksum_s"] >= 0
  with open(tmp_path / "5" / rundir.CHECKSUMS) as f:
    assert json.load(f)["sha256"] == _digests(tmp_path / "5"), f"seed {seed}"
  ckpt.close()
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    _, got = reader.restore(_spec(tree), step=5, fallback=False)
  for k in tree:
    np.testing.assert_array_equal(got[k], tree[k], err_msg=f"{k} (seed {seed})")


def test_background_checksums_are_complete_after_close_and_restore_verifies_them(tmp_path):
  seed = int.from_bytes(os.urandom(4), "little")
  rng = np.random.default_rng(seed)
  trees = {3: _random_tree(rng), 7: _random_tree(rng)}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    for step, tree in trees.items():
      ckpt.save(step, jax.tree.map(jax.numpy.asarray, tree))  # device arrays, as a launch saves them
  assert [t["step"] for t in ckpt.timings] == [3, 7]
  assert all(t["commit_s"] >= 0 and t["checksum_s"] >= 0 for t in ckpt.timings)  # each sealed by its thread
  for step in trees:
    with open(tmp_path / str(step) / rundir.CHECKSUMS) as f:
      listed = json.load(f)["sha256"]
    assert listed == _digests(tmp_path / str(step)), f"step {step} (seed {seed})"
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    for step, tree in trees.items():
      at, got = reader.restore(_spec(tree), step=step, fallback=False)
      assert at == step
      for k in tree:  # host numpy, bit for bit
        assert type(got[k]) is np.ndarray and got[k].flags.writeable
        np.testing.assert_array_equal(got[k], tree[k], err_msg=f"{k} at {step} (seed {seed})")
  data = max((os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "7" / "state") for f in fs),
             key=os.path.getsize)
  with open(data, "r+b") as f:  # one flipped byte inside an array's data
    f.seek(os.path.getsize(data) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
      reader.restore(_spec(trees[7]), step=7, fallback=False)


def test_a_sealing_failure_is_raised_by_close_and_the_step_still_restores(tmp_path, monkeypatch):
  def broken(step_dir):
    raise OSError(f"no space left to seal {step_dir}")
  monkeypatch.setattr(rundir, "write_checksums", broken)
  tree = _random_tree(np.random.default_rng())
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, tree)
  with pytest.raises(OSError, match="no space left to seal"):
    ckpt.close()
  assert not rundir.has_checksums(str(tmp_path / "1"))  # committed, unsealed: verified by restoring only
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    np.testing.assert_array_equal(reader.restore(_spec(tree), fallback=False)[1]["w"], tree["w"])


def test_chunks_are_stored_uncompressed_and_older_compressed_checkpoints_restore(tmp_path):
  zeros = {"w": np.zeros((64, 4096), np.float32)}  # 1 MiB that zstd would shrink to almost nothing
  with checkpoint.Checkpointer(tmp_path / "new") as ckpt:
    ckpt.save(1, zeros)
  assert _bytes(tmp_path / "new" / "1") >= zeros["w"].nbytes
  # A step as the engine wrote it before: Orbax's default handler, zstd.
  old = {"w": np.random.default_rng().standard_normal((6, 100)).astype(np.float32), "z": zeros["w"]}
  manager = ocp.CheckpointManager(tmp_path / "old", item_names=("state",))
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(old)))
  manager.wait_until_finished()
  manager.close()
  assert _bytes(tmp_path / "old" / "5") < zeros["w"].nbytes / 4  # it was compressed
  with checkpoint.Checkpointer(tmp_path / "old", read_only=True) as reader:
    at, got = reader.restore(_spec(old), fallback=False)
  assert at == 5
  for k in old:
    np.testing.assert_array_equal(got[k], old[k])


def _tiny(seeds):
  return group_config(groups="C5", seeds=seeds, embed_dim=8, hidden=8, steps=20, eval_every=5, lr="1e-2",
                      analyze=False)


def test_checkpoint_view_is_a_device_copy_that_training_may_donate_past(tmp_path):
  tr = train.make_train(_tiny(seeds=8))  # 8 runs on the 8 test devices: no padding runs
  assert tr.n_padded == tr.n_runs == 8 and len(jax.devices()) == 8
  state, _ = tr.run(tr.init(), 1)
  before = jax.tree.map(np.array, tr.unpad(state))  # host copies
  view = tr.checkpoint_view(state)
  for v, s in zip(jax.tree.leaves(view), jax.tree.leaves(state)):
    assert isinstance(v, jax.Array) and v.sharding == s.sharding  # stays sharded on the devices
    pointers = lambda x: {shard.data.unsafe_buffer_pointer() for shard in x.addressable_shards}
    assert not pointers(v) & pointers(s)  # in buffers of its own
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, view)
    del view
    later, _ = tr.run(state, 1)  # donates state while the save may still be writing
    assert not np.array_equal(tr.unpad(later).params["linear"], before.params["linear"])
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    _, got = reader.restore(train.host_state_spec(tr), fallback=False)
  jax.tree.map(np.testing.assert_array_equal, got, before)
  padded = train.make_train(_tiny(seeds=2))  # 2 runs padded to 8: the host copy of the real runs
  state = padded.init()
  jax.tree.map(np.testing.assert_array_equal, padded.checkpoint_view(state), padded.unpad(state))


@pytest.mark.slow
def test_two_processes_each_save_their_own_runs_and_the_checkpoint_equals_one_device(tmp_path):
  cfg = group_config(groups="C5,S3", seeds=2, lr="3e-3", weight_decay="1.0", train_frac="0.5", embed_dim=16,
                     hidden=16, steps=6, eval_every=2, analyze=False)  # 4 runs on 2 x 2 devices: no padding
  ckpt_dir = tmp_path / "checkpoints"
  run_two_workers(cfg, tmp_path, str(ckpt_dir))
  state_dir = ckpt_dir / str(cfg.steps) / "state"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))  # each wrote its own runs
  assert rundir.verify_checksums(str(ckpt_dir / str(cfg.steps))) is None
  one = train.make_train(cfg, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("runs",)))
  reference, _ = one.run(one.init(), cfg.steps // cfg.eval_every)
  with checkpoint.Checkpointer(ckpt_dir, read_only=True) as reader:
    at, got = reader.restore(train.host_state_spec(one), fallback=False)
  assert at == cfg.steps
  jax.tree.map(np.testing.assert_array_equal, got, one.unpad(reference))
