"""Atomic writes of numpy archives: readers see the old file or the new one, never half of one."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from engine import paths


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` to ``path`` (an .npz of plain arrays, readable with ``allow_pickle=False``): locally
  through a temporary file in the same directory and a rename, the directory created if needed; on an
  object store (``gs://``) as one object (``engine.paths``)."""
  paths.write_npz(path, arrays)


def write_cache(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``write_npz`` for a cache: an unwritable cache only costs recomputation, so errors are ignored."""
  try:
    write_npz(path, arrays)
  except OSError:
    pass
