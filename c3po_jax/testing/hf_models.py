"""Helpers that build tiny random transformers OLMoE models for tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models import families, hf_mapping
from models.config import MoeConfig
from models.families.olmoe import TINY

# The HF config of our TINY preset (same sizes on both sides of the parity tests).
TINY_HF_KWARGS = {
  k: v for k, v in families.to_hf_config(TINY).items() if k not in ('architectures', 'model_type')
}


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


def params_from_torch(model) -> tuple[MoeConfig, dict]:
  """Converts an in-memory torch model with our name table (no files)."""
  config = families.from_hf_config(model.config.to_dict())
  assembler = hf_mapping.ParamAssembler(config, np.float32)
  for name, tensor in model.state_dict().items():
    if config.tie_word_embeddings and name == 'lm_head.weight':
      continue
    assembler.add(name, tensor.detach().numpy())
  params = assembler.finish()
  import jax

  return config, jax.tree.map(jnp.asarray, params)


def save_hf_model(model, directory: str, max_shard_size: str = '20KB') -> str:
  """`save_pretrained` in small shards, so the index path is exercised."""
  model.save_pretrained(directory, max_shard_size=max_shard_size)
  return directory


def padded_batch(
  seed: int, vocab_size: int, lengths: list[int], t: int, pad_id: int, left: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Random tokens [B, T] int32 and mask [B, T], right- or left-padded."""
  rng = np.random.default_rng(seed)
  tokens = np.full((len(lengths), t), pad_id, np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for row, n in enumerate(lengths):
    span = slice(t - n, t) if left else slice(0, n)
    tokens[row, span] = rng.integers(3, vocab_size, n)
    mask[row, span] = 1
  return tokens, mask


def hf_reference(model, tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """transformers' logits [B, T, V] and router probabilities [L, B, T, E].

  Positions come from the mask (clamp(cumsum(mask) - 1, 0)), as our model
  computes them, so padded rows match unpadded ones.
  """
  import torch

  ids = torch.from_numpy(tokens).long()
  attn = torch.from_numpy(mask).long()
  positions = (attn.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = model(
      input_ids=ids, attention_mask=attn, position_ids=positions, output_router_logits=True
    )
  b, t = tokens.shape
  probs = torch.stack([torch.softmax(r.float(), -1).reshape(b, t, -1) for r in out.router_logits])
  return out.logits.float().numpy(), probs.numpy()


def hf_tensor_shapes(config: MoeConfig, on_disk: bool = True) -> dict[str, tuple[int, ...]]:
  """HF tensor names and shapes for a config, from a meta-device model (no memory).

  on_disk: the per-expert layout `save_pretrained` writes (and the Hub
  checkpoints hold); else transformers' in-memory fused-expert state dict.
  """
  import torch
  from transformers import OlmoeConfig as HFOlmoeConfig
  from transformers import OlmoeForCausalLM
  from transformers.core_model_loading import revert_weight_conversion

  with torch.device('meta'):
    model = OlmoeForCausalLM(HFOlmoeConfig(**families.to_hf_config(config)))
  state = model.state_dict()
  if on_disk:
    state = revert_weight_conversion(model, state)
  if config.tie_word_embeddings:
    state.pop('lm_head.weight', None)
  return {name: tuple(t.shape) for name, t in state.items()}
