"""Small layers with PyTorch's exact semantics: norms, GRN, BoTNet's attention, DropPath,
LayerScale, convs, initialisers.

Everything is NHWC (channels last). Norms are written out rather than taken from flax so that their
arithmetic matches PyTorch's (two-pass variance; BatchNorm's running variance is the unbiased one).

Mixed precision follows the Flax idiom: a module's `dtype` is its compute dtype (None: the promoted
dtype of its input and parameters, i.e. float32), parameters stay float32 (`param_dtype`), and the
norms compute their statistics and normalisation in float32 whatever the compute dtype, returning
it.

Fast paths (hand-written VJPs of BatchNorm, LayerNorm and max-pool, the erf GELU) are taken where
`modernize.backend.fast_paths()` says so (JAX's CPU backend by default); elsewhere the plain
formulas run under JAX's autodiff, `lax.reduce_window` and `jax.nn.gelu(approximate=False)`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from modernize import backend
from modernize.config import ConfigError
from modernize.conv import add_taps, conv_fn, out_size, window_taps
from modernize.depthwise import DepthwiseConv

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


# --- initialisers ---------------------------------------------------------------------------------

def trunc_normal_002(key, shape, dtype=jnp.float32):
  # timm's trunc_normal_(std=.02) truncates at +-2 absolute, i.e. +-100 sigma: effectively a plain
  # normal. jax's truncated_normal(0.02) would cut at +-2 sigma and shrink the std.
  return 0.02 * jax.random.truncated_normal(key, -100.0, 100.0, shape, dtype)


def kaiming_normal_fan_out(key, shape, dtype=jnp.float32):
  """torchvision ResNet convs: kaiming_normal_(mode='fan_out', nonlinearity='relu').

  `shape` is flax's (kh, kw, in/groups, out); PyTorch's fan-out is out * kh * kw whatever the
  groups.
  """
  fan_out = shape[-1] * math.prod(shape[:-2])
  return math.sqrt(2.0 / fan_out) * jax.random.normal(key, shape, dtype)


def torch_linear_uniform(fan_in: int) -> Initializer:
  """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias alike."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv_init(init: str) -> Initializer:
  return kaiming_normal_fan_out if init == 'kaiming' else trunc_normal_002


# --- convolutions ---------------------------------------------------------------------------------

def conv(in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
         use_bias: bool, init: str, padding: int | None = None, depthwise_impl: str = 'auto',
         dtype=None, rngs: nnx.Rngs) -> nnx.Module:
  """A 2-D conv with PyTorch's symmetric padding (k // 2 unless given).

  flax's default 'SAME' padding is asymmetric for stride 2 on even inputs and would shift ResNet's
  7x7/2 stem and 3x3/2 convs by a pixel against PyTorch. Depthwise convs (groups = channels) go to
  `DepthwiseConv`, which is fast on CPU too; the others run through `modernize.conv` (XLA's conv
  on GPU/TPU, a per-shape mix of XLA's conv and matmuls on CPU; `$MODERNIZE_CONV_IMPL` overrides).
  `dtype`: the compute dtype (None: float32, promoted from the parameters); parameters float32.
  """
  pad = kernel_size // 2 if padding is None else padding
  if groups == in_dim == out_dim and groups > 1:
    return DepthwiseConv(out_dim, kernel_size, stride=stride, use_bias=use_bias,
                         kernel_init=conv_init(init), impl=depthwise_impl, dtype=dtype,
                         rngs=rngs)
  return nnx.Conv(in_dim, out_dim, (kernel_size, kernel_size), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=use_bias,
                  kernel_init=conv_init(init), bias_init=nnx.initializers.zeros,
                  conv_general_dilated=conv_fn('auto'), dtype=dtype, rngs=rngs)


def linear(in_dim: int, out_dim: int, *, init: str, dtype=None, rngs: nnx.Rngs) -> nnx.Linear:
  if init == 'kaiming':
    kernel_init = bias_init = torch_linear_uniform(in_dim)
  else:
    kernel_init, bias_init = trunc_normal_002, nnx.initializers.zeros
  return nnx.Linear(in_dim, out_dim, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                    rngs=rngs)


# --- normalisation --------------------------------------------------------------------------------
# Train-mode BatchNorm and LayerNorm have hand-written VJPs: the textbook gradients in one reduction
# pass and one elementwise pass, which XLA:CPU runs 1.5-1.9x faster than the autodiff of the
# two-pass forward (measured fwd + bwd of BN + ReLU at 32x16x16x256: 5.3 -> 3.0 ms). Same maths,
# float32 rounding differs (tests/test_fastpaths.py).

