"""Loading and saving OLMoE parameters: our Orbax format and HF snapshots.

Our format (written by `save_checkpoint`, atomically):

  <dir>/config.json           the HF config.json of the model's family
  <dir>/params/               Orbax PyTree checkpoint of the parameter tree
  <dir>/c3po_checkpoint.json  format name and version, dtype, and the sha256 of every
                              other file above ("files"; written last)
  <dir>/tokenizer.json ...    copies of the tokenizer files, if given

`load_checkpoint` also accepts a local Hugging Face OLMoE snapshot, converted
in memory by `hf_snapshot.read_hf_checkpoint`. Problems raise CheckpointError
(a ValueError) naming the file or tensor; parameters holding NaN or inf are
refused. A file whose sha256 differs from the one recorded at conversion (a
flipped byte, a cut copy) is refused by name before Orbax reads it;
checkpoints written before the hashes were recorded load without that check.

A save writes `.<name>.tmp-<host>-<pid>-*` next to the output and, when it
replaces one, first moves the old one into `.<name>.old-<host>-<pid>-*`. If the
process is killed, the next save into the same parent directory, or load of
that output, cleans up what it left (only temporaries whose process is gone,
on this host) and, if a swap was cut between its two renames, puts the old
checkpoint back.

Dimensions: D model, V vocab, E experts, F expert hidden.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from c3po_jax.ckpts import hf_snapshot, integrity
from c3po_jax.ckpts.hf_snapshot import CONFIG_FILE, CheckpointError, read_config
from c3po_jax.common import files
from models import families, transformer
from models import params as params_lib
from models.config import MoeConfig

FORMAT = 'c3po-jax/moe'
FORMAT_VERSION = 2
# Version 1 (format name 'c3po-jax/olmoe'): OLMoE only, the parameter layout
# before the model became NNX modules; read and converted on load
# (`models.params.from_v1`).
V1_FORMAT = 'c3po-jax/olmoe'
METADATA_FILE = 'c3po_checkpoint.json'
PARAMS_DIR = 'params'
# Parameter dtypes a checkpoint may be cast to: integer casts zero the weights.
PARAM_DTYPES = ('bfloat16', 'float16', 'float32')


def param_dtype(dtype):
  """dtype as a jnp.dtype if it is one of PARAM_DTYPES (None stays None)."""
  if dtype is None:
    return None
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    raise CheckpointError(
      f'unknown dtype {dtype!r}; choose from {", ".join(PARAM_DTYPES)}'
    ) from None
  if out.name not in PARAM_DTYPES:
    raise CheckpointError(
      f'dtype {out.name} cannot hold model weights; choose from {", ".join(PARAM_DTYPES)}'
    )
  return out


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _check_tree(tree: dict, config: MoeConfig, where: str, want: dict | None = None) -> None:
  """Raises CheckpointError unless tree's leaf shapes equal `want` (param_shapes(config))."""
  want = transformer.param_shapes(config) if want is None else want
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
    raise CheckpointError(f'{where} does not match the config: {"; ".join(problems)}')


def _orbax_save(path: str, params: dict) -> None:
  import orbax.checkpoint as ocp
  from orbax.checkpoint import type_handlers

  # No second copy of the model in host memory: by default Orbax deep-copies
  # numpy leaves (nothing mutates them while we save), and compression makes
  # OCDBT hold every encoded chunk until commit (bf16 weights barely compress).
  try:
    numpy_handler = type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  except TypeError:  # Orbax releases without the option always copy.
    numpy_handler = type_handlers.NumpyHandler()
  registry = type_handlers.create_type_handler_registry(
    (np.ndarray, numpy_handler),
    (jax.Array, type_handlers.get_type_handler(jax.Array)),
  )
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(path, args=ocp.args.PyTreeSave(params))


def _dtype_name(params: dict) -> str:
  names = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  return names.pop() if len(names) == 1 else 'mixed'


