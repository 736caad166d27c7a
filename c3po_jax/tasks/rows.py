"""Read raw rows (dicts) from data files, each with its 1-based position.

Formats: JSON Lines (`.jsonl`, `.jsonl.gz`), Parquet (`.parquet`) and the
Arrow stream files that Hugging Face `datasets` writes (`.arrow`). Every row
comes as `Row(path, number, unit, data)` so a later fault can name its place.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

from c3po_jax.common.errors import TaskDataError

JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz')
TABLE_SUFFIXES = ('.parquet', '.arrow')


@dataclasses.dataclass(frozen=True)
class Row:
  """One raw record and where it is: `number` is 1-based in `unit`s."""

  path: str
  number: int
  unit: str
  data: dict[str, Any]

  def error(self, reason: str) -> TaskDataError:
    return TaskDataError(self.path, self.number, reason, unit=self.unit)


def is_jsonl(path: str) -> bool:
  return str(path).endswith(JSONL_SUFFIXES)


def is_table(path: str) -> bool:
  return str(path).endswith(TABLE_SUFFIXES)


def read_rows(path: str) -> Iterator[Row]:
  """Yields the rows of one file, in file order."""
  path = str(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such data file: {path}')
  if is_jsonl(path):
    yield from _jsonl_rows(path)
  elif path.endswith('.parquet'):
    import pyarrow.parquet as pq

    yield from _table_rows(path, pq.read_table(path))
  elif path.endswith('.arrow'):
    yield from _table_rows(path, read_arrow(path))
  else:
    raise ValueError(f'{path}: unknown data file type (want {JSONL_SUFFIXES + TABLE_SUFFIXES})')


def read_arrow(path: str):
  """An Arrow file as a `pyarrow.Table` (stream format, as `datasets` writes; else file format)."""
  import pyarrow as pa

  with pa.memory_map(path) as source:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      source.seek(0)
      return pa.ipc.open_file(source).read_all()


def _jsonl_rows(path: str) -> Iterator[Row]:
  """Lines read as bytes and decoded one by one, so a fault names its line."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for number, raw in enumerate(_lines(f, path), start=1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise TaskDataError(
          path, number, f'not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})'
        ) from None
      if not line.strip():
        continue
      try:
        data = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskDataError(path, number, f'invalid JSON: {e.msg} (column {e.colno})') from None
      if not isinstance(data, dict):
        raise TaskDataError(path, number, f'expected a JSON object, got {type(data).__name__}')
      yield Row(path, number, 'line', data)


def _lines(f, path: str) -> Iterator[bytes]:
  """The byte lines of f; a truncated or corrupt (gzip) file raises TaskDataError."""
  number = 0
  try:
    for number, raw in enumerate(f, start=1):  # noqa: B007 - the count names the fault
      yield raw
  except (EOFError, OSError, gzip.BadGzipFile) as e:
    raise TaskDataError(
      path, number + 1, f'cannot read this line: the file is truncated or corrupt ({e})'
    ) from None


def _table_rows(path: str, table) -> Iterator[Row]:
  number = 0
  for batch in table.to_batches():
    for data in batch.to_pylist():
      number += 1
      yield Row(path, number, 'row', data)


def split_files(directory: str, split: str) -> list[str]:
  """Data files of `split` in a directory, in the layouts people keep them.

  Looks for `{split}.jsonl[.gz]`, `{split}.parquet`, `{split}.arrow`, the hub's
  `{split}-00000-of-00001.parquet` shards and `save_to_disk`'s
  `{split}/data-*.arrow`; the first layout found wins.
  """
  patterns = [
    f'{split}.jsonl',
    f'{split}.jsonl.gz',
    f'{split}.parquet',
    f'{split}.arrow',
    f'{split}-*.parquet',
    f'{split}/*.parquet',
    f'{split}/data-*.arrow',
  ]
  for pattern in patterns:
    found = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
    if found:
      return found
  raise FileNotFoundError(
    f'no data file for split {split!r} in {directory} (looked for {", ".join(patterns)})'
  )
