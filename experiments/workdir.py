"""A workdir belongs to one run: one process trains in it at a time, under one config.

- **The claim.** A trainer holds an exclusive lock (`fcntl.flock`) on WORKDIR/run.lock while it
  works there, so two processes never train one run at once (two `ladder run` on one --out, a
  command started twice). The kernel drops the lock when its process ends, however it ends, so a
  crashed run's claim never outlives it. A run whose workdir is claimed ends with `RunInUse` (exit
  code 75, "try again later"), before it reads any data. gs:// workdirs and multi-process runs
  take no lock (an object store has no locks; a multi-host launcher starts each run once).
- **The config.** The first start writes the resolved config to WORKDIR/config.json; a later
  start whose config computes something else (another config hash) is refused in one line naming
  the fields that differ, unless it sets `resume_any=true`: then config.json becomes the new
  config, the change is appended to WORKDIR/config_changes.jsonl and recorded in the run's row
  (`config_changes`). Fields outside the hash (log and checkpoint intervals, the step table, the
  data dir and threads) may differ.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from experiments import outputs
from experiments.cli import UsageError

LOCK_NAME = 'run.lock'
CONFIG_NAME = 'config.json'
CHANGES_NAME = 'config_changes.jsonl'
# sysexits' EX_TEMPFAIL: the run is being trained by another process; try again later.
IN_USE_EXIT = 75


class RunInUse(Exception):
  """Another process holds the workdir's claim: it is training this run now."""


class Claim:
  """The claim on a local workdir (a context manager): `RunInUse` if another process holds it."""

  def __init__(self, workdir: str, wait_s: float = 1.0):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s   # rides over another process's brief probe
    while True:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          holder = os.pread(self._fd, 200, 0).decode(errors='replace').strip()
          os.close(self._fd)
          raise RunInUse(f'workdir {workdir} is in use by another process'
                         + (f' ({holder})' if holder else '')
                         + '; it is training this run now') from None
        time.sleep(0.05)
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f'pid {os.getpid()} on {socket.gethostname()}'.encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)   # closing the descriptor drops the lock
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def claim(workdir: str, enabled: bool = True) -> Claim | None:
  """The workdir's claim, or None where runs take none (gs://, several processes)."""
  if not enabled or outputs.is_remote(workdir):
    return None
  return Claim(workdir)


def in_use(workdir: str) -> bool:
  """Whether another process holds `workdir`'s claim now (a probe: takes and drops the lock)."""
  path = os.path.join(workdir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def _flat(values: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differing_fields(old: dict, new: dict, ignored=()) -> list[str]:
  """The dotted names of the config fields whose values differ (JSON-compared: a tuple equals the
  list it was saved as), leaving out `ignored` names."""
  a = _flat(json.loads(json.dumps(old, default=str)))
  b = _flat(json.loads(json.dumps(new, default=str)))
  return sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))


def saved_config(workdir: str) -> dict | None:
  """The config a workdir's run was started with, or None where it holds none (a new run)."""
  path = outputs.location(workdir) / CONFIG_NAME
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    raise UsageError(f'{path} is not a JSON config; it names the config of the run in '
                     f'{workdir}: restore it or use another workdir') from None


def bind_config(workdir: str, config: dict, config_hash, *, write: bool, ignored: tuple,
                resume_any: bool, update: int | None) -> str:
  """Makes `workdir` the run of `config` (a dict): config.json is written on the first start; on
  a later one whose `config_hash` (a function of a config dict) differs from config.json's,
  UsageError names the differing fields (`ignored` left out), unless `resume_any`: then the change
  (at checkpoint `update`) is recorded and config.json rewritten. `write`: this process writes
  (process 0 of several). Returns the run's recorded config changes ('' for none)."""
  path = outputs.location(workdir) / CONFIG_NAME
  changes_path = outputs.location(workdir) / CHANGES_NAME
  old = saved_config(workdir)
  if old is not None and config_hash(old) != config_hash(config):
    fields = differing_fields(old, config, ignored)
    shown = ', '.join(f'{f} ({_get(old, f)!r} -> {_get(config, f)!r})' for f in fields[:6])
    shown += ', ...' if len(fields) > 6 else ''
    if not resume_any:
      raise UsageError(
          f'workdir {workdir} holds a run of another config (config.json differs in {shown}): '
          'use another workdir, or --config.resume_any=true to continue this run under the new '
          'config (recorded in its row)')
    if write:
      change = {'update': update, 'from': config_hash(old), 'to': config_hash(config),
                'fields': fields, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
      with changes_path.open('a') as f:
        f.write(json.dumps(change) + '\n')
    old = None
  if old is None and write:
    path.write_text(json.dumps(config, indent=1, default=str))
  return recorded_changes(workdir)


def recorded_changes(workdir: str) -> str:
  """The run's config changes for its row: 'FIELD,FIELD@UPDATE' per change, ';'-separated."""
  path = outputs.location(workdir) / CHANGES_NAME
  if not path.exists():
    return ''
  changes = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return ';'.join(f'{",".join(c["fields"])}@{c["update"] if c["update"] is not None else 0}'
                  for c in changes)


def _get(values: dict, dotted: str):
  for part in dotted.split('.'):
    if not isinstance(values, dict) or part not in values:
      return None
    values = values[part]
  return values
