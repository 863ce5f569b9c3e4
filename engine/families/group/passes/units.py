"""The group family's analysis passes as units: each holds its settings and turns a cohort's ``Context``
into its typed record (``records``). The family's analysis lists the units it runs (``Passes``: a sequence
of units); ``run`` assembles what each contributes (``Unit.part``: fields of every run's record, of the
cohort's aggregate and of the task record) into the cohort's record, the one summary.json holds. A new
pass is a unit with ``part`` and the fields it fills on the records; nothing here names it.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, NamedTuple, Protocol

import numpy as np

from universality.engine.analysis import convergent as convergent_lib
from universality.engine.analysis import cross_seed
from universality.engine.families.group.passes import connectivity as connectivity_lib
from universality.engine.families.group.passes import cosets as cosets_lib
from universality.engine.families.group.passes import margins as margins_lib
from universality.engine.families.group.passes import records as rec
from universality.engine.families.group.passes import redundancy as redundancy_lib
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group.passes.context import Context

unit = dataclasses.dataclass(frozen=True)


class Part(NamedTuple):
  """What one unit adds to a cohort's record: fields of each run's record (one mapping per run, or none),
  of the aggregate and of the task record, by field name (``records.RunRecord``, ``Aggregate``, ``Task``)."""
  runs: Sequence[Mapping[str, Any]] = ()
  aggregate: Mapping[str, Any] = {}
  task: Mapping[str, Any] = {}


class Unit(Protocol):
  """A pass: frozen settings, and ``part(ctx)`` -> its ``Part`` of the cohort's record."""

  def part(self, ctx: Context) -> Part:
    ...


def _fields(record) -> dict:
  """A record's fields by name, values as they are (not serialised)."""
  return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _mean(xs):
  return float(np.mean(xs)) if len(xs) else None


def _run_description(run):
  if isinstance(run, Mapping):
    return dict(run)
  if hasattr(run, "_asdict"):
    return dict(run._asdict())
  return str(run)


def _offdiag_mean(m_SxS: np.ndarray):
  s = m_SxS.shape[0]
  if s < 2:
    return None
  vals = m_SxS[~np.eye(s, dtype=bool)]
  vals = vals[np.isfinite(vals)]
  return float(vals.mean()) if vals.size else None


class IrrepResult(NamedTuple):
  runs: list
  cohort: rec.IrrepCohort


