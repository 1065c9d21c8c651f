"""Input pipeline: tfds data sets -> deterministic, resumable, per-host batches of numpy arrays.

Data sets (by tfds name): fashion_mnist (the offline default), cifar10, cifar100, imagenette,
imagenet2012 ('imagenette/320px-v2'-style names pick a tfds config). Splits are 'train' and 'test';
imagenette and imagenet2012 read their 'validation' split as 'test'.

Design decisions:
* **Preparation is explicit and never hangs on the network.** `prepare()` returns at once if the data
  is already prepared. Fashion-MNIST is built offline from Debian's `dataset-fashion-mnist` files by our
  own builder (`LocalFashionMNIST`: tfds's `fashion_mnist` builder, same name, version and features,
  with its download step replaced by reading the local idx files), so the result is exactly what
  `tfds build fashion_mnist` writes, and plain `tfds.load` reads it too. Other data sets are downloaded
  only when asked (`download=True` or MODERNIZE_DATA_DOWNLOAD=1); imagenet2012 is built from the
  manual-download tars. When data is missing, `DatasetUnavailable` says in one line how to get it.
* **Index-based sampling, not a streaming tf.data graph.** The global training stream is a pure
  function of the seed: position g (= step * global_batch + offset) holds example
  permutation(seed, g // N)[g % N], and every random augmentation of that example is drawn from a
  counter-based hash keyed by (seed, g) (see `augment.py`). Hence a batch is a pure function of
  (data set, seed, step, process_index, process_count, augmentation config); `start_step=s` computes
  step s directly, with no replay of the skipped steps' reads or augmentations; epochs roll over forever
  (batches may straddle an epoch boundary; every example is seen once per epoch); host p of P reads
  rows [p * B, (p + 1) * B) of each global batch of P * B, so hosts are disjoint and the stream by
  global position does not depend on the host count. tf.data could do the same with stateless ops, but
  resuming a tf.data stream means skipping through it, random access to records is not what it is for,
  and a numpy pipeline keeps TensorFlow off the training path (it is used only to prepare data and to
  read the small data sets once).
* **Storage.** Small data sets (fashion_mnist, cifar) are decoded once into uint8 numpy arrays in
  memory (and cached as .npy files in the tfds version directory, so later runs skip the decoding).
  Large ones (imagenette, imagenet2012) are read by random access through `tfds.data_source`, which
  needs the array_record file format: `prepare` builds them that way; a tfrecord copy must be converted
  (`tfds convert_format`; the error says how). JPEGs are decoded and crop-resized with PIL (bicubic,
  antialiased, as timm / torchvision do), which releases the GIL.
* **Transforms.** Train: random-resized-crop (or resize + pad-and-crop for small images), flip,
  RandAugment on uint8, normalise, Random Erasing; eval: resize the shorter side to
  image_size / crop_pct, centre crop (crop_pct 0.875 for the ImageNet-like sets, 1.0 for small ones),
  normalise. Grayscale images are augmented on one channel and replicated to `channels=3` after
  normalisation; RGB images fed to a 1-channel model are converted to luma.
* **Parallelism.** Each batch is one task; `num_workers` threads compute whole batches ahead of the
  consumer (`prefetch` extra), so the consumer overlaps with augmentation. numpy (large arrays) and
  PIL release the GIL. Defaults: workers = half the cores (1 on a 2-core machine, so the trainer keeps
  the other), TensorFlow limited to MODERNIZE_TF_THREADS (2) threads and kept off GPUs.
* **Several hosts** each call the same functions with their process_index; on a shared data dir,
  prepare the data once (e.g. on process 0, then a barrier) before the others read it.
* **Eval is exact on any device count.** Global eval batch k covers test positions
  [k * P * B, (k + 1) * P * B); every host yields the same number of batches; rows past the end of the
  split are zeros with mask False.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import io
import os
import threading
from typing import Any, Callable, Iterator

import numpy as np

from experiments import augment as aug
from experiments.augment import AugmentConfig

__all__ = [
    'AugmentConfig', 'DataInfo', 'DatasetUnavailable', 'DATASETS', 'configure_tensorflow',
    'default_data_dir', 'eval_batches', 'info', 'load_arrays', 'make_fake_dataset',
    'num_eval_batches', 'prepare', 'read_idx', 'train_batches', 'train_indices',
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class DatasetUnavailable(Exception):
  """The data set is not prepared here and cannot be prepared now; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  counts: tuple[int, int]            # train / test examples (for info() before preparation)
  shape: tuple                       # (H, W, C) as stored; None for variable sizes
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str = 'test'
  large: bool = False                # JPEGs read by random access (vs. arrays in memory)
  default_size: int | None = None    # model input size when image_size is not given


