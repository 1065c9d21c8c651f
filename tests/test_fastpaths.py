"""Every fast path agrees with the plain formulation it replaces (values and gradients).

Fast paths covered: `modernize.conv` (dense convs as matmuls / per-shape plans, against
`lax.conv_general_dilated`), the hand-written VJPs of train-mode BatchNorm and LayerNorm (against
the autodiff of the plain two-pass formulas), the max-pool VJP (against `lax.reduce_window`'s
select-and-scatter), the erf GELU (against jax's erfc form), a batch-sharded train step (against one
device), and the data pipeline's batched RandAugment warps, presized splits and window crops
(against the per-op / fancy-indexing code they replace, bit for bit). And which path runs where: the
fast paths on the CPU backend only, XLA's standard ops when the accelerators' choice is forced
(`modernize.backend`), with equal results.

Tolerances (float32): a result that sums n products in a different order differs by rounding, about
sqrt(n) * 6e-8 of its scale. Conv outputs sum <= 7*7*8 = 392 products, input gradients as many, and
kernel gradients N*Ho*Wo <= 2*9*10 = 180: ~1e-6 of the largest value; we allow 2e-5 of it (a wrong
tap, border, stride or transpose gives O(1) errors). The norms' gradients are sums over <= 2*9*7 =
126 elements plus a few rescalings, checked at 1e-5 relative to each tensor's largest value.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from experiments.data import augment as A
from modernize import backend, layers
from modernize import conv as C
from modernize import depthwise as dw_impl

ROOT = Path(__file__).resolve().parents[1]


def _close(a, b, tol, what=''):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(float(np.max(np.abs(b))), 1e-30)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


# --- dense convolutions ---------------------------------------------------------------------------

# (N, H, W, Cin, Cout, k, stride, padding): 1x1 (strided too), 3x3 / 5x5 with padding, the 7x7/2
# stem, patchify (4x4/4) and 2x2/2 downsampling (with a remainder that PyTorch's floor drops),
# odd, even and non-square maps, and maps as small as 1x1 and 2x2 (where XLA:CPU is slowest).
CONV_SHAPES = [
    (2, 7, 6, 5, 4, 1, 1, 0), (2, 7, 6, 5, 4, 1, 2, 0), (2, 9, 8, 5, 6, 3, 1, 1),
    (2, 9, 8, 5, 6, 3, 2, 1), (1, 2, 2, 8, 8, 3, 1, 1), (2, 1, 1, 8, 8, 3, 1, 1),
    (2, 10, 9, 3, 4, 7, 2, 3), (2, 9, 10, 3, 5, 4, 4, 0), (2, 8, 9, 4, 6, 2, 2, 0),
    (1, 6, 5, 4, 3, 5, 1, 2),
]
PLANS = list(itertools.product(C.METHODS, repeat=3))


@functools.lru_cache(maxsize=None)
def _conv_fns():
  """One jit: for every shape, the XLA reference and every plan, values and both gradients."""
  def one(x, k, g, s, p, methods):
    f = ((lambda a, b: C._conv(a, b, s, p)) if methods is None
         else (lambda a, b: C.conv2d(a, b, stride=s, padding=p, methods=methods)))
    y, vjp = jax.vjp(f, x, k)
    return (y, *vjp(g))

  @jax.jit
  def run(xs, ks, gs):
    out = []
    for x, k, g, shape in zip(xs, ks, gs, CONV_SHAPES):
      s, p = shape[6], shape[7]
      out.append([one(x, k, g, s, p, m) for m in [None] + PLANS])
    return out
  return run


def test_conv2d_every_plan_matches_xla():
  rng = np.random.default_rng(0)
  xs, ks, gs = [], [], []
  for n, h, w, ci, co, k, s, p in CONV_SHAPES:
    xs.append(_rand(rng, n, h, w, ci))
    ks.append(_rand(rng, k, k, ci, co))
    gs.append(_rand(rng, n, C.out_size(h, k, s, p), C.out_size(w, k, s, p), co))
  for shape, results in zip(CONV_SHAPES, _conv_fns()(xs, ks, gs)):
    ref = results[0]
    for methods, got in zip(PLANS, results[1:]):
      for name, a, b in zip(('y', 'dx', 'dkernel'), got, ref):
        _close(a, b, 2e-5, f'{shape} {methods} {name}')


@pytest.mark.parametrize('impl', ['gemm', 'cpu'])
def test_conv2d_impls_and_module_hook(impl):
  """nnx.Conv with `conv_fn(impl)` (as layers.conv builds it) equals nnx.Conv with lax's conv."""
  rng = np.random.default_rng(1)
  x = _rand(rng, 2, 9, 9, 6)
  pairs = []
  for k, s in ((1, 1), (1, 2), (3, 1), (3, 2), (7, 2), (4, 4), (2, 2)):
    pad = 0 if k == s or k == 1 else k // 2
    make = functools.partial(nnx.Conv, 6, 5, (k, k), strides=(s, s),
                             padding=((pad, pad), (pad, pad)), use_bias=True,
                             bias_init=nnx.initializers.normal(1.0))
    pairs.append((make(rngs=nnx.Rngs(0)),
                  make(conv_general_dilated=C.conv_fn(impl), rngs=nnx.Rngs(0))))
  graphdefs, states = zip(*[tuple(zip(*(nnx.split(m) for m in pair))) for pair in pairs])

  @jax.jit
  def run(states, x):
    def loss(state, x, graphdef):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))
    return [[jax.value_and_grad(loss, (0, 1))(st, x, gd) for st, gd in zip(pair, gds)]
             for pair, gds in zip(states, graphdefs)]

  for (k_s, ((l0, g0), (l1, g1))) in zip(pairs, run(states, x)):
    for a, b in zip(jax.tree.leaves((l1, g1)), jax.tree.leaves((l0, g0))):
      _close(a, b, 2e-5, f'{k_s[0].kernel_size} {k_s[0].strides}')


