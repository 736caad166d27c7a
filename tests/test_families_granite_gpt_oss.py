"""Granite MoE, gpt-oss and sliding-window attention against transformers.

Each tiny random reference (`c3po_jax.testing.hf_granite_gpt_oss`, and the
Mixtral / Qwen builders of `hf_families` with a sliding window switched on)
is saved in several safetensors shards, converted by our converter, loaded,
and compared on logits at every real token of right- and left-padded rows
(float32). gpt-oss is also read from the MXFP4 layout of the published
checkpoints. Run with `-s` to see the worst max |dlogit| per case.

Dimensions: B batch, T tokens, V vocab, E experts, D model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from c3po_jax.ckpts import checkpoint, convert, mxfp4  # noqa: E402
from c3po_jax.testing import family_checks as checks  # noqa: E402
from c3po_jax.testing import hf_families as hf  # noqa: E402
from c3po_jax.testing import hf_granite_gpt_oss as hfx  # noqa: E402
from c3po_jax.testing.hf_models import padded_batch  # noqa: E402
from models import decode, families, hf_mapping, prefix, transformer  # noqa: E402
from models.families import gpt_oss, granite  # noqa: E402

TOL = 1e-5
LENGTHS, T = [9, 6, 3], 9
BUILDERS = {
  'granitemoe': hfx.save_tiny_granitemoe,
  'granitemoeshared': hfx.save_tiny_granitemoeshared,
  'gpt_oss': hfx.save_tiny_gpt_oss,
  # Sliding windows shorter than the rows (3 or 4 of 9 slots).
  'mixtral_window': functools.partial(hf.save_tiny_mixtral, sliding_window=3),
  'qwen3_moe_window': functools.partial(
    hf.save_tiny_qwen3_moe, use_sliding_window=True, sliding_window=4
  ),
  'qwen2_moe_window': functools.partial(
    hf.save_tiny_qwen2_moe, use_sliding_window=True, sliding_window=3, max_window_layers=3
  ),
}
RESULTS: dict[str, float] = {}

# Jitted once here: eagerly each primitive would compile on its own (hundreds of programs).
_forward = jax.jit(transformer.forward, static_argnames=('config', 'pathway_mode'))
_forward_hidden = jax.jit(transformer.forward_hidden, static_argnames=('config', 'pathway_mode'))
_prepare = jax.jit(prefix.prepare, static_argnums=(1, 2, 6))  # config, first layer, window
_window_forward = jax.jit(prefix.window_forward, static_argnums=(1, 2, 5))  # ..., pathway_mode
_prefill = jax.jit(decode.prefill, static_argnames=('config', 'cache_size', 'pathway_mode'))
_decode_step = jax.jit(decode.decode_step, static_argnames=('config',))


@pytest.fixture(scope='module', autouse=True)
def _report():
  yield
  print('\nmax |dlogit| vs the transformers reference (float32):')
  for key, value in sorted(RESULTS.items()):
    print(f'  {key:28s} {value:.3e}')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """case -> (torch model, hf dir, hf config dict, ConversionResult, config, params)."""
  return checks.converter(tmp_path_factory, BUILDERS)


def _max_dlogit(model, config, params, left: bool) -> tuple[float, np.ndarray]:
  tokens, mask = padded_batch(3, config.vocab_size, LENGTHS, T, 0, left)
  want = checks.reference_logits(model, tokens, mask)
  got = _forward(params, jnp.asarray(tokens), config=config, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(got.logits)[real] - want[real]))), want[real]


@pytest.mark.slow
@pytest.mark.parametrize('left', [False, True], ids=['right', 'left'])
@pytest.mark.parametrize('case', list(BUILDERS))
def test_logits_match_the_transformers_reference(converted, case, left):
  model, _, _, _, config, params = converted(case)
  diff, want = _max_dlogit(model, config, params, left)
  RESULTS[f'{case}/{"left" if left else "right"}'] = diff
  assert np.std(want) > 0.1  # the reference is not degenerate
  assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize('case', list(BUILDERS))
def test_every_hf_tensor_consumed_once_and_config_round_trips(converted, case):
  model, hf_dir, hf_config, result, config, _ = converted(case)
  written = set(hf.saved_tensor_shapes(hf_dir))
  assert len(result.consumed) == len(set(result.consumed))
  assert set(result.consumed) | set(result.skipped) == written
  assert config == families.from_hf_config(hf_config)
  assert families.from_hf_config(families.to_hf_config(config)) == config


@pytest.mark.slow
def test_the_features_are_on_in_the_tiny_configs(converted):
  """What each case exercises, read from the converted configs."""
  g = converted('granitemoe')[4]
  assert g.tie_word_embeddings and g.norm_topk_prob and not g.num_shared_experts
  assert (g.embedding_multiplier, g.attention_multiplier) == (4.0, 0.3)
  assert (g.residual_multiplier, g.logits_scaling) == (0.5, 3.0)
  gs = converted('granitemoeshared')[4]
  assert gs.num_shared_experts == 1 and gs.shared_intermediate_size == 24 and gs.o_bias
  o = converted('gpt_oss')[4]
  assert o.sliding_layers == (0, 2) and o.sliding_window == 3 and o.attention_sinks
  assert o.router_bias and o.expert_bias and o.swiglu_limit == 1.0
  assert dict(o.rope_scaling)['rope_type'] == 'yarn'
  assert converted('mixtral_window')[4].sliding_layers == (0, 1, 2, 3)
  assert converted('qwen3_moe_window')[4].sliding_layers == (0, 1, 2, 3)
  assert converted('qwen2_moe_window')[4].sliding_layers == (0, 2)  # even layers < 3


@pytest.mark.slow
def test_without_the_window_the_logits_differ(converted):
  """The window matters at these lengths: full attention misses the reference."""
  model, _, _, _, config, params = converted('gpt_oss')
  diff, _ = _max_dlogit(model, config.replace(sliding_layers=()), params, False)
  assert diff > 100 * TOL


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
@pytest.mark.parametrize('case', ['granitemoe', 'granitemoeshared', 'gpt_oss'])
def test_identity_pathway_is_native_routing(converted, case, mode):
  """The base routing of the last two MoE layers given back as a pathway changes nothing.

  Top-k: the last token's router probabilities (for gpt-oss softmax of the
  biased logits). Dense: those probabilities on the top-k experts, zero
  elsewhere (renormalized by the model, as its top-k weights are).
  """
  _, _, _, _, config, params = converted(case)
  tokens, mask = padded_batch(5, config.vocab_size, LENGTHS, T, 0, False)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  base = _forward(params, tokens, config=config, attention_mask=mask)
  last = np.asarray(base.last_index)
  pathway = {}
  for i in config.moe_layers[-2:]:
    probs = np.asarray(base.router_probs[i])[np.arange(len(last)), last]  # [B, E]
    if mode == 'dense':
      top = np.argsort(-probs, axis=-1)[:, : config.num_experts_per_tok]
      w = np.zeros_like(probs)
      np.put_along_axis(w, top, np.take_along_axis(probs, top, -1), -1)
      probs = w
    pathway[i] = jnp.asarray(probs)
  out = _forward(
    params, tokens, config=config, attention_mask=mask, pathway=pathway, pathway_mode=mode
  )
  np.testing.assert_allclose(out.logits, base.logits, atol=2e-5)
  # and a different pathway does change the re-mixed token
  flipped = {i: jnp.asarray(np.roll(np.asarray(p), 3, axis=-1)) for i, p in pathway.items()}
  moved = _forward(
    params, tokens, config=config, attention_mask=mask, pathway=flipped, pathway_mode=mode
  )
  assert np.abs(np.asarray(moved.logits - base.logits)).max() > 1e-3


# ---- the prefix window and the KV cache honour windows, sinks and multipliers ----


def _everything_config():
  """gpt-oss's tiny config with Granite's multipliers on too."""
  return families.from_hf_config(
    families.to_hf_config(families.PRESETS['gpt-oss-20b'])
    | dict(hfx.TINY_GPT_OSS, num_local_experts=8, layer_types=None, quantization_config=None)
  ).replace(embedding_multiplier=2.0, residual_multiplier=0.7, logits_scaling=1.5)


def _random_params(config, seed=0):
  params = transformer.init_params(config, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
  return jax.tree.map(lambda p: 0.3 * jax.random.normal(next(keys), p.shape, p.dtype), params)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
def test_window_forward_equals_the_full_forward(mode):
  config = _everything_config()
  params = _random_params(config)
  tokens, mask = padded_batch(7, config.vocab_size, [10, 8, 6], 10, 0, False)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  start, window, first = jnp.asarray([6, 5, 3]), 3, 2
  rng = np.random.default_rng(0)
  pathway = {3: jnp.asarray(rng.uniform(0, 1, (3, config.num_experts)), jnp.float32)}
  state = _prepare(params, config, first, tokens, mask, start, window)
  got = _window_forward(params, config, first, state, pathway, mode)
  full = _forward_hidden(
    params,
    tokens,
    config=config,
    attention_mask=mask,
    pathway=pathway,
    pathway_mode=mode,
    pathway_index=start,
  )
  want = jnp.take_along_axis(full.hidden, (start[:, None] + jnp.arange(window))[..., None], 1)
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.slow
def test_cached_decode_equals_the_full_forward():
  config = _everything_config()
  params = _random_params(config)
  lengths, steps = [7, 4], 4
  tokens, mask = padded_batch(9, config.vocab_size, lengths, 7, 0, True)  # left-padded
  logits, cache, _ = _prefill(
    params,
    jnp.asarray(tokens),
    config=config,
    attention_mask=jnp.asarray(mask),
    cache_size=7 + steps,
  )
  fed = np.random.default_rng(1).integers(3, config.vocab_size, (2, steps))
  got = [logits]
  for i in range(steps):
    logits, cache = _decode_step(params, cache, jnp.asarray(fed[:, i]), config=config)
    got.append(logits)
  for b, n in enumerate(lengths):
    seq = np.concatenate([tokens[b][mask[b] == 1], fed[b]])[None]
    full = _forward(params, jnp.asarray(seq), config=config)
    np.testing.assert_allclose(np.stack(got)[:, b], full.logits[0, n - 1 :], atol=2e-5)


# ---- MXFP4 ----


def test_mxfp4_dequantization_matches_transformers_and_the_known_weights():
  rng = np.random.default_rng(0)
  codes = rng.choice(hfx.FP4_VALUES, size=(3, 64, 5))  # [E, In, Out], exactly representable
  exps = rng.integers(-4, 3, size=(3, 2, 5)).astype(np.float32)  # one per 32-input group
  known = (codes.reshape(3, 2, 32, 5) * np.exp2(exps)[:, :, None, :]).reshape(3, 64, 5)
  blocks, scales = hfx.quantize_mxfp4(known)
  assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
  assert blocks.dtype == np.uint8 and scales.dtype == np.uint8
  ours = mxfp4.dequantize(blocks, scales)
  np.testing.assert_array_equal(ours, known.astype(np.float32))
  np.testing.assert_array_equal(ours, hfx.dequantize_reference(blocks, scales))
  # Arbitrary weights: the same numbers as transformers, within FP4 of the original.
  w = rng.normal(0, 0.3, (2, 96, 7)).astype(np.float32)
  blocks, scales = hfx.quantize_mxfp4(w)
  ours = mxfp4.dequantize(blocks, scales)
  np.testing.assert_array_equal(ours, hfx.dequantize_reference(blocks, scales))
  assert 0 < np.abs(ours - w).max() < 0.25 * np.abs(w).max()


def test_mxfp4_refusals():
  pairer = mxfp4.Pairer()
  blocks = np.zeros((1, 2, 1, 16), np.uint8)
  assert list(pairer.feed('x.down_proj_blocks', blocks)) == []
  with pytest.raises(hf_mapping.ConversionError, match='has no'):
    pairer.finish()
  with pytest.raises(hf_mapping.ConversionError, match='do not pair'):
    mxfp4.dequantize(blocks, np.zeros((1, 2, 3), np.uint8))


@pytest.mark.slow
def test_an_mxfp4_snapshot_converts_to_its_dequantized_model(tmp_path):
  """The published layout: experts as blocks + scales, read back to the numbers transformers reads."""
  hf_dir = str(tmp_path / 'hf')
  model, _ = hfx.save_tiny_gpt_oss(hf_dir, intermediate_size=32)  # F, D multiples of 32
  expected = hfx.mxfp4_snapshot(hf_dir)
  names = set(hf.saved_tensor_shapes(hf_dir))
  assert 'model.layers.0.mlp.experts.gate_up_proj_blocks' in names
  assert not any(n.endswith('experts.down_proj') for n in names)
  result = convert.convert(hf_dir, str(tmp_path / 'ours'), dtype='float32')
  config, params = checkpoint.load_checkpoint(result.output_dir)
  # The reference: the float model with transformers' dequantized weights.
  state = model.state_dict()
  with torch.no_grad():
    for name, w in expected.items():
      state[name].copy_(torch.from_numpy(w))
  experts = params['layer_1']['moe']['experts']
  gate_up = expected['model.layers.1.mlp.experts.gate_up_proj']
  np.testing.assert_array_equal(experts['gate'], gate_up[..., 0::2])
  np.testing.assert_array_equal(experts['up'], gate_up[..., 1::2])
  diff, _ = _max_dlogit(model, config, params, True)
  RESULTS['gpt_oss_mxfp4/left'] = diff
  assert diff <= TOL


# ---- full size: layout and parameter counts (meta device, nothing allocated) ----

FULL = {
  'granitemoe': ('ibm-granite/granite-3.0-3b-a800m-base', granite.GRANITE_3_0_3B_A800M),
  'gpt_oss': ('openai/gpt-oss-20b', gpt_oss.GPT_OSS_20B),
}


@pytest.mark.slow
@pytest.mark.parametrize('family', list(FULL))
def test_full_size_layout_equals_the_hf_tensors(family):
  """The published config gives our preset; its HF tensors (meta device) fill our layout exactly."""
  name, preset = FULL[family]
  published = hfx.FULL_SIZE_HF_CONFIGS[name]
  assert families.from_hf_config(published) == preset
  # The dequantized model's tensors (the converter turns MXFP4 pairs into these).
  shapes = checks.hf_meta_shapes({k: v for k, v in published.items() if k != 'quantization_config'})
  if preset.tie_word_embeddings:
    del shapes['lm_head.weight']  # the embedding itself; the converter skips it
  count = checks.full_size_layout(preset, shapes)
  structs = jax.eval_shape(lambda: transformer.param_structs(preset, jnp.bfloat16))
  assert count == sum(int(np.prod(s.shape)) for s in jax.tree.leaves(structs))
  print(f'\n{name}: {count:,} parameters')
  assert count == {'granitemoe': 3_298_793_472, 'gpt_oss': 20_914_757_184}[family]


@pytest.mark.slow
@pytest.mark.parametrize('case', ['granitemoeshared', 'gpt_oss'])
def test_c3po_runs_on_the_family_and_identity_keeps_base(tmp_path, case):
  """The whole pipeline on a tiny HF snapshot (real OLMoE-tokenized data; `family_checks`)."""
  BUILDERS[case](str(tmp_path / 'hf'), vocab_size=50304)
  checks.pipeline_keeps_base(str(tmp_path / 'hf'), str(tmp_path))