def save_checkpoint(
  output_dir: str,
  config: MoeConfig,
  params: dict,
  *,
  extra_files: Sequence[str] = (),
  overwrite: bool = False,
  keep: Sequence[str] = (),
) -> str:
  """Writes params (numpy or jax leaves) in our format; returns the directory.

  Writes into a hidden temporary sibling and renames it at the end, so an
  interrupted save leaves nothing at output_dir (and the temporary directory,
  if a crash leaves one, has no metadata file, so it does not load).
  overwrite replaces only one of our checkpoints (or an empty directory), and
  never one that is or holds a directory of `keep` (e.g. the input).
  """
  output_dir = os.path.abspath(output_dir)
  check_output_dir(output_dir, overwrite, keep)
  _check_tree(params, config, 'the parameters to save')
  for path in extra_files:
    if not os.path.isfile(path):
      raise CheckpointError(f'extra file {path} does not exist')
  parent, base = os.path.split(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{base}.tmp-{_owner()}-', dir=parent)
  try:
    files.write_json(os.path.join(tmp, CONFIG_FILE), families.to_hf_config(config))
    for path in extra_files:
      shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
    _orbax_save(os.path.join(tmp, PARAMS_DIR), params)
    metadata = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'dtype': _dtype_name(params)}
    extra = [os.path.basename(p) for p in extra_files]
    metadata[integrity.FILES_KEY] = integrity.file_hashes(tmp, [CONFIG_FILE, PARAMS_DIR, *extra])
    files.write_json(os.path.join(tmp, METADATA_FILE), metadata)
    if os.path.exists(output_dir):
      # Old aside, new in, then delete the old: a kill between the renames
      # leaves the old one aside, and `recover` puts it back.
      old = tempfile.mkdtemp(prefix=f'.{base}.old-{_owner()}-', dir=parent)
      os.rename(output_dir, os.path.join(old, base))
      _rename_in(tmp, output_dir)
      _remove_tree(old)
    else:
      os.rename(tmp, output_dir)
  except BaseException:
    _remove_tree(tmp)
    raise
  logging.info('Saved checkpoint %s (%s).', output_dir, metadata['dtype'])
  return output_dir


def _rename_in(src: str, dst: str) -> None:
  os.rename(src, dst)


def _remove_tree(path: str) -> None:
  shutil.rmtree(path, ignore_errors=True)


def _host() -> str:
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
  """Names the saving process in its temporary siblings: host hash and pid."""
  return f'{_host()}-{os.getpid()}'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


_SIBLING = re.compile(r'\.(.+)\.(tmp|old)-([0-9a-f]{8})-(\d+)-[^/]*')


def _stale_siblings(parent: str) -> list[tuple[str, str, str]]:
  """(output name, kind, path) of the temporaries in parent whose saving process
  is gone from this host (whatever output they were for)."""
  if not os.path.isdir(parent):
    return []
  out = []
  for name in sorted(os.listdir(parent)):
    m = _SIBLING.fullmatch(name)
    if m and m.group(3) == _host() and not _alive(int(m.group(4))):
      out.append((m.group(1), m.group(2), os.path.join(parent, name)))
  return out


def recover(output_dir: str) -> None:
  """Cleans up after killed saves next to output_dir (see the module docstring)."""
  parent = os.path.dirname(os.path.abspath(output_dir))
  for base, kind, path in _stale_siblings(parent):
    target, aside = os.path.join(parent, base), os.path.join(path, base)
    if kind == 'old' and not os.path.lexists(target) and is_ours(aside):
      logging.warning('A save was killed mid-swap: restoring %s from %s.', target, aside)
      os.rename(aside, target)
    logging.warning('Removing %s, left by a killed save.', path)
    _remove_tree(path)


def is_ours(path: str) -> bool:
  """Whether path is a complete checkpoint written by save_checkpoint."""
  try:
    return hf_snapshot.read_json(os.path.join(path, METADATA_FILE)).get('format') == FORMAT
  except CheckpointError:
    return False


def _within(path: str, directory: str) -> bool:
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


def check_output_dir(output_dir: str, overwrite: bool, keep: Sequence[str] = ()) -> None:
  """Raises CheckpointError unless a save may write (or replace) output_dir."""
  recover(output_dir)
  for path in keep:
    if _within(path, output_dir):
      raise CheckpointError(
        f'the output {output_dir} is (or holds) the input {path}; choose another output directory'
      )
  if not os.path.lexists(output_dir):
    return
  if not overwrite:
    raise CheckpointError(f'{output_dir} already exists; pass overwrite=True (--overwrite)')
  if os.path.islink(output_dir) or not os.path.isdir(output_dir):
    raise CheckpointError(f'{output_dir} is not a directory; refusing to replace it')
  if os.listdir(output_dir) and not is_ours(output_dir):
    raise CheckpointError(
      f'{output_dir} is not a c3po-jax checkpoint (no {METADATA_FILE} of format {FORMAT!r}); '
      '--overwrite replaces only a converted checkpoint: remove it yourself or choose another '
      'output directory'
    )


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


