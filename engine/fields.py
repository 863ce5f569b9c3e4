"""Readers of config fields shared by the study config (``universality.engine.config``) and the task
families, which parse their own sweep axes and sections with them: comma-separated floats, bounded
integers, the seed numbers of a sweep. Below both, so that neither imports the other for them."""

from __future__ import annotations


def parse_floats(text, name: str) -> tuple[float, ...]:
  """``"1e-3, 3e-3"`` -> ``(0.001, 0.003)``; a bare number is accepted too."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    values = (float(text),)
  elif isinstance(text, str):
    try:
      values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
      raise ValueError(f"config.{name}: cannot read {text!r} as comma-separated floats") from None
  else:
    raise ValueError(f"config.{name}: expected comma-separated floats, got {type(text).__name__}")
  if not values:
    raise ValueError(f"config.{name}: empty list")
  if len(set(values)) != len(values):
    raise ValueError(f"config.{name}: repeated values in {text!r}")
  return values


def int_field(section, name: str, minimum: int, prefix: str = "") -> int:
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"config.{prefix}{name}: expected an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"config.{prefix}{name}: must be >= {minimum}, got {value}")
  return value


def seed_numbers(cfg) -> range:
  return range(int(cfg.seed_offset), int(cfg.seed_offset) + int(cfg.seeds))