DATASETS: dict[str, _Spec] = {
    # Fashion-MNIST mean / std are those of the training images (checked in tests).
    'fashion_mnist': _Spec(10, (60000, 10000), (28, 28, 1), (0.2860,), (0.3530,)),
    'cifar10': _Spec(10, (50000, 10000), (32, 32, 3), (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616)),
    'cifar100': _Spec(100, (50000, 10000), (32, 32, 3), (0.5071, 0.4865, 0.4409),
                      (0.2673, 0.2564, 0.2762)),
    'imagenette': _Spec(10, (9469, 3925), (None, None, 3), IMAGENET_MEAN, IMAGENET_STD,
                        test_split='validation', large=True, default_size=224),
    'imagenet2012': _Spec(1000, (1281167, 50000), (None, None, 3), IMAGENET_MEAN, IMAGENET_STD,
                          test_split='validation', large=True, default_size=224),
}


@dataclasses.dataclass(frozen=True)
class DataInfo:
  name: str
  num_classes: int
  num_train: int
  num_test: int
  image_shape: tuple        # (H, W, C) as stored; H, W None when sizes vary (JPEG data sets)
  mean: tuple[float, ...]   # per stored channel, on [0, 1] pixel values
  std: tuple[float, ...]

  @property
  def large(self) -> bool:
    return DATASETS[_base(self.name)].large


def _base(name: str) -> str:
  base = name.split('/')[0].split(':')[0]
  if base not in DATASETS:
    raise ValueError(f'unknown data set {name!r}; known: {sorted(DATASETS)}')
  return base


def _split_name(name: str, split: str) -> str:
  if split not in ('train', 'test'):
    raise ValueError(f'split must be train or test, not {split!r}')
  return 'train' if split == 'train' else DATASETS[_base(name)].test_split


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


# --- TensorFlow / tfds ----------------------------------------------------------------------------

_TF_LOCK = threading.Lock()
_TF_CONFIGURED = False


def configure_tensorflow(threads: int | None = None) -> None:
  """Keeps TensorFlow off GPUs and limits its thread pools; call before anything else touches TF.

  threads: intra- and inter-op threads (default $MODERNIZE_TF_THREADS or 2). Idempotent; if TF was
  already initialised by someone else, the settings it refuses are left as they are.
  """
  global _TF_CONFIGURED
  with _TF_LOCK:
    if _TF_CONFIGURED:
      return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # TF only reads records here; its oneDNN notice is the one line it would still print.
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    threads = threads or int(os.environ.get('MODERNIZE_TF_THREADS', '2'))
    for setter in (lambda: tf.config.set_visible_devices([], 'GPU'),
                   lambda: tf.config.threading.set_intra_op_parallelism_threads(threads),
                   lambda: tf.config.threading.set_inter_op_parallelism_threads(threads)):
      try:
        setter()
      except (RuntimeError, ValueError):  # TF already initialised: keep its settings
        pass
    _TF_CONFIGURED = True


def _tfds():
  configure_tensorflow()
  try:
    import importlib_resources  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    # tfds 4.9 uses the importlib_resources backport (without declaring it) to locate a builder's
    # code, e.g. in every download_and_prepare. The standard library's importlib.resources has the
    # same API on Python >= 3.11.
    import importlib.resources  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    sys.modules.setdefault('importlib_resources', importlib.resources)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tfds


def _builder(name: str, data_dir: str):
  return _tfds().builder(name, data_dir=data_dir)


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(os.fspath(builder.data_path), 'dataset_info.json'))


def _random_access_ok(builder) -> bool:
  tfds = _tfds()
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  return bool(set(formats) & set(tfds.core.file_adapters.FileFormat.with_random_access()))


