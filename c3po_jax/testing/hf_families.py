"""Tiny PyTorch/transformers references for the MoE families beyond OLMoE.

For parity tests of the JAX model against transformers 5.24 (torch, CPU,
float32). Each `save_tiny_<family>(out_dir, seed=0, **overrides)` builds a
small random model (weights ~N(0, 0.2), norm scales ~1 + N(0, 0.2), so the
routing is not degenerate), writes it as safetensors shards + index (>= 2
shards) and returns `(torch model in eval mode, float32; config dict)`; the
config dict is the `config.json` written next to the shards. The real classes
reload with `AutoModelForCausalLM.from_pretrained(out_dir)`; DeepSeekMoE has no
transformers class, so `load_tiny_deepseek(out_dir)` rebuilds its reference.

The references use `attn_implementation='eager'` and
`experts_implementation='eager'` (transformers 5.24 defaults to 'sdpa' and
'grouped_mm' on CPU; `from_pretrained` picks those defaults again unless told
otherwise: pass `experts_implementation='eager'` there too for exact equality).

On-disk tensor names (what `save_pretrained` in 5.24 writes; printed from the
files; tiny shapes: D=32 hidden, V=128 vocab, H=4 heads, K=2 kv heads,
hd=head dim, E=8 experts, F=moe/expert intermediate, I=dense intermediate).
Experts are fused in memory (`mlp.experts.gate_up_proj` [E, 2F, D] = gate
rows then up rows, `mlp.experts.down_proj` [E, D, F]) but `save_pretrained`
reverts that (`transformers.core_model_loading.revert_weight_conversion`): the
files hold one tensor per expert, as the Hub checkpoints do. All Linear weights
are [out, in]. Every family: `model.embed_tokens.weight` [V, D],
`model.norm.weight` [D], `lm_head.weight` [V, D] (untied in all tiny models and
in all five published ones), and per layer i
`model.layers.{i}.input_layernorm.weight` [D],
`model.layers.{i}.post_attention_layernorm.weight` [D],
`model.layers.{i}.self_attn.q_proj.weight` [H*hd, D], `k_proj.weight` [K*hd, D],
`v_proj.weight` [K*hd, D], `o_proj.weight` [D, H*hd]. Then:

| family | extra attention tensors | MoE layer (per layer i) | dense layer |
| --- | --- | --- | --- |
| qwen3_moe (hd=16 != D/H=8) | `self_attn.q_norm.weight` [hd], `self_attn.k_norm.weight` [hd] (RMSNorm per head, before RoPE); no biases | `mlp.gate.weight` [E, D]; `mlp.experts.{e}.gate_proj.weight` [F, D], `up_proj.weight` [F, D], `down_proj.weight` [D, F] | layers in `mlp_only_layers` (tiny: [1]) or with (i+1) % decoder_sparse_step != 0: `mlp.{gate,up}_proj.weight` [I, D], `mlp.down_proj.weight` [D, I] |
| qwen2_moe (hd=D/H) | `self_attn.{q,k,v}_proj.bias` [H*hd], [K*hd], [K*hd] (qkv_bias=True); no o_proj bias | as qwen3_moe, plus `mlp.shared_expert.{gate,up}_proj.weight` [S, D], `mlp.shared_expert.down_proj.weight` [D, S] (S = shared_expert_intermediate_size), `mlp.shared_expert_gate.weight` [1, D] | same rule as qwen3_moe (tiny: none dense) |
| mixtral (hd=D/H) | none | `block_sparse_moe.gate.weight` [E, D]; `block_sparse_moe.experts.{e}.w1.weight` [F, D] (gate), `w3.weight` [F, D] (up), `w2.weight` [D, F] (down); F = `intermediate_size` | none |
| deepseek (remote code; written here) | none (attention_bias false) | `mlp.gate.weight` [E, D]; `mlp.experts.{e}.{gate,up}_proj.weight` [F, D], `down_proj.weight` [D, F]; `mlp.shared_experts.{gate,up}_proj.weight` [n_shared*F, D], `down_proj.weight` [D, n_shared*F] | layers i < first_k_dense_replace or i % moe_layer_freq != 0: `mlp.{gate,up}_proj.weight` [I, D], `mlp.down_proj.weight` [D, I] |

Mixtral keeps the Hub's `block_sparse_moe` / w1 w2 w3 names on disk (5.24
renames to `mlp.*` and fuses in memory only). OLMoE (for comparison) writes
`mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj.weight` and
`self_attn.{q,k}_norm.weight` of size [H*hd] and [K*hd] (over all heads, not
per head as in Qwen3).

config.json as 5.24 writes it differs from the Hub files in field names, so a
loader must accept both: RoPE is `rope_parameters` {'rope_theta', 'rope_type'}
(the Hub: top-level `rope_theta`), the dtype is `dtype` (the Hub:
`torch_dtype`), Qwen3-MoE's expert count is written `num_local_experts` (its
attribute_map; the Hub: `num_experts`), Qwen2-MoE writes `sliding_window: 0`
and `layer_types` (all 'full_attention' unless use_sliding_window).

Routing maths per MoE block (x: the post-attention-normed hidden state of one
token; SwiGLU expert_e(x) = down_e(silu(gate_e x) * up_e x); read from the 5.24
sources, `Qwen3MoeTopKRouter`, `Qwen2MoeTopKRouter`, `MixtralTopKRouter`,
`DeepseekV2TopkRouter`, and the DeepSeekMoE remote `MoEGate`):

- qwen3_moe: p = softmax(x @ Wg.T) in float32 over all E; (w, idx) = top-k(p);
  if norm_topk_prob (True in Qwen3-30B-A3B): w /= sum(w);
  y = sum_k w_k expert_idx_k(x). Softmax then top-k. Dense layers as above.
- qwen2_moe: same router (norm_topk_prob False in Qwen1.5-MoE-A2.7B, so w are
  the raw softmax probabilities), plus a gated shared expert:
  y = sum_k w_k expert_idx_k(x) + sigmoid(x . w_sg) * shared(x), w_sg =
  `shared_expert_gate.weight` [1, D] (a scalar gate per token, no bias).
- mixtral: p = softmax(x @ Wg.T) in float32; (w, idx) = top-k(p); always
  w /= sum(w) (no flag), which equals softmax over the top-k logits.
  y = sum_k w_k expert_idx_k(x). Every layer is MoE.
- olmoe: as qwen3_moe (norm_topk_prob False in OLMoE-1B-7B-0924).
- deepseek (DeepSeekMoE-16B): p = softmax(x @ Wg.T) over the E routed experts
  (scoring_func 'softmax'); (w, idx) = top-k(p) (sorted=False);
  norm_topk_prob False: no renormalization; no scaling factor, no group limit;
  y = sum_k w_k expert_idx_k(x) + shared(x), shared an ungated SwiGLU of width
  n_shared_experts * moe_intermediate_size. Layer i is MoE iff
  i >= first_k_dense_replace and i % moe_layer_freq == 0 (16B: all but layer 0).
  The remote code takes the softmax in the activation dtype (bf16 on the Hub);
  the transformers DeepSeek-V2 block used here takes it in float32.

Attention in all four: LLaMA-style (RMSNorm pre-norm, rotate-half RoPE on the
full head dim, GQA by repeating kv heads, scale hd**-0.5, causal). Qwen3 adds
the per-head q/k RMSNorm; Qwen2-MoE adds q/k/v biases. Sliding windows: off
in all tiny models and in the published configs that matter here
(Qwen3MoeConfig sets sliding_window None unless use_sliding_window;
Qwen2MoeConfig sets it 0 unless use_sliding_window; Mixtral-8x7B has null).
"""

