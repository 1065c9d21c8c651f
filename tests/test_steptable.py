"""The step table under contention: writers that start together lose no row, split none, and write
one header. These fail when `append_row` loses its lock or writes a row in pieces (checked by
planting both bugs: tests/mutations.toml)."""

import csv
import os
import subprocess
import sys
import time

from experiments.training import steptable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITERS = 8

# Each writer imports, then waits for the go file, so that all of them append at the same moment.
WRITER = r'''
import os, sys, time
from experiments.training import steptable
go, writer, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tables = sys.argv[4:]
while not os.path.exists(go):
  time.sleep(0.0005)
for j in range(rows):
  for table in tables:
    # Every third row is larger than a pipe buffer (64 KiB), so one write() cannot hide a race.
    steptable.append_row(table, {'step': f'w{writer}', 'seed': j, 'top1': 1.5 * writer,
                                 'versions': ('x' if j % 3 else 'y' * 70_000)})
'''


def _contend(tmp_path, tables, rows):
  go = str(tmp_path / 'go')
  procs = [subprocess.Popen([sys.executable, '-c', WRITER, go, str(w), str(rows), *tables],
                            cwd=ROOT) for w in range(WRITERS)]
  time.sleep(3.0)                    # every writer imported and waiting (a guard, not a timing)
  open(go, 'w').close()
  assert all(p.wait(timeout=300) == 0 for p in procs)
  result = []
  for table in tables:
    with open(table, newline='') as f:
      result.append(list(csv.reader(f)))
  return result


def test_writers_that_start_together_lose_and_split_no_row(tmp_path):
  rows_per_writer = 30
  (rows,) = _contend(tmp_path, [str(tmp_path / 'steps.csv')], rows_per_writer)
  assert rows[0] == list(steptable.COLUMNS)
  body = rows[1:]
  assert all(len(r) == len(steptable.COLUMNS) for r in body)
  col = {c: i for i, c in enumerate(steptable.COLUMNS)}
  seen = sorted((r[col['step']], int(r[col['seed']])) for r in body)
  assert seen == sorted((f'w{w}', j) for w in range(WRITERS) for j in range(rows_per_writer))
  for r in body:   # no row carries another's bytes
    assert r[col['versions']] == ('x' if int(r[col['seed']]) % 3 else 'y' * 70_000)
  # And the table reads back through the public reader.
  assert len(steptable.read_rows(str(tmp_path / 'steps.csv'))) == WRITERS * rows_per_writer


def test_one_header_when_writers_create_the_table_together(tmp_path):
  tables = [str(tmp_path / f'steps{i}.csv') for i in range(25)]
  for rows in _contend(tmp_path, tables, 1):
    assert rows[0] == list(steptable.COLUMNS)
    assert sum(r == list(steptable.COLUMNS) for r in rows) == 1
    assert len(rows) == 1 + WRITERS


def test_a_writer_waits_while_another_holds_the_table(tmp_path):
  """The lock itself: while this process holds the table's lock, a writer adds nothing."""
  import fcntl
  table = str(tmp_path / 'steps.csv')
  steptable.append_row(table, {'step': 'first', 'seed': 0})
  before = open(table).read()
  go = str(tmp_path / 'go')
  open(go, 'w').close()
  with open(table, 'a') as held:
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    writer = subprocess.Popen([sys.executable, '-c', WRITER, go, '1', '1', table], cwd=ROOT)
    try:
      writer.wait(timeout=20)           # time enough to import and append, were it not locked
    except subprocess.TimeoutExpired:
      pass
    assert writer.poll() is None and open(table).read() == before
    fcntl.flock(held.fileno(), fcntl.LOCK_UN)
  assert writer.wait(timeout=120) == 0
  assert [r['step'] for r in steptable.read_rows(table)] == ['first', 'w1']
