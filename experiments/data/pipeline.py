"""Input pipeline: a data set (experiments.data.datasets) -> deterministic, resumable, per-host
batches.

* **Index-based sampling.** The global training stream is a pure function of the seed: position g
  (= step * global_batch + offset) holds training example permutation(seed, g // N)[g % N], and
  every random augmentation of that example is drawn from a counter-based hash keyed by (seed, g)
  (see `augment.py`). Hence a batch is a pure function of (data set, seed, step, process_index,
  process_count, augmentation config, validation hold-out); `start_step=s` computes step s
  directly, with no replay; epochs roll over forever (a batch may straddle an epoch boundary; every
  example is seen once per epoch); host p of P reads rows [p * B, (p + 1) * B) of each global batch
  of P * B, so hosts are disjoint and the stream does not depend on the host count.
* **Transforms** (numpy and PIL; no TensorFlow). Train: random-resized-crop (or resize +
  pad-and-crop for small images), flip, RandAugment on uint8 (its warps in PIL's C code), and the
  Random Erasing boxes; eval: resize the shorter side to image_size / crop_pct, centre crop
  (crop_pct 0.875 for the ImageNet-like sets, 1.0 otherwise). Encoded images (JPEG / PNG) are
  decoded and crop-resized with PIL (bicubic, antialiased, as timm / torchvision do). RGB images fed
  to a 1-channel model become luma.
* **uint8 on the wire.** Batches carry uint8 images (4x fewer bytes than float32; grayscale as one
  channel, 12x fewer than float32 RGB). `model_input(batch, input_spec(...))`, inside the jitted
  steps, normalises, erases (the noise from a per-image key in the batch) and replicates grayscale
  to `channels=3` on the device.
* **Parallelism.** Each batch is one task; `num_workers` threads compute whole batches ahead of the
  consumer (`prefetch` extra). numpy (large arrays) and PIL release the GIL. Default workers: one
  per core ($MODERNIZE_DATA_WORKERS overrides).
* **Validation.** `validation=N` holds N training examples out of training
  (`datasets.split_indices`); `eval_batches(split='validation')` evaluates exactly those.
* **Eval is exact on any device count.** Global eval batch k covers positions
  [k * P * B, (k + 1) * P * B); every host yields the same number of batches; rows past the end of
  the split are zeros with mask False.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import math
import os
import threading
from typing import Any, Callable, Iterator

import numpy as np

from experiments.data import augment as aug
from experiments.data import datasets
from experiments.data.augment import AugmentConfig

__all__ = ['AugmentConfig', 'InputSpec', 'default_workers', 'eval_batches', 'input_spec',
           'model_input', 'num_eval_batches', 'split_size', 'train_batches', 'train_indices']

# --- sampling -------------------------------------------------------------------------------------

class _Permutations:
  """permutation(seed, epoch) with a small cache (a step needs at most two epochs)."""

  def __init__(self, seed: int, n: int):
    self.seed, self.n = seed, n
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __call__(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch in self._cache:
        self._cache.move_to_end(epoch)
        return self._cache[epoch]
    perm = aug.permutation(self.seed, epoch, self.n)
    with self._lock:
      self._cache[epoch] = perm
      while len(self._cache) > 3:
        self._cache.popitem(last=False)
    return perm


def _positions(step: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  start = step * batch_size * process_count + process_index * batch_size
  return np.arange(start, start + batch_size, dtype=np.int64)


def _indices_at(positions: np.ndarray, n: int, perms: Callable[[int], np.ndarray]) -> np.ndarray:
  epochs = positions // n
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = perms(int(epoch))[positions[sel] % n]
  return out


def train_indices(num_examples: int, *, seed: int, step: int, batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(example indices, global positions) of this host's share of training batch `step`."""
  positions = _positions(step, batch_size, process_index, process_count)
  perms = _Permutations(seed, num_examples)
  return _indices_at(positions, num_examples, perms), positions


# --- transforms -----------------------------------------------------------------------------------

class BadImage(Exception):
  """Image `index` of a batch could not be decoded."""

  def __init__(self, index: int, error: Exception):
    super().__init__(f'{index}: {error}')
    self.index, self.error = index, error


