"""The training augmentations' pixel work as JAX ops, for data sets held on the device (issue 28).

Design:
* **The host draws, the device paints.** Every random decision of `augment.py` is a pure function
  of the per-example keys (`augment.example_keys`), computed by its vectorised numpy functions on
  tiny arrays: crop offsets (`crop_pad_offsets`), random-resized-crop boxes
  (`random_resized_crop_boxes`), flips (`flip_mask`), RandAugment's op, applied flag, magnitude and
  sign per image and layer (`randaugment_params`), the Random Erasing boxes and noise keys
  (`erasing_params`). `host_params` computes exactly those with those functions and turns the
  RandAugment magnitudes into the arguments the ops use (integer levels, enhance factors, the 2x3
  sampling matrices of `augment.GEOMETRIC_MATRICES`) in float64 numpy, as the host path does; the
  device gets a few numbers per image. `train_batch` does the pixel work in JAX: pure, batched,
  static shapes, jit-able with the `DeviceTransform` static, in the host path's order
  (`pipeline._Transform.train_arrays` / `finish`): gather, crop (pad-crop, or random-resized crop
  and resize), RGB -> luma where the model wants one channel, flip, RandAugment. Erasing already
  runs on the device (`pipeline.model_input`); its parameters pass through.
* **The same arithmetic as the host.** Crops, flips and the value ops are exact. The value ops that
  map each pixel value through a function of the image's statistics (invert, auto-contrast,
  equalize, posterize, solarize, solarize-add, contrast, brightness) are computed as one 256-entry
  lookup table per image and channel, with augment.py's float32 / integer formulas. Colour and
  sharpness are blends per pixel, in float32 as in augment.py. The geometric ops (rotate, shear,
  translate) go through one bilinear resampler that reimplements PIL's affine BILINEAR filter
  (sample at M @ (col + 0.5, row + 0.5, 1), edge clamping, truncation to uint8, the fill outside),
  in float32 where PIL computes in double. The random-resized crop reimplements PIL's antialiased
  bicubic `Image.resize(box=)`: a horizontal then a vertical pass, each with PIL's filter (a = -0.5,
  support scaled by the shrink factor), normalised weights in 22-bit fixed point and an exact
  integer sum rounded and clipped to uint8; the filter's arguments are formed so that only one
  float32 rounding enters. Run in float64 both resamplers equal PIL; in float32 a sample on a
  rounding boundary comes out one grey level off (about 1e-4 of the values at 16-32px, measured in
  tests/test_device_augment.py, which states the tolerances). Measured on CPU only: XLA:GPU may
  contract a * b + c into one fused multiply-add, which could move a blend by one level in rare
  values there.
* **RandAugment by selection.** Per layer every image computes its lookup table (one of the value
  ops' tables, chosen by its op), colour, sharpness and the affine warp (identity matrix for a
  value op), and keeps the one its op names; images whose op is not applied keep their pixels. An
  op of `augment.RANDAUGMENT_OP_NAMES` that has no device version makes `check_supported` refuse
  the recipe with one line naming it.
* **Uploaded images.** Small-image recipes crop the split resized once to the output size
  (`pipeline._Transform.presize`, as `pipeline.TrainBatches.arrays` gives them); the
  random-resized crop resamples the stored images. Only in-memory data sets (all images one size)
  can live on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import augment as aug
from experiments.data.augment import AugmentConfig

# --- configuration --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceTransform:
  """What the device needs besides the images and the per-example parameters (hashable: a static
  argument of jitted functions).

  image_size: output side S. augment: the recipe. fill: RandAugment's warp fill per wire channel
  (the data set's mean colour, as `pipeline._Transform.fill`). luma: stored RGB images for a
  1-channel model, converted after the crop as `pipeline._Transform.working` does.
  """
  image_size: int
  augment: AugmentConfig
  fill: tuple[int, ...]
  luma: bool = False

  @classmethod
  def from_pipeline(cls, transform) -> DeviceTransform:
    """From a `pipeline._Transform` (the host path's own settings)."""
    luma = transform.channels == 1 and transform.stored_channels == 3
    return cls(transform.image_size, transform.augment, transform.fill, luma)


def for_dataset(name: str, *, data_dir=None, image_size: int | None = None,
                channels: int | None = None, augment: AugmentConfig | None = None
                ) -> DeviceTransform:
  """The DeviceTransform of `pipeline.train_batches` with the same arguments; ValueError where the
  recipe or the data set cannot run on the device."""
  from experiments.data import datasets, pipeline  # pylint: disable=import-outside-toplevel
  info = datasets.info(name, data_dir)
  if info.large:
    raise ValueError(f'{name}: encoded images (a large data set or an image folder) cannot be held '
                     'on the device')
  config = DeviceTransform.from_pipeline(
      pipeline._make_transform(info, image_size, channels, None, augment))  # pylint: disable=protected-access
  check_supported(config.augment)
  return config


# RandAugment ops by how the device computes them. Value ops: a lookup table per image and channel.
# Image ops: a blend per pixel. Geometric ops: `augment.GEOMETRIC_MATRICES` (the affine resampler).
_TABLE_OPS = ('AutoContrast', 'Equalize', 'Invert', 'PosterizeIncreasing', 'SolarizeIncreasing',
              'SolarizeAdd', 'ContrastIncreasing', 'BrightnessIncreasing')
_IMAGE_OPS = ('ColorIncreasing', 'SharpnessIncreasing')


def unsupported(name: str) -> ValueError:
  """The one-line error of a RandAugment op the device cannot run."""
  return ValueError(f'RandAugment op {name} has no device implementation: '
                    'augment on the host (data placement host)')


def check_supported(augment: AugmentConfig) -> None:
  """Raises `unsupported(op)` when `augment` needs an op this module cannot run."""
  if augment.randaugment_n > 0:
    for name in aug.RANDAUGMENT_OP_NAMES:
      if name not in _TABLE_OPS + _IMAGE_OPS and name not in aug.GEOMETRIC_MATRICES:
        raise unsupported(name)


# --- host: the per-example parameters -------------------------------------------------------------

# The integer argument of the ops that take one, from the magnitude: augment.RANDAUGMENT_OPS' maps.
_LEVELS = {
    'PosterizeIncreasing': lambda m: 4 - (m / aug.MAX_LEVEL * 4).astype(int),
    'SolarizeIncreasing': lambda m: 256 - (m / aug.MAX_LEVEL * 256).astype(int),
    'SolarizeAdd': lambda m: (m / aug.MAX_LEVEL * 110).astype(int),
}
_FACTOR_OPS = ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
               'SharpnessIncreasing')


def randaugment_arguments(op: np.ndarray, magnitude: np.ndarray, negate: np.ndarray,
                          size: int) -> dict[str, np.ndarray]:
  """The ops' arguments of `augment.randaugment_params`' draws (arrays of any shape P) on S x S
  images: 'ra_level' int32 P (posterize bits, solarize threshold, solarize-add amount; else 0),
  'ra_factor' float32 P (enhance factor; else 1), 'ra_matrix' float32 P + (2, 3) (sampling matrix of
  a geometric op; else the identity). Computed in float64 as the host path does."""
  shape = op.shape
  op, m, s = op.ravel(), magnitude.ravel().astype(np.float64), negate.ravel()
  level = np.zeros(op.shape, np.int64)
  factor = np.ones(op.shape, np.float64)
  matrix = np.broadcast_to(np.eye(2, 3), op.shape + (2, 3)).copy()
  for k, name in enumerate(aug.RANDAUGMENT_OP_NAMES):
    sel = op == k
    if not sel.any():
      continue
    if name in _LEVELS:
      level[sel] = _LEVELS[name](m[sel])
    if name in _FACTOR_OPS:
      factor[sel] = aug._enhance_factor(m[sel], s[sel])  # pylint: disable=protected-access
    if name in aug.GEOMETRIC_MATRICES:
      matrix[sel] = aug.GEOMETRIC_MATRICES[name](int(sel.sum()), size, size, m[sel], s[sel])
  return {'ra_level': level.astype(np.int32).reshape(shape),
          'ra_factor': factor.astype(np.float32).reshape(shape),
          'ra_matrix': matrix.astype(np.float32).reshape(shape + (2, 3))}


def host_params(keys: np.ndarray, config: DeviceTransform, height: int,
                width: int) -> dict[str, np.ndarray]:
  """The per-example parameters `train_batch` needs for the examples with these keys, from
  augment.py's own draws (numpy; a few numbers per image). height, width: of the uploaded images.

  'crop_offset' int32 (B, 2) (pad-crop) or 'crop_box' float32 (B, 4) (random-resized crop: top,
  left, height, width); 'flip' bool (B,); RandAugment: 'ra_op' int32 (B, n), 'ra_applied' bool
  (B, n) and `randaugment_arguments`; Random Erasing: 'erase_box', 'erase_key'
  (`augment.erasing_params`, for `pipeline.model_input`). Entries of switched-off ops are absent.
  """
  a, s = config.augment, config.image_size
  out = {}
  if a.random_resized_crop:
    boxes = aug.random_resized_crop_boxes(keys, height, width, a.rrc_scale, a.rrc_ratio)
    out['crop_box'] = boxes.astype(np.float32)
  elif a.random_crop_pad > 0:
    out['crop_offset'] = aug.crop_pad_offsets(keys, a.random_crop_pad).astype(np.int32)
  if a.hflip:
    out['flip'] = aug.flip_mask(keys)
  if a.randaugment_n > 0:
    op, applied, mag, negate = aug.randaugment_params(keys, a.randaugment_n, a.randaugment_m,
                                                      a.randaugment_mstd, a.randaugment_prob)
    out.update({'ra_op': op.astype(np.int32), 'ra_applied': applied},
               **randaugment_arguments(op, mag, negate, s))
  if a.random_erasing_prob > 0:
    out.update(aug.erasing_params(keys, s, s, a.random_erasing_prob, a.erasing_area,
                                  a.erasing_min_aspect))
  return out


# --- device: crops, flips, resizing ---------------------------------------------------------------

def gather(images, indices):
  """images[indices] along the batch axis."""
  return jnp.take(jnp.asarray(images), jnp.asarray(indices), axis=0)


def pad_crop(x, offsets, pad: int, fill: int = 0):
  """`augment.random_crop_pad` with its offsets (B, 2) (row, column) in the padded image."""
  if pad <= 0:
    return x
  _, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, jnp.asarray(offsets, jnp.int32))


