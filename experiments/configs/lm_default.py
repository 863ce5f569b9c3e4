r"""Default language-model study: 8 seeds of a 2-layer byte transformer on the Python standard library,
trained together, then compared neuron by neuron (Gurnee et al. 2024, at toy scale).

Command:   python -m universality.experiments.lm_universality --workdir=runs/lm
Runtime:   12 min 56 s on a 2-core CPU shared with other jobs (load 4-6; training ~25 model-steps/s, the
           universal-neurons pass over 2^17 held-out bytes and the report ~3 min); peak memory 2.4 GB.
Result:    seen on Python 3.11.7's standard library: held-out 2.63-2.69 bits per byte for every seed (the
           unigram code: 4.54), next-byte accuracy 0.52-0.53; 0.59% of the neurons universal (excess > 0.5 over
           the 8 seeds), all in the last layer (1.17% of it, none in the first); universal neurons sit at
           lower activation frequency (median within-layer percentile 14), more negative input bias (11),
           higher pre-activation kurtosis (87) and larger ‖w_in‖, ‖w_out‖ (86, 91) than the other neurons, as
           Gurnee et al. found in GPT2; the most universal ones fire on the hex digits of codec tables and
           on "self." in method bodies.
"""

from universality.engine import config as config_lib


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
