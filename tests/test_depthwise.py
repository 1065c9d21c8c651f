"""Tests for modernize.depthwise: every fast implementation agrees with XLA's grouped conv.

Tolerance: float32 comparisons use ``|a - b| <= 1e-5 * |b| + 1e-5 * max|b|``.  The
implementations add the same products in a different order (and the native kernel fuses
multiply-adds), so each output differs from XLA's by rounding only: a sum of n terms is off
by about sqrt(n) * 6e-8 of its scale, with n <= k*k = 121 (forward, input gradient) or
n = N*Ho*Wo <= 270 here (kernel gradient), i.e. ~1e-6 of the largest output (measured worst
case ~7e-7).  1e-5 leaves margin, yet a wrong tap, border or stride gives O(1) errors.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modernize import depthwise as dw
from modernize.depthwise import DepthwiseConv, depthwise_conv2d

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5

# The native kernel is supported on CPU wherever a C++ compiler is found; there a kernel that fails
# to build fails these tests (the fast path must not silently disappear). Elsewhere they skip.
_CXX = os.environ.get("MODERNIZE_CXX") or os.environ.get("CXX") or "g++"
NATIVE_SUPPORTED = jax.default_backend() == "cpu" and shutil.which(_CXX) is not None
_NO_NATIVE = f"the native kernel needs a CPU backend and a C++ compiler ({_CXX!r} not found)"
NATIVE = pytest.param("native", marks=pytest.mark.skipif(not NATIVE_SUPPORTED, reason=_NO_NATIVE))
FAST_IMPLS = ["shift", NATIVE]

# (N, H, W, C): batch 1 and 3; odd, even and non-square spatial sizes; C = 5 (less than one
# SIMD vector), 21 (one 16-wide vector + tails) and 96 (six AVX-512 vectors); an input
# smaller than the kernel (every output pixel is a border pixel).
SHAPES = [(1, 9, 6, 5), (3, 8, 11, 96), (3, 7, 5, 21), (1, 2, 3, 16)]


def _close(a, b, what=""):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(float(np.max(np.abs(b))), 1e-30)
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale, err_msg=what)


@functools.lru_cache(maxsize=None)
def _fwd_bwd(impl, stride):
  """jit of (x, kernel, cotangent) -> (y, dx, dkernel); takes lists to batch shapes."""

  def one(x, k, g):
    y, vjp = jax.vjp(lambda a, b: depthwise_conv2d(a, b, stride=stride, impl=impl), x, k)
    return (y, *vjp(g))

  @jax.jit
  def f(xs, ks, gs):
    if isinstance(xs, (list, tuple)):
      return [one(x, k, g) for x, k, g in zip(xs, ks, gs)]
    return one(xs, ks, gs)

  return f


def _inputs(shape, k, stride, seed=0):
  n, h, w, c = shape
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  kern = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
  ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
  g = jnp.asarray(rng.standard_normal((n, ho, wo, c)), jnp.float32)
  return x, kern, g


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7, 11])
def test_matches_xla_values_and_gradients(impl, k, stride):
  # One jit over all shapes: a quarter of the compilations.
  xs, ks, gs = zip(*(_inputs(shape, k, stride) for shape in SHAPES))
  refs = _fwd_bwd("xla", stride)(xs, ks, gs)
  outs = _fwd_bwd(impl, stride)(xs, ks, gs)
  for shape, out, ref in zip(SHAPES, outs, refs):
    for name, a, b in zip(("y", "dx", "dkernel"), out, ref):
      _close(a, b, f"{impl} {name} shape={shape} k={k} s={stride}")


def test_output_size_is_pytorch_padding():
  x = jnp.zeros((2, 9, 6, 3))
  for k in (3, 7):
    for s in (1, 2):
      y = depthwise_conv2d(x, jnp.zeros((k, k, 1, 3)), stride=s, impl="xla")
      assert y.shape == (2, (9 + 2 * (k // 2) - k) // s + 1, (6 + 2 * (k // 2) - k) // s + 1, 3)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_eager_and_grad(impl):
  x, kern, _ = _inputs((2, 6, 7, 16), 3, 1, seed=1)

  def loss(x, kern, impl):
    return jnp.sum(jnp.tanh(depthwise_conv2d(x, kern, impl=impl)))

  _close(depthwise_conv2d(x, kern, impl=impl), depthwise_conv2d(x, kern, impl="xla"), "eager")
  gref = jax.grad(loss, (0, 1))(x, kern, "xla")
  for a, b in zip(jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, kern, impl), gref):
    _close(a, b, "jit(grad)")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_vmap(impl):
  rng = np.random.default_rng(2)
  xb = jnp.asarray(rng.standard_normal((3, 2, 7, 6, 5)), jnp.float32)
  kb = jnp.asarray(rng.standard_normal((3, 3, 3, 1, 5)), jnp.float32)

  def vg(impl, in_axes):
    def loss(x, k):
      return jnp.sum(jnp.sin(depthwise_conv2d(x, k, stride=2, impl=impl)))

    return jax.vmap(jax.value_and_grad(loss, (0, 1)), in_axes)

  # The custom vmap rules only exist for 'native'; 'shift' is plain jnp: check one case.
  for in_axes in [(0, None), (0, 0), (None, 0)] if impl == "native" else [(0, 0)]:
    args = (xb if in_axes[0] == 0 else xb[0], kb if in_axes[1] == 0 else kb[0])
    out, ref = vg(impl, in_axes)(*args), vg("xla", in_axes)(*args)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      _close(a, b, f"vmap in_axes={in_axes}")


@pytest.mark.skipif(not NATIVE_SUPPORTED, reason=_NO_NATIVE)
def test_native_kernel_builds_where_a_compiler_exists(monkeypatch):
  monkeypatch.delenv(dw.ENV_VAR, raising=False)
  dw.native_library_path()  # raises NativeBuildError with the compiler's message
  assert dw.native_available()
  assert dw.resolve_impl("auto") == "native"


def test_native_kernel_gradient_is_deterministic():
  if not NATIVE_SUPPORTED:
    pytest.skip(_NO_NATIVE)
  x, kern, g = _inputs((8, 20, 20, 32), 7, 1, seed=3)
  f = _fwd_bwd("native", 1)
  first = np.asarray(f(x, kern, g)[2])
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(f(x, kern, g)[2]), first)


def test_bfloat16_input():
  x, kern, _ = _inputs((2, 8, 8, 16), 7, 1, seed=4)
  ref = depthwise_conv2d(x, kern, impl="xla")
  for impl in ("shift", "auto"):
    y = jax.jit(functools.partial(depthwise_conv2d, impl=impl))(
      x.astype(jnp.bfloat16), kern.astype(jnp.bfloat16)
    )
    assert y.dtype == jnp.bfloat16
    # bf16 inputs carry ~3 significant digits: compare loosely with the f32 result.
    np.testing.assert_allclose(
      np.asarray(y, np.float32), ref, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(ref)))
    )


def test_auto_choice_and_env_override(monkeypatch):
  monkeypatch.delenv(dw.ENV_VAR, raising=False)
  expected = "native" if dw.native_available() else "shift"
  assert dw.resolve_impl("auto") == (expected if jax.default_backend() == "cpu" else "xla")
  assert dw.resolve_impl("auto", jnp.int32) == "xla"

  x, kern, _ = _inputs((1, 6, 6, 4), 3, 1)

  def ops(**kw):
    return str(jax.make_jaxpr(lambda x, k: depthwise_conv2d(x, k, **kw))(x, kern))

  monkeypatch.setenv(dw.ENV_VAR, "xla")
  assert dw.resolve_impl("auto") == "xla"
  assert "conv_general_dilated" in ops()
  assert "conv_general_dilated" not in ops(impl="shift")  # explicit impl wins
  monkeypatch.setenv(dw.ENV_VAR, "shift")
  assert dw.resolve_impl() == "shift"
  assert "conv_general_dilated" not in ops()
  monkeypatch.setenv(dw.ENV_VAR, "bogus")
  with pytest.raises(ValueError, match=dw.ENV_VAR):
    depthwise_conv2d(x, kern)


def test_argument_errors():
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match="odd"):
    depthwise_conv2d(x, jnp.zeros((4, 4, 1, 4)))
  for bad in (0, 3, 1.5, True):
    with pytest.raises(ValueError, match="stride"):
      depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), stride=bad)
  with pytest.raises(ValueError, match="channels"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 1, 5)))
  with pytest.raises(ValueError, match=r"\(k, k, 1, C\)"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 4, 4)))
  with pytest.raises(ValueError, match="impl"):
    depthwise_conv2d(x, jnp.zeros((3, 3, 1, 4)), impl="cudnn")
  with pytest.raises(ValueError, match="odd"):
    DepthwiseConv(4, 6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="stride"):
    DepthwiseConv(4, 7, stride=3, rngs=nnx.Rngs(0))


def test_module():
  m = DepthwiseConv(24, 7, rngs=nnx.Rngs(0))
  assert m.kernel[...].shape == (7, 7, 1, 24)
  assert m.bias[...].shape == (24,)
  assert abs(float(jnp.std(m.kernel[...])) - 0.02) < 0.005
  m.bias[...] = jnp.arange(24, dtype=jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 24)), jnp.float32)
  _close(m(x), depthwise_conv2d(x, m.kernel[...], impl="xla") + m.bias[...], "module")

  m2 = DepthwiseConv(
    8,
    3,
    stride=2,
    use_bias=False,
    impl="shift",
    kernel_init=jax.nn.initializers.ones,
    rngs=nnx.Rngs(1),
  )
  assert m2.bias is None
  assert m2(jnp.ones((1, 8, 8, 8))).shape == (1, 4, 4, 8)
  params = nnx.state(m2, nnx.Param)
  assert [v.shape for v in jax.tree.leaves(params)] == [(3, 3, 1, 8)]
  _close(m2.kernel[...], jnp.ones((3, 3, 1, 8)))


def _run(code, **env):
  full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
  r = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=ROOT,
    timeout=300,
  )
  assert r.returncode == 0, r.stdout + r.stderr
  return r.stdout


MESH_SCRIPT = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from modernize.depthwise import depthwise_conv2d

assert jax.device_count() == 8, jax.devices()
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rng = np.random.default_rng(0)
for impl in ("native", "shift"):
    for s in (1, 2):
        x = rng.standard_normal((16, 12, 10, 24)).astype(np.float32)
        k = rng.standard_normal((7, 7, 1, 24)).astype(np.float32)

        def step(x, k, impl=impl, s=s):
            def loss(x, k):
                y = depthwise_conv2d(x, k, stride=s, impl=impl)
                return jnp.sum(jnp.sin(y)), y
            return jax.value_and_grad(loss, (0, 1), has_aux=True)(x, k)

        (l0, y0), (gx0, gk0) = jax.jit(lambda x, k: step(x, k, "xla"))(x, k)
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        ks = jax.device_put(k, NamedSharding(mesh, P()))
        f = jax.jit(step)
        (l, y), (gx, gk) = f(xs, ks)
        for a, b in ((y, y0), (gx, gx0), (gk, gk0), (l, l0)):
            b = np.asarray(b, np.float64)
            np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-5,
                                       atol=1e-5 * float(np.abs(b).max()))
        assert y.sharding.spec[0] == "data" and gx.sharding.spec[0] == "data"
        hlo = f.lower(xs, ks).compile().as_text()
        assert "all-gather" not in hlo and "all-to-all" not in hlo, impl
        if impl == "native":
            # Each device runs the kernels on its own 2-image shard.
            calls = re.findall(r'custom_call_target="(modernize_dw_\w+)"', hlo)
            assert sorted(calls) == ["modernize_dw_dw", "modernize_dw_dx",
                                     "modernize_dw_fwd"], calls
            for op in calls:
                shard = rf'"{op}", operand_layout_constraints=\{{f32\[2,'
                assert re.search(shard, hlo), f"{op} does not run on a 2-image shard"
print("MESH-OK")
"""