def hflip(x, mask):
  """`augment.random_hflip`: image i mirrored left-right where mask[i]."""
  return jnp.where(jnp.asarray(mask)[:, None, None, None], x[:, :, ::-1], x)


def to_grayscale(x):
  """`augment.to_grayscale`: (B, H, W, 3) uint8 -> (B, H, W, 1) uint8 luma."""
  return _luma(x).astype(jnp.uint8)


def _luma(x):
  """(..., 1) int32 luma in PIL's fixed point (`augment._luma`); the image itself if 1 channel."""
  x = x.astype(jnp.int32)
  if x.shape[-1] == 1:
    return x
  return (x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 0x8000) >> 16


_PRECISION_BITS = 22   # PIL's fixed-point weights for 8-bit images (Resample.c)


def _bicubic(x):
  """PIL's bicubic filter (a = -0.5), support 2."""
  a = -0.5
  x = jnp.abs(x)
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, inner, jnp.where(x < 2.0, outer, 0.0))


def _taps(in_size: int, out_size: int) -> int:
  """A static bound on the input pixels one output pixel reads: the support of a box as wide as
  the image, 2 * max(in / out, 1) each side."""
  support = 2.0 * max(in_size / out_size, 1.0)
  return int(math.ceil(2.0 * support)) + 2


