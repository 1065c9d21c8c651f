"""What every command line of the suite shares: bad input ends in one readable line and exit 2;
Ctrl-C in one line and exit 130."""

from __future__ import annotations

import functools
import sys

from modernize.config import ConfigError


class UsageError(Exception):
  """Bad input from the user: printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
  """A run stopped by a signal after saving its checkpoint: `code` is the exit code (130 for
  Ctrl-C, 143 for SIGTERM), the message says what was saved."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


EXPECTED = (UsageError, ConfigError)


def guarded(main):
  """Runs `main`, turning expected errors into `error: ...` on stderr and exit code 2."""
  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except EXPECTED as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
    except Stopped as e:
      print(f'{"interrupted" if e.code == 130 else "stopped"} ({e}): run the same command again '
            'to resume', file=sys.stderr)
      sys.exit(e.code)
    except KeyboardInterrupt:
      print('interrupted: run the same command again to resume', file=sys.stderr)
      sys.exit(130)
  return wrapper
