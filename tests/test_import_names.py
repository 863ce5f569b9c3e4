"""The engine installs under one import root and never shadows (or is shadowed by) foreign ``kernels``,
``engine`` or ``experiments`` packages, wherever Python is started (the repository root included)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOREIGN = ("kernels", "engine", "experiments")


def _foreign_packages(tmp_path):
  for name in FOREIGN:
    (tmp_path / name).mkdir()
    # Hugging Face's `kernels` exports names like this one; `transformers` imports them at import time.
    (tmp_path / name / "__init__.py").write_text(f"ORIGIN = 'foreign {name}'\nclass CUDAProperties: pass\n")
  return str(tmp_path)


CHECK = textwrap.dedent("""
    import sys
    import kernels, engine, experiments
    from kernels import CUDAProperties                        # what transformers does
    assert [m.ORIGIN for m in (kernels, engine, experiments)] == \
        ['foreign kernels', 'foreign engine', 'foreign experiments'], (kernels, engine, experiments)
    import numpy as np
    from universality.engine import groups
    from universality.kernels import correlation
    from universality.experiments.configs import default
    acts_SxTxN = np.random.default_rng(0).normal(size=(2, 64, 3)).astype(np.float32)
    r = np.asarray(correlation.correlation_matrix(acts_SxTxN))
    ref = np.corrcoef(np.concatenate(list(acts_SxTxN), axis=1).T.astype(np.float64))
    assert np.abs(r - ref).max() < 1e-4
    assert groups.get("S3").table.shape == (6, 6) and default.get_config().family == "group"
    assert kernels.ORIGIN == 'foreign kernels'
    print("ok")
""")


def _run(cwd, tmp_path, first_on_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if first_on_path:   # a temporary directory first on sys.path, as the reproduction has it
    code = f"import sys; sys.path.insert(0, {_foreign_packages(tmp_path)!r})\n" + CHECK
  else:               # after the working directory, as an installed distribution is
    env["PYTHONPATH"] = _foreign_packages(tmp_path)
    code = CHECK
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_foreign_packages_first_on_path_beside_the_engine(tmp_path):
  res = _run(ROOT, tmp_path, first_on_path=True)
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_repository_root_as_working_directory_does_not_shadow_installed_packages(tmp_path):
  # Python puts the working directory before site-packages; our folders must not win there.
  res = _run(ROOT, tmp_path, first_on_path=False)
  assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_top_level_folders_hold_no_package_marker():
  for name in FOREIGN:
    assert not os.path.exists(os.path.join(ROOT, name, "__init__.py")), name
