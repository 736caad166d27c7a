"""DeepSeek-V2, DeepSeek-V3 and FlexOlmo against transformers, through our converter and loader.

As `test_families.py` for the older families: each tiny random transformers
model (`c3po_jax.testing.hf_mla_families`: YaRN RoPE, group-limited routing,
routed scaling, V3's sigmoid scores with a random correction bias; FlexOlmo's
OLMo-2 norm order) is saved in several shards, converted, loaded and
compared on logits at every real token of right- and left-padded rows; the
routers alone against transformers' router modules; identity pathways;
cached decode and the prefix window against the full forward; the published
full-size configs against the HF tensors on the meta device; and the C3PO
pipeline on a tiny snapshot of each family.

Dimensions: B batch, T tokens, U window tokens, V vocab, E experts, K top-k.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from c3po_jax.ckpts import hf_snapshot  # noqa: E402
from c3po_jax.testing import family_checks as checks  # noqa: E402
from c3po_jax.testing import hf_mla_families as hf  # noqa: E402
from c3po_jax.testing.hf_models import padded_batch  # noqa: E402
from models import decode, expert_choice, families, prefix, transformer  # noqa: E402
from models.families import deepseek_v2, flex_olmo  # noqa: E402

TOL = 1e-5  # float32 vs PyTorch float32 (measured: <= 5.1e-6)
FAMILIES = list(hf.BUILDERS)
TINY = {
  'deepseek_v2': hf.TINY_DEEPSEEK_V2,
  'deepseek_v3': hf.TINY_DEEPSEEK_V3,
  'flex_olmo': hf.TINY_FLEX_OLMO,
}
LENGTHS, T = [9, 6, 3], 9

# Jitted once here: eagerly each primitive would compile on its own (hundreds of programs).
_forward = jax.jit(transformer.forward, static_argnames=('config', 'pathway_mode'))
_forward_hidden = jax.jit(transformer.forward_hidden, static_argnames=('config', 'pathway_mode'))
_prepare = jax.jit(prefix.prepare, static_argnums=(1, 2, 6))  # config, first layer, window
_window_forward = jax.jit(prefix.window_forward, static_argnums=(1, 2, 5))  # ..., pathway_mode
_prefill = jax.jit(decode.prefill, static_argnames=('config', 'cache_size', 'pathway_mode'))
_decode_step = jax.jit(decode.decode_step, static_argnames=('config',))


def _tiny_config(family):
  return families.from_hf_config({**TINY[family], 'model_type': family})


@functools.cache
def _random_params(family, seed=0):
  """Random params of the tiny config, large enough that routing varies."""
  config = _tiny_config(family)
  params = transformer.init_params(config, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))

  def draw(p):
    noise = jax.random.normal(next(keys), p.shape, p.dtype)
    return 1.0 + 0.1 * noise if p.ndim == 1 else 0.2 * noise

  params = jax.tree.map(draw, params)
  return config, params


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  return checks.converter(tmp_path_factory, hf.BUILDERS)


@pytest.mark.slow
@pytest.mark.parametrize('left', [False, True], ids=['right', 'left'])
@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_the_transformers_reference(converted, family, left):
  model, _, _, _, config, params = converted(family)
  tokens, mask = padded_batch(3, config.vocab_size, LENGTHS, T, 0, left)
  want = checks.reference_logits(model, tokens, mask)
  got = _forward(params, jnp.asarray(tokens), config=config, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  diff = float(np.max(np.abs(np.asarray(got.logits)[real] - want[real])))
  print(f'\n{family}/{"left" if left else "right"}: max |dlogit| {diff:.2e}')
  assert np.std(want[real]) > 0.1  # the reference is not degenerate
  assert diff <= TOL


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_every_hf_tensor_consumed_exactly_once(converted, family):
  _, hf_dir, hf_config, result, config, _ = converted(family)
  with open(os.path.join(hf_dir, hf_snapshot.SAFETENSORS_INDEX)) as f:
    index = json.load(f)
  assert len(set(index['weight_map'].values())) >= 2  # sharded
  assert sorted(result.consumed) == sorted(index['weight_map'])
  assert config == families.from_hf_config(hf_config) == _tiny_config(family)
  assert families.from_hf_config(families.to_hf_config(config)) == config


def test_family_differences_are_in_the_configs():
  v2, v3, fo = (_tiny_config(f) for f in FAMILIES)
  assert v2.kv_lora_rank and v2.q_lora_rank is None and v2.v_head_dim != v2.head_dim
  assert v2.n_group == 4 and v2.group_score == 'max' and v2.scoring_func == 'softmax'
  assert dict(v2.rope_scaling)['rope_type'] == 'yarn' and v2.rope_interleave
  assert v3.q_lora_rank and v3.scoring_func == 'sigmoid' and v3.score_correction_bias
  assert v3.group_score == 'top2_sum' and v3.norm_topk_prob and v3.routed_scaling_factor == 2.5
  assert fo.post_norm and fo.qk_norm == 'full' and not fo.norm_topk_prob


@pytest.mark.parametrize('family', ['deepseek_v2', 'deepseek_v3'])
def test_router_equals_the_transformers_router(family):
  """`expert_choice` on random rows == DeepseekV{2,3}TopkRouter (indices and weights)."""
  import transformers

  tiny = TINY[family]
  hf_config = transformers.AutoConfig.for_model(family, **tiny)
  cls = {'deepseek_v2': 'DeepseekV2TopkRouter', 'deepseek_v3': 'DeepseekV3TopkRouter'}[family]
  module = getattr(getattr(transformers.models, family), f'modeling_{family}')
  router = getattr(module, cls)(hf_config)
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
    if family == 'deepseek_v3':
      router.e_score_correction_bias.copy_(0.3 * torch.randn(8, generator=gen))
    x = torch.randn(64, 32, generator=gen)
    _, want_w, want_i = router(x)
  config = families.from_hf_config({**tiny, 'model_type': family})
  logits = jnp.asarray(x.numpy() @ router.weight.detach().numpy().T)
  probs = expert_choice.probabilities(logits, config)
  bias = jnp.asarray(router.e_score_correction_bias.numpy()) if family == 'deepseek_v3' else None
  w, i = expert_choice.choose(expert_choice.scores(logits, probs, config), bias, config)
  order_w, order_i = np.argsort(want_i.numpy(), -1), np.argsort(np.asarray(i), -1)
  np.testing.assert_array_equal(
    np.take_along_axis(np.asarray(i), order_i, -1), np.sort(want_i.numpy(), -1)
  )
  np.testing.assert_allclose(
    np.take_along_axis(np.asarray(w), order_i, -1),
    np.take_along_axis(want_w.numpy(), order_w, -1),
    rtol=1e-5,  # the logits' matmul: numpy vs torch float32
    atol=1e-6,
  )
  # Not degenerate: the group limit (and V3's bias) change the choice of some rows.
  plain = config.replace(n_group=1, topk_group=1, score_correction_bias=False)
  _, i_plain = expert_choice.choose(expert_choice.scores(logits, probs, plain), None, plain)
  assert (np.sort(np.asarray(i_plain), -1) != np.sort(np.asarray(i), -1)).any()


def test_sigmoid_pathway_rows_keep_each_tokens_affinity_mass():
  """V3's override: the base rows given back change nothing; a new row is scaled by the token's mass.

  For one pathway token per row (index [B]) and several (index [B, U]).
  """
  config = _tiny_config('deepseek_v3')
  logits = 2.0 * jax.random.normal(jax.random.key(7), (2, 6, config.num_experts))
  probs = expert_choice.probabilities(logits, config)
  scores = expert_choice.scores(logits, probs, config)
  for index in (jnp.asarray([4, 2]), jnp.asarray([[1, 4], [0, 2]])):
    rows = expert_choice.at(probs, index)
    got_scores, got_probs = expert_choice.override(scores, probs, index, rows, config)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(got_probs, probs, rtol=1e-6)
  uniform = jnp.ones((2, config.num_experts))
  got, _ = expert_choice.override(scores, probs, jnp.asarray([4, 2]), uniform, config)
  mass = jnp.sum(scores[0, 4])
  np.testing.assert_allclose(got[0, 4], jnp.full((config.num_experts,), mass / 8), rtol=1e-6)
  np.testing.assert_array_equal(got[0, :4], scores[0, :4])


def _native_rows(config, params, out, layer):
  """The base routing of each row's last token at `layer`: probs [B, E], chosen [B, K]."""
  idx = jnp.asarray(out.last_index)
  logits = expert_choice.at(out.router_logits[layer], idx)  # [B, E]
  probs = expert_choice.at(out.router_probs[layer], idx)
  bias = params[transformer.layer_name(layer)]['moe']['router'].get('correction_bias')
  _, chosen = expert_choice.choose(expert_choice.scores(logits, probs, config), bias, config)
  return np.asarray(probs), np.asarray(chosen)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
