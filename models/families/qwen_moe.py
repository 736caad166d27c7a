"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B).

Differences from the common model:

* both: no clipping; dense SwiGLU layers of `intermediate_size` where a layer
  is in `mlp_only_layers` or off the `decoder_sparse_step` grid; routed
  experts of `moe_intermediate_size`; softmax then top-k, renormalized only
  with `norm_topk_prob`;
* Qwen2-MoE: biases on the q, k, v projections; no q/k norm; one shared
  expert of `shared_expert_intermediate_size` on every token, scaled by
  sigmoid(x @ shared_expert_gate), added to the routed output;
* sliding window (`use_sliding_window`): Qwen3-MoE on every layer,
  Qwen2-MoE on the layers `layer_types` names (transformers' default: even
  layers below `max_window_layers`);
* Qwen3-MoE: per-head RMSNorm of queries and keys (`qk_norm='head'`), an
  explicit `head_dim` (not hidden / heads), top-k renormalized, no shared
  expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common

QWEN2_MOE = 'qwen2_moe'
QWEN3_MOE = 'qwen3_moe'


def _qwen_fields(hf: Mapping[str, Any]) -> dict:
  common.check_silu(hf)
  return dict(
    **common.common_fields(hf, rope_default=1e6, eps_default=1e-6),
    intermediate_size=hf['intermediate_size'],
    moe_intermediate_size=hf['moe_intermediate_size'],
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
    num_experts=hf['num_experts'] if 'num_experts' in hf else hf['num_local_experts'],
    num_experts_per_tok=hf['num_experts_per_tok'],
    norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
    dense_layers=common.sparse_step_dense_layers(hf),
  )


def _qwen2_sliding_layers(hf: Mapping[str, Any]) -> tuple[int, ...]:
  """Qwen2-MoE's windowed layers without `layer_types`: transformers' rule (even i < max_window_layers)."""
  n = hf['num_hidden_layers']
  return tuple(i for i in range(n) if (i + 1) % 2 and i < hf.get('max_window_layers', n))


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  if hf.get('model_type') == QWEN3_MOE:
    if hf.get('attention_bias', False):
      raise ConfigError('attention_bias=True is not supported for Qwen3-MoE')
    return common.build(
      'Qwen3-MoE',
      lambda: MoeConfig(
        **_qwen_fields(hf),
        head_dim_override=hf.get('head_dim'),
        qk_norm='head',
        # transformers' Qwen3-MoE windows every layer (it does not read layer_types).
        **common.sliding_fields(hf, use_layer_types=False),
        model_type=QWEN3_MOE,
      ),
    )
  shared = hf.get('shared_expert_intermediate_size') or 0
  return common.build(
    'Qwen2-MoE',
    lambda: MoeConfig(
      **_qwen_fields(hf),
      qk_norm=None,
      qkv_bias=bool(hf.get('qkv_bias', True)),
      num_shared_experts=1 if shared else 0,
      shared_intermediate_size=shared,
      shared_expert_gate=bool(shared),
      **common.sliding_fields(hf, _qwen2_sliding_layers(hf)),
      model_type=QWEN2_MOE,
    ),
  )


def _sparse_layout(c: MoeConfig) -> dict:
  return {
    'decoder_sparse_step': 1,
    'mlp_only_layers': list(c.dense_layers),
  }


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  out = {
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'moe_intermediate_size': c.expert_intermediate_size,
    'num_experts': c.num_experts,
    'norm_topk_prob': c.norm_topk_prob,
    'use_sliding_window': bool(c.sliding_layers),
    'sliding_window': c.sliding_window,
    **_sparse_layout(c),
  }
  if c.model_type == QWEN3_MOE:
    return {
      'architectures': ['Qwen3MoeForCausalLM'],
      'model_type': QWEN3_MOE,
      **out,
      'head_dim': c.head_dim,
      'attention_bias': False,
    }
  return {
    'architectures': ['Qwen2MoeForCausalLM'],
    'model_type': QWEN2_MOE,
    **out,
    'shared_expert_intermediate_size': c.shared_intermediate_size,
    'layer_types': common.layer_types(c),
    'qkv_bias': c.qkv_bias,
  }


RULES = (
  common.BASE_RULES
  + common.QK_NORM_RULES
  + common.QKV_BIAS_RULES
  + common.expert_rules()
  + common.mlp_rules(r'mlp\.shared_expert', ('moe', 'shared'))
  + [
    (
      common.LAYER + r'mlp\.shared_expert_gate\.weight',
      lambda i: common.Target((f'layer_{i}', 'moe', 'shared_gate'), common.t),
    )
  ]
  + common.mlp_rules(r'mlp', ('mlp',))
)

# Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active.
QWEN3_30B_A3B = MoeConfig(
  vocab_size=151936,
  hidden_size=2048,
  intermediate_size=6144,
  moe_intermediate_size=768,
  num_hidden_layers=48,
  num_attention_heads=32,
  num_key_value_heads=4,
  head_dim_override=128,
  num_experts=128,
  num_experts_per_tok=8,
  norm_topk_prob=True,
  max_position_embeddings=40960,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  pad_token_id=None,
  bos_token_id=151643,
  eos_token_id=151645,
  qk_norm='head',
  model_type=QWEN3_MOE,
)

# Qwen/Qwen1.5-MoE-A2.7B (Qwen2-MoE): 14.3B parameters, 2.7B active.
QWEN1_5_MOE_A2_7B = MoeConfig(
  vocab_size=151936,
  hidden_size=2048,
  intermediate_size=5632,
  moe_intermediate_size=1408,
  num_hidden_layers=24,
  num_attention_heads=16,
  num_key_value_heads=16,
  num_experts=60,
  num_experts_per_tok=4,
  norm_topk_prob=False,
  max_position_embeddings=8192,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  pad_token_id=None,
  bos_token_id=151643,
  eos_token_id=151643,
  qk_norm=None,
  qkv_bias=True,
  num_shared_experts=1,
  shared_intermediate_size=5632,
  shared_expert_gate=True,
  model_type=QWEN2_MOE,
)

PRESETS = {'qwen3-30b-a3b': QWEN3_30B_A3B, 'qwen1.5-moe-a2.7b': QWEN1_5_MOE_A2_7B}

FAMILY = common.Family((QWEN2_MOE, QWEN3_MOE), from_hf_config, to_hf_config, RULES, PRESETS)