def _bn_stats(x, axes):
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)
  return mean, var


def batch_norm_train(x, scale, bias, eps):
  """(scale * (x - mean) / sqrt(var + eps) + bias, mean, var) with batch statistics over all axes
  but the last (two-pass variance, as PyTorch). The hand-written VJP where
  `backend.fast_paths()`, else JAX's autodiff of the same formulas."""
  if backend.fast_paths():
    return _batch_norm_train_fast(x, scale, bias, eps)
  return _batch_norm_fwd(x, scale, bias, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train_fast(x, scale, bias, eps):
  return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_norm_fwd(x, scale, bias, eps):
  mean, var = _bn_stats(x, tuple(range(x.ndim - 1)))
  rstd = jax.lax.rsqrt(var + eps)
  return ((x - mean) * (rstd * scale) + bias, mean, var), (x, mean, rstd, scale)


def _batch_norm_bwd(eps, res, cts):
  x, mean, rstd, scale = res
  gy, gmean, gvar = cts
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  xc = x - mean
  xhat = xc * rstd
  dbias = gy.sum(axes)
  dscale = (gy * xhat).sum(axes)
  dx = (rstd * scale / n) * (n * gy - dbias - xhat * dscale)
  # The statistics are outputs too (for the running averages); their cotangents are usually zero.
  dx = dx + gmean / n + xc * (gvar * (2.0 / n))
  return dx, dscale, dbias


_batch_norm_train_fast.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def layer_norm(x, scale, bias, eps):
  """scale * (x - mean) / sqrt(var + eps) + bias over the last axis (two-pass variance). The
  hand-written VJP where `backend.fast_paths()`, else JAX's autodiff of the same formula."""
  if backend.fast_paths():
    return _layer_norm_fast(x, scale, bias, eps)
  return _layer_norm_fwd(x, scale, bias, eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_fast(x, scale, bias, eps):
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
  return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, gy):
  x, mean, rstd, scale = res
  axes = tuple(range(x.ndim - 1))
  xhat = (x - mean) * rstd
  gxhat = gy * scale
  dx = rstd * (gxhat - gxhat.mean(-1, keepdims=True)
               - xhat * (gxhat * xhat).mean(-1, keepdims=True))
  return dx, (gy * xhat).sum(axes), gy.sum(axes)


_layer_norm_fast.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def at_least_float32(x):
  """x in float32 (or wider: float64 stays): the norms' statistics and the logits never run in
  bfloat16."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _out_dtype(dtype, x, param):
  return dtype if dtype is not None else jnp.result_type(x.dtype, param.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last (channel) axis, eps 1e-6 as ConvNeXt (both its channels_first and
  channels_last variants normalise over channels only)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None):
    self.eps = eps
    self.dtype = dtype   # output (compute) dtype; statistics in float32 always
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x):
    out = _out_dtype(self.dtype, x, self.scale[...])
    return layer_norm(at_least_float32(x), self.scale[...], self.bias[...], self.eps).astype(out)


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics (momentum 0.1, eps 1e-5, the
  running variance tracks the unbiased batch variance).

  Under `jax.jit` with a batch-sharded input, the batch mean is a global reduction, so this is
  synchronised BatchNorm across devices and hosts without any axis name. `dtype`: the output
  (compute) dtype; statistics, running averages and the normalisation are float32.
  """

  def __init__(self, dim: int, *, momentum: float = 0.1, eps: float = 1e-5,
               use_running_average: bool = False, dtype=None):
    self.dtype = dtype
    self.momentum = momentum
    self.eps = eps
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    out = _out_dtype(self.dtype, x, self.scale[...])
    x = at_least_float32(x)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
      y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
      return y.astype(out)
    y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
    n = math.prod(x.shape[:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
    self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
    return y.astype(out)


def norm(kind: str, dim: int, dtype=None) -> LayerNorm | BatchNorm:
  return BatchNorm(dim, dtype=dtype) if kind == 'batch' else LayerNorm(dim, dtype=dtype)


# --- pooling --------------------------------------------------------------------------------------

def max_pool(x, k: int = 3, s: int = 2, p: int = 1):
  """PyTorch's MaxPool2d(k, s, padding=p) on NHWC (pads with -inf).

  Where `backend.fast_paths()` its VJP routes each output's gradient to the first maximum of its
  window in row-major order, as XLA's select_and_scatter (and PyTorch) do, but as k*k shifted
  compares and padded adds that XLA:CPU fuses, instead of the scatter it emits for the autodiff of
  `lax.reduce_window` (which runs elsewhere).
  """
  if backend.fast_paths():
    return _max_pool_fast(x, k, s, p)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1),
                               (1, s, s, 1), ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_fast(x, k: int = 3, s: int = 2, p: int = 1):
  return _max_pool_fwd(x, k, s, p)[0]


def _max_pool_fwd(x, k, s, p):
  _, h, w, _ = x.shape
  ho, wo = out_size(h, k, s, p), out_size(w, k, s, p)
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  y = functools.reduce(jnp.maximum, window_taps(xp, k, s, ho, wo))
  return y, (x, y)


def _max_pool_bwd(k, s, p, res, g):
  x, y = res
  _, h, w, _ = x.shape
  ho, wo = y.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
  zero = jnp.zeros((), g.dtype)
  taken = jnp.zeros(y.shape, bool)
  routed = []
  for tap in window_taps(xp, k, s, ho, wo):
    first = (tap == y) & ~taken
    taken = taken | first
    routed.append(jnp.where(first, g, zero))
  dxp = add_taps(routed, k, s, h + 2 * p, w + 2 * p)
  return (dxp[:, p:p + h, p:p + w],)


_max_pool_fast.defvjp(_max_pool_fwd, _max_pool_bwd)


# --- residual-branch helpers ----------------------------------------------------------------------

def activation(kind: str) -> Callable[[jax.Array], jax.Array]:
  if kind == 'relu':
    return jax.nn.relu
  return gelu


_SQRT_HALF = 0.7071067811865476


def gelu(x):
  """Exact (erf) GELU as PyTorch's nn.GELU() computes it, x/2 * (1 + erf(x/sqrt(2))) (jax's
  default is the tanh approximation). `jax.nn.gelu(approximate=False)` uses erfc instead, which
  XLA:CPU evaluates 2x slower; the two differ by float32 rounding (~1e-6 absolute, as PyTorch's
  own float32 GELU does against float64). jax's form where not `backend.fast_paths()`."""
  if not backend.fast_paths():
    return jax.nn.gelu(x, approximate=False)
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


class LayerScale(nnx.Module):
  """Learnable per-channel gain on a residual branch (CaiT; ConvNeXt's `gamma`), init e.g. 1e-6."""

  def __init__(self, dim: int, init_value: float, *, dtype=None):
    self.dtype = dtype   # compute dtype (None: promoted from input and the float32 gain)
    self.scale = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

  def __call__(self, x):
    scale = self.scale[...]
    if self.dtype is not None:
      x, scale = x.astype(self.dtype), scale.astype(self.dtype)
    return x * scale


class GlobalResponseNorm(nnx.Module):
  """ConvNeXt V2's Global Response Normalization (Woo et al. 2023), as timm's GlobalResponseNorm.

  Per sample and channel of NHWC `x`: Gx = ||x||_2 over H and W, Nx = Gx / (mean of Gx over the
  channels + eps), and out = gamma * (x * Nx) + beta + x. gamma (`scale`) and beta (`bias`) start
  at zero, so the layer starts as the identity. Statistics in float32 whatever the compute dtype.
  Where a channel is zero over the whole map, Gx's gradient is taken as 0 (PyTorch's choice for
  the norm at 0), not sqrt's NaN.
  """

  def __init__(self, dim: int, *, dtype=None, eps: float = 1e-6):
    self.eps = eps
    self.dtype = dtype   # output (compute) dtype; statistics in float32 always
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x):
    out = _out_dtype(self.dtype, x, self.scale[...])
    x = at_least_float32(x)
    sum_sq = jnp.square(x).sum(axis=(1, 2), keepdims=True)
    nonzero = sum_sq > 0
    gx = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sum_sq, 1.0)), 0.0)
    nx = gx / (gx.mean(axis=-1, keepdims=True) + self.eps)
    return (x + (self.scale[...] * (x * nx) + self.bias[...])).astype(out)


