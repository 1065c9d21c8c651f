"""Which path runs where: the CPU fast paths or XLA's standard ops, decided in one place.

The CPU fast paths (hand-written BatchNorm / LayerNorm / max-pool VJPs, the erf GELU, the per-shape
dense-conv plans of `modernize.conv`, the native depthwise kernel of `modernize.depthwise`, and the
trainer's glibc malloc tuning in `experiments/runtime.py`) were written for and measured on XLA:CPU.
On GPUs and TPUs XLA's standard ops run instead (autodiff of the plain formulas, `reduce_window`,
`jax.nn.gelu(approximate=False)`, XLA's convs) until a measurement on an accelerator shows a fast
path faster there.

The choice:
  `MODERNIZE_FAST_PATHS`  'auto' (default): the fast paths where JAX's default backend is 'cpu'
                          (read at trace time); 'cpu': always the fast paths; 'xla': always XLA's
                          standard ops (what a GPU/TPU runs, e.g. to test it on a CPU).
  `set_fast_paths(...)`   the same as a module-level switch (tests); it wins over the variable.
  `forced(...)`           a context manager around `set_fast_paths`.
The per-op variables `MODERNIZE_CONV_IMPL` and `MODERNIZE_DEPTHWISE_IMPL` (and an explicit `impl=`)
still pick one op's implementation and win over this switch for that op.

This module imports only the standard library at import time (JAX is imported when a decision is
made), so that `expected_platform()` can run before JAX starts.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
from typing import Callable

ENV_VAR = 'MODERNIZE_FAST_PATHS'
CHOICES = ('auto', 'cpu', 'xla')

_forced: str | None = None


def set_fast_paths(choice: str | None) -> None:
  """Forces the choice for this process ('auto', 'cpu' or 'xla'); None returns to the variable.
  Decisions are made at trace time: functions jitted before the change keep their programs."""
  global _forced
  if choice is not None and choice not in CHOICES:
    raise ValueError(f'set_fast_paths: expected one of {CHOICES} or None, got {choice!r}')
  _forced = choice


@contextlib.contextmanager
def forced(choice: str | None):
  """`with forced('xla'): ...` traces XLA's standard ops even on a CPU."""
  previous = _forced
  set_fast_paths(choice)
  try:
    yield
  finally:
    set_fast_paths(previous)


def choice() -> str:
  """'auto', 'cpu' or 'xla': the module switch, else `$MODERNIZE_FAST_PATHS`, else 'auto'."""
  if _forced is not None:
    return _forced
  value = os.environ.get(ENV_VAR, '').strip().lower() or 'auto'
  if value not in CHOICES:
    raise ValueError(f'${ENV_VAR}={value!r}; expected one of {CHOICES}')
  return value


def fast_paths() -> bool:
  """Whether the CPU fast paths are taken in what is being traced now."""
  c = choice()
  if c != 'auto':
    return c == 'cpu'
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == 'cpu'


def resolve(op: str, impl: str, impls: tuple[str, ...], env_var: str, dtype,
            fast: Callable[[], str]) -> str:
  """The implementation of `op` that `impl` names here, for the ops with several (`modernize.conv`,
  `modernize.depthwise`): an explicit one wins; 'auto' reads `$env_var`; still 'auto', `fast()`
  where the CPU fast paths are taken and `dtype` is float32 (the non-XLA implementations are
  float32-only), else 'xla'."""
  if impl not in impls:
    raise ValueError(f'{op}: impl must be one of {impls}, got {impl!r}')
  if impl == 'auto':
    impl = os.environ.get(env_var, '').strip().lower() or 'auto'
    if impl not in impls:
      raise ValueError(f'${env_var}={impl!r}; expected one of {impls}')
  if impl != 'auto':
    return impl
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  if not fast_paths() or jnp.dtype(dtype) != jnp.float32:
    return 'xla'
  return fast()


def expected_platform() -> str:
  """'cpu', 'gpu' or 'tpu': where JAX will compute, guessed without starting it (for settings that
  must be made before JAX's threads start, such as glibc's malloc options).

  `$JAX_PLATFORMS` decides when set (its first entry); otherwise 'gpu' / 'tpu' when a JAX plugin
  for one is installed and its device nodes exist, else 'cpu'.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    first = platforms.split(',')[0].strip()
    return {'cuda': 'gpu', 'rocm': 'gpu', 'gpu': 'gpu', 'tpu': 'tpu'}.get(first, 'cpu')
  names = set()
  try:
    names |= {e.name for e in importlib.metadata.entry_points(group='jax_plugins')}
  except Exception:  # noqa: BLE001 - a broken metadata entry must not stop training
    pass
  try:
    spec = importlib.util.find_spec('jax_plugins')
    if spec is not None and spec.submodule_search_locations:
      names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  except (ImportError, ValueError):
    pass
  for top in ('libtpu',):
    if importlib.util.find_spec(top) is not None:
      names.add(top)
  text = ' '.join(names).lower()
  if ('cuda' in text and glob.glob('/dev/nvidia[0-9]*')) or ('rocm' in text and
                                                            os.path.exists('/dev/kfd')):
    return 'gpu'
  if 'tpu' in text and (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    return 'tpu'
  return 'cpu'


def host_fast_paths() -> bool:
  """`fast_paths()` for decisions made before JAX starts (the trainer's malloc tuning)."""
  c = choice()
  if c != 'auto':
    return c == 'cpu'
  return expected_platform() == 'cpu'
