"""Errors that say the command line was wrong (exit code 2, see `cli`)."""

from __future__ import annotations

import contextlib

from c3po_jax.tasks import TaskDataError


class UsageError(ValueError):
  """The command line asks for something impossible: exit code 2, no traceback."""

  exit_code = 2


@contextlib.contextmanager
def usage_errors():
  """Marks errors raised inside as usage errors (exit_code 2), keeping their type.

  For checks of what the command line names (benchmarks, files, flag values)
  that run before the model loads. A malformed row inside a data file
  (TaskDataError) stays an ordinary error.
  """
  try:
    yield
  except (ValueError, OSError, RuntimeError) as e:
    if not isinstance(e, TaskDataError):
      e.exit_code = 2
    raise