# --- Fashion-MNIST from Debian's files ------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) idx file of unsigned bytes (MNIST's format)."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path}: not an idx file of unsigned bytes')
  ndim = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(dims)):
    raise ValueError(f'{path}: {array.size} values for shape {dims}')
  return array.reshape(dims)


_LOCAL_FASHION_CLS = None


def _local_fashion_mnist_cls():
  """tfds's fashion_mnist builder with the download replaced by reading local idx files."""
  global _LOCAL_FASHION_CLS
  if _LOCAL_FASHION_CLS is None:
    tfds = _tfds()
    from tensorflow_datasets.image_classification import mnist  # pylint: disable=import-outside-toplevel

    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
      """Writes the same data set as tfds's fashion_mnist (name, version, features) from local files."""
      name = 'fashion_mnist'
      # tfds locates checksums / metadata beside the builder's module: use tfds's own.
      code_path = mnist.FashionMNIST.code_path

      def __init__(self, *, source_dir: str, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_local(split) for split in FASHION_MNIST_FILES}

      def _generate_local(self, split):
        image_file, label_file = FASHION_MNIST_FILES[split]
        images = read_idx(os.path.join(self._source_dir, image_file))
        labels = read_idx(os.path.join(self._source_dir, label_file))
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
          raise ValueError(f'unexpected Fashion-MNIST {split} files: {images.shape}, {labels.shape}')
        for index in range(len(labels)):
          yield index, {'image': images[index][..., None], 'label': int(labels[index])}

    del tfds
    _LOCAL_FASHION_CLS = LocalFashionMNIST
  return _LOCAL_FASHION_CLS


# --- preparation ----------------------------------------------------------------------------------

def _download_allowed(download: bool | None) -> bool:
  if download is not None:
    return download
  return os.environ.get('MODERNIZE_DATA_DOWNLOAD', '') not in ('', '0', 'false', 'False')


def _unreachable_host(builder, timeout: float = 5.0) -> str | None:
  """A reason why the first download host of `builder` cannot be reached, or None."""
  import socket  # pylint: disable=import-outside-toplevel
  import urllib.parse  # pylint: disable=import-outside-toplevel
  try:
    urls = list(type(builder).url_infos or {})
  except Exception:  # pylint: disable=broad-except  # no checksums file: let tfds try
    return None
  if not urls:
    return None
  url = urllib.parse.urlsplit(urls[0])
  port = url.port or (443 if url.scheme == 'https' else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout).close()
  except OSError as e:
    return f'{url.hostname}:{port} unreachable: {e}'
  return None


def prepare(name: str, data_dir: str | os.PathLike | None = None, *, download: bool | None = None,
            manual_dir: str | os.PathLike | None = None,
            source_dir: str | os.PathLike | None = None) -> str:
  """Makes sure `name` is prepared in `data_dir`; returns the prepared version directory.

  Idempotent: returns at once if the data is there. fashion_mnist is built from Debian's files
  (`source_dir`, default /usr/share/datasets/fashion-mnist) with no network. imagenet2012 is built from
  the tars in `manual_dir` (default DATA_DIR/downloads/manual). Other data sets are downloaded by tfds
  only if `download` (default: $MODERNIZE_DATA_DOWNLOAD). Raises DatasetUnavailable otherwise.
  """
  base = _base(name)
  spec = DATASETS[base]
  data_dir = default_data_dir(data_dir)
  builder = _builder(name, data_dir)
  path = os.fspath(builder.data_path)
  if _is_prepared(builder):
    if spec.large and not _random_access_ok(builder):
      raise DatasetUnavailable(
          f'{name} in {path} is stored as {builder.info.file_format.value}, but this pipeline needs '
          f'random access: run `tfds convert_format --dataset_version_dir={path} '
          '--out_file_format=array_record`')
    return path

  if base == 'fashion_mnist':
    source = os.fspath(source_dir or os.environ.get('MODERNIZE_FASHION_MNIST_DIR')
                       or FASHION_MNIST_DEBIAN_DIR)
    missing = [f for files in FASHION_MNIST_FILES.values() for f in files
               if not os.path.exists(os.path.join(source, f))]
    if missing:
      raise DatasetUnavailable(
          f'fashion_mnist: {os.path.join(source, missing[0])} is missing: run '
          '`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), then try again')
    _local_fashion_mnist_cls()(source_dir=source, data_dir=data_dir).download_and_prepare(
        file_format='tfrecord')
    return path

  tfds = _tfds()
  file_format = 'array_record' if spec.large else 'tfrecord'
  if base == 'imagenet2012':
    manual = os.fspath(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
    if not all(os.path.exists(os.path.join(manual, t)) for t in IMAGENET_TARS):
      raise DatasetUnavailable(
          f'imagenet2012: put {" and ".join(IMAGENET_TARS)} (from image-net.org) in {manual}, then '
          f'run `python -m experiments.data prepare imagenet2012 --data-dir {data_dir}`')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual), file_format=file_format)
    return path

  how = (f'on a machine with internet run `python -m experiments.data prepare {name} --download '
         f'--data-dir DIR` and copy DIR/{name.split(":")[0]} to {data_dir}')
  if not _download_allowed(download):
    raise DatasetUnavailable(f'{name} is not prepared in {data_dir}: {how}')
  unreachable = _unreachable_host(builder)
  if unreachable:  # tfds would retry for minutes
    raise DatasetUnavailable(f'{name}: cannot download ({unreachable}); {how}')
  try:
    builder.download_and_prepare(file_format=file_format)
  except Exception as e:  # network errors come in many types
    raise DatasetUnavailable(f'{name}: download failed ({type(e).__name__}: {e}); {how}') from e
  return path


