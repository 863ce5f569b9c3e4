"""Open a run directory in a notebook: config, runs, checkpoints, metrics; apply and re-analyse any step.

  run = engine.replay.open("runs/default")
  run.runs                       # one row per leading index of the stacked state (runs.json)
  s4 = run.select(group="S4")    # a view on some runs; every accessor below respects it
  one = s4.select(seed=3)        # seed = the seed NUMBER k (runs.json "seed_index"), not the base seed
  params = s4.params()           # stacked params of the newest checkpoint, numpy, on the host
  logits, hidden = s4.apply(step=run.steps[3])    # on all |G|² pairs of the group
  logits, hidden = s4.apply(None, (a_B, b_B))     # on chosen pairs, the same for every selected run
  res = s4.analyze(step=run.steps[5])             # the analysis of engine.analysis at that checkpoint
  run.summary()                  # analysis/summary.json as saved at the end of the launch
  s4.plot.learning_order(seed=0) # matplotlib figures (the report draws the same ones)
  cmp = s4.compare_neurons(0, 1) # correlation and one-to-one matching of two seeds' hidden neurons

Selection fields: ``group``, ``seed`` (the seed number k; runs.json stores it as "seed_index", which is
accepted too), ``base_seed`` (runs.json "seed", the config's base seed), ``lr``, ``weight_decay``,
``train_frac``, ``name`` and ``index`` (the run's leading index in the run directory). A value may be a list
of accepted values; floats compare with a relative tolerance of 1e-9.

Everything is read from JSON files and Orbax checkpoints; nothing in a run directory is executed or
unpickled. Checkpoints hold the unpadded stacked state as numpy arrays (``launch.host_state_spec``), so they
restore onto the local host whatever device layout (devices, processes) wrote them.
"""

from __future__ import annotations

import builtins
import collections
import json
import math
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from engine import checkpoint as checkpoint_lib
from engine import launch
from engine import plots

SUMMARY = os.path.join("analysis", "summary.json")
# Fields ``select`` accepts, mapped to the runs.json field they read.
SELECT_FIELDS = {"group": "group", "seed": "seed_index", "seed_index": "seed_index", "base_seed": "seed",
                 "lr": "lr", "weight_decay": "weight_decay", "train_frac": "train_frac", "name": "name",
                 "index": None}
_STATE_CACHE = 2  # restored train states kept in memory (each holds params and two Adam moments)


