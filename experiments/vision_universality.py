r"""Train many seeds of a conv net on images, then ask whether they learned the same units (Li et al. 2016).

  python -m universality.experiments.vision_universality --workdir=runs/vision
  python -m universality.experiments.vision_universality --workdir=runs/v --config.seeds=4 --config.steps=500
  python -m universality.experiments.vision_universality --workdir=runs/mnist \
      --config.task.data=/path/to/mnist
  python -m universality.experiments.vision_universality --workdir=runs/c10 \
      --config=experiments/configs/vision_cifar10.py --config.task.data=/path/to/cifar-10-batches-bin

Relaunching the same command resumes from the newest checkpoint. On a TPU pod or a multi-GPU cluster add
``--distributed`` (every process runs the same command; see BUILD.md). Bad flags, config files, configs and
data files end with one line ``error: ...`` on stderr and exit status 2.
"""

from absl import app

from universality.experiments import cli

cli.define("vision_default.py")

if __name__ == "__main__":
  app.run(cli.main, flags_parser=cli.parse_flags)
