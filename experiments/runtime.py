"""Process-wide settings of the commands: glibc malloc settings for a training process on the CPU
(keep freed memory for reuse), the compilation cache, quiet libraries.

XLA:CPU allocates a step's temporary buffers (hundreds of MB for a ladder network) afresh on every
step. With glibc's defaults, blocks that large are mmap-ed and unmapped each time (and threads
other than the main one use their own arenas, which grow and shrink with mprotect/munmap), so
every step page-faults its whole working set back in: ~60,000 minor faults and ~0.1 s of kernel
time per ConvNeXt-T step at batch 32, 32x32 on a 2-core machine (15-20% of the step).
`keep_freed_memory()` makes all threads share the main arena, serves large blocks from it instead
of mmap, and never trims it, so a step reuses the pages of the previous one (0 faults per step).
The process's resident memory then stays at its high-water mark, which a training loop reaches
anyway. Call it before the first JAX computation (threads that already own an arena keep it).
Equivalent environment: MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647.

Also the other process-wide settings of the commands (the compilation cache, quiet libraries).
Only the standard library is imported at the top, so PyTorch processes can use it too. A CPU fast
path: the trainer applies it only where `modernize.backend.host_fast_paths()` (JAX will run on the
CPU, or `MODERNIZE_FAST_PATHS=cpu`).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
ENV_VAR = 'MODERNIZE_MALLOC_TUNING'   # '0' turns keep_freed_memory() into a no-op


def keep_freed_memory() -> bool:
  """Applies the settings above with glibc's mallopt; False if they could not be (not glibc,
  or turned off with MODERNIZE_MALLOC_TUNING=0)."""
  if os.environ.get(ENV_VAR, '1').strip() in ('0', 'false', 'no') or not sys.platform.startswith(
      'linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):   # e.g. musl: no mallopt
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def quiet_libraries() -> None:
  """Orbax reports routine events (e.g. a save waiting for the previous one) as absl warnings;
  the command lines show errors only."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)


def enable_compilation_cache() -> None:
  """Reuses compiled train steps across runs (seeds of one step, resumed runs): a step's compile
  takes 5-30 s on a small CPU. Off with MODERNIZE_COMPILATION_CACHE=0."""
  directory = os.environ.get('MODERNIZE_COMPILATION_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'modernize', 'jax'))
  if directory in ('', '0'):
    return
  import jax  # pylint: disable=import-outside-toplevel  (this module imports no more than it must)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # The depthwise conv's custom_partitioning would otherwise put a per-process pointer into the
  # cache key of every multi-device program, so that the cache never hits.
  jax.config.update('jax_remove_custom_partitioning_ptr_from_cache_key', True)
