"""The composition task of a finite group, split and padded for training many runs in one program.

Every run sees all ``|G|²`` pairs ``(a, b) -> a·b`` of its group, shuffled by a seeded permutation: the first
``round(train_frac · |G|²)`` pairs train, the rest test. The permutation depends only on (base seed, seed
number, group), so splits at different train fractions of the same seed are nested.

A bucket stacks runs over the leading ``S`` axis. Groups of different orders are padded to the bucket's
largest order ``V``: logits of classes ``>= order`` are masked to ``-inf`` by the loss, and padded pairs carry
weight 0. Train and test pairs are stored in separate arrays, each padded only to the bucket maximum of its
own count, so a train step never spends FLOPs on test pairs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from universality.engine import groups as groups_lib


def group_tag(group: groups_lib.Group) -> int:
  """A 31-bit integer from the group's content hash: mixes the group into every seed derivation."""
  return int(group.key[:8], 16) & 0x7FFFFFFF


def n_train_pairs(order: int, train_frac: float) -> int:
  """Number of training pairs: ``round(train_frac · order²)``, at least 1."""
  if not 0 < train_frac <= 1:
    raise ValueError(f"train_frac must lie in (0, 1], got {train_frac}")
  return int(min(order * order, max(1, round(train_frac * order * order))))


LAW_C = 2.7482  # Tian (2025)'s critical_ratio_multiplier (config/dyn_madd.yaml; 5.82 before 2025-09-15)


