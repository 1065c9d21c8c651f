"""Writing result files whole: a reader sees the old file or the new one, never part of one."""

from __future__ import annotations

import json
import math
import os

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
