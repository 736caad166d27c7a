"""Mixtral (mistralai/Mixtral-8x7B-v0.1, 8x22B).

Differences from the common model: LLaMA attention (no q/k norm, no bias),
with a sliding window on every layer when `sliding_window` is set;
every layer MoE with `num_local_experts` experts and no shared expert; the
router takes the top-2 *logits* and a softmax over those two. That is exactly
softmax over all experts, top-k, then renormalizing the k weights (softmax is
monotonic, and exp(l_i) / sum_top exp(l_j) is p_i / sum_top p_j), so Mixtral
runs as `norm_topk_prob=True`, and a pathway (a distribution over experts)
means what it means for Qwen3-MoE. Hub checkpoints name the MoE block
`block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); transformers 5
writes `mlp.gate` and fused `mlp.experts` tensors. Both are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common

MODEL_TYPE = 'mixtral'
_W = {'w1': 'gate', 'w3': 'up', 'w2': 'down'}


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  common.check_silu(hf)
  if hf.get('attention_bias', False):
    raise ConfigError('attention_bias=True is not supported for Mixtral')
  return common.build(
    'Mixtral',
    lambda: MoeConfig(
      **common.common_fields(hf, rope_default=1e6, eps_default=1e-5),
      intermediate_size=hf['intermediate_size'],
      num_experts=hf['num_local_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=True,
      head_dim_override=hf.get('head_dim'),
      qk_norm=None,
      # Mixtral's sliding window, when set, is on every layer.
      **common.sliding_fields(hf, use_layer_types=False),
      model_type=MODEL_TYPE,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  return {
    'architectures': ['MixtralForCausalLM'],
    'model_type': MODEL_TYPE,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'num_local_experts': c.num_experts,
    'head_dim': c.head_dim,
    'sliding_window': c.sliding_window,
    'router_jitter_noise': 0.0,
  }


RULES = (
  common.BASE_RULES
  + common.expert_rules()
  + common.expert_rules(r'block_sparse_moe\.')[:1]
  + [
    (
      common.LAYER + r'block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight',
      lambda i, e, w: common.Target(
        (f'layer_{i}', 'moe', 'experts', _W[w]), common.t, expert=int(e)
      ),
    )
  ]
)

# mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active.
MIXTRAL_8X7B = MoeConfig(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=14336,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=8,
  num_experts=8,
  num_experts_per_tok=2,
  norm_topk_prob=True,
  max_position_embeddings=32768,
  rope_theta=1e6,
  rms_norm_eps=1e-5,
  pad_token_id=None,
  bos_token_id=1,
  eos_token_id=2,
  qk_norm=None,
  model_type=MODEL_TYPE,
)

PRESETS = {'mixtral-8x7b': MIXTRAL_8X7B}

FAMILY = common.Family((MODEL_TYPE,), from_hf_config, to_hf_config, RULES, PRESETS)
