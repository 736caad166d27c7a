"""Granite MoE (ibm-granite/granite-3.0-1b-a400m, 3b-a800m) and Granite MoE with shared experts.

Differences from the common model:

* four scalings (`MoeConfig` fields of the same names): token embeddings x
  `embedding_multiplier`; attention scores x `attention_multiplier` (in place
  of head_dim ** -0.5); each residual branch x `residual_multiplier`; logits /
  `logits_scaling`;
* LLaMA attention (no q/k norm), biases on q, k, v and o when `attention_bias`;
* every layer MoE; the router (`router.layer`, no bias) takes the top-k
  *logits* and a softmax over those k: as for Mixtral, exactly softmax over
  all experts, top-k, renormalized (`norm_topk_prob=True`), so a pathway
  means what it means for Mixtral and Qwen3-MoE;
* experts fused on disk: `input_linear` [E, 2F, D] (gate rows, then up
  rows), `output_linear` [E, D, F];
* `granitemoeshared`: one ungated shared SwiGLU MLP of
  `shared_intermediate_size` on every token (`shared_mlp.input_linear`
  [2Fs, D] gate then up, `output_linear` [D, Fs]), added to the routed output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import MoeConfig
from models.families import common

GRANITE_MOE = 'granitemoe'
GRANITE_MOE_SHARED = 'granitemoeshared'


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  common.check_silu(hf)
  shared = hf.get('shared_intermediate_size') or 0
  bias = bool(hf.get('attention_bias', False))
  model_type = hf.get('model_type', GRANITE_MOE)
  return common.build(
    'Granite MoE',
    lambda: MoeConfig(
      **common.common_fields(hf, rope_default=10000.0, eps_default=1e-6),
      intermediate_size=hf['intermediate_size'],
      num_experts=hf['num_local_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      norm_topk_prob=True,
      qk_norm=None,
      qkv_bias=bias,
      o_bias=bias,
      num_shared_experts=1 if shared else 0,
      shared_intermediate_size=shared,
      embedding_multiplier=float(hf.get('embedding_multiplier', 1.0)),
      attention_multiplier=float(hf.get('attention_multiplier', 1.0)),
      residual_multiplier=float(hf.get('residual_multiplier', 1.0)),
      logits_scaling=float(hf.get('logits_scaling', 1.0)),
      model_type=model_type,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  shared = c.model_type == GRANITE_MOE_SHARED
  arch = 'GraniteMoeSharedForCausalLM' if shared else 'GraniteMoeForCausalLM'
  out = {
    'architectures': [arch],
    'model_type': c.model_type,
    **common.common_hf_fields(c),
    'intermediate_size': c.intermediate_size,
    'num_local_experts': c.num_experts,
    'attention_bias': c.qkv_bias,
    'embedding_multiplier': c.embedding_multiplier,
    'attention_multiplier': c.attention_multiplier,
    'residual_multiplier': c.residual_multiplier,
    'logits_scaling': c.logits_scaling,
  }
  if shared:
    out['shared_intermediate_size'] = c.shared_intermediate_size
  return out


def _fused_mlp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A shared MLP's input_linear [2Fs, D] -> (gate [D, Fs], up [D, Fs])."""
  f = x.shape[0] // 2
  return common.t(x[:f]), common.t(x[f:])


def _layer(i) -> str:
  return f'layer_{i}'


RULES = (
  common.BASE_RULES
  + common.QKV_BIAS_RULES
  + [
    (
      common.LAYER + r'self_attn\.o_proj\.bias',
      lambda i: common.Target((_layer(i), 'attn', 'o_bias'), common.same),
    ),
    (
      common.LAYER + r'block_sparse_moe\.router\.layer\.weight',
      lambda i: common.Target((_layer(i), 'moe', 'router', 'kernel'), common.t),
    ),
    (
      common.LAYER + r'block_sparse_moe\.input_linear\.weight',
      lambda i: common.Target(
        (_layer(i), 'moe', 'experts', 'gate'),
        common.fused_gate_up,
        split=((_layer(i), 'moe', 'experts', 'gate'), (_layer(i), 'moe', 'experts', 'up')),
      ),
    ),
    (
      common.LAYER + r'block_sparse_moe\.output_linear\.weight',
      lambda i: common.Target((_layer(i), 'moe', 'experts', 'down'), common.t_stacked),
    ),
    (
      common.LAYER + r'shared_mlp\.input_linear\.weight',
      lambda i: common.Target(
        (_layer(i), 'moe', 'shared', 'gate'),
        _fused_mlp,
        split=((_layer(i), 'moe', 'shared', 'gate'), (_layer(i), 'moe', 'shared', 'up')),
      ),
    ),
    (
      common.LAYER + r'shared_mlp\.output_linear\.weight',
      lambda i: common.Target((_layer(i), 'moe', 'shared', 'down'), common.t),
    ),
  ]
)

# ibm-granite/granite-3.0-3b-a800m-base: 3.37B parameters, 0.8B active.
GRANITE_3_0_3B_A800M = MoeConfig(
  vocab_size=49155,
  hidden_size=1536,
  intermediate_size=512,
  num_hidden_layers=32,
  num_attention_heads=24,
  num_key_value_heads=8,
  num_experts=40,
  num_experts_per_tok=8,
  norm_topk_prob=True,
  max_position_embeddings=4096,
  rope_theta=10000.0,
  rms_norm_eps=1e-6,
  tie_word_embeddings=True,
  pad_token_id=0,
  bos_token_id=0,
  eos_token_id=0,
  qk_norm=None,
  embedding_multiplier=12.0,
  attention_multiplier=0.015625,
  residual_multiplier=0.22,
  logits_scaling=6.0,
  model_type=GRANITE_MOE,
)

# ibm-granite/granite-3.0-1b-a400m-base: 1.33B parameters, 0.4B active.
GRANITE_3_0_1B_A400M = GRANITE_3_0_3B_A800M.replace(
  hidden_size=1024,
  num_hidden_layers=24,
  num_attention_heads=16,
  num_experts=32,
)

PRESETS = {
  'granite-3.0-3b-a800m': GRANITE_3_0_3B_A800M,
  'granite-3.0-1b-a400m': GRANITE_3_0_1B_A400M,
}

FAMILY = common.Family(
  (GRANITE_MOE, GRANITE_MOE_SHARED), from_hf_config, to_hf_config, RULES, PRESETS
)
