r"""*A Toy Model of Universality* (Chughtai, Chan, Nanda 2023), the MLP study, with the paper's settings.

Command:   python -m experiments.group_universality --workdir=runs/chughtai_mlp \
               --config=experiments/configs/chughtai_mlp.py
           (S6 is its own study: add --config.task.groups=S6 --config.task.train_frac_by_group=S6=0.25; training it
           beside order-120 groups would pad every group to 720 classes.)
Runtime:   accelerator work: 6 groups x 50 seeds x 250k full-batch steps. On one H100-class GPU expect hours;
           on a TPU pod slice add --distributed (BUILD.md). On a 2-core CPU this is days: use default.py.
Result:    every run generalises (test accuracy >= 0.9999 in the paper). For S5 the paper's table over 50 seeds
           has key irreps sign 49, standard 49, 5d_a 18, standard⊗sign 17, 5d_b 10, 6d 0, and the sign irrep
           learned first in 45 of 50; report/index.md prints the same table for this run.

Settings (the paper's): MLP with embeddings of width 256, hidden 128, ReLU; AdamW lr 1e-3, weight decay 1.0,
betas (0.9, 0.98), full batch; train fractions S5 0.4, A5 0.5, cyclic and dihedral 0.3; groups C113, C118,
D59, D61 (dihedral of the n-gon, order 2n), S5, A5.
"""

from engine import config as config_lib


def get_config():
  cfg = config_lib.default_config()
  cfg.model.name = "mlp"
  cfg.task.groups = "C113,C118,D59,D61,S5,A5"
  cfg.task.train_frac_by_group = "C113=0.3,C118=0.3,D59=0.3,D61=0.3,S5=0.4,A5=0.5"
  cfg.seeds = 50
  cfg.opt.lr = "1e-3"
  cfg.opt.weight_decay = "1.0"
  cfg.steps = 250_000
  cfg.eval_every = 1000
  cfg.num_checkpoints = 48
  return cfg
