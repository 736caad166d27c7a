"""Loading and saving OLMoE parameters: our Orbax format and HF snapshots.

Our format (written by `save_checkpoint`, atomically):

  <dir>/config.json           OlmoeConfig.to_hf_config() (model_type olmoe)
  <dir>/params/               Orbax PyTree checkpoint of the parameter tree
  <dir>/c3po_checkpoint.json  format name and version, dtype (written last)
  <dir>/tokenizer.json ...    copies of the tokenizer files, if given

`load_checkpoint` also accepts a local Hugging Face OLMoE snapshot (config.json
plus `model.safetensors` or shards listed in `model.safetensors.index.json`),
converted in memory with the name table of `param_mapping`.

Every problem with the files raises CheckpointError (a ConversionError, so a
ValueError) naming the file or tensor; tensor-level mismatches raise the
ConversionError of `param_mapping.ParamAssembler`.

Dimensions: D model, V vocab, E experts, F expert hidden.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from c3po_jax import param_mapping
from models.olmoe import transformer
from models.olmoe.config import ConfigError, OlmoeConfig

FORMAT = 'c3po-jax/olmoe'
FORMAT_VERSION = 1
METADATA_FILE = 'c3po_checkpoint.json'
PARAMS_DIR = 'params'
CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
PICKLE_FILES = ('pytorch_model.bin', 'pytorch_model.bin.index.json')


class CheckpointError(param_mapping.ConversionError):
  """A checkpoint directory or file that cannot be read or written."""


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {path}: {e}') from e
  if not isinstance(out, dict):
    raise CheckpointError(f'{path} does not hold a JSON object')
  return out


def read_config(directory: str) -> OlmoeConfig:
  """The OlmoeConfig of a checkpoint directory (ours or HF) from config.json."""
  if not os.path.isdir(directory):
    raise CheckpointError(f'checkpoint directory {directory} does not exist')
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f'{directory} has no {CONFIG_FILE}: not a model checkpoint')
  try:
    return OlmoeConfig.from_hf_config(_read_json(path))
  except ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from e


def hf_weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of an HF snapshot, in index order; checks they exist."""
  index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
  single = os.path.join(hf_dir, SAFETENSORS_FILE)
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f'{index_path} has no weight_map')
    files = list(dict.fromkeys(weight_map.values()))
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


_SAFETENSORS_DTYPES = {
  'BF16': jnp.bfloat16,  # ml_dtypes: numpy reads bf16 without torch
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

  config: OlmoeConfig
  params: dict
  consumed: tuple[str, ...]  # HF tensor names placed, in reading order
  skipped: tuple[str, ...]  # lm_head.weight when the embeddings are tied


def read_hf_checkpoint(hf_dir: str, dtype=None) -> HFCheckpoint:
  """Converts an HF OLMoE snapshot shard by shard into our tree (numpy).

  Every leaf is allocated once in the target dtype (None: as stored); at most
  one HF tensor (plus its re-laid-out copy) is in flight besides the tree.
  """
  config = read_config(hf_dir)
  paths = hf_weight_files(hf_dir)
  dtype = _stored_dtype(paths) if dtype is None else jnp.dtype(dtype)
  assembler = param_mapping.ParamAssembler(transformer.param_shapes(config), dtype)
  skipped = []
  for i, path in enumerate(paths):
    source = os.path.basename(path)
    count = 0
    for name, array in iter_safetensors(path):
      if config.tie_word_embeddings and name == 'lm_head.weight':
        skipped.append(name)  # Tied: the head is the embedding.
        continue
      assembler.add(name, array, source=source)
      count += 1
      del array
    logging.info('Read shard %d/%d %s: %d tensors.', i + 1, len(paths), source, count)
  params = assembler.finish()
  return HFCheckpoint(config, params, tuple(assembler.consumed), tuple(skipped))


def _check_tree(tree: dict, config: OlmoeConfig, where: str) -> None:
  """Raises CheckpointError unless tree's leaf shapes equal param_shapes(config)."""
  want = transformer.param_shapes(config)
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=_is_shape)[0])
  got_flat = {
    p: tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if x is not None
  }
  keystr = jax.tree_util.keystr
  missing = sorted(keystr(p) for p in set(want_flat) - set(got_flat))
  extra = sorted(keystr(p) for p in set(got_flat) - set(want_flat))
  shape = sorted(
    f'{keystr(p)} {got_flat[p]} != {s}'
    for p, s in want_flat.items()
    if p in got_flat and got_flat[p] != s
  )
  problems = [
    f'{label}: {", ".join(items[:5])}'
    for label, items in (('missing', missing), ('unexpected', extra), ('mis-shaped', shape))
    if items
  ]
  if problems:
    raise CheckpointError(f'{where} does not match its config.json: {"; ".join(problems)}')


def _orbax_save(path: str, params: dict) -> None:
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  # No second copy of the model in host memory: by default Orbax deep-copies
  # numpy leaves (nothing mutates them while we save), and compression makes
  # OCDBT hold every encoded chunk until commit (bf16 weights barely compress).
  registry = type_handlers.create_type_handler_registry(
    (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, type_handlers.get_type_handler(jax.Array)),
  )
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(path, args=ocp.args.PyTreeSave(params))