@unit
class Irreps:
  """Irreps in the logits, the weights and the hidden layer; learning order; ablation losses."""
  order_threshold: float = rep.DEFAULT_ORDER_THRESHOLD

  def __call__(self, ctx: Context) -> IrrepResult:
    sim_KxSxR = ctx.streamed.sim_KxSxR
    sim_SxR, key_SxR = sim_KxSxR[-1], ctx.key_SxR
    order_SxR = np.asarray(rep.learning_order(np.asarray(ctx.steps), sim_KxSxR, self.order_threshold))
    frac_S = np.asarray(rep.fraction_explained(sim_SxR))
    frac_key_S = np.sum(np.where(key_SxR, sim_SxR, 0.0) ** 2, axis=1)
    fves, hidden_fve_SxR = self._fves(ctx)
    losses = self._losses(ctx)
    runs = [self._run(ctx, i, order_SxR, frac_S[i], frac_key_S[i], fves, hidden_fve_SxR[i], losses)
            for i in range(ctx.n_runs)]
    return IrrepResult(runs, self._cohort(runs, ctx.names))

  def part(self, ctx: Context) -> Part:
    res = self(ctx)
    return Part(runs=[_fields(r) for r in res.runs], aggregate=_fields(res.cohort),
                task={"order_threshold": float(self.order_threshold)})

  @staticmethod
  def _fves(ctx: Context):
    g, mats = ctx.order, dict(ctx.matrices)
    if ctx.effective is not None:
      mats.update(pre_a=ctx.effective.pre_a, pre_b=ctx.effective.pre_b)
    # By name, as the jitted matrices come (pytree dicts are sorted): the order summary.json has kept.
    fves = {name: np.asarray(rep.fve(m[:, :g], ctx.group, ctx.tables)) for name, m in sorted(mats.items())
            if m.ndim == 3 and m.shape[0] == ctx.n_runs and m.shape[1] >= g}
    t = ctx.tables
    hidden = np.asarray(rep.fibre_fve(*(np.asarray(x, np.float32) for x in (
        ctx.streamed.fibre_SxGxN, ctx.streamed.sq_S, t.basis_GxF, t.basis_member_FxR))))
    return fves, hidden

  @staticmethod
  def _losses(ctx: Context):
    if ctx.effective is None:
      return None
    g, eff = ctx.order, ctx.effective
    return {k: np.asarray(v) for k, v in rep.ablation_losses(
        eff.pre_a[:, :g], eff.pre_b[:, :g], eff.unembed, ctx.key_SxR, ctx.group, ctx.tables,
        memory_bytes=ctx.memory_bytes).items()}

  @staticmethod
  def _in_order(ctx: Context, i: int, order_SxR) -> list[int]:
    """Key irreps by the step they crossed the threshold (ties: larger similarity there first); key irreps
    that never crossed it last."""
    key_R, order_R, steps = ctx.key_SxR[i], order_SxR[i], ctx.steps
    out = sorted((r for r in range(len(key_R)) if key_R[r] and order_R[r] >= 0),
                 key=lambda r: (order_R[r], -ctx.streamed.sim_KxSxR[steps.index(order_R[r]), i, r], r))
    return out + [r for r in range(len(key_R)) if key_R[r] and order_R[r] < 0]

  def _run(self, ctx: Context, i, order_SxR, frac, frac_key, fves, hidden_fve_R, losses) -> rec.IrrepRun:
    names, sim_KxSxR = ctx.names, ctx.streamed.sim_KxSxR
    in_order = self._in_order(ctx, i, order_SxR)
    return rec.IrrepRun(
        run=_run_description(ctx.runs[i]), generalised=ctx.generalised[i],
        loss_all=ctx.streamed.loss_S[i], accuracy_all=ctx.streamed.acc_S[i],
        logit_similarity=dict(zip(names, sim_KxSxR[-1, i])), fraction_explained=frac,
        fraction_explained_key=frac_key, key_irreps=[n for n, k in zip(names, ctx.key_SxR[i]) if k],
        learning_order={n: (int(o) if o >= 0 else None) for n, o in zip(names, order_SxR[i])},
        key_irreps_in_order=[names[r] for r in in_order],
        first_learned=names[in_order[0]] if in_order else None,
        similarity_by_step={n: sim_KxSxR[:, i, r] for r, n in enumerate(names)},
        fve={**{m: dict(zip(names, v[i])) for m, v in fves.items()}, "hidden": dict(zip(names, hidden_fve_R))},
        fve_hidden_ab_total=hidden_fve_R.sum(),
        losses=None if losses is None else rec.Losses(
            full=losses["full_S"][i], restricted=losses["restricted_S"][i], excluded=losses["excluded_S"][i],
            excluded_each=dict(zip(names, losses["excluded_each_SxR"][i]))))

  @staticmethod
  def _cohort(runs, names) -> rec.IrrepCohort:
    done = [r for r in runs if r.generalised]
    sets = collections.Counter(tuple(r.key_irreps) for r in done)
    first = collections.Counter(r.first_learned for r in done if r.first_learned is not None)
    return rec.IrrepCohort(
        n_runs=len(runs), n_generalised=len(done),
        not_generalised=[i for i, r in enumerate(runs) if not r.generalised],
        key_irrep_counts={n: sum(n in r.key_irreps for r in done) for n in names},
        key_irrep_sets=[rec.KeyIrrepSet(irreps=list(k), count=c)
                        for k, c in sorted(sets.items(), key=lambda kv: (-kv[1], kv[0]))],
        first_learned_counts={n: first.get(n, 0) for n in names},
        mean_fraction_explained=float(np.nanmean([r.fraction_explained for r in runs])),
        mean_loss_all=float(np.nanmean([r.loss_all for r in runs])))


@unit
class Similarity:
  """CKA, Procrustes distance (from the co-moments) and mutual k-NN alignment (on a subsample of pairs:
  it compares inputs with each other) between the runs' hidden representations."""
  knn_k: int = 10
  knn_inputs: int = 1024

  def __call__(self, ctx: Context) -> rec.Similarity:
    subset_U = cross_seed.knn_subset(ctx.order ** 2, self.knn_inputs, ctx.knn_key)
    mats = {k: np.asarray(v) for k, v in cross_seed.similarity_from_comoments(
        ctx.streamed.comoments, ctx.hidden_on(subset_U), k=min(self.knn_k, subset_U.size - 1)).items()}
    return rec.Similarity(cka=mats["cka"], procrustes=mats["procrustes"], mutual_knn=mats["mutual_knn"],
                          similarity_means={k: _offdiag_mean(v) for k, v in mats.items()})

  def part(self, ctx: Context) -> Part:
    return Part(aggregate=_fields(self(ctx)))


