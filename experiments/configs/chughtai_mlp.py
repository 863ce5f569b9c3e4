r"""*A Toy Model of Universality* (Chughtai, Chan, Nanda 2023), the MLP study, with the paper's settings.

Command:   python -m universality.experiments.group_universality --workdir=runs/chughtai_mlp \
               --config=experiments/configs/chughtai_mlp.py
           One command for all seven groups: the launch trains them in three buckets, one program each
           (task.bucket_padding 0.25: no group padded beyond 1.25 x its order), one after another, into
           runs/chughtai_mlp/buckets/<name>/ -- order60 (A5), order113-122 (C113, C118, D59, D61, S5) and
           order720 (S6) -- with runs/chughtai_mlp/report/index.md linking their reports (universality.engine.rundir).
           replay.open("runs/chughtai_mlp").select(group="S6") opens the S6 runs.
Runtime:   accelerator work: 7 groups x 50 seeds x 250k full-batch steps; S6 (720 classes, 518k pairs per run)
           costs more than the other six together. On one H100-class GPU expect hours; on a TPU pod slice
           add --distributed (BUILD.md). On a 2-core CPU this is days: use default.py.
Result:    every run generalises (test accuracy >= 0.9999 in the paper). For S5 the paper's table over 50 seeds
           has key irreps sign 49, standard 49, 5d_a 18, standard⊗sign 17, 5d_b 10, 6d 0, and the sign irrep
           learned first in 45 of 50; the report of bucket order113-122 prints the same table for this run.

Settings (the paper's): MLP with embeddings of width 256, hidden 128, ReLU; AdamW lr 1e-3, weight decay 1.0,
betas (0.9, 0.98), full batch; train fractions S5 0.4, S6 0.25, A5 0.5, cyclic and dihedral 0.3; groups
C113, C118, D59, D61 (dihedral of the n-gon, order 2n), S5, A5, S6.
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config()
  cfg.model.name = "mlp"
  cfg.task.groups = "C113,C118,D59,D61,S5,A5,S6"
  cfg.task.train_frac_by_group = "C113=0.3,C118=0.3,D59=0.3,D61=0.3,S5=0.4,A5=0.5,S6=0.25"
  cfg.task.bucket_padding = 0.25
  cfg.seeds = 50
  cfg.opt.lr = "1e-3"
  cfg.opt.weight_decay = "1.0"
  cfg.steps = 250_000
  cfg.eval_every = 1000
  cfg.num_checkpoints = 48
  return cfg
