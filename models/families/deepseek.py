"""DeepSeekMoE (deepseek-ai/deepseek-moe-16b-base, -chat; `model_type` 'deepseek').

Published as remote code (`modeling_deepseek.py`); transformers has no class.
Differences from the common model: LLaMA attention (no q/k norm, no bias);
the first `first_k_dense_replace` layers (and any off the `moe_layer_freq`
grid) are dense SwiGLU MLPs of `intermediate_size`; each MoE layer has
`n_shared_experts` shared experts, run on every token as one SwiGLU MLP of
width `moe_intermediate_size * n_shared_experts` and added ungated, beside
`n_routed_experts` routed experts picked by greedy top-k of the softmax,
without renormalizing the top-k weights (`norm_topk_prob` false).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common

MODEL_TYPE = 'deepseek'


def _dense_layers(hf: Mapping[str, Any]) -> tuple[int, ...]:
  first = hf.get('first_k_dense_replace', 0)
  freq = hf.get('moe_layer_freq', 1) or 1
  return tuple(i for i in range(hf['num_hidden_layers']) if i < first or i % freq != 0)


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  common.check_silu(hf)
  if hf.get('attention_bias', False):
    raise ConfigError('attention_bias=True is not supported for DeepSeekMoE')
  if hf.get('scoring_func', 'softmax') != 'softmax':
    raise ConfigError(f'scoring_func={hf["scoring_func"]!r} is not supported (only softmax)')
  if hf.get('topk_method', 'greedy') != 'greedy':
    raise ConfigError(f'topk_method={hf["topk_method"]!r} is not supported (only greedy)')
  if hf.get('routed_scaling_factor', 1.0) != 1.0:
    raise ConfigError('routed_scaling_factor != 1 is not supported (DeepSeekMoE has none)')
  shared = hf.get('n_shared_experts') or 0
  return common.build(
    'DeepSeekMoE',
    lambda: MoeConfig(
      **common.common_fields(hf, rope_default=10000.0, eps_default=1e-6),
      intermediate_size=hf['intermediate_size'],
      moe_intermediate_size=hf['moe_intermediate_size'],
      num_experts=hf['n_routed_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
      qk_norm=None,
      dense_layers=_dense_layers(hf),
      num_shared_experts=shared,
      shared_intermediate_size=hf['moe_intermediate_size'] * shared,
      model_type=MODEL_TYPE,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  moe = c.moe_layers
  first = moe[0]
  if c.dense_layers != tuple(range(first)):
    raise ConfigError(f'DeepSeekMoE writes dense layers as a prefix; got {c.dense_layers}')
  return {
    'architectures': ['DeepseekForCausalLM'],
    'model_type': MODEL_TYPE,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'moe_intermediate_size': c.expert_intermediate_size,
    'n_routed_experts': c.num_experts,
    'n_shared_experts': c.num_shared_experts or None,
    'first_k_dense_replace': first,
    'moe_layer_freq': 1,
    'norm_topk_prob': c.norm_topk_prob,
    'scoring_func': 'softmax',
    'topk_method': 'greedy',
    'attention_bias': False,
    'auto_map': {
      'AutoConfig': 'configuration_deepseek.DeepseekConfig',
      'AutoModelForCausalLM': 'modeling_deepseek.DeepseekForCausalLM',
    },
  }


RULES = (
  common.BASE_RULES
  + common.expert_rules()
  + common.mlp_rules(r'mlp\.shared_experts', ('moe', 'shared'))
  + common.mlp_rules(r'mlp', ('mlp',))
)

# deepseek-ai/deepseek-moe-16b-base: 16.4B parameters, 2.8B active.
DEEPSEEK_MOE_16B = MoeConfig(
  vocab_size=102400,
  hidden_size=2048,
  intermediate_size=10944,
  moe_intermediate_size=1408,
  num_hidden_layers=28,
  num_attention_heads=16,
  num_key_value_heads=16,
  num_experts=64,
  num_experts_per_tok=6,
  norm_topk_prob=False,
  max_position_embeddings=4096,
  rope_theta=10000.0,
  rms_norm_eps=1e-6,
  pad_token_id=None,
  bos_token_id=100000,
  eos_token_id=100001,
  qk_norm=None,
  dense_layers=(0,),
  num_shared_experts=2,
  shared_intermediate_size=2 * 1408,
  model_type=MODEL_TYPE,
)

PRESETS = {'deepseek-moe-16b': DEEPSEEK_MOE_16B}

FAMILY = common.Family((MODEL_TYPE,), from_hf_config, to_hf_config, RULES, PRESETS)