def law_s(group: groups_lib.Group, spec: str) -> float:
  """The law's group factor s: 1 for abelian groups and S_n, else (the largest complex irrep degree) / 2."""
  factors = groups_lib.parse(spec)
  if group.is_abelian or (len(factors) == 1 and factors[0][0] == "S"):
    return 1.0
  from universality.engine import irreps as irreps_lib  # the irreps only where they are needed
  degrees = [r.dim if r.frobenius_schur == 1 else r.dim // 2 for r in irreps_lib.real_irreps(group)]
  return max(degrees) / 2.0


def n_train_law(order: int, mult: float, c: float = LAW_C, s: float = 1.0) -> int:
  """Training pairs ``n = mult · c · s · M ln M`` (M = order), at least 1, at most M², rounded as the
  paper's code does: its test fraction ``1 − mult·c·s·ln M / M`` (clipped to [0, 1]) goes to scikit-learn's
  ``train_test_split``, which tests ``ceil(test_frac · M²)`` pairs and trains the rest."""
  if not mult > 0 or not c > 0 or not s > 0:
    raise ValueError(f"size multiplier, c and s must be > 0, got {mult}, {c}, {s}")
  test_frac = min(max(1.0 - s * math.log(order) / order * (mult * c), 0.0), 1.0)
  total = order * order
  return int(min(total, max(1, total - math.ceil(test_frac * total))))


def pair_permutation(group: groups_lib.Group, base_seed: int, seed: int) -> np.ndarray:
  """int32 ``[|G|²]``: the seeded order of the pair indices ``p = a·|G| + b`` (train pairs come first)."""
  if base_seed < 0 or seed < 0:
    raise ValueError(f"base_seed and seed must be >= 0, got {base_seed}, {seed}")
  rng = np.random.default_rng(np.random.SeedSequence([base_seed, seed, group_tag(group), 0x5A17]))
  return rng.permutation(group.order * group.order).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Split:
  """One run's task: pairs as int32 ``[P, 3]`` rows ``(a, b, a·b)``, train first then test."""
  group: groups_lib.Group
  pairs_Px3: np.ndarray
  n_train: int

  @property
  def train_Px3(self) -> np.ndarray:
    return self.pairs_Px3[:self.n_train]

  @property
  def test_Px3(self) -> np.ndarray:
    return self.pairs_Px3[self.n_train:]


def split(group: groups_lib.Group, train_frac: float, base_seed: int, seed: int) -> Split:
  """The seeded train/test split of ``group``'s composition task (``seed``: the seed number k)."""
  n = group.order
  perm = pair_permutation(group, base_seed, seed)
  a, b = perm // n, perm % n
  pairs = np.stack([a, b, group.table[a, b]], axis=1).astype(np.int32)
  return Split(group=group, pairs_Px3=pairs, n_train=n_train_pairs(n, train_frac))


class TaskData(NamedTuple):
  """A bucket of runs, padded. ``P``: bucket max of train counts, ``Q``: of test counts (at least 1).

  Weights are ``1/count`` on real pairs and 0 on padding, so ``Σ w · loss`` is the mean over real pairs.
  Padded pairs are ``(0, 0) -> 0``, a valid index in every group.
  """
  train_a_SxP: np.ndarray
  train_b_SxP: np.ndarray
  train_c_SxP: np.ndarray
  train_w_SxP: np.ndarray
  n_train_S: np.ndarray
  test_a_SxP: np.ndarray
  test_b_SxP: np.ndarray
  test_c_SxP: np.ndarray
  test_w_SxP: np.ndarray
  order_S: np.ndarray

  @property
  def vocab(self) -> int:
    """V: the bucket's largest group order."""
    return int(self.order_S.max())


def _pad(rows: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Stacks ``[k_s, 3]`` pair arrays into ``[S, width, 3]`` plus float32 weights ``[S, width]``."""
  out = np.zeros((len(rows), width, 3), np.int32)
  w = np.zeros((len(rows), width), np.float32)
  for s, r in enumerate(rows):
    out[s, :len(r)] = r
    if len(r):
      w[s, :len(r)] = np.float32(1.0 / len(r))
  return out, w


def stack(splits: Sequence[Split]) -> TaskData:
  """Pads and stacks the splits of a bucket of runs (any mix of groups) along a leading ``S`` axis."""
  if not splits:
    raise ValueError("stack needs at least one split")
  p = max(s.n_train for s in splits)
  q = max(1, max(len(s.test_Px3) for s in splits))
  train, train_w = _pad([s.train_Px3 for s in splits], p)
  test, test_w = _pad([s.test_Px3 for s in splits], q)
  return TaskData(
      train_a_SxP=train[..., 0], train_b_SxP=train[..., 1], train_c_SxP=train[..., 2], train_w_SxP=train_w,
      n_train_S=np.asarray([s.n_train for s in splits], np.int32),
      test_a_SxP=test[..., 0], test_b_SxP=test[..., 1], test_c_SxP=test[..., 2], test_w_SxP=test_w,
      order_S=np.asarray([s.group.order for s in splits], np.int32))


def run_key(base_seed: int, seed: int, group: groups_lib.Group) -> np.ndarray:
  """The PRNG key (uint32 [2]) of a run: a function of base seed, seed number and group only."""
  key = jax.random.fold_in(jax.random.PRNGKey(base_seed), seed)
  return np.asarray(jax.random.fold_in(key, group_tag(group)))


def masked_xent(logits_BxV, c_B, w_B, order):
  """``(Σ w·cross-entropy, Σ w·correct)`` with classes ``>= order`` masked to −inf (zero probability)."""
  classes_1xV = jnp.arange(logits_BxV.shape[-1])[None, :]
  logits_BxV = jnp.where(classes_1xV < order, logits_BxV, -jnp.inf)
  lse_B = jax.nn.logsumexp(logits_BxV, axis=-1)
  # A one-hot select rather than take_along_axis: its gradient is elementwise (fuses with the softmax
  # gradient) where the gather's is a scatter into [B, V].
  picked_B = jnp.sum(jnp.where(classes_1xV == c_B[:, None], logits_BxV, 0.0), axis=-1)
  correct_B = (jnp.argmax(logits_BxV, axis=-1) == c_B).astype(jnp.float32)
  return jnp.sum(w_B * (lse_B - picked_B)), jnp.sum(w_B * correct_B)


def masked_mse(logits_BxV, c_B, w_B, order):
  """``(Σ w·squared error, Σ w·correct)`` of Tian (2025)'s MSE loss: the logits of the real classes
  ``< order``, centred over those classes, against the centred one-hot ``onehot − 1/order``, summed over
  the classes (padding classes carry neither output nor target)."""
  classes_1xV = jnp.arange(logits_BxV.shape[-1])[None, :]
  real_1xV = classes_1xV < order
  order_f = jnp.asarray(order, logits_BxV.dtype)
  mean_B = jnp.sum(jnp.where(real_1xV, logits_BxV, 0.0), axis=-1) / order_f
  target_BxV = (classes_1xV == c_B[:, None]).astype(logits_BxV.dtype) - 1.0 / order_f
  err_BxV = jnp.where(real_1xV, logits_BxV - mean_B[:, None] - target_BxV, 0.0)
  correct_B = (jnp.argmax(jnp.where(real_1xV, logits_BxV, -jnp.inf), axis=-1) == c_B).astype(jnp.float32)
  return jnp.sum(w_B * jnp.sum(err_BxV * err_BxV, axis=-1)), jnp.sum(w_B * correct_B)


LOSSES = {"xent": masked_xent, "mse": masked_mse}


def mask_padding(logits_xV, order):
  """Logits with the classes ``>= order`` (a smaller group padded into its bucket's vocabulary) at −inf, as
  training scores them; ``order`` broadcasts against the leading axes (e.g. ``order_S[:, None, None]``)."""
  shape = jnp.shape(logits_xV)
  classes = jnp.arange(shape[-1]).reshape((1,) * (len(shape) - 1) + shape[-1:])  # the logits' rank
  return jnp.where(classes < order, logits_xV, -jnp.inf)


def check_pairs(a_SxB: np.ndarray, b_SxB: np.ndarray, order_S) -> None:
  """Refuses inputs that are not elements 0 .. order-1 of each run's own group."""
  if a_SxB.size and (min(a_SxB.min(), b_SxB.min()) < 0
                     or (np.maximum(a_SxB, b_SxB) >= np.asarray(order_S)[:, None]).any()):
    raise ValueError("apply: inputs must be group elements 0 .. order-1 of each run's group")

