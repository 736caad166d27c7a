"""Parity with transformers through our converter and loader.

Tiny random `OlmoeForCausalLM`s are saved with `save_pretrained` in small
shards, converted by `c3po_jax.ckpts.convert.convert` (the function behind the CLI),
loaded with `load_checkpoint`, and compared with transformers on logits and
router probabilities at every real token of right- and left-padded rows.
Run with `-s` to see the worst max |dlogit| per config.

Dimensions: B batch, T tokens, V vocab, L layers, E experts.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.ckpts import checkpoint, convert, hf_snapshot
from c3po_jax.testing.hf_models import hf_reference, make_hf_model, padded_batch, save_hf_model
from models import families, transformer

TOL = 1e-4  # float32 vs PyTorch float32
CONFIGS = {
  'mha_untied': dict(num_key_value_heads=4),
  'gqa_tied_normtopk': dict(num_key_value_heads=2, tie_word_embeddings=True, norm_topk_prob=True),
  'gqa_clip': dict(num_key_value_heads=2, clip_qkv=0.05),
  'mqa_clip_tied_normtopk': dict(
    num_key_value_heads=1, clip_qkv=0.05, tie_word_embeddings=True, norm_topk_prob=True
  ),
}
LENGTHS, T = [9, 6, 3], 9
RESULTS: dict[str, float] = {}  # 'config/padding' -> max |dlogit|

_forward = jax.jit(transformer.forward, static_argnames=('config',))


@pytest.fixture(scope='module', autouse=True)
def _report():
  yield
  print('\nmax |dlogit| vs transformers (float32):')
  for key, value in sorted(RESULTS.items()):
    print(f'  {key:40s} {value:.3e}')


@functools.cache
def _hf_model(name: str):
  return make_hf_model(seed=list(CONFIGS).index(name), **CONFIGS[name])[0]


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> (hf model, hf dir, ConversionResult, config, params), built lazily."""
  cache = {}

  def get(name):
    if name not in cache:
      root = tmp_path_factory.mktemp(name)
      model = _hf_model(name)
      hf_dir = save_hf_model(model, str(root / 'hf'))
      result = convert.convert(hf_dir, str(root / 'ours'), dtype='float32')
      config, params = checkpoint.load_checkpoint(result.output_dir)
      cache[name] = (model, hf_dir, result, config, params)
    return cache[name]

  return get


def _batch(model, left: bool):
  return padded_batch(7, model.config.vocab_size, LENGTHS, T, model.config.pad_token_id, left)


def _compare(model, config, params, left: bool) -> tuple[float, float]:
  """(max |dlogit|, max |dprob|) over real tokens."""
  tokens, mask = _batch(model, left)
  ref_logits, ref_probs = hf_reference(model, tokens, mask)
  out = _forward(params, jnp.asarray(tokens), config=config, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)  # [B, T]
  d_logit = np.abs(np.asarray(out.logits) - ref_logits)[real].max()
  d_prob = np.abs(np.asarray(out.router_probs) - ref_probs)[:, real].max()
  return float(d_logit), float(d_prob)


@pytest.mark.slow
@pytest.mark.parametrize('padding', ['right', 'left'])
@pytest.mark.parametrize('name', list(CONFIGS))
def test_logits_and_router_probs_match_transformers(converted, name, padding):
  model, _, _, config, params = converted(name)
  d_logit, d_prob = _compare(model, config, params, left=padding == 'left')
  RESULTS[f'{name}/{padding}'] = d_logit
  print(f'{name}/{padding}: max |dlogit| {d_logit:.2e}, max |dprob| {d_prob:.2e}')
  assert d_logit <= TOL
  assert d_prob <= TOL


@pytest.mark.parametrize('name', list(CONFIGS))
def test_every_hf_tensor_consumed_exactly_once(converted, name):
  model, hf_dir, result, config, _ = converted(name)
  with open(os.path.join(hf_dir, hf_snapshot.SAFETENSORS_INDEX)) as f:
    written = set(json.load(f)['weight_map'])
  assert len(result.consumed) == len(set(result.consumed))
  assert set(result.consumed) | set(result.skipped) == written
  assert config == families.from_hf_config(model.config)
  assert result.copied == ('generation_config.json',)


def test_clip_qkv_is_active():
  """The clip configs must actually clip, or they test nothing."""
  import torch

  model = _hf_model('gqa_clip')
  tokens, _ = _batch(model, left=False)
  attn = model.model.layers[0].self_attn
  with torch.no_grad():
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(tokens)))
    q = attn.q_proj(h)
  assert q.abs().max() > CONFIGS['gqa_clip']['clip_qkv']


def test_load_hf_snapshot_directly_tied_with_lm_head(converted, tmp_path):
  """In-memory conversion of a single-file snapshot that also writes the tied head."""
  from safetensors.numpy import load_file, save_file

  model, hf_dir, _, want_config, want_params = converted('gqa_tied_normtopk')
  single = str(tmp_path / 'single')
  model.save_pretrained(single)  # one model.safetensors
  path = os.path.join(single, hf_snapshot.SAFETENSORS_FILE)
  tensors = load_file(path)
  assert 'lm_head.weight' not in tensors
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight']
  save_file(tensors, path)

  hf = hf_snapshot.read_hf_checkpoint(single)
  assert hf.skipped == ('lm_head.weight',)
  config, params = checkpoint.load_checkpoint(single)
  assert config == want_config
  jax.tree.map(np.testing.assert_array_equal, params, want_params)
  d_logit, _ = _compare(model, config, params, left=True)
  RESULTS['gqa_tied_normtopk/left (hf dir, in memory)'] = d_logit
  assert d_logit <= TOL


def test_load_sharded_hf_snapshot_equals_converted(converted):
  _, hf_dir, _, want_config, want_params = converted('mha_untied')
  config, params = checkpoint.load_checkpoint(hf_dir)
  assert config == want_config
  jax.tree.map(np.testing.assert_array_equal, params, want_params)


@pytest.mark.slow
def test_bfloat16_conversion_close_to_float32(converted, tmp_path):
  model, hf_dir, _, config, params32 = converted('mha_untied')
  result = convert.convert(hf_dir, str(tmp_path / 'bf16'), dtype='bfloat16')
  assert result.dtype == 'bfloat16'
  config16, params16 = checkpoint.load_checkpoint(result.output_dir)
  assert config16 == config
  assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  tokens, mask = _batch(model, left=False)
  real = mask.astype(bool)
  logits32 = np.asarray(_forward(params32, tokens, config=config, attention_mask=mask).logits)
  logits16 = np.asarray(_forward(params16, tokens, config=config, attention_mask=mask).logits)
  scale = np.abs(logits32[real]).max()
  d = np.abs(logits16 - logits32)[real].max()
  RESULTS['mha_untied/right (bf16 params vs f32)'] = float(d)
  assert d <= 0.05 * scale


def test_load_casts_dtype(converted):
  _, _, result, _, params32 = converted('mha_untied')
  _, params16 = checkpoint.load_checkpoint(result.output_dir, dtype='bfloat16')
  want = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
  jax.tree.map(np.testing.assert_array_equal, params16, want)
