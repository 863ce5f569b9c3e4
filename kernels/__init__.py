"""Compute kernels used by the analyses: neuron correlation across models (Pallas on GPU/TPU, XLA on CPU).

``kernels.correlation`` is the public API; ``kernels.pallas_correlation`` holds the Pallas kernel.
"""

from kernels.correlation import (CoMoments, CorrelationError, Excess, MaxCorrelation, comoments,
                                 correlation_from_comoments, correlation_matrix, excess_correlation,
                                 finalize, init, max_correlation, resolve_backend, rotations, update)

__all__ = ["CoMoments", "CorrelationError", "Excess", "MaxCorrelation", "comoments",
           "correlation_from_comoments", "correlation_matrix", "excess_correlation", "finalize", "init",
           "max_correlation", "resolve_backend", "rotations", "update"]
