"""Atomic file writes: a reader sees the old file or the whole new one, never half."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def _file_mode() -> int:
  """The mode open() gives a new file: 0666 less the process's umask."""
  mask = os.umask(0)
  os.umask(mask)
  return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str, *, sync: bool = False):
  """Opens a temporary sibling of path for text writing; renames it over path on success.

  sync: fsync before the rename (for files a crash must not truncate). On an
  exception the temporary file is removed and path is left as it was.
  """
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  try:
    os.chmod(tmp, _file_mode())  # mkstemp's 0600 -> what open() gives (0644 under umask 022)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      yield f
      if sync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj, *, indent: int = 2, sort_keys: bool = True) -> None:
  """Writes obj as JSON (a trailing newline), atomically."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=indent, sort_keys=sort_keys)
    f.write('\n')
