"""FlexOlmo (allenai/FlexOlmo-7x7B-1T and its -RT router-trained variant).

AI2's MoE whose experts were trained independently on separate data and
joined afterwards; the blocks are OLMoE's routing on OLMo-2's layer.
Differences from the common model: OLMo-2's norm order (`post_norm`): no
input norms, RMSNorm on the attention output (`post_attention_layernorm`) and
on the feed-forward output (`post_feedforward_layernorm`) before each is
added to the residual stream, and the router reads the un-normed stream;
queries and keys RMS-normed over all heads at once (`qk_norm='full'`); OLMoE's
router: softmax over the experts, top-k, not renormalized (`norm_topk_prob`
false in the published configs); every layer MoE, no shared experts. A
pathway means what it means for OLMoE (it replaces the softmax row).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common

MODEL_TYPE = 'flex_olmo'


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  common.check_silu(hf)
  if hf.get('attention_bias', False):
    raise ConfigError('attention_bias=True is not supported for FlexOlmo')
  return common.build(
    'FlexOlmo',
    lambda: MoeConfig(
      **common.common_fields(hf, rope_default=500000.0, eps_default=1e-6),
      intermediate_size=hf['intermediate_size'],
      # transformers 5 writes the expert count under its attribute_map alias too.
      num_experts=hf['num_experts'] if 'num_experts' in hf else hf['num_local_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
      qk_norm='full',
      post_norm=True,
      model_type=MODEL_TYPE,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  return {
    'architectures': ['FlexOlmoForCausalLM'],
    'model_type': MODEL_TYPE,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'num_experts': c.num_experts,
    'norm_topk_prob': c.norm_topk_prob,
    'attention_bias': False,
  }


RULES = (
  common.BASE_RULES
  + common.QK_NORM_RULES
  + common.expert_rules()
  + [
    (
      common.LAYER + r'post_feedforward_layernorm\.weight',
      lambda i: common.Target((f'layer_{i}', 'post_ffn_norm', 'scale'), common.same),
    )
  ]
)

# allenai/FlexOlmo-7x7B-1T: 33B parameters; seven experts (public mix, math,
# news, academic, code, creative writing, Reddit), each an OLMo-2 7B MLP.
# The values are transformers' FlexOlmoConfig defaults, documented as this
# checkpoint's; -RT (router trained) has the same architecture.
FLEXOLMO_7X7B_1T = MoeConfig(
  vocab_size=100352,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=32,
  num_experts=7,
  num_experts_per_tok=5,
  norm_topk_prob=False,
  max_position_embeddings=4096,
  rope_theta=500000.0,
  rms_norm_eps=1e-6,
  pad_token_id=100277,
  bos_token_id=None,
  eos_token_id=100257,
  qk_norm='full',
  post_norm=True,
  model_type=MODEL_TYPE,
)

PRESETS = {'flexolmo-7x7b-1t': FLEXOLMO_7X7B_1T, 'flexolmo-7x7b-1t-rt': FLEXOLMO_7X7B_1T}

FAMILY = common.Family((MODEL_TYPE,), from_hf_config, to_hf_config, RULES, PRESETS)