from __future__ import annotations

import json
import os

import numpy as np

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


def _finish_real(model, out_dir: str, seed: int, max_shard_size: str):
  model.set_attn_implementation('eager')
  model.set_experts_implementation('eager')
  perturb_(model, seed)
  model.eval()
  model.save_pretrained(out_dir, max_shard_size=max_shard_size)
  with open(os.path.join(out_dir, 'config.json')) as f:
    return model, json.load(f)


def save_tiny_qwen3_moe(
  out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides
):
  """A random `Qwen3MoeForCausalLM` (head_dim 16, layer 1 dense), saved sharded."""
  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

  torch.manual_seed(seed)
  model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**TINY_QWEN3_MOE, **overrides}))
  return _finish_real(model, out_dir, seed, max_shard_size)


def save_tiny_qwen2_moe(
  out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides
):
  """A random `Qwen2MoeForCausalLM` (qkv biases, gated shared expert), saved sharded."""
  import torch
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

  torch.manual_seed(seed)
  model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**TINY_QWEN2_MOE, **overrides}))
  return _finish_real(model, out_dir, seed, max_shard_size)


def save_tiny_mixtral(out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides):
  """A random `MixtralForCausalLM`, saved sharded."""
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM

  torch.manual_seed(seed)
  model = MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, **overrides}))
  return _finish_real(model, out_dir, seed, max_shard_size)


