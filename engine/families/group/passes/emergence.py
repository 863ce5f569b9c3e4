"""The features that emerge (Tian 2025, *Provable Scaling Laws of Feature Emergence*): per neuron, the share
of its input weights in each irrep and the entropy of that distribution.

A hidden node n reads the inputs through two functions on the group, f_a(g) = W[g, n] and f_b(g) = W[M+g, n]
(for the MLP, the effective weights P_a, P_b: ``models.effective_weights``). Their Fourier power in each real
irrep ρ (``universality.engine.irreps.fourier_power``: w_ρ‖f̂(ρ)‖², Plancherel) summed over both sides and
normalised over all irreps, the trivial one included, is the neuron's irrep distribution; its entropy (nats)
is 0 for a neuron in one irrep and log R for power spread evenly over the R real irreps. The paper's own probe
(its code's notebooks call the normalised power "energy") takes the complex DFT of the a side of Z_M, max
log M; ``entropy_complex`` is that entropy over complex irreps: a real irrep of complex type holds two
conjugate complex irreps of equal power, so it adds its share · log 2 to the real entropy.

A neuron is *single-irrep* when its dominant non-trivial irrep holds at least ``threshold`` of the power in
non-trivial irreps (the constant part, which a bias-free square network also carries, is left out of that
test); dead neurons (input weights below ``dead_norm``) are excluded from every count.

Li2's energy function E, whose local maxima the paper says the hidden nodes ascend independently, is not
computed: its formula could not be established from the paper's code (``ssl/real-dataset/cogo/``), whose
only "energy" is the normalised Fourier power above.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import chex
import numpy as np

from universality.engine import irreps as irreps_lib

DEFAULT_THRESHOLD = 0.9
DEAD_NORM = 1e-5


class NeuronFeatures(NamedTuple):
  """Per-neuron irrep features of S runs of N neurons over the R real irreps of one group.

  Attributes:
    share_SxNxR: the share of each neuron's input power (both sides) in each irrep; rows sum to 1 (0 dead).
    entropy_SxN: entropy of ``share`` in nats (max log R).
    entropy_complex_SxN: the same over complex irreps (module docstring).
    top_SxN: the dominant non-trivial irrep's index into the irreps (trivial excluded).
    top_share_SxN: its share of the non-trivial power.
    live_SxN: the neuron's input weights are not all ~0.
    single_SxN: live and ``top_share >= threshold``.
  """
  share_SxNxR: np.ndarray
  entropy_SxN: np.ndarray
  entropy_complex_SxN: np.ndarray
  top_SxN: np.ndarray
  top_share_SxN: np.ndarray
  live_SxN: np.ndarray
  single_SxN: np.ndarray


def neuron_features(w_a_SxGxN, w_b_SxGxN, irreps: Sequence[irreps_lib.Irrep], *,
                    threshold: float = DEFAULT_THRESHOLD, dead_norm: float = DEAD_NORM) -> NeuronFeatures:
  """The features of the module docstring for input weights ``[S, G, N]`` of each side (rows: elements)."""
  w_a_SxGxN, w_b_SxGxN = np.asarray(w_a_SxGxN), np.asarray(w_b_SxGxN)
  chex.assert_rank([w_a_SxGxN, w_b_SxGxN], 3)
  chex.assert_equal_shape([w_a_SxGxN, w_b_SxGxN])
  g = irreps[0].order
  if w_a_SxGxN.shape[1] != g:
    raise ValueError(f"neuron_features: weights have {w_a_SxGxN.shape[1]} rows, the group {g} elements")
  if irreps[0].name != "trivial":
    raise ValueError("neuron_features: the irreps must start with the trivial one (irreps.real_irreps)")
  power_SxNxR = sum(np.asarray(irreps_lib.fourier_power(np.swapaxes(w, 1, 2).astype(np.float32), irreps),
                               np.float64) for w in (w_a_SxGxN, w_b_SxGxN))
  power_SxNxR = np.maximum(power_SxNxR, 0.0)
  norm_SxN = np.sqrt(np.sum(w_a_SxGxN.astype(np.float64) ** 2 + w_b_SxGxN.astype(np.float64) ** 2, axis=1))
  live_SxN = norm_SxN > dead_norm
  total_SxN = power_SxNxR.sum(-1)
  share_SxNxR = np.where(live_SxN[..., None], power_SxNxR / np.maximum(total_SxN, 1e-300)[..., None], 0.0)
  entropy_SxN = -np.sum(np.where(share_SxNxR > 0, share_SxNxR * np.log(np.maximum(share_SxNxR, 1e-300)), 0.0),
                        axis=-1)
  complex_R = np.asarray([r.frobenius_schur == 0 for r in irreps], np.float64)
  entropy_complex_SxN = entropy_SxN + np.log(2.0) * (share_SxNxR @ complex_R)
  rest_SxNxR = power_SxNxR[..., 1:]
  top_SxN = np.argmax(rest_SxNxR, axis=-1) + 1
  rest_total_SxN = rest_SxNxR.sum(-1)
  top_power_SxN = np.max(rest_SxNxR, axis=-1)
  top_share_SxN = np.where(rest_total_SxN > 0, top_power_SxN / np.maximum(rest_total_SxN, 1e-300), 0.0)
  return NeuronFeatures(share_SxNxR=share_SxNxR, entropy_SxN=np.where(live_SxN, entropy_SxN, 0.0),
                        entropy_complex_SxN=np.where(live_SxN, entropy_complex_SxN, 0.0), top_SxN=top_SxN,
                        top_share_SxN=top_share_SxN, live_SxN=live_SxN,
                        single_SxN=live_SxN & (top_share_SxN >= threshold))


def run_summaries(features: NeuronFeatures, irreps: Sequence[irreps_lib.Irrep]) -> list[dict]:
  """Per run: live neurons, the share of them that are single-irrep, mean entropy (real and complex), and
  how many single-irrep neurons each non-trivial irrep has (irreps with none left out)."""
  names = [r.name for r in irreps]
  out = []
  for s in range(features.live_SxN.shape[0]):
    live = features.live_SxN[s]
    single = features.single_SxN[s]
    counts = np.bincount(features.top_SxN[s][single], minlength=len(names))
    n_live = int(live.sum())
    out.append({
        "live": n_live,
        "single_fraction": float(single.sum() / n_live) if n_live else None,
        "mean_entropy": float(features.entropy_SxN[s][live].mean()) if n_live else None,
        "mean_entropy_complex": float(features.entropy_complex_SxN[s][live].mean()) if n_live else None,
        "single_irreps": {names[i]: int(c) for i, c in enumerate(counts) if c},
    })
  return out
