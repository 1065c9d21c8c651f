"""Mixup, CutMix and label smoothing (experiments.training.mixing) against timm's Mixup (mode
'batch').

timm mixes each image with the one at the mirrored batch position (`x.flip(0)`) with one lam per
batch, and mixes the smoothed one-hot targets with the same lam (`timm.data.mixup.mixup_target`).
timm draws from NumPy's global RNG and ours from a JAX key, so lam is read back from our output
and timm's targets are computed for that lam; images are checked by an independent computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from experiments.training.mixing import mix, smooth_one_hot

pytestmark = pytest.mark.torch

NUM_CLASSES = 10
# Distinct labels, none equal to its mirror's, so that lam can be read from the targets.
LABELS = np.array([0, 1, 2, 3, 4, 5, 6, 7], np.int32)


@functools.lru_cache(maxsize=None)
def jitted_mix(**kwargs):
  return jax.jit(functools.partial(mix, num_classes=NUM_CLASSES, **kwargs))


def run_mix(seed, x, labels, **kwargs):
  """mix() under jit (as in the train step), one compilation per setting."""
  out, targets = jitted_mix(**kwargs)(jax.random.key(seed), jnp.asarray(x), jnp.asarray(labels))
  return np.asarray(out), np.asarray(targets)


def images(n=8, h=8, w=12, c=3, seed=0):
  """Random floats: no pixel of one image equals the same pixel of another."""
  return np.random.RandomState(seed).rand(n, h, w, c).astype(np.float32)


def timm_targets(labels, lam, smoothing):
  return mixup_target(torch.from_numpy(labels.astype(np.int64)), NUM_CLASSES, lam=float(lam),
                      smoothing=smoothing).numpy()


def lam_from_targets(targets, labels, smoothing):
  """targets[0, labels[0]] = lam * on + (1 - lam) * off, with timm's on / off values."""
  off = smoothing / NUM_CLASSES
  on = 1.0 - smoothing + off
  return (float(targets[0, labels[0]]) - off) / (on - off)


@pytest.mark.parametrize('smoothing', [0.0, 0.1, 0.3])
def test_smooth_one_hot_matches_timm(smoothing):
  got = np.asarray(smooth_one_hot(jnp.asarray(LABELS), NUM_CLASSES, smoothing))
  np.testing.assert_allclose(got, timm_targets(LABELS, 1.0, smoothing), rtol=1e-6, atol=1e-7)
  # off = smoothing / K, on = 1 - smoothing + off: rows sum to 1.
  np.testing.assert_allclose(got[np.arange(8), LABELS], 1 - smoothing + smoothing / NUM_CLASSES,
                             rtol=1e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_no_mixing_only_smooths(smoothing):
  x = images()
  for kwargs in [dict(mixup_alpha=0.0, cutmix_alpha=0.0),
                 dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.0)]:
    out, targets = run_mix(0, x, LABELS, label_smoothing=smoothing, **kwargs)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_allclose(targets, timm_targets(LABELS, 1.0, smoothing),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_mixup_blends_with_the_mirrored_image_and_targets(seed, smoothing):
  x = images(seed=seed)
  out, targets = run_mix(seed, x, LABELS, mixup_alpha=0.8, cutmix_alpha=0.0,
                         label_smoothing=smoothing)
  lam = lam_from_targets(targets, LABELS, smoothing)
  assert 0.0 <= lam <= 1.0 and 0.02 < min(lam, 1 - lam)   # a real blend for these seeds
  # timm's batch mode: x * lam + x.flip(0) * (1 - lam), the targets mixed alike.
  np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(targets, timm_targets(LABELS, lam, smoothing), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_cutmix_box_and_target_weights_agree(seed, smoothing):
  x = images(seed=seed)
  out, targets = run_mix(seed, x, LABELS, mixup_alpha=0.0, cutmix_alpha=1.0,
                         label_smoothing=smoothing)
  partner = x[::-1]
  from_self = out == x
  from_partner = out == partner
  # Every pixel comes whole from the image itself or from its mirror partner: no blending.
  assert np.all(from_self | from_partner)
  box = from_partner[0, :, :, 0]
  # One box for the whole batch and every channel (mode 'batch').
  assert np.all(from_partner == box[None, :, :, None])
  # The box is an axis-aligned rectangle.
  if box.any():
    rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
    assert np.all(box[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
  # lam is the fraction of pixels kept, exactly (timm's correct_lam), and so are the targets.
  lam = 1.0 - box.mean()
  np.testing.assert_allclose(lam_from_targets(targets, LABELS, smoothing), lam, atol=1e-6)
  np.testing.assert_allclose(targets, timm_targets(LABELS, lam, smoothing), rtol=1e-5, atol=1e-6)


def test_cutmix_box_areas_match_timms_distribution():
  """Beta(1, 1) draws of lam, a box of side sqrt(1 - lam) centred uniformly and clipped: the
  mean corrected box area (1 - lam) is timm's (simulated with timm's own box function).

  timm >= 1.0 makes a box of odd side one pixel longer than ours ((cut + 1) // 2 above the
  centre, ours and timm 0.3.2's, the official ConvNeXt's, cut // 2): 0.311 against 0.300 at 32x32.
  """
  x = jnp.asarray(images(n=2, h=32, w=32, c=1))
  labels = jnp.asarray([0, 1])
  run = jax.jit(jax.vmap(lambda k: mix(k, x, labels, num_classes=NUM_CLASSES, mixup_alpha=0.0,
                                       cutmix_alpha=1.0)[1][0, 1]))
  ours = np.asarray(run(jax.random.split(jax.random.key(0), 4000)))   # = 1 - lam
  rng = np.random.RandomState(0)
  state = np.random.get_state()
  np.random.seed(1)   # timm draws the box centre from NumPy's global RNG
  try:
    theirs = [1.0 - cutmix_bbox_and_lam((2, 1, 32, 32), rng.beta(1.0, 1.0))[1]
              for _ in range(10000)]
  finally:
    np.random.set_state(state)
  assert len(np.unique(ours)) > 100
  assert abs(ours.mean() - np.mean(theirs)) < 0.035, (ours.mean(), np.mean(theirs))
  # The smallest and largest boxes occur too.
  assert ours.min() < 0.02 and ours.max() > 0.8


def test_switch_and_apply_probabilities():
  """CutMix is chosen with probability switch_prob, mixing applied with probability mix_prob."""
  x = jnp.asarray(images(n=2, h=32, w=32, c=1))
  labels = jnp.asarray([0, 1])

  @jax.jit
  def kinds(switch_prob, mix_prob):
    def one(key):
      out, targets = mix(key, x, labels, num_classes=NUM_CLASSES, mixup_alpha=0.8,
                         cutmix_alpha=1.0, switch_prob=switch_prob, mix_prob=mix_prob)
      exact = jnp.all((out == x) | (out == x[::-1]))   # CutMix or nothing: no blended pixel
      untouched = targets[0, 0] == 1.0
      return exact & ~untouched, untouched
    cutmix, untouched = jax.vmap(one)(jax.random.split(jax.random.key(1), 2000))
    return cutmix.mean(), untouched.mean()

  cutmix, untouched = kinds(0.2, 1.0)
  assert abs(cutmix - 0.2) < 0.04 and untouched < 0.02
  cutmix, untouched = kinds(0.5, 0.6)
  assert abs(cutmix - 0.5 * 0.6) < 0.05 and abs(untouched - 0.4) < 0.05