# --- reading --------------------------------------------------------------------------------------

def info(name: str, data_dir: str | os.PathLike | None = None) -> DataInfo:
  """Facts about a data set; split sizes come from the prepared data when present."""
  base = _base(name)
  spec = DATASETS[base]
  num_train, num_test = spec.counts
  builder = _builder(name, default_data_dir(data_dir))
  if _is_prepared(builder):
    splits = builder.info.splits
    num_train = splits['train'].num_examples
    num_test = splits[spec.test_split].num_examples
  return DataInfo(name, spec.num_classes, num_train, num_test, spec.shape, spec.mean, spec.std)


_CACHE_LOCK = threading.Lock()
_ARRAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None,
                prepare_if_needed: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A small data set's split, whole: (images (N, H, W, C) uint8, labels (N,) int32), stored order.

  Kept in memory per process, and cached as .npy files in the tfds version directory.
  """
  base = _base(name)
  if DATASETS[base].large:
    raise ValueError(f'{name} is read by random access, not loaded whole')
  data_dir = default_data_dir(data_dir)
  key = (name, os.path.abspath(data_dir), split)
  with _CACHE_LOCK:
    if key in _ARRAYS:
      return _ARRAYS[key]
    path = prepare(name, data_dir) if prepare_if_needed else os.fspath(
        _builder(name, data_dir).data_path)
    tfds_split = _split_name(name, split)
    cache_dir = os.path.join(path, 'modernize_cache')
    image_file = os.path.join(cache_dir, f'{tfds_split}-images.npy')
    label_file = os.path.join(cache_dir, f'{tfds_split}-labels.npy')
    if os.path.exists(image_file) and os.path.exists(label_file):
      images, labels = np.load(image_file), np.load(label_file)
    else:
      images, labels = _read_split(name, data_dir, tfds_split)
      _save_cache(cache_dir, {image_file: images, label_file: labels})
    _ARRAYS[key] = (images, labels)
    return images, labels


def _read_split(name: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  tfds = _tfds()
  builder = _builder(name, data_dir)
  if _random_access_ok(builder):
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(list(range(len(source))))
    images = np.stack([np.asarray(e['image'], np.uint8) for e in examples])
    labels = np.array([e['label'] for e in examples], np.int32)
  else:
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = np.asarray(arrays['image'], np.uint8), np.asarray(arrays['label'], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  return images, labels


def _save_cache(cache_dir: str, arrays: dict[str, np.ndarray]) -> None:
  if '://' in cache_dir:
    return
  try:
    os.makedirs(cache_dir, exist_ok=True)
    for path, array in arrays.items():
      tmp = f'{path}.tmp{os.getpid()}.npy'
      np.save(tmp, array)
      os.replace(tmp, path)
  except OSError:  # read-only data dir: no cache
    pass


class _RecordSource:
  """Random access to encoded images and labels of a large data set (array_record via tfds)."""

  def __init__(self, name: str, data_dir: str, split: str):
    tfds = _tfds()
    prepare(name, data_dir)
    builder = _builder(name, data_dir)
    self._source = builder.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    with self._lock:  # the reader is shared by the worker threads
      examples = self._source.__getitems__([int(i) for i in indices])
    return [e['image'] for e in examples], np.array([e['label'] for e in examples], np.int32)


_RECORD_SOURCES: dict[tuple, _RecordSource] = {}


def _record_source(name: str, data_dir: str, split: str) -> _RecordSource:
  key = (name, os.path.abspath(data_dir), split)
  with _CACHE_LOCK:
    if key not in _RECORD_SOURCES:
      _RECORD_SOURCES[key] = _RecordSource(name, data_dir, _split_name(name, split))
    return _RECORD_SOURCES[key]


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

  def finish(self, images: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
    """uint8 (B, S, S, c) -> float32 (B, S, S, channels): [RandAugment,] normalise[, erasing]."""
    a = self.augment
    if keys is not None and a.randaugment_n > 0:
      images = aug.rand_augment(images, keys, a.randaugment_n, a.randaugment_m,
                                a.randaugment_mstd, a.randaugment_prob, fill=self.fill)
    out = images.astype(np.float32)
    out *= (1.0 / (255.0 * self.std)).astype(np.float32)
    out -= (self.mean / self.std).astype(np.float32)
    if keys is not None and a.random_erasing_prob > 0:
      out = aug.random_erasing(out, keys, a.random_erasing_prob, a.erasing_area,
                               a.erasing_min_aspect)
    if self.channels == 3 and out.shape[-1] == 1:
      out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)

  # Small images held in memory.
  def presize(self, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The whole split resized once (the same deterministic resize `train_arrays` would apply to
    every batch) when the crop is not random-resized; else the images unchanged."""
    if self.augment.random_resized_crop or images.shape[1:3] == (self.image_size,) * 2:
      return images
    return np.concatenate([aug.resize(images[i:i + chunk], self.image_size)
                           for i in range(0, len(images), chunk)])

  def train_arrays(self, images: np.ndarray, keys: np.ndarray) -> np.ndarray:
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
    return self.finish(self.working(aug.resize(images, self.image_size, self.crop_pct)), None)

  # Encoded images (JPEG) of any size.
  def _decode(self, blobs: list[bytes], box_fn) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    s = self.image_size
    opened = [Image.open(io.BytesIO(b)) for b in blobs]
    sizes = np.array([im.size for im in opened], np.float64).reshape(-1, 2)  # (width, height)
    boxes = box_fn(sizes[:, 1], sizes[:, 0])                                  # (top, left, h, w)
    out = np.empty((len(blobs), s, s, 3), np.uint8)
    for i, im in enumerate(opened):
      top, left, bh, bw = boxes[i]
      im = im.convert('RGB')
      out[i] = np.asarray(im.resize((s, s), Image.BICUBIC, box=(left, top, left + bw, top + bh)))
    return out

  def train_encoded(self, blobs: list[bytes], keys: np.ndarray) -> np.ndarray:
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
    return self.finish(self.working(self._decode(blobs, box_fn)), None)


