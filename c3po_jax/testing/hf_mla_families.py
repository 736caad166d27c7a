"""Tiny transformers references of DeepSeek-V2, DeepSeek-V3 and FlexOlmo.

As `c3po_jax.testing.hf_families` (same random init, sharded safetensors,
eager kernels): `save_tiny_<family>(out_dir, seed=0, **overrides)` returns
`(torch model, config dict)`. The tiny configs switch on what the published
ones use, so the parity tests see it: YaRN RoPE (with a cos/sin attention
factor != 1 for V2), group-limited selection, routed scaling, V3's
correction bias (drawn at random here: transformers initializes it to zero,
which would hide a bias applied to the weights instead of the selection).

On-disk names (5.24 `save_pretrained`), per layer i, besides the LLaMA norms,
o_proj and the DeepSeekMoE-style experts / shared_experts / dense mlp:
`self_attn.q_proj.weight` [H*Dqk, D] (q_lora_rank None) or
`self_attn.q_a_proj.weight` [Rq, D], `q_a_layernorm.weight` [Rq],
`q_b_proj.weight` [H*Dqk, Rq]; `self_attn.kv_a_proj_with_mqa.weight` [Rkv +
Dr, D], `kv_a_layernorm.weight` [Rkv], `kv_b_proj.weight` [H*(Dn + Dv), Rkv];
V3: `mlp.gate.e_score_correction_bias` [E]. FlexOlmo: OLMoE's names with
`post_feedforward_layernorm.weight` [D] and no `input_layernorm`.

`FULL_SIZE_HF_CONFIGS`: the published config.json fields that matter, by Hub
id, to build the full-size models on the meta device.
"""

from __future__ import annotations

from c3po_jax.testing.hf_families import _finish_real
from c3po_jax.testing.hf_family_configs import DEFAULT_SHARD_SIZE, INIT_STD, TINY_COMMON

_TINY_MLA = dict(
  TINY_COMMON,
  num_key_value_heads=4,  # MLA: one key/value head per query head
  intermediate_size=48,
  moe_intermediate_size=16,
  n_routed_experts=8,
  num_experts_per_tok=3,
  first_k_dense_replace=1,
  kv_lora_rank=16,
  qk_nope_head_dim=8,
  qk_rope_head_dim=4,
  v_head_dim=6,
  n_group=4,
  topk_group=2,
)

# YaRN stretching a 32-token context by 4 (the published: 4096 by 40).
_TINY_YARN = dict(
  rope_type='yarn',
  rope_theta=10000.0,
  factor=4.0,
  original_max_position_embeddings=32,
  beta_fast=32,
  beta_slow=1,
)

TINY_DEEPSEEK_V2 = dict(
  _TINY_MLA,
  q_lora_rank=None,
  n_shared_experts=2,
  topk_method='group_limited_greedy',
  routed_scaling_factor=1.5,
  rope_parameters=dict(_TINY_YARN, mscale=1.0, mscale_all_dim=0.707),
)

TINY_DEEPSEEK_V3 = dict(
  _TINY_MLA,
  q_lora_rank=12,
  n_shared_experts=1,
  routed_scaling_factor=2.5,
  norm_topk_prob=True,
  rope_interleave=True,
  rope_parameters=dict(_TINY_YARN, mscale=1.0, mscale_all_dim=1.0),
)

TINY_FLEX_OLMO = dict(TINY_COMMON, intermediate_size=16, num_experts=8, norm_topk_prob=False)


def _build(model_cls, config_cls, tiny: dict, seed: int, overrides: dict):
  import torch

  torch.manual_seed(seed)
  return model_cls(config_cls(**{**tiny, **overrides}))


def save_tiny_deepseek_v2(
  out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides
):
  """A random `DeepseekV2ForCausalLM` (no q latent, YaRN, 2 of 4 groups), saved sharded."""
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

  model = _build(DeepseekV2ForCausalLM, DeepseekV2Config, TINY_DEEPSEEK_V2, seed, overrides)
  return _finish_real(model, out_dir, seed, max_shard_size)