class NeuronResult(NamedTuple):
  runs: list
  correlation: rec.Correlation | None
  matching: rec.Matching | None


@unit
class Neurons:
  """Each run's neurons by dominant irrep and excess correlation; neuron correlations and one-to-one
  matching across the cohort's runs."""

  def __call__(self, ctx: Context) -> NeuronResult:
    runs = [self._run(ctx, i) for i in range(ctx.n_runs)]
    if ctx.corr is None:
      return NeuronResult(runs, None, None)
    matched = ctx.matching["mean_matched_SxS"]
    return NeuronResult(runs, self._correlation(ctx),
                        rec.Matching(mean_matched_corr=matched, mean_offdiagonal=_offdiag_mean(matched)))

  def part(self, ctx: Context) -> Part:
    res = self(ctx)
    return Part(runs=[{"neurons": n} for n in res.runs],
                aggregate={"correlation": res.correlation, "matching": res.matching})

  @staticmethod
  def _run(ctx: Context, i: int) -> rec.Neurons:
    live, corr, names = ~ctx.dead_SxN[i], ctx.corr, ctx.names
    dom = ctx.neurons["dominant_SxN"][i][live]
    return rec.Neurons(
        source=ctx.neuron_source, dead=int(np.sum(~live)),
        dominant_counts={n: int(np.sum(dom == r)) for r, n in enumerate(names)},
        mean_dominant_share=float(np.mean(ctx.neurons["dominant_share_SxN"][i][live])) if live.any() else None,
        in_key_irreps=float(np.mean(ctx.key_SxR[i][dom])) if dom.size else None,
        universal_fraction=None if corr is None else corr["universal_fraction_S"][i],
        mean_excess=None if corr is None else (
            float(np.nanmean(corr["excess_SxN"][i][live])) if live.any() else None))

  @staticmethod
  def _correlation(ctx: Context) -> rec.Correlation:
    corr, dead_SxN, dominant_SxN = ctx.corr, ctx.dead_SxN, ctx.neurons["dominant_SxN"]
    live_SxN = ~dead_SxN
    sel = live_SxN[:, :, None] & ~np.eye(ctx.n_runs, dtype=bool)[:, None, :]
    excess = corr["excess_SxN"][live_SxN]
    counts, edges = np.histogram(excess[np.isfinite(excess)], bins=20, range=(-0.5, 1.0))
    agree = lambda mask=None: rec.Agreement(**cross_seed.irrep_agreement(  # noqa: E731
        corr["argmax_SxNxS"], dominant_SxN, dead_SxN, mask))
    return rec.Correlation(
        mean_max=float(np.nanmean(corr["max_SxNxS"][sel])) if sel.any() else None,
        mean_baseline_max=float(np.nanmean(corr["baseline_max_SxNxS"][sel])) if sel.any() else None,
        mean_excess=float(np.nanmean(excess)) if excess.size else None,
        universal_fraction=float(np.sum(corr["universal_SxN"] & live_SxN) / max(live_SxN.sum(), 1)),
        excess_histogram=rec.Histogram(edges=edges, counts=counts),
        irrep_agreement=agree(), irrep_agreement_universal=agree(corr["universal_SxN"]))


class CosetResult(NamedTuple):
  runs: list
  cohort: rec.CosetCohort
  task: dict  # the task record's subgroup counts and threshold


