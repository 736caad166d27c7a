"""OLMoE (allenai/OLMoE-1B-7B-0924, -0125): the family this library started with.

Differences from the common model: queries and keys RMS-normed over all
heads at once (`qk_norm='full'`), optional clipping of q/k/v (`clip_qkv`),
softmax then top-8 of 64 experts *without* renormalizing the top-k weights,
every layer MoE, no shared experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common

MODEL_TYPE = 'olmoe'


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  common.check_silu(hf)
  if hf.get('attention_bias', False):
    raise ConfigError('attention_bias=True is not supported by OLMoE')
  return common.build(
    'OLMoE',
    lambda: MoeConfig(
      **common.common_fields(hf, rope_default=10000.0, eps_default=1e-5),
      intermediate_size=hf['intermediate_size'],
      num_experts=hf['num_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
      clip_qkv=hf.get('clip_qkv'),
      qk_norm='full',
      model_type=MODEL_TYPE,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  return {
    'architectures': ['OlmoeForCausalLM'],
    'model_type': MODEL_TYPE,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'num_experts': c.num_experts,
    'norm_topk_prob': c.norm_topk_prob,
    'clip_qkv': c.clip_qkv,
    'attention_bias': False,
  }


RULES = common.BASE_RULES + common.QK_NORM_RULES + common.expert_rules()

# allenai/OLMoE-1B-7B-0924: 6.9B parameters, 1.3B active. OLMoE-1B-7B-0125(-Instruct)
# has the same architecture (a later data mix): one config for both.
OLMOE_1B_7B_0924 = MoeConfig()

# A tiny configuration for unit tests (GQA, 8 experts, top-2).
TINY = MoeConfig(
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
)

# The OLMoE-proportioned random config used by the speed benchmarks.
BENCH = MoeConfig(
  vocab_size=50304,
  hidden_size=256,
  intermediate_size=128,
  num_hidden_layers=16,
  num_attention_heads=4,
  num_key_value_heads=4,
  num_experts=64,
  num_experts_per_tok=8,
  max_position_embeddings=512,
)

PRESETS = {
  'olmoe-1b-7b-0924': OLMOE_1B_7B_0924,
  'olmoe-1b-7b-0125-instruct': OLMOE_1B_7B_0924,
  'tiny': TINY,
  'bench': BENCH,
}

FAMILY = common.Family((MODEL_TYPE,), from_hf_config, to_hf_config, RULES, PRESETS)
