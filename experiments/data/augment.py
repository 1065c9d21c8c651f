"""Training-time image augmentations on batches of uint8 NHWC numpy arrays, with a stateless RNG.

Design:
* **Batched numpy, PIL for the warps.** Every op takes a batch `(B, H, W, C)` uint8 and per-image
  parameters `(B,)`, and runs as a handful of vectorised numpy calls over the batch, except the
  geometric RandAugment ops, which are PIL's C `Image.transform` per image (~10x faster than a numpy
  gather at 224px, and it releases the GIL). RandAugment groups the images of a batch
  by the op they drew and applies each op once per group. For 28x28 / 32x32 images this is 10-50x
  faster than a per-image Python loop (numpy call overhead dominates small images), and numpy
  releases the GIL on large arrays, so ImageNet-sized batches parallelise over threads.
* **Stateless RNG.** Every random number is a hash of (seed, global example position, stream,
  counter) (splitmix64's finaliser, see `example_keys` / `uniform`). An image's augmentation is
  therefore a pure function of where it sits in the global training stream, independent of the batch
  it lands in, of the host count, and of what was computed before: resuming at any step is exact and
  free. Each augmentation draws from its own stream, so switching one on does not change the others'
  draws.
* **Semantics follow the recipe of the ConvNeXt paper** (timm's `create_transform` as used by the
  official code): RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), 10 tries then a centre
  crop), horizontal flip, RandAugment `rand-m9-mstd0.5-inc1` (2 layers, each op applied with p 0.5,
  magnitude ~ N(9, 0.5) clipped to [0, 10], the 'increasing' op set), and, after normalisation,
  Random Erasing (p 0.25, mode 'pixel': per-pixel N(0, 1) noise, area (0.02, 1/3), aspect
  (0.3, 1/0.3), one box; the boxes and a noise key per image are drawn here, `erasing_params`, and
  the erasing happens on the device, `pipeline.model_input`). The pixel ops are our own numpy code,
  checked against PIL's ImageOps / ImageEnhance (which timm's ops call): equal, or within 1 grey
  level; the warps are PIL's Image.transform itself, with the matrices timm's ops build. Magnitudes
  map to arguments as in timm's increasing variant:
  rotate 30 deg, shear 0.3, translate 0.45 x image size, enhance factors 1 +- 0.9, posterize
  4 -> 0 bits kept (so posterize at magnitude 0 still keeps only 4 bits, as in timm), solarize
  threshold 256 -> 0, solarize-add 0 -> 110. Geometric RandAugment ops sample bilinearly (timm uses
  the configured interpolation, bicubic in the ConvNeXt code) and fill with the data set mean
  colour. Resizing is PIL's antialiased bicubic `Image.resize(box=)` itself.
* **Grayscale.** Ops work for any channel count: colour (saturation) is the identity on one channel,
  contrast uses the mean luma (the mean itself for one channel). The data pipeline runs these ops on
  the stored channels and replicates a grayscale image to 3 channels only after normalisation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

# --- stateless random numbers ---------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1

# One stream per random decision; never renumber them (that would change every augmentation).
STREAM_CROP = 1
STREAM_FLIP = 2
STREAM_RANDAUG = 3
STREAM_ERASE = 4
STREAM_ERASE_NOISE = 5
STREAM_PERMUTATION = 6


def _mix(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijection of uint64 with good avalanche."""
  z = (z ^ (z >> np.uint64(30))) * _M1
  z = (z ^ (z >> np.uint64(27))) * _M2
  return z ^ (z >> np.uint64(31))


def _u64(v) -> np.ndarray:
  if isinstance(v, (int, np.integer)):
    return np.array([int(v) & _MASK64], dtype=np.uint64)
  return np.asarray(v).astype(np.uint64)


def hash_combine(h, v) -> np.ndarray:
  """Mixes `v` into hash `h` (broadcasting uint64 arrays)."""
  h, v = _u64(h), _u64(v)
  with np.errstate(over='ignore'):
    return _mix(h ^ (_mix(v + _GOLDEN) + (h << np.uint64(6)) + (h >> np.uint64(2))))