# --- DeepSeekMoE (model_type 'deepseek', remote code) -------------------------


def deepseek_is_moe_layer(config: dict, layer: int) -> bool:
  """The remote code's rule: MoE iff routed experts exist, i >= first_k_dense_replace, i % freq == 0."""
  return (
    config.get('n_routed_experts') is not None
    and layer >= config['first_k_dense_replace']
    and layer % config.get('moe_layer_freq', 1) == 0
  )


def deepseek_config(**overrides) -> dict:
  """A `config.json` dict as a DeepSeekMoE Hub snapshot has it (tiny by default)."""
  config = dict(TINY_DEEPSEEK, **overrides)
  return dict(
    architectures=['DeepseekForCausalLM'],
    auto_map=dict(DEEPSEEK_AUTO_MAP),
    model_type='deepseek',
    rope_scaling=None,
    attention_dropout=0.0,
    initializer_range=0.02,
    pretraining_tp=1,
    use_cache=True,
    torch_dtype='float32',
    **config,
  )


def _deepseek_moe_block(config: dict):
  """transformers' `DeepseekV2Moe` set to DeepSeekMoE-16B routing.

  Its router (`DeepseekV2TopkRouter`, 5.24) computes softmax(x @ W.T) in
  float32, greedy top-k (topk_method 'greedy': no group limit), times
  routed_scaling_factor (1.0 here) and never renormalizes (the V2 class has no
  norm_topk_prob branch at all); the shared MLP has width
  moe_intermediate_size * n_shared_experts and is added ungated.
  """
  from transformers import DeepseekV2Config
  from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

  if config.get('norm_topk_prob'):
    raise NotImplementedError('DeepseekV2Moe cannot renormalize the top-k weights')
  if config.get('scoring_func', 'softmax') != 'softmax':
    raise NotImplementedError(f'scoring_func {config["scoring_func"]!r}')
  v2 = DeepseekV2Config(
    vocab_size=config['vocab_size'],
    hidden_size=config['hidden_size'],
    intermediate_size=config['intermediate_size'],
    num_attention_heads=config['num_attention_heads'],
    moe_intermediate_size=config['moe_intermediate_size'],
    n_routed_experts=config['n_routed_experts'],
    n_shared_experts=config['n_shared_experts'],
    num_experts_per_tok=config['num_experts_per_tok'],
    hidden_act=config['hidden_act'],
    topk_method='greedy',
    routed_scaling_factor=1.0,
    n_group=None,
    topk_group=None,
    norm_topk_prob=False,
    mlp_bias=False,
  )
  v2._experts_implementation = 'eager'
  return DeepseekV2Moe(v2)