def _load_converted(path: str, dtype, shardings) -> tuple[MoeConfig, dict]:
  import orbax.checkpoint as ocp

  meta_path = os.path.join(path, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise CheckpointError(
      f'{path} is an incomplete converted checkpoint (no {METADATA_FILE}; '
      'was the save interrupted?)'
    )
  meta = hf_snapshot.read_json(meta_path)
  version = (meta.get('format'), meta.get('format_version'))
  if version not in ((FORMAT, FORMAT_VERSION), (V1_FORMAT, 1)):
    raise CheckpointError(
      f'{meta_path}: format {version[0]!r} version {version[1]!r}, '
      f'expected {FORMAT!r} version {FORMAT_VERSION} (or {V1_FORMAT!r} version 1)'
    )
  config = read_config(path)
  params_dir = os.path.join(path, PARAMS_DIR)
  shapes = transformer.param_shapes(config)
  if version[1] == 1:
    shapes = params_lib.to_v1(shapes, config)
  # Bounded read buffers: host memory peaks near the tree plus ~1 GB, not 2x.
  handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1)
  try:
    with ocp.Checkpointer(handler) as checkpointer:
      stored = checkpointer.metadata(params_dir).item_metadata
  except Exception as e:  # Orbax / tensorstore errors on missing or corrupt files.
    raise CheckpointError(
      f'cannot read parameters from {params_dir}: {integrity.short_error(e)}'
    ) from e
  if stored is None:
    raise CheckpointError(f'cannot read parameters from {params_dir}: no Orbax metadata')
  stored = stored.tree
  _check_tree(stored, config, params_dir, shapes)
  integrity.verify_files(path, meta.get(integrity.FILES_KEY) or {})
  placements = _shardings_tree(shardings, transformer.param_shapes(config))
  if version[1] == 1:
    placements = params_lib.to_v1(placements, config)
  target = jax.tree.map(
    lambda s, m, sh: jax.ShapeDtypeStruct(s, m.dtype if dtype is None else dtype, sharding=sh),
    shapes,
    stored,
    placements,
    is_leaf=_is_shape,
  )
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.Checkpointer(handler) as checkpointer:
      params = checkpointer.restore(
        params_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
      )
  except Exception as e:
    raise CheckpointError(
      f'cannot read parameters from {params_dir}: {integrity.short_error(e)}'
    ) from e
  if version[1] == 1:
    logging.info('%s: layout version 1, converted to the current layout on load.', path)
    params = params_lib.from_v1(params, config)
  return config, params


def load_checkpoint(path: str, dtype=None, shardings=None) -> tuple[MoeConfig, dict]:
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
  dtype = param_dtype(dtype)
  if not os.path.isdir(path):
    recover(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'checkpoint directory {path} does not exist')
  if is_converted(path):
    config, params = _load_converted(path, dtype, shardings)
    _check_finite(params, path)
    return config, params
  hf = hf_snapshot.read_hf_checkpoint(path, dtype)
  config, leaves, treedef = hf.config, *jax.tree.flatten(hf.params)
  del hf
  shapes = transformer.param_shapes(config)
  placements = treedef.flatten_up_to(_shardings_tree(shardings, shapes))
  for i, placement in enumerate(placements):
    # Leaf by leaf, waiting for each transfer to release its numpy source, so
    # host memory holds the tree plus at most one leaf.
    leaves[i] = jax.device_put(leaves[i], placement).block_until_ready()
  params = jax.tree.unflatten(treedef, leaves)
  _check_finite(params, path)  # the stored tensors were finite; a cast may overflow
  return config, params


def _check_finite(params: dict, where: str) -> None:
  """Refuses parameters holding NaN or inf: they run, and score 0% silently."""
  bad = [
    jax.tree_util.keystr(p)
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    if not bool(jnp.isfinite(x).all())
  ]
  if bad:
    raise CheckpointError(
      f'{where}: non-finite (NaN or inf) values in {len(bad)} parameter(s), e.g. '
      f'{", ".join(bad[:3])}; the checkpoint is corrupt (or the dtype overflows)'
    )
