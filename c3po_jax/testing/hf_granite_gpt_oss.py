"""Tiny transformers references for Granite MoE (plain and shared) and gpt-oss; MXFP4 packing.

As `c3po_jax.testing.hf_families`: each `save_tiny_<family>(out_dir, seed=0,
**overrides)` builds a small random model (weights ~N(0, 0.2), norm scales
~1 + N(0, 0.2)), saves it in >= 2 safetensors shards and returns (torch
model in eval mode, float32; the config dict written). The tiny configs turn
on everything the family can do: Granite's four multipliers far from 1
(plain: tied head, no biases, as published; shared: attention biases and an
untied head); gpt-oss with a 3-slot window on the even layers, YaRN over a
short original context, and a swiglu_limit low enough that the clamp bites.

On disk (what 5.24's `save_pretrained` writes; D hidden, E experts, F expert
width, Fs shared width, H heads): Granite `block_sparse_moe.router.layer.weight`
[E, D], `block_sparse_moe.input_linear.weight` [E, 2F, D] (gate rows then up
rows), `block_sparse_moe.output_linear.weight` [E, D, F],
`shared_mlp.input_linear.weight` [2Fs, D], `shared_mlp.output_linear.weight`
[D, Fs]; gpt-oss `self_attn.sinks` [H], q/k/v/o biases, `mlp.router.weight`
[E, D] and `.bias` [E], `mlp.experts.gate_up_proj` [E, D, 2F] (gate and up
columns interleaved), `gate_up_proj_bias` [E, 2F], `down_proj` [E, F, D],
`down_proj_bias` [E, D].

`quantize_mxfp4` packs float weights the way the published gpt-oss
checkpoints store them (transformers' `integrations/mxfp4.py` reads them):
for a weight W [E, In, Out] (our and the unquantized HF layout), blocks
[E, Out, In/32, 16] uint8 hold 32 FP4 (e2m1) codes per group, two per byte,
the even element in the low nibble; scales [E, Out, In/32] uint8 hold each
group's power-of-two exponent + 127.
"""

from __future__ import annotations

import json
import os

import numpy as np

from c3po_jax.testing.hf_families import _finish_real
from c3po_jax.testing.hf_family_configs import DEFAULT_SHARD_SIZE, TINY_COMMON

TINY_GRANITE_MOE = dict(
  TINY_COMMON,
  intermediate_size=16,
  num_local_experts=8,
  embedding_multiplier=4.0,
  attention_multiplier=0.3,
  residual_multiplier=0.5,
  logits_scaling=3.0,
  tie_word_embeddings=True,
)

TINY_GRANITE_MOE_SHARED = dict(
  TINY_GRANITE_MOE, shared_intermediate_size=24, attention_bias=True, tie_word_embeddings=False
)

TINY_GPT_OSS = dict(
  TINY_COMMON,
  head_dim=16,  # != hidden / heads = 8
  intermediate_size=16,
  num_local_experts=8,
  sliding_window=3,
  swiglu_limit=1.0,
  tie_word_embeddings=False,
  rope_parameters=dict(
    rope_type='yarn',
    rope_theta=150000.0,
    factor=4.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=32,
  ),
)

FULL_SIZE_HF_CONFIGS = {
  # Published config.json values (the fields that matter), from memory of
  # the hub files; `# unsure` marks values not confirmed by a second source.
  'ibm-granite/granite-3.0-3b-a800m-base': dict(
    architectures=['GraniteMoeForCausalLM'],
    model_type='granitemoe',
    vocab_size=49155,
    hidden_size=1536,
    intermediate_size=512,
    num_hidden_layers=32,
    num_attention_heads=24,
    num_key_value_heads=8,
    num_local_experts=40,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    attention_bias=False,
    embedding_multiplier=12.0,
    attention_multiplier=0.015625,
    residual_multiplier=0.22,
    logits_scaling=6.0,
    tie_word_embeddings=True,
    hidden_act='silu',
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
  ),
  'openai/gpt-oss-20b': dict(
    architectures=['GptOssForCausalLM'],
    model_type='gpt_oss',
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=24,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=131072,
    rope_theta=150000,
    rope_scaling=dict(
      beta_fast=32.0,
      beta_slow=1.0,
      factor=32.0,
      original_max_position_embeddings=4096,
      rope_type='yarn',
      truncate=False,
    ),
    rms_norm_eps=1e-5,
    sliding_window=128,
    layer_types=['sliding_attention', 'full_attention'] * 12,
    attention_bias=True,
    swiglu_limit=7.0,
    tie_word_embeddings=False,
    hidden_act='silu',
    pad_token_id=199999,
    eos_token_id=200002,
    quantization_config=dict(
      quant_method='mxfp4',
      modules_to_not_convert=[
        'model.layers.*.self_attn',
        'model.layers.*.mlp.router',
        'model.embed_tokens',
        'lm_head',
      ],
    ),
  ),
}


