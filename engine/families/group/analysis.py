"""The group family's analysis of one cohort: irreps in logits, weights and neurons; neurons across seeds.

``analyze_cohort`` is the family's hook for ``universality.engine.analysis.driver``; the passes are
``universality.engine.families.group.passes.pipeline.analyze_group`` (every field of its records is documented there).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from universality.engine import groups as groups_lib
from universality.engine import irreps as irreps_lib
from universality.engine.families.group.passes import connectivity
from universality.engine.families.group.passes import cosets
from universality.engine.analysis import cross_seed
from universality.engine.families.group.passes import margins
from universality.engine.families.group.passes import pipeline
from universality.engine.families.group.passes import redundancy
from universality.engine.families.group.passes import representation
from universality.engine.families.group import models

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
            "memory_budget_gb": representation.DEFAULT_MEMORY_BYTES / 1e9}


def matrices_fn_for(model_cfg) -> Callable[[Any], dict]:
  """``matrices_fn`` for the group family's models (``model_cfg``: the config's ``model`` section): vmapped
  ``embedding_matrices`` plus, for the MLP, the total embeddings ``pre_a = embed_a · W1[:E]`` and
  ``pre_b = embed_b · W1[E:]`` ``[S, V, N]`` that the per-neuron split and the restricted / excluded losses
  need (unless ``embedding_matrices`` already provides them)."""

  def one(params):
    mats = dict(models.embedding_matrices(params, model_cfg))
    if model_cfg.name == "mlp" and "pre_a" not in mats:
      e = params["embed_a"].shape[1]
      mats["pre_a"] = params["embed_a"] @ params["linear"][:e]
      mats["pre_b"] = params["embed_b"] @ params["linear"][e:]
    return mats

  return jax.jit(jax.vmap(one))


def generalised(view, step: int) -> list[bool]:
  """Whether each selected run had generalised (``Family.generalised``) by the logged metrics at ``step``."""
  logged = view.metrics_at(step)
  return [bool(view.family.generalised(logged[int(i)])) for i in view.index]


def analyze_cohort(view, params_by_step, key, settings: dict, batch_size: int | None = None) -> dict:
  """One cohort (runs of one group that differ only in seed): ``{"task", "aggregate", "runs"}``."""
  spec = view.groups[0]
  group = groups_lib.get(spec)
  res = pipeline.analyze_group(group, irreps_lib.real_irreps(group), view._apply_fn(), view._matrices_fn(),
                               params_by_step, view.runs, key_threshold=settings["key_threshold"],
                               order_threshold=settings["order_threshold"],
                               generalised=generalised(view, max(params_by_step)),
                               universal_threshold=settings["universal_threshold"],
                               coset_threshold=settings["coset_threshold"],
                               single_threshold=settings["single_threshold"],
                               connectivity_points=int(settings["connectivity_points"]),
                               merge_tolerance=settings["merge_tolerance"], key=key,
                               batch_size=batch_size,
                               memory_bytes=int(float(settings["memory_budget_gb"]) * 1e9))
  return {"task": res["group"], "aggregate": res["aggregate"], "runs": res["runs"]}
