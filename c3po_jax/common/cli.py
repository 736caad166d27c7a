"""Command-line plumbing shared by `c3po_jax.main` and `c3po_jax.ckpts.convert`.

Every failure ends the program with ONE line on stderr, `error: <message>`:
exit code 2 for usage errors (a bad flag or flag value, an unknown benchmark,
a missing data file, results already present), 1 for anything else. The
traceback is printed only with `--verbosity=1`, which also shows the INFO
logs of third-party libraries (Orbax, matplotlib's font cache, ...) that are
hidden otherwise.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from c3po_jax.common.errors import UsageError

USAGE_EXIT = 2
ERROR_EXIT = 1
# Files under these folders log at INFO; everyone else only from WARNING.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_OWN = tuple(os.path.join(_ROOT, d) + os.sep for d in ('c3po_jax', 'models', 'benchmarks'))


def one_line(error: BaseException) -> str:
  """The error as one line: its message, newlines folded, its type when unclear."""
  message = '; '.join(s.strip() for s in str(error).splitlines() if s.strip())
  clear = (ValueError, OSError, RuntimeError, flags.Error, app.UsageError)
  if not message or not isinstance(error, clear):
    message = f'{type(error).__name__}: {message}' if message else type(error).__name__
  return message


def _exit(message: str, code: int) -> None:
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  sys.exit(code)


# Help requests: the text above the flags and the main module's flags (--helpfull: every
# flag), on stdout, exit code 0. absl itself knows only --help and exits with 1.
HELP = ('-h', '-help', '--help', '--helpshort', '-?')
HELP_FULL = ('--helpfull', '-helpfull')


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: a bad flag is one line and exit code 2; -h/--help exit 0."""
  options = argv[1 : argv.index('--')] if '--' in argv else argv[1:]
  if any(a in HELP + HELP_FULL for a in options):
    app.usage(shorthelp=not any(a in HELP_FULL for a in options), writeto_stdout=True, exitcode=0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(f'{one_line(e)} (see --help)', USAGE_EXIT)
    raise  # _exit does not return


class _QuietThirdParty(py_logging.Filter):
  """Drops INFO and DEBUG records logged from outside this project."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN)


def quiet_third_party_logs() -> None:
  """Hides third-party INFO logs unless --verbosity >= 1."""
  if logging.get_verbosity() >= 1:
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietThirdParty) for f in handler.filters):
    handler.addFilter(_QuietThirdParty())
  for name in ('matplotlib', 'jax._src', 'orbax'):  # Python-logging libraries
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """main, with every exception turned into one `error:` line and an exit code."""

  def wrapped(argv):
    quiet_third_party_logs()
    try:
      return main(argv)
    except SystemExit:
      raise
    except BaseException as e:  # noqa: BLE001 - the one place errors become exit codes
      usage = isinstance(e, (UsageError, app.UsageError, flags.Error))
      usage = usage or getattr(e, 'exit_code', None) == USAGE_EXIT
      if logging.get_verbosity() >= 1:
        traceback.print_exc()
      if isinstance(e, KeyboardInterrupt):
        _exit('interrupted', 130)
      _exit(one_line(e), USAGE_EXIT if usage else ERROR_EXIT)

  return wrapped


def run(main: Callable[[list[str]], object]) -> None:
  """app.run(main) with one-line errors (see the module docstring)."""
  app.run(guarded(main), flags_parser=parse_flags)


def duration(seconds: float) -> str:
  """'1 h 02 min', '3 min 05 s' or '12.3 s'."""
  if seconds < 60:
    return f'{seconds:.1f} s'
  minutes, s = divmod(round(seconds), 60)
  if minutes < 60:
    return f'{minutes} min {s:02d} s'
  return f'{minutes // 60} h {minutes % 60:02d} min'
