"""Markdown pieces shared by the families' report sections, the study report and notebooks."""

from __future__ import annotations

import re
from typing import Any, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table (the families' report sections and the notebook use it)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def file_prefix(position: int, cohort: str) -> str:
  """Filename-safe prefix of a cohort's images: its position among the cohorts and its sanitised name."""
  return f"c{position}_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", cohort)
