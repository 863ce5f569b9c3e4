r"""Train many seeds on composition in finite groups, then compare which features they learned.

  python -m universality.experiments.group_universality --workdir=runs/default
  python -m universality.experiments.group_universality --workdir=runs/s5 --config=experiments/configs/chughtai_mlp.py
  python -m universality.experiments.group_universality --workdir=runs/x --config.task.groups=S4,D6,C24 --config.seeds=64

Relaunching the same command resumes from the newest checkpoint. On a TPU pod or a multi-GPU cluster add
``--distributed`` (every process runs the same command; see BUILD.md). Bad flags, config files and configs
end with one line ``error: ...`` on stderr and exit status 2.
"""

from absl import app

from universality.experiments import cli

cli.define("default.py")

if __name__ == "__main__":
  app.run(cli.main, flags_parser=cli.parse_flags)
