"""Train a whole sweep — seeds × groups × lr × weight decay × train fraction — as one compiled program.

::

  trainer = make_train(cfg)                    # cfg: engine.config.default_config() and overrides
  state = trainer.init()                       # TrainState, every leaf stacked over the padded run axis
  state, metrics = trainer.run(state, n_evals) # n_evals × eval_every AdamW steps; metrics [n_evals, S]
  state, metrics = trainer.train()             # init + all cfg.steps steps
  logits_SxBxV, hidden_SxBxN = trainer.apply(state.params, a_SxB, b_SxB)

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

from engine import config as config_lib
from engine import groups as groups_lib
from engine import models
from engine import tasks

AXIS = "runs"
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "diverged")


class TrainState(NamedTuple):
  """One run's training state; the trainer stacks every leaf over the (padded) run axis.

  Attributes:
    params: model parameters (engine.models.init).
    opt_state: AdamW state from ``optax.inject_hyperparams``; ``opt_state.hyperparams`` holds the run's
      ``learning_rate`` and ``weight_decay``.
    step: int32, optimiser steps taken (counted also while frozen, so minibatch streams stay aligned).
    diverged: bool, set once the loss or the parameters became non-finite; the run is frozen from then on.
    key: uint32 [2], the run's PRNG key (a function of base seed, seed index and group).
  """
  params: Any
  opt_state: Any
  step: jax.Array
  diverged: jax.Array
  key: jax.Array


def _optimizer(cfg, lr, weight_decay) -> optax.GradientTransformation:
  # lr and weight decay are injected (they live in the state, so they may differ per run under vmap);
  # the betas are the same for the whole sweep and stay static.
  return optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps"))(
      learning_rate=lr, weight_decay=weight_decay, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps))


def run_key(seed: int, seed_index: int, group: groups_lib.Group) -> np.ndarray:
  """The PRNG key (uint32 [2]) of a run: a function of base seed, seed index and group only."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), seed_index)
  return np.asarray(jax.random.fold_in(key, tasks.group_tag(group)))


def masked_xent(logits_BxV, c_B, w_B, order):
  """``(Σ w·cross-entropy, Σ w·correct)`` with classes ``>= order`` masked to −inf (zero probability)."""
  classes_1xV = jnp.arange(logits_BxV.shape[-1])[None, :]
  logits_BxV = jnp.where(classes_1xV < order, logits_BxV, -jnp.inf)
  lse_B = jax.nn.logsumexp(logits_BxV, axis=-1)
  # A one-hot select rather than take_along_axis: its gradient is elementwise (fuses with the softmax
  # gradient) where the gather's is a scatter into [B, V].
  picked_B = jnp.sum(jnp.where(classes_1xV == c_B[:, None], logits_BxV, 0.0), axis=-1)
  correct_B = (jnp.argmax(logits_BxV, axis=-1) == c_B).astype(jnp.float32)
  return jnp.sum(w_B * (lse_B - picked_B)), jnp.sum(w_B * correct_B)