@unit
class Cosets:
  """Coset neurons: per neuron and input side, the share of variance explained by the cosets of every
  proper non-trivial subgroup (of P_a, P_b where the model has them, else of the activation's marginals)."""
  threshold: float = cosets_lib.DEFAULT_COSET_THRESHOLD

  def __call__(self, ctx: Context) -> CosetResult:
    g, eff = ctx.order, ctx.effective_g()
    table = cosets_lib.coset_tables(ctx.group, ctx.tables)
    f_SxIxGxN, source = cosets_lib.input_functions(
        None if eff is None else eff[0], None if eff is None else eff[1],
        marginals=(ctx.streamed.by_a_SxGxN / g, ctx.streamed.by_b_SxGxN / g))
    res = cosets_lib.coset_neurons(f_SxIxGxN, ctx.group, ctx.tables, table, threshold=self.threshold)
    runs = cosets_lib.run_records(res, table, ctx.dead_SxN, source)
    return CosetResult([rec.CosetRun.from_json(r) for r in runs],
                       rec.CosetCohort.from_json(cosets_lib.cohort_record(runs, table)),
                       cosets_lib.task_record(table, self.threshold))

  def part(self, ctx: Context) -> Part:
    res = self(ctx)
    return Part(runs=[{"cosets": c} for c in res.runs], aggregate={"cosets": res.cohort}, task=res.task)


class MarginResult(NamedTuple):
  runs: list
  cohort: rec.CohortMargins | None


@unit
class Margins:
  """Normalised margins at every checkpoint, single-irrep neurons and irrep coverage (effective MLP)."""
  single_threshold: float = margins_lib.DEFAULT_SINGLE_THRESHOLD

  def __call__(self, ctx: Context) -> MarginResult:
    margins = ctx.streamed.margins
    if not margins:
      return MarginResult([None] * ctx.n_runs, None)
    single = margins_lib.single_irrep_neurons(ctx.neurons["share_SxNxR"], ~ctx.dead_SxN, self.single_threshold)
    runs = [rec.RunMargins(
        margin_by_step=[m["margin_S"][i] for m in margins],
        normalised_margin_by_step=[m["normalised_S"][i] for m in margins],
        margin=margins[-1]["margin_S"][i], normalised_margin=margins[-1]["normalised_S"][i],
        norm=margins[-1]["norm_S"][i], single_irrep_fraction=single["fraction_S"][i],
        irrep_coverage=single["coverage_S"][i],
        covered_irreps=[ctx.names[r] for r in np.flatnonzero(single["covered_SxR"][i])])
        for i in range(ctx.n_runs)]
    done = [m for m, ok in zip(runs, ctx.generalised) if ok]
    return MarginResult(runs, rec.CohortMargins(
        mean_normalised_margin=_mean([m.normalised_margin for m in runs]),
        positive_margin_runs=int(sum(m.margin > 0 for m in runs)),
        mean_single_irrep_fraction=_mean([m.single_irrep_fraction for m in runs]),
        mean_irrep_coverage=_mean([m.irrep_coverage for m in runs]),
        mean_irrep_coverage_generalised=_mean([m.irrep_coverage for m in done])))

  def part(self, ctx: Context) -> Part:
    res = self(ctx)
    return Part(runs=[{"margins": m} for m in res.runs], aggregate={"margins": res.cohort},
                task={"single_threshold": float(self.single_threshold),
                      "predicted_coverage": margins_lib.predicted_coverage(ctx.group.name)})


class RedundancyResult(NamedTuple):
  runs: list
  cohort: rec.CohortRedundancy | None


@unit
class Redundancy:
  """Iterative feature merging of the effective MLP's hidden layer until the loss rises by ``tolerance``."""
  tolerance: float = redundancy_lib.DEFAULT_TOLERANCE

  def __call__(self, ctx: Context) -> RedundancyResult:
    eff = ctx.effective_g()
    if eff is None:
      return RedundancyResult([None] * ctx.n_runs, None)
    merged = {k: np.asarray(v) for k, v in redundancy_lib.merge_features(
        *eff, ctx.tables.table, tolerance=self.tolerance, memory_bytes=ctx.memory_bytes).items()}
    runs = [rec.RunRedundancy(width=int(merged["alive_SxN"].shape[1]), never_active=merged["never_active_S"][i],
                              merges=merged["merges_S"][i], feature_complexity=merged["width_S"][i],
                              loss=merged["loss_S"][i], merged_loss=merged["merged_loss_S"][i])
            for i in range(ctx.n_runs)]
    by_keys: dict[int, list] = collections.defaultdict(list)
    done = [r for r, ok in zip(runs, ctx.generalised) if ok]
    for r, ok, key_R in zip(runs, ctx.generalised, ctx.key_SxR):
      if ok:
        by_keys[int(np.sum(key_R))].append(r.feature_complexity)
    return RedundancyResult(runs, rec.CohortRedundancy(
        mean_feature_complexity=float(np.mean([r.feature_complexity for r in runs])),
        mean_feature_complexity_generalised=(
            float(np.mean([r.feature_complexity for r in done])) if done else None),
        feature_complexity_by_key_irreps={str(k): float(np.mean(v)) for k, v in sorted(by_keys.items())}))

  def part(self, ctx: Context) -> Part:
    res = self(ctx)
    return Part(runs=[{"redundancy": r} for r in res.runs], aggregate={"redundancy": res.cohort})


