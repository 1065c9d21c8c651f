"""The one command-line contract of the suite's nine commands (train, ladder, analyze, data,
bench, bench.gpu_check, bench.data, bench.depthwise, bench.seeds):

- `--help` prints the usage and exits 0;
- a bad argument, a bad value, an unknown name and every expected failure end in one line on
  stderr, `error: ...`, and exit code 2 (no usage block, no traceback);
- Ctrl-C ends in one line and exit code 130 (a run stopped by a signal after saving: its code);
- every `main(argv)` returns its exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys


class UsageError(Exception):
  """Bad input from the user, or an expected failure: printed as one line, exit code 2, no
  traceback."""


class Stopped(Exception):
  """A run stopped by a signal after saving its checkpoint: `code` is the exit code (130 for
  Ctrl-C, 143 for SIGTERM), the message says what was saved."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code


def expected_errors() -> tuple[type, ...]:
  """The exceptions that are bad input or an expected failure: one line, exit code 2. (The
  library's ConfigError is imported here, not at the top: this module imports nothing heavy, so
  that processes that must not load JAX, such as a benchmark's PyTorch worker, can use it.)"""
  from modernize.config import ConfigError  # pylint: disable=import-outside-toplevel
  return (UsageError, ConfigError)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the contract: an error is `error: MESSAGE (PROG --help: usage)` on one line and
  exit code 2; sub-parsers are of this class too; descriptions keep their line breaks."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):
    print(f'error: {message} ({self.prog} --help: usage)', file=sys.stderr)
    sys.exit(2)


def names(text: str | None, known=None, what: str = 'name', flag: str = '') -> list[str]:
  """The comma-separated names in `text` (spaces and empty items dropped), in order; with `known`
  (a collection), UsageError for the first one not in it: `FLAG: unknown WHAT 'x'; choose from
  a,b,c`."""
  items = [n.strip() for n in (text or '').split(',') if n.strip()]
  if known is not None:
    for item in items:
      if item not in known:
        raise UsageError(f'{flag + ": " if flag else ""}unknown {what} {item!r}; choose from '
                         f'{",".join(known)}')
  return items


def positive(kind=int):
  """An argparse `type`: a number of `kind` that is > 0 (its error is the one line)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f'{text!r} is not {"an integer" if kind is int else "a number"}') from None
    if value <= 0:
      raise argparse.ArgumentTypeError(f'{text} is not positive')
    return value
  parse.__name__ = f'positive {kind.__name__}'
  return parse


def guarded(main):
  """Runs `main`, turning expected errors into `error: ...` on stderr and exit code 2, Ctrl-C
  into one line and 130, and a stop after a save into its line and code."""
  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Stopped as e:
      print(f'{"interrupted" if e.code == 130 else "stopped"} ({e}): run the same command again '
            'to resume', file=sys.stderr)
      sys.exit(e.code)
    except KeyboardInterrupt:
      print('interrupted: run the same command again to resume', file=sys.stderr)
      sys.exit(130)
    except Exception as e:   # pylint: disable=broad-except
      if not isinstance(e, expected_errors()):
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  return wrapper