def test_conv_hook_falls_back_to_lax():
  """What conv2d does not cover (groups, asymmetric or string padding, dilation) goes to lax."""
  rng = np.random.default_rng(2)
  x = _rand(rng, 1, 8, 8, 4)
  k = _rand(rng, 3, 3, 2, 4)
  f = C.conv_fn('gemm')
  dn = ('NHWC', 'HWIO', 'NHWC')
  for args, kwargs in [
      ((x, k, (1, 1), ((1, 1), (1, 1))), dict(dimension_numbers=dn, feature_group_count=2)),
      ((x, _rand(rng, 3, 3, 4, 4), (1, 1), ((0, 1), (0, 1))), dict(dimension_numbers=dn)),
      ((x, _rand(rng, 3, 3, 4, 4), (1, 1), 'SAME'), dict(dimension_numbers=dn)),
      ((x, _rand(rng, 3, 3, 4, 4), (1, 1), ((2, 2), (2, 2))),
       dict(dimension_numbers=dn, rhs_dilation=(2, 2))),
  ]:
    np.testing.assert_array_equal(f(*args, **kwargs), lax.conv_general_dilated(*args, **kwargs))


def test_conv_impl_choice_and_env_override(monkeypatch):
  monkeypatch.delenv(C.ENV_VAR, raising=False)
  assert C.resolve_impl('auto') == ('cpu' if jax.default_backend() == 'cpu' else 'xla')
  assert C.resolve_impl('auto', jnp.float64) == 'xla'   # the matmul plans are tuned for float32
  assert C.resolve_impl('xla') == 'xla' and C.resolve_impl('gemm') == 'gemm'
  monkeypatch.setenv(C.ENV_VAR, 'xla')
  assert C.resolve_impl('auto') == 'xla'
  assert C.resolve_impl('gemm') == 'gemm'               # an explicit impl wins
  monkeypatch.setenv(C.ENV_VAR, 'cuda')
  with pytest.raises(ValueError, match=C.ENV_VAR):
    C.resolve_impl('auto')
  with pytest.raises(ValueError, match='impl'):
    C.resolve_impl('fast')
  with pytest.raises(ValueError, match='methods'):
    C.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), padding=1, methods=('dot', 'mm'))


# --- norms, pooling, GELU -------------------------------------------------------------------------

def _bn_plain(x, scale, bias, eps):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.square(x - mean).mean(axes)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


