"""Caches of numpy archives, written atomically (``universality.engine.paths.write_npz``): readers see the old file or
the new one, never half of one."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from universality.engine import paths


def write_cache(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``universality.engine.paths.write_npz`` for a cache: an unwritable cache only costs recomputation, so errors are
  ignored."""
  try:
    paths.write_npz(path, arrays)
  except OSError:
    pass
