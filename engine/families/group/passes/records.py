"""The typed records of the group family's analysis: what each pass returns and what summary.json holds.

A record is a frozen dataclass; its fields, in order, are the keys of its JSON object. ``to_json`` writes
one, ``from_json`` reads one back: a field missing from the JSON (an older summary, written before the
field was added) reads as None, a key the record does not know is ignored. Irreps are named by
``Irrep.name``; S×S matrices are nested lists in the order of the cohort's runs; non-finite numbers are
written as null.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from universality.engine.analysis.records import Num, Record, record  # noqa: F401 - the family's names


# ---------------------------------------------------------------------------------------------------
# The cohort's task: the group, its irreps, the checkpoints and the thresholds of the passes.


@record
class Irrep(Record):
  name: str
  dim: int
  frobenius_schur: int


@record
class Task(Record):
  """``steps``: the checkpoints analysed (ascending; the last is every run's final step); the thresholds
  of the passes; counts of the group's subgroups and their conjugacy classes; ``predicted_coverage``: the
  max-margin irrep coverage where the margin paper states it (cyclic groups: 1), else None."""
  name: str
  order: int
  steps: list[int]
  key_threshold: Num
  order_threshold: Num
  subgroups: Optional[int]
  subgroup_classes: Optional[int]
  proper_nontrivial: Optional[int]
  coset_threshold: Num
  single_threshold: Num
  predicted_coverage: Num
  universal_threshold: Num
  irreps: list[Irrep]


# ---------------------------------------------------------------------------------------------------
# Per run.


@record
class Losses(Record):
  """Cross-entropy on all pairs of the effective MLP: whole, key irreps only, key irreps removed, and with
  each irrep removed."""
  full: Num
  restricted: Num
  excluded: Num
  excluded_each: dict[str, Num]


@record
class IrrepRun(Record):
  """The representation pass, one run: loss and accuracy on all pairs at the final step; logit similarity
  per irrep and the fraction of logits it explains (all non-trivial irreps / key irreps only); key irreps
  (final similarity above the key threshold); the first step above the order threshold per irrep; key
  irreps in that order (ties: larger similarity first; never crossed: last); similarity at every step; the
  FVE of each weight matrix and of the hidden layer per irrep; ablation losses (None without effective
  MLP weights)."""
  run: Any
  generalised: bool
  loss_all: Num
  accuracy_all: Num
  logit_similarity: dict[str, Num]
  fraction_explained: Num
  fraction_explained_key: Num
  key_irreps: list[str]
  learning_order: dict[str, Optional[int]]
  key_irreps_in_order: list[str]
  first_learned: Optional[str]
  similarity_by_step: dict[str, list[Num]]
  fve: dict[str, dict[str, Num]]
  fve_hidden_ab_total: Num
  losses: Optional[Losses]


@record
class Neurons(Record):
  """Each live neuron's dominant non-trivial irrep (``source``: ``pre_activation`` P_a[a] + P_b[b], or
  ``hidden``: the activation as a function of a·b); their excess correlation across seeds (None for one
  run)."""
  source: str
  dead: int
  dominant_counts: dict[str, int]
  mean_dominant_share: Num
  in_key_irreps: Num
  universal_fraction: Num
  mean_excess: Num


@record
class CosetSide(Record):
  coset_neurons: int
  coset_fraction: Num
  left: int
  right: int
  by_subgroup: dict[str, int]
  mean_best_share: Num
  mean_induced_share: Num


@record
class CosetRun(Record):
  source: str
  sides: dict[str, CosetSide]
  both_sides: int
  both_sides_same_class: int


@record
class RunMargins(Record):
  """Margin (correct − best wrong logit, min over pairs) at every step and normalised by ‖θ_eff‖^ν; the
  live neurons with one irrep; the non-trivial irreps that have such a neuron."""
  margin_by_step: list[Num]
  normalised_margin_by_step: list[Num]
  margin: Num
  normalised_margin: Num
  norm: Num
  single_irrep_fraction: Num
  irrep_coverage: Num
  covered_irreps: list[str]


@record
class RunRedundancy(Record):
  """Iterative feature merging: neurons left (``feature_complexity``) and the loss before and after."""
  width: int
  never_active: int
  merges: int
  feature_complexity: int
  loss: Num
  merged_loss: Num


@record
class RunRecord(IrrepRun):
  """A run's record in summary.json: the representation pass's fields and the other passes' records."""
  neurons: Optional[Neurons] = None
  cosets: Optional[CosetRun] = None
  margins: Optional[RunMargins] = None
  redundancy: Optional[RunRedundancy] = None


# ---------------------------------------------------------------------------------------------------
# Over the runs of a cohort.


@record
class KeyIrrepSet(Record):
  irreps: list[str]
  count: int


