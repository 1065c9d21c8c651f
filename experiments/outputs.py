"""Writing result files whole: a reader sees the old file or the new one, never part of one;
checking before a long run that the paths it will write can be written; and the paths a run's
workdir may take: local, mounted, or gs:// (through etils.epath)."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import re
import tempfile
import uuid

import fsspec
import numpy as np
from etils import epath


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path` (one per process), then renames it over
  `path`."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def clean(value):
  """JSON-ready: numpy -> Python, NaN / inf -> None."""
  if isinstance(value, dict):
    return {str(k): clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return clean(value.tolist())
  if isinstance(value, (np.floating, float)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, value) -> None:
  """`value` as indented JSON (NaN / inf as null), written atomically."""
  write_atomic(path, json.dumps(clean(value), indent=1, allow_nan=False) + '\n')


def _existing(path: str) -> str:
  """`path` or its nearest ancestor that exists."""
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  return path


def _probe(directory: str) -> str | None:
  """Why no file can be created in `directory`, or None (the probe file is removed)."""
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix='.write-test-')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    return e.strerror or str(e)
  return None


_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')
# Object stores a run's workdir may be on (etils.epath through gcsfs; orbax's arrays through
# TensorStore's own driver).
REMOTE_SCHEMES = ('gs',)
# etils.epath reaches gs:// through TensorFlow's gfile when TensorFlow is installed, which would
# import it into every run with a gs:// workdir; through gcsfs (fsspec) otherwise. Runs use gcsfs,
# the library the tests exercise, unless EPATH_USE_TF says otherwise.
os.environ.setdefault('EPATH_USE_TF', 'false')
# gcsfs caches directory listings per process, and TensorStore (orbax's arrays) writes past that
# cache: a cached listing would miss the checkpoints saved since, or name deleted ones. Set before
# etils.epath makes its (cached) gcsfs file system.
for _protocol in ('gs', 'gcs'):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)


def is_remote(path) -> bool:
  """Whether `path` is a URL (`gs://bucket/dir`, ...) rather than a local or mounted path."""
  return bool(_URL.match(os.fspath(path)))


def location(path) -> epath.Path:
  """`path` as an etils.epath.Path, the one API for local and gs:// paths: a local path made
  absolute (orbax wants absolute paths), a URL as it is."""
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recorded(path) -> str:
  """`path` as result files record it: relative to the repository where it lies inside it (so that
  a committed step table names no machine's directories), absolute elsewhere, a URL as it is."""
  path = os.fspath(path)
  if is_remote(path):
    return path
  path = os.path.abspath(path)
  inside = os.path.commonpath([path, REPOSITORY]) == REPOSITORY
  return os.path.relpath(path, REPOSITORY) if inside else path


def from_record(path: str) -> str:
  """A path as a result file recorded it (`recorded`), as a path to open: a relative one lies in
  the repository."""
  if is_remote(path) or os.path.isabs(path):
    return path
  return os.path.join(REPOSITORY, path)


def names(directory) -> list[str]:
  """The names in `directory` (a local path or a URL); [] where it does not exist: an object
  store holds no empty directories, so one not yet written to is not there."""
  try:
    return sorted(p.name for p in location(directory).iterdir())
  except FileNotFoundError:
    return []


def remote_problem(path, *, remote_ok: bool = False) -> str | None:
  """Why `path`, a URL, cannot be used, as words to follow the path; None for a local path (and,
  with `remote_ok`, for a gs:// URL whose file system library is installed)."""
  path = os.fspath(path)
  if not is_remote(path):
    return None
  scheme = path.split('://', 1)[0].lower()
  if not remote_ok:
    return ('is a remote URL: this path must be on a local or mounted file system '
            '(mount the bucket, e.g. with gcsfuse, and pass the mount path)')
  if scheme not in REMOTE_SCHEMES:
    return f'is a {scheme}:// URL: the only object store supported is gs://'
  if importlib.util.find_spec('gcsfs') is None:
    return "needs gcsfs to reach gs:// (pip install 'modernize[gcs]')"
  return None


def _remote_probe(directory: epath.Path) -> str | None:
  """Why no object can be written under the URL `directory`, or None (the probe is removed)."""
  probe = directory / f'.write-test-{uuid.uuid4().hex}'
  try:
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except   # each library raises its own types
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f'cannot be written ({first[:200]})'
  return None


def write_problem(path: str, *, directory: bool = False, remote_ok: bool = False) -> str | None:
  """Why `path` could not be written later, as words to follow the path ('is a directory', ...), or
  None: a file to create or append to (with `directory`: a directory to create files in). Changes
  nothing: a missing path is checked at its nearest existing ancestor, an existing file is opened
  for appending and closed unwritten. With `remote_ok` a gs:// directory is allowed, checked by
  writing and removing one small object in it."""
  remote = remote_problem(path, remote_ok=remote_ok)
  if remote:
    return remote
  if is_remote(path):
    if not directory:
      raise ValueError('only a directory is checked at a remote URL')
    return _remote_probe(location(path))
  if not os.path.lexists(path):
    ancestor = _existing(path)
    if not os.path.isdir(ancestor):
      return f'cannot be created: {ancestor} is not a directory'
    problem = _probe(ancestor)
    return problem and f'cannot be created in {ancestor} ({problem})'
  if directory:
    if not os.path.isdir(path):
      return 'is not a directory'
    problem = _probe(path)
    return problem and f'is not writable ({problem})'
  if os.path.isdir(path):
    return 'is a directory'
  try:
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
  except OSError as e:
    return f'is not writable ({e.strerror or e})'
  return None


class Log:
  """A text file written a line at a time, that readers may follow: on a local file system each
  line is appended and flushed; on an object store (which cannot append) the object is rewritten
  whole with every line, its earlier content read once at the start, so it is never seen half
  written. Lines are short and few (one per log step), so the rewrites stay small."""

  def __init__(self, path):
    self.name = os.fspath(path)
    self._remote = is_remote(self.name)
    if self._remote:
      self._path = location(self.name)
      self._text = self._path.read_text() if self._path.exists() else ''
    else:
      self._file = open(self.name, 'a')

  def write(self, line: str) -> None:
    if self._remote:
      self._text += line + '\n'
      self._path.write_text(self._text)
    else:
      self._file.write(line + '\n')
      self._file.flush()

  def close(self) -> None:
    if not self._remote:
      self._file.close()


# Errors that say where a run's files go cannot take them: the user's environment, not a bug.
STORAGE_ERRNOS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                  errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                  errno.ENOENT: 'the directory vanished', errno.EIO: 'input/output error'}
# How orbax's storage layer (tensorstore) reports the same, inside its own exception types.
_STORAGE_WORDS = (('No space left', 'no space left on device'),
                  ('RESOURCE_EXHAUSTED', 'no space left on device'),
                  ('Disk quota exceeded', 'disk quota exceeded'),
                  ('Read-only file system', 'read-only file system'),
                  ('Permission denied', 'permission denied'),
                  ('PERMISSION_DENIED', 'permission denied'))


def storage_problem(error: BaseException) -> str | None:
  """Why a failed write failed, in a few words, where the exception (or one it was raised from)
  says the storage refused it: full, over quota, read-only, not permitted, gone; None otherwise."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      return STORAGE_ERRNOS[error.errno]
    text = str(error)
    for words, problem in _STORAGE_WORDS:
      if words in text:
        return problem
    error = error.__cause__ or error.__context__
  return None
