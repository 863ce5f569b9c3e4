"""The notebook view of a group-composition run directory: ``universality.engine.view.Run`` plus the group accessors.

  run = universality.engine.replay.open("runs/default")       # a View
  s4 = run.select(group="S4")
  logits, hidden = s4.apply(step=run.steps[3])    # on all |G|² pairs of the group
  logits, hidden = s4.apply(None, (a_B, b_B))     # on chosen pairs, the same for every selected run
  s4.neuron_irreps(); s4.neuron_correlations(); run.compare_neurons(0, 1, group="S4")
  s4.convergent()["hidden"]["one_to_one"]         # Convergent Learning records (analysis.convergent=True)
  s4.plot.learning_order(seed=0)                  # matplotlib figures (the report draws the same ones)

Per-cohort accessors (``group_summary``, the plots) need the selection to hold one cohort: a group swept over
several learning rates is narrowed with ``select(lr=...)`` or the accessor's filters.

Local shape letters:

  A  the subgroups of a group (coset neurons)
  Y  the two kinds of coset: left (aH) and right (Ha)
"""

from __future__ import annotations

import jax
import numpy as np

from universality.engine import fields
from universality.engine import groups as groups_lib
from universality.engine import irreps as irreps_lib
from universality.engine import plots
from universality.engine.families.group import plots as group_plots
from universality.engine import view as view_lib
from universality.engine.families.group.passes import connectivity
from universality.engine.families.group.passes import cosets
from universality.engine.analysis import convergent
from universality.engine.analysis import cross_seed
from universality.engine.analysis import driver
from universality.engine.families.group.passes import neuron_split
from universality.engine.families.group.passes import records
from universality.engine.families.group.passes import representation
from universality.engine.families.group import models
from universality.engine.families.group import task as task_lib


