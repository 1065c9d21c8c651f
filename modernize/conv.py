"""Dense 2-D convolution that is fast on XLA:CPU as well as on GPU/TPU.

XLA:CPU runs some convolutions of a small-image training step badly (measured at batch 32 on a
2-core AVX-512 Xeon, jax 0.10): a 3x3 conv 512 -> 512 on a 2x2 map takes 0.8-1.3 s forward and as
long for its input gradient (XLA swaps batch and features and runs a 2x2-window conv over them;
as a matmul: 6 ms), the input gradient of a 3x3/2 conv on a 4x4x512 map 0.2-0.8 s (5 ms), and the
kernel gradient of a 1x1 conv is 3-6x slower than the matmul it is. A conv is a matmul over patches,
so this module computes the same operation

    y[n, i, j, o] = sum_{a, b, c} x[n, i*s - p + a, j*s - p + b, c] * kernel[a, b, c, o]

(NHWC, HWIO kernel, `p` zero padding on every side, PyTorch's floor for the output size) from
three pieces, each chosen per shape between XLA's convolution and a matmul (`dot_general`) form:

  forward       'conv' XLA's conv | 'dot' patches (k*k shifted strided slices, concatenated along
                channels) times the kernel reshaped to (k*k*C, O)
  input grad    'conv' XLA's transposed conv | 'dot' cotangent times the kernel's transpose, then
                each tap's slice added back at its offset (pad with stride-1 interior zeros)
  kernel grad   'conv' XLA's | 'dot' patches contracted with the cotangent over batch and space

A 1x1 conv is a single matmul; a patchify conv (k == s, no padding) a reshape and a matmul.

Implementations (`impl=`):
  'xla'   lax.conv_general_dilated: the reference, and what GPUs and TPUs use.
  'gemm'  every piece in the matmul form (tests; the whole network as matmuls).
  'cpu'   the per-shape plan of `plan()`: the faster form of each piece on XLA:CPU, measured.
  'auto'  'cpu' where `modernize.backend.fast_paths()` (JAX's CPU backend, unless
          `$MODERNIZE_FAST_PATHS` says otherwise) for float32, 'xla' otherwise (GPU/TPU, bfloat16);
          `$MODERNIZE_CONV_IMPL` overrides it (read at trace time); an explicit `impl=` wins.
All of them are jnp/lax ops, so a batch-sharded input stays sharded under jit: the kernel gradient
is a contraction over the batch, which the partitioner turns into per-device sums and one
all-reduce, as it does for XLA's own conv.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from modernize import backend

IMPLS = ('auto', 'xla', 'gemm', 'cpu')
ENV_VAR = 'MODERNIZE_CONV_IMPL'
METHODS = ('conv', 'dot')


def resolve_impl(impl: str = 'auto', dtype=jnp.float32) -> str:
  """The concrete implementation ('xla', 'gemm' or 'cpu') that `impl` means here: 'auto' is
  `$MODERNIZE_CONV_IMPL`, else 'cpu' where the CPU fast paths are taken for float32, else 'xla'."""
  return backend.resolve('conv2d', impl, IMPLS, ENV_VAR, dtype, lambda: 'cpu')


def out_size(n: int, k: int, s: int, p: int) -> int:
  return (n + 2 * p - k) // s + 1


def plan(x_shape, kernel_shape, stride: int, padding: int) -> tuple[str, str, str]:
  """(forward, input gradient, kernel gradient) methods, each 'conv' or 'dot', for XLA:CPU.

  From per-piece timings of every conv of ResNet-50 at batch 32 (32x32, 64x64) and batch 8
  (224x224): 1x1 and patchify convs are matmuls in every piece (XLA's kernel gradient of a 1x1
  conv is 3-6x slower). For kxk kernels XLA's conv wins the forward pass and the input gradient
  on outputs of 8x8 and more (the matmul form materialises k*k shifted copies of the input: 3x
  slower at 56x56x64, and for the 3-channel 7x7 stem) and falls off a cliff below; its kernel
  gradient is on par down to 4x4 outputs and slower below.
  """
  _, h, w, _ = x_shape
  k = kernel_shape[0]
  ho, wo = out_size(h, k, stride, padding), out_size(w, k, stride, padding)
  if k == 1 or (k == stride and padding == 0):
    return ('dot', 'dot', 'dot')
  big = ho * wo >= 64
  return ('conv' if big else 'dot', 'conv' if big else 'dot', 'conv' if ho * wo >= 16 else 'dot')


# --- the pieces -----------------------------------------------------------------------------------

def _conv(x, kernel, s, p):
  return lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches(x, k, s, p):
  """(N, Ho, Wo, k*k*C): tap (a, b) of every output pixel, taps major, channels minor."""
  n, h, w, c = x.shape
  ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
  if p:
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  if k == 1:
    return lax.slice(x, (0, 0, 0, 0), (n, s * (ho - 1) + 1, s * (wo - 1) + 1, c), (1, s, s, 1))
  if k == s:  # non-overlapping patches: space-to-depth
    x = x[:, :ho * k, :wo * k].reshape(n, ho, k, wo, k, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, ho, wo, k * k * c)
  return jnp.concatenate(window_taps(x, k, s, ho, wo), axis=-1)


def window_taps(xp, k: int, s: int, ho: int, wo: int) -> list:
  """The k*k taps of every (ho, wo) window of stride s over an (already padded) NHWC array, in
  row-major tap order: tap (a, b) is xp[:, a + s*i, b + s*j]."""
  n, _, _, c = xp.shape
  return [lax.slice(xp, (0, a, b, 0), (n, a + s * (ho - 1) + 1, b + s * (wo - 1) + 1, c),
                    (1, s, s, 1)) for a in range(k) for b in range(k)]


def add_taps(taps, k: int, s: int, hp: int, wp: int):
  """The transpose of `window_taps`: each tap's (N, ho, wo, C) values added back at its offsets
  into an (N, hp, wp, C) array of zeros."""
  out = None
  for t, tap in enumerate(taps):
    a, b = divmod(t, k)
    ho, wo = tap.shape[1:3]
    zero = jnp.zeros((), tap.dtype)
    part = lax.pad(tap, zero, ((0, 0, 0), (a, hp - a - s * (ho - 1) - 1, s - 1),
                               (b, wp - b - s * (wo - 1) - 1, s - 1), (0, 0, 0)))
    out = part if out is None else out + part
  return out


def _matrix(kernel):
  k1, k2, c, o = kernel.shape
  return kernel.reshape(k1 * k2 * c, o)


def _fwd_dot(x, kernel, s, p):
  return lax.dot_general(_patches(x, kernel.shape[0], s, p), _matrix(kernel),
                         (((3,), (0,)), ((), ())))


def _dx_dot(g, kernel, s, p, h, w):
  k, _, c, _ = kernel.shape
  n, ho, wo, _ = g.shape
  cols = lax.dot_general(g, _matrix(kernel), (((3,), (1,)), ((), ())))  # (N, Ho, Wo, k*k*C)
  hp, wp = h + 2 * p, w + 2 * p
  zero = jnp.zeros((), g.dtype)
  if k == s and p == 0:  # depth-to-space, then zeros for rows/columns the floor left out
    dx = cols.reshape(n, ho, wo, k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, ho * k, wo * k, c)
    return lax.pad(dx, zero, ((0, 0, 0), (0, h - ho * k, 0), (0, w - wo * k, 0), (0, 0, 0)))
  taps = [cols[..., t * c:(t + 1) * c] for t in range(k * k)] if k > 1 else [cols]
  dx = add_taps(taps, k, s, hp, wp)
  return dx[:, p:p + h, p:p + w] if p else dx


def _dw_dot(x, g, k, s, p):
  # A contraction over batch and space, where both operands have those dims major. XLA:CPU
  # transposes one operand for its matmul, and it picks the first; when that operand is produced
  # by elementwise ops (BatchNorm, ReLU) it fuses them into the transpose and recomputes them in
  # transposed order (measured: 18 ms for 32x16x16x256 -> 64 against 6.5 ms here). So transpose
  # the narrower operand ourselves, as a 2-D matrix, and transpose the small result back.
  cols = _patches(x, k, s, p)
  cols = cols.reshape(-1, cols.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  if g2.shape[1] <= cols.shape[1]:
    dw = jnp.dot(g2.T, cols).T
  else:
    dw = jnp.dot(cols.T, g2)
  return dw.reshape(k, k, x.shape[3], g.shape[3])


def _forward(method, x, kernel, s, p):
  return _conv(x, kernel, s, p) if method == 'conv' else _fwd_dot(x, kernel, s, p)


def _input_grad(method, g, kernel, s, p, h, w):
  if method == 'dot':
    return _dx_dot(g, kernel, s, p, h, w)
  n, _, _, c = g.shape
  x_aval = jax.ShapeDtypeStruct((n, h, w, kernel.shape[2]), g.dtype)
  return jax.linear_transpose(lambda x: _conv(x, kernel, s, p), x_aval)(g)[0]


def _kernel_grad(method, x, g, kernel_shape, s, p):
  if method == 'dot':
    return _dw_dot(x, g, kernel_shape[0], s, p)
  k_aval = jax.ShapeDtypeStruct(kernel_shape, g.dtype)
  return jax.linear_transpose(lambda kr: _conv(x, kr, s, p), k_aval)(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _planned(x, kernel, s, p, methods):
  return _forward(methods[0], x, kernel, s, p)


def _planned_fwd(x, kernel, s, p, methods):
  return _forward(methods[0], x, kernel, s, p), (x, kernel)


def _planned_bwd(s, p, methods, res, g):
  x, kernel = res
  dx = _input_grad(methods[1], g, kernel, s, p, x.shape[1], x.shape[2])
  dw = _kernel_grad(methods[2], x, g, kernel.shape, s, p)
  return dx, dw


_planned.defvjp(_planned_fwd, _planned_bwd)


# --- public API -----------------------------------------------------------------------------------

def conv2d(x, kernel, *, stride: int = 1, padding: int = 0, impl: str = 'auto',
           methods: tuple[str, str, str] | None = None):
  """Dense 2-D convolution, NHWC input, HWIO kernel, `padding` zeros on every side.

  `methods` (forward, input gradient, kernel gradient; each 'conv' or 'dot') forces a plan, for
  tests and benchmarks; otherwise `impl` decides (see the module doc).
  """
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f'conv2d: need x (N, H, W, C) and kernel (kh, kw, C, O); got {x.shape} and '
                     f'{kernel.shape}')
  if kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f'conv2d: square kernels only, got {kernel.shape[:2]}')
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if methods is None:
    name = resolve_impl(impl, dtype)
    if name == 'xla':
      return _conv(x, kernel, stride, padding)
    methods = (('dot',) * 3 if name == 'gemm'
               else plan(x.shape, kernel.shape, stride, padding))
  if any(m not in METHODS for m in methods) or len(methods) != 3:
    raise ValueError(f'conv2d: methods must be three of {METHODS}, got {methods!r}')
  return _planned(x, kernel, stride, padding, tuple(methods))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _symmetric_padding(padding) -> int | None:
  if isinstance(padding, str) or len(padding) != 2:
    return None
  pads = {int(q) for pair in padding for q in pair}
  return pads.pop() if len(pads) == 1 else None


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *,
                         impl: str = 'auto', **kwargs):
  """`lax.conv_general_dilated`'s signature (a drop-in for `nnx.Conv(conv_general_dilated=...)`):
  2-D NHWC/HWIO convs with square kernels, equal strides, symmetric explicit padding, no dilation
  and one group go through `conv2d(impl=impl)`; anything else to lax."""
  def plain():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)

  def ones(d):
    return d is None or all(int(v) == 1 for v in ((d,) * 2 if isinstance(d, int) else d))

  if (lhs.ndim != 4 or rhs.ndim != 4 or feature_group_count != 1 or precision is not None
      or any(v is not None for v in kwargs.values()) or not ones(lhs_dilation)
      or not ones(rhs_dilation) or len(set(window_strides)) != 1
      or rhs.shape[0] != rhs.shape[1]):
    return plain()
  p = _symmetric_padding(padding)
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  if (p is None or dimension_numbers is None
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != numbers
      or resolve_impl(impl, jnp.result_type(lhs.dtype, rhs.dtype)) == 'xla'):
    return plain()
  return conv2d(lhs, rhs, stride=window_strides[0], padding=p, impl=impl)


@functools.lru_cache(maxsize=None)
def conv_fn(impl: str = 'auto') -> Callable:
  """`conv_general_dilated` bound to `impl`; one object per impl, so that modules holding it as
  their (static) conv function compare equal and share compiled programs."""
  if impl not in IMPLS:
    raise ValueError(f'conv_fn: impl must be one of {IMPLS}, got {impl!r}')
  return functools.partial(conv_general_dilated, impl=impl)
