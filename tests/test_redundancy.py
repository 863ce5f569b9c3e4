"""Iterative feature merging: duplicated and positively rescaled neurons are merged exactly (the function
and the loss are unchanged), distinct neurons are kept, never-active neurons are dropped."""

import numpy as np

from universality.engine import groups
from universality.engine.families.group.passes import redundancy
from tests.test_connectivity import _lookup_mlp


def _rng(*salt):
  return np.random.default_rng([20241117, *salt])


def _logits(pa, pb, u, alive):
  """float64 reference of the MLP on all pairs with only the ``alive`` neurons."""
  h = np.maximum(pa[:, None, :] + pb[None, :, :], 0.0) * alive
  return np.einsum("abn,cn->abc", h, u)


def test_duplicated_and_rescaled_neurons_merge_exactly():
  g = groups.get("D4")
  rng = _rng(1)
  n0 = 6
  pa0, pb0 = rng.normal(size=(g.order, n0)), rng.normal(size=(g.order, n0))
  u0 = rng.normal(size=(g.order, n0)) * 3
  # Copies: neuron 6 = 2.5 × neuron 1, 7 = 0.4 × neuron 3, 8 = neuron 1; neuron 9 is never active.
  src, scale = [1, 3, 1], [2.5, 0.4, 1.0]
  pa = np.concatenate([pa0, pa0[:, src] * scale, -np.ones((g.order, 1)) - np.abs(pa0[:, :1])], axis=1)
  pb = np.concatenate([pb0, pb0[:, src] * scale, -np.ones((g.order, 1))], axis=1)
  u = np.concatenate([u0, rng.normal(size=(g.order, 4))], axis=1)
  stacked = [x[None].astype(np.float32) for x in (pa, pb, u)]
  # A second run: five distinct neurons, each duplicated once (scale 1).
  second = [np.concatenate([x[:, :, :5], x[:, :, :5]], axis=2) for x in stacked]
  two = [np.concatenate([a, b]) for a, b in zip(stacked, second)]
  res = {k: np.asarray(v) for k, v in redundancy.merge_features(*two, g.table, tolerance=1e-4).items()}
  # Run 0: the three copies and the silent neuron go; one neuron of each parallel family stays.
  assert res["width_S"][0] == n0 and res["never_active_S"][0] == 1 and res["merges_S"][0] == 3
  alive = res["alive_SxN"][0]
  assert alive[[0, 2, 4, 5]].all() and alive[[1, 6, 8]].sum() == 1 and alive[[3, 7]].sum() == 1
  assert not alive[9]
  np.testing.assert_allclose(_logits(pa, pb, res["unembed_SxVxN"][0].astype(np.float64), alive),
                             _logits(pa, pb, u, np.ones(pa.shape[1])), atol=1e-4)
  np.testing.assert_allclose(res["merged_loss_S"], res["loss_S"], atol=1e-5)
  assert res["width_S"][1] == 5 and res["merges_S"][1] == 5 and not res["never_active_S"][1]


def test_needed_neurons_are_kept_and_a_large_tolerance_merges_down():
  g = groups.get("S3")
  pa, pb, u = (x[None] for x in _lookup_mlp(g))   # each neuron answers one pair: none is redundant
  kept = redundancy.merge_features(pa, pb, u, g.table, tolerance=1e-3)
  assert int(kept["width_S"][0]) == g.order ** 2 and int(kept["merges_S"][0]) == 0
  merged = redundancy.merge_features(pa, pb, u, g.table, tolerance=100.0)
  assert int(merged["width_S"][0]) == 1
