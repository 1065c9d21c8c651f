"""Writing result files whole: a reader sees the old file or the new one, never part of one; and
checking before a long run that the paths it will write can be written."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import tempfile

import numpy as np


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


def remote_problem(path) -> str | None:
  """'is a remote URL ...' for `gs://...` and other URLs, which the suite's os-level file handling
  would quietly treat as a local directory named 'gs:'; None for a local path."""
  if _URL.match(os.fspath(path)):
    return ('is a remote URL: only local or mounted file systems are supported yet '
            '(mount the bucket, e.g. with gcsfuse, and pass the mount path)')
  return None


def write_problem(path: str, *, directory: bool = False) -> str | None:
  """Why `path` could not be written later, as words to follow the path ('is a directory', ...), or
  None: a file to create or append to (with `directory`: a directory to create files in). Changes
  nothing: a missing path is checked at its nearest existing ancestor, an existing file is opened
  for appending and closed unwritten."""
  remote = remote_problem(path)
  if remote:
    return remote
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