def save_tiny_deepseek_v3(
  out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides
):
  """A random `DeepseekV3ForCausalLM` (q latent, sigmoid + random correction bias), saved sharded."""
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  model = _build(DeepseekV3ForCausalLM, DeepseekV3Config, TINY_DEEPSEEK_V3, seed, overrides)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for layer in model.model.layers:
      gate = getattr(layer.mlp, 'gate', None)
      if gate is not None:
        bias = gate.e_score_correction_bias
        bias.copy_(INIT_STD * torch.randn(bias.shape, generator=gen))
  return _finish_real(model, out_dir, seed, max_shard_size)


def save_tiny_flex_olmo(
  out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides
):
  """A random `FlexOlmoForCausalLM` (OLMo-2 norm order, OLMoE routing), saved sharded."""
  from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

  model = _build(FlexOlmoForCausalLM, FlexOlmoConfig, TINY_FLEX_OLMO, seed, overrides)
  return _finish_real(model, out_dir, seed, max_shard_size)


BUILDERS = {
  'deepseek_v2': save_tiny_deepseek_v2,
  'deepseek_v3': save_tiny_deepseek_v3,
  'flex_olmo': save_tiny_flex_olmo,
}

_YARN_40 = dict(
  type='yarn',
  factor=40,
  original_max_position_embeddings=4096,
  beta_fast=32,
  beta_slow=1,
)

# Published config.json values (the fields that matter), by Hub id; from
# memory of the Hub files. Parameter counts they give (our eval_shape, equal
# to the HF model's tensors on the meta device): 15,706,484,224 (V2-Lite,
# "16B"), 671,026,419,200 (V3 without its MTP layer), 33,270,665,216 (FlexOlmo).
FULL_SIZE_HF_CONFIGS = {
  'deepseek-ai/DeepSeek-V2-Lite': dict(
    architectures=['DeepseekV2ForCausalLM'],
    model_type='deepseek_v2',
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    topk_method='greedy',
    n_group=1,
    topk_group=1,
    routed_scaling_factor=1.0,
    scoring_func='softmax',
    norm_topk_prob=False,
    aux_loss_alpha=0.001,
    seq_aux=True,
    max_position_embeddings=163840,
    rope_theta=10000,
    rope_scaling=dict(_YARN_40, mscale=0.707, mscale_all_dim=0.707),
    rms_norm_eps=1e-6,
    attention_bias=False,
    tie_word_embeddings=False,
    bos_token_id=100000,
    eos_token_id=100001,
    hidden_act='silu',
  ),
  'allenai/FlexOlmo-7x7B-1T': dict(
    architectures=['FlexOlmoForCausalLM'],
    model_type='flex_olmo',
    vocab_size=100352,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_experts=7,
    num_experts_per_tok=5,  # unsure: transformers' default, documented as this checkpoint's
    norm_topk_prob=False,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    attention_bias=False,
    tie_word_embeddings=False,
    pad_token_id=100277,
    bos_token_id=None,
    eos_token_id=100257,
    hidden_act='silu',
  ),
}
FULL_SIZE_HF_CONFIGS['deepseek-ai/DeepSeek-V3'] = dict(
  FULL_SIZE_HF_CONFIGS['deepseek-ai/DeepSeek-V2-Lite'],
  architectures=['DeepseekV3ForCausalLM'],
  model_type='deepseek_v3',
  vocab_size=129280,
  hidden_size=7168,
  intermediate_size=18432,
  moe_intermediate_size=2048,
  num_hidden_layers=61,
  num_attention_heads=128,
  num_key_value_heads=128,
  n_shared_experts=1,
  n_routed_experts=256,
  num_experts_per_tok=8,
  routed_scaling_factor=2.5,
  q_lora_rank=1536,
  topk_method='noaux_tc',
  scoring_func='sigmoid',
  n_group=8,
  topk_group=4,
  first_k_dense_replace=3,
  norm_topk_prob=True,
  num_nextn_predict_layers=1,
  rope_scaling=dict(_YARN_40, mscale=1.0, mscale_all_dim=1.0),
  bos_token_id=0,
  eos_token_id=1,
)
