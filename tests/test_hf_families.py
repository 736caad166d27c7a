"""The tiny transformers references of the MoE families (c3po_jax.testing.hf_families)."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

from c3po_jax.testing import hf_families as hf  # noqa: E402

REAL_BUILDERS = {
  'qwen3_moe': hf.save_tiny_qwen3_moe,
  'qwen2_moe': hf.save_tiny_qwen2_moe,
  'mixtral': hf.save_tiny_mixtral,
}


def _batch(vocab: int):
  """Two rows, the second right-padded."""
  rng = np.random.default_rng(0)
  ids = torch.from_numpy(rng.integers(3, vocab, (2, 7))).long()
  mask = torch.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask


# Reloaded weights are bit-identical; a padded position's logits can still
# differ in the last bit (another BLAS path on the reloaded tensors' layout).
EXACT = dict(rtol=1e-6, atol=1e-6)


def _logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask).logits


def _shards(directory):
  with open(os.path.join(directory, 'model.safetensors.index.json')) as f:
    files = set(json.load(f)['weight_map'].values())
  assert files == {f for f in os.listdir(directory) if f.endswith('.safetensors')}
  return files


def _swiglu(mlp):
  return tuple(
    getattr(mlp, n).weight.detach().numpy() for n in ('gate_proj', 'up_proj', 'down_proj')
  )


def _fused_experts(experts):
  """Per-expert (gate [F, D], up [F, D], down [D, F]) from fused [E, 2F, D] / [E, D, F]."""
  gate_up = experts.gate_up_proj.detach().numpy()
  down = experts.down_proj.detach().numpy()
  f = gate_up.shape[1] // 2
  return [(gate_up[e, :f], gate_up[e, f:], down[e]) for e in range(gate_up.shape[0])]


@pytest.mark.parametrize('family', sorted(REAL_BUILDERS))
def test_real_family_saves_shards_and_reloads(tmp_path, family):
  from transformers import AutoModelForCausalLM

  model, config = REAL_BUILDERS[family](str(tmp_path))
  assert config['model_type'] == family
  assert len(_shards(tmp_path)) >= 2
  reloaded = AutoModelForCausalLM.from_pretrained(
    str(tmp_path), attn_implementation='eager', experts_implementation='eager'
  ).eval()
  assert type(reloaded) is type(model)
  ids, mask = _batch(config['vocab_size'])
  want = _logits(model, ids, mask)
  assert torch.isfinite(want).all()
  torch.testing.assert_close(_logits(reloaded, ids, mask), want, **EXACT)


def test_shapes_the_docstring_lists(tmp_path):
  _, config = hf.save_tiny_qwen3_moe(str(tmp_path / 'q3'))
  shapes = hf.saved_tensor_shapes(str(tmp_path / 'q3'))
  assert shapes['model.layers.0.self_attn.q_norm.weight'] == (16,)
  assert shapes['model.layers.0.self_attn.q_proj.weight'] == (64, 32)
  assert shapes['model.layers.0.mlp.experts.7.down_proj.weight'] == (32, 16)
  assert shapes['model.layers.1.mlp.gate_proj.weight'] == (48, 32)  # the dense layer
  assert 'model.layers.1.mlp.gate.weight' not in shapes
  assert config['num_local_experts'] == 8 and 'num_experts' not in config  # 5.24 writes it so
  hf.save_tiny_qwen2_moe(str(tmp_path / 'q2'))
  shapes = hf.saved_tensor_shapes(str(tmp_path / 'q2'))
  assert shapes['model.layers.3.mlp.shared_expert_gate.weight'] == (1, 32)
  assert shapes['model.layers.3.mlp.shared_expert.up_proj.weight'] == (24, 32)
  assert shapes['model.layers.0.self_attn.k_proj.bias'] == (16,)
  assert 'model.layers.0.self_attn.o_proj.bias' not in shapes
  hf.save_tiny_mixtral(str(tmp_path / 'mx'))
  shapes = hf.saved_tensor_shapes(str(tmp_path / 'mx'))
  assert shapes['model.layers.0.block_sparse_moe.experts.0.w2.weight'] == (32, 16)
  assert shapes['model.layers.0.block_sparse_moe.gate.weight'] == (8, 32)


def test_deepseek_saves_remote_layout_and_reloads(tmp_path):
  model, config = hf.save_tiny_deepseek(str(tmp_path))
  assert len(_shards(tmp_path)) >= 2
  with open(tmp_path / 'config.json') as f:
    on_disk = json.load(f)
  assert on_disk == config
  assert config['model_type'] == 'deepseek' and config['architectures'] == ['DeepseekForCausalLM']
  shapes = hf.saved_tensor_shapes(str(tmp_path))
  d, f, i, e = 32, 16, 48, 8
  want = {
    'model.embed_tokens.weight': (128, d),
    'model.norm.weight': (d,),
    'lm_head.weight': (128, d),
    'model.layers.0.mlp.gate_proj.weight': (i, d),
    'model.layers.0.mlp.up_proj.weight': (i, d),
    'model.layers.0.mlp.down_proj.weight': (d, i),
  }
  for layer in range(4):
    p = f'model.layers.{layer}.'
    want[p + 'input_layernorm.weight'] = (d,)
    want[p + 'post_attention_layernorm.weight'] = (d,)
    want[p + 'self_attn.q_proj.weight'] = (d, d)
    want[p + 'self_attn.k_proj.weight'] = (d // 2, d)
    want[p + 'self_attn.v_proj.weight'] = (d // 2, d)
    want[p + 'self_attn.o_proj.weight'] = (d, d)
    if layer == 0:
      continue
    want[p + 'mlp.gate.weight'] = (e, d)
    for x in range(e):
      want[p + f'mlp.experts.{x}.gate_proj.weight'] = (f, d)
      want[p + f'mlp.experts.{x}.up_proj.weight'] = (f, d)
      want[p + f'mlp.experts.{x}.down_proj.weight'] = (d, f)
    want[p + 'mlp.shared_experts.gate_proj.weight'] = (2 * f, d)
    want[p + 'mlp.shared_experts.up_proj.weight'] = (2 * f, d)
    want[p + 'mlp.shared_experts.down_proj.weight'] = (d, 2 * f)
  assert shapes == want

  reloaded, config2 = hf.load_tiny_deepseek(str(tmp_path))
  assert config2 == config
  ids, mask = _batch(config['vocab_size'])
  expected = _logits(model, ids, mask)
  assert torch.isfinite(expected).all()
  torch.testing.assert_close(_logits(reloaded, ids, mask), expected, **EXACT)


def test_deepseek_block_is_the_stated_maths(tmp_path):
  model, config = hf.save_tiny_deepseek(str(tmp_path))
  block = model.model.layers[1].mlp
  x = torch.randn(16, config['hidden_size'], generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    got = block(x[None])[0].double().numpy()
  router = block.gate.weight.detach().numpy()
  experts = _fused_experts(block.experts)
  shared = _swiglu(block.shared_experts)
  args = (x.numpy(), router, experts, config['num_experts_per_tok'])
  want, probs = hf.moe_by_hand(*args, renormalize=False, shared=shared)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Routing is not degenerate, and the test would see a renormalization.
  assert probs.max() < 0.99 and len(set(np.argmax(probs, -1))) > 2
  renormed, _ = hf.moe_by_hand(*args, renormalize=True, shared=shared)
  assert not np.allclose(got, renormed, rtol=1e-3, atol=1e-3)
  # Layer 0 is the dense LLaMA MLP.
  assert not hasattr(model.model.layers[0].mlp, 'experts')


@pytest.mark.parametrize('family', sorted(REAL_BUILDERS))
def test_real_family_block_is_the_stated_maths(tmp_path, family):
  model, config = REAL_BUILDERS[family](str(tmp_path))
  block = model.model.layers[0].mlp
  x = torch.randn(16, config['hidden_size'], generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    got = block(x[None])[0].double().numpy()
  shared = _swiglu(block.shared_expert) if family == 'qwen2_moe' else None
  gate = block.shared_expert_gate.weight.detach().numpy() if family == 'qwen2_moe' else None
  renorm = {'qwen3_moe': True, 'qwen2_moe': False, 'mixtral': True}[family]
  assert config.get('norm_topk_prob', True) == renorm
  want, _ = hf.moe_by_hand(
    x.numpy(),
    block.gate.weight.detach().numpy(),
    _fused_experts(block.experts),
    config['num_experts_per_tok'],
    renormalize=renorm,
    shared=shared,
    shared_gate=gate,
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_full_size_configs_are_consistent():
  cfgs = hf.FULL_SIZE_HF_CONFIGS
  assert set(cfgs) == {
    'allenai/OLMoE-1B-7B-0924',
    'deepseek-ai/deepseek-moe-16b-base',
    'Qwen/Qwen3-30B-A3B',
    'Qwen/Qwen1.5-MoE-A2.7B',
    'mistralai/Mixtral-8x7B-v0.1',
  }
  for c in cfgs.values():
    assert c['hidden_size'] % c['num_attention_heads'] == 0
    assert c['num_attention_heads'] % c['num_key_value_heads'] == 0
  assert cfgs['Qwen/Qwen3-30B-A3B']['head_dim'] * 32 != cfgs['Qwen/Qwen3-30B-A3B']['hidden_size']
  # The DeepSeek tiny config carries the same keys as the published one.
  assert set(cfgs['deepseek-ai/deepseek-moe-16b-base']) <= set(hf.deepseek_config())
