"""Tests of experiments/data/device_augment.py: each device op against augment.py's numpy / PIL op
on the same images and parameters, and whole training batches against the host pipeline's.

Tolerances (measured on CPU, float32): crops, flips, luma and all ten value ops are exact. The two
resamplers reimplement PIL's (run in float64 they match PIL exactly), in float32 where PIL computes
in double, so a sample on a rounding boundary can come out one grey level off: the affine warps
(rotate, shear, translate) differ by at most 1 on 0-7e-5 of the values (random 28-32px images, 256
per op), the antialiased bicubic random-resized crop by at most 1 on 4e-6 (28 -> 32) to 1.2e-4
(-> 16) of them; the tests allow at most 1 on 1e-3. Whole batches of Fashion-MNIST (both recipes,
RandAugment 2 layers) come out equal. On random RGB images, 6 x 256 per recipe, ~1e-4 of the values
differed, in 0.7-4% of the images: a later RandAugment op can amplify a one-level difference
(equalize, solarize; up to 128 levels once); the test allows 2e-3 of the values, 10% of the images.
"""

import functools

import jax
import numpy as np
import pytest

from experiments.data import augment as A
from experiments.data import datasets, pipeline
from experiments.data import device_augment as D

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (16, 20, 24, 3)).astype(np.uint8)
GRAY = RNG.integers(0, 256, (16, 28, 28, 1)).astype(np.uint8)
RGB[1] = RGB[1] // 4 + 60    # narrow ranges: auto-contrast and equalize then do something
GRAY[1] = GRAY[1] // 4 + 60
GRAY[2] = 77                 # a constant image: auto-contrast and equalize are the identity
IMAGES = pytest.mark.parametrize('x', [RGB, GRAY], ids=['rgb', 'gray'])
KEYS = A.example_keys(0, np.arange(16))


def _assert_close(ours, theirs, max_diff=0, max_fraction=0.0):
  """uint8 images equal, or differing by at most `max_diff` on at most `max_fraction` of the
  values."""
  ours = np.asarray(ours)
  assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
  d = np.abs(ours.astype(np.int64) - theirs.astype(np.int64))
  assert d.max() <= max_diff, f'max diff {d.max()}'
  assert (d > 0).mean() <= max_fraction, f'{(d > 0).mean():.2e} of the values differ'


# --- crops, flips, luma (exact) -------------------------------------------------------------------

@IMAGES
def test_pad_crop_is_random_crop_pad(x):
  for pad in (2, 4):
    offsets = A.crop_pad_offsets(KEYS, pad)
    assert offsets.shape == (16, 2) and offsets.min() >= 0 and offsets.max() <= 2 * pad
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1:3]
    windows = np.stack([p[oy:oy + h, ox:ox + w] for p, (oy, ox) in zip(padded, offsets)])
    np.testing.assert_array_equal(A.random_crop_pad(x, KEYS, pad), windows)  # the host's draw
    _assert_close(D.pad_crop(x, offsets, pad), windows)


@IMAGES
def test_hflip_and_gather(x):
  mask = A.flip_mask(KEYS)
  assert 0 < mask.sum() < len(mask)
  _assert_close(D.hflip(x, mask), A.random_hflip(x, KEYS))
  _assert_close(D.gather(x, [3, 0, 3]), x[[3, 0, 3]])


def test_to_grayscale():
  _assert_close(D.to_grayscale(RGB), A.to_grayscale(RGB))


# --- RandAugment's ops ----------------------------------------------------------------------------

@IMAGES
def test_value_ops_are_exact(x):
  """Per-image arguments, on the edges of their ranges too."""
  n, rng = len(x), np.random.default_rng(1)
  factor = rng.uniform(0.0, 2.0, n)
  factor[:3] = (0.0, 1.0, 1.9)
  bits, threshold, add = rng.integers(0, 9, n), rng.integers(0, 257, n), rng.integers(0, 111, n)
  bits[:2], threshold[:2], add[:2] = (0, 8), (0, 256), (0, 110)
  for name, args in (('invert', ()), ('auto_contrast', ()), ('equalize', ()),
                     ('posterize', (bits,)), ('solarize', (threshold,)),
                     ('solarize_add', (add,)), ('color', (factor,)), ('contrast', (factor,)),
                     ('brightness', (factor,)), ('sharpness', (factor,))):
    ours = jax.jit(getattr(D, name))(x, *args)
    np.testing.assert_array_equal(np.asarray(ours), getattr(A, name)(x, *args), err_msg=name)