def _matches(value, accepted) -> bool:
  if isinstance(accepted, (list, tuple, set, frozenset, range, np.ndarray)):
    return any(_matches(value, a) for a in accepted)
  if isinstance(value, float) or isinstance(accepted, float):
    try:
      return math.isclose(float(value), float(accepted), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
      return False
  return value == accepted


class Run:
  """A read-only view of a run directory, optionally restricted to a subset of its runs."""

  def __init__(self, workdir: str, index: Sequence[int] | None = None, _shared: dict | None = None):
    self.workdir = os.path.abspath(workdir)
    self._shared = _shared if _shared is not None else {}
    if "config" not in self._shared:
      path = os.path.join(self.workdir, "config.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"{self.workdir} is not a run directory (no config.json)")
      with builtins.open(path) as f:
        self._shared["config"] = ml_collections.ConfigDict(json.load(f))
      self._shared["config"].lock()
      with builtins.open(os.path.join(self.workdir, "runs.json")) as f:
        self._shared["runs"] = json.load(f)
    n = len(self._shared["runs"])
    self.index = np.arange(n) if index is None else np.asarray(index, dtype=np.int64)
    self.plot = Plots(self)

  # --- Metadata ------------------------------------------------------------------------------------

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self._shared["config"]

  @property
  def runs(self) -> list[dict]:
    """One row per selected run: name, group, seed (base seed), seed_index (seed number k), lr,
    weight_decay, train_frac."""
    rows = self._shared["runs"]
    return [rows[i] for i in self.index]

  @property
  def groups(self) -> list[str]:
    """The group specs of the selected runs, in run order."""
    return list(dict.fromkeys(r["group"] for r in self.runs))

  @property
  def steps(self) -> list[int]:
    """Checkpointed steps, ascending."""
    return self._checkpointer().steps()

  def __len__(self) -> int:
    return len(self.index)

  def __repr__(self) -> str:
    return f"Run({self.workdir!r}, runs={len(self)}, groups={self.groups}, steps={self.steps[-1:]})"

  def select(self, **filters) -> "Run":
    """The selected runs whose fields equal the given values (see the module docstring for the fields).

    ``seed`` is the seed number k (runs.json "seed_index"); use ``base_seed`` for the config's base seed.
    Raises ValueError for an unknown field or when no run matches.
    """
    unknown = sorted(set(filters) - set(SELECT_FIELDS))
    if unknown:
      raise ValueError(f"select: unknown field {unknown[0]!r}; fields: {', '.join(SELECT_FIELDS)}")
    rows = self._shared["runs"]

    def field(i, name):
      return int(i) if SELECT_FIELDS[name] is None else rows[i].get(SELECT_FIELDS[name])

    keep = [int(i) for i in self.index
            if all(_matches(field(i, k), v) for k, v in filters.items())]
    if not keep:
      have = {k: sorted({field(i, k) for i in self.index}, key=str) for k in filters}
      raise ValueError(f"select: no run matches {filters}; the selection has "
                       + "; ".join(f"{k} in {v}" for k, v in have.items()))
    return Run(self.workdir, keep, self._shared)

  def _one_group(self, group: str | None) -> "Run":
    """The selected runs of ``group``; with ``group=None`` the selection must hold a single group."""
    if group is not None:
      return self.select(group=group)
    if len(self.groups) != 1:
      raise ValueError(f"the selection spans groups {self.groups}: pass group=")
    return self

  def _one_run(self, group: str | None, seed: int | None, filters: dict) -> "Run":
    sub = self._one_group(group)
    if seed is not None:
      filters = dict(filters, seed=seed)
    if filters:
      sub = sub.select(**filters)
    if len(sub) != 1:
      raise ValueError(f"{len(sub)} runs match (group={group}, seed={seed}, {filters}): "
                       f"{[r['name'] for r in sub.runs][:6]}; narrow the selection")
    return sub

  # --- Checkpoints ---------------------------------------------------------------------------------

  def trainer(self):
    """The trainer rebuilt from config.json on one local host device, cached.

    Only its run layout is used here (the shapes of the checkpointed state), so it never spans processes
    or accelerators: a replay on one process of a multi-host job needs no other process.
    """
    if "trainer" not in self._shared:
      from engine import train
      try:
        device = jax.local_devices(backend="cpu")[0]
      except RuntimeError:  # a platform list without the CPU backend
        device = jax.local_devices()[0]
      mesh = jax.sharding.Mesh(np.asarray([device]), (train.AXIS,))
      self._shared["trainer"] = train.make_train(self.config, mesh=mesh)
    return self._shared["trainer"]

  def _checkpointer(self) -> checkpoint_lib.Checkpointer:
    if "ckpt" not in self._shared:
      self._shared["ckpt"] = checkpoint_lib.Checkpointer(
          os.path.join(self.workdir, "checkpoints"), read_only=True, this_process_only=True)
    return self._shared["ckpt"]

  def _step(self, step: int | None) -> int:
    steps = self.steps
    if not steps:
      raise ValueError(f"{self.workdir} has no checkpoint")
    if step is None:
      return steps[-1]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or int(step) not in steps:
      raise ValueError(f"no checkpoint at step {step!r}; checkpointed steps: {steps}")
    return int(step)

  def state(self, step: int | None = None) -> Any:
    """The stacked train state of ALL runs at ``step`` (default: newest) as host numpy arrays."""
    key = self._step(step)
    cache = self._shared.setdefault("states", collections.OrderedDict())
    if key in cache:
      cache.move_to_end(key)
    else:
      spec = launch.host_state_spec(self.trainer())
      _, cache[key] = self._checkpointer().restore(spec, step=key, fallback=False)
      while len(cache) > _STATE_CACHE:
        cache.popitem(last=False)
    return cache[key]

  def params(self, step: int | None = None) -> Any:
    """Stacked parameters of the selected runs at ``step`` (default: the newest checkpoint)."""
    return jax.tree.map(lambda x: np.asarray(x)[self.index], self.state(step).params)

  def metrics(self) -> dict[str, np.ndarray]:
    """metrics.jsonl as arrays: "step" [E] and every metric [E, S] for the selected runs."""
    m = launch.read_metrics(self.workdir)
    return {k: (v if k == "step" else v[:, self.index]) for k, v in m.items()}

  # --- Evaluation ----------------------------------------------------------------------------------

  def orders(self) -> np.ndarray:
    """int ``[S]``: the group order of each selected run."""
    from engine import groups
    return np.asarray([groups.get(r["group"]).order for r in self.runs], np.int64)

  def _apply_fn(self):
    if "apply_fn" not in self._shared:
      from engine import models
      cfg = self.config
      self._shared["apply_fn"] = jax.jit(jax.vmap(lambda p, a, b: models.apply(p, a, b, cfg)))
    return self._shared["apply_fn"]

  def _inputs(self, inputs, b) -> tuple[np.ndarray, np.ndarray]:
    """``(a_SxB, b_SxB)`` from the forms ``apply`` accepts, checked against each run's group."""
    if inputs is None and b is None:
      a_arr, b_arr = self.pairs()
    elif b is not None:
      a_arr, b_arr = np.asarray(inputs), np.asarray(b)
    elif isinstance(inputs, tuple):
      if len(inputs) != 2:
        raise ValueError(f"apply: a tuple of inputs must be (a, b), got {len(inputs)} items")
      a_arr, b_arr = np.asarray(inputs[0]), np.asarray(inputs[1])
    else:
      pairs = np.asarray(inputs)
      if pairs.ndim not in (2, 3) or pairs.shape[-1] != 2:
        raise ValueError(f"apply: inputs must be (a, b) or pairs [B, 2] / [S, B, 2], got shape {pairs.shape}")
      a_arr, b_arr = pairs[..., 0], pairs[..., 1]
    s = len(self)
    for name, x in (("a", a_arr), ("b", b_arr)):
      if x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"apply: {name} must hold integer group elements, got dtype {x.dtype}")
    if a_arr.shape != b_arr.shape or a_arr.ndim not in (1, 2) or (a_arr.ndim == 2 and a_arr.shape[0] != s):
      raise ValueError(f"apply: a and b must both be [B] or [{s}, B], got {a_arr.shape} and {b_arr.shape}")
    a_arr = np.broadcast_to(a_arr, (s, a_arr.shape[-1])).astype(np.int32)
    b_arr = np.broadcast_to(b_arr, (s, b_arr.shape[-1])).astype(np.int32)
    if a_arr.size and (min(a_arr.min(), b_arr.min()) < 0
                       or (np.maximum(a_arr, b_arr) >= self.orders()[:, None]).any()):
      raise ValueError("apply: inputs must be group elements 0 .. order-1 of each selected run's group")
    return a_arr, b_arr

  def apply(self, step: int | None = None, inputs=None, b=None, *,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and hidden activations of the selected runs at a checkpoint, on the host.

    Args:
      step: a checkpointed step (default: the newest).
      inputs: None for all |G|² pairs of each run's own group (see ``pairs``); a tuple ``(a, b)``; an int
        array of pairs ``[B, 2]`` or ``[S, B, 2]``; or ``a`` itself when ``b`` is given. ``a``/``b`` are
        ``[B]`` (the same inputs for every selected run) or ``[S, B]``.
      b: the second inputs, when ``inputs`` is ``a``.
      batch_size: evaluate at most this many inputs per call (bounds memory on large groups).

    Returns:
      ``(logits_SxBxV, hidden_SxBxN)`` float32 numpy; logits of padded classes (``>=`` a run's group order
      in a mixed-group run directory) are −inf, as in training.
    """
    a_SxB, b_SxB = self._inputs(inputs, b)
    params = self.params(step)
    fn = self._apply_fn()
    n_in = a_SxB.shape[1]
    size = n_in if not batch_size else int(batch_size)
    if size < 1:
      raise ValueError(f"apply: batch_size must be positive, got {batch_size}")
    logits, hidden = [], []
    for lo in range(0, max(n_in, 1), size):
      lg, hd = fn(params, a_SxB[:, lo:lo + size], b_SxB[:, lo:lo + size])
      logits.append(np.asarray(lg, np.float32))
      hidden.append(np.asarray(hd, np.float32))
    logits_SxBxV = np.concatenate(logits, axis=1)
    hidden_SxBxN = np.concatenate(hidden, axis=1)
    classes_V = np.arange(logits_SxBxV.shape[-1])
    mask_SxBxV = np.broadcast_to(classes_V[None, None, :] < self.orders()[:, None, None], logits_SxBxV.shape)
    return np.where(mask_SxBxV, logits_SxBxV, np.float32(-np.inf)), hidden_SxBxN

  def pairs(self) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (a, b) of each selected run's group, padded with (0, 0) to the largest |G|²: ``a_SxP``."""
    orders = self.orders()
    p = int(max(orders)) ** 2
    a = np.zeros((len(self), p), np.int32)
    b = np.zeros((len(self), p), np.int32)
    for i, n in enumerate(orders):
      a[i, : n * n] = np.repeat(np.arange(n), n)
      b[i, : n * n] = np.tile(np.arange(n), n)
    return a, b

  def hidden(self, step: int | None = None, group: str | None = None,
             batch_size: int | None = None) -> np.ndarray:
    """``acts_SxTxN``: hidden activations of the selected runs of one group on all T = |G|² pairs
    (pair ``a·|G| + b``), the inputs every cross-seed analysis compares."""
    sub = self._one_group(group)
    n = int(sub.orders()[0])
    a_T = np.repeat(np.arange(n, dtype=np.int32), n)
    b_T = np.tile(np.arange(n, dtype=np.int32), n)
    return sub.apply(step, (a_T, b_T), batch_size=batch_size)[1]

  # --- Analysis ------------------------------------------------------------------------------------

  def close(self) -> None:
    """Releases the checkpoint reader (shared by every view of this run directory)."""
    ckpt = self._shared.pop("ckpt", None)
    if ckpt is not None:
      ckpt.close()

  def __enter__(self) -> "Run":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _matrices_fn(self):
    """Jitted stacked embedding matrices (pipeline.matrices_fn_for), built once per run directory."""
    if "matrices_fn" not in self._shared:
      from engine.analysis import pipeline
      self._shared["matrices_fn"] = pipeline.matrices_fn_for(self.config)
    return self._shared["matrices_fn"]

  def summary(self) -> dict:
    """analysis/summary.json as written at the end of the launch (schema: engine.analysis.workdir)."""
    path = os.path.join(self.workdir, SUMMARY)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: run engine.analysis.workdir.analyze({self.workdir!r})")
    mtime = os.stat(path).st_mtime_ns
    cached = self._shared.get("summary")
    if cached is None or cached[0] != mtime:
      with builtins.open(path) as f:
        cached = (mtime, json.load(f))
      self._shared["summary"] = cached
    return cached[1]

  def _analysis_key(self, seed: int, spec: str):
    """The PRNG key engine.analysis.workdir.analyze gives group ``spec`` (its index among all groups)."""
    specs = list(dict.fromkeys(r["group"] for r in self._shared["runs"]))
    return jax.random.fold_in(jax.random.PRNGKey(seed), specs.index(spec))

  def analyze(self, step: int | None = None, *, threshold: float | None = None,
              universal_threshold: float | None = None, seed: int = 0,
              batch_size: int | None = None) -> dict[str, dict]:
    """Re-runs the analysis on the selected runs as if ``step`` were the last checkpoint.

    Runs ``engine.analysis.pipeline.analyze_group`` per group over the checkpoints up to ``step`` (default:
    all), with the PRNG keys ``engine.analysis.workdir.analyze`` uses, and writes nothing. Thresholds
    default to the pipeline's defaults (0.05 and 0.5).

    Returns:
      ``{group spec: {"group": ..., "aggregate": ..., "runs": [record, ...]}}``, one record per selected run
      of the group with the fields of a summary.json run record (``index``, the runs.json row, ``final``:
      the logged metrics at ``step`` or None, ``generalised``, and every field of
      ``pipeline.analyze_group``). With all runs of a group selected and ``step`` the last checkpoint, this
      equals the group's entries of summary.json; a subset of seeds changes the cross-seed numbers (and
      their random rotation baseline), not the per-run irrep numbers.
    """
    from engine import groups as groups_lib
    from engine import irreps as irreps_lib
    from engine.analysis import cross_seed
    from engine.analysis import pipeline
    from engine.analysis import representation

    final = self._step(step)
    steps = [s for s in self.steps if s <= final]
    threshold = representation.DEFAULT_THRESHOLD if threshold is None else float(threshold)
    universal_threshold = (cross_seed.DEFAULT_UNIVERSAL_THRESHOLD if universal_threshold is None
                           else float(universal_threshold))
    subs = {spec: self.select(group=spec) for spec in self.groups}
    params_by_group: dict[str, dict] = {spec: {} for spec in subs}
    for s in steps:  # restore each checkpoint once for all groups
      for spec, sub in subs.items():
        params_by_group[spec][s] = sub.params(s)
    logged = self._metrics_at(final)
    matrices_fn = self._matrices_fn()
    out = {}
    for spec, sub in subs.items():
      group = groups_lib.get(spec)
      res = pipeline.analyze_group(group, irreps_lib.real_irreps(group), self._apply_fn(), matrices_fn,
                                   params_by_group[spec], sub.runs, threshold=threshold,
                                   universal_threshold=universal_threshold,
                                   key=self._analysis_key(seed, spec), batch_size=batch_size)
      records = []
      for i, rec in zip(sub.index, res["runs"]):
        row = dict(self._shared["runs"][int(i)], index=int(i))
        row["final"] = logged[int(i)]
        acc = None if row["final"] is None else row["final"].get("test_acc")
        row["generalised"] = bool(acc is not None and acc >= launch.GENERALISED_ACC)
        row.update({k: v for k, v in rec.items() if k != "run"})
        records.append(row)
      out[spec] = {"group": res["group"], "aggregate": res["aggregate"], "runs": records}
    return out

  def _metrics_at(self, step: int) -> dict[int, dict | None]:
    """Logged metrics of every run at ``step`` (None where that step was not logged, e.g. step 0)."""
    m = launch.read_metrics(self.workdir)
    rows = np.flatnonzero(m["step"] == step)
    out: dict[int, dict | None] = {}
    for i in range(len(self._shared["runs"])):
      if not rows.size:
        out[i] = None
        continue
      vals = {k: float(v[rows[-1], i]) for k, v in m.items() if k != "step"}
      out[i] = {k: (v if np.isfinite(v) else None) for k, v in vals.items()}
    return out

  def irrep_names(self, group: str | None = None) -> list[str]:
    """Names of the real irreps of the selected group, trivial first (the analysis' order)."""
    from engine import groups as groups_lib
    from engine import irreps as irreps_lib
    spec = self._one_group(group).groups[0]
    return [r.name for r in irreps_lib.real_irreps(groups_lib.get(spec))]

  def neuron_irreps(self, step: int | None = None, group: str | None = None) -> dict:
    """Each hidden neuron's split over irreps for the selected runs of one group, as the analysis computes
    it (MLP: from its pre-activation P_a[a] + P_b[b]; transformer: from its activation as a function of a·b).

    Returns numpy ``share_SxNxR``, ``dominant_SxN``, ``dominant_share_SxN`` and ``irreps`` (names).
    """
    from engine import groups as groups_lib
    from engine import irreps as irreps_lib
    from engine.analysis import pipeline
    from engine.analysis import representation
    sub = self._one_group(group)
    grp = groups_lib.get(sub.groups[0])
    tables = representation.irrep_tables(grp, irreps_lib.real_irreps(grp))
    g = grp.order
    if self.config.model == "mlp":
      mats = self._matrices_fn()(sub.params(step))
      res = representation.neuron_irreps(np.asarray(mats["pre_a"])[:, :g], np.asarray(mats["pre_b"])[:, :g],
                                         grp, tables)
    else:
      hidden = sub.hidden(step).reshape(len(sub), g, g, -1)
      res = pipeline.neuron_irreps_from_hidden(hidden, grp, tables)
    out = {k: np.asarray(v) for k, v in res.items()}
    out["irreps"] = list(tables.names)
    return out

  def neuron_correlations(self, step: int | None = None, group: str | None = None, *,
                          universal_threshold: float | None = None, seed: int = 0) -> dict:
    """Per-neuron cross-seed correlations of the selected runs of one group (``cross_seed``), with the
    rotation-baseline key of the analysis: for all runs of a group at the last checkpoint these are the
    arrays behind the summary's ``correlation`` aggregate.

    Returns numpy ``max_SxNxS``, ``argmax_SxNxS``, ``baseline_max_SxNxS``, ``excess_SxN``, ``universal_SxN``,
    ``dead_SxN`` (constant neurons, as the analysis counts them) and ``universal_fraction_S``.
    """
    from engine.analysis import cross_seed
    sub = self._one_group(group)
    if universal_threshold is None:
      universal_threshold = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD
    acts_SxTxN = sub.hidden(step)
    k_corr, _ = jax.random.split(self._analysis_key(seed, sub.groups[0]))
    res = {k: np.asarray(v) for k, v in cross_seed.neuron_correlations(
        acts_SxTxN, key=k_corr, universal_threshold=universal_threshold).items()}
    res["dead_SxN"] = res["dead_SxN"].astype(bool) | ~np.asarray(cross_seed.live_neurons(acts_SxTxN))
    return res

  def compare_neurons(self, seed_a: int, seed_b: int, group: str | None = None, step: int | None = None,
                      **filters) -> dict:
    """Two runs' hidden neurons on all pairs of their group: correlation, matching and dominant irreps.

    ``seed_a``/``seed_b`` are seed numbers k; ``filters`` (e.g. ``lr=1e-3``) narrow a sweep to one run each.

    Returns:
      dict: ``corr_NxM`` (float64 Pearson correlation of run A's neuron n with run B's neuron m; NaN for a
      dead neuron), ``perm_N`` (B's partner of A's neuron n in the maximum-weight one-to-one matching,
      ``engine.analysis.match_neurons``), ``matched_corr_N``, ``dominant_a_N`` / ``dominant_b_M`` (irrep
      indices), ``share_a_NxR`` / ``share_b_MxR``, ``live_a_N`` / ``live_b_M``, ``irreps`` (names),
      ``runs`` (the two runs.json rows), ``mean_matched_corr`` and ``same_dominant`` (share of matched
      live pairs with the same dominant irrep).
    """
    from engine.analysis import cross_seed
    run_a = self._one_run(group, seed_a, filters)
    run_b = self._one_run(group, seed_b, filters)
    if run_a.groups != run_b.groups:
      raise ValueError(f"compare_neurons: runs of different groups {run_a.groups} and {run_b.groups}")
    pair = Run(self.workdir, [int(run_a.index[0]), int(run_b.index[0])], self._shared)
    acts_2xTxN = pair.hidden(step)
    match = cross_seed.match_neurons(acts_2xTxN)
    live_2xN = np.asarray(cross_seed.live_neurons(acts_2xTxN))
    x = acts_2xTxN.astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm_2xN = np.sqrt(np.sum(x * x, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
      corr_NxM = (x[0].T @ x[1]) / (norm_2xN[0][:, None] * norm_2xN[1][None, :])
    corr_NxM = np.where(live_2xN[0][:, None] & live_2xN[1][None, :], corr_NxM, np.nan)
    neurons = pair.neuron_irreps(step)
    perm_N = np.asarray(match["perm_SxSxN"][0, 1])
    dom = neurons["dominant_SxN"]
    both = live_2xN[0] & live_2xN[1][perm_N]
    matched = np.asarray(match["matched_corr_SxSxN"][0, 1])
    return {
        "corr_NxM": corr_NxM, "perm_N": perm_N, "matched_corr_N": matched,
        "dominant_a_N": dom[0], "dominant_b_M": dom[1],
        "share_a_NxR": neurons["share_SxNxR"][0], "share_b_MxR": neurons["share_SxNxR"][1],
        "live_a_N": live_2xN[0], "live_b_M": live_2xN[1], "irreps": neurons["irreps"], "runs": pair.runs,
        "mean_matched_corr": float(np.nanmean(matched)) if np.isfinite(matched).any() else None,
        "same_dominant": float(np.mean(dom[0][both] == dom[1][perm_N][both])) if both.any() else None,
    }

  def group_summary(self, group: str | None = None) -> dict:
    """The summary's entry for one group restricted to the selected runs.

    Returns ``{"spec", "group", "aggregate", "records", "positions"}``: ``records`` are the summary's run
    records of the selected runs, ``positions`` their places in the group's S×S matrices (``aggregate`` is
    the saved one, over all runs of the group).
    """
    sub = self._one_group(group)
    spec = sub.groups[0]
    summary = self.summary()
    if spec not in summary["groups"]:
      raise ValueError(f"summary.json has no group {spec!r}; it has {sorted(summary['groups'])}")
    entry = summary["groups"][spec]
    where = {int(i): p for p, i in enumerate(entry["runs"])}
    missing = [int(i) for i in sub.index if int(i) not in where]
    if missing:
      raise ValueError(f"summary.json does not cover runs {missing} of group {spec}: re-run the analysis")
    return {"spec": spec, "group": entry["group"], "aggregate": entry["aggregate"],
            "records": [summary["runs"][int(i)] for i in sub.index],
            "positions": [where[int(i)] for i in sub.index]}


class Plots:
  """Figures of a ``Run`` view (``run.plot.<name>(...)``), drawn by ``engine.plots``; the report saves the
  same figures. Per-group figures take ``group=`` unless the selection holds a single group."""

  def __init__(self, run: Run):
    self._run = run

  def learning_curves(self):
    """Train and test accuracy of every selected run against steps (log-x), one panel per group."""
    m = self._run.metrics()
    return plots.learning_curves(m["step"], m["train_acc"], m["test_acc"], self._run.runs)

  def similarity_heatmap(self, group: str | None = None):
    """Runs × irreps logit similarity at the final step (summary.json); key irreps outlined."""
    gs = self._run.group_summary(group)
    names = [r["name"] for r in gs["group"]["irreps"]]
    sim = np.array([[np.nan if rec["logit_similarity"][n] is None else rec["logit_similarity"][n]
                     for n in names] for rec in gs["records"]], float)
    key = np.array([[n in rec["key_irreps"] for n in names] for rec in gs["records"]], bool)
    title = f"{gs['spec']}: logit similarity at step {gs['group']['steps'][-1]} (outlined: key irreps)"
    return plots.similarity_heatmap(sim, plots.run_labels(gs["records"]), names, key, title=title)

  def key_irreps(self, group: str | None = None):
    """Bars: per irrep, the selected runs in which it is key and in which it was learned first."""
    gs = self._run.group_summary(group)
    names = [r["name"] for r in gs["group"]["irreps"]]
    key = {n: sum(n in rec["key_irreps"] for rec in gs["records"]) for n in names}
    first = {n: sum(rec["first_learned"] == n for rec in gs["records"]) for n in names}
    return plots.key_irrep_bars(names, key, first, len(gs["records"]),
                                title=f"{gs['spec']}: key irreps over {len(gs['records'])} runs")

  def learning_order(self, seed: int | None = None, group: str | None = None, **filters):
    """One run (seed number ``seed``): logit similarity of each irrep over the checkpoints, the step it
    crossed the threshold, and the run's accuracies. With ``seed=None`` the selection must be one run."""
    one = self._run._one_run(group, seed, filters)
    gs = one.group_summary()
    rec = gs["records"][0]
    names = [r["name"] for r in gs["group"]["irreps"]]
    sim = np.array([[np.nan if v is None else v for v in rec["similarity_by_step"][n]] for n in names],
                   float).T
    m = one.metrics()
    title = (f"{gs['spec']} {plots.run_labels(one.runs)[0]}: learning order "
             f"{' → '.join(rec['key_irreps_in_order']) or '(no key irreps)'}")
    return plots.learning_order_run(gs["group"]["steps"], sim, names, gs["group"]["threshold"],
                                    rec["learning_order"], rec["key_irreps"], title=title,
                                    metric_steps=m["step"], test_acc=m["test_acc"][:, 0],
                                    train_acc=m["train_acc"][:, 0])

  def learning_order_group(self, group: str | None = None):
    """Every selected run of a group: the checkpoint at which each irrep crossed the threshold."""
    gs = self._run.group_summary(group)
    names = [r["name"] for r in gs["group"]["irreps"]]
    return plots.learning_order_group(gs["records"], names, gs["group"]["steps"],
                                      title=f"{gs['spec']}: learning order over {len(gs['records'])} runs")

  def correlation_distribution(self, group: str | None = None, step: int | None = None):
    """Max cross-seed correlation of each live neuron (per other run) against its rotation baseline, and
    the excess correlation, recomputed from the checkpoint (needs two or more selected runs)."""
    sub = self._run._one_group(group)
    if len(sub) < 2:
      raise ValueError("correlation_distribution needs at least two runs of the group")
    thr = None
    try:
      thr = self._run.summary().get("universal_threshold")
    except FileNotFoundError:
      pass
    res = sub.neuron_correlations(step, universal_threshold=thr)
    s = len(sub)
    live_SxN = ~res["dead_SxN"]
    sel = live_SxN[:, :, None] & ~np.eye(s, dtype=bool)[:, None, :]
    thr = 0.5 if thr is None else thr
    title = f"{sub.groups[0]}: neuron correlations across {s} runs at step {sub._step(step)}"
    return plots.correlation_distribution(res["max_SxNxS"][sel], res["baseline_max_SxNxS"][sel],
                                          res["excess_SxN"][live_SxN], thr, title=title)

  def cka(self, group: str | None = None, measure: str = "cka"):
    """The S×S matrix of ``measure`` (``cka``, ``procrustes``, ``mutual_knn`` or ``matching``) between
    the selected runs' hidden representations at the final step (summary.json)."""
    gs = self._run.group_summary(group)
    agg = gs["aggregate"]
    if measure == "matching":
      m = None if agg.get("matching") is None else agg["matching"]["mean_matched_corr"]
    elif measure in ("cka", "procrustes", "mutual_knn"):
      m = agg.get(measure)
    else:
      raise ValueError(f"unknown measure {measure!r}; expected cka, procrustes, mutual_knn or matching")
    if m is None:
      raise ValueError(f"summary.json has no {measure} matrix for {gs['spec']} (fewer than two runs?)")
    pos = gs["positions"]
    m = np.array([[np.nan if v is None else v for v in row] for row in m], float)[np.ix_(pos, pos)]
    vmax = 2 ** 0.5 if measure == "procrustes" else 1.0
    labels = {"cka": "linear CKA", "procrustes": "Procrustes distance", "mutual_knn": "mutual k-NN",
              "matching": "mean matched neuron correlation"}
    return plots.matrix(m, plots.run_labels(gs["records"]), title=f"{gs['spec']}: {labels[measure]}",
                        vmin=0.0, vmax=vmax, cmap="viridis_r" if measure == "procrustes" else "viridis")

  def neurons(self, seed_a: int, seed_b: int, group: str | None = None, step: int | None = None,
              **filters):
    """Two seeds' hidden neurons: correlation matrix in matched order, matched correlations, and the
    dominant irreps of matched pairs (``Run.compare_neurons``)."""
    cmp = self._run.compare_neurons(seed_a, seed_b, group, step, **filters)
    labels = tuple(plots.run_labels(cmp["runs"]))
    if labels[0] == labels[1]:
      labels = (f"{labels[0]} (A)", f"{labels[1]} (B)")
    return plots.neuron_comparison(
        cmp["corr_NxM"], cmp["dominant_a_N"], cmp["dominant_b_M"], cmp["perm_N"], cmp["irreps"],
        cmp["live_a_N"], cmp["live_b_M"], labels=labels,
        title=f"{cmp['runs'][0]['group']}: hidden neurons of {labels[0]} vs {labels[1]} at step "
              f"{self._run._step(step)}")


def open(workdir: str) -> Run:  # noqa: A001 - mirrors the builtin on purpose: replay.open(workdir)
  """Opens a run directory written by ``experiments/group_universality.py`` (read-only)."""
  return Run(workdir)