def _write_json(path: str, obj: dict) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def _dtype_name(params: dict) -> str:
  names = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  return names.pop() if len(names) == 1 else 'mixed'


def save_checkpoint(
  output_dir: str,
  config: OlmoeConfig,
  params: dict,
  *,
  extra_files: Sequence[str] = (),
  overwrite: bool = False,
) -> str:
  """Writes params (numpy or jax leaves) in our format; returns the directory.

  Writes into a hidden temporary sibling and renames it at the end, so an
  interrupted save leaves nothing at output_dir (and the temporary directory,
  if a crash leaves one, has no metadata file, so it does not load).
  """
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and not overwrite:
    raise CheckpointError(f'{output_dir} already exists; pass overwrite=True (--overwrite)')
  _check_tree(params, config, 'the parameters to save')
  for path in extra_files:
    if not os.path.isfile(path):
      raise CheckpointError(f'extra file {path} does not exist')
  parent, base = os.path.split(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
  try:
    _write_json(os.path.join(tmp, CONFIG_FILE), config.to_hf_config())
    for path in extra_files:
      shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
    _orbax_save(os.path.join(tmp, PARAMS_DIR), params)
    metadata = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'dtype': _dtype_name(params)}
    _write_json(os.path.join(tmp, METADATA_FILE), metadata)
    if os.path.exists(output_dir):
      old = tempfile.mkdtemp(prefix=f'.{base}.old-', dir=parent)
      os.rename(output_dir, os.path.join(old, base))
      os.rename(tmp, output_dir)
      _remove_tree(old)
    else:
      os.rename(tmp, output_dir)
  except BaseException:
    _remove_tree(tmp)
    raise
  logging.info('Saved checkpoint %s (%s).', output_dir, metadata['dtype'])
  return output_dir


def _remove_tree(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)


def is_converted(path: str) -> bool:
  """Whether path looks like one of our checkpoints (complete or not)."""
  return os.path.exists(os.path.join(path, METADATA_FILE)) or os.path.exists(
    os.path.join(path, PARAMS_DIR)
  )


def _shardings_tree(shardings, shapes: dict) -> dict:
  """A Sharding per leaf: broadcast a single one, default to the first device."""
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda _: shardings, shapes, is_leaf=_is_shape)
  return shardings


def _load_converted(path: str, dtype, shardings) -> tuple[OlmoeConfig, dict]:
  import orbax.checkpoint as ocp

  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise CheckpointError(
      f'{path} is an incomplete converted checkpoint (no {METADATA_FILE}; '
      'was the save interrupted?)'
    )
  meta = _read_json(meta_path)
  if meta.get('format') != FORMAT or meta.get('format_version') != FORMAT_VERSION:
    raise CheckpointError(
      f'{meta_path}: format {meta.get("format")!r} version {meta.get("format_version")!r}, '
      f'expected {FORMAT!r} version {FORMAT_VERSION}'
    )
  config = read_config(path)
  params_dir = os.path.join(path, PARAMS_DIR)
  shapes = transformer.param_shapes(config)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      stored = checkpointer.metadata(params_dir).item_metadata.tree
      _check_tree(stored, config, params_dir)
      target = jax.tree.map(
        lambda s, m, sh: jax.ShapeDtypeStruct(s, m.dtype if dtype is None else dtype, sharding=sh),
        shapes,
        stored,
        _shardings_tree(shardings, shapes),
        is_leaf=_is_shape,
      )
      restore_args = ocp.checkpoint_utils.construct_restore_args(target)
      params = checkpointer.restore(
        params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
      )
  except CheckpointError:
    raise
  except Exception as e:  # Orbax / tensorstore errors on missing or corrupt files.
    raise CheckpointError(f'cannot restore parameters from {params_dir}: {e}') from e
  return config, params


def load_checkpoint(path: str, dtype=None, shardings=None) -> tuple[OlmoeConfig, dict]:
  """(config, params) from our checkpoint or a local HF OLMoE snapshot.

  Args:
    path: a directory written by `save_checkpoint`, or an HF snapshot directory
      (config.json + safetensors), converted in memory.
    dtype: None keeps the stored dtype; else cast (jnp.bfloat16, 'float32', ...).
    shardings: None (first device), one jax.sharding.Sharding for every leaf,
      or a pytree of Shardings matching params; our checkpoints are restored
      by Orbax directly into these shardings.

  Returns:
    The config and the parameter tree (jax.Array leaves).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint directory {path} does not exist')
  dtype = None if dtype is None else jnp.dtype(dtype)
  if is_converted(path):
    return _load_converted(path, dtype, shardings)
  hf = read_hf_checkpoint(path, dtype)
  config, leaves, treedef = hf.config, *jax.tree.flatten(hf.params)
  del hf
  shapes = transformer.param_shapes(config)
  placements = treedef.flatten_up_to(_shardings_tree(shardings, shapes))
  for i, placement in enumerate(placements):
    # Replace leaf by leaf so host memory holds at most one extra leaf.
    leaves[i] = jax.device_put(leaves[i], placement)
  return config, jax.tree.unflatten(treedef, leaves)
