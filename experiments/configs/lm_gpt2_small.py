r"""GPT2-small-shaped byte models (12 layers × d_model 768, 12 heads, d_mlp 3072, context 1024), 5 seeds: the
shape of the models Gurnee et al. (2024) compared, trained here on the Python standard library. For
accelerators.

Command:   python -m universality.experiments.lm_universality --workdir=runs/gpt2s --config=experiments/configs/lm_gpt2_small.py
Runtime:   not measured in this project yet (it needs an accelerator).
Memory:    the correlation pass compares 5 × 36,864 neurons over 2^24 held-out bytes in memory that does not
           grow with T, but its fixed part is large: one Haar rotation and one own co-moment per model
           (5 × 36,864² floats each, 27 GB each) and the co-moment tiles of one pass (``analysis.memory_gb``);
           about 80 GB of device memory in all, so an H200-class accelerator, or fewer seeds / layers.
Result:    the universal fraction per layer and the properties of universal neurons, comparable with the
           paper's GPT2-small figures (4.16% universal) but with a rotation baseline.
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config("lm")
  cfg.seeds = 5
  cfg.steps = 50000
  cfg.eval_every = 500
  cfg.batch_size = 32
  cfg.num_checkpoints = 24
  cfg.model.gpt.n_layers = 12
  cfg.model.gpt.d_model = 768
  cfg.model.gpt.n_heads = 12
  cfg.model.gpt.d_mlp = 3072
  cfg.model.gpt.context = 1024
  cfg.opt.lr = "6e-4"
  cfg.opt.weight_decay = "0.1"
  cfg.opt.warmup_steps = 2000
  cfg.analysis.tokens = 1 << 24
  cfg.analysis.batch_windows = 8
  cfg.analysis.memory_gb = 22.0   # four 36,864² tiles: the first pass's row of cross-model tiles
  return cfg
