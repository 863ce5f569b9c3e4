"""One process of a multi-process training run on CPU, launched by tests/test_distributed.py.

usage: python tests/distributed_worker.py PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES CONFIG_JSON OUT_DIR \
           [CKPT_DIR]

Joins a ``jax.distributed`` job coordinated on 127.0.0.1:PORT (gloo collectives), trains the sweep of
CONFIG_JSON on the global mesh of every process's devices — first one eval interval, then the rest, as a
launcher resuming from a checkpoint would — and writes the gathered metrics and parameters to
OUT_DIR/process_<id>.npz, so the test can check that every process holds the same, correct numbers. With
CKPT_DIR, every process also takes part in saving the final state there as a launch does
(``Trainer.checkpoint_view``, ``universality.engine.checkpoint``), then trains one more interval (which
donates the state) before the checkpointer closes.
"""

import json
import os
import sys


def main(argv):
  port, process_id, num_processes, local_devices = (int(x) for x in argv[1:5])
  cfg_json, out_dir = argv[5], argv[6]
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_num_cpu_devices", local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120)
  import ml_collections
  import numpy as np

  from universality.engine import checkpoint, train

  assert jax.process_count() == num_processes and len(jax.devices()) == num_processes * local_devices
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  trainer = train.make_train(cfg)
  n_evals = cfg.steps // cfg.eval_every
  state, first = trainer.run(trainer.init(), 1)
  state, rest = trainer.run(state, n_evals - 1)
  out = {f"metrics/{k}": np.concatenate([first[k], rest[k]]) for k in first}
  params = trainer.unpad(state.params)
  out.update({f"params/{k}": v for k, v in params.items()})
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **out)
  if len(argv) > 7:
    with checkpoint.Checkpointer(argv[7]) as ckpt:
      ckpt.save(cfg.steps, trainer.checkpoint_view(state))
      trainer.run(state, 1)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
