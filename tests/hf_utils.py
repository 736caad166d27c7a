"""Helpers that build tiny random transformers OLMoE models for tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from c3po_jax import param_mapping
from models.olmoe import transformer
from models.olmoe.config import OlmoeConfig

TINY_HF_KWARGS = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=16,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts=8,
  num_experts_per_tok=2,
  max_position_embeddings=128,
  pad_token_id=1,
  eos_token_id=2,
  bos_token_id=None,
)


def make_hf_model(seed: int = 0, **overrides):
  """A random `OlmoeForCausalLM` (eval mode, float32) and its HF config."""
  import torch
  from transformers import OlmoeConfig as HFOlmoeConfig
  from transformers import OlmoeForCausalLM

  torch.manual_seed(seed)
  hf_config = HFOlmoeConfig(**{**TINY_HF_KWARGS, **overrides})
  model = OlmoeForCausalLM(hf_config).eval()
  # Norm scales are ones at init; randomize them so parity covers them too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  return model, hf_config


def params_from_torch(model) -> tuple[OlmoeConfig, dict]:
  """Converts an in-memory torch model with our name table (no files)."""
  config = OlmoeConfig.from_hf_config(model.config.to_dict())
  assembler = param_mapping.ParamAssembler(transformer.param_shapes(config), np.float32)
  for name, tensor in model.state_dict().items():
    if config.tie_word_embeddings and name == 'lm_head.weight':
      continue
    assembler.add(name, tensor.detach().numpy())
  params = assembler.finish()
  import jax

  return config, jax.tree.map(jnp.asarray, params)
