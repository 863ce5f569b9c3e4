r"""Train many seeds of a byte-level language model, then find the neurons they share (Gurnee et al. 2024).

  python -m universality.experiments.lm_universality --workdir=runs/lm
  python -m universality.experiments.lm_universality --workdir=runs/lm --config.seeds=4 --config.steps=500
  python -m universality.experiments.lm_universality --workdir=runs/g2 --config=experiments/configs/lm_gpt2_small.py
  python -m universality.experiments.lm_universality --workdir=runs/x --config.task.corpus=/path/to/text_or_dir

Relaunching the same command resumes from the newest checkpoint. On a TPU pod or a multi-GPU cluster add
``--distributed`` (every process runs the same command; see BUILD.md). Bad flags, config files and configs
end with one line ``error: ...`` on stderr and exit status 2.
"""

from absl import app

from universality.experiments import cli

cli.define("lm_default.py")

if __name__ == "__main__":
  app.run(cli.main, flags_parser=cli.parse_flags)
