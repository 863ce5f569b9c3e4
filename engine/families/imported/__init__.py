"""Suites of language models trained elsewhere (Hugging Face-format GPT-2 and GPT-NeoX directories).

``models``: the two architectures as pure JAX functions. ``weights``: a model directory's config and
safetensors weights, read without PyTorch.
"""
