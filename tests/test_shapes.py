"""Shape letters: every letter in a shape-suffixed name (``acts_SxTxN``) has one meaning wherever it is read.

A letter is either one of its package's letters (``engine/shapes.py`` for the engine, experiments and
benchmarks; ``kernels/shapes.py`` for the kernels, which share S, T, B, N and M with the engine), which mean
the same in every module of the package, or one its module declares in a "Local shape letters" block of its
docstring, for axes private to that module; a module may not give a package letter a meaning of its own.
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("engine", "kernels", "experiments", "benchmarks")
# A name ending in one or more shape letters joined by "x" (digits stand for literal sizes: ``target_SxPx1``).
SHAPED = re.compile(r"\b[a-z][a-z0-9_]*?_((?:[A-Z0-9]x)*[A-Z0-9])\b")
LETTER_LINE = re.compile(r"^\s+([A-Z])\s{2,}\S")


def _letters(block_start: str, doc: str) -> dict[str, str]:
  """``{letter: meaning}`` of the block of ``doc`` that starts with a line beginning ``block_start``."""
  out, inside = {}, False
  for line in doc.splitlines():
    if line.strip().startswith(block_start):
      inside = True
      continue
    if inside:
      m = LETTER_LINE.match(line)
      if not m:
        if out:
          break
        inside = not line.strip()  # blank lines may separate the heading from its letters
        continue
      out[m.group(1)] = line.strip()[1:].strip()
  return out


def shared_letters(package: str = "engine") -> dict[str, str]:
  with open(os.path.join(ROOT, package, "shapes.py")) as f:
    return _letters("Shape letters", ast.get_docstring(ast.parse(f.read())) or "")


def violations(source: str, shared: dict[str, str]) -> list[str]:
  """What is wrong with the shape letters of one module's ``source``: undeclared letters, and shared
  letters that the module declares again."""
  local = _letters("Local shape letters", ast.get_docstring(ast.parse(source)) or "")
  out = [f"local letter {c} is a shared one ({shared[c]})" for c in local if c in shared]
  for m in SHAPED.finditer(source):
    for c in m.group(1).split("x"):
      if not c.isdigit() and c not in shared and c not in local:
        out.append(f"{m.group(0)}: letter {c} is neither shared nor declared locally")
  return sorted(set(out))


def _modules():
  for folder in FOLDERS:
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(base, name)
          yield os.path.relpath(path, ROOT), path


def test_the_packages_share_their_common_letters_word_for_word():
  engine, kernels = shared_letters("engine"), shared_letters("kernels")
  assert {"S", "G", "T", "N", "M"} <= set(engine) and {"S", "T", "N", "W", "J"} <= set(kernels)
  for c in ("T", "B", "N", "M"):
    assert kernels[c] == engine[c], c


def test_every_shape_letter_is_shared_or_declared_in_its_module():
  tables = {"engine": shared_letters("engine"), "kernels": shared_letters("kernels")}
  found = {}
  for rel, path in _modules():
    with open(path) as f:
      bad = violations(f.read(), tables["kernels" if rel.startswith("kernels") else "engine"])
    if bad:
      found[rel] = bad
  assert not found, "\n".join(f"{rel}: {b}" for rel, bad in found.items() for b in bad)


@pytest.mark.parametrize("source, expected", [
    ('"""Doc."""\nacts_SxTxN = 0\n', []),
    ('"""Doc."""\nacts_SxQxN = 0\n', ["acts_SxQxN: letter Q is neither shared nor declared locally"]),
    ('"""Doc.\n\nLocal shape letters:\n  Q  queries\n"""\nacts_SxQxN = 0\n', []),
    ('"""Doc.\n\nLocal shape letters:\n  T  tiles\n"""\n', ["local letter T is a shared one"]),
])
def test_the_scan_finds_planted_letters(source, expected):
  shared = {"S": "runs", "T": "samples", "N": "neurons"}
  got = violations(source, shared)
  assert len(got) == len(expected) and all(g.startswith(e) for g, e in zip(got, expected))
