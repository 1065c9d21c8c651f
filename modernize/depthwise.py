"""Depthwise 2-D convolution that is fast on XLA:CPU as well as on GPU/TPU.

XLA:CPU runs ``lax.conv_general_dilated(..., feature_group_count=C)`` about 100x slower per
FLOP than a dense convolution, and its gradients are slower still, which makes it the
bottleneck of every ConvNeXt-style network on a CPU.  This module offers interchangeable
implementations of one operation::

    y[n, i, j, c] = sum_{a, b} x[n, i*s - p + a, j*s - p + b, c] * kernel[a, b, 0, c]

with ``p = k // 2`` zero padding on every side (PyTorch's ``padding=k//2``), odd ``k`` and
stride ``s`` in {1, 2}:

* ``'xla'``    ``lax.conv_general_dilated`` with ``feature_group_count=C``: the reference,
               and what GPUs and TPUs should use.
* ``'shift'``  pure ``jax.numpy``: a sum of k*k shifted, strided slices times one kernel tap,
               with a custom VJP (input gradient = the same op on the stride-dilated
               cotangent with the flipped kernel; weight gradient = k*k reductions).
* ``'native'`` C++ kernels (``modernize/_native/depthwise.cc``) called through the XLA FFI:
               forward, input gradient and weight gradient, channels innermost and
               vectorised, split over XLA's intra-op thread pool.  Compiled with g++ on first
               use into a per-user cache (see :func:`native_library_path`).  Sharded batches
               (and channels) are partitioned with ``custom_partitioning``, so each device
               runs the kernel on its own shard; ``jax.vmap`` is supported by folding the
               mapped axis into the batch (or channel) axis.
* ``'auto'``   ``'native'`` on CPU for float32 (``'shift'`` with one warning if no C++
               compiler works), ``'xla'`` on GPU/TPU and for every other dtype: the native
               kernel is float32-only, so bfloat16 (mixed precision) runs XLA's grouped conv
               on CPU too (slow there, but mixed precision on a CPU is for tests: train in
               float32 for speed).  "On CPU" is `modernize.backend.fast_paths()`: JAX's
               default backend, unless ``$MODERNIZE_FAST_PATHS`` says otherwise.

The default for ``impl='auto'`` can be overridden with the environment variable
``MODERNIZE_DEPTHWISE_IMPL`` (read at trace time); an explicit ``impl=`` argument wins.
The result has the inputs' dtype (bfloat16 in, bfloat16 out).  Given bfloat16/float16 inputs,
``'shift'`` and ``'native'`` accumulate in float32 (the inputs are cast up inside the op and the
result cast back), as GPU convolution libraries accumulate bfloat16 convs in float32.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from modernize import backend

__all__ = [
    'IMPLS',
    'ENV_VAR',
    'DepthwiseConv',
    'depthwise_conv2d',
    'resolve_impl',
    'native_available',
    'native_library_path',
    'NativeBuildError',
]

IMPLS = ('auto', 'xla', 'shift', 'native')
ENV_VAR = 'MODERNIZE_DEPTHWISE_IMPL'
_FAST_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class NativeBuildError(RuntimeError):
  """The C++ depthwise kernel could not be compiled or loaded."""


# ------------------------------------------------------------------------------------------
# Argument checks and implementation choice
# ------------------------------------------------------------------------------------------


def _check_args(x, kernel, stride) -> None:
  if x.ndim != 4:
    raise ValueError(f'depthwise_conv2d: x must be 4-D NHWC, got shape {x.shape}')
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 1:
    raise ValueError(
        f'depthwise_conv2d: kernel must have shape (k, k, 1, C), got {kernel.shape}')
  k = kernel.shape[0]
  if k % 2 != 1:
    raise ValueError(f'depthwise_conv2d: kernel size must be odd, got {k}')
  if kernel.shape[3] != x.shape[3]:
    raise ValueError(
        f'depthwise_conv2d: kernel has {kernel.shape[3]} channels, x has {x.shape[3]}')
  if isinstance(stride, bool) or stride not in (1, 2):
    raise ValueError(f'depthwise_conv2d: stride must be 1 or 2, got {stride!r}')


def _out_size(n: int, k: int, s: int) -> int:
  return (n + 2 * (k // 2) - k) // s + 1


def resolve_impl(impl: str = 'auto', dtype=jnp.float32) -> str:
  """The concrete implementation (``'xla'``, ``'shift'`` or ``'native'``) ``impl`` means.

  ``'auto'`` first looks at ``$MODERNIZE_DEPTHWISE_IMPL``; if that is unset or ``'auto'`` it
  picks by `modernize.backend.fast_paths()` (the default device's backend): ``'native'`` on
  CPU for float32 (``'shift'`` if the C++ kernel cannot be built), ``'xla'`` elsewhere and for
  other dtypes (the native kernel is float32-only: bfloat16 falls back to XLA's op).
  """
  return backend.resolve('depthwise_conv2d', impl, IMPLS, ENV_VAR, dtype,
                         lambda: 'native' if native_available(warn=True) else 'shift')


# ------------------------------------------------------------------------------------------
# 'xla': grouped convolution (reference)
# ------------------------------------------------------------------------------------------


def _conv_xla(x, kernel, stride):
  p = kernel.shape[0] // 2
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((p, p), (p, p)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[3])


# ------------------------------------------------------------------------------------------
# 'shift': shifted multiply-adds with a custom VJP
# ------------------------------------------------------------------------------------------


def _tap(xp, a, b, s, ho, wo):
  """xp[:, a + s*i, b + s*j, :] for i < ho, j < wo."""
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, a, b, 0), (n, a + s * (ho - 1) + 1, b + s * (wo - 1) + 1, c),
                   (1, s, s, 1))


def _shift_valid(xp, kernel, s, ho, wo):
  k = kernel.shape[0]
  y = None
  for a in range(k):
    for b in range(k):
      t = _tap(xp, a, b, s, ho, wo) * kernel[a, b, 0]
      y = t if y is None else y + t
  return y


def _shift_fwd_impl(x, kernel, s):
  k = kernel.shape[0]
  p = k // 2
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return _shift_valid(xp, kernel, s, _out_size(h, k, s), _out_size(w, k, s))


def _shift_dx(g, kernel, s, h, w):
  # dx[i] = sum_t g_dil[i - p + t] * flip(kernel)[t], g_dil = g with s-1 zeros in between.
  k = kernel.shape[0]
  p = k // 2
  ho, wo = g.shape[1], g.shape[2]
  zero = jnp.zeros((), g.dtype)
  gp = lax.pad(g, zero, ((0, 0, 0), (p, h + p - (s * (ho - 1) + 1), s - 1),
                         (p, w + p - (s * (wo - 1) + 1), s - 1), (0, 0, 0)))
  return _shift_valid(gp, kernel[::-1, ::-1], 1, h, w)


def _shift_dw(x, g, s, k):
  # dw[a, b] = sum over batch and space of g * (x shifted by (a, b)).  A scan over the k
  # kernel rows (the k columns unrolled) compiles several times faster than k*k unrolled
  # reductions and runs at least as fast.
  p = k // 2
  ho, wo = g.shape[1], g.shape[2]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

  def kernel_row(carry, a):
    rows = lax.dynamic_slice_in_dim(xp, a, s * (ho - 1) + 1, axis=1)
    if s > 1:
      rows = rows[:, ::s]
    taps = [jnp.sum(lax.slice_in_dim(rows, b, b + s * (wo - 1) + 1, s, axis=2) * g,
                    axis=(0, 1, 2)) for b in range(k)]
    return carry, jnp.stack(taps)

  _, dw = lax.scan(kernel_row, None, jnp.arange(k))
  return dw.reshape(k, k, 1, x.shape[3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift(x, kernel, s):
  return _shift_fwd_impl(x, kernel, s)


def _shift_fwd(x, kernel, s):
  return _shift_fwd_impl(x, kernel, s), (x, kernel)


def _shift_bwd(s, res, g):
  x, kernel = res
  return _shift_dx(g, kernel, s, x.shape[1], x.shape[2]), _shift_dw(x, g, s, kernel.shape[0])


_shift.defvjp(_shift_fwd, _shift_bwd)


# ------------------------------------------------------------------------------------------
# 'native': C++ kernels through the XLA FFI
# ------------------------------------------------------------------------------------------

_SRC = Path(__file__).resolve().parent / '_native' / 'depthwise.cc'
_CXX_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-pthread',
              '-fno-math-errno')
_TARGETS = {'fwd': 'modernize_dw_fwd', 'dx': 'modernize_dw_dx', 'dw': 'modernize_dw_dw'}
_SYMBOLS = {'fwd': 'ModernizeDwFwd', 'dx': 'ModernizeDwDx', 'dw': 'ModernizeDwDw'}

_native_lock = threading.Lock()
_native_state: dict = {}  # 'lib' -> CDLL | 'error' -> NativeBuildError | 'warned' -> bool


def _cache_dir() -> Path:
  if os.environ.get('MODERNIZE_CACHE_DIR'):
    return Path(os.environ['MODERNIZE_CACHE_DIR'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return Path(base) / 'modernize'


def _compiler() -> str:
  cxx = os.environ.get('MODERNIZE_CXX') or os.environ.get('CXX') or 'g++'
  path = shutil.which(cxx)
  if path is None:
    raise NativeBuildError(f'no C++ compiler: {cxx!r} not found on PATH '
                           '(set MODERNIZE_CXX or CXX)')
  return path


def _cpu_signature() -> str:
  # -march=native depends on the CPU: key the cache on it (shared home directories).
  sig = platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith(('flags', 'model name', 'Features')):
          sig += line
        if line.strip() == '':
          break
  except OSError:
    pass
  return sig


def native_library_path() -> Path:
  """Where the compiled kernel for this source, jax version, compiler and CPU lives."""
  cxx = _compiler()
  try:
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[0]
  except (OSError, subprocess.SubprocessError, IndexError) as e:
    raise NativeBuildError(f'cannot run {cxx} --version: {e}') from e
  import jaxlib
  h = hashlib.sha256()
  for part in (_SRC.read_bytes(), jax.__version__.encode(),
               getattr(jaxlib, '__version__', '').encode(), cxx.encode(), version.encode(),
               ' '.join(_CXX_FLAGS).encode(), _cpu_signature().encode()):
    h.update(part)
    h.update(b'\0')
  return _cache_dir() / f'depthwise-{h.hexdigest()[:20]}.so'


def _build(so: Path) -> None:
  so.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.depthwise-', suffix='.so', dir=so.parent)
  os.close(fd)
  cmd = [_compiler(), *_CXX_FLAGS, '-I', jax.ffi.include_dir(), str(_SRC), '-o', tmp]
  try:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
      raise NativeBuildError(
          'compiling the depthwise kernel failed:\n' + ' '.join(cmd) + '\n'
          + r.stderr[-4000:])
    os.replace(tmp, so)  # atomic: a racing process sees either nothing or a whole file
  except (OSError, subprocess.SubprocessError) as e:
    raise NativeBuildError(f'compiling the depthwise kernel failed: {e}') from e
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load_native():
  """Compile (once per cache key), load and register the kernels; raise NativeBuildError."""
  with _native_lock:
    if 'lib' in _native_state:
      return _native_state['lib']
    if 'error' in _native_state:
      raise _native_state['error']
    try:
      if not _SRC.exists():
        raise NativeBuildError(f'missing kernel source {_SRC}')
      so = native_library_path()
      if not so.exists():
        _build(so)
      try:
        lib = ctypes.CDLL(str(so))
      except OSError:  # e.g. a truncated file from an older, non-atomic writer
        _build(so)
        lib = ctypes.CDLL(str(so))
      for op, target in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[op])), platform='cpu')
    except NativeBuildError as e:
      _native_state['error'] = e
      raise
    except Exception as e:  # noqa: BLE001 - surface any loader failure uniformly
      err = NativeBuildError(f'loading the depthwise kernel failed: {e!r}')
      _native_state['error'] = err
      raise err from e
    _native_state['lib'] = lib
    return lib


def native_available(warn: bool = False) -> bool:
  """True if the C++ kernel is (or can now be) compiled and registered."""
  try:
    _load_native()
    return True
  except NativeBuildError as e:
    if warn and not _native_state.get('warned'):
      _native_state['warned'] = True
      warnings.warn(f'modernize.depthwise: native kernel unavailable, using the '
                    f"'shift' implementation instead ({e})", RuntimeWarning,
                    stacklevel=3)
    return False


def _ffi(op, out_shape, *args, stride):
  return jax.ffi.ffi_call(_TARGETS[op], jax.ShapeDtypeStruct(out_shape, jnp.float32))(
      *args, stride=np.int64(stride))


def _ffi_fwd(x, kernel, s):
  n, h, w, c = x.shape
  k = kernel.shape[0]
  return _ffi('fwd', (n, _out_size(h, k, s), _out_size(w, k, s), c), x, kernel, stride=s)


def _ffi_dx(g, kernel, s, h, w):
  return _ffi('dx', (g.shape[0], h, w, g.shape[3]), g, kernel, stride=s)


def _ffi_dw(x, g, s, k):
  return _ffi('dw', (k, k, 1, x.shape[3]), x, g, stride=s)


# --- sharding: keep batch (and channel) sharding, replicate the spatial dims ---------------

def _spec4(sharding):
  spec = tuple(getattr(sharding, 'spec', ()) or ())
  return spec + (None,) * (4 - len(spec))


def _batch_channel_axes(shapes, batch_dims):
  """Mesh axes for batch and channels: the first sharded one among the given arrays.

  ``shapes`` are ShapeDtypeStructs with shardings; ``batch_dims[i]`` says whether array i
  has a batch dim (activations) or not (kernels).
  """
  b = c = None
  for shape, has_batch in zip(shapes, batch_dims):
    spec = _spec4(shape.sharding)
    if b is None and has_batch:
      b = spec[0]
    if c is None:
      c = spec[3]
  if b is not None and c is not None and set(_axes_tuple(b)) & set(_axes_tuple(c)):
    c = None  # the same mesh axis cannot shard both
  return b, c


def _axes_tuple(entry):
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


_SPATIAL = ('h', 'w', 'kh', 'kw', 'one', 'oh', 'ow')


def _replicated_factors(rule):
  # Shardy wants the special factors in the order they first appear in the rule.
  seen = []
  for f in rule.replace(',', ' ').replace('->', ' ').split():
    if f in _SPATIAL and f not in seen:
      seen.append(f)
  return tuple(seen)


def _partitioned(name, lower, *, reduce_batch):
  """custom_partitioning for an op whose two inputs and one output are NHWC/kernel shaped.

  ``lower(a, b)`` runs on per-device shards.  Batch and channel shardings are kept (taken
  from the operands, else from the result); the spatial dims are replicated.  With
  ``reduce_batch`` the output has no batch dim (weight gradient) and the per-shard results
  are summed over the mesh axes the batch is split over.
  """

  arrays_have_batch = (True, True, False) if reduce_batch else (True, False, True)

  def partition(mesh, arg_shapes, result_shape):
    b, c = _batch_channel_axes((*arg_shapes, result_shape), arrays_have_batch)
    act = NamedSharding(mesh, P(b, None, None, c))
    ker = NamedSharding(mesh, P(None, None, None, c))
    if reduce_batch:
      arg_shardings, out_sharding = (act, act), ker
      axes = _axes_tuple(b)

      def lower_fn(a, g):
        out = lower(a, g)
        return lax.psum(out, axes) if axes else out
    else:
      arg_shardings, out_sharding = (act, ker), act
      lower_fn = lower
    return mesh, lower_fn, out_sharding, arg_shardings

  def infer(mesh, arg_shapes, result_shape):
    b, c = _batch_channel_axes(arg_shapes, arrays_have_batch[:2])
    spec = P(None, None, None, c) if reduce_batch else P(b, None, None, c)
    return NamedSharding(mesh, spec)

  def propagate(mesh, user_shape):
    return user_shape.sharding

  f = custom_partitioning(lower)
  if reduce_batch:
    rule = 'n h w c, n oh ow c -> kh kw one c'
    f.def_partition(partition, infer_sharding_from_operands=infer,
                    propagate_user_sharding=propagate, sharding_rule=rule,
                    reduction_factors=('n',),
                    need_replication_factors=_replicated_factors(rule))
  else:
    rule = ('n h w c, kh kw one c -> n oh ow c' if name != 'dx'
            else 'n oh ow c, kh kw one c -> n h w c')
    f.def_partition(partition, infer_sharding_from_operands=infer,
                    propagate_user_sharding=propagate, sharding_rule=rule,
                    need_replication_factors=_replicated_factors(rule))
  return f


# --- vmap: fold the mapped axis into the batch axis (or into channels) ---------------------

def _fold_channels(a):  # (B, N, H, W, C) -> (N, H, W, B*C)
  b, n, h, w, c = a.shape
  return jnp.moveaxis(a, 0, 3).reshape(n, h, w, b * c)


def _unfold_channels(a, b):  # (N, H, W, B*C) -> (B, N, H, W, C)
  n, h, w, bc = a.shape
  return jnp.moveaxis(a.reshape(n, h, w, b, bc // b), 3, 0)


def _fold_kernel(kb):  # (B, k, k, 1, C) -> (k, k, 1, B*C)
  b, k, _, _, c = kb.shape
  return jnp.moveaxis(kb, 0, 3).reshape(k, k, 1, b * c)


def _unfold_kernel(k2, b):  # (k, k, 1, B*C) -> (B, k, k, 1, C)
  k, _, _, bc = k2.shape
  return jnp.moveaxis(k2.reshape(k, k, 1, b, bc // b), 3, 0)


def _bcast(a, batched, size):
  return a if batched else jnp.broadcast_to(a, (size,) + a.shape)


@functools.lru_cache(maxsize=None)
def _native_ops(s: int, h: int, w: int):
  """The three native ops for stride s and input spatial size (h, w), vmap-able."""
  p_fwd = _partitioned('fwd', lambda x, kr: _ffi_fwd(x, kr, s), reduce_batch=False)
  p_dx = _partitioned('dx', lambda g, kr: _ffi_dx(g, kr, s, h, w), reduce_batch=False)

  def act_kernel_op(p_op):
    @jax.custom_batching.custom_vmap
    def op(a, kr):
      return p_op(a, kr)

    @op.def_vmap
    def rule(size, in_batched, a, kr):
      a_b, k_b = in_batched
      if not k_b:  # kernel shared: merge the mapped axis into the batch
        bsz, n = a.shape[:2]
        y = op(a.reshape((bsz * n,) + a.shape[2:]), kr)
        return y.reshape((bsz, n) + y.shape[1:]), True
      a = _bcast(a, a_b, size)  # per-example kernels: merge into channels
      y = op(_fold_channels(a), _fold_kernel(kr))
      return _unfold_channels(y, size), True

    return op

  fwd = act_kernel_op(p_fwd)
  dx = act_kernel_op(p_dx)

  @functools.lru_cache(maxsize=None)
  def dw_for(k):
    p_dw = _partitioned('dw', lambda x, g: _ffi_dw(x, g, s, k), reduce_batch=True)

    @jax.custom_batching.custom_vmap
    def dw(x, g):
      return p_dw(x, g)

    @dw.def_vmap
    def rule(size, in_batched, x, g):
      x = _bcast(x, in_batched[0], size)
      g = _bcast(g, in_batched[1], size)
      return _unfold_kernel(dw(_fold_channels(x), _fold_channels(g)), size), True

    return dw

  return fwd, dx, dw_for


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _native(x, kernel, s):
  fwd, _, _ = _native_ops(s, x.shape[1], x.shape[2])
  return fwd(x, kernel)


def _native_fwd(x, kernel, s):
  return _native(x, kernel, s), (x, kernel)


def _native_bwd(s, res, g):
  x, kernel = res
  _, dx, dw_for = _native_ops(s, x.shape[1], x.shape[2])
  return dx(g, kernel), dw_for(kernel.shape[0])(x, g)


_native.defvjp(_native_fwd, _native_bwd)


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def depthwise_conv2d(x, kernel, *, stride: int = 1, impl: str = 'auto'):
  """Depthwise 2-D convolution, NHWC, symmetric ``k // 2`` zero padding, no bias.

  Args:
    x: (N, H, W, C) activations.
    kernel: (k, k, 1, C) with odd k (flax's grouped-conv layout; equals a PyTorch
      ``[C, 1, k, k]`` weight transposed by ``(2, 3, 1, 0)``).
    stride: 1 or 2.  Output size is ``(H + 2*(k//2) - k) // stride + 1``.
    impl: ``'auto'`` (default), ``'xla'``, ``'shift'`` or ``'native'``; see the module doc.

  Returns:
    (N, Ho, Wo, C) array of dtype ``result_type(x, kernel)``.
  """
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  _check_args(x, kernel, stride)
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  name = resolve_impl(impl, dtype)
  if name == 'xla':
    return _conv_xla(x.astype(dtype), kernel.astype(dtype), stride)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'depthwise_conv2d: impl={name!r} needs floating inputs, got {dtype}')
  if name == 'native':
    if dtype not in _FAST_DTYPES:
      raise TypeError(f"depthwise_conv2d: impl='native' supports float32/bfloat16/"
                      f"float16, got {dtype}; use impl='xla'")
    if jax.default_backend() != 'cpu':
      raise RuntimeError("depthwise_conv2d: impl='native' runs on CPU only; the default "
                         f"backend is {jax.default_backend()!r} (use impl='xla')")
    if kernel.shape[0] > 63:
      raise ValueError("depthwise_conv2d: impl='native' supports kernel sizes up to 63")
    _load_native()  # raises NativeBuildError with the compiler output
    fn = _native
  else:
    fn = _shift
  compute = jnp.float32 if dtype in _FAST_DTYPES else dtype
  y = fn(x.astype(compute), kernel.astype(compute), stride)
  return y.astype(dtype)


def _default_kernel_init(key, shape, dtype=jnp.float32):
  return 0.02 * jax.random.normal(key, shape, dtype)


class DepthwiseConv(nnx.Module):
  """Depthwise convolution layer: ``depthwise_conv2d(x, kernel) + bias``.

  ``kernel`` is an ``nnx.Param`` of shape (k, k, 1, C), ``bias`` of shape (C,) (or None), both
  of ``param_dtype``.  ``dtype`` is the compute dtype (the Flax idiom): input, kernel and bias are
  cast to it and the result has it; None (the default) computes in the promoted dtype of the
  input and the parameters.
  """

  def __init__(self, channels: int, kernel_size: int, *, stride: int = 1,
               use_bias: bool = True,
               kernel_init: Callable = _default_kernel_init,
               bias_init: Callable = jax.nn.initializers.zeros,
               impl: str = 'auto', dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kernel_size % 2 != 1:
      raise ValueError(f'DepthwiseConv: kernel_size must be odd, got {kernel_size}')
    if stride not in (1, 2):
      raise ValueError(f'DepthwiseConv: stride must be 1 or 2, got {stride}')
    if impl not in IMPLS:
      raise ValueError(f'DepthwiseConv: impl must be one of {IMPLS}, got {impl!r}')
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.impl = impl
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (kernel_size, kernel_size, 1, channels), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (channels,), param_dtype))
                 if use_bias else None)

  def __call__(self, x):
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    if self.dtype is not None:
      x, kernel = jnp.asarray(x, self.dtype), kernel.astype(self.dtype)
      bias = bias.astype(self.dtype) if bias is not None else None
    y = depthwise_conv2d(x, kernel, stride=self.stride, impl=self.impl)
    if bias is not None:
      y = y + bias
    return y