@record
class IrrepCohort(Record):
  """Key-irrep and learned-first counts over the generalised runs (an unconverged run has a trace of every
  irrep); means over all runs."""
  n_runs: int
  n_generalised: int
  not_generalised: list[int]
  key_irrep_counts: dict[str, int]
  key_irrep_sets: list[KeyIrrepSet]
  first_learned_counts: dict[str, int]
  mean_fraction_explained: Num
  mean_loss_all: Num


@record
class Similarity(Record):
  """S×S CKA, Procrustes distance and mutual k-NN of the hidden representations, and their off-diagonal
  means."""
  cka: Optional[list]
  procrustes: Optional[list]
  mutual_knn: Optional[list]
  similarity_means: dict[str, Num]


@record
class Histogram(Record):
  edges: list[float]
  counts: list[int]


@record
class Agreement(Record):
  """Does a neuron's best match in another run share its dominant irrep: rate, chance rate, pairs."""
  rate: Num
  chance: Num
  count: int


@record
class Correlation(Record):
  mean_max: Num
  mean_baseline_max: Num
  mean_excess: Num
  universal_fraction: Num
  excess_histogram: Histogram
  irrep_agreement: Agreement
  irrep_agreement_universal: Agreement


@record
class Matching(Record):
  mean_matched_corr: list
  mean_offdiagonal: Num


@record
class SubgroupClass(Record):
  order: int
  conjugates: int
  normal: bool
  neurons: int
  runs: int
  induced: dict[str, int]


@record
class CosetCohort(Record):
  coset_fraction: dict[str, Num]
  by_subgroup: dict[str, SubgroupClass]


@record
class CohortMargins(Record):
  mean_normalised_margin: Num
  positive_margin_runs: int
  mean_single_irrep_fraction: Num
  mean_irrep_coverage: Num
  mean_irrep_coverage_generalised: Num


@record
class CohortRedundancy(Record):
  mean_feature_complexity: Num
  mean_feature_complexity_generalised: Num
  feature_complexity_by_key_irreps: dict[str, Num]


@record
class Alignment(Record):
  """Loss barriers on the linear path between two runs under one neuron alignment."""
  barrier: list
  mean_barrier: Num
  mean_barrier_same_key_irreps: Num
  mean_barrier_different_key_irreps: Num
  pairs_same_key_irreps: int
  pairs_different_key_irreps: int
  mean_loss_path: list[Num]
  mean_min_accuracy: Num


@record
class Connectivity(Record):
  points: int
  weights: str
  key_irrep_jaccard: list
  alignments: dict[str, Alignment]


@record
class Aggregate(IrrepCohort):
  """A cohort's aggregate in summary.json: the representation pass's counts and the other passes'
  cohort records (None where a pass does not apply: one run, no effective MLP weights)."""
  cka: Optional[list] = None
  procrustes: Optional[list] = None
  mutual_knn: Optional[list] = None
  similarity_means: Optional[dict[str, Num]] = None
  correlation: Optional[Correlation] = None
  matching: Optional[Matching] = None
  cosets: Optional[CosetCohort] = None
  margins: Optional[CohortMargins] = None
  redundancy: Optional[CohortRedundancy] = None
  connectivity: Optional[Connectivity] = None
  # Convergent Learning passes per layer ({"hidden": universality.engine.analysis.convergent.to_json of
  # its records, plus "inputs"}), only when the analysis setting ``convergent`` is on: absent otherwise.
  convergent: Optional[dict] = None

  def to_json(self) -> dict:
    out = super().to_json()
    if out.get("convergent") is None:
      out.pop("convergent", None)
    return out


@record
class Cohort(Record):
  """Everything the analysis says about one cohort: summary.json's ``task``, ``aggregate`` and runs."""
  task: Task
  runs: list[RunRecord]
  aggregate: Aggregate


# ---------------------------------------------------------------------------------------------------
# Read back from summary.json.


@record
class SummaryRun(RunRecord):
  """A run's row of summary.json: its record, its leading ``index`` in the run directory, the metrics
  logged at the last step (``final``) and the whole row as read (``row``: runs.json fields, for labels).
  A summary written before ``generalised`` existed counts every run as generalised."""
  index: Optional[int] = None
  final: Optional[dict] = None
  row: Optional[dict] = None

  @classmethod
  def of(cls, obj: typing.Mapping[str, Any]) -> "SummaryRun":
    return dataclasses.replace(cls.from_json(obj), row=dict(obj))

  @property
  def done(self) -> bool:
    """Whether the run generalised (its key irreps and learning order mean something)."""
    return self.generalised is not False

  @property
  def test_acc(self) -> Num:
    return (self.final or {}).get("test_acc")


class CohortSummary(typing.NamedTuple):
  """One cohort of summary.json restricted to the selected runs: ``positions`` are their places in the
  cohort's S×S matrices (``aggregate`` is over the whole cohort)."""
  spec: str
  cohort: str
  task: Task
  aggregate: Aggregate
  runs: list[SummaryRun]
  positions: list[int]