def build_deepseek_reference(config: dict):
  """An (unrandomized) torch DeepSeekMoE reference for a remote-style config dict.

  A `LlamaForCausalLM` (LLaMA attention, RMSNorm, rotate-half RoPE, dense
  SwiGLU MLP) whose MoE layers' `mlp` is a `DeepseekV2Moe`. Its
  forward(input_ids, attention_mask).logits are the model's logits. Its
  state_dict has the fused expert tensors (`mlp.experts.gate_up_proj`
  [E, 2F, D], `mlp.experts.down_proj` [E, D, F]); the files hold the remote
  code's per-expert names (`deepseek_to_remote_names`).
  """
  from transformers import LlamaConfig, LlamaForCausalLM

  llama = LlamaConfig(
    vocab_size=config['vocab_size'],
    hidden_size=config['hidden_size'],
    intermediate_size=config['intermediate_size'],
    num_hidden_layers=config['num_hidden_layers'],
    num_attention_heads=config['num_attention_heads'],
    num_key_value_heads=config.get('num_key_value_heads') or config['num_attention_heads'],
    hidden_act=config['hidden_act'],
    max_position_embeddings=config['max_position_embeddings'],
    rms_norm_eps=config['rms_norm_eps'],
    rope_parameters={'rope_type': 'default', 'rope_theta': float(config['rope_theta'])},
    tie_word_embeddings=config['tie_word_embeddings'],
    attention_bias=config.get('attention_bias', False),
    mlp_bias=False,
    pad_token_id=config.get('pad_token_id'),
    bos_token_id=config.get('bos_token_id'),
    eos_token_id=config.get('eos_token_id'),
  )
  if config.get('rope_scaling'):
    raise NotImplementedError('rope_scaling')
  model = LlamaForCausalLM(llama)
  model.set_attn_implementation('eager')
  for i, layer in enumerate(model.model.layers):
    if deepseek_is_moe_layer(config, i):
      layer.mlp = _deepseek_moe_block(config)
  return model.float().eval()


def deepseek_to_remote_names(state: dict, n_routed: int) -> dict:
  """Reference state dict -> the remote code's tensor names (per-expert weights)."""
  out = {}
  for name, t in state.items():
    if name.endswith('mlp.experts.gate_up_proj'):
      prefix = name[: -len('gate_up_proj')]
      f = t.shape[1] // 2
      for e in range(n_routed):
        out[f'{prefix}{e}.gate_proj.weight'] = t[e, :f]
        out[f'{prefix}{e}.up_proj.weight'] = t[e, f:]
    elif name.endswith('mlp.experts.down_proj'):
      prefix = name[: -len('down_proj')]
      for e in range(n_routed):
        out[f'{prefix}{e}.down_proj.weight'] = t[e]
    else:
      out[name] = t
  return out


def deepseek_from_remote_names(tensors: dict, n_routed: int) -> dict:
  """The inverse of `deepseek_to_remote_names` (stacks per-expert weights)."""
  import torch

  out, experts = {}, {}
  for name, t in tensors.items():
    head, sep, rest = name.partition('.mlp.experts.')
    if sep:
      e, proj = rest.split('.', 1)
      experts.setdefault(head, {})[(int(e), proj)] = t
    else:
      out[name] = t
  for head, ws in experts.items():
    gate_up = [
      torch.cat([ws[(e, 'gate_proj.weight')], ws[(e, 'up_proj.weight')]]) for e in range(n_routed)
    ]
    out[f'{head}.mlp.experts.gate_up_proj'] = torch.stack(gate_up)
    out[f'{head}.mlp.experts.down_proj'] = torch.stack(
      [ws[(e, 'down_proj.weight')] for e in range(n_routed)]
    )
  return out


def _parse_size(size) -> int:
  if isinstance(size, int):
    return size
  units = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'B': 1}
  for unit, mult in units.items():
    if size.upper().endswith(unit):
      return int(float(size[: -len(unit)]) * mult)
  return int(size)


def write_sharded_safetensors(
  tensors: dict, out_dir: str, max_shard_size=DEFAULT_SHARD_SIZE
) -> list:
  """`model-0000i-of-0000n.safetensors` shards (in name order) + `model.safetensors.index.json`."""
  from safetensors.torch import save_file

  limit = _parse_size(max_shard_size)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    t = tensors[name].detach().contiguous().clone()
    nbytes = t.numel() * t.element_size()
    if current and size + nbytes > limit:
      shards.append(current)
      current, size = {}, 0
    current[name] = t
    size += nbytes
  shards.append(current)
  os.makedirs(out_dir, exist_ok=True)
  weight_map, total, files = {}, 0, []
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(out_dir, fname), metadata={'format': 'pt'})
    files.append(fname)
    for name, t in shard.items():
      weight_map[name] = fname
      total += t.numel() * t.element_size()
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return files