@pytest.mark.parametrize('family', FAMILIES)
def test_identity_pathway_is_native_routing(family, mode):
  """The base routing given back as a pathway reproduces native routing.

  Top-k mode: the token's probability row. Dense mode: that row on the
  experts the model selects (bias and group limit included), zero elsewhere.
  """
  config, params = _random_params(family)
  tokens, mask = padded_batch(5, config.vocab_size, LENGTHS, T, 0, False)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  base = _forward(params, tokens, config=config, attention_mask=mask)
  pathway = {}
  for i in config.moe_layers[-2:]:
    probs, chosen = _native_rows(config, params, base, i)
    if mode == 'dense':
      dense = np.zeros_like(probs)
      np.put_along_axis(dense, chosen, np.take_along_axis(probs, chosen, -1), -1)
      probs = dense
    pathway[i] = jnp.asarray(probs)
  out = _forward(
    params, tokens, config=config, attention_mask=mask, pathway=pathway, pathway_mode=mode
  )
  np.testing.assert_allclose(out.logits, base.logits, atol=2e-5)
  # ... and a different pathway changes the logits (the test can fail).
  moved = {i: jnp.roll(w, 1, axis=-1) for i, w in pathway.items()}
  other = _forward(
    params, tokens, config=config, attention_mask=mask, pathway=moved, pathway_mode=mode
  )
  assert not np.allclose(other.logits, base.logits, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_cached_decode_matches_full_forward(family):
  """MLA's expanded key/value cache (Dv != Dqk) and the post-norm layer decode like a full pass."""
  config, params = _random_params(family)
  tokens, mask = padded_batch(1, config.vocab_size, [7, 4], 7, 0, False)
  fed = np.random.default_rng(1).integers(3, config.vocab_size, (2, 3))
  logits, cache, _ = _prefill(
    params, jnp.asarray(tokens), config=config, attention_mask=jnp.asarray(mask), cache_size=10
  )
  got = [logits]
  for s in range(3):
    logits, cache = _decode_step(params, cache, jnp.asarray(fed[:, s]), config=config)
    got.append(logits)
  for b, n in enumerate([7, 4]):
    seq = np.concatenate([tokens[b, :n], fed[b]])[None]
    full = _forward(params, jnp.asarray(seq), config=config).logits[0, n - 1 :]
    np.testing.assert_allclose(np.stack([g[b] for g in got]), full, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
@pytest.mark.parametrize('family', FAMILIES)
def test_prefix_window_equals_the_full_forward(family, mode):
  """The prefix-cached window (NGD's step) == the full forward at the window's tokens."""
  config, params = _random_params(family)
  tokens, mask = padded_batch(2, config.vocab_size, [9, 7], T, 0, False)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  start, u, first = jnp.asarray([5, 3]), 3, config.moe_layers[-2]
  w = jax.random.uniform(jax.random.key(4), (2, config.num_experts))
  pathway = {i: w for i in config.moe_layers[-2:]}
  st = _prepare(params, config, first, tokens, mask, start, u)
  got = _window_forward(params, config, first, st, pathway, mode)  # [B, U, D]
  full = _forward_hidden(
    params,
    tokens,
    config=config,
    attention_mask=mask,
    pathway=pathway,
    pathway_mode=mode,
    pathway_index=start,
  ).hidden
  want = jnp.stack([full[b, int(s) : int(s) + u] for b, s in enumerate(start)])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# ---- full-size configs: layout, counts, nothing allocated ----

FULL = {
  'deepseek-ai/DeepSeek-V2-Lite': (deepseek_v2.DEEPSEEK_V2_LITE, 15_706_484_224),
  'deepseek-ai/DeepSeek-V3': (deepseek_v2.DEEPSEEK_V3_671B, 671_026_419_200),
  'allenai/FlexOlmo-7x7B-1T': (flex_olmo.FLEXOLMO_7X7B_1T, 33_270_665_216),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(FULL))
def test_full_size_config_layout_equals_the_hf_tensors(name):
  """The published config.json gives our preset; its HF tensors fill our layout exactly."""
  preset, count = FULL[name]
  assert families.from_hf_config(hf.FULL_SIZE_HF_CONFIGS[name]) == preset
  hf_shapes = checks.hf_meta_shapes(hf.FULL_SIZE_HF_CONFIGS[name])
  assert checks.full_size_layout(preset, hf_shapes) == count
  print(f'\n{name}: {count:,} parameters')


@pytest.mark.parametrize(
  'preset',
  [
    'deepseek-v2-lite',
    pytest.param('deepseek-v2', marks=pytest.mark.slow),
    pytest.param('deepseek-v3', marks=pytest.mark.slow),
    'flexolmo-7x7b-1t',
  ],
)
def test_full_size_forward_eval_shape(preset):
  config = families.PRESETS[preset]
  checks.forward_eval_shape(config)


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_c3po_runs_on_the_family_and_identity_keeps_base(tmp_path, family):
  """The whole pipeline on a tiny HF snapshot of the family (real OLMoE-tokenized data).

  Kernel regression with alpha = 1 gives back each sample's base pathway, so
  its scores equal base's; NGD runs on the last two MoE layers.
  """
  hf_dir = str(tmp_path / 'hf')
  hf.BUILDERS[family](hf_dir, vocab_size=50304)
  checks.pipeline_keeps_base(hf_dir, str(tmp_path))


def _write_shards(state: dict, out_dir, config: dict) -> None:
  """torch tensors -> two safetensors shards with an index, and config.json."""
  from safetensors.torch import save_file

  os.makedirs(out_dir, exist_ok=True)
  names = sorted(state)
  halves = {'a.safetensors': names[::2], 'b.safetensors': names[1::2]}
  for shard, part in halves.items():
    save_file({n: state[n].contiguous() for n in part}, os.path.join(out_dir, shard))
  weight_map = {n: shard for shard, part in halves.items() for n in part}
  with open(os.path.join(out_dir, hf_snapshot.SAFETENSORS_INDEX), 'w') as f:
    json.dump({'weight_map': weight_map}, f)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(config, f)


@pytest.mark.slow
def test_fp8_checkpoint_with_mtp_layer_converts(tmp_path):
  """DeepSeek-V3 as published: FP8 weights with 128 x 128 block scale_inv, an MTP layer.

  Every FP8 weight is read as fp8 * scale_inv (the tree equals one built from
  the dequantized float32 tensors), and the multi-token-prediction layer
  (`num_nextn_predict_layers`) is skipped.
  """
  from safetensors.torch import load_file

  from c3po_jax.ckpts import fp8
  from models import hf_mapping

  _, config = hf.save_tiny_deepseek_v3(str(tmp_path / 'f32'))
  state = {}
  for shard in sorted(os.listdir(tmp_path / 'f32')):
    if shard.endswith('.safetensors'):
      state.update(load_file(str(tmp_path / 'f32' / shard)))
  num_layers = config['num_hidden_layers']
  state[f'model.layers.{num_layers}.eh_proj.weight'] = torch.randn(32, 64)  # the MTP layer
  state[f'model.layers.{num_layers}.enorm.weight'] = torch.ones(32)
  stored, dequantized = {}, {}
  gen = torch.Generator().manual_seed(5)
  for name, t in state.items():
    quantize = t.ndim == 2 and 'proj' in name  # DeepSeek keeps embeddings, norms, router in bf16
    if not quantize:
      stored[name] = dequantized[name] = t
      continue
    blocks = (-(-t.shape[0] // fp8.BLOCK), -(-t.shape[1] // fp8.BLOCK))
    scale_inv = 0.5 + torch.rand(blocks, generator=gen)
    full = scale_inv.repeat_interleave(fp8.BLOCK, 0).repeat_interleave(fp8.BLOCK, 1)
    q = (t / full[: t.shape[0], : t.shape[1]]).to(torch.float8_e4m3fn)
    stored[name], stored[name + '_scale_inv'] = q, scale_inv
    dequantized[name] = q.float() * full[: t.shape[0], : t.shape[1]]
  _write_shards(stored, tmp_path / 'fp8', dict(config, num_nextn_predict_layers=1))

  hf_ckpt = hf_snapshot.read_hf_checkpoint(str(tmp_path / 'fp8'), 'float32')
  assert sorted(hf_ckpt.skipped) == sorted(n for n in state if f'layers.{num_layers}.' in n)
  assembler = hf_mapping.ParamAssembler(hf_ckpt.config, np.float32)
  for name, t in dequantized.items():
    if f'layers.{num_layers}.' not in name:
      assembler.add(name, t.numpy())
  jax.tree.map(np.testing.assert_array_equal, hf_ckpt.params, assembler.finish())
  # A scale without its weight is refused with one line.
  del stored['model.layers.1.self_attn.kv_b_proj.weight']
  _write_shards(stored, tmp_path / 'broken', dict(config, num_nextn_predict_layers=1))
  with pytest.raises(hf_mapping.ConversionError, match='has no FP8 tensor'):
    hf_snapshot.read_hf_checkpoint(str(tmp_path / 'broken'), 'float32')
