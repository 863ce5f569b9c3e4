r"""How many seeds does a universality claim need? One group, many seeds, one program.

Command:   python -m universality.experiments.group_universality --workdir=runs/seed_sweep \
               --config=experiments/configs/seed_sweep.py
           Smaller or larger: --config.seeds=64 (CPU, ~10 min) or --config.seeds=1024 (an accelerator).
Runtime:   256 seeds x 3,000 steps of A5 and D30: about 40 minutes on a 2-core CPU, a few minutes on a GPU.
Result:    the key-irrep table of report/index.md over 256 seeds per group: the frequency with which each irrep
           is used, with small-sample noise gone (compare its counts on the first 16 seeds, which are exactly
           the 16 runs of default.py for the same group: a run depends only on seed, seed index and group).
           Cross-seed neuron statistics (max correlation against the rotation baseline, matching, CKA) are
           computed over all pairs of the 256 runs.
"""

from universality.experiments.configs import default


def get_config():
  cfg = default.get_config()
  cfg.task.groups = "D30,A5"
  cfg.seeds = 256
  return cfg
