"""OLMoE configuration: one frozen dataclass, named presets, HF conversion."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
  """A configuration that is not a supported OLMoE configuration."""


@dataclasses.dataclass(frozen=True)
class OlmoeConfig:
  """Architecture hyper-parameters of an OLMoE model.

  Only fields that change the computation live here; config changes which code
  runs through Python `if` at trace time, never through a model-name string.
  """

  vocab_size: int = 50304
  hidden_size: int = 2048
  intermediate_size: int = 1024
  num_hidden_layers: int = 16
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  num_experts: int = 64
  num_experts_per_tok: int = 8
  norm_topk_prob: bool = False
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  clip_qkv: float | None = None
  tie_word_embeddings: bool = False
  pad_token_id: int | None = 1
  bos_token_id: int | None = None
  eos_token_id: int | None = 50279

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
        f'hidden_size={self.hidden_size} is not divisible by '
        f'num_attention_heads={self.num_attention_heads}'
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(
        f'num_attention_heads={self.num_attention_heads} is not divisible by'
        f' num_key_value_heads={self.num_key_value_heads}'
      )
    if not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(
        f'num_experts_per_tok={self.num_experts_per_tok} must be in '
        f'[1, num_experts={self.num_experts}]'
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def q_width(self) -> int:
    return self.num_attention_heads * self.head_dim

  @property
  def kv_width(self) -> int:
    return self.num_key_value_heads * self.head_dim

  def replace(self, **kwargs) -> OlmoeConfig:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any] | Any) -> OlmoeConfig:
    """Builds a config from an HF `config.json` dict or `OlmoeConfig` object."""
    if not isinstance(hf, Mapping):
      hf = hf.to_dict()
    model_type = hf.get('model_type')
    if model_type != 'olmoe':
      raise ConfigError(
        f"config has model_type={model_type!r}, expected 'olmoe' "
        f'(architectures={hf.get("architectures")})'
      )
    act = hf.get('hidden_act', 'silu')
    if act != 'silu':
      raise ConfigError(f'hidden_act={act!r} is not supported (only silu)')
    if hf.get('attention_bias', False):
      raise ConfigError('attention_bias=True is not supported by OLMoE')
    rope_theta = hf.get('rope_theta')
    rope_params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    if rope_theta is None:
      rope_theta = rope_params.get('rope_theta', 10000.0)
    rope_type = rope_params.get('rope_type', rope_params.get('type', 'default'))
    if rope_type not in (None, 'default'):
      raise ConfigError(f'rope_type={rope_type!r} is not supported')
    eos = hf.get('eos_token_id')
    if isinstance(eos, (list, tuple)):
      eos = eos[0] if eos else None
    num_heads = hf['num_attention_heads']
    try:
      return cls(
        vocab_size=hf['vocab_size'],
        hidden_size=hf['hidden_size'],
        intermediate_size=hf['intermediate_size'],
        num_hidden_layers=hf['num_hidden_layers'],
        num_attention_heads=num_heads,
        num_key_value_heads=hf.get('num_key_value_heads') or num_heads,
        num_experts=hf['num_experts'],
        num_experts_per_tok=hf['num_experts_per_tok'],
        norm_topk_prob=bool(hf.get('norm_topk_prob', False)),
        max_position_embeddings=hf.get('max_position_embeddings', 4096),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf.get('rms_norm_eps', 1e-5)),
        clip_qkv=hf.get('clip_qkv'),
        tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
        pad_token_id=hf.get('pad_token_id'),
        bos_token_id=hf.get('bos_token_id'),
        eos_token_id=eos,
      )
    except KeyError as e:
      raise ConfigError(f'OLMoE config is missing the field {e}') from e

  def to_hf_config(self) -> dict[str, Any]:
    """The HF `config.json` dict for this config (model_type 'olmoe')."""
    return {
      'architectures': ['OlmoeForCausalLM'],
      'model_type': 'olmoe',
      'vocab_size': self.vocab_size,
      'hidden_size': self.hidden_size,
      'intermediate_size': self.intermediate_size,
      'num_hidden_layers': self.num_hidden_layers,
      'num_attention_heads': self.num_attention_heads,
      'num_key_value_heads': self.num_key_value_heads,
      'num_experts': self.num_experts,
      'num_experts_per_tok': self.num_experts_per_tok,
      'norm_topk_prob': self.norm_topk_prob,
      'max_position_embeddings': self.max_position_embeddings,
      'rope_theta': self.rope_theta,
      'rms_norm_eps': self.rms_norm_eps,
      'clip_qkv': self.clip_qkv,
      'tie_word_embeddings': self.tie_word_embeddings,
      'pad_token_id': self.pad_token_id,
      'bos_token_id': self.bos_token_id,
      'eos_token_id': self.eos_token_id,
      'hidden_act': 'silu',
      'attention_bias': False,
    }


# allenai/OLMoE-1B-7B-0924: 6.9B parameters, 1.3B active. OLMoE-1B-7B-0125(-Instruct)
# has the same architecture (a later data mix): one config for both.
OLMOE_1B_7B_0924 = OlmoeConfig()

# A tiny configuration for unit tests (GQA, 8 experts, top-2).
TINY = OlmoeConfig(
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
BENCH = OlmoeConfig(
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

PRESETS: dict[str, OlmoeConfig] = {
  'olmoe-1b-7b-0924': OLMOE_1B_7B_0924,
  'olmoe-1b-7b-0125-instruct': OLMOE_1B_7B_0924,
  'tiny': TINY,
  'bench': BENCH,
}