def _resize_weights(start, length, in_size: int, out_size: int):
  """PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis of one box: (index (S, K)
  int32, weight (S, K) int32 in 22-bit fixed point). Output pixel j of a box [start, start +
  length) is centred on start + (j + 0.5) * length / S; input pixel i weighs
  bicubic((i + 0.5 - centre) / max(length / S, 1)), normalised over the pixels in the image."""
  s, k = out_size, _taps(in_size, out_size)
  j = jnp.arange(s, dtype=jnp.float32)[:, None]
  scale = length / s
  support = 2.0 * jnp.maximum(scale, 1.0)
  centre = start + (2.0 * j + 1.0) * length / (2.0 * s)
  first = jnp.maximum(jnp.floor(centre - support + 0.5), 0.0)
  pos = first + jnp.arange(k, dtype=jnp.float32)[None, :]
  # (pos + 0.5 - centre) / max(scale, 1) with one rounding: the numerator is an exact integer for
  # integer boxes.
  numerator = (2.0 * (pos - start) + 1.0) * s - (2.0 * j + 1.0) * length
  w = jnp.where(pos < in_size, _bicubic(numerator / (2.0 * jnp.maximum(length, s))), 0.0)
  total = w.sum(-1, keepdims=True)
  w = jnp.where(total != 0.0, w / jnp.where(total != 0.0, total, 1.0), w)
  w = w * float(1 << _PRECISION_BITS)
  fixed = jnp.where(w < 0, jnp.ceil(w - 0.5), jnp.floor(w + 0.5)).astype(jnp.int32)
  index = jnp.minimum(pos, in_size - 1).astype(jnp.int32)
  return index, fixed


