"""A tiny random OLMoE checkpoint that works with the real OLMoE tokenizer."""

from __future__ import annotations

import jax
import numpy as np

from c3po_jax.ckpts.checkpoint import save_checkpoint
from models import transformer
from models.config import MoeConfig

# vocab_size covers the OLMoE tokenizer (ids up to 50279); everything else tiny.
TINY_TOKENIZER_CONFIG = MoeConfig(
  vocab_size=50304,
  hidden_size=32,
  intermediate_size=16,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts=8,
  num_experts_per_tok=2,
  max_position_embeddings=2048,
)


def tiny_params(config: MoeConfig = TINY_TOKENIZER_CONFIG, seed: int = 0):
  return transformer.init_params(config, jax.random.PRNGKey(seed))


def loud_experts(params: dict, factor: float = 10.0) -> dict:
  """params with every routed expert's weights scaled, so that routing moves logits.

  At init scale (std 0.02) the experts add little to the residual stream and
  a pathway barely changes the output; tests of re-mixing scale them up.
  """
  out = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
  for name, layer in out.items():
    if name.startswith('layer_') and 'moe' in layer:
      experts = layer['moe']['experts']
      for key in ('gate', 'up', 'down'):
        experts[key] = experts[key] * factor
  return out


def make_checkpoint(path: str, config: MoeConfig = TINY_TOKENIZER_CONFIG, seed: int = 0) -> str:
  params = jax.tree.map(np.asarray, tiny_params(config, seed))
  return save_checkpoint(str(path), config, params, overwrite=True)
