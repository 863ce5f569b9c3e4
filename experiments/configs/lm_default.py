r"""Default language-model study: 8 seeds of a 2-layer byte transformer on the Python standard library,
trained together, then compared neuron by neuron (Gurnee et al. 2024, at toy scale).

Command:   python -m experiments.lm_universality --workdir=runs/lm
Runtime:   see benchmarks/README.md ("Language-model default study"); about 15 minutes on a 2-core CPU.
Result:    report/index.md: held-out bits per byte of every seed far below the unigram code; the universal
           fraction per layer beside GPT2's; the properties that set universal neurons apart; the text
           that drives the most universal neurons.
"""

from engine import config as config_lib


def get_config():
  cfg = config_lib.default_config("lm")
  cfg.seeds = 8
  cfg.steps = 1500
  cfg.eval_every = 50
  cfg.batch_size = 8              # context windows per step
  cfg.num_checkpoints = 12
  cfg.model.gpt.n_layers = 2
  cfg.model.gpt.d_model = 128
  cfg.model.gpt.n_heads = 4
  cfg.model.gpt.d_mlp = 512
  cfg.model.gpt.context = 128
  cfg.opt.lr = "3e-3"
  cfg.opt.weight_decay = "0.1"
  cfg.opt.warmup_steps = 100
  cfg.analysis.tokens = 1 << 17
  return cfg
