r"""Default study: three groups of order 60 x 16 seeds, trained together; groks on a 2-core CPU.

Command:   python -m universality.experiments.group_universality --workdir=runs/default
Runtime:   4-7 minutes on a 2-core CPU from a fresh clone, the pip install included: 3 min 56 s measured when
           training ran at ~890 model-steps/s; 6 min 27 s on a slower day of the same kind of machine
           (training 4 min 42 s at ~510 model-steps/s — the engine of that earlier day ran at the same rate
           there — then the analysis, now with cosets, margins, mode connectivity and redundancy, and the
           report ~1.5 min; all 48 runs generalised); about a minute on one accelerator.
Result:    most of the 48 runs generalise (test accuracy >= 0.99): the cyclic and dihedral runs within a few
           hundred steps, A5 within ~2,000. report/index.md shows, per group, the key-irrep table (how many
           seeds use each irrep) — seeds use different subsets of the irreps, as in *A Toy Model of
           Universality* —, the fraction of logits explained by key irreps (close to 1 after grokking), the
           learning order, cross-seed neuron correlations against their rotation baseline, and CKA.

Differences from the paper's setup, for speed on a laptop: lr 1e-2 instead of 1e-3 (grokking in thousands
rather than hundreds of thousands of steps) and groups of order 60 rather than 120. The architecture, AdamW
with weight decay 1.0, betas (0.9, 0.98) and full-batch training are the paper's.
"""

from universality.engine import config as config_lib


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
