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
SCORING_FUNCS = ('softmax', 'sigmoid')
GROUP_SCORES = ('max', 'top2_sum')


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
  o_bias: bool = False  # a bias on the output projection (gpt-oss)
  # Sliding-window attention: a query in one of `sliding_layers` sees the
  # `sliding_window` most recent key slots, its own included (HF: key slot >
  # query slot - window); every other layer sees all earlier slots.
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()
  # A learned logit per head that joins every softmax's denominator and
  # attends to nothing (gpt-oss's attention sinks).
  attention_sinks: bool = False
  # Granite's scalings: token embeddings x embedding_multiplier; attention
  # scores x attention_multiplier (None: head_dim ** -0.5); each residual
  # branch (attention, feed-forward) x residual_multiplier; logits /
  # logits_scaling.
  embedding_multiplier: float = 1.0
  attention_multiplier: float | None = None
  residual_multiplier: float = 1.0
  logits_scaling: float = 1.0
  # MoE variants.
  moe_intermediate_size: int | None = None  # each routed expert's width
  dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of MoE
  num_shared_experts: int = 0  # shared experts, run on every token, never routed
  shared_intermediate_size: int = 0  # their total width (one fused SwiGLU MLP)
  shared_expert_gate: bool = False  # scale them by sigmoid(x @ w) (Qwen2-MoE)
  # gpt-oss: a bias on the router logits (part of the logits, so of the
  # probabilities); biases on the routed experts' gate, up and down; with
  # swiglu_limit set, the clamped gate min(g, l) * sigmoid(alpha * min(g, l))
  # * (clip(u, -l, l) + 1) in place of silu(g) * u (`models.glu`).
  router_bias: bool = False
  expert_bias: bool = False
  swiglu_limit: float | None = None
  swiglu_alpha: float = 1.702
  # Multi-head latent attention (DeepSeek-V2/V3; `models.nn.mla`), on when
  # kv_lora_rank is set: keys and values from a rank-`kv_lora_rank` latent,
  # queries through a rank-`q_lora_rank` one (None: a full q projection); of
  # head_dim, the last `qk_rope_head_dim` dims carry RoPE (a key shared by all
  # heads), the rest none; values have `v_head_dim_override` dims per head.
  q_lora_rank: int | None = None
  kv_lora_rank: int | None = None
  qk_rope_head_dim: int = 0
  v_head_dim_override: int | None = None
  # RoPE on interleaved pairs (x0, x1), (x2, x3), .. (DeepSeek) instead of the
  # rotate-half pairs (x_i, x_{i+Dh/2}).
  rope_interleave: bool = False
  # RoPE scaling as HF's `rope_parameters` minus rope_theta, as sorted (key,
  # value) pairs: () for plain RoPE, or rope_type 'yarn' with its factor,
  # original_max_position_embeddings, beta_fast/slow, mscale(_all_dim).
  rope_scaling: tuple[tuple[str, object], ...] = ()
  # Norms on the sublayer outputs instead of their inputs (OLMo-2, FlexOlmo):
  # x + norm(attn(x)), then x + norm(ffn(x)).
  post_norm: bool = False
  # Router variants (`models.expert_choice`). 'softmax' or 'sigmoid' scores;
  # experts picked within the `topk_group` best of `n_group` equal groups
  # (group score: 'max' of its scores, or 'top2_sum'), on the scores plus a
  # learned correction bias (`score_correction_bias`) that only selects; the
  # mixing weights times `routed_scaling_factor`.
  scoring_func: str = 'softmax'
  n_group: int = 1
  topk_group: int = 1
  group_score: str = 'max'
  score_correction_bias: bool = False
  routed_scaling_factor: float = 1.0
  model_type: str = 'olmoe'
  # How routed experts are dispatched (`models.dispatch.resolve`): 'auto'
  # ('sorted' on CPU, 'ragged' on GPU/TPU), 'sorted' or 'ragged'. Same numbers
  # either way; not part of the HF config or the checkpoint.
  dispatch: str = 'auto'

  def __post_init__(self):
    object.__setattr__(self, 'dense_layers', tuple(sorted(int(i) for i in self.dense_layers)))
    object.__setattr__(self, 'sliding_layers', tuple(sorted(int(i) for i in self.sliding_layers)))
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
    bad = [i for i in self.sliding_layers if not 0 <= i < self.num_hidden_layers]
    if bad:
      raise ConfigError(f'sliding_layers {bad} out of range [0, {self.num_hidden_layers})')
    if self.sliding_layers and not (self.sliding_window or 0) > 0:
      raise ConfigError(f'sliding_layers need sliding_window > 0, got {self.sliding_window}')
    if not self.moe_layers:
      raise ConfigError('every layer is dense: a MoE model needs at least one MoE layer')
    if self.scoring_func not in SCORING_FUNCS:
      raise ConfigError(f'scoring_func={self.scoring_func!r}, expected one of {SCORING_FUNCS}')
    if self.group_score not in GROUP_SCORES:
      raise ConfigError(f'group_score={self.group_score!r}, expected one of {GROUP_SCORES}')
    if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
      raise ConfigError(
        f'n_group={self.n_group} must divide num_experts={self.num_experts} and '
        f'topk_group={self.topk_group} must be in [1, n_group]'
      )
    if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
      raise ConfigError(
        f'topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts '
        f'hold fewer than num_experts_per_tok={self.num_experts_per_tok}'
      )
    if self.kv_lora_rank is not None and not 0 < self.qk_rope_head_dim < self.head_dim:
      raise ConfigError(
        f'qk_rope_head_dim={self.qk_rope_head_dim} must be in (0, head_dim={self.head_dim})'
      )
    object.__setattr__(self, 'rope_scaling', tuple(sorted(dict(self.rope_scaling).items())))
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
  def v_head_dim(self) -> int:
    """Per-head width of the values (= head_dim but in multi-head latent attention)."""
    return self.v_head_dim_override or self.head_dim

  @property
  def expert_intermediate_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the MoE layers: the only layers a pathway may re-mix."""
    dense = set(self.dense_layers)
    return tuple(i for i in range(self.num_hidden_layers) if i not in dense)

  def attention_window(self, i: int) -> int | None:
    """Layer i's sliding window in key slots, or None (full causal attention)."""
    return self.sliding_window if i in self.sliding_layers else None

  def is_moe_layer(self, i: int) -> bool:
    return i not in self.dense_layers

  def replace(self, **kwargs) -> MoeConfig:
    return dataclasses.replace(self, **kwargs)
