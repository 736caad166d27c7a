"""The HF -> Orbax converter and the loader: errors, atomic saves, full-size layout.

Bad inputs must raise a clear CheckpointError / ConversionError naming the file
or tensor and leave nothing loadable behind. The full OLMoE-1B-7B-0924 layout
is checked without allocating its 14 GB: abstract shapes through `eval_shape`,
and HF tensors as zero-byte numpy arrays fed through the real ParamAssembler.

Dimensions: D model, V vocab, E experts, F expert hidden.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.ckpts import checkpoint, convert, hf_snapshot
from c3po_jax.testing.hf_models import hf_tensor_shapes, make_hf_model, save_hf_model
from models import hf_mapping, transformer
from models.families.olmoe import OLMOE_1B_7B_0924

ConversionError = hf_mapping.ConversionError
CheckpointError = checkpoint.CheckpointError
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny sharded HF snapshot with (dummy) tokenizer files."""
  model, _ = make_hf_model(seed=1)
  path = save_hf_model(model, str(tmp_path_factory.mktemp('hf') / 'snapshot'))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    with open(os.path.join(path, name), 'w') as f:
      json.dump({'name': name}, f)
  return path


@pytest.fixture(scope='module')
def good_ckpt(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('good') / 'ckpt')
  convert.convert(hf_dir, out, dtype='float32')
  return out


def _copy(src: str, dst) -> str:
  return shutil.copytree(src, str(dst))


def _shard_of(hf: str, name: str) -> str:
  with open(os.path.join(hf, hf_snapshot.SAFETENSORS_INDEX)) as f:
    return os.path.join(hf, json.load(f)['weight_map'][name])


def _edit_shard(hf: str, name: str, edit) -> None:
  """Rewrites the shard holding `name` with edit(dict of tensors) applied."""
  from safetensors.numpy import load_file, save_file

  path = _shard_of(hf, name)
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def _edit_config(hf: str, **changes) -> None:
  path = os.path.join(hf, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, 'w') as f:
    json.dump(config, f)


def _remove_weights(hf: str) -> None:
  for name in os.listdir(hf):
    if name.endswith('.safetensors') or name == hf_snapshot.SAFETENSORS_INDEX:
      os.remove(os.path.join(hf, name))


def _pickle_only(hf: str) -> None:
  _remove_weights(hf)
  _write(os.path.join(hf, 'pytorch_model.bin'), b'not really a pickle')


def _truncate(hf: str) -> None:
  path = _shard_of(hf, 'model.layers.1.self_attn.q_proj.weight')
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def _garbage(hf: str) -> None:
  _write(_shard_of(hf, 'model.norm.weight'), b'\xff' * 64)


