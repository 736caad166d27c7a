"""The MoE families beyond OLMoE against transformers, through our converter and loader.

Each family's tiny random reference (`c3po_jax.testing.hf_families`: the real
transformers classes for Qwen3-MoE, Qwen2-MoE and Mixtral; for DeepSeekMoE,
which transformers has no class for, a LLaMA model whose MoE layers are
transformers' DeepSeek-V2 MoE block with greedy softmax top-k, no top-k
renormalization and 2 shared experts, saved under the remote code's tensor
names) is saved in several safetensors shards, converted by
`c3po_jax.ckpts.convert.convert`, loaded with `load_checkpoint`, and compared
on logits at every real token of right- and left-padded rows. For DeepSeekMoE
the pieces compared are thus: LLaMA attention, RMSNorm and RoPE (transformers'
Llama modules), the dense first layer (Llama MLP), the routed experts and the
router maths (DeepseekV2Moe, greedy, float32 softmax) and the shared experts
(DeepseekV2MLP). Run with `-s` to see the worst max |dlogit| per family.

Dimensions: B batch, T tokens, V vocab, E experts.
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
from c3po_jax.testing import hf_families as hf  # noqa: E402
from c3po_jax.testing.hf_models import padded_batch  # noqa: E402
from models import families, transformer  # noqa: E402
from models.families import deepseek, mixtral, olmoe, qwen_moe  # noqa: E402

TOL = 1e-4  # float32 vs PyTorch float32
BUILDERS = {
  'deepseek': hf.save_tiny_deepseek,
  'qwen3_moe': hf.save_tiny_qwen3_moe,
  'qwen2_moe': hf.save_tiny_qwen2_moe,
  'mixtral': hf.save_tiny_mixtral,
}
LENGTHS, T = [9, 6, 3], 9
RESULTS: dict[str, float] = {}

_forward = jax.jit(transformer.forward, static_argnames=('config', 'pathway_mode'))


@pytest.fixture(scope='module', autouse=True)
def _report():
  yield
  print('\nmax |dlogit| vs the transformers reference (float32):')
  for key, value in sorted(RESULTS.items()):
    print(f'  {key:24s} {value:.3e}')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """family -> (torch model, hf dir, hf config dict, ConversionResult, config, params)."""
  return checks.converter(tmp_path_factory, BUILDERS)


@pytest.mark.slow
@pytest.mark.parametrize('left', [False, True], ids=['right', 'left'])
@pytest.mark.parametrize('family', list(BUILDERS))
def test_logits_match_the_transformers_reference(converted, family, left):
  model, _, _, _, config, params = converted(family)
  tokens, mask = padded_batch(3, config.vocab_size, LENGTHS, T, 0, left)
  want = checks.reference_logits(model, tokens, mask)
  got = _forward(params, jnp.asarray(tokens), config=config, attention_mask=jnp.asarray(mask))
  real = mask.astype(bool)
  diff = float(np.max(np.abs(np.asarray(got.logits)[real] - want[real])))
  RESULTS[f'{family}/{"left" if left else "right"}'] = diff
  assert np.std(want[real]) > 0.1  # the reference is not degenerate
  assert diff <= TOL


@pytest.mark.parametrize('family', list(BUILDERS))
def test_every_hf_tensor_consumed_exactly_once(converted, family):
  _, hf_dir, hf_config, result, config, _ = converted(family)
  with open(os.path.join(hf_dir, hf_snapshot.SAFETENSORS_INDEX)) as f:
    index = json.load(f)
  written = set(index['weight_map'])
  assert len(set(index['weight_map'].values())) >= 2  # sharded
  assert len(result.consumed) == len(set(result.consumed))
  assert set(result.consumed) == written
  assert config == families.from_hf_config(hf_config)
  assert config.model_type == family
  # Our config written back in the family's field names reads back the same.
  assert families.from_hf_config(families.to_hf_config(config)) == config


def test_family_differences_are_in_the_configs(converted):
  ds = converted('deepseek')[4]
  assert ds.dense_layers == (0,) and ds.num_shared_experts == 2 and not ds.norm_topk_prob
  q3 = converted('qwen3_moe')[4]
  assert q3.qk_norm == 'head' and q3.head_dim != q3.hidden_size // q3.num_attention_heads
  assert q3.norm_topk_prob and q3.dense_layers
  q2 = converted('qwen2_moe')[4]
  assert q2.qkv_bias and q2.shared_expert_gate and q2.num_shared_experts == 1
  mx = converted('mixtral')[4]
  assert mx.norm_topk_prob and mx.qk_norm is None and not mx.dense_layers


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
@pytest.mark.parametrize('family', list(BUILDERS))
def test_identity_pathway_is_native_routing(converted, family, mode):
  """The base routing of the last MoE layers given back as a pathway changes nothing.

  In top-k mode exactly; in dense mode the pathway is the base top-k weights
  (zero elsewhere), which is what top-k mixes.
  """
  _, _, _, _, config, params = converted(family)
  tokens, mask = padded_batch(5, config.vocab_size, LENGTHS, T, 0, False)
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  base = _forward(params, tokens, config=config, attention_mask=mask)
  last = np.asarray(base.last_index)
  layers = config.moe_layers[-2:]
  pathway = {}
  for i in layers:
    probs = np.asarray(base.router_probs[i])[np.arange(len(last)), last]  # [B, E]
    if mode == 'dense':
      k = config.num_experts_per_tok
      top = np.argsort(-probs, axis=-1)[:, :k]
      w = np.zeros_like(probs)
      np.put_along_axis(w, top, np.take_along_axis(probs, top, -1), -1)
      probs = w
    pathway[i] = jnp.asarray(probs)
  out = _forward(
    params, tokens, config=config, attention_mask=mask, pathway=pathway, pathway_mode=mode
  )
  np.testing.assert_allclose(out.logits, base.logits, atol=2e-5)


def test_a_pathway_on_a_dense_layer_is_refused(converted):
  _, _, _, _, config, params = converted('deepseek')
  w = jnp.full((1, config.num_experts), 1.0 / config.num_experts)
  with pytest.raises(ValueError, match='dense layer'):
    transformer.forward(params, jnp.ones((1, 4), jnp.int32), config=config, pathway={0: w})


# ---- full-size configs: layout, counts, nothing allocated ----

FULL = {
  'olmoe': ('allenai/OLMoE-1B-7B-0924', olmoe.OLMOE_1B_7B_0924),
  'deepseek': ('deepseek-ai/deepseek-moe-16b-base', deepseek.DEEPSEEK_MOE_16B),
  'qwen3_moe': ('Qwen/Qwen3-30B-A3B', qwen_moe.QWEN3_30B_A3B),
  'qwen2_moe': ('Qwen/Qwen1.5-MoE-A2.7B', qwen_moe.QWEN1_5_MOE_A2_7B),
  'mixtral': ('mistralai/Mixtral-8x7B-v0.1', mixtral.MIXTRAL_8X7B),
}


@functools.cache
def _full_hf_shapes(family: str) -> dict:
  """HF tensor names and shapes of the published config, as the hub files hold them."""
  hf_config = hf.FULL_SIZE_HF_CONFIGS[FULL[family][0]]
  if family == 'deepseek':
    with torch.device('meta'):
      model = hf.build_deepseek_reference(hf_config)
    state = hf.deepseek_to_remote_names(model.state_dict(), hf_config['n_routed_experts'])
    return {name: tuple(t.shape) for name, t in state.items()}
  return checks.hf_meta_shapes(hf_config)


@pytest.mark.slow
@pytest.mark.parametrize('family', list(FULL))
def test_full_size_config_layout_equals_the_hf_tensors(family):
  """The published config.json gives our preset; its HF tensors fill our layout exactly."""
  name, preset = FULL[family]
  assert families.from_hf_config(hf.FULL_SIZE_HF_CONFIGS[name]) == preset
  count = checks.full_size_layout(preset, _full_hf_shapes(family))
  print(f'\n{name}: {count:,} parameters')
  if family == 'olmoe':
    assert count == 6_919_161_856


@pytest.mark.parametrize('family', ['deepseek', 'qwen3_moe'])
def test_full_size_forward_eval_shape(family):
  config = FULL[family][1]
  checks.forward_eval_shape(config)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['deepseek', 'qwen2_moe'])
def test_c3po_runs_on_the_family_and_identity_keeps_base(tmp_path, family):
  """The whole pipeline on a tiny HF snapshot of the family (real OLMoE-tokenized data).

  Kernel regression with alpha = 1 gives back each sample's base pathway, so
  its scores equal base's; NGD runs on the last two MoE layers (for
  DeepSeekMoE's dense first layer that is what 'last:2' counts).
  """
  hf_dir = str(tmp_path / 'hf')
  BUILDERS[family](hf_dir, vocab_size=50304)
  checks.pipeline_keeps_base(hf_dir, str(tmp_path))


@pytest.mark.parametrize(
  'flagfile',
  sorted(f for f in os.listdir(os.path.dirname(os.path.dirname(__file__))) if f.endswith('.flags')),
)
def test_flagfiles_parse_into_a_run_config(flagfile):
  """Every shipped flagfile names only real flags, with valid values."""
  from absl import flags

  from c3po_jax.run import config as run_config

  fv = flags.FlagValues()
  run_config.define_flags(fv)
  for name in ('suite', 'suite_split', 'demo'):  # main.py's own flags
    flags.DEFINE_string(name, None, '', flag_values=fv)
  root = os.path.dirname(os.path.dirname(__file__))
  fv(['prog', f'--flagfile={os.path.join(root, flagfile)}'])
  rc = run_config.from_flags(fv, **({'benchmark': '-', 'reference': ('-',)} if fv.suite else {}))
  assert rc.method.critical_layers