def test_batch_sharded_8_device_mesh():
  if not NATIVE_SUPPORTED:
    pytest.skip(_NO_NATIVE)
  out = _run(MESH_SCRIPT, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
  assert "MESH-OK" in out


def test_no_compiler_falls_back(tmp_path):
  code = """
    import warnings, jax.numpy as jnp, numpy as np
    from modernize import depthwise as dw
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 3)), jnp.float32)
    k = jnp.ones((3, 3, 1, 3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert dw.resolve_impl("auto") == "shift"
        y = dw.depthwise_conv2d(x, k)
        dw.depthwise_conv2d(x, k)
    assert len([m for m in w if "native kernel unavailable" in str(m.message)]) == 1, w
    np.testing.assert_allclose(y, dw.depthwise_conv2d(x, k, impl="xla"), rtol=1e-5, atol=1e-5)
    try:
        dw.depthwise_conv2d(x, k, impl="native")
    except dw.NativeBuildError as e:
        assert "compiler" in str(e), e
    else:
        raise AssertionError("expected NativeBuildError")
    print("FALLBACK-OK")
    """
  out = _run(
    code,
    MODERNIZE_CXX=str(tmp_path / "no-such-g++"),
    MODERNIZE_CACHE_DIR=str(tmp_path / "cache"),
    JAX_PLATFORMS="cpu",
  )
  assert "FALLBACK-OK" in out