@pytest.mark.parametrize('name', sorted(A.GEOMETRIC_MATRICES))
def test_affine_resampler_matches_pil(name):
  """augment.py's own matrices through the one device resampler, against PIL's warp."""
  rng = np.random.default_rng(2)
  for x, fill in ((rng.integers(0, 256, (128, 32, 32, 3)).astype(np.uint8), (11, 120, 250)),
                  (rng.integers(0, 256, (128, 28, 28, 1)).astype(np.uint8), (73,))):
    n, h, w, _ = x.shape
    m, negate = rng.uniform(0, 10, n), rng.random(n) < 0.5
    matrices = A.GEOMETRIC_MATRICES[name](n, h, w, m, negate)
    ours = jax.jit(D.affine, static_argnums=2)(x, matrices, fill)
    _assert_close(ours, A.affine(x, matrices, fill), max_diff=1, max_fraction=1e-3)
  square = RGB[:, :20, :20]
  _assert_close(D.affine(square, A.rotate_matrices(16, 20, 20, 90), 0),
                np.rot90(square, 1, axes=(1, 2)).copy())


@pytest.mark.parametrize('shape, size', [((64, 28, 28, 1), 32), ((64, 32, 32, 3), 16),
                                         ((32, 64, 48, 3), 24)])
def test_resized_crop_matches_pil_bicubic(shape, size):
  """Random-resized-crop boxes (up- and down-scaling) and the whole image, against PIL."""
  x = np.random.default_rng(3).integers(0, 256, shape).astype(np.uint8)
  keys = A.example_keys(4, np.arange(len(x)))
  boxes = A.random_resized_crop_boxes(keys, shape[1], shape[2])
  boxes[0] = (0, 0, shape[1], shape[2])
  ours = jax.jit(D.resized_crop, static_argnums=2)(x, boxes, size)
  _assert_close(ours, A.resize_boxes(x, boxes, size), max_diff=1, max_fraction=1e-3)


@functools.partial(jax.jit, static_argnames='fill')
def _one_layer(x, op, applied, level, factor, matrix, fill):
  params = {'ra_op': op, 'ra_applied': applied, 'ra_level': level, 'ra_factor': factor,
            'ra_matrix': matrix}
  return D.rand_augment(x, params, fill)


@IMAGES
def test_randaugment_ops_from_host_arguments(x):
  """Every op of RANDAUGMENT_OP_NAMES, selected per image by its index with the arguments
  `randaugment_arguments` derives from the magnitudes, against `augment.apply_op`; images whose op
  is not applied are unchanged."""
  n, s = len(x), x.shape[1]
  x = x[:, :, :s]                        # RandAugment runs on the square output images
  fill, rng = (11, 120, 250)[:x.shape[-1]], np.random.default_rng(4)
  for k, name in enumerate(A.RANDAUGMENT_OP_NAMES):
    mag, negate = rng.uniform(0, 10, n), rng.random(n) < 0.5
    op = np.full((n, 1), k)
    applied = np.arange(n)[:, None] % 4 != 3
    args = D.randaugment_arguments(op, mag[:, None], negate[:, None], s)
    ours = np.asarray(_one_layer(x, op, applied, args['ra_level'], args['ra_factor'],
                                 args['ra_matrix'], fill))
    np.testing.assert_array_equal(ours[~applied[:, 0]], x[~applied[:, 0]])
    on = applied[:, 0]
    theirs = A.apply_op(name, x[on], mag[on], negate[on], fill)
    geometric = name in A.GEOMETRIC_MATRICES
    _assert_close(ours[on], theirs, max_diff=int(geometric), max_fraction=1e-3 * geometric)


# --- whole training batches -----------------------------------------------------------------------

_train_batch = jax.jit(D.train_batch, static_argnames='config')


