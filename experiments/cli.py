"""What every command line of the suite shares: bad input ends in one readable line and exit 2."""

from __future__ import annotations

import functools
import sys

from modernize.config import ConfigError


class UsageError(Exception):
  """Bad input from the user: printed as one line, exit code 2, no traceback."""


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
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      sys.exit(130)
  return wrapper
