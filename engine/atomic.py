"""Atomic writes of numpy archives: readers see the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import numpy as np


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes ``arrays`` to ``path`` (an .npz of plain arrays, readable with ``allow_pickle=False``) through a
  temporary file in the same directory and a rename; the directory is created if needed."""
  directory = os.path.dirname(path) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)
    tmp = None
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def write_cache(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """``write_npz`` for a cache: an unwritable cache only costs recomputation, so errors are ignored."""
  try:
    write_npz(path, arrays)
  except OSError:
    pass