def _ln_plain(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


@pytest.mark.parametrize('shape', [(2, 9, 7, 6), (3, 1, 1, 5), (4, 6)])
def test_batch_norm_vjp_matches_autodiff(shape):
  rng = np.random.default_rng(3)
  x = _rand(rng, *shape) * 3 + 1
  scale = _rand(rng, shape[-1]) + 1.5
  bias = _rand(rng, shape[-1])
  # Cotangents for the output and, unusually, for the statistics too (normally zero: they only
  # feed the running averages under stop_gradient).
  gy, gm, gv = _rand(rng, *shape), _rand(rng, shape[-1]), _rand(rng, shape[-1])

  def run(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias, 1e-5)
      return jnp.sum(jnp.maximum(y, 0) * gy), mean, var

    def g(x, scale, bias):
      y, mean, var = fn(x, scale, bias, 1e-5)
      return jnp.sum(jnp.maximum(y, 0) * gy) + jnp.sum(mean * gm) + jnp.sum(var * gv)
    return f(x, scale, bias), jax.grad(g, (0, 1, 2))(x, scale, bias)

  (out0, grads0), (out1, grads1) = run(_bn_plain), run(layers.batch_norm_train)
  for name, a, b in zip(('loss', 'mean', 'var', 'dx', 'dscale', 'dbias'),
                        (*out1, *grads1), (*out0, *grads0)):
    _close(a, b, 1e-5, name)


@pytest.mark.parametrize('shape', [(2, 5, 7, 24), (3, 16)])
def test_layer_norm_vjp_matches_autodiff(shape):
  rng = np.random.default_rng(4)
  x = _rand(rng, *shape) * 2 - 1
  scale, bias, gy = _rand(rng, shape[-1]) + 1, _rand(rng, shape[-1]), _rand(rng, *shape)

  def run(fn):
    return jax.value_and_grad(lambda *a: jnp.sum(fn(*a, 1e-6) * gy), (0, 1, 2))(x, scale, bias)

  (l0, g0), (l1, g1) = run(_ln_plain), run(layers.layer_norm)
  _close(l1, l0, 1e-5, 'loss')
  for name, a, b in zip(('dx', 'dscale', 'dbias'), g1, g0):
    _close(a, b, 1e-5, name)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 9, 7, 4), (1, 2, 2, 2), (1, 1, 1, 1)])
