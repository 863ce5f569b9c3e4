r"""CIFAR-10 vision study for accelerators: 16 seeds of a 5-conv-layer net (conv1-conv5, as the AlexNets
Li et al. 2016 compared, at CIFAR scale) with GroupNorm, trained with SGD + momentum, random crops and
flips, then compared layer by layer. Documented, not run on the CPU.

Command:   python -m universality.experiments.vision_universality --workdir=runs/cifar10 \
               --config=experiments/configs/vision_cifar10.py --config.task.data=/path/to/cifar-10-batches-bin
           (the binary version of CIFAR-10: data_batch_1.bin ... data_batch_5.bin and test_batch.bin)
Runtime:   not measured here (no accelerator). Its size: 16 runs × 30,000 steps of batch 128 at 32×32×3,
           about 0.3 GFLOP per image forward and backward; the size check refuses it on a machine whose
           memory it would not fit.
Result:    not measured here. Expected from Li et al.: the matched-unit correlation highest in conv1 and
           falling with depth; test accuracy of such nets on CIFAR-10 ~0.88-0.92.
"""

from universality.engine import config as config_lib


def get_config():
  cfg = config_lib.default_config("vision")
  cfg.task.data = "cifar-10-batches-bin"   # override with the path of the CIFAR-10 binary files
  cfg.task.augment_pad = 4
  cfg.task.augment_flip = True
  cfg.task.eval_examples = 10000
  cfg.task.eval_batch = 500
  cfg.seeds = 16
  cfg.steps = 30000
  cfg.eval_every = 1000
  cfg.batch_size = 128
  cfg.num_checkpoints = 12
  cfg.model.conv.widths = "64,128,256,256,256"
  cfg.model.conv.dense = "512"
  cfg.model.conv.pool_every = 1
  cfg.model.conv.norm = "group"
  cfg.model.conv.norm_groups = 8
  cfg.opt.name = "sgd"
  cfg.opt.sgd.momentum = 0.9
  cfg.opt.sgd.nesterov = True
  cfg.opt.lr = "0.05"
  cfg.opt.weight_decay = "5e-4"
  cfg.opt.warmup_steps = 500
  cfg.opt.schedule = "cosine"
  cfg.opt.final_lr_frac = 0.01
  cfg.analysis.images = 1000
  cfg.analysis.max_samples = 65536
  cfg.analysis.batch_images = 64        # 16 runs × 64 images × 32×32×64 floats of conv1 per batch
  cfg.analysis.convergent_pairs = 3
  return cfg
