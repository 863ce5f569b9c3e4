"""Train a whole sweep — seeds × tasks × lr × weight decay — of any task family as one compiled program.

::

  trainer = make_train(cfg)                    # cfg: universality.engine.config.default_config() and overrides
  state = trainer.init()                       # TrainState, every leaf stacked over the padded run axis
  state, metrics = trainer.run(state, n_evals) # n_evals × eval_every optimiser steps; metrics [n_evals, S]
  state, metrics = trainer.train()             # init + all cfg.steps steps
  logits, acts = trainer.apply(state.params, *inputs_S)   # the family's model on inputs stacked over S

The family (``universality.engine.families``) supplies the runs' data and the per-run functions
(initialisation, the loss and gradients of a step, evaluation, apply); this module supplies everything else.
The step is written for one run and vmapped over the run axis; learning rate and weight decay live in each
run's optimiser state (``optax.inject_hyperparams``), so one program covers the whole grid. The run axis is
sharded over a 1-D device mesh (axis ``'runs'``) with ``shard_map``: runs never talk to each other, so the
program needs no communication and a run's numbers do not depend on which device holds it. ``S`` is padded up
to a multiple of the device count with copies of run 0 whose results are dropped.

A run whose loss or updated parameters become non-finite is marked ``diverged`` and frozen: it keeps its last
finite parameters and optimiser state, and since vmapped runs share no arithmetic the others are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from universality.engine import config as config_lib
from universality.engine import families, optim

AXIS = "runs"


class TrainState(NamedTuple):
  """One run's training state; the trainer stacks every leaf over the (padded) run axis.

  Attributes:
    params: model parameters (the family's ``Task.init``).
    opt_state: the state of the run's optimiser (universality.engine.optim), which holds the run's own
      ``learning_rate`` and ``weight_decay`` (``optax.inject_hyperparams``).
    step: int32, optimiser steps taken (counted also while frozen, so minibatch streams stay aligned).
    diverged: bool, set once the loss or the parameters became non-finite; the run is frozen from then on.
    key: uint32 [2], the run's PRNG key (``Family.run_key``: base seed, seed number and task).
  """
  params: Any
  opt_state: Any
  step: jax.Array
  diverged: jax.Array
  key: jax.Array


@dataclasses.dataclass
class Trainer:
  """A compiled sweep. Build with ``make_train``; see the module docstring for the calls."""
  cfg: Any
  runs: list[dict]
  mesh: Mesh
  family: families.Family
  task: families.Task           # the family's data (host copy, padded to n_padded runs) and functions
  n_padded: int
  trace_count: int = 0          # how many times run() was traced (tests assert it stays 1)

  def __post_init__(self):
    self.data = self.task.data
    self.metric_names = tuple(self.task.metrics) + ("diverged",)
    per_device = self.n_padded // self.mesh.devices.size
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.chunk = min(per_device, self.cfg.exec.run_chunk or (1 if on_cpu else per_device))
    self._spec = NamedSharding(self.mesh, P(AXIS))
    self._data_dev = jax.tree.map(self._put, self.data)
    replicated = NamedSharding(self.mesh, P())
    self._shared_dev = jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda idx: np.asarray(x)[idx]),
        self.task.shared)
    keys = np.stack([self.family.run_key(r) for r in self._padded_runs])
    self._inputs_dev = tuple(self._put(x) for x in (
        keys, np.asarray([r["lr"] for r in self._padded_runs], np.float32),
        np.asarray([r["weight_decay"] for r in self._padded_runs], np.float32)))
    self._init_jit = jax.jit(jax.shard_map(self._init_local, mesh=self.mesh, in_specs=(P(AXIS),) * 4 + (P(),),
                                           out_specs=P(AXIS)))
    self._run_jit = jax.jit(self._run_global, static_argnums=3, donate_argnums=0)
    self._apply_jit = jax.jit(self._apply_global)
    # jnp.copy, not the identity: jit would return an input that comes back unchanged instead of a copy.
    self._copy_jit = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
    self._eval_jit = jax.jit(jax.shard_map(self._eval_local, mesh=self.mesh, in_specs=(P(AXIS),) * 2 + (P(),),
                                           out_specs=P(AXIS)))

  @property
  def _padded_runs(self) -> list[dict]:
    return self.runs + [self.runs[0]] * (self.n_padded - len(self.runs))

  @property
  def n_runs(self) -> int:
    return len(self.runs)

  def _put(self, x: np.ndarray) -> jax.Array:
    """A host array (identical on every process) as a global array sharded over runs."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, self._spec, lambda idx: x[idx])

  # --- one run ------------------------------------------------------------------------------------

  def _tx(self, lr, weight_decay) -> optax.GradientTransformation:
    return optim.make(self.cfg.opt, self.cfg.steps, lr, weight_decay, self.family.param_roles)

  def _init_one(self, key, lr, weight_decay, d, shared) -> TrainState:
    params = self.task.init(key, d, shared)
    opt_state = self._tx(lr, weight_decay).init(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      diverged=jnp.zeros((), bool), key=key)

  def _step_one(self, state: TrainState, d, shared) -> TrainState:
    loss, grads = self.task.loss_and_grads(state.params, state.key, state.step, d, shared)
    tx = self._tx(0.0, 0.0)  # placeholder values: the update reads the run's own from opt_state
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(params):
      finite &= jnp.all(jnp.isfinite(leaf))
    frozen = state.diverged | ~finite
    keep = lambda new, old: jnp.where(frozen, old, new)
    return TrainState(params=jax.tree.map(keep, params, state.params),
                      opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                      step=state.step + 1, diverged=frozen, key=state.key)

  def _eval_one(self, state: TrainState, d, shared) -> dict:
    return dict(self.task.evaluate(state.params, d, shared), diverged=state.diverged.astype(jnp.float32))

  # --- the local shard of runs (inside shard_map) --------------------------------------------------

  def _init_local(self, keys_S, lr_S, wd_S, data_S, shared):
    return jax.vmap(self._init_one, in_axes=(0, 0, 0, 0, None))(keys_S, lr_S, wd_S, data_S, shared)

  def _run_local(self, n_evals: int, state_S: TrainState, data_S: tuple, shared):
    """``n_evals`` intervals of every local run; metrics ``[n_evals, S_local]``.

    Runs share nothing, so each runs its whole call (all intervals) before the next starts: on a CPU that
    keeps one model's activations (~3 MB for S5) in cache, where a vmap over all runs streams S times as
    much through memory every op. ``lax.map`` vmaps ``chunk`` runs at a time (all of them on accelerators).
    """
    def one_run(args):
      state, d = args

      def interval(state, _):
        state, _ = jax.lax.scan(lambda s, _: (self._step_one(s, d, shared), None), state, None,
                                length=self.cfg.eval_every)
        return state, self._eval_one(state, d, shared)

      return jax.lax.scan(interval, state, None, length=n_evals)

    if self.chunk == 1:
      state_S, metrics_SxE = jax.lax.map(one_run, (state_S, data_S))
    else:
      state_S, metrics_SxE = jax.lax.map(one_run, (state_S, data_S), batch_size=self.chunk)
    return state_S, jax.tree.map(lambda m: m.T, metrics_SxE)

  def _eval_local(self, state_S: TrainState, data_S: tuple, shared) -> dict:
    return jax.lax.map(lambda args: self._eval_one(*args, shared), (state_S, data_S))

  def _run_global(self, state, data, shared, n_evals: int):
    self.trace_count += 1  # runs only while tracing: counts compilations of run()
    fn = jax.shard_map(functools.partial(self._run_local, n_evals), mesh=self.mesh,
                       in_specs=(P(AXIS), P(AXIS), P()), out_specs=(P(AXIS), P(None, AXIS)))
    return fn(state, data, shared)

  def _apply_global(self, params, inputs, data, shared):
    def local(params, inputs, data, shared):
      return jax.vmap(self.task.apply, in_axes=(0, 0, 0, None))(params, inputs, data, shared)
    return jax.shard_map(local, mesh=self.mesh, in_specs=(P(AXIS),) * 3 + (P(),),
                         out_specs=P(AXIS))(params, inputs, data, shared)

  # --- public ------------------------------------------------------------------------------------

  def init(self) -> TrainState:
    """The initial state of every run, stacked over ``n_padded`` runs and sharded over the mesh."""
    return self._init_jit(*self._inputs_dev, self._data_dev, self._shared_dev)

  def run(self, state: TrainState, n_evals: int) -> tuple[TrainState, dict]:
    """``n_evals × eval_every`` steps in one compiled call; ``state`` is donated.

    Returns the new state and a dict of host float32 arrays ``[n_evals, n_runs]`` (``metric_names``), measured
    on the parameters at the end of each eval interval, identical on every process.
    """
    if isinstance(n_evals, bool) or not isinstance(n_evals, (int, np.integer)) or n_evals < 1:
      raise ValueError(f"n_evals must be a positive integer, got {n_evals!r}")
    state, metrics = self._run_jit(state, self._data_dev, self._shared_dev, int(n_evals))
    return state, {k: self._to_host(v)[:, :self.n_runs] for k, v in metrics.items()}

  def evaluate(self, state: TrainState) -> dict:
    """The metrics of ``state`` as ``run`` logs them: host float32 arrays ``[n_runs]`` (``metric_names``).

    Used to recompute a logged evaluation that was lost (e.g. a metrics line cut by a crash) from the
    checkpoint of its step.
    """
    metrics = self._eval_jit(state, self._data_dev, self._shared_dev)
    return {k: self._to_host(v)[:self.n_runs] for k, v in metrics.items()}

  def train(self) -> tuple[TrainState, dict]:
    """All ``cfg.steps`` steps from ``init()``; metrics ``[steps // eval_every, n_runs]``."""
    return self.run(self.init(), self.cfg.steps // self.cfg.eval_every)

  def apply(self, params_S, *inputs_S):
    """The family's ``Task.apply`` vmapped over the ``n_padded`` runs: ``(logits, activations)``.

    ``inputs_S`` are host arrays stacked over the ``n_padded`` runs, checked by the family
    (``Family.check_inputs``); e.g. ``(a_SxB, b_SxB)`` for group composition.
    """
    inputs = self.family.check_inputs(self.data, tuple(np.asarray(x) for x in inputs_S), self.n_padded)
    return self._apply_jit(params_S, jax.tree.map(self._put, inputs), self._data_dev, self._shared_dev)

  def shard(self, host_tree):
    """Inverse of ``unpad``: a host pytree stacked over ``n_runs`` (or ``n_padded``) runs as global arrays
    sharded over the mesh, padding runs filled with copies of run 0 (e.g. to resume from a checkpoint)."""
    def put(x):
      x = np.asarray(x)
      if x.ndim == 0 or x.shape[0] not in (self.n_runs, self.n_padded):
        raise ValueError(f"shard: leading axis must be {self.n_runs} or {self.n_padded} runs, got {x.shape}")
      extra = self.n_padded - x.shape[0]
      return self._put(np.concatenate([x, np.repeat(x[:1], extra, axis=0)]) if extra else x)
    return jax.tree.map(put, host_tree)

  def unpad(self, tree):
    """Host numpy copy of a run-stacked pytree without the padding runs (gathered across processes)."""
    return jax.tree.map(lambda x: self._to_host(x)[:self.n_runs], tree)

  def checkpoint_view(self, tree, copy: bool = True):
    """A run-stacked pytree as a checkpoint saves it: the real runs only (``host_state_spec``), in buffers
    of its own that no later ``run`` donates, so an asynchronous save may read them while training goes on.

    Without padding runs (the run count a multiple of the device count) this is a copy on the devices, in
    the same sharding: no host gather, and in a multi-process job each process writes its own runs; with
    ``copy=False`` it is ``tree`` itself, for a save that is committed before the next ``run`` (a
    checkpointer without ``overlap``). With padding runs the unpadded axis cannot be split evenly over the
    devices, so it is ``unpad``'s host copy.
    """
    if self.n_padded != self.n_runs:
      return self.unpad(tree)
    return self._copy_jit(tree) if copy else tree

  @staticmethod
  def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def make_train(cfg, mesh: Mesh | None = None, family: families.Family | None = None) -> Trainer:
  """Builds the trainer of the sweep ``cfg`` on ``mesh`` (default: every device, axis ``'runs'``).

  ``family``: given by a launcher that validated ``cfg`` already (``config.study``); without it ``cfg`` is
  validated here and its family looked up.
  """
  family = family or config_lib.validate(cfg)
  cfg = cfg.copy_and_resolve_references()  # the trainer keeps its own frozen copy
  cfg.lock()
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
  if mesh.axis_names != (AXIS,):
    raise ValueError(f"mesh must be 1-D with axis name {AXIS!r}, got axes {mesh.axis_names}")
  runs = family.runs(cfg)
  n_dev = mesh.devices.size
  n_padded = -(-len(runs) // n_dev) * n_dev
  padded = runs + [runs[0]] * (n_padded - len(runs))
  return Trainer(cfg=cfg, runs=runs, mesh=mesh, family=family, task=family.make_task(cfg, padded),
                 n_padded=n_padded)


def host_state_spec(trainer: Trainer) -> Any:
  """ShapeDtypeStructs of the checkpointed state: the train state of the real runs, on the host.

  Checkpoints hold the state without the padding runs that make the run axis divisible by the device
  count, so a checkpoint written on 8 devices (or 2 processes) restores on 1 and the other way round.
  """
  def unpadded(x):
    return jax.ShapeDtypeStruct((trainer.n_runs,) + tuple(x.shape[1:]), x.dtype)
  return jax.tree.map(unpadded, jax.eval_shape(trainer.init))
