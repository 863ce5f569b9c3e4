r"""Default vision study: 16 seeds of a 3-conv-layer net on scikit-learn's handwritten digits, trained
together, then compared unit by unit per layer (Li et al. 2016, *Convergent Learning*, at toy scale).

Command:   python -m universality.experiments.vision_universality --workdir=runs/vision
Runtime:   (measured below)
Result:    (measured below)
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config("vision")
  cfg.seeds = 16
  cfg.steps = 1500
  cfg.eval_every = 100
  cfg.batch_size = 64
  cfg.num_checkpoints = 6
  cfg.model.conv.widths = "16,32,32"
  cfg.model.conv.dense = "64"
  cfg.opt.name = "adamw"
  cfg.opt.lr = "3e-3"
  cfg.opt.weight_decay = "1e-4"
  return cfg
