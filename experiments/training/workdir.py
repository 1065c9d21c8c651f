"""A workdir belongs to one run: one process trains in it at a time, under one config.

- **The claim.** A trainer holds an exclusive lock (`fcntl.flock`) on WORKDIR/run.lock while it
  works there, so two processes never train one run at once (two `ladder run` on one --out, a
  command started twice). The kernel drops the lock when its process ends, however it ends, so a
  crashed run's claim never outlives it. A run whose workdir is claimed ends with `RunInUse` (exit
  code 75, "try again later"), before it reads any data. gs:// workdirs and multi-process runs
  take no lock (an object store has no locks; a multi-host launcher starts each run once).
- **The config.** The first start writes the resolved config to WORKDIR/config.json (once it is
  set up: a run that fails before leaves none); a later start whose config computes something else
  (another config hash) is refused in one line naming the fields that differ, unless it sets
  `resume_any=true`: then config.json becomes the new config, the change is appended to
  WORKDIR/config_changes.jsonl and recorded in the run's row (`config_changes`). Fields outside
  the hash (log and checkpoint intervals, the step table, the data dir and threads) may differ.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class Binding:
  """What `check_config` found: the run's config, and the change (its fields, the hashes) when the
  workdir held another config and `resume_any` allowed it."""
  workdir: str
  config: dict
  new: bool                         # no config.json yet: the run's first start
  change: dict | None = None

  def record(self, update: int | None) -> str:
    """Writes config.json (first start, or after a change: then the change, at checkpoint
    `update`, goes to config_changes.jsonl); returns the run's config changes for its row."""
    if self.change is not None:
      with (outputs.location(self.workdir) / CHANGES_NAME).open('a') as f:
        f.write(json.dumps({'update': update, **self.change}) + '\n')
    if self.new or self.change is not None:
      (outputs.location(self.workdir) / CONFIG_NAME).write_text(
          json.dumps(self.config, indent=1, default=str))
    return recorded_changes(self.workdir)


def check_config(workdir: str, config: dict, config_hash, *, ignored: tuple,
                 resume_any: bool) -> Binding:
  """Whether `workdir` may run `config` (a dict): yes on a first start, or where config.json's
  `config_hash` (a function of a config dict) is the config's; otherwise UsageError naming the
  differing fields (`ignored` left out), unless `resume_any`. Writes nothing (`Binding.record`
  does, once the run is set up)."""
  old = saved_config(workdir)
  if old is None or config_hash(old) == config_hash(config):
    return Binding(workdir, config, new=old is None)
  fields = differing_fields(old, config, ignored)
  shown = ', '.join(f'{f} ({_get(old, f)!r} -> {_get(config, f)!r})' for f in fields[:6])
  shown += ', ...' if len(fields) > 6 else ''
  if not resume_any:
    raise UsageError(
        f'workdir {workdir} holds a run of another config (config.json differs in {shown}): '
        'use another workdir, or --config.resume_any=true to continue this run under the new '
        'config (recorded in its row)')
  return Binding(workdir, config, new=False, change={
      'from': config_hash(old), 'to': config_hash(config), 'fields': fields,
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z')})


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


def make(workdir: str) -> None:
  """Creates `workdir` (`validate` has already found that it can be written)."""
  try:
    outputs.location(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f'workdir {workdir!r} cannot be created: {e.strerror}') from None


def identity(workdir: str) -> tuple[int, int] | None:
  """The local `workdir`'s identity (device, inode); None for a gs:// one (an object store has no
  directories to delete or replace)."""
  if outputs.is_remote(workdir):
    return None
  st = os.stat(workdir)
  return st.st_dev, st.st_ino


def check_same(workdir: str, expected: tuple[int, int] | None) -> None:
  """UsageError if the local `workdir` was deleted or replaced during the run (orbax would quietly
  make a new one, and the logs written so far would be lost with the old)."""
  if expected is None:
    return
  try:
    same = identity(workdir) == expected
  except OSError:
    same = False
  if not same:
    raise UsageError(f'workdir {workdir} vanished during the run (deleted or moved); '
                     'run again to start over there')
