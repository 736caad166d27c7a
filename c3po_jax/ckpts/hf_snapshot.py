"""Reading local Hugging Face OLMoE snapshots into our parameter tree.

A snapshot is a directory with config.json and either `model.safetensors` or
shards listed in `model.safetensors.index.json`. `read_hf_checkpoint` streams
the tensors shard by shard into `hf_mapping.ParamAssembler`; tensors are
read with plain file reads (bf16 through ml_dtypes), so torch is not needed.

Every problem with the files raises CheckpointError (a ConversionError, so a
ValueError) naming the file or tensor; tensor-level mismatches raise the
ConversionError of `hf_mapping.ParamAssembler`.

Dimensions: D model, F expert hidden, E experts (HF stores one [F, D] tensor
per expert; ours stacks them on a leading E axis).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from absl import logging

from c3po_jax.ckpts import fp8, mxfp4
from models import families, hf_mapping
from models.config import ConfigError, MoeConfig

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
PICKLE_FILES = ('pytorch_model.bin', 'pytorch_model.bin.index.json')


class CheckpointError(hf_mapping.ConversionError):
  """A checkpoint directory or file that cannot be read or written."""


def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {path}: {e}') from e
  if not isinstance(out, dict):
    raise CheckpointError(f'{path} does not hold a JSON object')
  return out


def read_config(directory: str) -> MoeConfig:
  """The MoeConfig of a checkpoint directory (ours or HF) from config.json."""
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory {directory} does not exist')
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f'{directory} has no {CONFIG_FILE}: not a model checkpoint')
  try:
    return families.from_hf_config(read_json(path))
  except ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from e


def hf_weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of an HF snapshot, in index order; checks they exist."""
  index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
  single = os.path.join(hf_dir, SAFETENSORS_FILE)
  if os.path.isfile(index_path):
    weight_map = read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f'{index_path} has no weight_map')
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
      _check_inside(name, index_path)
  elif os.path.isfile(single):
    files = [SAFETENSORS_FILE]
  elif any(os.path.exists(os.path.join(hf_dir, p)) for p in PICKLE_FILES):
    raise CheckpointError(
      f'{hf_dir} holds only pytorch_model.bin weights; refusing to unpickle them '
      '(unpickling can run arbitrary code). Re-save the model with safetensors: '
      'model.save_pretrained(dir, safe_serialization=True)'
    )
  else:
    raise CheckpointError(f'{hf_dir} has no {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}')
  paths = [os.path.join(hf_dir, f) for f in files]
  for path in paths:
    if not os.path.isfile(path):
      raise CheckpointError(f'shard {path} listed in {SAFETENSORS_INDEX} does not exist')
  return paths


def _check_inside(name, index_path: str) -> None:
  """Refuses a weight-map entry that could point outside the snapshot.

  Only the name is checked, never its resolved target: a hub cache snapshot
  is a directory of symlinks into `../../blobs/`, which must keep working.
  """
  if not isinstance(name, str) or not name:
    raise CheckpointError(f'{index_path}: weight_map entry {name!r} is not a file name')
  parts = name.replace('\\', '/').split('/')
  if os.path.isabs(name) or name.startswith(('/', '\\')) or '..' in parts or ':' in parts[0]:
    raise CheckpointError(
      f'{index_path}: weight_map entry {name!r} points outside the snapshot directory '
      '(absolute, or with ".."); refusing to read it'
    )


def check_finite(name: str, array: np.ndarray, where: str) -> None:
  """Refuses a floating-point tensor holding NaN or inf (it would run, silently wrong)."""
  if jnp.issubdtype(array.dtype, jnp.floating) and not np.isfinite(array).all():
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    raise CheckpointError(
      f'tensor {name!r} in {where} has {bad} non-finite (NaN or inf) values; '
      'the checkpoint is corrupt'
    )


