"""DeepSeek-V2 and DeepSeek-V3 (`deepseek_v2`: DeepSeek-V2-Lite, -V2, -V2.5; `deepseek_v3`: V3, R1).

Both: multi-head latent attention (`kv_lora_rank`, `q_lora_rank`, the
decoupled RoPE key of `qk_rope_head_dim` dims; `models.nn.mla`) with RoPE on
interleaved pairs and YaRN scaling (`rope_scaling`); the first
`first_k_dense_replace` layers dense SwiGLU MLPs of `intermediate_size`, the
others `n_routed_experts` routed experts of `moe_intermediate_size` beside
`n_shared_experts` shared ones (one SwiGLU of n_shared * moe_intermediate_size,
ungated, on every token).

Routing (as transformers 5 computes it; `models.expert_choice`):

* V2: softmax scores; 'greedy' top-k, or 'group_limited_greedy' (top-k within
  the `topk_group` groups of highest max score); weights are the scores,
  never renormalized (transformers ignores `norm_topk_prob`, so a config
  asking for it is refused), times `routed_scaling_factor`.
* V3: sigmoid scores; top-k of score + `e_score_correction_bias` within the
  `topk_group` groups of highest top-2 sum (selection only: the weights are
  the unbiased scores), renormalized (`norm_topk_prob`), times
  `routed_scaling_factor`.

A pathway replaces a token's scores (for V3, its sigmoid row renormalized,
times the token's own affinity mass): bias, group limit, top-k,
renormalization and scaling then run on the replaced row as on any other
(see `models.expert_choice` for why that is the re-mixing of the experts'
weights).

V3's multi-token-prediction layer (`model.layers.{L}`, L = num_hidden_layers)
is not part of the language model that scores a prompt; its tensors are not
read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ConfigError, MoeConfig
from models.families import common, deepseek

DEEPSEEK_V2 = 'deepseek_v2'
DEEPSEEK_V3 = 'deepseek_v3'
_ROPE_KEYS_DROPPED = ('rope_theta', 'type')


def rope_scaling(hf: Mapping[str, Any]) -> tuple[float, dict]:
  """(rope_theta, the scaling dict without rope_theta; {} for plain RoPE).

  Reads the Hub's `rope_theta` + `rope_scaling` ({'type': 'yarn', ...}) and
  transformers 5's `rope_parameters` ({'rope_type': 'yarn', 'rope_theta', ...}).
  """
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = float(hf.get('rope_theta') or params.get('rope_theta') or 10000.0)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type in (None, 'default'):
    return theta, {}
  if rope_type != 'yarn':
    raise ConfigError(f'rope_type={rope_type!r} is not supported (default or yarn)')
  scaling = {k: v for k, v in params.items() if k not in _ROPE_KEYS_DROPPED and v is not None}
  scaling['rope_type'] = 'yarn'
  scaling.setdefault('original_max_position_embeddings', hf.get('max_position_embeddings'))
  return theta, scaling


def _routing(hf: Mapping[str, Any], v3: bool) -> dict:
  method = hf.get('topk_method') or ('noaux_tc' if v3 else 'greedy')
  n_group, topk_group = hf.get('n_group') or 1, hf.get('topk_group') or 1
  if v3:
    if method != 'noaux_tc' or hf.get('scoring_func', 'sigmoid') != 'sigmoid':
      raise ConfigError(
        f'DeepSeek-V3 routing is sigmoid + noaux_tc; got topk_method={method!r}, '
        f'scoring_func={hf.get("scoring_func")!r}'
      )
    return dict(
      scoring_func='sigmoid',
      n_group=n_group,
      topk_group=topk_group,
      group_score='top2_sum',
      score_correction_bias=True,
      norm_topk_prob=bool(hf.get('norm_topk_prob', True)),
    )
  if hf.get('scoring_func', 'softmax') != 'softmax':
    raise ConfigError(f'scoring_func={hf["scoring_func"]!r} is not supported for DeepSeek-V2')
  if hf.get('norm_topk_prob', False):
    raise ConfigError(
      'norm_topk_prob=True is not supported for DeepSeek-V2 (transformers ignores it)'
    )
  if method == 'greedy':
    return dict(norm_topk_prob=False)
  if method != 'group_limited_greedy':
    raise ConfigError(f'topk_method={method!r} is not supported for DeepSeek-V2')
  return dict(n_group=n_group, topk_group=topk_group, group_score='max', norm_topk_prob=False)


def from_hf_config(hf: Mapping[str, Any]) -> MoeConfig:
  v3 = hf.get('model_type') == DEEPSEEK_V3
  common.check_silu(hf)
  if hf.get('attention_bias', False) or hf.get('mlp_bias', False):
    raise ConfigError('attention_bias / mlp_bias are not supported for DeepSeek-V2/V3')
  if (hf.get('moe_layer_freq') or 1) != 1:
    raise ConfigError(f'moe_layer_freq={hf["moe_layer_freq"]} is not supported (1 only)')
  heads = hf['num_attention_heads']
  if (hf.get('num_key_value_heads') or heads) != heads:
    raise ConfigError('multi-head latent attention has one key/value head per query head')
  theta, scaling = rope_scaling(hf)
  plain = {**hf, 'rope_theta': theta, 'rope_parameters': None, 'rope_scaling': None}
  shared = hf.get('n_shared_experts') or 0
  first_dense = hf.get('first_k_dense_replace') or 0
  name = 'DeepSeek-V3' if v3 else 'DeepSeek-V2'
  return common.build(
    name,
    lambda: MoeConfig(
      **common.common_fields(plain, rope_default=10000.0, eps_default=1e-6),
      intermediate_size=hf['intermediate_size'],
      moe_intermediate_size=hf['moe_intermediate_size'],
      num_experts=hf['n_routed_experts'],
      num_experts_per_tok=hf['num_experts_per_tok'],
      qk_norm=None,
      dense_layers=tuple(range(min(first_dense, hf['num_hidden_layers']))),
      num_shared_experts=shared,
      shared_intermediate_size=hf['moe_intermediate_size'] * shared,
      head_dim_override=hf['qk_nope_head_dim'] + hf['qk_rope_head_dim'],
      v_head_dim_override=hf['v_head_dim'],
      q_lora_rank=hf.get('q_lora_rank'),
      kv_lora_rank=hf['kv_lora_rank'],
      qk_rope_head_dim=hf['qk_rope_head_dim'],
      rope_interleave=bool(hf.get('rope_interleave', True)) if v3 else True,
      rope_scaling=tuple(scaling.items()),
      routed_scaling_factor=float(hf.get('routed_scaling_factor', 1.0)),
      **_routing(hf, v3),
      model_type=DEEPSEEK_V3 if v3 else DEEPSEEK_V2,
    ),
  )


def to_hf_config(c: MoeConfig) -> dict[str, Any]:
  moe = c.moe_layers
  if c.dense_layers != tuple(range(moe[0])):
    raise ConfigError(f'DeepSeek-V2/V3 write dense layers as a prefix; got {c.dense_layers}')
  v3 = c.model_type == DEEPSEEK_V3
  out = {
    'architectures': ['DeepseekV3ForCausalLM' if v3 else 'DeepseekV2ForCausalLM'],
    'model_type': c.model_type,
    **common.common_hf_fields(c),
    'rope_parameters': {'rope_theta': c.rope_theta, 'rope_type': 'default', **dict(c.rope_scaling)},
    'intermediate_size': c.intermediate_size,
    'moe_intermediate_size': c.expert_intermediate_size,
    'n_routed_experts': c.num_experts,
    'n_shared_experts': c.num_shared_experts,
    'first_k_dense_replace': moe[0],
    'q_lora_rank': c.q_lora_rank,
    'kv_lora_rank': c.kv_lora_rank,
    'qk_nope_head_dim': c.head_dim - c.qk_rope_head_dim,
    'qk_rope_head_dim': c.qk_rope_head_dim,
    'v_head_dim': c.v_head_dim,
    'n_group': c.n_group,
    'topk_group': c.topk_group,
    'routed_scaling_factor': c.routed_scaling_factor,
    'norm_topk_prob': c.norm_topk_prob,
    'attention_bias': False,
  }
  if v3:
    return {
      **out,
      'topk_method': 'noaux_tc',
      'scoring_func': 'sigmoid',
      'rope_interleave': c.rope_interleave,
    }
  method = 'group_limited_greedy' if c.n_group > 1 else 'greedy'
  return {**out, 'topk_method': method, 'scoring_func': 'softmax'}


def _attn(i, name, transform=common.t):
  return common.Target((f'layer_{i}', 'attn', *name), transform)


_MLA = {
  'q_a_proj.weight': ('q_a',),
  'q_a_layernorm.weight': ('q_a_norm', 'scale'),
  'q_b_proj.weight': ('q_b',),
  'kv_a_proj_with_mqa.weight': ('kv_a',),
  'kv_a_layernorm.weight': ('kv_a_norm', 'scale'),
  'kv_b_proj.weight': ('kv_b',),
}

RULES = (
  common.BASE_RULES
  + [
    (
      common.LAYER + r'self_attn\.(' + '|'.join(k.replace('.', r'\.') for k in _MLA) + ')',
      lambda i, n: _attn(i, _MLA[n], common.same if n.endswith('layernorm.weight') else common.t),
    ),
    (
      common.LAYER + r'mlp\.gate\.e_score_correction_bias',
      lambda i: common.Target((f'layer_{i}', 'moe', 'router', 'correction_bias'), common.same),
    ),
  ]
  + common.expert_rules()
  + common.mlp_rules(r'mlp\.shared_experts', ('moe', 'shared'))
  + common.mlp_rules(r'mlp', ('mlp',))
)

_YARN_40 = dict(
  rope_type='yarn',
  factor=40,
  original_max_position_embeddings=4096,
  beta_fast=32,
  beta_slow=1,
)

# deepseek-ai/DeepSeek-V2-Lite(-Chat): 15.7B parameters ("16B"), 2.4B active.
# DeepSeekMoE-16B's vocabulary and experts (64 routed of width 1408, greedy
# softmax top-6, not renormalized, 2 shared, layer 0 dense) with one layer
# fewer and multi-head latent attention (no q latent) under YaRN.
DEEPSEEK_V2_LITE = deepseek.DEEPSEEK_MOE_16B.replace(
  num_hidden_layers=27,
  max_position_embeddings=163840,
  head_dim_override=192,
  v_head_dim_override=128,
  q_lora_rank=None,
  kv_lora_rank=512,
  qk_rope_head_dim=64,
  rope_interleave=True,
  rope_scaling=tuple({**_YARN_40, 'mscale': 0.707, 'mscale_all_dim': 0.707}.items()),
  model_type=DEEPSEEK_V2,
)

# deepseek-ai/DeepSeek-V2(-Chat): 236B parameters, 21B active; 160 routed top-6
# + 2 shared, group-limited greedy (3 of 8 groups), routed scaling 16.
DEEPSEEK_V2_236B = DEEPSEEK_V2_LITE.replace(
  hidden_size=5120,
  intermediate_size=12288,
  moe_intermediate_size=1536,
  num_hidden_layers=60,
  num_attention_heads=128,
  num_key_value_heads=128,
  num_experts=160,
  shared_intermediate_size=2 * 1536,
  q_lora_rank=1536,
  n_group=8,
  topk_group=3,
  group_score='max',
  routed_scaling_factor=16.0,
)

# deepseek-ai/DeepSeek-V3 (and -R1): 671B parameters, 37B active, without the
# multi-token-prediction layer; 256 routed top-8 + 1 shared, sigmoid scores
# with a selection bias, 4 of 8 groups, renormalized, routed scaling 2.5.
DEEPSEEK_V3_671B = MoeConfig(
  vocab_size=129280,
  hidden_size=7168,
  intermediate_size=18432,
  moe_intermediate_size=2048,
  num_hidden_layers=61,
  num_attention_heads=128,
  num_key_value_heads=128,
  num_experts=256,
  num_experts_per_tok=8,
  norm_topk_prob=True,
  max_position_embeddings=163840,
  rope_theta=10000.0,
  rms_norm_eps=1e-6,
  pad_token_id=None,
  bos_token_id=0,
  eos_token_id=1,
  qk_norm=None,
  dense_layers=(0, 1, 2),
  num_shared_experts=1,
  shared_intermediate_size=2048,
  head_dim_override=192,
  v_head_dim_override=128,
  q_lora_rank=1536,
  kv_lora_rank=512,
  qk_rope_head_dim=64,
  rope_interleave=True,
  rope_scaling=tuple({**_YARN_40, 'mscale': 1.0, 'mscale_all_dim': 1.0}.items()),
  scoring_func='sigmoid',
  n_group=8,
  topk_group=4,
  group_score='top2_sum',
  score_correction_bias=True,
  routed_scaling_factor=2.5,
  model_type=DEEPSEEK_V3,
)

PRESETS = {
  'deepseek-v2-lite': DEEPSEEK_V2_LITE,
  'deepseek-v2': DEEPSEEK_V2_236B,
  'deepseek-v3': DEEPSEEK_V3_671B,
}

FAMILY = common.Family((DEEPSEEK_V2, DEEPSEEK_V3), from_hf_config, to_hf_config, RULES, PRESETS)
