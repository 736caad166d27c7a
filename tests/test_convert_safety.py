"""The converter never reads outside its input nor loses data at its output.

Weight-map entries pointing outside the snapshot are refused (hub-style
symlinked shards still work); --overwrite replaces only one of our converted
checkpoints, never the input; what a killed conversion leaves is cleaned up or
put back; non-finite weights and non-float dtypes are refused.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from c3po_jax.ckpts import checkpoint, convert, hf_snapshot
from c3po_jax.testing.hf_models import make_hf_model, save_hf_model

CheckpointError = checkpoint.CheckpointError
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = 'model.norm.weight'


@pytest.fixture(scope='module')
def hf_source(tmp_path_factory):
  model, _ = make_hf_model(seed=2)
  return save_hf_model(model, str(tmp_path_factory.mktemp('hf') / 'snapshot'))


@pytest.fixture
def hf(hf_source, tmp_path):
  return shutil.copytree(hf_source, str(tmp_path / 'snapshot'))


def _index(hf_dir: str) -> str:
  return os.path.join(hf_dir, hf_snapshot.SAFETENSORS_INDEX)


def _repoint(hf_dir: str, tensor: str, new_name: str) -> None:
  """Makes the weight map send every tensor of tensor's shard to new_name."""
  with open(_index(hf_dir)) as f:
    index = json.load(f)
  old = index['weight_map'][tensor]
  index['weight_map'] = {k: new_name if v == old else v for k, v in index['weight_map'].items()}
  with open(_index(hf_dir), 'w') as f:
    json.dump(index, f)
  return old


@pytest.mark.parametrize('entry', ['../outside/evil.safetensors', 'ABS', 'a/../../x.safetensors'])
def test_weight_map_entries_outside_the_snapshot_are_refused(hf, tmp_path, entry):
  outside = tmp_path / 'outside'
  outside.mkdir()
  with open(_index(hf)) as f:
    shard = json.load(f)['weight_map'][NORM]
  shutil.copy(os.path.join(hf, shard), outside / 'evil.safetensors')
  if entry == 'ABS':
    entry = str(outside / 'evil.safetensors')
  _repoint(hf, NORM, entry)
  with pytest.raises(CheckpointError, match='outside the snapshot directory'):
    convert.convert(hf, str(tmp_path / 'out'), dtype='float32')
  assert not os.path.exists(tmp_path / 'out')


def test_hub_style_symlinked_shards_convert(hf, tmp_path):
  """Hub cache snapshots are symlinks into ../../blobs: names are checked, not targets."""
  blobs = tmp_path / 'blobs'
  blobs.mkdir()
  for name in os.listdir(hf):
    if name.endswith('.safetensors'):
      os.rename(os.path.join(hf, name), blobs / name)
      os.symlink(os.path.relpath(blobs / name, hf), os.path.join(hf, name))
  out = convert.convert(hf, str(tmp_path / 'out'), dtype='float32')
  checkpoint.load_checkpoint(out.output_dir)


def _tree(path: str) -> dict:
  return {
    os.path.relpath(os.path.join(r, f), path): os.path.getsize(os.path.join(r, f))
    for r, _, fs in os.walk(path)
    for f in fs
  }


def test_overwrite_never_replaces_the_input(hf):
  before = _tree(hf)
  with pytest.raises(CheckpointError, match='is \\(or holds\\) the input'):
    convert.convert(hf, hf, dtype='float32', overwrite=True)
  with pytest.raises(CheckpointError, match='is \\(or holds\\) the input'):
    convert.convert(hf, os.path.dirname(hf), dtype='float32', overwrite=True)
  assert _tree(hf) == before


def test_overwrite_replaces_only_our_checkpoints(hf, tmp_path):
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'thesis.tex').write_text('years of work')
  with pytest.raises(CheckpointError, match='not a c3po-jax checkpoint'):
    convert.convert(hf, str(other), dtype='float32', overwrite=True)
  assert (other / 'thesis.tex').read_text() == 'years of work'
  empty = tmp_path / 'empty'
  empty.mkdir()
  convert.convert(hf, str(empty), dtype='float32', overwrite=True)  # an empty dir is fine
  convert.convert(hf, str(empty), dtype='bfloat16', overwrite=True)  # ours: replaced
  assert checkpoint.is_ours(str(empty))


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_stale_temporaries_of_killed_conversions_are_removed(hf, tmp_path):
  dead = tmp_path / f'.ckpt.tmp-{checkpoint._host()}-{_dead_pid()}-abc'
  live = tmp_path / f'.ckpt.tmp-{checkpoint._owner()}-def'  # this process: in use
  other_host = tmp_path / f'.ckpt.tmp-00000000-{_dead_pid()}-ghi'
  other_output = tmp_path / f'.model v2.tmp-{checkpoint._host()}-{_dead_pid()}-jkl'
  for d in (dead, live, other_host, other_output):
    d.mkdir()
    (d / 'big').write_bytes(b'x' * 100)
  convert.convert(hf, str(tmp_path / 'ckpt'), dtype='float32')
  assert not dead.exists() and not other_output.exists()
  assert live.exists() and other_host.exists()