def _decoded(source, rows: np.ndarray, decode: Callable[[list[bytes]], np.ndarray]):
  """(decode(blobs of rows), labels); an undecodable image becomes DatasetUnavailable naming it."""
  blobs, labels = source.read(rows)
  try:
    return decode(blobs), labels
  except BadImage as e:
    row = int(rows[e.index])
    where = source.name(row) if hasattr(source, 'name') else f'example {row}'
    raise datasets.DatasetUnavailable(f'cannot decode image {where}: {e.error}') from None


@dataclasses.dataclass
class _Transform:
  """Everything between raw examples and a normalised batch."""
  image_size: int
  stored_channels: int
  channels: int
  mean: np.ndarray        # per working channel (after an RGB -> luma conversion, if any)
  std: np.ndarray
  crop_pct: float
  augment: AugmentConfig

  @property
  def fill(self) -> tuple[int, ...]:
    return tuple(int(round(255 * m)) for m in self.mean)

  def working(self, images: np.ndarray) -> np.ndarray:
    """RGB -> luma when the model wants one channel."""
    if self.channels == 1 and images.shape[-1] == 3:
      return aug.to_grayscale(images)
    return images

  @property
  def wire_channels(self) -> int:
    """Channels of the uint8 images a batch carries: the working channels (grayscale images travel
    as one channel and are replicated on the device)."""
    return min(self.stored_channels, self.channels)

  def finish(self, images: np.ndarray, keys: np.ndarray | None) -> dict[str, np.ndarray]:
    """uint8 (B, S, S, c) -> {'image': uint8 (B, S, S, c) [RandAugment-ed][, 'erase_box',
    'erase_key']}: what `model_input` turns into the normalised, erased float32 model input."""
    a = self.augment
    if keys is not None and a.randaugment_n > 0:
      images = aug.rand_augment(images, keys, a.randaugment_n, a.randaugment_m,
                                a.randaugment_mstd, a.randaugment_prob, fill=self.fill)
    out = {'image': np.ascontiguousarray(images, np.uint8)}
    if keys is not None and a.random_erasing_prob > 0:
      out.update(aug.erasing_params(keys, images.shape[1], images.shape[2], a.random_erasing_prob,
                                    a.erasing_area, a.erasing_min_aspect))
    return out

  # Small images held in memory.
  def presize(self, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The whole split resized once (the same deterministic resize `train_arrays` would apply to
    every batch) when the crop is not random-resized; else the images unchanged."""
    if self.augment.random_resized_crop or images.shape[1:3] == (self.image_size,) * 2:
      return images
    return np.concatenate([aug.resize(images[i:i + chunk], self.image_size)
                           for i in range(0, len(images), chunk)])

  def train_arrays(self, images: np.ndarray, keys: np.ndarray) -> dict[str, np.ndarray]:
    """`images`: raw, or already `presize`d (the resize is then the identity)."""
    a, s = self.augment, self.image_size
    _, h, w, _ = images.shape
    if a.random_resized_crop:
      boxes = aug.random_resized_crop_boxes(keys, h, w, a.rrc_scale, a.rrc_ratio)
      images = aug.resize_boxes(images, boxes, s)
    else:
      images = aug.resize(images, s)
      images = aug.random_crop_pad(images, keys, a.random_crop_pad)
    images = self.working(images)
    if a.hflip:
      images = aug.random_hflip(images, keys)
    return self.finish(images, keys)

  def eval_arrays(self, images: np.ndarray) -> np.ndarray:
    return self.working(aug.resize(images, self.image_size, self.crop_pct))

  # Encoded images (JPEG, PNG) of any size.
  def _decode(self, blobs: list[bytes], box_fn) -> np.ndarray:
    """Decoded, box-cropped and resized to (B, S, S, stored channels); BadImage(i) if blob i is
    not a readable image."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    s = self.image_size
    opened = []
    for i, blob in enumerate(blobs):
      try:
        opened.append(Image.open(io.BytesIO(blob)))
      except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(i, e) from None
    sizes = np.array([im.size for im in opened], np.float64).reshape(-1, 2)  # (width, height)
    boxes = box_fn(sizes[:, 1], sizes[:, 0])                                  # (top, left, h, w)
    out = np.empty((len(blobs), s, s, self.stored_channels), np.uint8)
    for i, im in enumerate(opened):
      try:
        box = draft(im, boxes[i], s)
        im = datasets.to_mode(im, self.stored_channels)
        im = im.resize((s, s), Image.BICUBIC, box=box)
      except (OSError, ValueError, SyntaxError) as e:   # e.g. a truncated file
        raise BadImage(i, e) from None
      out[i] = np.asarray(im).reshape(s, s, self.stored_channels)
    return out

  def train_encoded(self, blobs: list[bytes], keys: np.ndarray) -> dict[str, np.ndarray]:
    a = self.augment
    if a.random_resized_crop:
      box_fn = lambda h, w: aug.random_resized_crop_boxes(keys, h, w, a.rrc_scale, a.rrc_ratio)
      images = self._decode(blobs, box_fn)
    else:
      images = self._decode(blobs, lambda h, w: aug.center_box(h, w, self.image_size, 1.0))
      images = aug.random_crop_pad(images, keys, a.random_crop_pad)
    images = self.working(images)
    if a.hflip:
      images = aug.random_hflip(images, keys)
    return self.finish(images, keys)

  def eval_encoded(self, blobs: list[bytes]) -> np.ndarray:
    box_fn = lambda h, w: aug.center_box(h, w, self.image_size, self.crop_pct)
    return self.working(self._decode(blobs, box_fn))


def draft(image, box, size: int) -> tuple[float, float, float, float]:
  """Asks a JPEG `image` (opened, not yet decoded) to decode at 1/2, 1/4 or 1/8 of its size where
  the crop `box` (top, left, height, width, in the full image's pixels) still has at least `size`
  pixels each way at that scale (libjpeg scales in the DCT, so the pixels the crop loses are ones
  the resize to `size` would have averaged away); returns the box (left, upper, right, lower) in
  the pixels it will decode to. Other formats decode whole."""
  top, left, bh, bw = (float(v) for v in box)
  if getattr(image, 'format', None) == 'JPEG' and bh > 0 and bw > 0:
    width, height = image.size
    image.draft(None, (math.ceil(width * size / bw), math.ceil(height * size / bh)))
    sx, sy = image.size[0] / width, image.size[1] / height
    top, left, bh, bw = top * sy, left * sx, bh * sy, bw * sx
  return left, top, left + bw, top + bh


def _statistics(info: datasets.DataInfo, channels: int | None):
  """(model channels, mean, std per wire channel) for a data set fed to a `channels` model."""
  stored = info.channels
  channels = channels or stored
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, not {channels}')
  mean, std = np.array(info.mean, np.float64), np.array(info.std, np.float64)
  if channels == 1 and stored == 3:  # luma of the statistics (the std is an approximation)
    weights = np.array([0.299, 0.587, 0.114])
    mean, std = np.array([mean @ weights]), np.array([std @ weights])
  return channels, mean, std


def _make_transform(info: datasets.DataInfo, image_size: int | None, channels: int | None,
                    crop_pct: float | None, augment: AugmentConfig | None) -> _Transform:
  channels, mean, std = _statistics(info, channels)
  size = image_size or info.default_size or info.image_shape[0]
  if not size:
    raise ValueError(f'{info.name}: images of varying sizes need an image_size')
  if crop_pct is None:
    crop_pct = 0.875 if info.large and info.default_size else 1.0
  return _Transform(size, info.channels, channels, mean, std, crop_pct, augment or AugmentConfig())


# --- on the device --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What `model_input` needs besides the batch: per wire channel mean and std (of [0, 1] pixel
  values) and the model's channel count. Hashable: a static argument of the jitted steps."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  channels: int