def _make_transform(name: str, image_size: int | None, channels: int | None,
                    crop_pct: float | None, augment: AugmentConfig | None) -> _Transform:
  spec = DATASETS[_base(name)]
  stored = spec.shape[2]
  channels = channels or stored
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, not {channels}')
  size = image_size or spec.default_size or spec.shape[0]
  mean, std = np.array(spec.mean, np.float64), np.array(spec.std, np.float64)
  if channels == 1 and stored == 3:  # luma of the statistics (the std is an approximation)
    weights = np.array([0.299, 0.587, 0.114])
    mean, std = np.array([mean @ weights]), np.array([std @ weights])
  if crop_pct is None:
    crop_pct = 0.875 if spec.large else 1.0
  return _Transform(size, stored, channels, mean, std, crop_pct, augment or AugmentConfig())


# --- iterators ------------------------------------------------------------------------------------

def _default_workers() -> int:
  env = os.environ.get('MODERNIZE_DATA_WORKERS')
  if env:
    return int(env)
  return max(1, min(32, (os.cpu_count() or 2) // 2))


def _prefetched(fn: Callable[[int], Any], start: int, stop: int | None, num_workers: int,
                prefetch: int) -> Iterator[Any]:
  """fn(start), fn(start + 1), ... computed by `num_workers` threads, `prefetch` extra ahead."""
  if num_workers <= 0:
    k = start
    while stop is None or k < stop:
      yield fn(k)
      k += 1
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


def _subset(size: int, num_examples: int | None) -> int:
  if num_examples is None or num_examples <= 0:
    return size
  return min(size, int(num_examples))


def train_batches(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int,
                  image_size: int | None = None, channels: int | None = None, seed: int = 0,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  augment: AugmentConfig | None = None, num_examples: int | None = None,
                  num_workers: int | None = None,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches for this host, from step `start_step` on.

  Yields {'image': float32 (batch_size, image_size, image_size, channels) normalised,
  'label': int32 (batch_size,)}. `batch_size` is per host; the global batch is
  batch_size * process_count. A pure function of (name, seed, step, process_index, process_count,
  augment[, num_examples]): `start_step=s` yields exactly what an unbroken iterator yields from step s
  on. num_examples: train on the first num_examples of the split only (smoke runs); None = all.
  num_workers: batch-building threads (None: half the cores; 0: synchronous); prefetch: batches
  computed ahead beyond one per worker. Loading happens now (DatasetUnavailable is raised here).
  """
  data_dir = default_data_dir(data_dir)
  transform = _make_transform(name, image_size, channels, None, augment)
  if batch_size <= 0 or start_step < 0:
    raise ValueError(f'need batch_size > 0 and start_step >= 0, not {batch_size}, {start_step}')
  _positions(0, batch_size, process_index, process_count)  # validates the host arguments
  spec = DATASETS[_base(name)]

  if spec.large:
    source = _record_source(name, data_dir, 'train')
    n = _subset(len(source), num_examples)
    perms = _Permutations(seed, n)

    def batch(step: int) -> dict[str, np.ndarray]:
      positions = _positions(step, batch_size, process_index, process_count)
      blobs, labels = source.read(_indices_at(positions, n, perms))
      keys = aug.example_keys(seed, positions)
      return {'image': transform.train_encoded(blobs, keys), 'label': labels}
  else:
    images, labels = load_arrays(name, 'train', data_dir)
    n = _subset(len(labels), num_examples)
    images = transform.presize(images[:n])   # once, instead of in every batch
    perms = _Permutations(seed, n)

    def batch(step: int) -> dict[str, np.ndarray]:
      positions = _positions(step, batch_size, process_index, process_count)
      idx = _indices_at(positions, n, perms)
      keys = aug.example_keys(seed, positions)
      return {'image': transform.train_arrays(images[idx], keys), 'label': labels[idx]}

  workers = _default_workers() if num_workers is None else num_workers
  return _prefetched(batch, start_step, None, workers, prefetch)


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
  return -(-num_examples // (batch_size * process_count))


def eval_batches(name: str, *, data_dir: str | os.PathLike | None = None, batch_size: int,
                 image_size: int | None = None, channels: int | None = None,
                 process_index: int = 0, process_count: int = 1, crop_pct: float | None = None,
                 num_examples: int | None = None, num_workers: int | None = None,
                 prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This host's share of the whole test split, in order, ceil(N / (batch_size * process_count))
  batches on every host. Yields 'image', 'label' and 'mask' (bool (batch_size,), False on padding).

  crop_pct: eval centre crop (default 0.875 for imagenette / imagenet2012, 1.0 otherwise).
  num_examples: evaluate the first num_examples of the split only (smoke runs); None = all.
  """
  data_dir = default_data_dir(data_dir)
  transform = _make_transform(name, image_size, channels, crop_pct, None)
  if batch_size <= 0:
    raise ValueError('batch_size must be positive')
  spec = DATASETS[_base(name)]
  s, c = transform.image_size, transform.channels

  if spec.large:
    source = _record_source(name, data_dir, 'test')
    n = _subset(len(source), num_examples)

    def compute(idx: np.ndarray):
      blobs, labels = source.read(idx)
      return transform.eval_encoded(blobs), labels
  else:
    images, labels_all = load_arrays(name, 'test', data_dir)
    n = _subset(len(labels_all), num_examples)

    def compute(idx: np.ndarray):
      return transform.eval_arrays(images[idx]), labels_all[idx]

  def batch(k: int) -> dict[str, np.ndarray]:
    positions = _positions(k, batch_size, process_index, process_count)
    mask = positions < n
    image = np.zeros((batch_size, s, s, c), np.float32)
    label = np.zeros((batch_size,), np.int32)
    if mask.any():
      image[mask], label[mask] = compute(positions[mask])
    return {'image': image, 'label': label, 'mask': mask}

  workers = _default_workers() if num_workers is None else num_workers
  return _prefetched(batch, 0, num_eval_batches(n, batch_size, process_count), workers, prefetch)


# --- synthetic data in the real on-disk formats (tests, smoke runs) ------------------------------

def make_fake_dataset(name: str, data_dir: str | os.PathLike, *, num_train: int = 40,
                      num_test: int = 24, image_size: tuple[int, int] = (48, 64), seed: int = 0,
                      file_format: str | None = None) -> str:
  """Writes a tiny synthetic `name` with the real tfds builder's name, version, features and files.

  The real builder class is subclassed with its download step replaced by a generator of synthetic
  examples, so the pipeline reads it exactly like the real thing. Images have a class-dependent
  brightness (label k -> mean about 20 + 20 * (k % 10)) so tests can check image/label alignment.
  Large data sets get JPEGs of `image_size` (varied per example) and array_record files.
  """
  base = _base(name)
  spec = DATASETS[base]
  tfds = _tfds()
  data_dir = os.fspath(data_dir)
  real = type(_builder(name, data_dir))
  config = name.split('/')[1].split(':')[0] if '/' in name else None
  test_split = spec.test_split
  rng = np.random.default_rng(seed)
  features = real(data_dir=data_dir, config=config).info.features

  def example(i: int, split: str) -> dict:
    label = int(rng.integers(spec.num_classes))
    if spec.shape[0] is None:
      h = image_size[0] + int(rng.integers(0, 9))
      w = image_size[1] + int(rng.integers(0, 9))
    else:
      h, w = spec.shape[:2]
    level = 20 + 20 * (label % 10)
    image = np.clip(rng.normal(level, 6, (h, w, spec.shape[2])), 0, 255).astype(np.uint8)
    out = {}
    for key, feature in features.items():
      if key == 'image':
        out[key] = image
      elif key == 'label':
        out[key] = label
      elif isinstance(feature, tfds.features.ClassLabel):
        out[key] = int(rng.integers(feature.num_classes))
      else:  # Text ('id', 'file_name')
        out[key] = f'{split}_{i:06d}'
    return out

  class Fake(real, skip_registration=True):
    name = real.name
    code_path = real.code_path  # see LocalFashionMNIST

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._fake('train', num_train), test_split: self._fake(test_split, num_test)}

    def _fake(self, split: str, n: int):
      for i in range(n):
        yield i, example(i, split)

  Fake.__name__ = real.__name__
  builder = Fake(data_dir=data_dir, config=config)
  builder.download_and_prepare(file_format=file_format or
                               ('array_record' if spec.large else 'tfrecord'))
  return os.fspath(builder.data_path)


# --- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description='Prepare or describe a data set.')
  parser.add_argument('command', choices=['prepare', 'info'])
  parser.add_argument('name')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--download', action='store_true', help='allow tfds to download')
  parser.add_argument('--manual-dir', default=None, help='imagenet2012: where the tars are')
  args = parser.parse_args(argv)
  try:
    if args.command == 'prepare':
      print(prepare(args.name, args.data_dir, download=args.download or None,
                    manual_dir=args.manual_dir))
    else:
      print(info(args.name, args.data_dir))
  except DatasetUnavailable as e:
    raise SystemExit(f'DatasetUnavailable: {e}') from None


if __name__ == '__main__':
  main()
