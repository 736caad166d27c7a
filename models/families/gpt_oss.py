"""gpt-oss (openai/gpt-oss-20b, gpt-oss-120b).

Differences from the common model:

* attention: biases on q, k, v and o; a learned sink logit per head in every
  softmax (`attention_sinks`); sliding-window attention (128 slots) on the
  layers `layer_types` names (the published: every even layer), full on the
  others; YaRN RoPE (`rope_scaling`, factor 32 over 4096 positions);
* router: logits x @ W + b (`router_bias`), top-k of the logits and a softmax
  over those k, which is softmax over all experts, top-k, renormalized
  (`norm_topk_prob=True`, as Mixtral's): the router probabilities are
  softmax(x @ W + b), the bias part of the logits;
* experts: gate/up/down with biases (`expert_bias`) and the clamped gate
  (`swiglu_limit`, `swiglu_alpha`; `models.glu`); every layer MoE; untied head;
* tensors: experts stored [E, in, out] (not transposed like nn.Linear), the
  fused `gate_up_proj` [E, D, 2F] *interleaving* gate and up columns (gate
  even, up odd), `gate_up_proj_bias` [E, 2F] likewise; the published weights
  are MXFP4 (`*_blocks` + `*_scales`), dequantized by the converter
  (`c3po_jax.ckpts.mxfp4`) into these names first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import ConfigError, MoeConfig
from models.families import common

MODEL_TYPE = 'gpt_oss'
# What the converter reads (dequantizes); anything else is refused.
QUANT_METHODS = (None, 'mxfp4')


def _rope_scaling(hf: Mapping[str, Any]) -> dict:
  """HF rope_parameters / rope_scaling minus rope_theta ({} for plain RoPE)."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  params.pop('rope_theta', None)
  if params.get('rope_type', params.pop('type', 'default')) in (None, 'default'):
    return {}
  return params


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  quant = (hf.get('quantization_config') or {}).get('quant_method')
  if quant not in QUANT_METHODS:
    raise ConfigError(f'gpt-oss quantization {quant!r} is not supported (mxfp4 or none)')
  n = hf['num_hidden_layers']
  # transformers' default layer_types: sliding on even layers.
  default_sliding = tuple(i for i in range(n) if (i + 1) % 2)
  scaling = _rope_scaling(hf)
  theta = (hf.get('rope_parameters') or {}).get('rope_theta', hf.get('rope_theta', 150000.0))
  plain = {**hf, 'rope_theta': theta, 'rope_parameters': None, 'rope_scaling': None}
  fields = common.common_fields(plain, rope_default=150000.0, eps_default=1e-5)
  bias = bool(hf.get('attention_bias', True))
  return common.build(
    'gpt-oss',
    lambda: MoeConfig(
      **fields,
      intermediate_size=hf['intermediate_size'],
      num_experts=hf['num_local_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=True,
      head_dim_override=hf.get('head_dim'),
      qk_norm=None,
      qkv_bias=bias,
      o_bias=bias,
      attention_sinks=True,
      **common.sliding_fields(hf, default_sliding),
      rope_scaling=tuple(scaling.items()),
      router_bias=True,
      expert_bias=True,
      swiglu_limit=float(hf.get('swiglu_limit', 7.0)),
      swiglu_alpha=float(hf.get('swiglu_alpha', 1.702)),
      model_type=MODEL_TYPE,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  out = {
    'architectures': ['GptOssForCausalLM'],
    'model_type': MODEL_TYPE,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'num_local_experts': c.num_experts,
    'head_dim': c.head_dim,
    'attention_bias': c.qkv_bias,
    'sliding_window': c.sliding_window,
    'layer_types': common.layer_types(c),
    'swiglu_limit': c.swiglu_limit,
    'swiglu_alpha': c.swiglu_alpha,
  }
  del out['rope_theta']
  scaling = dict(c.rope_scaling) or {'rope_type': 'default'}
  out['rope_parameters'] = {'rope_theta': c.rope_theta, **scaling}
  return out


def _interleaved(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """gate_up [E, D, 2F] or its bias [E, 2F]: gate the even columns, up the odd ones."""
  return np.ascontiguousarray(x[..., 0::2]), np.ascontiguousarray(x[..., 1::2])


def _layer(i) -> str:
  return f'layer_{i}'


def _experts(i, *names) -> tuple[tuple[str, ...], ...]:
  return tuple((_layer(i), 'moe', 'experts', n) for n in names)


RULES = (
  common.BASE_RULES
  + common.QKV_BIAS_RULES
  + [
    (
      common.LAYER + r'self_attn\.o_proj\.bias',
      lambda i: common.Target((_layer(i), 'attn', 'o_bias'), common.same),
    ),
    (
      common.LAYER + r'self_attn\.sinks',
      lambda i: common.Target((_layer(i), 'attn', 'sinks'), common.same),
    ),
    (
      common.LAYER + r'mlp\.router\.weight',
      lambda i: common.Target((_layer(i), 'moe', 'router', 'kernel'), common.t),
    ),
    (
      common.LAYER + r'mlp\.router\.bias',
      lambda i: common.Target((_layer(i), 'moe', 'router', 'logit_bias'), common.same),
    ),
    (
      common.LAYER + r'mlp\.experts\.gate_up_proj',
      lambda i: common.Target(
        _experts(i, 'gate')[0], _interleaved, split=_experts(i, 'gate', 'up')
      ),
    ),
    (
      common.LAYER + r'mlp\.experts\.gate_up_proj_bias',
      lambda i: common.Target(
        _experts(i, 'gate_bias')[0], _interleaved, split=_experts(i, 'gate_bias', 'up_bias')
      ),
    ),
    (
      common.LAYER + r'mlp\.experts\.down_proj',
      lambda i: common.Target(_experts(i, 'down')[0], common.same),
    ),
    (
      common.LAYER + r'mlp\.experts\.down_proj_bias',
      lambda i: common.Target(_experts(i, 'down_bias')[0], common.same),
    ),
  ]
)

# openai/gpt-oss-20b: 20.9B parameters, 3.6B active.
GPT_OSS_20B = MoeConfig(
  vocab_size=201088,
  hidden_size=2880,
  intermediate_size=2880,
  num_hidden_layers=24,
  num_attention_heads=64,
  num_key_value_heads=8,
  head_dim_override=64,
  num_experts=32,
  num_experts_per_tok=4,
  norm_topk_prob=True,
  max_position_embeddings=131072,
  rope_theta=150000.0,
  rms_norm_eps=1e-5,
  pad_token_id=199999,
  bos_token_id=None,
  eos_token_id=200002,
  qk_norm=None,
  qkv_bias=True,
  o_bias=True,
  attention_sinks=True,
  sliding_window=128,
  sliding_layers=tuple(range(0, 24, 2)),
  rope_scaling=(
    ('beta_fast', 32.0),
    ('beta_slow', 1.0),
    ('factor', 32.0),
    ('original_max_position_embeddings', 4096),
    ('rope_type', 'yarn'),
    ('truncate', False),
  ),
  router_bias=True,
  expert_bias=True,
  swiglu_limit=7.0,
  swiglu_alpha=1.702,
  model_type=MODEL_TYPE,
)

PRESETS = {'gpt-oss-20b': GPT_OSS_20B}

FAMILY = common.Family((MODEL_TYPE,), from_hf_config, to_hf_config, RULES, PRESETS)