def input_spec(name: str, data_dir: str | os.PathLike | None = None,
               channels: int | None = None) -> InputSpec:
  """The InputSpec of `name`'s batches for a `channels`-channel model."""
  channels, mean, std = _statistics(datasets.info(name, data_dir), channels)
  return InputSpec(tuple(float(m) for m in mean), tuple(float(s) for s in std), channels)


def model_input(batch: dict, spec: InputSpec):
  """A batch's float32 model input (B, S, S, spec.channels), computed where the batch lives (inside
  the jitted steps, on the accelerator): uint8 -> (x / 255 - mean) / std, Random Erasing (mode
  'pixel': each erased box is N(0, 1) noise from the image's own 'erase_key'; boxes of size zero
  erase nothing), then a grayscale image replicated to 3 channels. The one place where uint8
  batches become model inputs (trainer, eval, analysis, benchmarks). A pure function of the batch:
  the same on any device count."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = batch['image']
  b, h, w, c = x.shape
  mean, std = np.array(spec.mean, np.float64), np.array(spec.std, np.float64)
  out = jnp.asarray(x).astype(jnp.float32) * (1.0 / (255.0 * std)).astype(np.float32)
  out = out - (mean / std).astype(np.float32)
  if 'erase_box' in batch:
    box = jnp.asarray(batch['erase_box'])
    top, left, eh, ew = (box[:, i, None] for i in range(4))
    rows, cols = jnp.arange(h)[None], jnp.arange(w)[None]
    inside = (((rows >= top) & (rows < top + eh))[:, :, None]
              & ((cols >= left) & (cols < left + ew))[:, None, :])
    keys = jax.random.wrap_key_data(jnp.asarray(batch['erase_key']), impl='threefry2x32')
    noise = jax.vmap(lambda k: jax.random.normal(k, (h, w, c), jnp.float32))(keys)
    out = jnp.where(inside[..., None], noise, out)
  if spec.channels == 3 and c == 1:
    out = jnp.broadcast_to(out, (b, h, w, 3))
  return out


# --- iterators ------------------------------------------------------------------------------------

def default_workers() -> int:
  """Batch-building threads by default: $MODERNIZE_DATA_WORKERS, else one per core this process
  may run on, at most 8. The threads spend most of their time in numpy and PIL, which release the
  GIL, but not all: on a 16-core GPU host (README, "The input pipeline at 224px") 8 threads built
  4,610 img/s and 16 only 3,591. The consumer (the trainer) mostly waits for the device, so it needs
  no core of its own."""
  env = os.environ.get('MODERNIZE_DATA_WORKERS')
  if env:
    return int(env)
  return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                     else os.cpu_count() or 1))


WORKER_KINDS = ('threads', 'processes')


def default_worker_kind() -> str:
  """How batches are built by default: $MODERNIZE_DATA_WORKER_KIND, else 'threads' (the trainer
  asks for processes where they measure faster: experiments/training/runconfig.py,
  `data_workers`)."""
  kind = os.environ.get('MODERNIZE_DATA_WORKER_KIND') or 'threads'
  if kind not in WORKER_KINDS:
    raise ValueError(f'MODERNIZE_DATA_WORKER_KIND={kind!r}: must be one of {WORKER_KINDS}')
  return kind


def _worker_kind(kind: str | None, workers: int) -> str:
  kind = kind or default_worker_kind()
  if kind not in WORKER_KINDS:
    raise ValueError(f'worker kind {kind!r}: must be one of {WORKER_KINDS}')
  return 'threads' if workers <= 0 else kind


def _prefetched(fn: Callable[[int], Any], start: int, stop: int | None, num_workers: int,
                prefetch: int, kind: str = 'threads') -> Iterator[Any]:
  """fn(start), fn(start + 1), ... computed by `num_workers` threads or worker processes
  (experiments/data/workers.py; `fn` then a picklable batch builder), `prefetch` extra ahead; in
  order whatever the number and kind of workers."""
  if num_workers <= 0:
    k = start
    while stop is None or k < stop:
      yield fn(k)
      k += 1
    return
  if kind == 'processes':
    from experiments.data import workers  # pylint: disable=import-outside-toplevel
    yield from workers.batches(fn, start, stop, num_workers, prefetch)
    return
  executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix='modernize-data')
  pending: collections.deque = collections.deque()
  k = start
  try:
    while True:
      while len(pending) < num_workers + prefetch and (stop is None or k < stop):
        pending.append(executor.submit(fn, k))
        k += 1
      if not pending:
        return
      yield pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()
    try:
      executor.shutdown(wait=False, cancel_futures=True)
    except Exception:  # pylint: disable=broad-except  # interpreter teardown
      pass


def _subset(indices: np.ndarray, num_examples: int | None) -> np.ndarray:
  if num_examples is None or num_examples <= 0:
    return indices
  return indices[:int(num_examples)]


def split_size(num_train: int, num_test: int, split: str, validation: int = 0) -> int:
  """Examples in `split` ('train', 'validation' or 'test') with `validation` held out of train."""
  if split == 'test':
    return num_test
  train, held_out = datasets.split_indices(num_train, validation)
  return len(train) if split == 'train' else len(held_out)


class _Split:
  """One split of a data set as (transform-ready) rows: in-memory arrays or encoded records.
  `rows` maps the split's example k to the stored example rows[k] (validation hold-out, subsets)."""

  def __init__(self, name: str, data_dir, split: str, validation: int,
               num_examples: int | None, info: datasets.DataInfo):
    stored = 'test' if split == 'test' else 'train'
    if info.large:
      self.source = datasets.record_source(name, data_dir, stored)
      total = len(self.source)
      self.images = self.labels = None
    else:
      self.source = None
      self.images, self.labels = datasets.load_arrays(name, stored, data_dir)
      total = len(self.labels)
    if split == 'test':
      rows = np.arange(total, dtype=np.int64)
    else:
      train, held_out = datasets.split_indices(total, validation)
      rows = train if split == 'train' else held_out
    self.rows = _subset(rows, num_examples)
    if self.images is not None and len(self.rows) != total:   # gather once, not per batch
      self.images, self.labels = self.images[self.rows], self.labels[self.rows]
      self.rows = np.arange(len(self.rows), dtype=np.int64)

  def __len__(self) -> int:
    return len(self.rows)