class View(view_lib.Run):
  """A read-only view of a group-composition run directory (see the module docstring)."""

  def __init__(self, workdir: str, index=None, _shared: view_lib.Cache | None = None):
    super().__init__(workdir, index, _shared)
    self.plot = Plots(self)

  @property
  def groups(self) -> list[str]:
    """The group specs of the selected runs, in run order."""
    return list(dict.fromkeys(r["group"] for r in self.runs))

  def one_group(self, group: str | None) -> "View":
    """The selected runs of ``group``; with ``group=None`` the selection must hold a single group."""
    if group is not None:
      return self.select(group=group)
    if len(self.groups) != 1:
      raise ValueError(f"the selection spans groups {self.groups}: pass group=")
    return self

  def one_run(self, group: str | None, seed: int | None, filters: dict) -> "View":
    """The one selected run of ``group`` with seed number ``seed`` (None: any) and ``filters``."""
    sub = self.one_group(group)
    if seed is not None:
      filters = dict(filters, seed=seed)
    if filters:
      sub = sub.select(**filters)
    if len(sub) != 1:
      raise ValueError(f"{len(sub)} runs match (group={group}, seed={seed}, {filters}): "
                       f"{[r['name'] for r in sub.runs][:6]}; narrow the selection")
    return sub

  # --- Evaluation ----------------------------------------------------------------------------------

  def orders(self) -> np.ndarray:
    """int ``[S]``: the group order of each selected run."""
    return np.asarray([groups_lib.get(r["group"]).order for r in self.runs], np.int64)

  @property
  def model(self) -> models.Stacked:
    """The model over stacked runs (``models.stacked`` of config.json's model), built once per directory:
    the functions the analysis and ``apply`` evaluate."""
    if self._shared.forward is None:
      self._shared.forward = models.stacked(self.config.model)
    return self._shared.forward

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
    a_arr = np.broadcast_to(a_arr, (s, a_arr.shape[-1]))
    b_arr = np.broadcast_to(b_arr, (s, b_arr.shape[-1]))
    task_lib.check_pairs(a_arr, b_arr, self.orders())  # before the int32 cast, which would wrap
    return a_arr.astype(np.int32), b_arr.astype(np.int32)

  def apply(self, step: int | None = None, inputs=None, b=None, *,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits and hidden activations of the selected runs at a checkpoint, on the host.

    Args:
      step: a checkpointed step (default: the newest).
      inputs: None for all |G|² pairs of each run's own group (see ``pairs``); a tuple ``(a, b)``; an int
        array of pairs ``[B, 2]`` or ``[S, B, 2]``; or ``a`` itself when ``b`` is given. ``a``/``b`` are
        ``[B]`` (the same inputs for every selected run) or ``[S, B]``.
      b: the second inputs, when ``inputs`` is ``a``.
      batch_size: evaluate at most this many inputs per call (bounds memory on large groups); None: all.

    Returns:
      ``(logits_SxBxV, hidden_SxBxN)`` float32 numpy; logits of padded classes (``>=`` a run's group order
      in a mixed-group run directory) are −inf, as in training.
    """
    a_SxB, b_SxB = self._inputs(inputs, b)
    n_in = a_SxB.shape[1]
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
      raise ValueError(f"apply: batch_size must be a positive integer or None (all inputs in one call), "
                       f"got {batch_size!r}")
    if not n_in:
      raise ValueError("apply: no inputs (B = 0): pass at least one pair (a, b)")
    size = n_in if batch_size is None else int(batch_size)
    params = self.params(step)
    fn = self.model.apply
    logits, hidden = [], []
    for lo in range(0, n_in, size):
      # Every call has the same shape (the last chunk padded with the pair (0, 0)): one compilation, and
      # each input's logits do not depend on how the inputs were cut.
      a_chunk, b_chunk = a_SxB[:, lo:lo + size], b_SxB[:, lo:lo + size]
      got = a_chunk.shape[1]
      if got < size:
        pad = ((0, 0), (0, size - got))
        a_chunk, b_chunk = np.pad(a_chunk, pad), np.pad(b_chunk, pad)
      lg, hd = fn(params, a_chunk, b_chunk)
      logits.append(np.asarray(lg, np.float32)[:, :got])
      hidden.append(np.asarray(hd, np.float32)[:, :got])
    logits_SxBxV = np.concatenate(logits, axis=1)
    hidden_SxBxN = np.concatenate(hidden, axis=1)
    return np.asarray(task_lib.mask_padding(logits_SxBxV, self.orders()[:, None, None])), hidden_SxBxN

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
    sub = self.one_group(group)
    n = int(sub.orders()[0])
    a_T = np.repeat(np.arange(n, dtype=np.int32), n)
    b_T = np.tile(np.arange(n, dtype=np.int32), n)
    return sub.apply(step, (a_T, b_T), batch_size=batch_size)[1]


  def effective_weights(self, step: int | None = None) -> models.EffectiveWeights | None:
    """The selected runs' effective MLP weights at ``step`` as numpy ``[S, |G|, N]`` (rows of the first
    selected run's group; ``models.effective_weights``), or None for a model without them."""
    if self.model.effective is None:
      return None
    g = int(self.orders()[0])
    return models.EffectiveWeights(*(np.asarray(x)[:, :g] for x in self.model.effective(self.params(step))))

  def irrep_names(self, group: str | None = None) -> list[str]:
    """Names of the real irreps of the selected group, trivial first (the analysis' order)."""
    spec = self.one_group(group).groups[0]
    return [r.name for r in irreps_lib.real_irreps(groups_lib.get(spec))]

  def neuron_irreps(self, step: int | None = None, group: str | None = None) -> dict:
    """Each hidden neuron's split over irreps for the selected runs of one group, as the analysis computes
    it (MLP: from its pre-activation P_a[a] + P_b[b]; transformer: from its activation as a function of a·b).

    Returns numpy ``share_SxNxR``, ``dominant_SxN``, ``dominant_share_SxN`` and ``irreps`` (names).
    """
    sub = self.one_group(group)
    grp = groups_lib.get(sub.groups[0])
    tables = representation.irrep_tables(grp, irreps_lib.real_irreps(grp))
    g = grp.order
    eff = sub.effective_weights(step)
    if eff is not None:
      res = representation.neuron_irreps(eff.pre_a, eff.pre_b, grp, tables)
    else:
      res = neuron_split.from_hidden(sub.hidden(step).reshape(len(sub), g, g, -1), grp, tables)
    out = {k: np.asarray(v) for k, v in res.items()}
    out["irreps"] = list(tables.names)
    return out

  def cosets(self, step: int | None = None, group: str | None = None, *, threshold: float | None = None
             ) -> dict:
    """Coset neurons of the selected runs of one group (``universality.engine.families.group.passes.cosets``), as the analysis
    computes them: per run, input side (a, b) and neuron, the share of each subgroup's left / right cosets,
    the best subgroup, its coset kind, share, adjusted share and induced share.

    Returns numpy ``share_SxIxYxAxN``, ``best_SxIxN``, ``best_kind_SxIxN``, ``best_share_SxIxN``,
    ``best_adjusted_SxIxN``, ``coset_SxIxN``, ``induced_share_SxIxN``, ``source``, ``subgroups``
    (``universality.engine.groups.Subgroups``) and ``labels`` (each subgroup's class label).
    """
    sub = self.one_group(group)
    grp = groups_lib.get(sub.groups[0])
    tables = representation.irrep_tables(grp, irreps_lib.real_irreps(grp))
    g = grp.order
    if threshold is None:
      threshold = cosets.DEFAULT_COSET_THRESHOLD
    eff = sub.effective_weights(step)
    hidden = None if eff is not None else sub.hidden(step).reshape(len(sub), g, g, -1)
    f, source = cosets.input_functions(None if eff is None else eff.pre_a, None if eff is None else eff.pre_b,
                                       hidden)
    table = cosets.coset_tables(grp, tables)
    out = {k: np.asarray(v) for k, v in cosets.coset_neurons(f, grp, tables, table, threshold=threshold).items()}
    out.update(source=source, subgroups=table.subgroups, labels=cosets.class_labels(table.subgroups))
    return out

  def connectivity(self, step: int | None = None, group: str | None = None, *, points: int | None = None
                   ) -> dict:
    """Linear mode connectivity between every pair of the selected runs of one group (MLP), raw and after
    activation and weight matching (``universality.engine.families.group.passes.connectivity``):
    ``pairs_Zx2``, ``lambda_O`` and per
    alignment ``perm_ZxN``, ``loss_ZxO``, ``accuracy_ZxO``, ``barrier_Z``."""
    sub = self.one_group(group)
    if len(sub) < 2:
      raise ValueError("connectivity needs at least two runs of the group")
    grp = groups_lib.get(sub.groups[0])
    eff = sub.effective_weights(step)
    if eff is None:
      raise ValueError("connectivity interpolates the MLP's effective weights; this model has none")
    perm = cross_seed.match_neurons(sub.hidden(step))["perm_SxSxN"]
    return connectivity.connectivity(*eff, grp.table, perm, points=points or connectivity.DEFAULT_POINTS)

  def neuron_correlations(self, step: int | None = None, group: str | None = None, *,
                          universal_threshold: float | None = None, seed: int = 0) -> dict:
    """Per-neuron cross-seed correlations of the selected runs of one group (``cross_seed``), with the
    rotation-baseline key of the analysis: for all runs of a group at the last checkpoint these are the
    arrays behind the summary's ``correlation`` aggregate.

    Returns numpy ``max_SxNxS``, ``argmax_SxNxS``, ``baseline_max_SxNxS``, ``excess_SxN``, ``universal_SxN``,
    ``dead_SxN`` (constant neurons, as the analysis counts them) and ``universal_fraction_S``.
    """
    sub = self.one_group(group)
    if universal_threshold is None:
      universal_threshold = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD
    acts_SxTxN = sub.hidden(step)
    sub = sub.one_cohort()
    k_corr, _ = jax.random.split(driver.cohort_key(seed, sub.cohorts[0]))
    res = {k: np.asarray(v) for k, v in cross_seed.neuron_correlations(
        acts_SxTxN, key=k_corr, universal_threshold=universal_threshold).items()}
    res["dead_SxN"] = res["dead_SxN"].astype(bool) | ~np.asarray(cross_seed.live_neurons(acts_SxTxN))
    return res

  def compare_neurons(self, seed_a: int, seed_b: int, group: str | None = None, step: int | None = None,
                      **filters) -> dict:
    """Two runs' hidden neurons on all pairs of their group: correlation, matching and dominant irreps.

    ``seed_a``/``seed_b`` are seed numbers k; ``filters`` (e.g. ``lr=1e-3``) narrow a sweep to one run each.

    Returns:
      dict: ``corr_NxN`` (float64 Pearson correlation of run A's neuron n with run B's neuron m; NaN for a
      dead neuron), ``perm_N`` (B's partner of A's neuron n in the maximum-weight one-to-one matching,
      ``universality.engine.analysis.match_neurons``), ``matched_corr_N``, ``dominant_a_N`` / ``dominant_b_N`` (irrep
      indices), ``share_a_NxR`` / ``share_b_NxR``, ``live_a_N`` / ``live_b_N``, ``irreps`` (names),
      ``runs`` (the two runs.json rows), ``mean_matched_corr`` and ``same_dominant`` (share of matched
      live pairs with the same dominant irrep).
    """
    run_a = self.one_run(group, seed_a, filters)
    run_b = self.one_run(group, seed_b, filters)
    if run_a.groups != run_b.groups:
      raise ValueError(f"compare_neurons: runs of different groups {run_a.groups} and {run_b.groups}")
    pair = self._view([int(run_a.index[0]), int(run_b.index[0])])
    acts_2xTxN = pair.hidden(step)
    match = cross_seed.match_neurons(acts_2xTxN)
    live_2xN = np.asarray(cross_seed.live_neurons(acts_2xTxN))
    x = acts_2xTxN.astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm_2xN = np.sqrt(np.sum(x * x, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
      corr_NxN = (x[0].T @ x[1]) / (norm_2xN[0][:, None] * norm_2xN[1][None, :])
    corr_NxN = np.where(live_2xN[0][:, None] & live_2xN[1][None, :], corr_NxN, np.nan)
    neurons = pair.neuron_irreps(step)
    perm_N = np.asarray(match["perm_SxSxN"][0, 1])
    dom = neurons["dominant_SxN"]
    both = live_2xN[0] & live_2xN[1][perm_N]
    matched = np.asarray(match["matched_corr_SxSxN"][0, 1])
    return {
        "corr_NxN": corr_NxN, "perm_N": perm_N, "matched_corr_N": matched,
        "dominant_a_N": dom[0], "dominant_b_N": dom[1],
        "share_a_NxR": neurons["share_SxNxR"][0], "share_b_NxR": neurons["share_SxNxR"][1],
        "live_a_N": live_2xN[0], "live_b_N": live_2xN[1], "irreps": neurons["irreps"], "runs": pair.runs,
        "mean_matched_corr": float(np.nanmean(matched)) if np.isfinite(matched).any() else None,
        "same_dominant": float(np.mean(dom[0][both] == dom[1][perm_N][both])) if both.any() else None,
    }

  def group_summary(self, group: str | None = None, **filters) -> dict:
    """The summary's entry for the one cohort of ``group`` in the selection (``filters`` narrow it).

    Returns ``{"spec", "cohort", "group", "aggregate", "records", "positions"}``: ``group`` is the cohort's
    task record (order, irreps, steps, thresholds), ``records`` the summary's run records of the selected
    runs, ``positions`` their places in the cohort's S×S matrices (``aggregate`` is over the whole cohort).
    """
    sub = self.one_group(group)
    cs = sub.cohort_summary(**filters)
    return {"spec": sub.select(cohort=cs["cohort"]).groups[0], "cohort": cs["cohort"], "group": cs["task"],
            "aggregate": cs["aggregate"], "records": cs["records"], "positions": cs["positions"]}


  def convergent(self, group: str | None = None, **filters) -> dict:
    """The summary's Convergent Learning records of the one cohort of ``group`` in the selection (analysis
    setting ``convergent``): ``{layer: {"one_to_one": [convergent.OneToOne], "sparse_prediction":
    [convergent.SparsePrediction], "clusters": [convergent.Clusters], "means": {...}}}``, layer "hidden"."""
    cs = self.one_group(group).cohort_summary(**filters)
    conv = cs["aggregate"].get("convergent")
    if not conv:
      raise ValueError(f"summary.json has no Convergent Learning records for {cs['cohort']}: analyse with "
                       "--config.analysis.convergent=True (or run.analyze(convergent=True))")
    return {layer: convergent.from_json(v) for layer, v in conv.items()}

  def compute_convergent(self, step: int | None = None, group: str | None = None, *, seed: int = 0,
                         **settings) -> dict:
    """The Convergent Learning passes recomputed on the hidden layer of the one cohort of ``group`` at
    ``step`` (``hidden``), with the analysis' key for ``seed`` and its settings (the summary's, else the
    defaults; ``settings`` override them, e.g. ``convergent_lambdas="0.01,0.1"``): ``{"hidden": analyse's
    records}``. On all runs of a cohort at its last checkpoint these are the summary's (``convergent``)."""
    sub = self.one_group(group).one_cohort()
    if len(sub) < 2:
      raise ValueError("the Convergent Learning passes compare two or more runs of a cohort")
    named = _convergent_settings(self, settings)
    conv = convergent.settings_of(named)
    key = convergent.key_of(driver.cohort_key(seed, sub.cohorts[0]), 0)
    res = convergent.analyse(sub.hidden(step), convergent.pairs_of(named, len(sub)), key=key, settings=conv)
    return {"hidden": res}

  def cohort_records(self, group: str | None = None, **filters) -> records.CohortSummary:
    """``group_summary`` as typed records (``passes.records``), for code that reads fields, not keys."""
    gs = self.group_summary(group, **filters)
    return records.CohortSummary(
        spec=gs["spec"], cohort=gs["cohort"], task=records.Task.from_json(gs["group"]),
        aggregate=records.Aggregate.from_json(gs["aggregate"]),
        runs=[records.SummaryRun.of(r) for r in gs["records"]], positions=list(gs["positions"]))


def _convergent_settings(run, overrides: dict) -> dict:
  """The named Convergent Learning settings: the defaults, the summary's (when there is one), then
  ``overrides``; switched on."""
  unknown = sorted(set(overrides) - set(fields.CONVERGENT))
  if unknown:
    raise ValueError(f"unknown Convergent Learning setting {unknown[0]!r}; settings: "
                     f"{', '.join(fields.CONVERGENT)}")
  named = dict(fields.CONVERGENT)
  try:
    named.update({k: v for k, v in run.summary()["settings"].items() if k in fields.CONVERGENT})
  except FileNotFoundError:
    pass
  named.update(overrides)
  named["convergent"] = True
  return named


def _labels(runs) -> list[str]:
  """``plots.run_labels`` of summary rows read as records."""
  return plots.run_labels([r.row for r in runs])


class Plots:
  """Figures of a ``View`` (``run.plot.<name>(...)``), drawn by ``universality.engine.plots``; the report saves the
  same figures. Per-group figures take ``group=`` unless the selection holds a single group."""

  def __init__(self, run: View):
    self._run = run

  def learning_curves(self):
    """Train and test accuracy of every selected run against steps (log-x), one panel per group."""
    m = self._run.metrics()
    return group_plots.learning_curves(m["step"], m["train_acc"], m["test_acc"], self._run.runs,
                                 generalised=self._run.family.generalised_threshold)

  def similarity_heatmap(self, group: str | None = None):
    """Runs × irreps logit similarity at the final step (summary.json); key irreps outlined."""
    cs = self._run.cohort_records(group)
    names = [r.name for r in cs.task.irreps]
    sim = np.array([[np.nan if r.logit_similarity[n] is None else r.logit_similarity[n] for n in names]
                    for r in cs.runs], float)
    key = np.array([[n in r.key_irreps for n in names] for r in cs.runs], bool)
    title = f"{cs.spec}: logit similarity at step {cs.task.steps[-1]} (outlined: key irreps)"
    return group_plots.similarity_heatmap(sim, _labels(cs.runs), names, key, title=title)

  def key_irreps(self, group: str | None = None):
    """Bars: per irrep, the selected runs that generalised in which it is key and in which it was learned
    first."""
    cs = self._run.cohort_records(group)
    names = [r.name for r in cs.task.irreps]
    done = [r for r in cs.runs if r.done]
    key = {n: sum(n in r.key_irreps for r in done) for n in names}
    first = {n: sum(r.first_learned == n for r in done) for n in names}
    return group_plots.key_irrep_bars(names, key, first, len(done),
                                      title=f"{cs.spec}: key irreps over {len(done)} generalised runs")

  def learning_order(self, seed: int | None = None, group: str | None = None, **filters):
    """One run (seed number ``seed``): logit similarity of each irrep over the checkpoints, the step it
    crossed the threshold, and the run's accuracies. With ``seed=None`` the selection must be one run."""
    one = self._run.one_run(group, seed, filters)
    cs = one.cohort_records()
    r = cs.runs[0]
    names = [i.name for i in cs.task.irreps]
    sim = np.array([[np.nan if v is None else v for v in r.similarity_by_step[n]] for n in names], float).T
    m = one.metrics()
    title = (f"{cs.spec} {plots.run_labels(one.runs)[0]}: learning order "
             f"{' → '.join(r.key_irreps_in_order) or '(no key irreps)'}")
    return group_plots.learning_order_run(cs.task.steps, sim, names, cs.task.order_threshold,
                                          r.learning_order, r.key_irreps, title=title,
                                          metric_steps=m["step"], test_acc=m["test_acc"][:, 0],
                                          train_acc=m["train_acc"][:, 0])

  def learning_order_group(self, group: str | None = None):
    """Every selected run of a group that generalised: the checkpoint at which each irrep crossed the
    learning-order threshold."""
    cs = self._run.cohort_records(group)
    names = [r.name for r in cs.task.irreps]
    done = [r for r in cs.runs if r.done]
    return group_plots.learning_order_group(done, names, cs.task.steps,
                                            title=f"{cs.spec}: learning order over {len(done)} generalised runs")

  def correlation_distribution(self, group: str | None = None, step: int | None = None):
    """Max cross-seed correlation of each live neuron (per other run) against its rotation baseline, and
    the excess correlation, recomputed from the checkpoint (needs two or more selected runs)."""
    sub = self._run.one_group(group).one_cohort()
    if len(sub) < 2:
      raise ValueError("correlation_distribution needs at least two runs of the group")
    thr = None
    try:
      thr = self._run.summary()["settings"].get("universal_threshold")
    except FileNotFoundError:
      pass
    res = sub.neuron_correlations(step, universal_threshold=thr)
    s = len(sub)
    live_SxN = ~res["dead_SxN"]
    sel = live_SxN[:, :, None] & ~np.eye(s, dtype=bool)[:, None, :]
    thr = 0.5 if thr is None else thr
    title = f"{sub.groups[0]}: neuron correlations across {s} runs at step {sub.resolve_step(step)}"
    return plots.correlation_distribution(res["max_SxNxS"][sel], res["baseline_max_SxNxS"][sel],
                                          res["excess_SxN"][live_SxN], thr, title=title)

  def connectivity(self, group: str | None = None):
    """Mean loss over seed pairs along the linear path between their weights, per alignment
    (summary.json)."""
    cs = self._run.cohort_records(group)
    conn = cs.aggregate.connectivity
    if not conn:
      raise ValueError(f"summary.json has no mode connectivity for {cs.spec} (one run, or not an MLP)")
    return group_plots.loss_paths(np.linspace(0, 1, conn.points),
                                  {k: v.mean_loss_path for k, v in conn.alignments.items()},
                                  title=f"{cs.spec}: loss between seeds")

  def convergent(self, group: str | None = None):
    """The Convergent Learning sparse prediction of one cohort against λ: held-out loss and units used,
    means over the pairs compared (summary.json; analysis setting ``convergent``)."""
    sub = self._run.one_group(group)
    conv = sub.convergent()
    return plots.sparse_prediction_curves({layer: r["means"] for layer, r in conv.items()},
                                          title=f"{sub.groups[0]}: sparse prediction between seeds")

  def cka(self, group: str | None = None, measure: str = "cka"):
    """The S×S matrix of ``measure`` (``cka``, ``procrustes``, ``mutual_knn`` or ``matching``) between
    the selected runs' hidden representations at the final step (summary.json)."""
    cs = self._run.cohort_records(group)
    agg = cs.aggregate
    if measure == "matching":
      m = None if agg.matching is None else agg.matching.mean_matched_corr
    elif measure in ("cka", "procrustes", "mutual_knn"):
      m = getattr(agg, measure)
    else:
      raise ValueError(f"unknown measure {measure!r}; expected cka, procrustes, mutual_knn or matching")
    if m is None:
      raise ValueError(f"summary.json has no {measure} matrix for {cs.spec} (fewer than two runs?)")
    pos = cs.positions
    m = np.array([[np.nan if v is None else v for v in row] for row in m], float)[np.ix_(pos, pos)]
    vmax = 2 ** 0.5 if measure == "procrustes" else 1.0
    labels = {"cka": "linear CKA", "procrustes": "Procrustes distance", "mutual_knn": "mutual k-NN",
              "matching": "mean matched neuron correlation"}
    return plots.matrix(m, _labels(cs.runs), title=f"{cs.spec}: {labels[measure]}",
                        vmin=0.0, vmax=vmax, cmap="viridis_r" if measure == "procrustes" else "viridis")

  def neurons(self, seed_a: int, seed_b: int, group: str | None = None, step: int | None = None,
              **filters):
    """Two seeds' hidden neurons: correlation matrix in matched order, matched correlations, and the
    dominant irreps of matched pairs (``Run.compare_neurons``)."""
    cmp = self._run.compare_neurons(seed_a, seed_b, group, step, **filters)
    labels = tuple(plots.run_labels(cmp["runs"]))
    if labels[0] == labels[1]:
      labels = (f"{labels[0]} (A)", f"{labels[1]} (B)")
    return group_plots.neuron_comparison(
        cmp["corr_NxN"], cmp["dominant_a_N"], cmp["dominant_b_N"], cmp["perm_N"], cmp["irreps"],
        cmp["live_a_N"], cmp["live_b_N"], labels=labels,
        title=f"{cmp['runs'][0]['group']}: hidden neurons of {labels[0]} vs {labels[1]} at step "
              f"{self._run.resolve_step(step)}")