@pytest.mark.parametrize('large', [False, True], ids=['pad-crop', 'random-resized-crop'])
def test_train_batch_is_the_host_pipelines_batch(fashion, large):
  """Fashion-MNIST at 32px, the paper's recipe (crop, flip, RandAugment 2 layers, erasing): the
  device batch of the same indices and keys equals `pipeline.train_builder`'s."""
  seed, batch_size = 3, 48
  augment = A.AugmentConfig.paper(large)
  builder = pipeline.train_builder('fashion_mnist', batch_size=batch_size, image_size=32,
                                   seed=seed, augment=augment, num_examples=256)
  config = D.for_dataset('fashion_mnist', image_size=32, augment=augment)
  assert config == D.DeviceTransform(32, augment, (73,), False)
  images, labels = builder.arrays()     # what the trainer uploads
  assert images.shape == ((256, 28, 28, 1) if large else (256, 32, 32, 1))
  for step in (0, 5):                    # 5: across the epoch boundary of the 256 examples
    indices, positions = pipeline.train_indices(len(images), seed=seed, step=step,
                                                batch_size=batch_size)
    params = D.host_params(A.example_keys(seed, positions), config, *images.shape[1:3])
    ours = _train_batch(images, indices, params, config, labels=labels)
    host = builder(step)
    assert ours.keys() == host.keys()
    for key in host:
      np.testing.assert_array_equal(np.asarray(ours[key]), host[key], err_msg=key)


def _smooth_rgb(n, h, w):
  """Random RGB images with some structure (blurred noise plus a gradient)."""
  x = np.random.default_rng(n).normal(size=(n, h, w, 3))
  x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2)) * 40 + np.linspace(0, 120, w)[None, None, :, None]
  return np.clip(x + 60, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('large', [False, True], ids=['pad-crop', 'random-resized-crop'])
@pytest.mark.parametrize('channels', [3, 1])
def test_train_batch_rgb_against_the_host_transform(large, channels):
  """An RGB data set (3 channels, or luma for a 1-channel model) through the host transform
  (`pipeline._Transform.train_arrays`) and the device."""
  info = datasets.DataInfo('rgb', 10, 64, 0, (24, 24, 3), (0.4, 0.5, 0.6), (0.2,) * 3)
  augment = A.AugmentConfig.paper(large)
  transform = pipeline._make_transform(info, 32, channels, None, augment)
  config = D.DeviceTransform.from_pipeline(transform)
  assert config.luma == (channels == 1)
  assert config.fill == ((123,) if channels == 1 else (102, 128, 153))   # the mean (of the luma)
  stored = _smooth_rgb(64, 24, 24)
  images = transform.presize(stored)
  indices = np.random.default_rng(1).permutation(64)[:48]
  keys = A.example_keys(1, np.arange(100, 148))
  ours = _train_batch(images, indices, D.host_params(keys, config, *images.shape[1:3]), config)
  host = transform.train_arrays(images[indices], keys)
  assert ours.keys() == host.keys()
  for key in ('erase_box', 'erase_key'):
    np.testing.assert_array_equal(np.asarray(ours[key]), host[key])
  _assert_close(ours['image'], host['image'], max_diff=255, max_fraction=2e-3)
  differing = (np.asarray(ours['image']) != host['image']).any(axis=(1, 2, 3))
  assert differing.mean() <= 0.1


# --- refusals -------------------------------------------------------------------------------------

def test_an_op_without_a_device_version_refuses_the_recipe(monkeypatch):
  D.check_supported(A.AugmentConfig.paper(False))
  monkeypatch.setattr(A, 'RANDAUGMENT_OP_NAMES', A.RANDAUGMENT_OP_NAMES + ('Posterize2',))
  D.check_supported(A.AugmentConfig.standard(False))       # no RandAugment: nothing to refuse
  with pytest.raises(ValueError, match='RandAugment op Posterize2 has no device') as e:
    D.check_supported(A.AugmentConfig.paper(False))
  assert '\n' not in str(e.value)


def test_small_recipe_needs_images_resized_to_the_output_size():
  config = D.DeviceTransform(32, A.AugmentConfig.standard(False), (0, 0, 0))
  params = D.host_params(KEYS[:2], config, 20, 24)
  with pytest.raises(ValueError, match=r'resized to 32x32 \(pipeline.TrainBatches.arrays\)'):
    D.train_batch(RGB, [0, 1], params, config)
