"""The MoE decoder's configuration: one frozen dataclass for every family.

Fields say *what computes*: which attention variant, which layers are MoE,
how the router's top-k weights are formed, whether shared experts run beside
the routed ones. The code branches on these fields with Python `if` at trace
time, never on a model name; `model_type` is kept only to write the HF
`config.json` back and to pick the HF tensor-name table (`models/families/`).
Each family's differences from this common model live in one file there.
"""

from __future__ import annotations

import dataclasses

QK_NORMS = (None, 'full', 'head')
DISPATCHES = ('auto', 'sorted', 'ragged')  # models.dispatch.resolve


class ConfigError(ValueError):
  """A configuration that is not a supported MoE configuration."""


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Architecture hyper-parameters of a decoder-only MoE language model.

  Defaults are OLMoE-1B-7B's. `intermediate_size` is the width of the dense
  MLP layers (`dense_layers`) and, unless `moe_intermediate_size` is given, of
  each routed expert (OLMoE and Mixtral have one width for both).
  """

  vocab_size: int = 50304
  hidden_size: int = 2048
  intermediate_size: int = 1024
  num_hidden_layers: int = 16
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  num_experts: int = 64
  num_experts_per_tok: int = 8
  # Renormalize the top-k router probabilities to sum to 1 (Qwen3-MoE,
  # Mixtral: Mixtral's softmax over the top-k *logits* is exactly this).
  norm_topk_prob: bool = False
  max_position_embeddings: int = 4096
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  clip_qkv: float | None = None
  tie_word_embeddings: bool = False
  pad_token_id: int | None = 1
  bos_token_id: int | None = None
  eos_token_id: int | None = 50279
  # Attention variants. head_dim None: hidden_size // num_attention_heads.
  head_dim_override: int | None = None
  # RMSNorm of queries and keys: 'full' over all heads at once (OLMoE),
  # 'head' per head (Qwen3-MoE), None (LLaMA, DeepSeekMoE, Qwen2-MoE, Mixtral).
  qk_norm: str | None = 'full'
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
  # MoE variants.
  moe_intermediate_size: int | None = None  # each routed expert's width
  dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of MoE
  num_shared_experts: int = 0  # shared experts, run on every token, never routed
  shared_intermediate_size: int = 0  # their total width (one fused SwiGLU MLP)
  shared_expert_gate: bool = False  # scale them by sigmoid(x @ w) (Qwen2-MoE)
  model_type: str = 'olmoe'
  # How routed experts are dispatched (`models.dispatch.resolve`): 'auto'
  # ('sorted' on CPU, 'ragged' on GPU/TPU), 'sorted' or 'ragged'. Same numbers
  # either way; not part of the HF config or the checkpoint.
  dispatch: str = 'auto'

  def __post_init__(self):
    object.__setattr__(self, 'dense_layers', tuple(sorted(int(i) for i in self.dense_layers)))
    if self.head_dim_override == self.hidden_size / self.num_attention_heads:
      object.__setattr__(self, 'head_dim_override', None)  # the default, spelled out
    if self.hidden_size % self.num_attention_heads and self.head_dim_override is None:
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
    if self.dispatch not in DISPATCHES:
      raise ConfigError(f'dispatch={self.dispatch!r}, expected one of {DISPATCHES}')
    if self.qk_norm not in QK_NORMS:
      raise ConfigError(f'qk_norm={self.qk_norm!r}, expected one of {QK_NORMS}')
    bad = [i for i in self.dense_layers if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ConfigError(f'dense_layers {bad} out of range [0, {self.num_hidden_layers})')
    if not self.moe_layers:
      raise ConfigError('every layer is dense: a MoE model needs at least one MoE layer')
    if self.num_shared_experts and self.shared_intermediate_size <= 0:
      raise ConfigError('num_shared_experts > 0 needs shared_intermediate_size > 0')

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.hidden_size // self.num_attention_heads

  @property
  def q_width(self) -> int:
    return self.num_attention_heads * self.head_dim

  @property
  def kv_width(self) -> int:
    return self.num_key_value_heads * self.head_dim

  @property
  def expert_intermediate_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers: the only layers a pathway may re-mix."""
    dense = set(self.dense_layers)
    return tuple(i for i in range(self.num_hidden_layers) if i not in dense)

  def is_moe_layer(self, i: int) -> bool:
    return i not in self.dense_layers

  def replace(self, **kwargs) -> MoeConfig:
    return dataclasses.replace(self, **kwargs)