_SAFETENSORS_DTYPES = {
  'BF16': jnp.bfloat16,  # ml_dtypes: numpy reads bf16 without torch
  'F8_E4M3': jnp.float8_e4m3fn,  # DeepSeek-V3's published weights (`fp8`)
  'F16': np.float16,
  'F32': np.float32,
  'F64': np.float64,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Entry:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # from the start of the file
  nbytes: int


def _safetensors_entries(path: str) -> list[_Entry]:
  """The validated header of a safetensors file, in data order."""

  def corrupt(why: str) -> CheckpointError:
    return CheckpointError(f'cannot read safetensors file {path}: {why}')

  try:
    with open(path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size
      n = int.from_bytes(f.read(8), 'little')
      if not 0 < n <= size - 8:
        raise corrupt(f'header length {n} does not fit the file ({size} bytes)')
      header = json.loads(f.read(n))
  except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError too.
    raise corrupt(str(e)) from e
  if not isinstance(header, dict):
    raise corrupt('the header is not a JSON object')
  header.pop('__metadata__', None)
  entries = []
  for name, info in header.items():
    try:
      dtype = jnp.dtype(_SAFETENSORS_DTYPES[info['dtype']])
      shape = tuple(int(i) for i in info['shape'])
      begin, end = (int(i) for i in info['data_offsets'])
    except (KeyError, TypeError, ValueError) as e:
      raise corrupt(f'bad header entry for tensor {name!r}: {info!r}') from e
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if end - begin != nbytes or begin < 0 or 8 + n + end > size:
      raise corrupt(f'tensor {name!r} lies outside the file or has inconsistent offsets')
    entries.append(_Entry(name, dtype, shape, 8 + n + begin, nbytes))
  return sorted(entries, key=lambda e: e.offset)


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, numpy array) for each tensor of one safetensors file.

  Reads each tensor with one `readinto` into a fresh array: exactly one
  copy, bf16 included, no torch. (safetensors' `safe_open` memory-maps the
  file, and every page read stays resident while the file is open: a whole
  multi-GB shard on top of the converter's parameter tree.)
  """
  entries = _safetensors_entries(path)
  with open(path, 'rb') as f:
    for e in entries:
      out = np.empty(e.shape, e.dtype)
      f.seek(e.offset)
      if f.readinto(out.reshape(-1).view(np.uint8)) != e.nbytes:
        raise CheckpointError(f'cannot read safetensors file {path}: {e.name!r} is truncated')
      yield e.name, out


def _stored_dtype(paths: Sequence[str]) -> np.dtype:
  """The widest floating dtype stored in the files (headers only)."""
  dtypes = {e.dtype for path in paths for e in _safetensors_entries(path)}
  floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
  if not floats:
    raise CheckpointError(f'no floating-point tensors in {", ".join(paths)}')
  return max(floats, key=lambda d: d.itemsize)


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
  """An HF snapshot converted to our layout (numpy leaves)."""

  config: MoeConfig
  params: dict
  consumed: tuple[str, ...]  # HF tensor names placed, in reading order
  skipped: tuple[str, ...]  # lm_head.weight when tied; layers past the decoder (`_unread_layers`)


_LAYER = re.compile(r'model\.layers\.(\d+)\.')


def _unread_layers(hf_dir: str, config: MoeConfig) -> set[int]:
  """Layers config.json declares past the decoder's: DeepSeek-V3's multi-token prediction.

  `num_nextn_predict_layers` modules (`model.layers.{L}..`, L = num_hidden_layers)
  predict further tokens in training; scoring a prompt never runs them.
  """
  extra = read_json(os.path.join(hf_dir, CONFIG_FILE)).get('num_nextn_predict_layers') or 0
  return set(range(config.num_hidden_layers, config.num_hidden_layers + int(extra)))


def read_hf_checkpoint(hf_dir: str, dtype=None) -> HFCheckpoint:
  """Converts an HF OLMoE snapshot shard by shard into our tree (numpy).

  Every leaf is allocated once in the target dtype (None: as stored); at most
  one HF tensor (plus its re-laid-out copy) is in flight besides the tree.
  """
  config = read_config(hf_dir)
  paths = hf_weight_files(hf_dir)
  dtype = _stored_dtype(paths) if dtype is None else jnp.dtype(dtype)
  assembler = hf_mapping.ParamAssembler(config, dtype)
  pairer = mxfp4.Pairer()  # MXFP4 blocks + scales (gpt-oss) -> the dequantized weight
  fp8_pairer = fp8.Pairer()  # FP8 + 128 x 128 block scales (DeepSeek-V3) -> float32
  unread = _unread_layers(hf_dir, config)
  skipped = []
  for i, path in enumerate(paths):
    source = os.path.basename(path)
    count = 0
    for stored, packed in fp8_pairer.stream(iter_safetensors(path)):
      if config.tie_word_embeddings and stored == 'lm_head.weight':
        skipped.append(stored)  # Tied: the head is the embedding.
        continue
      layer = _LAYER.match(stored)
      if layer and int(layer.group(1)) in unread:
        skipped.append(stored)
        continue
      for name, array in pairer.feed(stored, packed):
        check_finite(name, array, source)
        assembler.add(name, array, source=source)
        count += 1
      del packed
    logging.info('Read shard %d/%d %s: %d tensors.', i + 1, len(paths), source, count)
  pairer.finish()
  fp8_pairer.finish()
  params = assembler.finish()
  return HFCheckpoint(config, params, tuple(assembler.consumed), tuple(skipped))