def _check_split(split: str, validation: int) -> None:
  if split not in ('train', 'validation', 'test'):
    raise ValueError(f'split must be train, validation or test, not {split!r}')
  if split == 'validation' and validation <= 0:
    raise ValueError('the validation split needs validation > 0 held-out examples')


@dataclasses.dataclass(frozen=True)
class _TrainSpec:
  """Everything that determines a host's training batches (picklable: worker processes build the
  batches from it)."""
  name: str
  data_dir: str | None
  batch_size: int
  image_size: int | None
  channels: int | None
  seed: int
  process_index: int
  process_count: int
  augment: AugmentConfig | None
  num_examples: int | None
  validation: int


class TrainBatches:
  """batch(step): a pure function of its spec and the step. Loads the data on first use (in each
  worker process of its own; what it loaded is not pickled)."""

  def __init__(self, spec: _TrainSpec):
    self.spec, self._built = spec, None

  def __getstate__(self):
    return {'spec': self.spec, '_built': None}

  def load(self) -> 'TrainBatches':
    s = self.spec
    info = datasets.info(s.name, s.data_dir)
    transform = _make_transform(info, s.image_size, s.channels, None, s.augment)
    data = _Split(s.name, s.data_dir, 'train', s.validation, s.num_examples, info)
    n = len(data)
    perms = _Permutations(s.seed, n)
    images = None if info.large else transform.presize(data.images)  # once, not per batch
    self._built = (info, transform, data, n, perms, images)
    return self

  def positions(self, step: int) -> np.ndarray:
    s = self.spec
    return _positions(step, s.batch_size, s.process_index, s.process_count)

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an in-memory split, the arrays the batches are cut from (`indices`
    rows): the images `presize`d once (data placed on the device is uploaded from these)."""
    if self._built is None:
      self.load()
    if self._built[0].large:
      raise ValueError(f'{self.spec.name}: encoded images are read per batch, not held in memory')
    return self._built[5], self._built[2].labels

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the loaded split, stream positions) of the examples of batch `step`: the
    rows of the training arrays `__call__` takes (the data on the device takes the same)."""
    if self._built is None:
      self.load()
    n, perms = self._built[3], self._built[4]
    positions = self.positions(step)
    return _indices_at(positions, n, perms), positions

  def describe(self, step: int) -> str:
    """Batch `step` in words, for a message: its stream positions and first training examples."""
    if self._built is None:
      self.load()
    indices, positions = self.indices(step)
    rows = self._built[2].rows[indices]
    shown = ', '.join(str(int(r)) for r in rows[:4])
    return (f'batch {step} (stream positions {positions[0]}-{positions[-1]}: stored training '
            f'examples {shown}{", ..." if len(rows) > 4 else ""})')

  def slot_bytes(self) -> int:
    """An upper bound of one batch's bytes (its arrays, each aligned to 64 bytes)."""
    info, transform = self._info_transform()
    s, c, b = transform.image_size, transform.wire_channels, self.spec.batch_size
    return _aligned(b * s * s * c) + 4 * 64 + b * (4 + 16 + 8) + 64

  def _info_transform(self):
    if self._built is not None:
      return self._built[0], self._built[1]
    s = self.spec
    info = datasets.info(s.name, s.data_dir)
    return info, _make_transform(info, s.image_size, s.channels, None, s.augment)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if self._built is None:
      self.load()
    info, transform, data, _, _, images = self._built
    idx, positions = self.indices(step)
    keys = aug.example_keys(self.spec.seed, positions)
    if info.large:
      out, labels = _decoded(data.source, data.rows[idx],
                             lambda blobs: transform.train_encoded(blobs, keys))
      return {**out, 'label': labels}
    return {**transform.train_arrays(images[idx], keys), 'label': data.labels[idx]}


