"""Shared test fixtures: JAX on CPU in float32, tiny random HF OLMoE models."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

# Parity against PyTorch float32 needs full-precision matmuls.
jax.config.update('jax_default_matmul_precision', 'highest')
