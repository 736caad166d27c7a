"""Config dicts of the tiny references and of the published full-size models.

Tiny ones build the references of `c3po_jax.testing.hf_families`; the
published ones (`FULL_SIZE_HF_CONFIGS`, the fields that matter of each hub
`config.json`) check our presets and layouts at full size without weights.
`perturb_` is the random init every tiny reference shares.
"""

from __future__ import annotations

DEFAULT_SHARD_SIZE = '100KB'
INIT_STD = 0.2

# Sizes shared by every tiny model: hidden 32, 4 layers, 4 heads over 2 kv
# heads, 8 experts top-2, vocab 128.
TINY_COMMON = dict(
  vocab_size=128,
  hidden_size=32,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts_per_tok=2,
  max_position_embeddings=128,
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  pad_token_id=0,
  bos_token_id=1,
  eos_token_id=2,
)

TINY_QWEN3_MOE = dict(
  TINY_COMMON,
  intermediate_size=48,
  moe_intermediate_size=16,
  num_experts=8,
  head_dim=16,  # != hidden / heads = 8
  norm_topk_prob=True,
  mlp_only_layers=[1],  # layer 1 is a dense MLP
  decoder_sparse_step=1,
)

TINY_QWEN2_MOE = dict(
  TINY_COMMON,
  intermediate_size=48,
  moe_intermediate_size=16,
  shared_expert_intermediate_size=24,
  num_experts=8,
  norm_topk_prob=False,
  qkv_bias=True,
)

TINY_MIXTRAL = dict(TINY_COMMON, intermediate_size=16, num_local_experts=8, rms_norm_eps=1e-5)

# DeepSeekMoE, in the remote code's config field names; top-3 of 8 routed.
TINY_DEEPSEEK = dict(
  TINY_COMMON,
  intermediate_size=48,
  moe_intermediate_size=16,
  n_shared_experts=2,
  n_routed_experts=8,
  num_experts_per_tok=3,
  first_k_dense_replace=1,
  moe_layer_freq=1,
  norm_topk_prob=False,
  scoring_func='softmax',
  aux_loss_alpha=0.001,
  seq_aux=True,
  rope_theta=10000.0,
  hidden_act='silu',
  attention_bias=False,
)

DEEPSEEK_AUTO_MAP = {
  'AutoConfig': 'configuration_deepseek.DeepseekConfig',
  'AutoModel': 'modeling_deepseek.DeepseekModel',
  'AutoModelForCausalLM': 'modeling_deepseek.DeepseekForCausalLM',
}

# Published config.json values (the fields that matter), by Hub id. From
# memory cross-checked against public copies of these files; `# unsure` marks
# values not confirmed by a second source.
FULL_SIZE_HF_CONFIGS = {
  'allenai/OLMoE-1B-7B-0924': dict(
    architectures=['OlmoeForCausalLM'],
    model_type='olmoe',
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    clip_qkv=None,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    attention_bias=False,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
    hidden_act='silu',
  ),
  'deepseek-ai/deepseek-moe-16b-base': dict(
    architectures=['DeepseekForCausalLM'],
    auto_map=DEEPSEEK_AUTO_MAP,
    model_type='deepseek',
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    moe_layer_freq=1,
    norm_topk_prob=False,
    scoring_func='softmax',
    aux_loss_alpha=0.001,
    seq_aux=True,
    max_position_embeddings=4096,
    rope_theta=10000,
    rope_scaling=None,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act='silu',
    attention_bias=False,
    attention_dropout=0.0,
    pretraining_tp=1,
    bos_token_id=100000,
    eos_token_id=100001,
    torch_dtype='bfloat16',
  ),
  'Qwen/Qwen3-30B-A3B': dict(
    architectures=['Qwen3MoeForCausalLM'],
    model_type='qwen3_moe',
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,  # dense MLP width; unused (no mlp_only_layers)
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,  # != 2048 / 32 = 64
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rope_scaling=None,
    rms_norm_eps=1e-6,
    attention_bias=False,
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=48,
    router_aux_loss_coef=0.001,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151645,  # unsure: the base model may list 151643
    hidden_act='silu',
  ),
  'Qwen/Qwen1.5-MoE-A2.7B': dict(
    architectures=['Qwen2MoeForCausalLM'],
    model_type='qwen2_moe',
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5632,  # dense MLP width; unused (every layer MoE)
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=60,
    num_experts_per_tok=4,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    max_position_embeddings=8192,  # unsure: some copies (the Chat model?) say 32768
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    sliding_window=32768,  # inert: use_sliding_window is False
    max_window_layers=21,
    router_aux_loss_coef=0.001,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_id=151643,  # unsure
    hidden_act='silu',
  ),
  'mistralai/Mixtral-8x7B-v0.1': dict(
    architectures=['MixtralForCausalLM'],
    model_type='mixtral',
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,  # the width of each expert
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    sliding_window=None,
    router_aux_loss_coef=0.02,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act='silu',
  ),
}


def perturb_(model, seed: int = 0, std: float = INIT_STD) -> None:
  """Every parameter ~N(0, std) (biases too); norm scales ~1 + N(0, std)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      noise = std * torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(noise + 1.0 if name.endswith('norm.weight') else noise)