Q1 = 'model.layers.1.self_attn.q_proj.weight'
UP = 'model.layers.0.mlp.experts.3.up_proj.weight'
BAD_INPUTS = {
  'missing_dir': (lambda hf: shutil.rmtree(hf), CheckpointError, 'does not exist'),
  'no_config': (lambda hf: os.remove(f'{hf}/config.json'), CheckpointError, 'no config.json'),
  'bad_json': (
    lambda hf: _write(f'{hf}/config.json', b'{'),
    CheckpointError,
    'cannot read .*config.json',
  ),
  'not_olmoe': (lambda hf: _edit_config(hf, model_type='llama'), CheckpointError, "'llama'"),
  'no_weights': (_remove_weights, CheckpointError, 'no model.safetensors'),
  'pickle_only': (_pickle_only, CheckpointError, 'pytorch_model.bin.*safetensors'),
  'missing_shard': (
    lambda hf: os.remove(_shard_of(hf, Q1)),
    CheckpointError,
    r'shard .*model-\d+-of-\d+\.safetensors listed in .* does not exist',
  ),
  'truncated_shard': (_truncate, CheckpointError, r'cannot read safetensors file .*model-\d+'),
  'corrupt_shard': (_garbage, CheckpointError, r'cannot read safetensors file .*model-\d+'),
  'missing_tensor': (
    lambda hf: _edit_shard(hf, Q1, lambda t: t.pop(Q1)),
    ConversionError,
    'missing tensors for: layer_1/attn/q',
  ),
  'missing_expert': (
    lambda hf: _edit_shard(hf, UP, lambda t: t.pop(UP)),
    ConversionError,
    r'layer_0/moe/experts/up experts \[3\]',
  ),
  'unexpected_tensor': (
    lambda hf: _edit_shard(
      hf, Q1, lambda t: t.update({'model.layers.0.mlp.shared_expert.weight': t[Q1]})
    ),
    ConversionError,
    "unexpected tensor 'model.layers.0.mlp.shared_expert.weight' \\(in model-",
  ),
  'layer_beyond_config': (
    lambda hf: _edit_shard(hf, Q1, lambda t: t.update({Q1.replace('.1.', '.7.'): t[Q1]})),
    ConversionError,
    "unexpected tensor 'model.layers.7.self_attn.q_proj.weight'",
  ),
  'misshaped_tensor': (
    lambda hf: _edit_shard(hf, Q1, lambda t: t.update({Q1: t[Q1][:, :-1].copy()})),
    ConversionError,
    f"tensor '{Q1}' \\(in model-.*\\) has shape \\(32, 31\\)",
  ),
  'duplicate_tensor': (
    lambda hf: _edit_shard(hf, UP, lambda t: t.update({Q1: np.zeros((32, 32), np.float32)})),
    ConversionError,
    'fills layer_1/attn/q twice',
  ),
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_raises_clear_error_and_writes_nothing(hf_dir, tmp_path, case):
  mutate, error, pattern = BAD_INPUTS[case]
  hf = _copy(hf_dir, tmp_path / 'hf')
  mutate(hf)
  out_root = tmp_path / 'out'
  out_root.mkdir()
  with pytest.raises(error, match=pattern):
    convert.convert(hf, str(out_root / 'ckpt'), dtype='float32')
  assert os.listdir(out_root) == []
  with pytest.raises(error, match=pattern):  # The in-memory path says the same.
    checkpoint.load_checkpoint(hf)


def test_errors_are_value_errors():
  assert issubclass(CheckpointError, ConversionError)
  assert issubclass(ConversionError, ValueError)


def test_existing_output_needs_overwrite(hf_dir, good_ckpt, tmp_path):
  out = _copy(good_ckpt, tmp_path / 'ckpt')
  with pytest.raises(CheckpointError, match='already exists.*overwrite'):
    convert.convert(hf_dir, out, dtype='float32')
  convert.convert(hf_dir, out, dtype='bfloat16', overwrite=True)
  _, params = checkpoint.load_checkpoint(out)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert sorted(os.listdir(tmp_path)) == ['ckpt']  # No temporary siblings left.


def _failing_orbax_save(path, params):
  real_orbax_save(path, params)  # Parameters fully written, then the crash.
  raise RuntimeError('simulated crash while saving')


real_orbax_save = checkpoint._orbax_save


@pytest.mark.parametrize('cleanup', [True, False], ids=['exception', 'killed'])
def test_interrupted_save_leaves_nothing_loadable(good_ckpt, tmp_path, monkeypatch, cleanup):
  config, params = checkpoint.load_checkpoint(good_ckpt)
  old = _copy(good_ckpt, tmp_path / 'old')
  monkeypatch.setattr(checkpoint, '_orbax_save', _failing_orbax_save)
  if not cleanup:  # A killed process runs no cleanup code.
    monkeypatch.setattr(checkpoint, '_remove_tree', lambda path: None)
  for target, overwrite in ((tmp_path / 'new', False), (old, True)):
    with pytest.raises(RuntimeError, match='simulated'):
      checkpoint.save_checkpoint(str(target), config, params, overwrite=overwrite)
  assert not os.path.exists(tmp_path / 'new')
  leftovers = sorted(set(os.listdir(tmp_path)) - {'old'})
  assert bool(leftovers) != cleanup
  for name in leftovers:
    with pytest.raises(CheckpointError, match='incomplete'):
      checkpoint.load_checkpoint(str(tmp_path / name))
  _, restored = checkpoint.load_checkpoint(old)  # The overwritten one is intact.
  jax.tree.map(np.testing.assert_array_equal, restored, params)


def _rm_data(ckpt: str) -> None:
  for root, _, files in os.walk(os.path.join(ckpt, checkpoint.PARAMS_DIR)):
    for name in files:
      if os.path.basename(root) == 'd':
        os.remove(os.path.join(root, name))


def _truncate_largest_param_file(ckpt: str) -> None:
  files = [os.path.join(r, f) for r, _, fs in os.walk(f'{ckpt}/params') for f in fs]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def _edit_meta(ckpt: str, **changes) -> None:
  path = os.path.join(ckpt, checkpoint.METADATA_FILE)
  with open(path) as f:
    meta = json.load(f)
  meta.update(changes)
  with open(path, 'w') as f:
    json.dump(meta, f)


BAD_CHECKPOINTS = {
  'no_metadata': (lambda c: os.remove(f'{c}/{checkpoint.METADATA_FILE}'), 'incomplete'),
  'wrong_version': (lambda c: _edit_meta(c, format_version=99), 'version 99'),
  'no_params': (lambda c: shutil.rmtree(f'{c}/params'), 'cannot read parameters'),
  'no_param_data': (_rm_data, 'cannot read parameters|is missing; the checkpoint is incomplete'),
  'truncated_param_data': (_truncate_largest_param_file, 'differs from the file written'),
  'config_mismatch': (lambda c: _edit_config(c, num_hidden_layers=4), 'does not match'),
  'no_config': (lambda c: os.remove(f'{c}/config.json'), 'no config.json'),
}


# A failed tensorstore read may call back into Orbax's event loop after it closed.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('case', list(BAD_CHECKPOINTS))
def test_corrupt_converted_checkpoint_raises(good_ckpt, tmp_path, case):
  mutate, pattern = BAD_CHECKPOINTS[case]
  ckpt = _copy(good_ckpt, tmp_path / 'ckpt')
  mutate(ckpt)
  with pytest.raises(CheckpointError, match=pattern):
    checkpoint.load_checkpoint(ckpt)


def test_converted_layout_and_roundtrip(good_ckpt, tmp_path):
  assert sorted(os.listdir(good_ckpt)) == sorted(
    [
      hf_snapshot.CONFIG_FILE,
      checkpoint.METADATA_FILE,
      checkpoint.PARAMS_DIR,
      'generation_config.json',
      'tokenizer.json',
      'tokenizer_config.json',
    ]
  )
  with open(os.path.join(good_ckpt, checkpoint.METADATA_FILE)) as f:
    assert json.load(f)['dtype'] == 'float32'
  config, params = checkpoint.load_checkpoint(good_ckpt)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = checkpoint.save_checkpoint(str(tmp_path / 'again'), config, params)
  for shardings in (device, jax.tree.map(lambda _: device, params)):
    config2, params2 = checkpoint.load_checkpoint(out, shardings=shardings)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert all(x.sharding == device for x in jax.tree.leaves(params2))


def test_save_rejects_tree_that_does_not_match_config(good_ckpt, tmp_path):
  config, params = checkpoint.load_checkpoint(good_ckpt)
  params = dict(params, embed={'embedding': params['embed']['embedding'][:, :-1]})
  with pytest.raises(CheckpointError, match=r"mis-shaped: \['embed'\]\['embedding'\]"):
    checkpoint.save_checkpoint(str(tmp_path / 'x'), config, params)
  assert not os.path.exists(tmp_path / 'x')


def test_safetensors_reader_matches_torch(tmp_path):
  """Our reader (numpy + ml_dtypes, no torch at run time) against safetensors.torch."""
  import torch
  from safetensors.torch import load_file, save_file

  path = str(tmp_path / 'x.safetensors')
  tensors = {
    'w': torch.randn(5, 7).bfloat16(),
    'h': torch.randn(3, 2).half(),
    'n': torch.randn(4),
    'i': torch.arange(6).reshape(2, 3),
    'scalar': torch.tensor(2.5),
    'empty': torch.zeros(0, 3),
  }
  save_file(tensors, path, metadata={'format': 'pt'})
  got = dict(hf_snapshot.iter_safetensors(path))
  want = load_file(path)
  assert sorted(got) == sorted(want)
  assert got['w'].dtype == jnp.bfloat16
  for name, tensor in want.items():
    assert got[name].shape == tuple(tensor.shape)
    np.testing.assert_array_equal(got[name].astype(np.float64), tensor.double().numpy())


def test_full_config_eval_shape():
  c = OLMOE_1B_7B_0924
  out = jax.eval_shape(
    lambda p, t: transformer.forward(p, t, config=c),
    transformer.param_structs(c, jnp.bfloat16),
    jax.ShapeDtypeStruct((1, 8), jnp.int32),
  )
  assert out.logits.shape == (1, 8, 50304)
  assert out.router_probs.shape == (16, 1, 8, 64)


@pytest.mark.parametrize('on_disk', [True, False], ids=['per_expert', 'fused'])
def test_full_config_hf_tensors_fill_param_shapes_exactly(on_disk):
  """Every HF tensor of the 1B-7B config, as a zero-byte array, through the assembler."""
  c = OLMOE_1B_7B_0924
  hf_shapes = hf_tensor_shapes(c, on_disk=on_disk)
  nothing = np.dtype([])  # itemsize 0: the real shapes, no memory.
  assembler = hf_mapping.ParamAssembler(c, nothing)
  for name, shape in hf_shapes.items():
    assembler.add(name, np.empty(shape, nothing))
  placed = assembler.finish()
  assert sorted(assembler.consumed) == sorted(hf_shapes)
  assert jax.tree.map(lambda x: x.shape, placed) == transformer.param_shapes(c)
  n_params = sum(int(np.prod(s)) for s in hf_shapes.values())
  assert n_params == sum(x.size for x in jax.tree.leaves(placed))
  assert 6.8e9 < n_params < 7.0e9  # OLMoE-1B-7B: 6.9B parameters.


def test_conversion_peak_bytes_full_config():
  c = OLMOE_1B_7B_0924
  terms = convert.conversion_peak_terms(c, jnp.bfloat16, source_dtype='float32')
  n_params = sum(int(np.prod(s)) for s in hf_tensor_shapes(c).values())
  largest = max(
    int(np.prod(s)) for on_disk in (True, False) for s in hf_tensor_shapes(c, on_disk).values()
  )
  assert terms['tree'] == 2 * n_params
  assert terms['hf_tensor'] == terms['relayout'] == 4 * largest
  peak = convert.conversion_peak_bytes(c, 'bfloat16')
  assert peak == sum(terms.values()) < 16 * 2**30


@pytest.mark.slow
def test_cli(hf_dir, tmp_path):
  out = str(tmp_path / 'cli')
  cmd = [
    sys.executable,
    '-m',
    'c3po_jax.ckpts.convert',
    f'--hf_dir={hf_dir}',
    f'--output_dir={out}',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run(cmd + ['--dtype=float32'], cwd=REPO, env=env, capture_output=True)
  assert run.returncode == 0, run.stderr.decode()[-2000:]
  assert b'peak host memory' in run.stderr
  _, params = checkpoint.load_checkpoint(out)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True)
  assert again.returncode == 1
  assert again.stderr.decode().strip().endswith('already exists; pass overwrite=True (--overwrite)')
