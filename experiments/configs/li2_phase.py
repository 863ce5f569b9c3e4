r"""Grokking phase diagrams: where does generalisation start, across group orders, training sizes, optimisers
and seeds? A test of *Provable Scaling Laws of Feature Emergence* (Tian 2025, "Li2"): n ∼ M log M.

Command:   python -m universality.experiments.group_universality --workdir=runs/li2_phase \
               --config=experiments/configs/li2_phase.py
           The full study, for an accelerator: --config=experiments/configs/li2_phase.py:full
Runtime:   CPU default (get_config("cpu")): 7 groups x 6 multipliers x 6 seeds x 2 optimisers = 504 runs of
           1,500 full-batch steps, in 6 buckets (3 order ranges x Adam / Muon) — training, the per-cohort
           analysis, the bucket reports and the phase diagram — 14 min 55 s measured on a 2-core CPU at load
           average 7–10 (other work sharing it; 6 min 25 s of CPU time), so well under that on a quiet one.
           Full study (get_config("full")): 11 groups of orders 19 to 127 (C19 ... C127, S4, D13, D30, A4xC3,
           A5) x 9 multipliers x 32 seeds x 2 optimisers = 6,336 runs of 4,000 steps at the paper's width 512,
           in 12 buckets; 1.0e16 FLOPs of training (6 · pairs · width · order per run-step, bucket padding
           included; A5/D30/C59 and C127 are 80% of it): about 35 minutes on one H100 at a sustained
           5 TFLOP/s (these matrices are small for such a card), the analysis of its 198 cohorts and the
           reports tens of minutes more. An estimate: not measured on an accelerator.
Result:    report/index.md's "Phase diagram": per (group, optimiser) the share of seeds that generalise
           (test accuracy >= 0.99) against n / (s · M ln M), a heatmap over (group, multiplier), n* (half the
           seeds generalise) with a bootstrap interval over seeds, the fit of ln n* against ln M and ln ln M
           beside the law's n ∝ M ln M, steps to generalise, Muon against Adam at equal n, and the per-neuron
           irrep features (single-irrep share, entropy, which irreps) of runs above and below n*. Each
           bucket's own report carries the usual per-cohort analysis (key irreps, learning order, cross-seed neurons).

Settings: Li2's network (one-hot a, b -> W -> x² -> V, no biases) and MSE against the centred one-hot, Adam
(torch's, L2 decay) with β = (0.9, 0.999), wd 1e-4, as the paper's code; Muon as the paper's split (Muon on
W, momentum 0.99 without Nesterov, Li2's Newton–Schulz coefficients, no width scaling; Adam on V). For speed
on a CPU the default uses width 64 (the paper 512) and lr 1e-2 (the paper 1e-3), where C37 at 1.75× the law's
size generalises within ~150 steps under Adam and ~600 under Muon; "generalised" means by the last step, so
n* is the transition at that step budget. s is the law's group factor (1 for abelian groups and S_n, else the
largest irrep degree / 2: A4xC3 1.5, A5 2.5, so the sweep tests s too). Groups too small for the law's
sizes (n ≥ M² at the largest multiplier) would train on every pair and are left out of the diagram, so the
orders start at 19.
"""

from universality.engine import config as config_lib

SIZES = {
    # groups, multipliers, seeds, steps, width, eval_every, checkpoints
    "cpu": ("C19,C23,C29,C37,S4,D13,A4xC3", "0.7,0.85,1,1.2,1.45,1.75", 6, 1500, 64, 50, 3),
    "full": ("C19,C29,C41,C59,C83,C127,S4,D13,D30,A4xC3,A5", "0.5,0.6,0.7,0.85,1,1.2,1.45,1.75,2.1",
             32, 4000, 512, 50, 8),
}


def get_config(size: str = "cpu"):
  if size not in SIZES:
    raise ValueError(f"li2_phase: size must be one of {sorted(SIZES)}, got {size!r}")
  groups, mults, seeds, steps, width, eval_every, checkpoints = SIZES[size]
  cfg = config_lib.default_config()
  cfg.task.groups = groups
  cfg.task.train_frac = ""
  cfg.task.size_mult = mults
  cfg.task.loss = "mse"
  cfg.task.bucket_padding = 0.25
  cfg.model.name = "li2"
  cfg.model.li2.hidden = width
  cfg.model.li2.activation = "square"
  cfg.opt.name = "adam,muon"
  cfg.opt.lr = "1e-2"
  cfg.opt.weight_decay = "1e-4"
  cfg.opt.b1, cfg.opt.b2 = 0.9, 0.999
  cfg.opt.muon.momentum = 0.99
  cfg.opt.muon.nesterov = False
  cfg.opt.muon.other = "adam"
  cfg.opt.muon.ns_coeffs = "li2"
  cfg.opt.muon.scale_by_shape = False
  cfg.seeds = seeds
  cfg.steps = steps
  cfg.eval_every = eval_every
  cfg.num_checkpoints = checkpoints
  cfg.analysis.connectivity_points = 5  # the per-cohort analysis of hundreds of cohorts stays minutes
  return cfg
