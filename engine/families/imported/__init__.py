"""Suites of language models trained elsewhere (Hugging Face-format GPT-2 and GPT-NeoX directories).

``models``: the two architectures as pure JAX functions. ``weights``: a model directory's config and
safetensors weights, read without PyTorch. ``suite``: the import of several directories as one run
directory. ``tokens``: token corpora (ids on disk, or text and a tokenizer). ``family``: the seam
(``FAMILY``). ``analysis``: the universal-neurons pass. ``report``, ``view``: the report sections and the
notebook view.
"""

from universality.engine.families.imported.family import FAMILY

__all__ = ["FAMILY"]
