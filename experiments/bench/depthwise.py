"""Micro-benchmark of the depthwise convolution implementations in `modernize.depthwise`.

    python -m experiments.bench.depthwise                 # all impls, default shapes
    python -m experiments.bench.depthwise --impls xla native --repeats 20

For every shape (N x H x W x C, kernel k, stride s) and implementation it prints the median
wall time in ms of the jitted forward pass and of forward + backward (gradients w.r.t. the
input and the kernel), after one warm-up call, and the speed-up over 'xla'.  The machine may
be noisy: compare numbers from one run.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli import ArgumentParser, guarded, positive
from modernize import depthwise as dwmod

IMPLS = ("xla", "shift", "native")

DEFAULT_SHAPES = (
  # (N, H, W, C, k, stride)
  (8, 56, 56, 96, 7, 1),
  (32, 8, 8, 96, 7, 1),
  (32, 16, 16, 96, 7, 1),
  (8, 56, 56, 384, 3, 2),
  (8, 7, 7, 768, 7, 1),
)


def _time(fn, args, repeats, budget_s):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  n = int(max(3, min(repeats, budget_s / max(first, 1e-6))))
  times = [first]
  for _ in range(n - 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def bench(shape, impl, repeats, budget_s):
  n, h, w, c, k, s = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
  kern = jnp.asarray(0.1 * rng.standard_normal((k, k, 1, c)), jnp.float32)
  ho, wo = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
  g = jnp.asarray(rng.standard_normal((n, ho, wo, c)), jnp.float32)

  fwd = jax.jit(lambda x, kern: dwmod.depthwise_conv2d(x, kern, stride=s, impl=impl))

  @jax.jit
  def fwd_bwd(x, kern, g):
    y, vjp = jax.vjp(lambda a, b: dwmod.depthwise_conv2d(a, b, stride=s, impl=impl), x, kern)
    return y, vjp(g)

  return (_time(fwd, (x, kern), repeats, budget_s), _time(fwd_bwd, (x, kern, g), repeats, budget_s))


@guarded
def main(argv=None) -> int:
  ap = ArgumentParser(prog="python -m experiments.bench.depthwise", description=__doc__)
  ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  ap.add_argument("--repeats", type=positive(), default=15)
  ap.add_argument(
    "--budget", type=positive(float), default=4.0,
    help="max seconds of timed calls per (shape, impl, pass)"
  )
  args = ap.parse_args(argv)

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{jax.device_count()} device(s); impl='auto' -> {dwmod.resolve_impl('auto')}"
  )
  header = (
    f"{'shape (NxHxWxC k s)':<24}{'impl':<8}{'fwd ms':>10}{'fwd+bwd ms':>12}"
    f"{'fwd x':>8}{'f+b x':>8}"
  )
  print(header)
  print("-" * len(header))
  for shape in DEFAULT_SHAPES:
    n, h, w, c, k, s = shape
    label = f"{n}x{h}x{w}x{c} k{k} s{s}"
    results = {impl: bench(shape, impl, args.repeats, args.budget) for impl in args.impls}
    base = results.get("xla")
    for impl, (f, fb) in results.items():
      sp = f"{base[0] / f:8.1f}{base[1] / fb:8.1f}" if base else ""
      print(f"{label:<24}{impl:<8}{f:10.2f}{fb:12.2f}{sp}")
      label = ""
  return 0


if __name__ == "__main__":
  sys.exit(main())
