"""A checkpoint's own files: their sha256 recorded at conversion, verified at load.

Orbax reads whatever bytes are there: a flipped bit in a finite weight loads
silently (only the parameter fingerprint differs). `file_hashes` records the
sha256 of every file when a checkpoint is written; `verify_files` names the
first file that differs before anything is read.
"""

from __future__ import annotations

import hashlib
import os

from c3po_jax.ckpts.hf_snapshot import CONFIG_FILE, CheckpointError, read_json
from c3po_jax.common import files

# The metadata key of {relative path: sha256} of the checkpoint's files.
FILES_KEY = 'files'

_READ_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_READ_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def file_hashes(directory: str, names) -> dict[str, str]:
  """{relative path: sha256} of the named files and of every file under the named folders."""
  out = {}
  for name in names:
    top = os.path.join(directory, name)
    if os.path.isfile(top):
      out[name] = _sha256(top)
    for root, _, found in os.walk(top):
      for f in found:
        path = os.path.join(root, f)
        out[os.path.relpath(path, directory).replace(os.sep, '/')] = _sha256(path)
  return dict(sorted(out.items()))


def verify_files(path: str, recorded: dict[str, str]) -> None:
  """Raises CheckpointError naming the first file whose sha256 differs from the recorded one."""
  for name, want in recorded.items():
    file = os.path.join(path, *name.split('/'))
    if not os.path.isfile(file):
      raise CheckpointError(f'{path}: {name} is missing; the checkpoint is incomplete')
    if _sha256(file) != want:
      raise CheckpointError(
        f'{path}: {name} differs from the file written at conversion (sha256; a flipped byte '
        'or a cut copy): the checkpoint is corrupt, convert it again'
      )


def short_error(error: Exception, limit: int = 160) -> str:
  """A library's error as one short line (TensorStore's run to thousands of characters)."""
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + ' ...'


def record_file_hashes(path: str, metadata_file: str, params_dir: str) -> dict[str, str]:
  """Adds the hashes to the metadata of a checkpoint written before they were recorded."""
  meta_path = os.path.join(path, metadata_file)
  meta = read_json(meta_path)
  names = [CONFIG_FILE, params_dir] + sorted(
    f for f in os.listdir(path) if f.startswith('tokenizer') and f.endswith('.json')
  )
  meta[FILES_KEY] = file_hashes(path, names)
  files.write_json(meta_path, meta)
  return meta[FILES_KEY]
