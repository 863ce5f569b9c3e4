r"""*A Toy Model of Universality* (Chughtai, Chan, Nanda 2023), the one-layer transformer study.

Command:   python -m universality.experiments.group_universality --workdir=runs/chughtai_transformer \
               --config=experiments/configs/chughtai_transformer.py
           (S6 in the same command: --config.task.groups=C113,C118,D59,D61,S5,A5,S6 and S6=0.4 added to
           --config.task.train_frac_by_group; it trains as a bucket of its own, so that the order-120 groups
           are not padded to 720 classes: universality.engine.launch.describe.)
Runtime:   accelerator work: 6 groups x 50 seeds x 50k full-batch steps of a d_model 128 transformer; hours
           on one GPU, less on a TPU pod slice with --distributed (BUILD.md). Not meant for a 2-core CPU.
Result:    every run generalises; as for the MLP, seeds learn different subsets of the irreps, each run's
           logits are explained by its key irreps, and the report tabulates how many seeds use each irrep.

Settings (the paper's): 1 layer, d_model 128, 4 heads, d_mlp 512, ReLU, no LayerNorm, tokens `a b =` read
out at `=`; AdamW lr 1e-3, weight decay 1.0, betas (0.9, 0.98), full batch; train fractions S5 0.6, A5 0.6,
cyclic and dihedral 0.3.
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config()
  cfg.model.name = "transformer"
  cfg.task.groups = "C113,C118,D59,D61,S5,A5"
  cfg.task.train_frac_by_group = "C113=0.3,C118=0.3,D59=0.3,D61=0.3,S5=0.6,A5=0.6"
  cfg.seeds = 50
  cfg.opt.lr = "1e-3"
  cfg.opt.weight_decay = "1.0"
  cfg.steps = 50_000
  cfg.eval_every = 500
  cfg.num_checkpoints = 40
  return cfg
