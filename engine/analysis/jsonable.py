"""Plain JSON values from analysis results (numpy and JAX scalars and arrays; non-finite floats as null)."""

from __future__ import annotations

import jax
import numpy as np


def to_json(x):
  """JSON-ready: numpy scalars to Python, non-finite floats to None, arrays to nested lists."""
  if isinstance(x, dict):
    return {str(k): to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_json(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return to_json(np.asarray(x).tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  return x
