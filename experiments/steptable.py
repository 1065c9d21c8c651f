"""The step table: one CSV row per finished run, shared by every run of the ladder.

Rows are appended under an exclusive lock (`fcntl.flock`) with one `write` of the whole line to a
file opened in append mode, so rows from processes finishing at once are never interleaved or lost,
and a reader never sees half a row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os

COLUMNS = (
    'ladder', 'step', 'step_index', 'seed', 'data', 'image_size', 'scale', 'epochs', 'steps',
    'batch_size', 'params', 'gmacs', 'top1', 'top5', 'test_loss', 'train_loss', 'train_img_per_s',
    'wall_s', 'device_kind', 'device_count', 'process_count', 'versions', 'git_commit',
    'config_hash', 'time', 'workdir', 'validation', 'val_top1', 'val_loss')


def _line(values: dict) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerow([values.get(c, '') for c in COLUMNS])
  return buffer.getvalue()


def append_row(path: str, row: dict) -> None:
  """Appends `row` (keys from COLUMNS) to the table at `path`, writing the header if new."""
  unknown = set(row) - set(COLUMNS)
  if unknown:
    raise ValueError(f'unknown step-table columns {sorted(unknown)}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    text = _line(row)
    header = _line(dict(zip(COLUMNS, COLUMNS)))
    if os.fstat(fd).st_size == 0:
      text = header + text
    else:
      with open(path, newline='') as f:
        first = f.readline()
      if first != header:
        raise ValueError(f'step table {path} has other columns than this version writes '
                         f'({len(first.split(","))} instead of {len(COLUMNS)}): give a new table')
    os.write(fd, text.encode())
    os.fsync(fd)
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def read_rows(path: str) -> list[dict]:
  """All rows of a step table (an empty list if there is none)."""
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    try:
      return list(csv.DictReader(f))
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