def test_max_pool_matches_reduce_window(shape):
  """Same values; the gradient goes to the same (first) maximum of each window, ties included
  (post-ReLU inputs are full of equal zeros)."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0).round(1), jnp.float32)

  def ref(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))

  y0, vjp0 = jax.vjp(ref, x)
  y1, vjp1 = jax.vjp(lambda x: layers.max_pool(x, 3, 2, 1), x)
  np.testing.assert_array_equal(y1, y0)
  g = _rand(rng, *y0.shape)
  # Overlapping windows add their gradients in a different order: rounding only.
  _close(vjp1(g)[0], vjp0(g)[0], 1e-6, 'dx')
  # Routing: which inputs receive any gradient is identical.
  ones = jnp.ones_like(y0)
  np.testing.assert_array_equal(vjp1(ones)[0] > 0, vjp0(ones)[0] > 0)


def test_gelu_matches_exact_erfc_form():
  """PyTorch's formula x/2 (1 + erf(x/sqrt 2)) against jax's erfc form: the same function, to
  ~1e-6 absolute in float32 (for x << 0, 1 + erf(x) cancels; so does PyTorch's float32 GELU)."""
  x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
  ref = jax.nn.gelu(x, approximate=False)
  np.testing.assert_allclose(layers.gelu(x), ref, rtol=1e-6, atol=2e-6)
  d0 = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  d1 = jax.vmap(jax.grad(layers.gelu))(x)
  np.testing.assert_allclose(d1, d0, rtol=1e-6, atol=2e-6)


# --- a batch-sharded train step -------------------------------------------------------------------

MESH_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from flax import nnx
import modernize
from modernize.network import Network

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
x = np.random.default_rng(0).standard_normal((16, 24, 24, 3)).astype(np.float32)
y = np.arange(16) % 10
for step in ('resnet50', 'convnext_t'):
  cfg = modernize.LADDER.net_config(step, num_classes=10, width=8, depths=(1, 1, 1, 1),
                                    drop_path_rate=0.0)
  gd, params, rest = nnx.split(Network(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.sgd(0.1)   # SGD: AdamW magnifies reduction-order rounding (engineering notes)

  def train_step(params, rest, x, y):
    def loss_fn(params):
      m = nnx.merge(gd, params, rest, copy=True)
      m.train()
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.state(m, nnx.BatchStat)
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, _ = tx.update(g, tx.init(params), params)
    return loss, optax.apply_updates(params, u), stats

  ref = jax.jit(train_step)(params, rest, x, y)
  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  f = jax.jit(train_step, in_shardings=(rep, rep, batch, batch), out_shardings=rep)
  args = (params, rest, jax.device_put(x, batch), jax.device_put(y, batch))
  hlo = f.lower(*args).compile().as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo, step
  got = f(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5,
                               atol=1e-5 * max(float(np.abs(b).max()), 1e-30))
print('MESH-OK')
"""


def test_batch_sharded_train_step_matches_one_device():
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_NUM_CPU_DEVICES': '8',
         'JAX_PLATFORMS': 'cpu'}
  env.pop(C.ENV_VAR, None)
  r = subprocess.run([sys.executable, '-c', textwrap.dedent(MESH_SCRIPT)], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0 and 'MESH-OK' in r.stdout, r.stdout + r.stderr[-3000:]


# --- data pipeline --------------------------------------------------------------------------------

def _rand_augment_per_op(images, keys, n, m, mstd, prob, fill):
  """The reference: each op applied to its group of images through its own function."""
  op, applied, mag, negate = A.randaugment_params(keys, n, m, mstd, prob)
  out = images.copy()
  for layer in range(n):
    for k, name in enumerate(A.RANDAUGMENT_OP_NAMES):
      sel = np.flatnonzero(applied[:, layer] & (op[:, layer] == k))
      if sel.size:
        out[sel] = A.RANDAUGMENT_OPS[name](out[sel], mag[sel, layer], negate[sel, layer], fill)
  return out


@pytest.mark.parametrize('channels', [1, 3])
def test_batched_randaugment_warps_are_bit_exact(channels):
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (96, 13, 11, channels), dtype=np.uint8)
  keys = A.example_keys(3, np.arange(96))
  fill = (90,) * channels
  np.testing.assert_array_equal(A.rand_augment(images, keys, 2, 9, 0.5, 0.5, fill=fill),
                                _rand_augment_per_op(images, keys, 2, 9, 0.5, 0.5, fill))


def test_window_crop_and_presize_are_bit_exact():
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
  keys = A.example_keys(0, np.arange(20))
  got = A.random_crop_pad(images, keys, 4, fill=7)
  u = A.uniform(keys, A.STREAM_CROP, 2)
  oy, ox = (np.floor(u[:, i] * 9).astype(np.intp) for i in (0, 1))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), constant_values=7)
  rows, cols = oy[:, None] + np.arange(28), ox[:, None] + np.arange(28)
  np.testing.assert_array_equal(got, padded[np.arange(20)[:, None, None], rows[:, :, None],
                                            cols[:, None, :]])

  from experiments.data import datasets, pipeline
  transform = pipeline._make_transform(datasets.info('fashion_mnist'), 32, 1, None,
                                       A.AugmentConfig.paper(False))
  presized = transform.train_arrays(transform.presize(images, chunk=7), keys)
  direct = transform.train_arrays(images, keys)
  assert sorted(presized) == sorted(direct)
  for name in direct:
    np.testing.assert_array_equal(presized[name], direct[name], err_msg=name)


def test_keep_freed_memory_in_a_fresh_process():
  code = ('from experiments.runtime import keep_freed_memory; import sys; '
          'sys.exit(0 if keep_freed_memory() else 3)')
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  r = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, timeout=60)
  assert r.returncode == (0 if sys.platform.startswith('linux') else 3)
  r = subprocess.run([sys.executable, '-c', code], env={**env, 'MODERNIZE_MALLOC_TUNING': '0'},
                     cwd=ROOT, timeout=60)
  assert r.returncode == 3


# --- which path runs where (modernize.backend) ----------------------------------------------------

def _fast_path_ops(x, scale):
  """Which implementation each fast-path op traces to, read from its jaxpr (fresh functions each
  time: make_jaxpr, as jit, reuses the trace of a function it has seen)."""
  def jaxpr(f, *args):
    return str(jax.make_jaxpr(f)(*args))
  bn = jaxpr(lambda x: layers.batch_norm_train(x, scale, scale, 1e-5)[0], x)
  ln = jaxpr(lambda x: layers.layer_norm(x, scale, scale, 1e-6), x)
  pool = jaxpr(lambda x: layers.max_pool(x, 3, 2, 1), x)
  gelu = jaxpr(lambda x: layers.gelu(x), x)
  return {'batch_norm': 'custom_vjp' in bn, 'layer_norm': 'custom_vjp' in ln,
          'max_pool': 'custom_vjp' in pool and 'reduce_window' not in pool,
          'gelu': ' erf ' in gelu and 'erfc' not in gelu,
          'conv': C.resolve_impl('auto') == 'cpu',
          'depthwise': dw_impl.resolve_impl('auto') in ('native', 'shift')}


def test_fast_paths_are_taken_on_cpu_only(monkeypatch):
  """On the CPU backend every fast path is taken; forcing the accelerators' choice ('xla', by
  module switch or `$MODERNIZE_FAST_PATHS`) traces XLA's standard ops instead."""
  monkeypatch.delenv(backend.ENV_VAR, raising=False)
  monkeypatch.delenv(C.ENV_VAR, raising=False)
  monkeypatch.delenv(dw_impl.ENV_VAR, raising=False)
  x, scale = jnp.ones((2, 8, 8, 4)), jnp.ones((4,))
  on_cpu = jax.default_backend() == 'cpu'
  assert backend.fast_paths() == on_cpu
  assert set(_fast_path_ops(x, scale).values()) == {on_cpu}
  with backend.forced('xla'):
    assert not backend.fast_paths()
    assert set(_fast_path_ops(x, scale).values()) == {False}
    assert 'reduce_window_max' in str(jax.make_jaxpr(jax.grad(
        lambda x: layers.max_pool(x, 3, 2, 1).sum()))(x))
    assert 'erfc' in str(jax.make_jaxpr(lambda x: layers.gelu(x))(x))
  with backend.forced('cpu'):   # the fast paths wherever JAX runs (e.g. to time them on a GPU)
    assert backend.fast_paths()
  monkeypatch.setenv(backend.ENV_VAR, 'xla')
  assert not backend.fast_paths() and C.resolve_impl('auto') == 'xla'
  assert dw_impl.resolve_impl('auto') == 'xla'
  assert C.resolve_impl('gemm') == 'gemm'    # an explicit impl still wins
  monkeypatch.setenv(C.ENV_VAR, 'cpu')       # and so does the per-op variable
  assert C.resolve_impl('auto') == 'cpu'
  monkeypatch.setenv(backend.ENV_VAR, 'gpu')
  with pytest.raises(ValueError, match=backend.ENV_VAR):
    backend.fast_paths()
  with pytest.raises(ValueError):
    backend.set_fast_paths('fast')


def test_expected_platform_before_jax_starts(monkeypatch):
  """The trainer's malloc tuning is decided before JAX starts: by $JAX_PLATFORMS when set."""
  monkeypatch.delenv(backend.ENV_VAR, raising=False)
  for platforms, expected in (('cpu', 'cpu'), ('cuda', 'gpu'), ('cuda,cpu', 'gpu'),
                              ('tpu', 'tpu'), ('rocm', 'gpu')):
    monkeypatch.setenv('JAX_PLATFORMS', platforms)
    assert backend.expected_platform() == expected
    assert backend.host_fast_paths() == (expected == 'cpu')
  monkeypatch.setenv(backend.ENV_VAR, 'cpu')
  assert backend.host_fast_paths()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv(backend.ENV_VAR, 'xla')
  assert not backend.host_fast_paths()


@pytest.mark.parametrize('step', ['resnet50', 'convnext_t'])
def test_standard_ops_equal_the_fast_paths_in_a_network(step):
  """A train-mode forward and backward of a whole (small) network traced with the accelerators'
  choice (XLA's ops) equals the CPU fast paths: the maths is the same, the float32 rounding
  differs (sums in another order), so within 1e-4 of each tensor's largest value."""
  import modernize
  cfg = modernize.LADDER.net_config(step, num_classes=10, width=8, depths=(1, 1, 1, 1),
                                    in_channels=3, drop_path_rate=0.0)
  graphdef, params, rest = nnx.split(modernize.create_model(cfg, seed=0), nnx.Param, ...)
  x = _rand(np.random.default_rng(6), 4, 32, 32, 3)

  def run():
    @jax.jit
    def f(params, rest):
      def loss_fn(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train()
        return jnp.sum(jnp.sin(m(x)))
      return jax.value_and_grad(loss_fn)(params)
    return f(params, rest)

  fast = run()
  with backend.forced('xla'):
    standard = run()
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(standard)):
    _close(a, b, 1e-4, step)