def _build(config_cls: str, model_cls: str, base: dict):
  def save(out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**base, **overrides})
    return _finish_real(getattr(transformers, model_cls)(config), out_dir, seed, max_shard_size)

  save.__doc__ = f'A random `{model_cls}` (tiny), saved sharded: (model, config dict).'
  return save


save_tiny_granitemoe = _build('GraniteMoeConfig', 'GraniteMoeForCausalLM', TINY_GRANITE_MOE)
save_tiny_granitemoeshared = _build(
  'GraniteMoeSharedConfig', 'GraniteMoeSharedForCausalLM', TINY_GRANITE_MOE_SHARED
)
save_tiny_gpt_oss = _build('GptOssConfig', 'GptOssForCausalLM', TINY_GPT_OSS)

# e2m1 code -> value (transformers' FP4_VALUES): codes 8..15 are the negatives.
FP4_VALUES = np.array(
  [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32
)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """w [E, In, Out] float -> (blocks [E, Out, In/32, 16] uint8, scales [E, Out, In/32] uint8).

  Each group of 32 inputs shares the exponent that maps its largest |w| to
  at most 6 (the largest e2m1 value); each element takes the nearest code.
  """
  e, n_in, n_out = w.shape
  g = np.swapaxes(np.asarray(w, np.float32), 1, 2).reshape(e, n_out, n_in // 32, 32)
  peak = np.maximum(np.abs(g).max(-1), 1e-30)  # [E, Out, G]
  exp = np.clip(np.ceil(np.log2(peak / 6.0)), -127, 127).astype(np.int32)
  scaled = g / np.exp2(exp)[..., None]
  codes = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)  # [E, Out, G, 32]
  blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return blocks.astype(np.uint8), (exp + 127).astype(np.uint8)


def mxfp4_snapshot(hf_dir: str) -> dict[str, np.ndarray]:
  """Rewrites a saved (unquantized) gpt-oss snapshot's expert weights as MXFP4, in place.

  Every `mlp.experts.{gate_up,down}_proj` becomes `*_blocks` + `*_scales` in
  the same shard, and config.json gains the published quantization_config.
  Returns the float weights the packed ones dequantize to, by original name.
  """
  from safetensors.numpy import load_file, save_file

  with open(os.path.join(hf_dir, 'model.safetensors.index.json')) as f:
    index = json.load(f)
  expected = {}
  for shard in sorted(set(index['weight_map'].values())):
    path = os.path.join(hf_dir, shard)
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(('experts.gate_up_proj', 'experts.down_proj'))]:
      blocks, scales = quantize_mxfp4(tensors.pop(name))
      tensors[name + '_blocks'], tensors[name + '_scales'] = blocks, scales
      expected[name] = dequantize_reference(blocks, scales)
      del index['weight_map'][name]
      index['weight_map'][name + '_blocks'] = index['weight_map'][name + '_scales'] = shard
    save_file(tensors, path, metadata={'format': 'pt'})
  with open(os.path.join(hf_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump(index, f)
  with open(os.path.join(hf_dir, 'config.json')) as f:
    config = json.load(f)
  config['quantization_config'] = FULL_SIZE_HF_CONFIGS['openai/gpt-oss-20b']['quantization_config']
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(config, f)
  return expected


def dequantize_reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """transformers' own dequantization (`convert_moe_packed_tensors`), float32 [E, In, Out]."""
  import torch
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors

  out = convert_moe_packed_tensors(
    torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
  )
  return out.numpy()
