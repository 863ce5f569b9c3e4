"""The whole analysis of the runs of one group as plain JSON: the context (``context.build``) and the units
(``units.Passes``) in one call, for callers that hold parameters rather than a run directory.

``analyze_group(group, irreps, model, params_by_step, runs, ...)`` returns
``{"group": records.Task, "runs": [records.RunRecord], "aggregate": records.Aggregate}`` as JSON; the
fields are documented on the record types (``records``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from universality.engine import groups as groups_lib
from universality.engine.analysis import cross_seed
from universality.engine.families.group import models
from universality.engine.families.group.passes import connectivity as connectivity_lib
from universality.engine.families.group.passes import context as context_lib
from universality.engine.families.group.passes import cosets as cosets_lib
from universality.engine.families.group.passes import margins as margins_lib
from universality.engine.families.group.passes import redundancy as redundancy_lib
from universality.engine.families.group.passes import representation as rep
from universality.engine.families.group.passes import units
# The streamed pass and the neuron split, under the names their callers know.
from universality.engine.families.group.passes import neuron_split
from universality.engine.families.group.passes.streaming import _accumulate  # noqa: F401
from universality.engine.families.group.passes.streaming import evaluate_all_pairs  # noqa: F401
from universality.engine.families.group.passes.streaming import hidden_at  # noqa: F401
from universality.engine.families.group.passes.streaming import pair_chunk  # noqa: F401
from universality.engine.families.group.passes.streaming import stream_all_pairs  # noqa: F401

neuron_irreps_from_fibres = neuron_split.from_fibres
neuron_irreps_from_hidden = neuron_split.from_hidden


def analyze_group(group: groups_lib.Group, irreps, model: models.Stacked, params_by_step: Mapping[int, Any],
                  runs: Sequence[Any], *, key=None, generalised: Sequence[bool] | None = None,
                  key_threshold: float = rep.DEFAULT_KEY_THRESHOLD,
                  order_threshold: float = rep.DEFAULT_ORDER_THRESHOLD,
                  universal_threshold: float = cross_seed.DEFAULT_UNIVERSAL_THRESHOLD,
                  coset_threshold: float = cosets_lib.DEFAULT_COSET_THRESHOLD,
                  single_threshold: float = margins_lib.DEFAULT_SINGLE_THRESHOLD,
                  connectivity_points: int = connectivity_lib.DEFAULT_POINTS,
                  merge_tolerance: float = redundancy_lib.DEFAULT_TOLERANCE, knn_k: int = 10,
                  knn_inputs: int = 1024, batch_size: int | None = None,
                  memory_bytes: int = rep.DEFAULT_MEMORY_BYTES) -> dict:
  """Analyses the runs of one group at every checkpoint (``context.build`` for the arguments it shares;
  the rest are the units' settings); returns the JSON of the module docstring."""
  ctx = context_lib.build(group, irreps, model, params_by_step, runs, key=key, generalised=generalised,
                          key_threshold=key_threshold, universal_threshold=universal_threshold,
                          memory_bytes=memory_bytes, batch_size=batch_size)
  passes = (units.Irreps(order_threshold), units.Similarity(knn_k, knn_inputs), units.Neurons(),
            units.Cosets(coset_threshold), units.Margins(single_threshold), units.Redundancy(merge_tolerance),
            units.Connectivity(connectivity_points))
  out = units.run(ctx, passes).to_json()
  return {"group": out["task"], "runs": out["runs"], "aggregate": out["aggregate"]}