@dataclasses.dataclass
class Trainer:
  """A compiled sweep. Build with ``make_train``; see the module docstring for the calls."""
  cfg: Any
  runs: list[dict]
  mesh: Mesh
  data: tasks.TaskData          # host copy, padded to n_padded runs
  n_padded: int
  trace_count: int = 0          # how many times run() was traced (tests assert it stays 1)

  def __post_init__(self):
    self.vocab = self.data.vocab
    per_device = self.n_padded // self.mesh.devices.size
    on_cpu = self.mesh.devices.flat[0].platform == "cpu"
    self.chunk = min(per_device, self.cfg.run_chunk or (1 if on_cpu else per_device))
    self._spec = NamedSharding(self.mesh, P(AXIS))
    self._data_dev = jax.tree.map(self._put, tuple(self.data))
    keys = np.stack([run_key(r["seed"], r["seed_index"], groups_lib.get(r["group"])) for r in self._padded_runs])
    self._inputs_dev = tuple(self._put(x) for x in (
        keys, np.asarray([r["lr"] for r in self._padded_runs], np.float32),
        np.asarray([r["weight_decay"] for r in self._padded_runs], np.float32), self.data.order_S))
    self._init_jit = jax.jit(self._sharded(self._init_local, n_in=4, out_specs=P(AXIS)))
    self._run_jit = jax.jit(self._run_global, static_argnums=2, donate_argnums=0)
    self._apply_jit = jax.jit(self._apply_global)

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

  def _sharded(self, fn, n_in: int, out_specs):
    return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(AXIS),) * n_in, out_specs=out_specs)

  # --- one run ------------------------------------------------------------------------------------

  def _init_one(self, key, lr, weight_decay, order) -> TrainState:
    params = models.init(jax.random.fold_in(key, 0), self.cfg, self.vocab, order)
    opt_state = _optimizer(self.cfg, lr, weight_decay).init(params)
    return TrainState(params=params, opt_state=opt_state, step=jnp.zeros((), jnp.int32),
                      diverged=jnp.zeros((), bool), key=key)

  def _loss(self, params, a_B, b_B, c_B, w_B, order):
    logits_BxV, _ = models.apply(params, a_B, b_B, self.cfg)
    return masked_xent(logits_BxV, c_B, w_B, order)

  def _batch(self, state: TrainState, d: tasks.TaskData):
    """The step's training pairs: all of them, or ``batch_size`` drawn with ``fold_in(key, step)``."""
    if not self.cfg.batch_size:
      return d.train_a_SxP, d.train_b_SxP, d.train_c_SxP, d.train_w_SxP
    bkey = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.step)
    idx_B = jax.random.randint(bkey, (self.cfg.batch_size,), 0, d.n_train_S)
    w_B = jnp.full((self.cfg.batch_size,), 1.0 / self.cfg.batch_size, jnp.float32)
    return d.train_a_SxP[idx_B], d.train_b_SxP[idx_B], d.train_c_SxP[idx_B], w_B

  def _step_one(self, state: TrainState, d: tasks.TaskData) -> TrainState:
    a_B, b_B, c_B, w_B = self._batch(state, d)
    if self.cfg.model == "mlp":  # the hand-written backward: fewer passes over the activations
      loss, grads = models.mlp_xent_grads(state.params, a_B, b_B, c_B, w_B, d.order_S)
    else:
      (loss, _), grads = jax.value_and_grad(self._loss, has_aux=True)(
          state.params, a_B, b_B, c_B, w_B, d.order_S)
    tx = _optimizer(self.cfg, 0.0, 0.0)  # placeholder values: the update reads the run's own from opt_state
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

  def _eval_one(self, state: TrainState, d: tasks.TaskData) -> dict:
    train_loss, train_acc = self._loss(state.params, d.train_a_SxP, d.train_b_SxP, d.train_c_SxP,
                                       d.train_w_SxP, d.order_S)
    test_loss, test_acc = self._loss(state.params, d.test_a_SxQ, d.test_b_SxQ, d.test_c_SxQ,
                                     d.test_w_SxQ, d.order_S)
    no_test = jnp.sum(d.test_w_SxQ) == 0  # train_frac = 1: the test metrics are undefined
    nan = jnp.float32(jnp.nan)
    return dict(train_loss=train_loss, train_acc=train_acc, test_loss=jnp.where(no_test, nan, test_loss),
                test_acc=jnp.where(no_test, nan, test_acc), diverged=state.diverged.astype(jnp.float32))

  # --- the local shard of runs (inside shard_map) --------------------------------------------------

  def _init_local(self, keys_S, lr_S, wd_S, order_S):
    return jax.vmap(self._init_one)(keys_S, lr_S, wd_S, order_S)

  def _run_local(self, n_evals: int, state_S: TrainState, data_S: tuple):
    """``n_evals`` intervals of every local run; metrics ``[n_evals, S_local]``.

    Runs share nothing, so each runs its whole call (all intervals) before the next starts: on a CPU that
    keeps one model's activations (~3 MB for S5) in cache, where a vmap over all runs streams S times as
    much through memory every op. ``lax.map`` vmaps ``chunk`` runs at a time (all of them on accelerators).
    """
    def one_run(args):
      state, d = args
      d = tasks.TaskData(*d)

      def interval(state, _):
        state, _ = jax.lax.scan(lambda s, _: (self._step_one(s, d), None), state, None,
                                length=self.cfg.eval_every)
        return state, self._eval_one(state, d)

      return jax.lax.scan(interval, state, None, length=n_evals)

    if self.chunk == 1:
      state_S, metrics_SxE = jax.lax.map(one_run, (state_S, data_S))
    else:
      state_S, metrics_SxE = jax.lax.map(one_run, (state_S, data_S), batch_size=self.chunk)
    return state_S, jax.tree.map(lambda m: m.T, metrics_SxE)

  def _run_global(self, state, data, n_evals: int):
    self.trace_count += 1  # runs only while tracing: counts compilations of run()
    fn = jax.shard_map(functools.partial(self._run_local, n_evals), mesh=self.mesh,
                       in_specs=(P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(None, AXIS)))
    return fn(state, data)

  def _apply_global(self, params, a_SxB, b_SxB, order_S):
    def local(params, a, b, order):
      logits, hidden = jax.vmap(lambda p, x, y: models.apply(p, x, y, self.cfg))(params, a, b)
      mask_SxBxV = jnp.arange(self.vocab)[None, None, :] < order[:, None, None]
      return jnp.where(mask_SxBxV, logits, -jnp.inf), hidden
    return self._sharded(local, n_in=4, out_specs=P(AXIS))(params, a_SxB, b_SxB, order_S)

  # --- public ------------------------------------------------------------------------------------

  def init(self) -> TrainState:
    """The initial state of every run, stacked over ``n_padded`` runs and sharded over the mesh."""
    return self._init_jit(*self._inputs_dev)

  def run(self, state: TrainState, n_evals: int) -> tuple[TrainState, dict]:
    """``n_evals × eval_every`` steps in one compiled call; ``state`` is donated.

    Returns the new state and a dict of host float32 arrays ``[n_evals, n_runs]`` (``METRICS``), measured
    on the parameters at the end of each eval interval, identical on every process.
    """
    if isinstance(n_evals, bool) or not isinstance(n_evals, (int, np.integer)) or n_evals < 1:
      raise ValueError(f"n_evals must be a positive integer, got {n_evals!r}")
    state, metrics = self._run_jit(state, self._data_dev, int(n_evals))
    return state, {k: self._to_host(v)[:, :self.n_runs] for k, v in metrics.items()}

  def train(self) -> tuple[TrainState, dict]:
    """All ``cfg.steps`` steps from ``init()``; metrics ``[steps // eval_every, n_runs]``."""
    return self.run(self.init(), self.cfg.steps // self.cfg.eval_every)

  def apply(self, params_S, a_SxB, b_SxB):
    """Vmapped ``models.apply`` over the ``n_padded`` runs; logits of padded classes are −inf."""
    a_SxB, b_SxB = np.asarray(a_SxB, np.int32), np.asarray(b_SxB, np.int32)
    if a_SxB.ndim != 2 or a_SxB.shape != b_SxB.shape or a_SxB.shape[0] != self.n_padded:
      raise ValueError(f"apply: a and b must both be [{self.n_padded}, B], got {a_SxB.shape}, {b_SxB.shape}")
    if a_SxB.size and (min(a_SxB.min(), b_SxB.min()) < 0 or
                       (np.maximum(a_SxB, b_SxB) >= self.data.order_S[:, None]).any()):
      raise ValueError("apply: inputs must be group elements 0 .. order-1 of each run's group")
    return self._apply_jit(params_S, self._put(a_SxB), self._put(b_SxB), self._inputs_dev[3])

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

  @staticmethod
  def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def make_train(cfg, mesh: Mesh | None = None) -> Trainer:
  """Builds the trainer of the sweep ``cfg`` on ``mesh`` (default: every device, axis ``'runs'``)."""
  config_lib.validate(cfg)
  cfg = cfg.copy_and_resolve_references()  # the trainer keeps its own frozen copy
  cfg.lock()
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
  if mesh.axis_names != (AXIS,):
    raise ValueError(f"mesh must be 1-D with axis name {AXIS!r}, got axes {mesh.axis_names}")
  runs = config_lib.runs(cfg)
  n_dev = mesh.devices.size
  n_padded = -(-len(runs) // n_dev) * n_dev
  padded = runs + [runs[0]] * (n_padded - len(runs))
  splits = [tasks.split(groups_lib.get(r["group"]), r["train_frac"], r["seed"], r["seed_index"])
            for r in padded]
  return Trainer(cfg=cfg, runs=runs, mesh=mesh, data=tasks.stack(splits), n_padded=n_padded)
