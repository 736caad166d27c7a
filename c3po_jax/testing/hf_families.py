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

from c3po_jax.testing.deepseek_reference import (  # noqa: F401 (re-exported)
  build_deepseek_reference,
  deepseek_config,
  deepseek_from_remote_names,
  deepseek_is_moe_layer,
  deepseek_to_remote_names,
  load_tiny_deepseek,
  read_safetensors_dir,
  save_tiny_deepseek,
  saved_tensor_shapes,
  write_sharded_safetensors,
)
from c3po_jax.testing.hf_family_configs import (  # noqa: F401 (re-exported)
  DEFAULT_SHARD_SIZE,
  FULL_SIZE_HF_CONFIGS,
  INIT_STD,
  TINY_MIXTRAL,
  TINY_QWEN2_MOE,
  TINY_QWEN3_MOE,
  perturb_,
)


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
