r"""Default study: three groups of order 60 x 16 seeds, trained together; groks on a 2-core CPU.

Command:   python -m experiments.group_universality --workdir=runs/default
Runtime:   about 4 minutes on a 2-core CPU from a fresh clone (measured 3 min 56 s including the pip install:
           training 2 min 41 s at ~890 model-steps/s, analysis and report ~1 min; 9 min 14 s on the same
           machine busy with other jobs); about a minute on one accelerator.
Result:    most of the 48 runs generalise (test accuracy >= 0.99): the cyclic and dihedral runs within a few
           hundred steps, A5 within ~2,000. report/index.md shows, per group, the key-irrep table (how many
           seeds use each irrep) — seeds use different subsets of the irreps, as in *A Toy Model of
           Universality* —, the fraction of logits explained by key irreps (close to 1 after grokking), the
           learning order, cross-seed neuron correlations against their rotation baseline, and CKA.

Differences from the paper's setup, for speed on a laptop: lr 1e-2 instead of 1e-3 (grokking in thousands
rather than hundreds of thousands of steps) and groups of order 60 rather than 120. The architecture, AdamW
with weight decay 1.0, betas (0.9, 0.98) and full-batch training are the paper's.
"""

from engine import config as config_lib


def get_config():
  cfg = config_lib.default_config()
  cfg.task.groups = "C59,D30,A5"   # cyclic (prime order), dihedral (order 60), alternating (order 60)
  cfg.seeds = 16
  cfg.opt.lr = "1e-2"
  cfg.opt.weight_decay = "1.0"
  cfg.task.train_frac = "0.6"
  cfg.steps = 3000
  cfg.eval_every = 50
  cfg.num_checkpoints = 24
  return cfg
