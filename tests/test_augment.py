"""Unit tests of experiments/data/augment.py: the stateless RNG, each op, the crops, RandAugment,
erasing.

numpy (and PIL as a reference) only: no TensorFlow, fast.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from experiments.data import augment as A

RNG = np.random.default_rng(0)
RGB = RNG.integers(20, 230, (6, 20, 24, 3)).astype(np.uint8)
GRAY = RNG.integers(20, 230, (6, 28, 28, 1)).astype(np.uint8)
KEYS = A.example_keys(0, np.arange(6))

# Ops for which magnitude 0 is the identity (posterize-increasing keeps 4 bits at 0, as in timm;
# AutoContrast, Equalize and Invert have no magnitude).
IDENTITY_AT_ZERO = ['Rotate', 'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing',
                    'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX',
                    'ShearY', 'TranslateXRel', 'TranslateYRel']


def _pil(fn, batch):
  return np.stack([np.asarray(fn(Image.fromarray(a))) for a in batch])


# --- random numbers -------------------------------------------------------------------------------

def test_keys_and_uniforms_are_pure_functions_of_seed_and_position():
  k1 = A.example_keys(3, np.arange(1000))
  assert np.array_equal(k1, A.example_keys(3, np.arange(1000)))
  assert len(np.unique(k1)) == 1000
  assert not np.array_equal(k1, A.example_keys(4, np.arange(1000)))
  # A key depends on the position only, not on which other positions are in the batch.
  assert np.array_equal(A.example_keys(3, [10, 500]), k1[[10, 500]])
  u = A.uniform(k1, A.STREAM_FLIP, 8)
  assert u.shape == (1000, 8) and u.min() >= 0 and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - np.sqrt(1 / 12)) < 0.01
  assert not np.array_equal(u, A.uniform(k1, A.STREAM_CROP, 8))   # streams are independent
  z = A.normal(k1, A.STREAM_ERASE_NOISE, 50)
  assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def test_permutation():
  p = A.permutation(7, 0, 1000)
  assert np.array_equal(np.sort(p), np.arange(1000))
  assert np.array_equal(p, A.permutation(7, 0, 1000))
  assert not np.array_equal(p, A.permutation(7, 1, 1000))
  assert not np.array_equal(p, A.permutation(8, 0, 1000))


# --- the ops --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', A.RANDAUGMENT_OP_NAMES)
@pytest.mark.parametrize('images', [RGB, GRAY], ids=['rgb', 'gray'])
def test_op_shapes_dtype_and_determinism(name, images):
  out = A.apply_op(name, images, 9.0, negate=False, fill=100)
  assert out.shape == images.shape and out.dtype == np.uint8
  assert np.array_equal(out, A.apply_op(name, images, 9.0, negate=False, fill=100))
  assert not np.array_equal(out, images) or name == 'ColorIncreasing' and images.shape[-1] == 1
  # Per-image magnitudes: image i of a batch is transformed as if alone.
  mags = np.linspace(0, 10, len(images))
  both = A.apply_op(name, images, mags, negate=True, fill=100)
  alone = A.apply_op(name, images[2:3], mags[2:3], negate=True, fill=100)
  assert np.array_equal(both[2:3], alone)


@pytest.mark.parametrize('name', IDENTITY_AT_ZERO)
@pytest.mark.parametrize('images', [RGB, GRAY], ids=['rgb', 'gray'])
def test_magnitude_zero_is_identity(name, images):
  assert np.array_equal(A.apply_op(name, images, 0.0, fill=100), images)
  assert np.array_equal(A.apply_op(name, images, 0.0, negate=True, fill=100), images)


def test_posterize_increasing_keeps_four_bits_at_zero_and_none_at_ten():
  assert np.array_equal(A.apply_op('PosterizeIncreasing', RGB, 0.0), RGB & 0xF0)
  assert not A.apply_op('PosterizeIncreasing', RGB, 10.0).any()


def test_value_ops_against_pil():
  """Pixel ops agree with PIL's ImageOps / ImageEnhance (which timm's RandAugment uses)."""
  x = RGB.copy()
  x[1] = x[1] // 4 + 60  # a narrow range, so auto-contrast and equalize do something
  assert np.array_equal(A.equalize(x), _pil(ImageOps.equalize, x))
  assert np.array_equal(A.invert(x), _pil(ImageOps.invert, x))
  assert np.array_equal(A.posterize(x, 3), _pil(lambda im: ImageOps.posterize(im, 3), x))
  assert np.array_equal(A.solarize(x, 90), _pil(lambda im: ImageOps.solarize(im, 90), x))
  assert np.abs(A.auto_contrast(x).astype(int) - _pil(ImageOps.autocontrast, x)).max() <= 1
  for factor in (0.3, 1.7):
    for ours, theirs in ((A.color, ImageEnhance.Color), (A.contrast, ImageEnhance.Contrast),
                         (A.brightness, ImageEnhance.Brightness),
                         (A.sharpness, ImageEnhance.Sharpness)):
      expected = _pil(lambda im: theirs(im).enhance(factor), x)
      assert np.array_equal(ours(x, factor), expected), (ours.__name__, factor)


def test_geometric_ops_against_pil():
  x = RGB
  assert np.array_equal(A.translate_x(x, 3, 0),
                        _pil(lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 3, 0, 1, 0),
                                                     Image.BILINEAR), x))
  sq = x[:, :20, :20]
  assert np.array_equal(A.rotate(sq, 90, 0), _pil(lambda im: im.rotate(90, Image.BILINEAR), sq))
  assert np.array_equal(A.rotate(sq, 90, 0), np.rot90(sq, 1, axes=(1, 2)))
  # The warps are PIL's own C code, with the matrices timm's ops build (Image.rotate's rounded
  # cos and sin included): equal, not merely close.
  for ours, theirs in ((A.rotate(x, 20, 0), _pil(lambda im: im.rotate(20, Image.BILINEAR), x)),
                       (A.rotate(x, -13.7, 0),
                        _pil(lambda im: im.rotate(-13.7, Image.BILINEAR), x)),
                       (A.shear_x(x, 0.2, 0), _pil(lambda im: im.transform(
                           im.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), Image.BILINEAR), x))):
    assert np.array_equal(ours, theirs)
  gray = GRAY[..., 0]
  assert np.array_equal(A.rotate(GRAY, 20, 7)[..., 0], np.stack(
      [np.asarray(Image.fromarray(a).rotate(20, Image.BILINEAR, fillcolor=7)) for a in gray]))


def test_translate_relative_to_size_and_fill():
  # TranslateXRel at magnitude 10 shifts by 0.45 * 28 = 12.6 pixels: columns whose source lies past
  # the right edge (x + 0.5 + 12.6 >= 28, i.e. x >= 15) take the fill value.
  out = A.apply_op('TranslateXRel', np.full((1, 28, 28, 1), 200, np.uint8), 10.0, fill=7)
  assert (out[0, :, 15:] == 7).all() and (out[0, :, :15] == 200).all()
  # Negated on a 32-pixel RGB image: -14.4 pixels vertically, rows y + 0.5 - 14.4 < 0 filled.
  out = A.apply_op('TranslateYRel', np.full((1, 32, 32, 3), 200, np.uint8), 10.0, negate=True,
                   fill=(1, 2, 3))
  assert (out[0, :14] == [1, 2, 3]).all() and (out[0, 14:] == 200).all()


def test_color_is_identity_on_grayscale_and_contrast_uses_mean():
  assert np.array_equal(A.color(GRAY, 1.9), GRAY)
  flat = A.contrast(GRAY, 0.0)
  for i in range(len(GRAY)):
    assert (flat[i] == np.floor(GRAY[i].mean() + 0.5)).all()


def test_auto_contrast_and_equalize_ranges():
  x = (RNG.integers(0, 100, (3, 64, 64, 1)) + 50).astype(np.uint8)
  ac = A.auto_contrast(x)
  assert ac.min() == 0 and ac.max() == 255
  const = np.full((1, 8, 8, 3), 77, np.uint8)
  assert np.array_equal(A.auto_contrast(const), const)
  assert np.array_equal(A.equalize(const), const)
  eq = A.equalize(x)
  assert eq.max() > x.max() and eq.min() <= x.min()


# --- resizing and crops ---------------------------------------------------------------------------

def test_resize_matches_pil_bicubic():
  x = RGB
  box = (2.5, 3.0, 13.0, 17.0)  # top, left, height, width
  ours = A.resize_boxes(x, np.broadcast_to(box, (len(x), 4)), 16)
  theirs = _pil(lambda im: im.resize((16, 16), Image.BICUBIC, box=(3.0, 2.5, 20.0, 15.5)), x)
  assert np.array_equal(ours, theirs)
  up = A.resize(GRAY, 32)
  assert up.shape == (6, 32, 32, 1)
  theirs = np.stack([np.asarray(Image.fromarray(a[..., 0]).resize((32, 32), Image.BICUBIC))
                     for a in GRAY])[..., None]
  assert np.array_equal(up, theirs)   # PIL's own resize since the pipeline went to PIL
  assert A.resize(GRAY, 28) is GRAY


def test_pil_ops_on_other_channel_counts():
  """PIL has no 2-channel uint8 mode: such images are resized and warped one channel at a time."""
  two = RGB[..., :2]
  boxes = np.broadcast_to((2.5, 3.0, 13.0, 17.0), (len(two), 4))
  np.testing.assert_array_equal(A.resize_boxes(two, boxes, 16)[..., 1:],
                                A.resize_boxes(two[..., 1:], boxes, 16))
  warped = A.rotate(two, 20, (5, 9))
  np.testing.assert_array_equal(warped[..., :1], A.rotate(two[..., :1], 20, 5))
  np.testing.assert_array_equal(warped[..., 1:], A.rotate(two[..., 1:], 20, 9))
  assert A.rotate(two[:0], 20, 0).shape == (0, 20, 24, 2)


def test_random_resized_crop_boxes():
  keys = A.example_keys(1, np.arange(4000))
  boxes = A.random_resized_crop_boxes(keys, 100, 150)
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all()
  assert (left + w <= 150).all() and (h >= 1).all() and (w >= 1).all()
  area = h * w / (100 * 150)
  assert area.min() >= 0.07 and area.max() <= 1.0
  ratio = w / h
  assert ratio.min() > 0.7 and ratio.max() < 1.45
  assert np.array_equal(boxes, A.random_resized_crop_boxes(keys, 100, 150))
  # Very elongated images often fall back to the clamped centre crop.
  thin = A.random_resized_crop_boxes(keys[:50], 10, 1000)
  assert (thin[:, 0] + thin[:, 2] <= 10).all() and (thin[:, 1] + thin[:, 3] <= 1000).all()


def test_random_crop_pad():
  x = (np.arange(8 * 8, dtype=np.uint8).reshape(1, 8, 8, 1) + 1).repeat(300, 0)
  keys = A.example_keys(0, np.arange(300))
  out = A.random_crop_pad(x, keys, 2)
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x[0, :, :, 0], 2)
  offsets = set()
  for img in out[..., 0]:
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(img, padded[dy:dy + 8, dx:dx + 8])]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) == 25  # every offset in [0, 2 * pad] x [0, 2 * pad] occurs
  assert np.array_equal(out, A.random_crop_pad(x, keys, 2))
  assert A.random_crop_pad(x, keys, 0) is x


def test_hflip_is_keyed():
  keys = A.example_keys(0, np.arange(1000))
  flip = A.flip_mask(keys)
  assert 400 < flip.sum() < 600
  x = np.repeat(RGB[:1], 1000, 0)
  out = A.random_hflip(x, keys)
  assert np.array_equal(out[flip], x[flip][:, :, ::-1]) and np.array_equal(out[~flip], x[~flip])


# --- RandAugment ----------------------------------------------------------------------------------

def test_randaugment_params_distribution():
  keys = A.example_keys(0, np.arange(20000))
  op, applied, mag, negate = A.randaugment_params(keys, 2, 9.0, 0.5, 0.5)
  assert op.shape == applied.shape == mag.shape == negate.shape == (20000, 2)
  counts = np.bincount(op.ravel(), minlength=len(A.RANDAUGMENT_OP_NAMES))
  assert counts.min() > 0.8 * counts.mean()
  assert abs(applied.mean() - 0.5) < 0.02 and abs(negate.mean() - 0.5) < 0.02
  assert mag.min() >= 0 and mag.max() <= 10
  assert abs(mag.mean() - 9.0) < 0.02 and abs(mag.std() - 0.5) < 0.03
  _, _, mag0, _ = A.randaugment_params(keys, 2, 9.0, 0.0, 0.5)
  assert (mag0 == 9.0).all()


@pytest.mark.parametrize('images', [RGB, GRAY], ids=['rgb', 'gray'])
def test_rand_augment_is_deterministic_and_per_example(images):
  keys = A.example_keys(5, np.arange(100, 100 + len(images)))
  out = A.rand_augment(images, keys, 2, 9, 0.5, 0.5, fill=(120,) * images.shape[-1])
  assert out.dtype == np.uint8 and out.shape == images.shape
  assert np.array_equal(out, A.rand_augment(images, keys, 2, 9, 0.5, 0.5,
                                            fill=(120,) * images.shape[-1]))
  sub = A.rand_augment(images[[4, 1]], keys[[4, 1]], 2, 9, 0.5, 0.5,
                       fill=(120,) * images.shape[-1])
  assert np.array_equal(sub, out[[4, 1]])
  other = A.rand_augment(images, A.example_keys(6, np.arange(len(images))), 2, 9, 0.5, 0.5,
                         fill=(120,) * images.shape[-1])
  assert not np.array_equal(other, out)
  assert A.rand_augment(images, keys, 0) is images


def test_rand_augment_changes_most_images():
  x = np.repeat(RGB[:1], 200, 0)
  keys = A.example_keys(0, np.arange(200))
  out = A.rand_augment(x, keys, 2, 9, 0.5, 0.5, fill=0)
  changed = (out != x).any(axis=(1, 2, 3)).mean()
  assert 0.6 < changed < 0.9  # 1 - 0.5**2 = 0.75 of images get at least one op


# --- Random Erasing -------------------------------------------------------------------------------

def test_erasing_params():
  """The boxes and noise keys the device erases with (`pipeline.model_input`; tested there too)."""
  keys = A.example_keys(0, np.arange(3000))
  p = A.erasing_params(keys, 32, 32, prob=1.0)
  box, key = p['erase_box'], p['erase_key']
  assert box.dtype == np.int32 and box.shape == (3000, 4)
  assert key.dtype == np.uint32 and key.shape == (3000, 2)
  top, left, h, w = box.T
  assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 32).all() and (left + w <= 32).all()
  assert 0.015 <= (h * w / 1024).min() and (h * w / 1024).max() <= 0.35   # (0.02, 1/3), rounded
  assert len(np.unique(key, axis=0)) == 3000
  again = A.erasing_params(keys, 32, 32, prob=1.0)
  assert all(np.array_equal(p[k], again[k]) for k in p)
  some = A.erasing_params(keys, 32, 32, prob=0.25)['erase_box']
  erased = some[:, 2] > 0
  assert 0.2 < erased.mean() < 0.3 and (some[~erased] == 0).all()
  np.testing.assert_array_equal(some[erased], box[erased])   # the same draw, kept or not


# --- configuration --------------------------------------------------------------------------------

def test_config_presets():
  assert A.AugmentConfig() == A.AugmentConfig.none()
  small, large = A.AugmentConfig.standard(False), A.AugmentConfig.standard(True)
  assert small.random_crop_pad == 4 and small.hflip and not small.random_resized_crop
  assert large.random_resized_crop and large.hflip and large.random_crop_pad == 0
  paper = A.AugmentConfig.paper(True)
  assert (paper.randaugment_n, paper.randaugment_m, paper.randaugment_mstd) == (2, 9.0, 0.5)
  assert paper.random_erasing_prob == 0.25 and paper.random_resized_crop
  assert A.AugmentConfig.preset('paper', False) == A.AugmentConfig.paper(False)
  with pytest.raises(ValueError):
    A.AugmentConfig(random_resized_crop=True, random_crop_pad=4)
  with pytest.raises(ValueError):
    A.AugmentConfig.preset('bogus', False)
  assert dataclasses.replace(paper, hflip=False) != paper
