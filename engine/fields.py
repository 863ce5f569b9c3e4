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


# The Convergent Learning passes (universality.engine.analysis.convergent) as analysis settings of a family's
# ``analysis`` section: off by default; the λ grid, FISTA steps, inputs sampled, clusters, pairs of runs
# compared per cohort (the first ones: run 0 against each other run first; 0: every pair) and the memory
# bound of the sparse prediction's solver.
CONVERGENT = {
    "convergent": False,
    "convergent_lambdas": "0.003,0.01,0.03,0.1,0.3",
    "convergent_iterations": 300,
    "convergent_inputs": 2048,
    "convergent_clusters": 8,
    "convergent_pairs": 3,
    "convergent_memory_gb": 1.0,
}


def convergent_values(section, prefix: str = "analysis.") -> dict:
  """The ``CONVERGENT`` settings of ``section`` (a config section or a dict) parsed and checked: a bool, a
  tuple of positive λ, positive integers (pairs >= 0) and a positive number of GB; a ``ValueError`` naming
  the first bad one."""
  get = lambda name: section[name] if name in section else CONVERGENT[name]  # noqa: E731
  on = get("convergent")
  if not isinstance(on, bool):
    raise ValueError(f"config.{prefix}convergent: expected True or False, got {on!r}")
  lambdas = get("convergent_lambdas")
  if isinstance(lambdas, (list, tuple)):  # as a notebook may pass them
    lambdas = ",".join(repr(v) if isinstance(v, (int, float)) else str(v) for v in lambdas)
  lambdas = parse_floats(lambdas, prefix + "convergent_lambdas")
  if not all(0 < v < float("inf") for v in lambdas):
    raise ValueError(f"config.{prefix}convergent_lambdas: every λ must be finite and > 0, got {lambdas}")
  values = {"convergent": on, "convergent_lambdas": lambdas}
  for name, low in (("convergent_iterations", 1), ("convergent_inputs", 4), ("convergent_clusters", 1),
                    ("convergent_pairs", 0)):
    values[name] = int_field({name: get(name)}, name, low, prefix)
  gb = get("convergent_memory_gb")
  if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not 0 < gb < float("inf"):
    raise ValueError(f"config.{prefix}convergent_memory_gb: expected a finite number of GB > 0, got {gb!r}")
  values["convergent_memory_gb"] = float(gb)
  return values
