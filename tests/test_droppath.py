"""Stochastic depth (modernize.layers.DropPath) against timm's `drop_path`: one keep/drop draw per
sample, survivors scaled by 1 / keep_prob, so that the expectation is the input; identity in eval
mode; in a ConvNeXt block a dropped sample gets the shortcut alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modernize.blocks import convnext_block
from modernize.layers import DropPath
from modernize.network import Network
from modernize.presets import preset

RATE = 0.3
KEEP = 1.0 - RATE


def inputs(n=4000, seed=0):
  """n copies of one random (4, 4, 3) sample: the mean over the batch estimates E[output]."""
  x = np.random.RandomState(seed).randn(1, 4, 4, 3).astype(np.float32) + 2.0
  return np.repeat(x, n, axis=0)


def per_sample_factor(out, x):
  """out / x for each sample, checked to be one number per sample."""
  ratio = out / x
  factor = ratio.reshape(len(x), -1)[:, 0]
  np.testing.assert_allclose(ratio, np.broadcast_to(factor[:, None, None, None], ratio.shape),
                             rtol=1e-6, atol=0)
  return factor


def check_drop_path_output(out, x, rate):
  """Whole samples zeroed or scaled by 1 / (1 - rate); E[out] = x."""
  keep = 1.0 - rate
  factor = per_sample_factor(np.asarray(out), x)
  dropped = factor == 0.0
  np.testing.assert_allclose(factor[~dropped], 1.0 / keep, rtol=1e-6)
  n = len(x)
  sigma = np.sqrt(rate * keep / n)
  assert abs((~dropped).mean() - keep) < 5 * sigma, (~dropped).mean()
  # E[output] = x: a missing 1 / keep rescaling would give keep * x.
  np.testing.assert_allclose(np.asarray(out).mean(0), x[0], rtol=5 * sigma / keep)
  return dropped


@pytest.mark.parametrize('rate', [0.1, RATE, 0.6])
def test_drop_path_values_and_expectation(rate):
  x = inputs()
  layer = DropPath(rate, rngs=nnx.Rngs(dropout=0))
  check_drop_path_output(layer(jnp.asarray(x), key=jax.random.key(1)), x, rate)
  # The module's own stream (no key) does the same, and advances between calls.
  first = check_drop_path_output(layer(jnp.asarray(x)), x, rate)
  second = check_drop_path_output(layer(jnp.asarray(x)), x, rate)
  assert (first != second).any()


def test_drop_path_is_a_pure_function_of_the_key():
  x = jnp.asarray(inputs(n=64))
  layer = DropPath(RATE, rngs=nnx.Rngs(dropout=0))
  a = layer(x, key=jax.random.key(5))
  b = layer(x, key=jax.random.key(5))
  c = layer(x, key=jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_drop_path_eval_mode_and_zero_rate_are_identity():
  x = jnp.asarray(inputs(n=64))
  layer = DropPath(RATE, rngs=nnx.Rngs(dropout=0))
  layer.eval()
  np.testing.assert_array_equal(np.asarray(layer(x, key=jax.random.key(0))), np.asarray(x))
  layer.train()
  assert not np.array_equal(np.asarray(layer(x, key=jax.random.key(0))), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(DropPath(0.0)(x, key=jax.random.key(0))),
                                np.asarray(x))
  np.testing.assert_array_equal(
      np.asarray(DropPath(RATE, deterministic=True)(x, key=jax.random.key(0))), np.asarray(x))


@pytest.mark.torch
def test_drop_path_matches_timm_semantics():
  """timm's drop_path on the same input: the same per-sample mask shape, the same two values per
  sample (0 and x / keep_prob), the same keep rate, the same mean; eval mode is identity in both."""
  torch = pytest.importorskip('torch')
  drop_path = pytest.importorskip('timm.layers').drop_path
  x = inputs()
  torch.manual_seed(0)
  theirs = drop_path(torch.from_numpy(x.transpose(0, 3, 1, 2)), RATE, training=True).numpy()
  theirs = theirs.transpose(0, 2, 3, 1)
  ours = np.asarray(DropPath(RATE)(jnp.asarray(x), key=jax.random.key(0)))
  factors = []
  for out in (ours, theirs):
    check_drop_path_output(out, x, RATE)
    factors.append(np.unique(per_sample_factor(out, x)))
  np.testing.assert_allclose(factors[0], factors[1], rtol=1e-6)
  assert len(factors[0]) == 2
  np.testing.assert_array_equal(
      drop_path(torch.from_numpy(x), RATE, training=False).numpy(), x)


def test_dropped_sample_in_a_convnext_block_keeps_the_shortcut():
  """Train mode: output - input is 0 (dropped) or the eval-mode branch / keep_prob (kept)."""
  block = convnext_block(8, layer_scale_init=0.5, drop_path=RATE, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(1).randn(256, 5, 5, 8).astype(np.float32))
  block.eval()
  branch = np.asarray(block(x)) - np.asarray(x)
  assert np.abs(branch).min(axis=(1, 2, 3)).max() > 0
  block.train()
  delta = np.asarray(block(x, key=jax.random.key(3))) - np.asarray(x)
  dropped = np.all(delta == 0.0, axis=(1, 2, 3))
  np.testing.assert_allclose(delta[~dropped], branch[~dropped] / KEEP, rtol=1e-4, atol=1e-5)
  sigma = np.sqrt(RATE * KEEP / len(x))
  assert abs(dropped.mean() - RATE) < 5 * sigma


@pytest.mark.torch
def test_network_drop_path_rates_match_timm_convnext():
  """Rates grow linearly from 0 to drop_path_rate over all blocks, as in timm's ConvNeXt."""
  timm = pytest.importorskip('timm')
  cfg = preset('convnext_tiny', depths=(2, 2, 3, 2), width=8, drop_path_rate=0.4)
  model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(params=0, dropout=1)))
  ours = [block.drop_path.rate for stage in model.stages for block in stage.blocks]
  ref = timm.create_model('convnext_atto', pretrained=False, depths=(2, 2, 3, 2),
                          dims=(8, 16, 32, 64), drop_path_rate=0.4)
  theirs = [float(getattr(m.drop_path, 'drop_prob', 0.0)) for s in ref.stages for m in s.blocks]
  assert len(ours) == len(theirs) == 9
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