def example_keys(seed: int, positions) -> np.ndarray:
  """One uint64 key per example from (seed, global position in the training stream)."""
  with np.errstate(over='ignore'):
    seed_h = _mix(_u64(seed) + _GOLDEN)
  return hash_combine(seed_h, np.asarray(positions, dtype=np.int64))


def random_bits(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
  """(B, n) uint64 hashes of (key, stream, 0..n-1)."""
  ks = hash_combine(np.asarray(keys, np.uint64), stream)
  return hash_combine(ks[:, None], np.arange(n, dtype=np.uint64)[None, :])


def uniform(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
  """(B, n) float64 uniform in [0, 1)."""
  return (random_bits(keys, stream, n) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal_from_uniform(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
  """Box-Muller: standard normals from two independent uniforms in [0, 1)."""
  return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def normal(keys: np.ndarray, stream: int, n: int) -> np.ndarray:
  """(B, n) float64 standard normal."""
  u = uniform(keys, stream, 2 * n)
  return normal_from_uniform(u[:, :n], u[:, n:])


def permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """A permutation of range(n) that is a pure function of (seed, epoch)."""
  key = hash_combine(hash_combine(example_keys(seed, [0]), STREAM_PERMUTATION), epoch)
  h = hash_combine(key, np.arange(n, dtype=np.uint64))
  return np.argsort(h, kind='stable').astype(np.int64)


# --- configuration --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation. The defaults switch everything off (resize / centre crop only).

  random_resized_crop: Inception-style crop (scale, ratio) resized to the output size.
  random_crop_pad: pad by this many output pixels (zeros) and crop back at a random offset; 0 = off.
  hflip: random horizontal flip (p 0.5).
  randaugment_n / _m / _mstd / _prob: RandAugment layers (0 = off), magnitude (0..10), magnitude
    noise std, and the probability that a drawn op is applied (timm: 0.5).
  random_erasing_prob: Random Erasing probability (mode 'pixel', after normalisation); 0 = off.
  """
  random_resized_crop: bool = False
  rrc_scale: tuple[float, float] = (0.08, 1.0)
  rrc_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  random_crop_pad: int = 0
  hflip: bool = False
  randaugment_n: int = 0
  randaugment_m: float = 9.0
  randaugment_mstd: float = 0.5
  randaugment_prob: float = 0.5
  random_erasing_prob: float = 0.0
  erasing_area: tuple[float, float] = (0.02, 1.0 / 3.0)
  erasing_min_aspect: float = 0.3

  def __post_init__(self):
    if self.random_resized_crop and self.random_crop_pad:
      raise ValueError('choose one of random_resized_crop and random_crop_pad')
    if self.randaugment_n < 0 or not 0 <= self.randaugment_m <= MAX_LEVEL:
      raise ValueError(f'bad RandAugment setting n={self.randaugment_n} m={self.randaugment_m}')
    if not 0.0 <= self.random_erasing_prob <= 1.0:
      raise ValueError(f'random_erasing_prob {self.random_erasing_prob} not in [0, 1]')

  @classmethod
  def none(cls) -> AugmentConfig:
    return cls()

  @classmethod
  def standard(cls, large: bool) -> AugmentConfig:
    """The original ResNet recipe: RandomResizedCrop + flip (large images), or pad-4 crop + flip."""
    if large:
      return cls(random_resized_crop=True, hflip=True)
    return cls(random_crop_pad=4, hflip=True)

  @classmethod
  def paper(cls, large: bool) -> AugmentConfig:
    """Table 5 of the ConvNeXt paper: standard crop + flip, RandAugment (9, 0.5), Random Erasing
    0.25.

    (Mixup, CutMix and label smoothing belong to the trainer.)
    """
    return dataclasses.replace(cls.standard(large), randaugment_n=2, randaugment_m=9.0,
                               randaugment_mstd=0.5, randaugment_prob=0.5, random_erasing_prob=0.25)

  @classmethod
  def preset(cls, name: str, large: bool) -> AugmentConfig:
    """'none' | 'standard' | 'paper'."""
    presets = {'none': lambda: cls.none(), 'standard': lambda: cls.standard(large),
               'paper': lambda: cls.paper(large)}
    if name not in presets:
      raise ValueError(f'unknown augmentation preset {name!r}; choose from {sorted(presets)}')
    return presets[name]()


# --- resizing and crops ---------------------------------------------------------------------------

_PIL_MODES = {1: 'L', 3: 'RGB'}


def _per_pil_image(x: np.ndarray, fn) -> np.ndarray:
  """fn(PIL image, i) -> PIL image, applied to every image of x (B, H, W, C) uint8: as 'L' or 'RGB'
  images, or one 'L' image per channel for other channel counts. Returns (B, H', W', C) uint8."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  b, c = len(x), x.shape[-1]
  planes = [x] if c in _PIL_MODES else [x[..., k:k + 1] for k in range(c)]
  outs = []
  for plane in planes:
    k = plane.shape[-1]
    images = []
    for i in range(b):
      image = np.ascontiguousarray(plane[i])
      images.append(np.asarray(fn(Image.fromarray(image[..., 0] if k == 1 else image,
                                                  _PIL_MODES[k]), i)))
    outs.append(np.stack(images).reshape(b, *images[0].shape[:2], k) if b else
                np.empty((0,) + plane.shape[1:], np.uint8))
  return outs[0] if len(outs) == 1 else np.concatenate(outs, -1)


def resize_boxes(images: np.ndarray, boxes: np.ndarray, out_size: int,
                 kernel: str = 'bicubic') -> np.ndarray:
  """Crops each image to its box and resizes it to (out_size, out_size): PIL's
  `Image.resize(size, resample, box=...)` per image (antialiased when shrinking; C code that
  releases the GIL).

  images: (B, H, W, C) uint8; boxes: (B, 4) float (top, left, height, width) in source pixels.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  b, _, _, c = images.shape
  s = out_size
  boxes = np.asarray(boxes, np.float64).reshape(b, 4).tolist()
  resample = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}[kernel]
  if not b:
    return np.empty((0, s, s, c), np.uint8)

  def fn(im, i):
    top, left, height, width = boxes[i]
    return im.resize((s, s), resample, box=(left, top, left + width, top + height))
  return _per_pil_image(images, fn)


def resize(images: np.ndarray, out_size: int, crop_pct: float = 1.0,
           kernel: str = 'bicubic') -> np.ndarray:
  """Eval transform for in-memory images: centre crop of `crop_pct` of the shorter side, resized."""
  b, h, w, _ = images.shape
  if crop_pct == 1.0 and h == w == out_size:
    return images
  side = min(h, w) * crop_pct
  box = np.array([(h - side) / 2, (w - side) / 2, side, side])
  return resize_boxes(images, np.broadcast_to(box, (b, 4)), out_size, kernel)


def center_box(height, width, out_size: int, crop_pct: float) -> np.ndarray:
  """timm's eval crop as a source box: resize the shorter side to floor(out_size / crop_pct), then
  take the centre out_size x out_size. Returns (B, 4) (top, left, height, width)."""
  height = np.asarray(height, np.float64)
  width = np.asarray(width, np.float64)
  scaled = math.floor(out_size / crop_pct)
  side = out_size * np.minimum(height, width) / scaled
  return np.stack([(height - side) / 2, (width - side) / 2, side, side], -1).reshape(-1, 4)


def random_resized_crop_boxes(keys: np.ndarray, height, width,
                              scale: Sequence[float] = (0.08, 1.0),
                              ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
                              attempts: int = 10) -> np.ndarray:
  """torchvision's RandomResizedCrop.get_params, vectorised: (B, 4) integer (top, left, h, w).

  Up to `attempts` random (area, log-aspect) draws; the first that fits wins; otherwise a centre
  crop with the aspect ratio clamped to `ratio`.
  """
  b = len(keys)
  height = np.broadcast_to(np.asarray(height, np.float64), (b,))[:, None]
  width = np.broadcast_to(np.asarray(width, np.float64), (b,))[:, None]
  u = uniform(keys, STREAM_CROP, 4 * attempts).reshape(b, attempts, 4)
  area = height * width
  target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
  log_r = np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[..., 1]
  aspect = np.exp(log_r)
  cw = np.round(np.sqrt(target * aspect))
  ch = np.round(np.sqrt(target / aspect))
  ok = (cw > 0) & (ch > 0) & (cw <= width) & (ch <= height)
  top = np.floor(u[..., 2] * (height - ch + 1))
  left = np.floor(u[..., 3] * (width - cw + 1))
  first = np.argmax(ok, axis=1)
  rows = np.arange(b)
  found = ok[rows, first]
  h0, w0 = height[:, 0], width[:, 0]
  # Fallback: centre crop with the aspect ratio clamped into `ratio`.
  in_ratio = w0 / h0
  fw = np.where(in_ratio < ratio[0], w0, np.where(in_ratio > ratio[1], np.round(h0 * ratio[1]), w0))
  fh = np.where(in_ratio < ratio[0], np.round(w0 / ratio[0]),
                np.where(in_ratio > ratio[1], h0, h0))
  ft = np.floor((h0 - fh) / 2)
  fl = np.floor((w0 - fw) / 2)
  return np.stack([
      np.where(found, top[rows, first], ft), np.where(found, left[rows, first], fl),
      np.where(found, ch[rows, first], fh), np.where(found, cw[rows, first], fw)], -1)


def crop_pad_offsets(keys: np.ndarray, pad: int) -> np.ndarray:
  """`random_crop_pad`'s draw: (B, 2) intp (row, column) offsets of each crop in the image padded
  by `pad`, uniform in [0, 2 * pad]."""
  u = uniform(keys, STREAM_CROP, 2)
  oy = np.floor(u[:, 0] * (2 * pad + 1)).astype(np.intp)
  ox = np.floor(u[:, 1] * (2 * pad + 1)).astype(np.intp)
  return np.stack([oy, ox], -1)


def random_crop_pad(images: np.ndarray, keys: np.ndarray, pad: int, fill: int = 0) -> np.ndarray:
  """Pads each image by `pad` pixels (value `fill`) and crops back to its size at a random
  offset (`crop_pad_offsets`)."""
  if pad <= 0:
    return images
  b, h, w, _ = images.shape
  oy, ox = crop_pad_offsets(keys, pad).T
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  # Every (h, w) window of the padded images as a view; pick one per image.
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
  return np.ascontiguousarray(np.moveaxis(windows[np.arange(b), oy, ox], 1, -1))


def flip_mask(keys: np.ndarray) -> np.ndarray:
  return uniform(keys, STREAM_FLIP, 1)[:, 0] < 0.5


def random_hflip(images: np.ndarray, keys: np.ndarray) -> np.ndarray:
  flip = flip_mask(keys)
  if not flip.any():
    return images
  out = images.copy()
  out[flip] = images[flip, :, ::-1]
  return out


# --- RandAugment ops (batched; per-image parameters of shape (B,)) --------------------------------

MAX_LEVEL = 10.0


def _col(v, n: int) -> np.ndarray:
  """A per-image parameter as a (B, 1, 1, 1) float32 array."""
  return np.broadcast_to(np.asarray(v, np.float32), (n,)).reshape(n, 1, 1, 1)


def _luma(x: np.ndarray) -> np.ndarray:
  """(B, H, W, 1) float32 luma (ITU-R 601-2, as PIL's 'L' mode); the image itself if 1 channel."""
  if x.shape[-1] == 1:
    return x.astype(np.float32)
  x = x.astype(np.int64)  # PIL's fixed-point L = (19595 R + 38470 G + 7471 B + 2^15) >> 16
  return ((x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 0x8000) >> 16).astype(
      np.float32)


def _truncate_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.floor(x), 0, 255).astype(np.uint8)


def to_grayscale(x: np.ndarray) -> np.ndarray:
  """(B, H, W, 3) uint8 -> (B, H, W, 1) uint8 luma, as PIL's convert('L')."""
  return _luma(x).astype(np.uint8)


def _blend(degenerate: np.ndarray, image: np.ndarray, factor) -> np.ndarray:
  """PIL's Image.blend(degenerate, image, factor) (truncates); extrapolates for factor > 1."""
  d = degenerate.astype(np.float32)
  return _truncate_uint8(d + _col(factor, len(image)) * (image.astype(np.float32) - d))


def invert(x: np.ndarray) -> np.ndarray:
  return 255 - x


def auto_contrast(x: np.ndarray) -> np.ndarray:
  """Per image and channel, stretch [min, max] to [0, 255] (identity where max == min)."""
  lo = x.min(axis=(1, 2), keepdims=True).astype(np.float32)
  hi = x.max(axis=(1, 2), keepdims=True).astype(np.float32)
  span = hi - lo
  scale = np.where(span > 0, 255.0 / np.where(span > 0, span, 1.0), 1.0)
  lo = np.where(span > 0, lo, 0.0)
  return np.clip(np.floor((x.astype(np.float32) - lo) * scale), 0, 255).astype(np.uint8)


def equalize(x: np.ndarray) -> np.ndarray:
  """Histogram equalisation per image and channel, PIL's ImageOps.equalize algorithm."""
  b, h, w, c = x.shape
  planes = x.transpose(0, 3, 1, 2).reshape(b * c, h * w)
  offsets = (np.arange(b * c) * 256)[:, None]
  hist = np.bincount((planes.astype(np.int64) + offsets).ravel(), minlength=b * c * 256)
  hist = hist.reshape(b * c, 256)
  last = 255 - np.argmax(hist[:, ::-1] > 0, axis=1)              # last non-empty bin
  step = (h * w - hist[np.arange(b * c), last]) // 255
  cum = np.cumsum(hist, axis=1) - hist                           # exclusive cumulative count
  safe = np.maximum(step, 1)[:, None]
  lut = np.minimum((step[:, None] // 2 + cum) // safe, 255)
  lut = np.where(step[:, None] > 0, lut, np.arange(256)[None, :]).astype(np.uint8)
  out = np.take_along_axis(lut, planes.astype(np.intp), axis=1)
  return out.reshape(b, c, h, w).transpose(0, 2, 3, 1)


def posterize(x: np.ndarray, bits) -> np.ndarray:
  """Keeps the top `bits` (0..8) bits of every value."""
  bits = np.clip(np.broadcast_to(np.asarray(bits, np.int64), (len(x),)), 0, 8)
  mask = (0xFF << (8 - bits)) & 0xFF
  return x & mask.astype(np.uint8).reshape(-1, 1, 1, 1)


def solarize(x: np.ndarray, threshold) -> np.ndarray:
  """Inverts values >= threshold (threshold 256 is the identity)."""
  t = np.broadcast_to(np.asarray(threshold, np.int64), (len(x),)).reshape(-1, 1, 1, 1)
  return np.where(x.astype(np.int64) >= t, 255 - x, x).astype(np.uint8)


def solarize_add(x: np.ndarray, add, threshold: int = 128) -> np.ndarray:
  """Adds `add` to values below `threshold`, saturating at 255."""
  a = np.broadcast_to(np.asarray(add, np.int64), (len(x),)).reshape(-1, 1, 1, 1)
  xi = x.astype(np.int64)
  return np.where(xi < threshold, np.minimum(xi + a, 255), xi).astype(np.uint8)


def color(x: np.ndarray, factor) -> np.ndarray:
  """Saturation: blend with the grayscale image (identity on one channel)."""
  if x.shape[-1] == 1:
    return x
  return _blend(np.broadcast_to(_luma(x), x.shape), x, factor)


def contrast(x: np.ndarray, factor) -> np.ndarray:
  """Blend with the mean luma (a per-image constant)."""
  mean = np.floor(_luma(x).mean(axis=(1, 2, 3), keepdims=True) + 0.5)
  return _blend(np.broadcast_to(mean, x.shape), x, factor)


def brightness(x: np.ndarray, factor) -> np.ndarray:
  return _truncate_uint8(x.astype(np.float32) * _col(factor, len(x)))


def sharpness(x: np.ndarray, factor) -> np.ndarray:
  """Blend with PIL's SMOOTH-filtered image (3x3 kernel, centre 5, others 1, /13; border kept)."""
  _, h, w, _ = x.shape
  if h < 3 or w < 3:
    return x
  f = x.astype(np.float32)
  acc = np.zeros_like(f[:, 1:-1, 1:-1])
  for dy in range(3):
    for dx in range(3):
      acc += f[:, dy:dy + h - 2, dx:dx + w - 2] * (5.0 if dy == dx == 1 else 1.0)
  smooth = f.copy()
  smooth[:, 1:-1, 1:-1] = np.rint(acc / 13.0)
  return _blend(smooth, x, factor)


def affine(x: np.ndarray, matrices: np.ndarray, fill) -> np.ndarray:
  """Bilinear warp: PIL's `Image.transform(size, AFFINE, data, BILINEAR, fillcolor=fill)` per image
  (PIL's C code, which releases the GIL, so worker threads warp in parallel).

  matrices: (B, 2, 3); output pixel (col, row) samples the input at M @ (col + 0.5, row + 0.5, 1) in
  continuous coordinates (pixel i spans [i, i + 1)). Points outside [0, W) x [0, H) take `fill`
  (a scalar or one value per channel, rounded to integers); inside, bilinear with edge clamping.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  b, h, w, c = x.shape
  if not b:
    return x.copy()
  if c not in _PIL_MODES:   # one channel at a time, each with its own fill
    fills = np.broadcast_to(np.asarray(fill, np.float64), (c,))
    return np.concatenate([affine(x[..., k:k + 1], matrices, fills[k]) for k in range(c)], -1)
  data = [tuple(m) for m in np.asarray(matrices, np.float64).reshape(b, 6).tolist()]
  fill = [int(round(float(v))) for v in np.broadcast_to(np.asarray(fill, np.float64), (c,))]
  colour = fill[0] if c == 1 else tuple(fill)

  def fn(im, i):
    return im.transform((w, h), Image.AFFINE, data[i], Image.BILINEAR, fillcolor=colour)
  return _per_pil_image(x, fn)


def _matrices(a, b_, c_, d, e, f) -> np.ndarray:
  return np.stack([np.stack([a, b_, c_], -1), np.stack([d, e, f], -1)], -2)


def rotate_matrices(n: int, h: int, w: int, degrees) -> np.ndarray:
  """(n, 2, 3) source-sampling matrices of a rotation about the image centre."""
  t = np.deg2rad(np.broadcast_to(np.asarray(degrees, np.float64), (n,)))
  cx, cy = w / 2.0, h / 2.0
  cos, sin = np.round(np.cos(t), 15), np.round(np.sin(t), 15)   # as PIL's Image.rotate
  # source = R(-t) applied about the centre; image rows grow downwards.
  return _matrices(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def rotate(x: np.ndarray, degrees, fill) -> np.ndarray:
  """Rotation about the image centre by `degrees` (counter-clockwise as displayed)."""
  n, h, w, _ = x.shape
  return affine(x, rotate_matrices(n, h, w, degrees), fill)


def _per_image(n: int, value):
  """A scalar or per-image value as float64 (N,), with ones and zeros for the other matrix slots."""
  return np.broadcast_to(np.asarray(value, np.float64), (n,)), np.ones(n), np.zeros(n)


def shear_x_matrices(n: int, shear) -> np.ndarray:
  s, one, zero = _per_image(n, shear)
  return _matrices(one, s, zero, zero, one, zero)


def shear_y_matrices(n: int, shear) -> np.ndarray:
  s, one, zero = _per_image(n, shear)
  return _matrices(one, zero, zero, s, one, zero)


def translate_x_matrices(n: int, pixels) -> np.ndarray:
  p, one, zero = _per_image(n, pixels)
  return _matrices(one, zero, p, zero, one, zero)


def translate_y_matrices(n: int, pixels) -> np.ndarray:
  p, one, zero = _per_image(n, pixels)
  return _matrices(one, zero, zero, zero, one, p)


def shear_x(x: np.ndarray, shear, fill) -> np.ndarray:
  return affine(x, shear_x_matrices(len(x), shear), fill)


def translate_x(x: np.ndarray, pixels, fill) -> np.ndarray:
  return affine(x, translate_x_matrices(len(x), pixels), fill)


# --- RandAugment ----------------------------------------------------------------------------------

def _signed(level, sign):
  return np.where(sign, -level, level)


def _enhance_factor(m, sign):
  return 1.0 + _signed(m / MAX_LEVEL * 0.9, sign)


# The geometric ops as sampling matrices: fn(n, h, w, magnitude (n,), negate (n,)) -> (n, 2, 3),
# the one place their magnitudes are mapped to angles, shears and shifts. rand_augment warps every
# image of a layer that drew one of them in a single `affine` call.
GEOMETRIC_MATRICES = {
    'Rotate': lambda n, h, w, m, s: rotate_matrices(n, h, w, _signed(m / MAX_LEVEL * 30.0, s)),
    'ShearX': lambda n, h, w, m, s: shear_x_matrices(n, _signed(m / MAX_LEVEL * 0.3, s)),
    'ShearY': lambda n, h, w, m, s: shear_y_matrices(n, _signed(m / MAX_LEVEL * 0.3, s)),
    'TranslateXRel': lambda n, h, w, m, s: translate_x_matrices(
        n, _signed(m / MAX_LEVEL * 0.45 * w, s)),
    'TranslateYRel': lambda n, h, w, m, s: translate_y_matrices(
        n, _signed(m / MAX_LEVEL * 0.45 * h, s)),
}


def _geometric_op(name: str):
  def op(x, m, s, fill):
    n, h, w, _ = x.shape
    return affine(x, GEOMETRIC_MATRICES[name](n, h, w, m, s), fill)
  return op


# name -> fn(x, magnitude (B,), negate (B,) bool, fill); the 'increasing' set of timm's
# rand-...-inc1: a larger magnitude is always a stronger change. The order fixes the op indices.
RandAugmentOp = Callable[[np.ndarray, np.ndarray, np.ndarray, object], np.ndarray]
RANDAUGMENT_OPS: dict[str, RandAugmentOp] = {
    'AutoContrast': lambda x, m, s, fill: auto_contrast(x),
    'Equalize': lambda x, m, s, fill: equalize(x),
    'Invert': lambda x, m, s, fill: invert(x),
    'Rotate': _geometric_op('Rotate'),
    'PosterizeIncreasing': lambda x, m, s, fill: posterize(x, 4 - (m / MAX_LEVEL * 4).astype(int)),
    'SolarizeIncreasing': lambda x, m, s, fill: solarize(
        x, 256 - (m / MAX_LEVEL * 256).astype(int)),
    'SolarizeAdd': lambda x, m, s, fill: solarize_add(x, (m / MAX_LEVEL * 110).astype(int)),
    'ColorIncreasing': lambda x, m, s, fill: color(x, _enhance_factor(m, s)),
    'ContrastIncreasing': lambda x, m, s, fill: contrast(x, _enhance_factor(m, s)),
    'BrightnessIncreasing': lambda x, m, s, fill: brightness(x, _enhance_factor(m, s)),
    'SharpnessIncreasing': lambda x, m, s, fill: sharpness(x, _enhance_factor(m, s)),
    'ShearX': _geometric_op('ShearX'),
    'ShearY': _geometric_op('ShearY'),
    'TranslateXRel': _geometric_op('TranslateXRel'),
    'TranslateYRel': _geometric_op('TranslateYRel'),
}
RANDAUGMENT_OP_NAMES = tuple(RANDAUGMENT_OPS)

def apply_op(name: str, x: np.ndarray, magnitude, negate=False, fill=0) -> np.ndarray:
  """Applies one RandAugment op at `magnitude` (0..10) to a batch (for tests and inspection)."""
  n = len(x)
  m = np.broadcast_to(np.asarray(magnitude, np.float64), (n,))
  s = np.broadcast_to(np.asarray(negate, bool), (n,))
  return RANDAUGMENT_OPS[name](x, m, s, fill)


def randaugment_params(keys: np.ndarray, n: int, m: float, mstd: float, prob: float):
  """Per image and layer: op index (B, n), applied (B, n), magnitude (B, n), negate (B, n)."""
  b = len(keys)
  u = uniform(keys, STREAM_RANDAUG, 5 * n).reshape(b, n, 5)
  op = np.minimum((u[..., 0] * len(RANDAUGMENT_OP_NAMES)).astype(np.int64),
                  len(RANDAUGMENT_OP_NAMES) - 1)
  applied = u[..., 1] < prob
  if mstd > 0:
    mag = m + mstd * normal_from_uniform(u[..., 2], u[..., 3])
  else:
    mag = np.full((b, n), float(m))
  mag = np.clip(mag, 0.0, MAX_LEVEL)
  negate = u[..., 4] > 0.5
  return op, applied, mag, negate


def rand_augment(images: np.ndarray, keys: np.ndarray, n: int = 2, m: float = 9.0,
                 mstd: float = 0.5, prob: float = 0.5, fill=0) -> np.ndarray:
  """RandAugment on a uint8 batch: `n` layers, each a uniformly drawn op applied with `prob`."""
  if n <= 0:
    return images
  op, applied, mag, negate = randaugment_params(keys, n, m, mstd, prob)
  out = images.copy()
  _, h, w, _ = images.shape
  geometric = np.array([name in GEOMETRIC_MATRICES for name in RANDAUGMENT_OP_NAMES])
  for layer in range(n):
    warp = np.flatnonzero(applied[:, layer] & geometric[op[:, layer]])
    if warp.size:
      matrices = np.empty((warp.size, 2, 3))
      for k, name in enumerate(RANDAUGMENT_OP_NAMES):
        if geometric[k]:
          sub = np.flatnonzero(op[warp, layer] == k)
          if sub.size:
            sel = warp[sub]
            matrices[sub] = GEOMETRIC_MATRICES[name](sub.size, h, w, mag[sel, layer],
                                                     negate[sel, layer])
      out[warp] = affine(out[warp], matrices, fill)
    for k, name in enumerate(RANDAUGMENT_OP_NAMES):
      if geometric[k]:
        continue
      sel = np.flatnonzero(applied[:, layer] & (op[:, layer] == k))
      if sel.size:
        out[sel] = RANDAUGMENT_OPS[name](out[sel], mag[sel, layer], negate[sel, layer], fill)
  return out


# --- Random Erasing (on normalised float images) --------------------------------------------------

def erasing_boxes(keys: np.ndarray, height: int, width: int, prob: float,
                  area=(0.02, 1.0 / 3.0), min_aspect: float = 0.3, attempts: int = 10):
  """timm's RandomErasing box draw, vectorised: (B, 4) int (top, left, h, w) and (B,) bool erase."""
  b = len(keys)
  u = uniform(keys, STREAM_ERASE, 1 + 4 * attempts)
  trial = u[:, 1:].reshape(b, attempts, 4)
  total = height * width
  target = total * (area[0] + (area[1] - area[0]) * trial[..., 0])
  log_lo, log_hi = np.log(min_aspect), np.log(1.0 / min_aspect)
  aspect = np.exp(log_lo + (log_hi - log_lo) * trial[..., 1])
  eh = np.round(np.sqrt(target * aspect)).astype(np.int64)
  ew = np.round(np.sqrt(target / aspect)).astype(np.int64)
  ok = (eh < height) & (ew < width) & (eh > 0) & (ew > 0)
  top = np.floor(trial[..., 2] * (height - eh + 1)).astype(np.int64)
  left = np.floor(trial[..., 3] * (width - ew + 1)).astype(np.int64)
  first = np.argmax(ok, axis=1)
  rows = np.arange(b)
  erase = (u[:, 0] < prob) & ok[rows, first]
  boxes = np.stack([top[rows, first], left[rows, first], eh[rows, first], ew[rows, first]], -1)
  return boxes, erase


def erasing_params(keys: np.ndarray, height: int, width: int, prob: float,
                   area=(0.02, 1.0 / 3.0), min_aspect: float = 0.3) -> dict[str, np.ndarray]:
  """Random Erasing as batch data for the device (`pipeline.model_input` erases there):
  'erase_box' int32 (B, 4) (top, left, height, width), all zero where the image is not erased, and
  'erase_key' uint32 (B, 2), the threefry key of the image's noise: the hash
  (key, STREAM_ERASE_NOISE) split into its high and low words. Both are pure functions of the
  example keys."""
  boxes, erase = erasing_boxes(keys, height, width, prob, area, min_aspect)
  boxes = np.where(erase[:, None], boxes, 0).astype(np.int32)
  h = random_bits(keys, STREAM_ERASE_NOISE, 1)[:, 0]
  words = np.stack([h >> np.uint64(32), h & np.uint64(0xFFFFFFFF)], -1).astype(np.uint32)
  return {'erase_box': boxes, 'erase_key': words}
