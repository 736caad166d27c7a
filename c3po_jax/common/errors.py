"""Error types every wing shares: usage errors (exit code 2, see `cli`) and bad data."""

from __future__ import annotations

import contextlib


class TaskDataError(ValueError):
  """A malformed row in a benchmark file: names the file, the row and the fault.

  Attributes:
    path: the file (or hub dataset) the row came from.
    line: 1-based line (JSONL) or row (Parquet, Arrow, hub) number; None when
      the fault is not tied to one row.
    reason: what is wrong.
  """

  def __init__(self, path: str, line: int | None, reason: str, *, unit: str = 'line'):
    self.path = str(path)
    self.line = line
    self.reason = reason
    where = self.path if line is None else f'{self.path}, {unit} {line}'
    super().__init__(f'{where}: {reason}')


class TaskSourceError(RuntimeError):
  """No source can serve the requested benchmark split (nothing offline, no hub)."""


class UsageError(ValueError):
  """The command line asks for something impossible: exit code 2, no traceback."""

  exit_code = 2


@contextlib.contextmanager
def usage_errors():
  """Marks errors raised inside as usage errors (exit_code 2), keeping their type.

  For checks of what the command line names (benchmarks, data files and their
  rows, the checkpoint, flag values) that run before the model loads.
  """
  try:
    yield
  except (ValueError, OSError, RuntimeError) as e:
    e.exit_code = 2
    raise
