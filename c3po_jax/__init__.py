"""c3po-jax: C3PO test-time expert re-mixing for Mixture-of-Experts LLMs.

config, params = c3po_jax.load_checkpoint(path)
out = c3po_jax.forward(params, tokens, config=config, pathway={15: w})
"""

from c3po_jax.checkpoint import load_checkpoint, save_checkpoint
from models.olmoe.config import PRESETS, ConfigError, OlmoeConfig
from models.olmoe.decode import generate, prefill
from models.olmoe.transformer import ForwardOutput, forward, forward_hidden, init_params
