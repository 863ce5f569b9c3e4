r"""Default vision study: 16 seeds of a 3-conv-layer net on scikit-learn's handwritten digits, trained
together, then compared unit by unit per layer (Li et al. 2016, *Convergent Learning*, at toy scale).

Command:   python -m universality.experiments.vision_universality --workdir=runs/vision
           (needs the ``vision`` extra for the digits: pip install -e '.[vision]')
Runtime:   4 min 26 s from one command on a 2-core CPU shared with other jobs (load 7-8; 92 s of CPU
           time: training 16 × 1,500 steps at ~260 model-steps/s on a quiet core, the analysis of 4 layers
           and the report); peak memory 1.25 GB.
Result:    seen with scikit-learn 1.x's digits (1,438 training, 359 test images): test accuracy 0.972-0.994
           for every seed. Mean correlation of matched units, run 0 against runs 1-3, greedy / max
           matching: conv1 0.626 / 0.493, conv2 0.475 / 0.420, conv3 0.738 / 0.696, fc1 0.690 / 0.630
           (Li et al.'s AlexNets: conv1 0.703 / 0.663 falling to conv5 0.416 / 0.385); the maximum
           correlation with another seed clears its rotation baseline by 0.08, 0.05, 0.10 and 0.00 per
           layer (no unit above the 0.5 excess of Gurnee et al.), while CKA between seeds is 0.69, 0.63,
           0.79 and 0.82: the seeds share subspaces more than single units. Sparse prediction of a unit
           from all units of another seed: held-out loss 0.25 (conv1) / 0.48 (conv2) / 0.17 (conv3) at
           λ = 0.003, using 15 / 29 / 27 units, and 0.37 / 0.61 / 0.27 at λ = 0.1 with 7 / 10 / 6 units;
           spectral clusters of two seeds' units are mixed (units of both) in 71% (conv1) to 100% (conv2,
           fc1) of the 8 clusters. Mode connectivity, run 0 to runs 1-3 on 512 training images: mean loss
           barrier 2.28 unaligned, 1.76 after weight matching, 1.07 after activation matching (lowest
           accuracy on the paths 0.11, 0.27-0.42, 0.44-0.77): no linear connectivity at this width.
           Iterative feature merging (tolerance 0.01 nats) keeps 12.9 / 28.3 / 29.9 / 52.4 of the 16 / 32 /
           32 / 64 units of conv1 / conv2 / conv3 / fc1.
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config("vision")
  cfg.seeds = 16
  cfg.steps = 1500
  cfg.eval_every = 100
  cfg.batch_size = 64
  cfg.num_checkpoints = 6
  cfg.model.conv.widths = "16,32,32"
  cfg.model.conv.dense = "64"
  cfg.opt.name = "adamw"
  cfg.opt.lr = "3e-3"
  cfg.opt.weight_decay = "1e-4"
  return cfg