def _resample(x, index, weight, axis: int):
  """One pass of PIL's 8-bit resampling along `axis` (0 rows, 1 columns) of x (H, W, C) int32:
  sum of x * weight over the taps, rounded, >> 22, clipped to [0, 255]."""
  taken = jnp.take(x, index, axis=axis)                  # axis becomes (S, K)
  w = weight[:, :, None, None] if axis == 0 else weight[None, :, :, None]
  acc = (taken * w).sum(axis + 1) + (1 << (_PRECISION_BITS - 1))
  return jnp.clip(acc >> _PRECISION_BITS, 0, 255)


def resized_crop(x, boxes, size: int):
  """`augment.resize_boxes` (PIL's antialiased bicubic resize of each image's box): x (B, H, W, C)
  uint8, boxes (B, 4) (top, left, height, width) -> (B, size, size, C) uint8."""
  _, h, w, _ = x.shape

  def one(img, box):
    box = box.astype(jnp.float32)
    col_index, col_weight = _resize_weights(box[1], box[3], w, size)
    row_index, row_weight = _resize_weights(box[0], box[2], h, size)
    out = _resample(img.astype(jnp.int32), col_index, col_weight, axis=1)   # horizontal first
    return _resample(out, row_index, row_weight, axis=0).astype(jnp.uint8)
  return jax.vmap(one)(x, jnp.asarray(boxes))


# --- device: RandAugment's ops, per image ---------------------------------------------------------
# Per image x (H, W, C) uint8 and scalar arguments; the batched functions further down vmap them.

def _truncate(v):
  return jnp.clip(jnp.floor(v), 0, 255).astype(jnp.int32)


def _blend(degenerate, image, factor):
  """`augment._blend`: PIL's Image.blend in float32, truncated (extrapolates for factor > 1)."""
  d = degenerate.astype(jnp.float32)
  return _truncate(d + factor * (image.astype(jnp.float32) - d))


def _statistics(x) -> dict[str, Any]:
  """What the value ops' tables depend on: per channel min, max and histogram (C, 256), and the
  mean luma rounded (as `augment.contrast`; the luma sum is exact in int32)."""
  xi = x.astype(jnp.int32)
  planes = xi.reshape(-1, xi.shape[-1]).T
  hist = jax.vmap(lambda p: jnp.bincount(p, length=256))(planes)
  mean = _luma(xi).sum().astype(jnp.float32) / planes.shape[1]
  return {'lo': planes.min(1), 'hi': planes.max(1), 'hist': hist,
          'mean': jnp.floor(mean + 0.5)}


def _values(c: int):
  return jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (c, 256))


def _table_auto_contrast(st, level, factor):
  v = _values(len(st['lo'])).astype(jnp.float32)
  lo, hi = st['lo'].astype(jnp.float32)[:, None], st['hi'].astype(jnp.float32)[:, None]
  span = hi - lo
  scale = jnp.where(span > 0, 255.0 / jnp.where(span > 0, span, 1.0), 1.0)
  lo = jnp.where(span > 0, lo, 0.0)
  return _truncate((v - lo) * scale)


