"""A checkpoint's files are hashed at conversion and verified at load.

A flipped byte that Orbax would read without complaint, and a cut copy, are
refused in one short line naming the file; checkpoints written before the
hashes were recorded still load; the shipped demo checkpoints carry theirs.
"""

import json
import os
import shutil

import pytest

from c3po_jax.ckpts import checkpoint, integrity
from c3po_jax.ckpts.hf_snapshot import CheckpointError
from c3po_jax.testing.checkpoints import make_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = [os.path.join(ROOT, 'checkpoints', d) for d in ('demo', 'demo_control')]


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny')


def _copy(src, tmp_path) -> str:
  dst = str(tmp_path / 'copy')
  shutil.copytree(src, dst)
  return dst


def _largest_param_file(ckpt: str) -> str:
  found = [os.path.join(r, f) for r, _, fs in os.walk(f'{ckpt}/params') for f in fs]
  return max(found, key=os.path.getsize)


def _meta(ckpt: str) -> dict:
  with open(os.path.join(ckpt, checkpoint.METADATA_FILE)) as f:
    return json.load(f)


def test_save_records_every_file(saved):
  recorded = _meta(saved)[integrity.FILES_KEY]
  on_disk = {
    os.path.relpath(os.path.join(r, f), saved)
    for r, _, fs in os.walk(saved)
    for f in fs
    if f != checkpoint.METADATA_FILE
  }
  assert set(recorded) == on_disk and 'config.json' in recorded


def test_a_flipped_byte_is_refused_by_name(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  target = _largest_param_file(ckpt)
  with open(target, 'r+b') as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))
  name = os.path.relpath(target, ckpt)
  with pytest.raises(CheckpointError, match=f'{name} differs from the file written') as e:
    checkpoint.load_checkpoint(ckpt)
  assert len(str(e.value)) < 300 and '\n' not in str(e.value)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_cut_copy_is_one_short_line_with_or_without_hashes(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  target = _largest_param_file(ckpt)
  os.truncate(target, os.path.getsize(target) // 2)
  with pytest.raises(CheckpointError, match=os.path.basename(target)) as e:
    checkpoint.load_checkpoint(ckpt)
  assert len(str(e.value)) < 300
  meta = _meta(ckpt)
  del meta[integrity.FILES_KEY]  # as written before the hashes were recorded
  with open(os.path.join(ckpt, checkpoint.METADATA_FILE), 'w') as f:
    json.dump(meta, f)
  with pytest.raises(CheckpointError, match='cannot read parameters') as e:
    checkpoint.load_checkpoint(ckpt)
  assert len(str(e.value)) < 400 and '\n' not in str(e.value)


def test_checkpoints_without_hashes_still_load(saved, tmp_path):
  ckpt = _copy(saved, tmp_path)
  meta = _meta(ckpt)
  del meta[integrity.FILES_KEY]
  with open(os.path.join(ckpt, checkpoint.METADATA_FILE), 'w') as f:
    json.dump(meta, f)
  config, _ = checkpoint.load_checkpoint(ckpt)
  assert config.num_hidden_layers >= 1
  recorded = integrity.record_file_hashes(ckpt, checkpoint.METADATA_FILE, checkpoint.PARAMS_DIR)
  assert recorded == _meta(saved)[integrity.FILES_KEY]  # the same files, the same hashes


@pytest.mark.parametrize('demo', DEMOS, ids=os.path.basename)
def test_shipped_demo_checkpoints_carry_matching_hashes(demo):
  if not os.path.isdir(demo):
    pytest.skip('no shipped demo checkpoint')
  recorded = _meta(demo)[integrity.FILES_KEY]
  assert 'config.json' in recorded and any(n.startswith('params/') for n in recorded)
  integrity.verify_files(demo, recorded)
