r"""Default study: small groups x 16 seeds that grok on a 2-core CPU in a few minutes.

Command:   python -m experiments.group_universality --workdir=runs/default
Runtime:   TBD
Result:    TBD
"""

from engine import config as config_lib


def get_config():
  cfg = config_lib.default_config()
  cfg.groups = "C47,S4,D12"
  cfg.seeds = 16
  cfg.train_frac = "0.5"
  cfg.steps = 3000
  cfg.eval_every = 100
  cfg.num_checkpoints = 24   # log-spaced checkpoints (plus step 0 and the last step) for learning order
  cfg.analyze = True         # run engine.analysis and engine.report at the end
  return cfg