@unit
class Connectivity:
  """Loss barriers on the linear path between every two runs' effective weights, raw and aligned."""
  points: int = connectivity_lib.DEFAULT_POINTS

  def __call__(self, ctx: Context) -> rec.Connectivity | None:
    eff = ctx.effective_g()
    if ctx.n_runs < 2 or eff is None or not self.points:
      return None
    conn = connectivity_lib.connectivity(*eff, ctx.tables.table, ctx.matching["perm_SxSxN"],
                                         points=self.points, memory_bytes=ctx.memory_bytes)
    keys = [[n for n, k in zip(ctx.names, key_R) if k] for key_R in ctx.key_SxR]
    return rec.Connectivity.from_json(connectivity_lib.cohort_record(conn, keys, ctx.generalised))

  def part(self, ctx: Context) -> Part:
    return Part(aggregate={"connectivity": self(ctx)})


@unit
class Convergent:
  """The Convergent Learning passes (``universality.engine.analysis.convergent``: one-to-one matching,
  sparse prediction, spectral clusters) on the final hidden layer, with the analysis' ``convergent*``
  settings (``universality.engine.fields.CONVERGENT``); nothing when they are off or the cohort has one run.
  Only the subsample of the |G|² pairs the passes keep is evaluated; the records equal
  ``convergent.analyse`` on all of them."""
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __call__(self, ctx: Context) -> dict | None:
    conv = convergent_lib.settings_of(self.settings)
    if not conv.enabled or ctx.n_runs < 2:
      return None
    k = convergent_lib.key_of(ctx.key, 0)
    t = ctx.order * ctx.order
    keep = convergent_lib.subsample(k, t, conv.max_inputs)
    acts_SxTxN = ctx.hidden_on(np.arange(t) if keep is None else keep)
    res = convergent_lib.analyse(acts_SxTxN, convergent_lib.pairs_of(self.settings, ctx.n_runs), key=k,
                                 settings=conv)
    return {"hidden": dict(convergent_lib.to_json(res), inputs=int(acts_SxTxN.shape[1]))}

  def part(self, ctx: Context) -> Part:
    return Part(aggregate={"convergent": self(ctx)})


# The units a group analysis runs, in order; each with its settings.
Passes = Sequence[Unit]
DEFAULT_PASSES: Passes = (Irreps(), Similarity(), Neurons(), Cosets(), Margins(), Redundancy(), Connectivity())


def task_fields(ctx: Context) -> dict:
  """The task record's fields that come from the cohort itself rather than from a unit."""
  t = ctx.tables
  return dict(name=ctx.group.name, order=ctx.order, steps=ctx.steps, key_threshold=ctx.key_threshold,
              universal_threshold=ctx.universal_threshold,
              irreps=[rec.Irrep(name=n, dim=int(d), frobenius_schur=int(fs))
                      for n, d, fs in zip(t.names, t.dims, t.frobenius_schur)])


def run(ctx: Context, passes: Passes = DEFAULT_PASSES) -> rec.Cohort:
  """Every unit of ``passes`` on the context, their parts assembled into the cohort's record (plain JSON
  values); a field no unit fills keeps its record's default."""
  runs: list[dict] = [{} for _ in range(ctx.n_runs)]
  aggregate: dict = {}
  task = task_fields(ctx)
  for unit_ in passes:
    part = unit_.part(ctx)
    if part.runs:
      if len(part.runs) != ctx.n_runs:
        raise ValueError(f"{type(unit_).__name__}: {len(part.runs)} run parts for {ctx.n_runs} runs")
      for fields, extra in zip(runs, part.runs):
        fields.update(extra)
    aggregate.update(part.aggregate)
    task.update(part.task)
  cohort = rec.Cohort(task=rec.Task(**task), runs=[rec.RunRecord(**r) for r in runs],
                      aggregate=rec.Aggregate(**aggregate))
  return rec.Cohort.from_json(cohort.to_json())