def _table_equalize(st, level, factor):
  """PIL's ImageOps.equalize per channel, as `augment.equalize`."""
  hist = st['hist']
  v = _values(len(hist))
  total = hist.sum(1)
  last = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
  step = ((total - jnp.take_along_axis(hist, last[:, None], 1)[:, 0]) // 255)[:, None]
  cum = jnp.cumsum(hist, axis=1) - hist
  table = jnp.minimum((step // 2 + cum) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, table, v)


def _table_invert(st, level, factor):
  return 255 - _values(len(st['lo']))


def _table_posterize(st, level, factor):
  bits = jnp.clip(level, 0, 8)
  return _values(len(st['lo'])) & (jnp.left_shift(0xFF, 8 - bits) & 0xFF)


def _table_solarize(st, level, factor):
  v = _values(len(st['lo']))
  return jnp.where(v >= level, 255 - v, v)


def _table_solarize_add(st, level, factor, threshold: int = 128):
  v = _values(len(st['lo']))
  return jnp.where(v < threshold, jnp.minimum(v + level, 255), v)


def _table_contrast(st, level, factor):
  v = _values(len(st['lo']))
  return _blend(jnp.broadcast_to(st['mean'], v.shape), v, factor)


def _table_brightness(st, level, factor):
  return _truncate(_values(len(st['lo'])).astype(jnp.float32) * factor)


_TABLES = {
    'AutoContrast': _table_auto_contrast, 'Equalize': _table_equalize, 'Invert': _table_invert,
    'PosterizeIncreasing': _table_posterize, 'SolarizeIncreasing': _table_solarize,
    'SolarizeAdd': _table_solarize_add, 'ContrastIncreasing': _table_contrast,
    'BrightnessIncreasing': _table_brightness,
}
assert set(_TABLES) == set(_TABLE_OPS)


def _apply_table(x, table):
  """x (H, W, C) uint8 through table (C, 256): out[..., c] = table[c, x[..., c]]."""
  c = x.shape[-1]
  return table[jnp.arange(c), x.astype(jnp.int32)].astype(jnp.uint8)


def _color(x, factor):
  if x.shape[-1] == 1:
    return x
  return _blend(jnp.broadcast_to(_luma(x), x.shape), x, factor).astype(jnp.uint8)


def _sharpness(x, factor):
  """`augment.sharpness`: blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13; border
  kept)."""
  h, w, _ = x.shape
  if h < 3 or w < 3:
    return x
  f = x.astype(jnp.float32)
  acc = jnp.zeros_like(f[1:-1, 1:-1])
  for dy in range(3):
    for dx in range(3):
      acc = acc + f[dy:dy + h - 2, dx:dx + w - 2] * (5.0 if dy == dx == 1 else 1.0)
  smooth = f.at[1:-1, 1:-1].set(jnp.round(acc / 13.0))
  return _blend(smooth, x, factor).astype(jnp.uint8)


def _affine(x, matrix, fill):
  """PIL's `Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)` of one image (as
  `augment.affine`): output pixel (col, row) samples the input at
  matrix @ (col + 0.5, row + 0.5, 1); outside [0, W) x [0, H) it is `fill` (C,); inside, bilinear
  between the pixel centres with edge clamping, truncated to uint8."""
  h, w, _ = x.shape
  m = matrix.astype(jnp.float32)
  col = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
  row = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
  xin = m[0, 0] * col + m[0, 1] * row + m[0, 2]
  yin = m[1, 0] * col + m[1, 1] * row + m[1, 2]
  inside = (xin >= 0.0) & (xin < w) & (yin >= 0.0) & (yin < h)
  xs, ys = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(xs), jnp.floor(ys)
  dx, dy = (xs - x0)[..., None], (ys - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  c0, c1 = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  r0, r1 = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  f = x.astype(jnp.float32)
  top = f[r0, c0] + (f[r0, c1] - f[r0, c0]) * dx
  bottom = f[r1, c0] + (f[r1, c1] - f[r1, c0]) * dx
  v = top + (bottom - top) * dy
  return jnp.where(inside[..., None], v.astype(jnp.uint8), fill.astype(jnp.uint8))


def _fill(fill, c: int):
  """A scalar or per-channel fill as (C,) int32, rounded as `augment.affine` does."""
  values = np.broadcast_to(np.asarray(fill, np.float64), (c,))
  return jnp.asarray([int(round(float(v))) for v in values], jnp.int32)


# --- device: RandAugment's ops, batched (augment.py's signatures) ---------------------------------

def _per_image(n: int, value, dtype):
  return jnp.broadcast_to(jnp.asarray(value, dtype), (n,))


def _table_op(name: str):
  def op(x, level=0, factor=1.0):
    n = x.shape[0]
    table = lambda img, lv, fa: _apply_table(img, _TABLES[name](_statistics(img), lv, fa))
    return jax.vmap(table)(x, _per_image(n, level, jnp.int32), _per_image(n, factor, jnp.float32))
  op.__name__ = name
  return op


auto_contrast = lambda x: _table_op('AutoContrast')(x)
equalize = lambda x: _table_op('Equalize')(x)
invert = lambda x: _table_op('Invert')(x)
posterize = lambda x, bits: _table_op('PosterizeIncreasing')(x, level=bits)
solarize = lambda x, threshold: _table_op('SolarizeIncreasing')(x, level=threshold)
solarize_add = lambda x, add: _table_op('SolarizeAdd')(x, level=add)
contrast = lambda x, factor: _table_op('ContrastIncreasing')(x, factor=factor)
brightness = lambda x, factor: _table_op('BrightnessIncreasing')(x, factor=factor)


def color(x, factor):
  return jax.vmap(_color)(x, _per_image(x.shape[0], factor, jnp.float32))


def sharpness(x, factor):
  return jax.vmap(_sharpness)(x, _per_image(x.shape[0], factor, jnp.float32))


def affine(x, matrices, fill):
  """`augment.affine`: x (B, H, W, C) uint8 warped by matrices (B, 2, 3), filled with `fill`."""
  fill = _fill(fill, x.shape[-1])
  return jax.vmap(lambda img, m: _affine(img, m, fill))(x, jnp.asarray(matrices, jnp.float32))


# --- device: RandAugment --------------------------------------------------------------------------

_GEOMETRIC, _TABLE, _COLOR, _SHARPNESS = 0, 1, 2, 3


def _op_tables() -> tuple[np.ndarray, np.ndarray, list]:
  """Per op index of `augment.RANDAUGMENT_OP_NAMES`: its kind and its lookup-table slot (0: the
  identity table), and the table functions by slot."""
  kinds, slots, tables = [], [], [None]
  for name in aug.RANDAUGMENT_OP_NAMES:
    if name in aug.GEOMETRIC_MATRICES:
      kinds.append(_GEOMETRIC)
    elif name in _TABLES:
      kinds.append(_TABLE)
    elif name in _IMAGE_OPS:
      kinds.append(_COLOR if name == 'ColorIncreasing' else _SHARPNESS)
    else:
      raise unsupported(name)
    slots.append(len(tables) if name in _TABLES else 0)
    if name in _TABLES:
      tables.append(_TABLES[name])
  return np.array(kinds, np.int32), np.array(slots, np.int32), tables


def _randaugment_layer(img, op, applied, level, factor, matrix, fill):
  """One RandAugment layer on one image: the op `op` with its arguments, if `applied`."""
  kinds, slots, tables = _op_tables()
  st = _statistics(img)
  c = img.shape[-1]
  candidates = jnp.stack([_values(c)] + [fn(st, level, factor) for fn in tables[1:]])
  slot = jnp.where(applied, jnp.asarray(slots)[op], 0)
  out = _apply_table(img, candidates[slot])
  kind = jnp.where(applied, jnp.asarray(kinds)[op], _TABLE)
  out = jnp.where(kind == _GEOMETRIC, _affine(img, matrix, fill), out)
  out = jnp.where(kind == _COLOR, _color(img, factor), out)
  return jnp.where(kind == _SHARPNESS, _sharpness(img, factor), out)


def rand_augment(x, params: dict, fill):
  """`augment.rand_augment` given `host_params`' 'ra_*' entries: layer after layer, each image
  through the op it drew where applied."""
  fill = _fill(fill, x.shape[-1])
  layer = jax.vmap(lambda *a: _randaugment_layer(*a, fill))
  for k in range(params['ra_op'].shape[1]):
    x = layer(x, *(jnp.asarray(params[name])[:, k] for name in (
        'ra_op', 'ra_applied', 'ra_level', 'ra_factor', 'ra_matrix')))
  return x


# --- device: the training batch -------------------------------------------------------------------

def train_batch(images, indices, params: dict, config: DeviceTransform, labels=None) -> dict:
  """The host path's training batch (`pipeline.train_batches`' dict but 'label' unless `labels`
  is given) computed on the device: images (N, H, W, C) uint8 (`pipeline.TrainBatches.arrays`),
  indices (B,) of the batch's examples, params: `host_params` of their keys. jit with `config`
  static."""
  a, s = config.augment, config.image_size
  x = gather(images, indices)
  if a.random_resized_crop:
    x = resized_crop(x, params['crop_box'], s)
  else:
    if x.shape[1:3] != (s, s):
      raise ValueError(f'images of {x.shape[1]}x{x.shape[2]} pixels: upload them resized to '
                       f'{s}x{s} (pipeline.TrainBatches.arrays)')
    x = pad_crop(x, params['crop_offset'], a.random_crop_pad) if a.random_crop_pad > 0 else x
  if config.luma:
    x = to_grayscale(x)
  if a.hflip:
    x = hflip(x, params['flip'])
  if a.randaugment_n > 0:
    x = rand_augment(x, params, config.fill)
  out = {'image': x}
  out.update({k: jnp.asarray(params[k]) for k in ('erase_box', 'erase_key') if k in params})
  if labels is not None:
    out['label'] = gather(labels, indices)
  return out
