"""The group-composition family on the engine's seam (``universality.engine.families.Family``).

Config sections::

  task.groups               comma-separated group specs (universality.engine.groups.get), e.g. "C47,S4,D12"
  task.train_frac           comma-separated fractions of the |G|² pairs used for training (a sweep axis)
  task.train_frac_by_group  per-group fractions overriding train_frac, e.g. "S5=0.4,S6=0.25" (as in the
                            paper, where each group has its own); groups not named use train_frac
  task.bucket_padding       how far a group may be padded beyond its order (``buckets``): a study's groups are
                            trained in buckets, one program each, whose largest order is at most
                            (1 + bucket_padding) × their smallest; part of the study's identity
  task.size_mult            comma-separated multipliers of the training size law of Tian (2025), *Provable
                            Scaling Laws of Feature Emergence*: n = mult · c · s · M ln M pairs for a group of
                            order M (``task.n_train_law``), a sweep axis that replaces train_frac: give one
                            (train_frac '' or the family default 0.4 count as not given)
  task.size_c               c of the law (default 2.7482, the paper's critical_ratio_multiplier)
  task.size_s               s of the law; 0 (default): 1 for abelian groups and S_n, else (largest irrep
                            degree) / 2, as the paper's code (``task.law_s``)
  task.loss                 "xent" (cross-entropy) or "mse" (the centred logits against the centred one-hot
                            onehot − 1/M, summed over the group's classes: ``task.masked_mse``)
  model.name                "mlp" (embed a, embed b, linear, ReLU, unembed), "transformer" (tokens a b =) or
                            "li2" (one-hot a, b -> W -> activation -> V, no biases: ``models.Li2Spec``)
  model.mlp.embed_dim, model.mlp.hidden
  model.li2.hidden, model.li2.activation ("square", "relu", "silu", "relu2")
  model.transformer.d_model, .n_heads, .d_mlp, .n_layers
  analysis.convergent, analysis.convergent_*   the Convergent Learning passes on the hidden layer
                            (``universality.engine.fields.CONVERGENT``; off by default)

The sweep is ``groups × lr × weight_decay × train_frac × seeds``, flattened row-major (groups outermost,
seeds innermost)::

  s = (((g · n_lr + i_lr) · n_wd + i_wd) · n_frac + i_frac) · seeds + k

when every group sweeps the same train fractions (a group named in ``train_frac_by_group`` has n_frac = 1).
A run's initial parameters, split and minibatch stream depend only on (base seed, seed number, group):
runs that differ only in lr, weight decay or train fraction start from the same weights.

Buckets: the groups sorted by order (ties in config order) are cut greedily: a group joins the open bucket
while its order is at most (1 + bucket_padding) × the bucket's smallest order, else it opens the next one
(``order_buckets``). With the default 0.25 the paper's C113, C118, D59, D61 and S5 (orders 113–122) share a
bucket and A5 (60) and S6 (720) have their own. A bucket is named by its orders (``order113-122``,
``order60``) and is the study restricted to its groups (``bucket_config``: the groups in config order, their
entries of train_frac_by_group), so its runs are the study's runs of those groups, in the study's order.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from universality.engine import fields
from universality.engine import families
from universality.engine import groups as groups_lib
from universality.engine.families.group import models
from universality.engine.families.group import task as task_lib


def group_specs(cfg) -> tuple[str, ...]:
  """The group specs of ``cfg.task.groups``, stripped, in order."""
  text = cfg.task.groups
  if not isinstance(text, str):
    raise ValueError(f"config.task.groups: expected a comma-separated string, got {type(text).__name__}")
  specs = tuple(s.strip() for s in text.split(",") if s.strip())
  if not specs:
    raise ValueError("config.task.groups: no group given")
  if len(set(specs)) != len(specs):
    raise ValueError(f"config.task.groups: repeated group in {text!r}")
  return specs


def _check_group_identities(specs: Sequence[str]) -> None:
  """Every group of a study has two elements or more (a task on one element has nothing to learn, and the
  analysis needs two inputs) and appears once, whatever its spelling (universality.engine.groups.duplicates)."""
  for spec in specs:
    if groups_lib.order_of(spec) < 2:
      raise ValueError(f"config.task.groups: {spec} has one element; composition needs a group of order >= 2")
  twins = groups_lib.duplicates(specs)
  if twins:
    a, b = twins[0]
    raise ValueError(f"config.task.groups: {a!r} and {b!r} are the same group (equal Cayley tables)")


def train_frac_by_group(cfg) -> dict[str, float]:
  """``"S5=0.4, S6=0.25"`` -> ``{"S5": 0.4, "S6": 0.25}`` (validated)."""
  text = cfg.task.train_frac_by_group
  if not isinstance(text, str):
    raise ValueError(f"config.task.train_frac_by_group: expected a string like 'S5=0.4,S6=0.25', got {text!r}")
  out = {}
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    spec, sep, value = item.partition("=")
    try:
      frac = float(value)
    except ValueError:
      frac = None
    if not sep or frac is None or not 0 < frac <= 1:
      raise ValueError(f"config.task.train_frac_by_group: cannot read {item!r}; expected GROUP=FRACTION with "
                       "the fraction in (0, 1]")
    out[spec.strip()] = frac
  return out


TRAIN_FRAC_DEFAULT = "0.4"


def size_mults(cfg) -> tuple[float, ...]:
  """The multipliers of ``task.size_mult`` (empty: the study sweeps train fractions)."""
  text = cfg.task.get("size_mult", "")
  if not isinstance(text, str) or not text.strip():
    return ()
  return fields.parse_floats(text, "task.size_mult")


def law_s(cfg, spec: str) -> float:
  """s of the size law for the group ``spec``: ``task.size_s`` if > 0, else ``task.law_s`` of the group."""
  s = float(cfg.task.get("size_s", 0.0))
  return s if s > 0 else task_lib.law_s(groups_lib.get(spec), spec)


def law_pairs(cfg, spec: str) -> list[tuple[float, int]]:
  """``(multiplier, training pairs)`` of every multiplier of ``task.size_mult`` for the group ``spec``."""
  order, c, s = groups_lib.order_of(spec), float(cfg.task.get("size_c", task_lib.LAW_C)), law_s(cfg, spec)
  return [(m, task_lib.n_train_law(order, m, c, s)) for m in size_mults(cfg)]


def train_fracs(cfg, spec: str) -> tuple[float, ...]:
  """The train fractions swept for the group ``spec``: ``n / M²`` of each size multiplier when
  ``task.size_mult`` is given, else its own from train_frac_by_group, else train_frac."""
  if size_mults(cfg):
    order = groups_lib.order_of(spec)
    return tuple(n / (order * order) for _, n in law_pairs(cfg, spec))
  by_group = train_frac_by_group(cfg)
  if spec in by_group:
    return (by_group[spec],)
  return fields.parse_floats(cfg.task.train_frac, "task.train_frac")


def order_buckets(orders: Sequence[tuple[str, int]], padding: float) -> list[list[str]]:
  """Group specs cut into buckets by order (module docstring): ``orders`` are ``(spec, order)`` pairs."""
  out: list[list[str]] = []
  smallest = None
  for spec, order in sorted(orders, key=lambda item: item[1]):  # stable: equal orders keep config order
    if smallest is None or order > (1.0 + padding) * smallest:
      out.append([])
      smallest = order
    out[-1].append(spec)
  return out


def bucket_name(orders: Sequence[int]) -> str:
  """``order60`` for one order, ``order113-122`` for a range."""
  lo, hi = min(orders), max(orders)
  return f"order{lo}" if lo == hi else f"order{lo}-{hi}"


def bucket_config(cfg, specs: Sequence[str]):
  """The study ``cfg`` restricted to the groups ``specs``: a copy whose task.groups lists them in the study's
  order and whose task.train_frac_by_group keeps their entries as written."""
  keep = set(specs)
  out = cfg.copy_and_resolve_references()
  out.task.groups = ",".join(s for s in group_specs(cfg) if s in keep)
  items = [t.strip() for t in cfg.task.train_frac_by_group.split(",") if t.strip()]
  out.task.train_frac_by_group = ",".join(t for t in items if t.partition("=")[0].strip() in keep)
  return out


def _size(row: Mapping[str, Any]) -> str:
  return f"mult{row['size_mult']:g}" if "size_mult" in row else f"frac{row['train_frac']:g}"


def cohort_name(row: Mapping[str, Any]) -> str:
  """Every field of a run but its seed: runs with the same cohort name differ only in seed."""
  return f"{row['group']}/lr{row['lr']:g}/wd{row['weight_decay']:g}/{_size(row)}"


def run_name(row: Mapping[str, Any]) -> str:
  return f"{row['group']}/seed{row['seed']}/lr{row['lr']:g}/wd{row['weight_decay']:g}/{_size(row)}"


class GroupFamily(families.Family):
  """Composition in finite groups; see the module docstring."""
  name = "group"
  progress_metric = "test_acc"
  generalised_threshold = 0.99
  metrics = ("train_loss", "train_acc", "test_loss", "test_acc")
  # Where the heavier hooks live (imported by the layers that use them, never by the trainer).
  analysis_module = "universality.engine.families.group.analysis"
  report_module = "universality.engine.families.group.report"
  view_module = "universality.engine.families.group.view"

  def add_config(self, cfg) -> None:
    cfg.task = ml_collections.ConfigDict()
    cfg.task.groups = "S5"
    cfg.task.train_frac = "0.4"
    cfg.task.train_frac_by_group = ""
    cfg.task.bucket_padding = 0.25   # a bucket's largest order <= (1 + this) x its smallest (``buckets``)
    cfg.task.size_mult = ""          # multipliers of n = mult · c · s · M ln M (replaces train_frac)
    cfg.task.size_c = task_lib.LAW_C
    cfg.task.size_s = 0.0            # 0: from the group (task.law_s)
    cfg.task.loss = "xent"           # or "mse" (task.LOSSES)
    cfg.model = ml_collections.ConfigDict()
    cfg.model.name = "mlp"
    cfg.model.mlp = ml_collections.ConfigDict()
    cfg.model.mlp.embed_dim = 256   # E: width of each of the two input embeddings
    cfg.model.mlp.hidden = 128      # N: ReLU neurons between the concatenated embeddings and the unembedding
    cfg.model.li2 = ml_collections.ConfigDict()
    cfg.model.li2.hidden = 512           # K: hidden nodes of the Li2 network
    cfg.model.li2.activation = "square"  # models.ACTIVATIONS
    cfg.model.transformer = ml_collections.ConfigDict()
    cfg.model.transformer.d_model = 128   # residual stream width
    cfg.model.transformer.n_heads = 4     # attention heads; must divide d_model
    cfg.model.transformer.d_mlp = 512     # N: ReLU neurons of each MLP block
    cfg.model.transformer.n_layers = 1    # blocks (attention + MLP, no LayerNorm)
    cfg.analysis.update(fields.CONVERGENT)  # Convergent Learning passes on the hidden layer (off by default)

  def validate(self, cfg) -> None:
    for spec in group_specs(cfg):
      try:
        groups_lib.parse(spec)
      except groups_lib.GroupError as e:
        raise ValueError(f"config.task.groups: {e}") from None
    _check_group_identities(group_specs(cfg))
    if cfg.model.name not in models.NAMES:
      raise ValueError(f"config.model.name: must be one of {models.NAMES}, got {cfg.model.name!r}")
    for name in ("embed_dim", "hidden"):
      fields.int_field(cfg.model.mlp, name, 1, "model.mlp.")
    for name in ("d_model", "n_heads", "d_mlp", "n_layers"):
      fields.int_field(cfg.model.transformer, name, 1, "model.transformer.")
    t = cfg.model.transformer
    if t.d_model % t.n_heads:
      raise ValueError(f"config.model.transformer.n_heads: {t.n_heads} does not divide d_model={t.d_model}")
    for v in (() if size_mults(cfg) else fields.parse_floats(cfg.task.train_frac, "task.train_frac")):
      if not 0 < v <= 1:
        raise ValueError(f"config.task.train_frac: must lie in (0, 1], got {v}")
    unknown = sorted(set(train_frac_by_group(cfg)) - set(group_specs(cfg)))
    if unknown:
      raise ValueError(f"config.task.train_frac_by_group: {unknown} not in config.task.groups")
    if cfg.task.loss not in task_lib.LOSSES:
      raise ValueError(f"config.task.loss: must be one of {tuple(task_lib.LOSSES)}, got {cfg.task.loss!r}")
    fields.int_field(cfg.model.li2, "hidden", 1, "model.li2.")
    if cfg.model.li2.activation not in models.ACTIVATIONS:
      raise ValueError(f"config.model.li2.activation: must be one of {models.ACTIVATIONS}, got "
                       f"{cfg.model.li2.activation!r}")
    for name in ("size_c", "size_s"):
      v = cfg.task[name]
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"config.task.{name}: expected a finite number >= 0, got {v!r}")
    if not cfg.task.size_c > 0:
      raise ValueError(f"config.task.size_c: must be > 0, got {cfg.task.size_c!r}")
    mults = size_mults(cfg)
    if any(not m > 0 for m in mults):
      raise ValueError(f"config.task.size_mult: multipliers must be > 0, got {cfg.task.size_mult!r}")
    if mults and (cfg.task.train_frac.strip() not in ("", TRAIN_FRAC_DEFAULT) or train_frac_by_group(cfg)):
      raise ValueError("config.task.size_mult: give either size_mult or train_frac/train_frac_by_group, not both "
                       "(set task.train_frac='' to sweep size_mult)")
    fields.convergent_values(cfg.analysis)
    padding = cfg.task.bucket_padding
    if isinstance(padding, bool) or not isinstance(padding, (int, float)) or not 0 <= padding < math.inf:
      raise ValueError(f"config.task.bucket_padding: expected a finite number >= 0, got {padding!r}")

  def buckets(self, cfg) -> list[tuple[str, Any]]:
    """The groups cut by order (module docstring); one bucket: ``cfg`` itself."""
    orders = [(spec, groups_lib.order_of(spec)) for spec in group_specs(cfg)]
    cut = order_buckets(orders, float(cfg.task.bucket_padding))
    order = dict(orders)
    if len(cut) == 1:
      return [(bucket_name([order[s] for s in cut[0]]), cfg)]
    return [(bucket_name([order[s] for s in specs]), bucket_config(cfg, specs)) for specs in cut]

  def runs(self, cfg) -> list[dict]:
    out = []
    mults = size_mults(cfg)
    for spec in group_specs(cfg):
      fracs = train_fracs(cfg, spec)
      for lr in fields.parse_floats(cfg.opt.lr, "opt.lr"):
        for wd in fields.parse_floats(cfg.opt.weight_decay, "opt.weight_decay"):
          for i_frac, frac in enumerate(fracs):
            for k in fields.seed_numbers(cfg):
              row = dict(group=spec, seed=k, base_seed=int(cfg.seed), lr=lr, weight_decay=wd, train_frac=frac)
              if mults:
                row["size_mult"] = mults[i_frac]
              row["cohort"] = cohort_name(row)
              row["name"] = run_name(row)
              out.append(row)
    return out

  def n_runs(self, cfg) -> int:
    per_frac = (len(fields.parse_floats(cfg.opt.lr, "opt.lr"))
                * len(fields.parse_floats(cfg.opt.weight_decay, "opt.weight_decay")) * int(cfg.seeds))
    return sum(per_frac * len(train_fracs(cfg, spec)) for spec in group_specs(cfg))

  def footprint(self, cfg) -> families.Footprint:
    """From the group orders of the specs (no Cayley table is built) and the model's abstract init."""
    orders = {spec: groups_lib.order_of(spec) for spec in group_specs(cfg)}
    vocab = max(orders.values())
    n_train = [task_lib.n_train_pairs(n, f) for spec, n in orders.items() for f in train_fracs(cfg, spec)]
    n_test = [n * n - task_lib.n_train_pairs(n, f) for spec, n in orders.items() for f in train_fracs(cfg, spec)]
    p, q = max(n_train), max(1, max(n_test))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    spec = models.spec_of(cfg.model)
    params = jax.eval_shape(lambda k: models.init(k, spec, vocab), key)
    batch = max(int(cfg.batch_size) or p, p, q)  # the evaluation runs on all train and all test pairs
    return families.Footprint(params=params, data=16 * (p + q) + 8,  # a, b, c, weight per pair
                              step=4 * models.activation_floats(spec, batch, vocab))

  def migrate(self, stored: dict, version: int) -> dict:
    """A format-1 (flat) config as a format-2 (nested) one; execution settings are dropped. Format 1 was
    written by this family alone."""
    if version != 1:
      return stored
    get = stored.get
    return {
        "family": "group",
        "seeds": get("seeds"), "seed": get("seed"), "seed_offset": get("seed_offset", 0),
        "steps": get("steps"), "eval_every": get("eval_every"), "batch_size": get("batch_size", 0),
        "num_checkpoints": get("num_checkpoints"),
        "task": {"groups": get("groups"), "train_frac": get("train_frac"),
                 "train_frac_by_group": get("train_frac_by_group", "")},
        "model": {"name": get("model"),
                  "mlp": {"embed_dim": get("embed_dim"), "hidden": get("hidden")},
                  "transformer": {"d_model": get("d_model"), "n_heads": get("n_heads"), "d_mlp": get("d_mlp"),
                                  "n_layers": get("n_layers")}},
        "opt": {"lr": get("lr"), "weight_decay": get("weight_decay"), "b1": get("b1"), "b2": get("b2"),
                "eps": get("eps")},
    }

  def param_roles(self, params):
    return models.param_roles(params)

  def cohort_name(self, row) -> str:
    return cohort_name(row)

  def run_key(self, row):
    return task_lib.run_key(int(row["base_seed"]), int(row["seed"]), groups_lib.get(row["group"]))

  def make_task(self, cfg, rows) -> families.Task:
    splits = [task_lib.split(groups_lib.get(r["group"]), r["train_frac"], int(r["base_seed"]), int(r["seed"]))
              for r in rows]
    data = task_lib.stack(splits)
    vocab = data.vocab
    model_cfg = models.spec_of(cfg.model)  # typed and frozen from here on
    is_mlp = isinstance(model_cfg, models.MlpSpec)
    loss_name = cfg.task.get("loss", "xent")
    task_loss = task_lib.LOSSES[loss_name]
    batch_size = int(cfg.batch_size)

    def init(key, d, shared):
      return models.init(jax.random.fold_in(key, 0), model_cfg, vocab, d.order_S)

    def loss(params, a_B, b_B, c_B, w_B, order):
      logits_BxV, _ = models.apply(params, a_B, b_B, model_cfg)
      return task_loss(logits_BxV, c_B, w_B, order)

    def batch(key, step, d):
      """The step's training pairs: all of them, or ``batch_size`` drawn with ``fold_in(key, step)``."""
      if not batch_size:
        return d.train_a_SxP, d.train_b_SxP, d.train_c_SxP, d.train_w_SxP
      bkey = jax.random.fold_in(jax.random.fold_in(key, 1), step)
      idx_B = jax.random.randint(bkey, (batch_size,), 0, d.n_train_S)
      w_B = jnp.full((batch_size,), 1.0 / batch_size, jnp.float32)
      return d.train_a_SxP[idx_B], d.train_b_SxP[idx_B], d.train_c_SxP[idx_B], w_B

    def loss_and_grads(params, key, step, d, shared):
      a_B, b_B, c_B, w_B = batch(key, step, d)
      if is_mlp and loss_name == "xent":  # the hand-written backward: fewer passes over the activations
        return models.mlp_xent_grads(params, a_B, b_B, c_B, w_B, d.order_S)
      (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, a_B, b_B, c_B, w_B, d.order_S)
      return value, grads

    def evaluate(params, d, shared):
      train_loss, train_acc = loss(params, d.train_a_SxP, d.train_b_SxP, d.train_c_SxP, d.train_w_SxP,
                                   d.order_S)
      test_loss, test_acc = loss(params, d.test_a_SxP, d.test_b_SxP, d.test_c_SxP, d.test_w_SxP, d.order_S)
      no_test = jnp.sum(d.test_w_SxP) == 0  # train_frac = 1: the test metrics are undefined
      nan = jnp.float32(jnp.nan)
      return dict(train_loss=train_loss, train_acc=train_acc, test_loss=jnp.where(no_test, nan, test_loss),
                  test_acc=jnp.where(no_test, nan, test_acc))

    def apply(params, inputs, d, shared):
      """Logits ``[B, V]`` with classes ``>= order`` at −inf, and ``{"hidden": [B, N]}``."""
      a_B, b_B = inputs
      logits_BxV, hidden_BxN = models.apply(params, a_B, b_B, model_cfg)
      return task_lib.mask_padding(logits_BxV, d.order_S), {"hidden": hidden_BxN}

    return families.Task(data=data, init=init, loss_and_grads=loss_and_grads, evaluate=evaluate,
                         apply=apply, metrics=self.metrics)

  def check_inputs(self, data, inputs, n_runs: int):
    """``(a_SxB, b_SxB)`` as int32, each ``[n_runs, B]`` and within each run's group."""
    if len(inputs) != 2:
      raise ValueError(f"apply: expected inputs (a, b), got {len(inputs)} arrays")
    a_SxB, b_SxB = (np.asarray(x, np.int32) for x in inputs)
    if a_SxB.ndim != 2 or a_SxB.shape != b_SxB.shape or a_SxB.shape[0] != n_runs:
      raise ValueError(f"apply: a and b must both be [{n_runs}, B], got {a_SxB.shape}, {b_SxB.shape}")
    task_lib.check_pairs(a_SxB, b_SxB, data.order_S)
    return a_SxB, b_SxB

  def describe(self, cfg) -> list[str]:
    m = cfg.model
    if m.name == "mlp":
      model = f"MLP, embeddings {m.mlp.embed_dim} per input, {m.mlp.hidden} hidden ReLU neurons"
    elif m.name == "li2":
      model = f"Li2 network, one-hot inputs, {m.li2.hidden} hidden nodes ({m.li2.activation}), no biases"
    else:
      t = m.transformer
      model = (f"transformer, {t.n_layers} layer(s), d_model {t.d_model}, {t.n_heads} heads, "
               f"d_mlp {t.d_mlp}")
    by_group = cfg.task.train_frac_by_group
    groups = ", ".join(f"{spec} (order {groups_lib.get(spec).order})" for spec in group_specs(cfg))
    out = [f"- Task: composition a·b in {groups}", f"- Model: {model}"]
    if size_mults(cfg):
      s_text = ", ".join(f"{spec} {law_s(cfg, spec):g}" for spec in group_specs(cfg))
      out.append(f"- Training pairs: n = mult · c · s · M ln M, mult {cfg.task.size_mult}, c "
                 f"{float(cfg.task.size_c):g}, s {s_text}")
    else:
      fracs = ", ".join(f"{v:g}" for v in fields.parse_floats(cfg.task.train_frac, "task.train_frac"))
      out.append(f"- Train fraction: {fracs} of the |G|² pairs" + (f" ({by_group})" if by_group else ""))
    if cfg.task.get("loss", "xent") == "mse":
      out.append("- Loss: MSE of the centred logits against the centred one-hot")
    return out


FAMILY = GroupFamily()
