"""The group family's analysis of one cohort: irreps in logits, weights and neurons; neurons across seeds.

``analyze_cohort`` is the family's hook for ``universality.engine.analysis.driver``: it builds the cohort's
context once (``passes.context``) and runs the units ``passes_of(settings)`` lists (``passes.units``); every
field it writes is documented on its record type (``passes.records``). With the setting ``convergent`` the
units include the Convergent Learning passes on the hidden layer (``units.Convergent``;
``Aggregate.convergent``).
"""

from __future__ import annotations

from typing import Any, Callable


from universality.engine import fields
from universality.engine import groups as groups_lib
from universality.engine import irreps as irreps_lib
from universality.engine.analysis import cross_seed
from universality.engine.families.group import models
from universality.engine.families.group.passes import connectivity
from universality.engine.families.group.passes import context
from universality.engine.families.group.passes import cosets
from universality.engine.families.group.passes import margins
from universality.engine.families.group.passes import redundancy
from universality.engine.families.group.passes import representation
from universality.engine.families.group.passes import units

# The analysis' named settings and their defaults (summary.json "settings").
SETTINGS = {"key_threshold": representation.DEFAULT_KEY_THRESHOLD,
            "order_threshold": representation.DEFAULT_ORDER_THRESHOLD,
            "universal_threshold": cross_seed.DEFAULT_UNIVERSAL_THRESHOLD,
            "coset_threshold": cosets.DEFAULT_COSET_THRESHOLD,
            "single_threshold": margins.DEFAULT_SINGLE_THRESHOLD,
            "connectivity_points": connectivity.DEFAULT_POINTS,
            "merge_tolerance": redundancy.DEFAULT_TOLERANCE,
            # Working memory of one block of pairs (all runs' logits and hidden layer on it): the analysis
            # streams the |G|² pairs in such blocks and never holds S·|G|³ logits.
            "memory_budget_gb": representation.DEFAULT_MEMORY_BYTES / 1e9,
            # Convergent Learning (one-to-one, sparse prediction, spectral clusters) on the hidden layer.
            **fields.CONVERGENT}


def passes_of(settings: dict) -> units.Passes:
  """The units the family runs, in order, with their settings."""
  return (units.Irreps(order_threshold=settings["order_threshold"]), units.Similarity(), units.Neurons(),
          units.Cosets(threshold=settings["coset_threshold"]),
          units.Margins(single_threshold=settings["single_threshold"]),
          units.Redundancy(tolerance=settings["merge_tolerance"]),
          units.Connectivity(points=int(settings["connectivity_points"])),
          units.Convergent(settings={k: settings[k] for k in fields.CONVERGENT}))


def matrices_fn_for(model_cfg) -> Callable[[Any], dict]:
  """Stacked ``embedding_matrices`` plus, where the model has them, its effective weights ``pre_a`` and
  ``pre_b`` ``[S, V, N]`` under those names (``models.effective_weights``)."""
  model = models.stacked(model_cfg)

  def fn(params_S):
    mats = dict(model.matrices(params_S))
    if model.effective is not None:
      eff = model.effective(params_S)
      mats.update(pre_a=eff.pre_a, pre_b=eff.pre_b)
    return dict(sorted(mats.items()))

  return fn


def generalised(view, step: int) -> list[bool]:
  """Whether each selected run had generalised (``Family.generalised``) by the logged metrics at ``step``."""
  logged = view.metrics_at(step)
  return [bool(view.family.generalised(logged[int(i)])) for i in view.index]


def analyze_cohort(view, params_by_step, key, settings: dict, batch_size: int | None = None) -> dict:
  """One cohort (runs of one group that differ only in seed): ``{"task", "aggregate", "runs"}``."""
  group = groups_lib.get(view.groups[0])
  ctx = context.build(group, irreps_lib.real_irreps(group), view.model, params_by_step, view.runs, key=key,
                      generalised=generalised(view, max(params_by_step)),
                      key_threshold=settings["key_threshold"], universal_threshold=settings["universal_threshold"],
                      memory_bytes=int(float(settings["memory_budget_gb"]) * 1e9), batch_size=batch_size)
  out = units.run(ctx, passes_of(settings)).to_json()
  return {"task": out["task"], "aggregate": out["aggregate"], "runs": out["runs"]}