def test_kill_between_the_two_renames_keeps_a_checkpoint(hf, tmp_path, monkeypatch):
  out = str(tmp_path / 'ckpt')
  convert.convert(hf, out, dtype='float32')
  _, want = checkpoint.load_checkpoint(out)

  def killed(src, dst):
    raise KeyboardInterrupt  # the old one is aside, the new one not yet in

  monkeypatch.setattr(checkpoint, '_rename_in', killed)
  monkeypatch.setattr(checkpoint, '_remove_tree', lambda path: None)  # killed: no cleanup
  with pytest.raises(KeyboardInterrupt):
    convert.convert(hf, out, dtype='bfloat16', overwrite=True)
  assert not os.path.exists(out)
  monkeypatch.undo()
  monkeypatch.setattr(checkpoint, '_alive', lambda pid: False)  # the killed process is gone
  _, got = checkpoint.load_checkpoint(out)  # recovered: the old checkpoint is back
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert sorted(os.listdir(tmp_path)) == ['ckpt', 'snapshot']


def test_non_finite_weights_are_refused_at_conversion(hf, tmp_path):
  from safetensors.numpy import load_file, save_file

  with open(_index(hf)) as f:
    shard = os.path.join(hf, json.load(f)['weight_map'][NORM])
  tensors = load_file(shard)
  tensors[NORM][3] = np.nan
  save_file(tensors, shard)
  with pytest.raises(CheckpointError, match=f"'{NORM}' in .* non-finite"):
    convert.convert(hf, str(tmp_path / 'out'), dtype='float32')
  with pytest.raises(CheckpointError, match='non-finite'):
    checkpoint.load_checkpoint(hf)  # HF snapshots converted in memory too


def test_non_finite_weights_are_refused_at_load(hf, tmp_path):
  out = convert.convert(hf, str(tmp_path / 'ckpt'), dtype='float32').output_dir
  config, params = checkpoint.load_checkpoint(out)
  params = jax.tree.map(np.asarray, params)
  params['final_norm'] = {'scale': np.full_like(params['final_norm']['scale'], np.inf)}
  checkpoint.save_checkpoint(out, config, params, overwrite=True)
  with pytest.raises(CheckpointError, match=r"non-finite .*\['final_norm'\]"):
    checkpoint.load_checkpoint(out)


@pytest.mark.parametrize('dtype', ['int8', 'bool', 'nonsense'])
def test_non_float_dtypes_are_refused(hf, tmp_path, dtype):
  with pytest.raises(CheckpointError, match='choose from bfloat16, float16, float32'):
    checkpoint.load_checkpoint(hf, dtype=dtype)
  with pytest.raises(CheckpointError, match='choose from'):
    convert.convert(hf, str(tmp_path / 'out'), dtype=dtype)


def _convert_cli(*flags) -> subprocess.CompletedProcess:
  cmd = [sys.executable, '-m', 'c3po_jax.ckpts.convert', *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_errors_are_one_line(hf, tmp_path):
  run = _convert_cli(f'--hf_dir={hf}', f'--output_dir={hf}', '--overwrite')
  assert run.returncode == 1
  assert run.stderr.count('\n') == 1 and run.stderr.startswith('error: the output ')
  run = _convert_cli(f'--hf_dir={hf}', f'--output_dir={tmp_path}/o', '--dtype=int8')
  assert run.returncode == 2
  assert run.stderr.count('\n') == 1 and run.stderr.startswith('error: flag --dtype=int8')
  run = _convert_cli(f'--hf_dir={hf}', f'--output_dir={hf}', '--overwrite', '--verbosity=1')
  assert run.returncode == 1 and 'Traceback' in run.stderr
