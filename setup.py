"""Installs the repository's top-level folders under one import root, ``universality``.

``engine/``, ``experiments/`` and ``kernels/`` stay where they are but install as ``universality.engine``,
``universality.experiments`` and ``universality.kernels``: their bare names are other distributions' import
names (Hugging Face's ``kernels``, which ``transformers`` imports). The folders themselves hold no
``__init__.py``, so that running from the repository root never shadows a foreign package of the same name.
"""

import setuptools

ROOTS = ("engine", "experiments", "kernels")
subpackages = setuptools.find_packages(include=[f"{r}.*" for r in ROOTS])
setuptools.setup(
    packages=[f"universality.{p}" for p in (*ROOTS, *subpackages)],
    package_dir={f"universality.{r}": r for r in ROOTS},
)
