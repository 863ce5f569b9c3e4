"""Typed records of analysis results: frozen dataclasses written to and read from plain JSON.

A record's fields, in order, are the keys of its JSON object. ``to_json`` writes one (numpy and JAX values
as plain numbers and lists, non-finite numbers as null); ``from_json`` reads one back: a field missing from
the JSON (a summary written before the field was added) reads as None, a key the record does not know is
ignored, and fields typed as records, lists or dicts of records are read back as such. Every family's
records and the generic passes' (``convergent``) are built on ``Record`` and ``record``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Optional

from universality.engine.analysis.jsonable import to_json as _jsonable

Num = Optional[float]


class Record:
  """A frozen dataclass read from and written to plain JSON (module docstring)."""

  def to_json(self) -> dict:
    return _jsonable({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

  @classmethod
  def from_json(cls, obj: typing.Mapping[str, Any]):
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _parse(hints[f.name], obj.get(f.name)) for f in dataclasses.fields(cls)})


def _plain(value):
  if isinstance(value, Record):
    return value.to_json()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _parse(hint, value):
  """``value`` (plain JSON) as the type ``hint`` says: records, lists and dicts of them, else as is."""
  if value is None:
    return None
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    inner = [a for a in args if a is not type(None)]
    return _parse(inner[0], value) if len(inner) == 1 else value
  if isinstance(hint, type) and issubclass(hint, Record):
    return hint.from_json(value)
  if origin is list and args:
    return [_parse(args[0], v) for v in value]
  if origin is dict and len(args) == 2:
    return {k: _parse(args[1], v) for k, v in value.items()}
  return value


def record(cls):
  """A frozen dataclass that is a ``Record``."""
  return dataclasses.dataclass(frozen=True)(cls)