def _weight_files(directory: str) -> list:
  """The safetensors files of a folder: the shards its index lists, or `model.safetensors`.

  (c3po_jax.ckpts.hf_snapshot.hf_weight_files does this with checks, but pulls in
  JAX and the OLMoE model; these references stay torch-only.)
  """
  index = os.path.join(directory, 'model.safetensors.index.json')
  if not os.path.exists(index):
    return [os.path.join(directory, 'model.safetensors')]
  with open(index) as f:
    files = sorted(set(json.load(f)['weight_map'].values()))
  return [os.path.join(directory, fname) for fname in files]


def read_safetensors_dir(directory: str) -> dict:
  """All tensors of a checkpoint folder (sharded with an index, or one file)."""
  from safetensors.torch import load_file

  out = {}
  for path in _weight_files(directory):
    out.update(load_file(path))
  return out


def saved_tensor_shapes(directory: str) -> dict:
  """{name: shape} of the tensors a checkpoint folder holds (reads headers only)."""
  from safetensors import safe_open

  shapes = {}
  for path in _weight_files(directory):
    with safe_open(path, 'pt') as f:
      for name in f.keys():
        shapes[name] = tuple(f.get_slice(name).get_shape())
  return shapes


def save_tiny_deepseek(out_dir: str, seed: int = 0, max_shard_size=DEFAULT_SHARD_SIZE, **overrides):
  """A random DeepSeekMoE reference saved as a `deepseek-moe-16b-base` snapshot looks.

  Writes `config.json` (model_type 'deepseek', the remote config's field
  names) and safetensors shards + index under the remote code's tensor names.
  Returns (torch reference, config dict); `load_tiny_deepseek(out_dir)`
  rebuilds the same reference from the files.
  """
  import torch

  config = deepseek_config(**overrides)
  torch.manual_seed(seed)
  model = build_deepseek_reference(config)
  perturb_(model, seed)
  state = model.state_dict()
  if config['tie_word_embeddings']:
    state.pop('lm_head.weight', None)
  write_sharded_safetensors(
    deepseek_to_remote_names(state, config['n_routed_experts']), out_dir, max_shard_size
  )
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return model, config


def load_tiny_deepseek(directory: str):
  """(torch reference, config dict) rebuilt from a `save_tiny_deepseek` folder."""
  with open(os.path.join(directory, 'config.json')) as f:
    config = json.load(f)
  model = build_deepseek_reference(config)
  state = deepseek_from_remote_names(read_safetensors_dir(directory), config['n_routed_experts'])
  strict = not config['tie_word_embeddings']
  model.load_state_dict(state, strict=strict)
  return model, config


# --- The routing maths, written out ------------------------------------------


def moe_by_hand(
  x,
  router_weight,
  experts,
  top_k: int,
  renormalize: bool,
  shared=None,
  shared_gate=None,
):
  """A loop-over-tokens-and-experts MoE (numpy float64), the maths of the docstring.

  x [N, D]; router_weight [E, D]; experts: E tuples (gate [F, D], up [F, D],
  down [D, F]); shared: one such tuple or None; shared_gate: [1, D] (Qwen2-MoE's
  sigmoid gate) or None (ungated). Returns y [N, D] and the router
  probabilities [N, E].
  """
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(router_weight, np.float64).T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)

  def swiglu(w, v):
    g, u, d = (np.asarray(a, np.float64) for a in w)
    h = g @ v
    return d @ (h / (1.0 + np.exp(-h)) * (u @ v))

  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    chosen = np.argsort(-probs[n], kind='stable')[:top_k]
    weights = probs[n, chosen]
    if renormalize:
      weights = weights / weights.sum()
    for e, w in zip(chosen, weights):
      y[n] += w * swiglu(experts[e], x[n])
    if shared is not None:
      s = swiglu(shared, x[n])
      if shared_gate is not None:
        s = s / (1.0 + np.exp(-(np.asarray(shared_gate, np.float64) @ x[n])))
      y[n] += s
  return y, probs
