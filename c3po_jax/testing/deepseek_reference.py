"""A PyTorch reference for DeepSeekMoE (model_type 'deepseek'), built from transformers modules.

transformers has no class for DeepSeekMoE-16B (remote code on the hub). The
reference is a `LlamaForCausalLM` (LLaMA attention, RMSNorm, RoPE, the dense
first layer) whose MoE layers' `mlp` is transformers' DeepSeek-V2 MoE block
with greedy softmax top-k, no top-k renormalization and shared experts. It is
saved as a hub snapshot of deepseek-moe-16b-base looks: the remote config's
field names and the remote code's tensor names, in safetensors shards.
"""

from __future__ import annotations

import json
import os

from c3po_jax.testing.hf_family_configs import (
  DEEPSEEK_AUTO_MAP,
  DEFAULT_SHARD_SIZE,
  TINY_DEEPSEEK,
  perturb_,
)


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