def _aligned(nbytes: int, alignment: int = 64) -> int:
  return -(-nbytes // alignment) * alignment


def train_builder(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int,
                  image_size: int | None = None, channels: int | None = None, seed: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  augment: AugmentConfig | None = None, num_examples: int | None = None,
                  validation: int = 0) -> TrainBatches:
  """The picklable function step -> batch behind `train_batches` (same arguments), for other
  loaders to drive (the benchmark's grain comparison); it loads its data on first use."""
  _positions(0, batch_size, process_index, process_count)  # validates the host arguments
  return TrainBatches(_TrainSpec(
      name, None if data_dir is None else os.fspath(data_dir), batch_size, image_size, channels,
      seed, process_index, process_count, augment, num_examples, validation))


def train_batches(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int,
                  image_size: int | None = None, channels: int | None = None, seed: int = 0,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  augment: AugmentConfig | None = None, num_examples: int | None = None,
                  validation: int = 0, num_workers: int | None = None,
                  worker_kind: str | None = None,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches for this host, from step `start_step` on.

  Yields {'image': uint8 (batch_size, image_size, image_size, c), 'label': int32 (batch_size,)}
  (c: 1 for grayscale data or a 1-channel model, else 3), with Random Erasing on also 'erase_box'
  and 'erase_key' (`augment.erasing_params`); `model_input` makes the model's float32 input.
  `batch_size` is per host; the global batch is batch_size * process_count. A pure function of
  (name, seed, step, process_index, process_count, augment, validation[, num_examples]):
  `start_step=s` yields exactly what an unbroken iterator yields from step s on, for any number
  and kind of workers. validation: training examples held out (never trained on). num_examples:
  train on the first num_examples of the (remaining) split only (smoke runs); None = all.
  num_workers: batch builders (None: `default_workers()`; 0: synchronous, in this thread);
  worker_kind: 'threads' or 'processes' (None: `default_worker_kind()`;
  experiments/data/workers.py); prefetch: batches computed ahead beyond one per worker. With threads
  the data is loaded now (DatasetUnavailable is raised here); worker processes load it themselves.
  """
  if batch_size <= 0 or start_step < 0:
    raise ValueError(f'need batch_size > 0 and start_step >= 0, not {batch_size}, {start_step}')
  builder = train_builder(name, data_dir=data_dir, batch_size=batch_size, image_size=image_size,
                          channels=channels, seed=seed, process_index=process_index,
                          process_count=process_count, augment=augment,
                          num_examples=num_examples, validation=validation)
  workers = default_workers() if num_workers is None else num_workers
  kind = _worker_kind(worker_kind, workers)
  if kind == 'threads':
    builder.load()
  else:
    builder.slot_bytes()   # the data set's description: DatasetUnavailable here if it is missing
  return _prefetched(builder, start_step, None, workers, prefetch, kind)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  return -(-num_examples // (batch_size * process_count))


@dataclasses.dataclass(frozen=True)
class _EvalSpec:
  name: str
  data_dir: str | None
  batch_size: int
  image_size: int | None
  channels: int | None
  process_index: int
  process_count: int
  crop_pct: float | None
  split: str
  validation: int
  num_examples: int | None


class EvalBatches:
  """batch(k): this host's share of global eval batch k, padded (picklable, as `TrainBatches`)."""

  def __init__(self, spec: _EvalSpec):
    self.spec, self._built = spec, None

  def __getstate__(self):
    return {'spec': self.spec, '_built': None}

  def _info_transform(self):
    s = self.spec
    info = datasets.info(s.name, s.data_dir)
    return info, _make_transform(info, s.image_size, s.channels, s.crop_pct, None)

  def load(self) -> 'EvalBatches':
    s = self.spec
    info, transform = self._info_transform()
    self._built = (info, transform, _Split(s.name, s.data_dir, s.split, s.validation,
                                           s.num_examples, info))
    return self

  def __len__(self) -> int:
    if self._built is None:
      self.load()
    return len(self._built[2])

  def positions(self, k: int) -> np.ndarray:
    s = self.spec
    return _positions(k, s.batch_size, s.process_index, s.process_count)

  def describe(self, k: int) -> str:
    positions = self.positions(k)
    return f'{self.spec.split} batch {k} (examples {positions[0]}-{positions[-1]})'

  def slot_bytes(self) -> int:
    _, transform = self._info_transform()
    s, c, b = transform.image_size, transform.wire_channels, self.spec.batch_size
    return _aligned(b * s * s * c) + 3 * 64 + b * (4 + 1) + 64

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    if self._built is None:
      self.load()
    info, transform, data = self._built
    n = len(data)
    positions = self.positions(k)
    mask = positions < n
    s, c = transform.image_size, transform.wire_channels
    image = np.zeros((self.spec.batch_size, s, s, c), np.uint8)
    label = np.zeros((self.spec.batch_size,), np.int32)
    if mask.any():
      idx = positions[mask]
      if info.large:
        image[mask], label[mask] = _decoded(data.source, data.rows[idx], transform.eval_encoded)
      else:
        image[mask], label[mask] = transform.eval_arrays(data.images[idx]), data.labels[idx]
    return {'image': image, 'label': label, 'mask': mask}


def eval_batches(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int,
                 image_size: int | None = None, channels: int | None = None,
                 process_index: int = 0, process_count: int = 1, crop_pct: float | None = None,
                 split: str = 'test', validation: int = 0, num_examples: int | None = None,
                 num_workers: int | None = None, worker_kind: str | None = None,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This host's share of a whole split ('test', or 'validation': the `validation` examples held
  out of training), in order, ceil(N / (batch_size * process_count)) batches on every host. Yields
  'image' (uint8, as `train_batches`; zeros on padding), 'label' and 'mask' (bool (batch_size,),
  False on padding).

  crop_pct: eval centre crop (default 0.875 for imagenette / imagenet2012, 1.0 otherwise).
  num_examples: evaluate the first num_examples of the split only (smoke runs); None = all.
  num_workers, worker_kind: as for `train_batches`.
  """
  _check_split(split, validation)
  if batch_size <= 0:
    raise ValueError('batch_size must be positive')
  builder = EvalBatches(_EvalSpec(
      name, None if data_dir is None else os.fspath(data_dir), batch_size, image_size, channels,
      process_index, process_count, crop_pct, split, validation, num_examples)).load()
  workers = default_workers() if num_workers is None else num_workers
  return _prefetched(builder, 0, num_eval_batches(len(builder), batch_size, process_count),
                     workers, prefetch, _worker_kind(worker_kind, workers))
