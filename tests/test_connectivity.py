"""Mode connectivity against float64 references: path losses by explicit interpolation, and an exact
neuron permutation of a lookup-table MLP recovered by both matchings, with zero barrier once aligned."""

import numpy as np

from universality.engine import groups
from universality.engine.families.group.passes import connectivity
from universality.engine.analysis import cross_seed


def _rng(*salt):
  return np.random.default_rng([20241116, *salt])


def _lookup_mlp(g, scale=10.0):
  """Neuron (x, y) fires on the pair (x, y) alone, ReLU([a = x] + [b = y] − 1), and votes for x·y."""
  x, y = np.meshgrid(np.arange(g.order), np.arange(g.order), indexing="ij")
  x, y = x.ravel(), y.ravel()
  pa = (np.arange(g.order)[:, None] == x[None, :]).astype(np.float32)
  pb = (np.arange(g.order)[:, None] == y[None, :]).astype(np.float32) - 1.0
  u = scale * (np.arange(g.order)[:, None] == g.table[x, y][None, :]).astype(np.float32)
  return pa, pb, u


def _reference_loss(pa, pb, u, g):
  h = np.maximum(pa[:, None, :] + pb[None, :, :], 0.0)
  logits = np.einsum("abn,cn->abc", h, u)
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  a, b = np.meshgrid(np.arange(g.order), np.arange(g.order), indexing="ij")
  return -logp[a, b, g.table].mean(), (logits.argmax(-1) == g.table).mean()


def test_path_losses_match_explicit_interpolation():
  g = groups.get("D4")
  rng = _rng(1)
  s, n = 3, 5
  pa, pb, u = (rng.normal(size=(s, g.order, n)) for _ in range(3))
  pairs = connectivity.pairs_of(s)
  perm = np.stack([rng.permutation(n) for _ in pairs])
  res = {k: np.asarray(v) for k, v in connectivity.path_losses(pa, pb, u, g.table, pairs, perm, points=5,
                                                                batch=2).items()}
  for p, (i, j) in enumerate(pairs):
    ref = []
    for lam in np.linspace(0, 1, 5):
      mix = lambda x: (1 - lam) * x[i] + lam * x[j][:, perm[p]]  # noqa: E731
      ref.append(_reference_loss(mix(pa), mix(pb), mix(u), g))
    ref = np.asarray(ref)
    np.testing.assert_allclose(res["loss_ZxO"][p], ref[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["accuracy_ZxO"][p], ref[:, 1], atol=1e-6)
    line = ref[0, 0] + np.linspace(0, 1, 5) * (ref[-1, 0] - ref[0, 0])
    np.testing.assert_allclose(res["barrier_Z"][p], np.max(ref[:, 0] - line), rtol=1e-4, atol=1e-5)


def test_permuted_copy_has_zero_barrier_once_aligned_and_both_matchings_recover_the_permutation():
  g = groups.get("S3")
  pa, pb, u = _lookup_mlp(g)
  n = pa.shape[1]
  sigma = _rng(2).permutation(n)   # copy neuron m is neuron sigma[m] of the original
  stack = lambda x: np.stack([x, x[:, sigma]])  # noqa: E731
  pa2, pb2, u2 = stack(pa), stack(pb), stack(u)
  want = np.argsort(sigma)        # the original's neuron n sits at position want[n] of the copy
  np.testing.assert_array_equal(connectivity.weight_matching(pa2, pb2, u2, [[0, 1]])[0], want)
  hidden = np.maximum(pa2[:, :, None, :] + pb2[:, None, :, :], 0.0).reshape(2, g.order ** 2, n)
  match = cross_seed.match_neurons(hidden)
  np.testing.assert_array_equal(match["perm_SxSxN"][0, 1], want)
  res = connectivity.connectivity(pa2, pb2, u2, g.table, match["perm_SxSxN"], points=25)
  assert res["raw"]["barrier_Z"][0] > 1.0      # the unaligned midpoint forgets the table: loss ≈ log |G|
  for name in ("activation", "weight"):
    assert abs(res[name]["barrier_Z"][0]) < 1e-5
    np.testing.assert_allclose(res[name]["loss_ZxO"][0], res[name]["loss_ZxO"][0, 0], atol=1e-5)
    assert (res[name]["accuracy_ZxO"][0] == 1.0).all()
  rec = connectivity.cohort_record(res, [["sign", "standard"], ["standard"]], [True, True])
  assert rec["alignments"]["weight"]["mean_barrier_different_key_irreps"] < 1e-5
  assert rec["key_irrep_jaccard"][0, 1] == 0.5 and rec["points"] == 25
