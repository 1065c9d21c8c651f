"""The step table: one CSV row per finished run, shared by every run of the ladder.

Rows are appended under an exclusive lock (`fcntl.flock`) with one `write` of the whole line to a
file opened in append mode, so rows from processes finishing at once are never interleaved or lost,
and a reader never sees half a row. A table that cannot be read or written as one (a directory, an
unwritable path, other columns, a row of another length, a cell that should be a number) raises
`TableError`, one line naming the file.

One row per run: a run is its config hash, seed and workdir (`run_key`). `append_row` refuses, under
the lock, a row whose run the table already holds (`DuplicateRun`), or replaces that row where asked
(`replace=True`: the table is rewritten in place under the lock, its previous content kept in
PATH.bak until the new one is on disk). `duplicates` finds the rows that break the rule in a table
written otherwise (by hand, by an older version).

Older layouts: a table written before a column was added (`LAYOUTS`) stays readable (its rows read
with the column's default, `DEFAULTS`: a table without `dtype` holds float32 runs) and takes new
rows in its own layout as long as they hold the default there; a row that does not (a bfloat16 run)
needs a table of this version. A column whose default is None (`cpu_cores`) only records: an older
table takes the row without it and reads it as ''.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os

from experiments import outputs
from experiments.cli import UsageError

COLUMNS = (
    'ladder', 'step', 'step_index', 'seed', 'data', 'image_size', 'scale', 'epochs', 'steps',
    'batch_size', 'params', 'gmacs', 'top1', 'top5', 'test_loss', 'train_loss', 'train_img_per_s',
    'wall_s', 'device_kind', 'device_count', 'process_count', 'versions', 'git_commit',
    'config_hash', 'time', 'workdir', 'validation', 'val_top1', 'val_loss', 'dtype', 'cpu_cores',
    'config_changes', 'placement')

# Columns added after tables were written (at the end, in this order), with the value every row of
# an older table holds (None: unknown, recorded where the table has the column).
# cpu_cores: the CPU cores the run's process could use, on CPU (XLA's threads: their number
# changes float summation order, so a run's numbers depend on it).
# config_changes: the config fields a run was continued under after it started with others
# (`--config.resume_any=true`, experiments/training/workdir.py), 'FIELD,FIELD@UPDATE' per change;
# '' for none, which every run of an older table is.
# placement: where the run's training data lived, 'host' (the input pipeline) or 'device'
# (`data.placement` resolved, experiments/training/placement.py); only recorded (older tables hold
# host runs, and take a row without it).
DEFAULTS = {'dtype': 'float32', 'cpu_cores': None, 'config_changes': '', 'placement': None}
# The layouts this version appends to: its own, then the older ones (the last columns missing).
LAYOUTS = tuple(COLUMNS[:len(COLUMNS) - k] for k in range(len(DEFAULTS) + 1))


class TableError(UsageError, ValueError):
  """A step table that is not one, or cannot be written: the message names the file."""


class DuplicateRun(TableError):
  """The table already holds a row of the run being added."""


def run_key(row: dict) -> tuple[str, str, str] | None:
  """What identifies a run in a table: (config hash, seed, workdir, the workdir as
  `outputs.recorded` writes it); None for a row without a hash."""
  if not row.get('config_hash'):
    return None
  workdir = row.get('workdir') or ''
  return row['config_hash'], str(row.get('seed', '')), workdir and outputs.recorded(
      outputs.from_record(workdir))


def describe(row: dict) -> str:
  """A run named for messages: step, seed, config hash and workdir."""
  return (f"{row.get('step', '?')} seed {row.get('seed', '?')} (config {row.get('config_hash')}, "
          f"workdir {row.get('workdir') or '?'})")


def _line(values: dict, columns: tuple[str, ...] = COLUMNS) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerow([values.get(c, '') for c in columns])
  return buffer.getvalue()


HEADER = _line(dict(zip(COLUMNS, COLUMNS)))


def _layout(path: str, row: dict) -> tuple[tuple[str, ...] | None, str | None]:
  """(the columns a row goes into below the first line of the non-empty table at `path`, None) or
  (None, why it cannot go there)."""
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    first = f.readline()
  for columns in LAYOUTS:
    if first != _line(dict(zip(columns, columns)), columns):
      continue
    missing = {c: str(row[c]) for c in COLUMNS if c not in columns and c in row
               and DEFAULTS.get(c, '') is not None and str(row[c]) not in ('', DEFAULTS.get(c))}
    if missing:
      return None, (f'is of an older layout without column(s) {sorted(missing)}, which this run '
                    f'sets ({missing}): give a new table')
    return columns, None
  return None, (f'has other columns than this version writes ({len(first.split(","))} instead '
                f'of {len(COLUMNS)}): give a new table')


def check_writable(path: str, row: dict | None = None) -> None:
  """TableError unless `append_row` could add `row` (or a row holding the defaults) to `path`
  (before a long run, so that its end does not fail). Changes nothing."""
  problem = outputs.write_problem(path)
  if not problem and os.path.isfile(path) and os.path.getsize(path):
    problem = _layout(path, row or {})[1]
  if problem:
    raise TableError(f'step table {path} {problem}')


def append_row(path: str, row: dict, replace: bool = False) -> list[int]:
  """Appends `row` (keys from COLUMNS) to the table at `path`, writing the header if new; returns
  []. Where the table holds a row of the same run (`run_key`): `DuplicateRun` naming its line, or
  with `replace` that row is replaced (the first, in place; any other of the run removed) and the
  lines it held are returned."""
  unknown = set(row) - set(COLUMNS)
  if unknown:
    raise ValueError(f'unknown step-table columns {sorted(unknown)}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    if os.fstat(fd).st_size == 0:
      _write(fd, path, HEADER + _line(row), 0)
      return []
    columns, problem = _layout(path, row)
    if problem:
      raise TableError(f'step table {path} {problem}')
    key, same = run_key(row), []
    if key:   # a row without a config hash (a test's, a hand-made one) names no run
      with open(path, newline='', encoding='utf-8', errors='replace') as f:
        text = f.read()
      lines = text.splitlines(keepends=True)   # a row is one line (no cell holds a line break)
      same = [i for i, line in enumerate(lines) if i and line.strip() and
              run_key(dict(zip(columns, next(csv.reader([line]))))) == key]
    if not same:
      _write(fd, path, _line(row, columns), os.fstat(fd).st_size)
      return []
    if not replace:
      raise DuplicateRun(f'step table {path} already holds the row of {describe(row)} (line '
                         f'{same[0] + 1}): a run counts once')
    kept = [_line(row, columns) if i == same[0] else line for i, line in enumerate(lines)
            if i == same[0] or i not in same]
    _rewrite(fd, path, text, ''.join(kept))
    return [i + 1 for i in same]
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _write(fd: int, path: str, text: str, size: int) -> None:
  """Appends `text` at `size` (the end) with one write; on failure the table is cut back to
  `size`, as it was, and TableError says why."""
  try:
    os.write(fd, text.encode())
    os.fsync(fd)
  except OSError as e:   # e.g. a full disk: the table stays as it was, never with half a row
    os.ftruncate(fd, size)
    problem = outputs.storage_problem(e) or e.strerror or str(e)
    raise TableError(f'step table {path} cannot be written ({problem}); it is unchanged') \
        from None


def _rewrite(fd: int, path: str, old: str, new: str) -> None:
  """Replaces the (locked) table's content `old` by `new` in place, so that writers waiting on the
  lock keep appending to this file; PATH.bak holds `old` until `new` is on disk."""
  backup = f'{path}.bak'
  try:
    outputs.write_atomic(backup, old)
    os.ftruncate(fd, 0)
    os.write(fd, new.encode())
    os.fsync(fd)
  except OSError as e:
    os.ftruncate(fd, 0)
    os.write(fd, old.encode())
    problem = outputs.storage_problem(e) or e.strerror or str(e)
    raise TableError(f'step table {path} cannot be rewritten ({problem}); it is unchanged') \
        from None
  os.remove(backup)


def _records(path: str, reader) -> tuple[list[dict], list[int]]:
  """The rows below the header, each a dict, and the line each ends on; TableError at a row with
  another number of fields."""
  header = next(reader, None)
  rows, lines = [], []
  for fields in reader:
    if not fields:   # a blank line
      continue
    if len(fields) != len(header):
      raise TableError(f'step table {path}, line {reader.line_num}: {len(fields)} fields where '
                       f'the header has {len(header)}')
    row = dict(zip(header, fields))
    for column, default in DEFAULTS.items():   # a table from before the column: its default
      if column not in row:
        row[column] = '' if default is None else default
    rows.append(row)
    lines.append(reader.line_num)
  return rows, lines


def rows_and_lines(path: str) -> tuple[list[dict], list[int]]:
  """`read_rows` and the line of each row."""
  if not os.path.exists(path):
    return [], []
  try:
    with open(path, newline='', encoding='utf-8') as f:
      fcntl.flock(f.fileno(), fcntl.LOCK_SH)
      try:
        return _records(path, csv.reader(f))
      finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
  except IsADirectoryError:
    raise TableError(f'step table {path} is a directory') from None
  except OSError as e:
    raise TableError(f'step table {path} cannot be read ({e.strerror or e})') from None
  except UnicodeDecodeError:
    raise TableError(f'step table {path} is not a text (UTF-8) file') from None
  except csv.Error as e:
    raise TableError(f'step table {path} is not a CSV table ({e})') from None


def read_rows(path: str) -> list[dict]:
  """All rows of a step table (an empty list if there is none, or the file is empty; a column of
  `DEFAULTS` that a table of an older layout lacks reads as its default); TableError
  for a path that is not a CSV table (a directory, unreadable, not UTF-8 text, ragged rows)."""
  return rows_and_lines(path)[0]


def runs_of(path: str, key: tuple[str, str]) -> list[tuple[dict, int]]:
  """The rows of the run `key` (`run_key`) in the table at `path`, each with its line."""
  rows, lines = rows_and_lines(path)
  return [(r, line) for r, line in zip(rows, lines) if run_key(r) == key]


def duplicates(path: str, key=run_key) -> list[tuple[dict, list[int]]]:
  """The groups of rows of the table at `path` that share `key(row)` (default `run_key`: rows of
  one run; rows whose key is None are left out), each as (its first row, the lines of its rows)."""
  rows, lines = rows_and_lines(path)
  by_key: dict[tuple, list[int]] = {}
  first = {}
  for row, line in zip(rows, lines):
    k = key(row)
    if k is not None:
      by_key.setdefault(k, []).append(line)
      first.setdefault(k, row)
  return [(first[k], v) for k, v in by_key.items() if len(v) > 1]


def _is_number(value: str, integer: bool = False) -> bool:
  try:
    (int if integer else float)(value)
  except ValueError:
    return False
  return True


_KINDS = {
    'text': lambda v: True,
    'an integer': lambda v: _is_number(v, integer=True),
    'a number': _is_number,
    'a number or empty': lambda v: v == '' or _is_number(v),
}


def check_columns(path: str, rows: list[dict], columns: dict[str, str],
                  optional: tuple[str, ...] = ()) -> None:
  """TableError naming `path` unless every row has each of `columns` (those in `optional` may be
  missing from the table) holding what it maps to: 'text', 'an integer', 'a number' or 'a number
  or empty'."""
  if not rows:
    return
  missing = [c for c in columns if c not in rows[0] and c not in optional]
  if missing:
    raise TableError(f'step table {path} has no column(s) {missing}')
  for i, row in enumerate(rows, 1):
    for column, kind in columns.items():
      value = row.get(column)
      if value is not None and not _KINDS[kind](value):
        raise TableError(f'step table {path}, row {i}: {column} must be {kind}, not {value!r}')
