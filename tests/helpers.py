"""Test helpers: group-family configs from short field names."""

from universality.engine import config as config_lib

# Short names used by the tests -> their place in the nested config.
FIELDS = {
    "groups": "task.groups", "train_frac": "task.train_frac", "train_frac_by_group": "task.train_frac_by_group",
    "model": "model.name", "embed_dim": "model.mlp.embed_dim", "hidden": "model.mlp.hidden",
    "d_model": "model.transformer.d_model", "n_heads": "model.transformer.n_heads",
    "d_mlp": "model.transformer.d_mlp", "n_layers": "model.transformer.n_layers",
    "lr": "opt.lr", "weight_decay": "opt.weight_decay", "b1": "opt.b1", "b2": "opt.b2", "eps": "opt.eps",
    "run_chunk": "exec.run_chunk", "analyze": "exec.analyze",
}


def set_fields(cfg, **fields):
  """Sets fields by short name (``groups=``, ``hidden=``) or dotted path (``task.groups``); returns cfg."""
  cfg.update_from_flattened_dict({FIELDS.get(k, k): v for k, v in fields.items()})
  return cfg


def group_config(**fields):
  return set_fields(config_lib.default_config("group"), **fields)


def flag(name: str) -> str:
  """The --config flag path of a short field name."""
  return FIELDS.get(name, name)