class RelPosSelfAttention(nnx.Module):
  """BoTNet's global multi-head self-attention with 2-D relative position logits (Srinivas et al.
  2021), as timm's `BottleneckAttn` (stride 1, default `scale_pos_embed=False`).

  A 1x1 conv without bias gives q, k and v (channels [q | k | v], each heads x `head_dim`); every
  position attends to every position of the map with logits
    q . k / sqrt(head_dim) + q . r_h[y' - y] + q . r_w[x' - x]
  for a query at (y, x) and a key at (y', x'), where r_h (2H - 1 rows) and r_w (2W - 1 rows) are
  learned embeddings of the height and width offsets, shared by the heads. The output is the heads'
  softmax-weighted values side by side (`dim` channels, no output projection: the block's next
  1x1 conv plays that role, as in BoTNet). The embeddings fix the map's size: the layer is built for
  `feature_size` = (H, W) and any other raises ConfigError. Softmax in float32 whatever the
  compute dtype.
  """

  def __init__(self, dim: int, feature_size: tuple[int, int], *, head_dim: int, init: str,
               dtype=None, rngs: nnx.Rngs):
    if dim % head_dim:
      raise ConfigError(f'attention width {dim} is not a multiple of the head width {head_dim}')
    self.heads, self.head_dim = dim // head_dim, head_dim
    self.feature_size = tuple(feature_size)
    self.dtype = dtype
    self.qkv = conv(dim, 3 * dim, 1, use_bias=False, init=init, dtype=dtype, rngs=rngs)
    # timm's init: a normal of std head_dim ** -0.5, cut at +-2 (absolute), as trunc_normal_.
    std = head_dim ** -0.5

    def embedding(rows):
      return nnx.Param(std * jax.random.truncated_normal(rngs.params(), -2 / std, 2 / std,
                                                         (rows, head_dim), jnp.float32))
    height, width = self.feature_size
    self.height_rel = embedding(2 * height - 1)
    self.width_rel = embedding(2 * width - 1)

  def __call__(self, x):
    b, h, w, c = x.shape
    q, k, v = self.project(x)
    weights = jax.nn.softmax(self.logits(q, k), axis=-1).astype(v.dtype)
    out = jnp.einsum('bnyxk,bknd->byxnd', weights, v)
    return out.reshape(b, h, w, c)

  def project(self, x):
    """q (batch, y, x, heads, d), k and v (batch, y * x, heads, d) from NHWC `x`."""
    b, h, w, _ = x.shape
    if (h, w) != self.feature_size:
      raise ConfigError(
          f'mhsa_last_stage: the attention was built for a {self.feature_size[0]}x'
          f'{self.feature_size[1]} feature map (its relative position embeddings fix the size) '
          f'but got {h}x{w}: build the network for this input size (Network(..., image_size=))')
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    shape = (b, h * w, self.heads, self.head_dim)
    return q.reshape(b, h, w, self.heads, self.head_dim), k.reshape(shape), v.reshape(shape)

  def logits(self, q, k):
    """Attention logits (batch, heads, y, x, key), float32 at least: scaled content plus
    (unscaled) relative position terms."""
    content = jnp.einsum('byxnd,bknd->bnyxk', q, k) * self.head_dim ** -0.5
    position = self.relative_logits(q).reshape(content.shape)
    return at_least_float32(content) + at_least_float32(position)

  def relative_logits(self, q):
    """q . r_h[y' - y] + q . r_w[x' - x] as (batch, heads, y, x, y', x'), from q (b, y, x, heads,
    d): each query's product with every offset embedding, then, per key, its offset's entry."""
    h, w = self.feature_size

    def along(table, n):
      table = table.astype(q.dtype) if self.dtype is not None else table
      per_offset = jnp.einsum('byxnd,rd->bnyxr', q, table)      # r: offset + n - 1
      offset = jnp.arange(n)[None, :] - jnp.arange(n)[:, None] + n - 1   # [query, key]
      return per_offset, offset

    per_h, offset_h = along(self.height_rel[...], h)
    per_w, offset_w = along(self.width_rel[...], w)
    # logits_h[b, n, y, x, y'] = per_h[b, n, y, x, offset_h[y, y']] (and likewise along x).
    logits_h = jnp.take_along_axis(per_h, offset_h[None, None, :, None, :], axis=-1)
    logits_w = jnp.take_along_axis(per_w, offset_w[None, None, None, :, :], axis=-1)
    return logits_h[..., :, None] + logits_w[..., None, :]


class DropPath(nnx.Module):
  """Stochastic depth: drops a residual branch for a whole sample with probability `rate` and
  scales survivors by 1 / (1 - rate), as timm's DropPath. Identity in eval mode."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None, deterministic: bool = False):
    self.rate = rate
    self.deterministic = deterministic
    # Each DropPath owns a forked stream, so modules share no RNG state.
    self.rngs = rngs['dropout'].fork() if (rngs is not None and rate > 0) else nnx.data(None)

  def __call__(self, x, *, key: jax.Array | None = None):
    if self.deterministic or self.rate == 0.0:
      return x
    key = self.rngs() if key is None else key
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)
