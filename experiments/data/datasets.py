"""Data sets: what each one is, where its examples come from, and preparing it once, safely.

  python -m experiments.data info fashion_mnist
  python -m experiments.data prepare cifar10 --download --data-dir DIR
  python -m experiments.data prepare imagenet2012 --manual-dir ~/imagenet-tars

Names:
* `fashion_mnist`: Debian's `dataset-fashion-mnist` idx files in /usr/share/datasets/fashion-mnist,
  or the same four files in the directory $MODERNIZE_FASHION_MNIST_DIR names, read with numpy
  alone. Nothing to prepare, nothing written, no TensorFlow.
* `folder:PATH`: your own images in the ImageFolder layout, PATH/train/<class>/*.{png,jpg,jpeg} and
  PATH/test/<class>/*. Classes are the train split's sub-directories sorted by name (label = index);
  one channel when every image is grayscale, else three; images are decoded per batch (PIL) and
  resized to the run's image size, so any sizes mix. The mean / std are measured on (up to 2,000,
  evenly spaced) training images. Nothing to prepare, no TensorFlow.
* `cifar10`, `cifar100`, `imagenette[/CONFIG]`, `imagenet2012`, each with an optional tfds
  `:VERSION` (e.g. `cifar10:3.0.2`): tensorflow-datasets. Preparing one
  (downloading, or imagenet2012 from its manual tars) needs TensorFlow once; it is written as
  ArrayRecord files, which are then read by random access (`tfds.data_source`) without TensorFlow.
  Imagenette and ImageNet read their 'validation' split as 'test'.

Splits are 'train', 'test' and, with `validation=N` (> 0), 'validation': N training examples held
out of 'train' (see `split_indices`).

Preparation is idempotent, atomic and safe under concurrency: `prepare` takes an exclusive file lock
(DATA_DIR/.NAME.prepare.lock) and checks again under it, so processes (or hosts on a shared data
dir) preparing at once all end well, one of them doing the work. A multi-host trainer also lets
process 0 prepare first and holds the others at a barrier (experiments.train). A data dir on gs://
is read from, never prepared into (an object store has no file locks): copy a data set prepared
elsewhere there; its ArrayRecord files are read through array_record's own GCS reader.

Small data sets are held whole in memory as uint8 arrays (`load_arrays`); large ones and image
folders are read by index as encoded images (`record_source`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gzip
import io
import os
import re
import sys
import threading

import numpy as np

from experiments import outputs
from experiments.cli import ArgumentParser, UsageError, guarded

__all__ = [
    'DataInfo', 'DatasetUnavailable', 'DATASETS', 'FASHION_MNIST_FILES', 'default_data_dir',
    'fashion_mnist_dir', 'info', 'load_arrays', 'make_fake_dataset', 'prepare', 'read_idx',
    'record_source', 'split_indices', 'validate_name',
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
FOLDER_PREFIX = 'folder:'
# The held-out validation examples are the last N of one fixed shuffle of the training split: the
# same for every run and seed, and not all of one class when the stored order is sorted by class.
_VALIDATION_KEY = 20220110   # the paper's arXiv date


class DatasetUnavailable(UsageError):
  """The data set is not here and cannot be prepared now; the message says how to get it (an
  expected failure: one line, exit code 2)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  num_classes: int
  counts: tuple[int, int]            # train / test examples (for info() before preparation)
  shape: tuple                       # (H, W, C) as stored; H, W None for varying sizes
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str = 'test'
  large: bool = False                # encoded images read by index (vs. arrays in memory)
  default_size: int | None = None    # model input size when image_size is not given
  configs: tuple[str, ...] = ()      # tfds builder configs (NAME/CONFIG)


DATASETS: dict[str, _Spec] = {
    # Fashion-MNIST mean / std are those of the training images (checked in tests).
    'fashion_mnist': _Spec(10, (60000, 10000), (28, 28, 1), (0.2860,), (0.3530,)),
    'cifar10': _Spec(10, (50000, 10000), (32, 32, 3), (0.4914, 0.4822, 0.4465),
                     (0.2470, 0.2435, 0.2616)),
    'cifar100': _Spec(100, (50000, 10000), (32, 32, 3), (0.5071, 0.4865, 0.4409),
                      (0.2673, 0.2564, 0.2762)),
    'imagenette': _Spec(10, (9469, 3925), (None, None, 3), IMAGENET_MEAN, IMAGENET_STD,
                        test_split='validation', large=True, default_size=224,
                        configs=tuple(f'{size}{v2}' for v2 in ('-v2', '')
                                      for size in ('full-size', '320px', '160px'))),
    'imagenet2012': _Spec(1000, (1281167, 50000), (None, None, 3), IMAGENET_MEAN, IMAGENET_STD,
                          test_split='validation', large=True, default_size=224),
}
_TFDS_NAMES = ('cifar10', 'cifar100', 'imagenette', 'imagenet2012')
_TFDS_VERSION = re.compile(r'(\d+|\*)\.(\d+|\*)\.(\d+|\*)')


@dataclasses.dataclass(frozen=True)
class DataInfo:
  name: str
  num_classes: int
  num_train: int            # the whole train split (before any validation hold-out)
  num_test: int
  image_shape: tuple        # (H, W, C) as stored; H, W None when sizes vary
  mean: tuple[float, ...]   # per stored channel, on [0, 1] pixel values
  std: tuple[float, ...]
  large: bool = False       # encoded images read by index (`record_source`), not `load_arrays`
  default_size: int | None = None
  classes: tuple[str, ...] = ()

  @property
  def channels(self) -> int:
    return self.image_shape[2]


def _is_folder(name: str) -> bool:
  return name.startswith(FOLDER_PREFIX)


def _name_problem(base: str, config: str | None, version: str | None) -> str | None:
  """What is wrong with NAME[/CONFIG][:VERSION] (None and None: that part is absent)."""
  if base not in DATASETS:
    return f'known: {sorted(DATASETS)} or folder:PATH'
  if base not in _TFDS_NAMES and (config is not None or version is not None):
    return f'{base} is read from its own files and takes no /CONFIG or :VERSION'
  configs = DATASETS[base].configs
  if config is not None and config not in configs:
    return f'configs of {base}: {list(configs)}' if configs else f'{base} has no configs'
  if version is not None and not _TFDS_VERSION.fullmatch(version):
    return 'a tfds version looks like 3.0.2'
  return None


def _base(name: str) -> str:
  """The data set of `name` (NAME[/CONFIG][:VERSION] or folder:PATH); ValueError, one line listing
  what is known, for a name that is none of them."""
  if _is_folder(name):
    return 'folder'
  rest, has_version, version = name.partition(':')
  base, has_config, config = rest.partition('/')
  problem = _name_problem(base, config if has_config else None, version if has_version else None)
  if problem:
    raise ValueError(f'unknown data set {name!r}; {problem}')
  return base


def validate_name(name: str) -> None:
  """ValueError (one line) for a name that is neither a known data set nor folder:PATH."""
  if _is_folder(name) and not name[len(FOLDER_PREFIX):]:
    raise ValueError('data=folder:PATH needs a path')
  _base(name)


def _tfds_split(name: str, split: str) -> str:
  if split not in ('train', 'test'):
    raise ValueError(f'split must be train or test, not {split!r}')
  return 'train' if split == 'train' else DATASETS[_base(name)].test_split


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds data sets only)."""
  if data_dir:
    return os.fspath(data_dir)
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def split_indices(num_train: int, validation: int) -> tuple[np.ndarray, np.ndarray]:
  """(training indices, validation indices) of a train split of `num_train` examples with
  `validation` held out: disjoint, together all of them, each sorted, the same on every call."""
  if validation <= 0:
    return np.arange(num_train, dtype=np.int64), np.zeros((0,), np.int64)
  if validation >= num_train:
    raise ValueError(f'validation={validation} must be smaller than the {num_train} training '
                     'examples')
  order = np.random.default_rng(_VALIDATION_KEY).permutation(num_train)
  return np.sort(order[:num_train - validation]), np.sort(order[num_train - validation:])


# --- locking --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _exclusive(lock_path: str):
  """An exclusive advisory lock held for the block (processes on one machine, or on a shared file
  system that supports flock)."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _prepare_lock(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, f'.{name.replace("/", "_").replace(":", "_")}.prepare.lock')


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


def fashion_mnist_dir(source_dir: str | os.PathLike | None = None) -> str:
  """Where the idx files are: `source_dir`, $MODERNIZE_FASHION_MNIST_DIR, or Debian's directory;
  DatasetUnavailable (saying how to install them) when a file is missing."""
  source = os.fspath(source_dir or os.environ.get('MODERNIZE_FASHION_MNIST_DIR')
                     or FASHION_MNIST_DEBIAN_DIR)
  for files in FASHION_MNIST_FILES.values():
    for f in files:
      if not os.path.exists(os.path.join(source, f)):
        raise DatasetUnavailable(
            f'fashion_mnist: {os.path.join(source, f)} is missing: run `apt-get install '
            'dataset-fashion-mnist` (Debian/Ubuntu) or set MODERNIZE_FASHION_MNIST_DIR to a '
            'directory with the four idx files')
  return source


def _read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
  source = fashion_mnist_dir()
  image_file, label_file = FASHION_MNIST_FILES[split]
  try:
    images = read_idx(os.path.join(source, image_file))
    labels = read_idx(os.path.join(source, label_file))
  except (OSError, EOFError, ValueError) as e:
    raise DatasetUnavailable(f'fashion_mnist: cannot read {source}: {e}') from None
  if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
    raise DatasetUnavailable(f'fashion_mnist: unexpected {split} files in {source}: images '
                             f'{images.shape}, labels {labels.shape}')
  return np.ascontiguousarray(images[..., None]), labels.astype(np.int32)


# --- image folders --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Folder:
  root: str
  classes: tuple[str, ...]
  files: dict            # split -> list of paths
  labels: dict           # split -> int32 array
  channels: int
  shape: tuple           # (H, W) when every image has it, else (None, None)


_FOLDERS: dict[str, _Folder] = {}
_FOLDER_LOCK = threading.Lock()


def _image_files(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


def _folder(name: str) -> _Folder:
  """Scans folder:PATH once per process (file lists, classes, image modes and sizes)."""
  root = os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):]))
  with _FOLDER_LOCK:
    if root in _FOLDERS:
      return _FOLDERS[root]
  from PIL import Image  # pylint: disable=import-outside-toplevel
  where = f'data=folder:{root}'
  if not os.path.isdir(root):
    raise DatasetUnavailable(f'{where}: no such directory')
  split_dirs = {}
  for split in ('train', 'test'):
    split_dirs[split] = os.path.join(root, split)
    if not os.path.isdir(split_dirs[split]):
      raise DatasetUnavailable(f'{where}: the {split} split is missing (expected '
                               f'{split_dirs[split]}/<class>/*.png|jpg|jpeg)')
  classes = tuple(sorted(d for d in os.listdir(split_dirs['train'])
                         if os.path.isdir(os.path.join(split_dirs['train'], d))))
  if not classes:
    raise DatasetUnavailable(f'{where}: no class directories in {split_dirs["train"]}')
  files, labels, modes, sizes = {}, {}, set(), set()
  for split, directory in split_dirs.items():
    present = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    unknown = sorted(set(present) - set(classes))
    if unknown:
      raise DatasetUnavailable(f'{where}: {split} has class {unknown[0]!r}, which train has not')
    files[split], split_labels = [], []
    for label, cls in enumerate(classes):
      class_dir = os.path.join(directory, cls)
      found = _image_files(class_dir) if os.path.isdir(class_dir) else []
      if not found and split == 'train':
        raise DatasetUnavailable(f'{where}: class {cls!r} has no .png/.jpg/.jpeg images in '
                                 f'{class_dir}')
      files[split] += found
      split_labels += [label] * len(found)
    if not files[split]:
      raise DatasetUnavailable(f'{where}: the {split} split has no images')
    labels[split] = np.array(split_labels, np.int32)
    for path in files[split]:
      try:
        with Image.open(path) as im:   # reads the header only
          modes.add(im.mode)
          sizes.add(im.size)
      except (OSError, ValueError, SyntaxError) as e:
        raise DatasetUnavailable(f'{where}: cannot read image {path}: {e}') from None
  gray = modes <= {'1', 'L', 'LA', 'I', 'I;16', 'F'}
  shape = tuple(reversed(next(iter(sizes)))) if len(sizes) == 1 else (None, None)
  folder = _Folder(root, classes, files, labels, 1 if gray else 3, shape)
  with _FOLDER_LOCK:
    _FOLDERS[root] = folder
  return folder


def to_mode(im, channels: int):
  """A PIL image as 8-bit L (channels 1) or RGB; 16-bit and float grayscale are scaled to 8 bits."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if im.mode in ('I', 'I;16', 'F'):
    array = np.asarray(im, np.float64)
    top = 65535.0 if im.mode != 'F' and array.max() > 255 else 255.0
    im = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8))
  return im.convert('L' if channels == 1 else 'RGB')


def _decode_file(path: str, channels: int):
  """A PIL image of `path` in mode L or RGB; DatasetUnavailable naming the file if unreadable."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as im:
      return to_mode(im, channels)
  except (OSError, ValueError, SyntaxError) as e:
    raise DatasetUnavailable(f'cannot read image {path}: {e}') from None


_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _folder_statistics(folder: _Folder, max_images: int = 2000) -> tuple[tuple, tuple]:
  """Per-channel mean and std of the pixels of up to `max_images` evenly spaced training images."""
  with _FOLDER_LOCK:
    if folder.root in _STATS:
      return _STATS[folder.root]
  paths = folder.files['train']
  picks = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), max_images)).astype(int))
  total = np.zeros(folder.channels)
  total_sq = np.zeros(folder.channels)
  count = 0
  for i in picks:
    pixels = np.asarray(_decode_file(paths[i], folder.channels), np.float64).reshape(
        -1, folder.channels) / 255.0
    total += pixels.sum(0)
    total_sq += (pixels ** 2).sum(0)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
  stats = (tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std))
  with _FOLDER_LOCK:
    _STATS[folder.root] = stats
  return stats


class _FileSource:
  """Random access to an image folder's split: encoded bytes read from disk."""

  def __init__(self, folder: _Folder, split: str):
    self._files = folder.files[split]
    self._labels = folder.labels[split]

  def __len__(self) -> int:
    return len(self._files)

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    blobs = []
    for i in indices:
      with open(self._files[int(i)], 'rb') as f:
        blobs.append(f.read())
    return blobs, self._labels[np.asarray(indices, np.int64)]

  def name(self, index: int) -> str:
    return self._files[int(index)]


# --- TensorFlow / tfds (preparation only; reading needs neither) ----------------------------------

_TF_LOCK = threading.Lock()
_TF_CONFIGURED = False


def configure_tensorflow(threads: int | None = None) -> None:
  """Keeps TensorFlow off GPUs and limits its thread pools (only where TF is needed: preparing
  tfds data sets). threads: default $MODERNIZE_TF_THREADS or 2. Idempotent."""
  global _TF_CONFIGURED
  with _TF_LOCK:
    if _TF_CONFIGURED:
      return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DatasetUnavailable(
          'preparing a tfds data set needs TensorFlow: pip install "modernize[data]" (reading a '
          'prepared one does not)') from None
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
  """tensorflow_datasets, imported without TensorFlow; DatasetUnavailable if not installed."""
  if 'importlib_resources' not in sys.modules:
    try:
      # Imported to see whether it can be.
      import importlib_resources  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      # tfds 4.9 uses the importlib_resources backport (without declaring it) to locate a
      # builder's code; the standard library's module has the same API on Python >= 3.11.
      import importlib.resources  # pylint: disable=import-outside-toplevel
      sys.modules.setdefault('importlib_resources', importlib.resources)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DatasetUnavailable('this data set is read through tensorflow-datasets: pip install '
                             'tensorflow-datasets') from None
  return tfds


def _builder(name: str, data_dir: str):
  try:
    return _tfds().builder(name, data_dir=data_dir)
  except (ValueError, AssertionError) as e:   # tfds's errors for a version it does not have
    if 'Failed to construct dataset' not in str(e):
      raise
    raise DatasetUnavailable(str(e).splitlines()[0]) from None


def _is_prepared(builder) -> bool:
  return (outputs.location(builder.data_path) / 'dataset_info.json').exists()


def _random_access_ok(builder) -> bool:
  tfds = _tfds()
  formats = builder.info.available_file_formats() or {builder.info.file_format}
  return bool(set(formats) & set(tfds.core.file_adapters.FileFormat.with_random_access()))


def _check_random_access(name: str, builder) -> None:
  if not _random_access_ok(builder):
    path = os.fspath(builder.data_path)
    raise DatasetUnavailable(
        f'{name} in {path} is stored as {builder.info.file_format.value}, but it is read by random '
        f'access: run `tfds convert_format --dataset_version_dir={path} '
        '--out_file_format=array_record`')


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


def _prepare_tfds_locked(name: str, data_dir: str, build) -> str:
  """Runs `build(builder)` unless `name` is already prepared, under the data set's lock, so that
  concurrent first-time preparations end with one complete copy and no error."""
  builder = _builder(name, data_dir)
  if not _is_prepared(builder):
    if outputs.is_remote(data_dir):
      raise DatasetUnavailable(
          f'{name} is not prepared in {data_dir}: a bucket is read from, not prepared into; run '
          f'`python -m experiments.data prepare {name} --data-dir DIR` and copy '
          f'DIR/{name.split(":")[0]} to {data_dir} (e.g. gcloud storage cp -r)')
    with _exclusive(_prepare_lock(data_dir, name)):
      builder = _builder(name, data_dir)   # another process may have finished meanwhile
      if not _is_prepared(builder):
        configure_tensorflow()
        build(builder)
        builder = _builder(name, data_dir)
  _check_random_access(name, builder)
  return os.fspath(builder.data_path)


def prepare(name: str, data_dir: str | os.PathLike | None = None, *, download: bool | None = None,
            manual_dir: str | os.PathLike | None = None) -> str:
  """Makes sure `name` can be read; returns where it is read from.

  fashion_mnist and folder:PATH need no preparation (this checks that their files are there).
  tfds data sets are prepared once into `data_dir` as ArrayRecord files, under a file lock:
  imagenet2012 from the tars in `manual_dir` (default DATA_DIR/downloads/manual), the others
  downloaded by tfds only if `download` (default: $MODERNIZE_DATA_DOWNLOAD). Raises
  DatasetUnavailable, saying how to get the data, otherwise.
  """
  try:
    base = _base(name)
  except ValueError as e:
    raise DatasetUnavailable(str(e)) from None
  if base == 'fashion_mnist':
    return fashion_mnist_dir()
  if base == 'folder':
    return _folder(name).root
  data_dir = default_data_dir(data_dir)
  how = (f'on a machine with internet run `python -m experiments.data prepare {name} '
         f'--download --data-dir DIR` and copy DIR/{name.split(":")[0]} to {data_dir}')

  def build(builder):
    tfds = _tfds()
    if base == 'imagenet2012':
      manual = os.fspath(manual_dir or os.path.join(data_dir, 'downloads', 'manual'))
      if not all(os.path.exists(os.path.join(manual, t)) for t in IMAGENET_TARS):
        raise DatasetUnavailable(
            f'imagenet2012: put {" and ".join(IMAGENET_TARS)} (from image-net.org) in {manual}, '
            f'then run `python -m experiments.data prepare imagenet2012 --data-dir {data_dir}`')
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual),
          file_format='array_record')
      return
    if not _download_allowed(download):
      raise DatasetUnavailable(f'{name} is not prepared in {data_dir}: {how}')
    unreachable = _unreachable_host(builder)
    if unreachable:  # tfds would retry for minutes
      raise DatasetUnavailable(f'{name}: cannot download ({unreachable}); {how}')
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # network errors come in many types
      raise DatasetUnavailable(f'{name}: download failed ({type(e).__name__}: {e}); {how}') from e

  return _prepare_tfds_locked(name, data_dir, build)


# --- reading --------------------------------------------------------------------------------------

def info(name: str, data_dir: str | os.PathLike | None = None) -> DataInfo:
  """Facts about a data set; split sizes come from the data when it is there. For folder:PATH this
  scans the folder and measures the training images' mean / std (DatasetUnavailable if unusable)."""
  try:
    base = _base(name)
  except ValueError as e:
    raise DatasetUnavailable(str(e)) from None
  if base == 'folder':
    folder = _folder(name)
    mean, std = _folder_statistics(folder)
    return DataInfo(name, len(folder.classes), len(folder.files['train']),
                    len(folder.files['test']), (*folder.shape, folder.channels), mean, std,
                    large=True, default_size=None, classes=folder.classes)
  spec = DATASETS[base]
  num_train, num_test = spec.counts
  if base == 'fashion_mnist':
    try:   # the files' own counts (e.g. a smaller set in $MODERNIZE_FASHION_MNIST_DIR)
      num_train, num_test = (len(load_arrays(name, split)[1]) for split in ('train', 'test'))
    except DatasetUnavailable:
      pass
  elif base in _TFDS_NAMES:
    try:
      builder = _builder(name, default_data_dir(data_dir))
      if _is_prepared(builder):
        splits = builder.info.splits
        num_train = splits['train'].num_examples
        num_test = splits[spec.test_split].num_examples
    except DatasetUnavailable:   # tfds not installed: the nominal counts
      pass
  return DataInfo(name, spec.num_classes, num_train, num_test, spec.shape, spec.mean, spec.std,
                  large=spec.large, default_size=spec.default_size)


_CACHE_LOCK = threading.Lock()
_ARRAYS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """A small data set's split, whole: (images (N, H, W, C) uint8, labels (N,) int32), stored order.

  Kept in memory per process. tfds sets are also cached as .npy files beside the prepared data.
  """
  base = _base(name)
  if base == 'folder' or DATASETS[base].large:
    raise ValueError(f'{name} is read by index as encoded images, not loaded whole')
  if split not in ('train', 'test'):
    raise ValueError(f'split must be train or test, not {split!r}')
  data_dir = default_data_dir(data_dir)
  source = fashion_mnist_dir() if base == 'fashion_mnist' else str(outputs.location(data_dir))
  key = (name, source, split)
  with _CACHE_LOCK:
    if key not in _ARRAYS:
      if base == 'fashion_mnist':
        _ARRAYS[key] = _read_fashion_mnist(split)
      else:
        _ARRAYS[key] = _load_tfds_arrays(name, split, data_dir)
    return _ARRAYS[key]


def _load_tfds_arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  path = prepare(name, data_dir)
  tfds_split = _tfds_split(name, split)
  cache_dir = outputs.location(path) / 'modernize_cache'
  image_file = cache_dir / f'{tfds_split}-images.npy'
  label_file = cache_dir / f'{tfds_split}-labels.npy'
  if image_file.exists() and label_file.exists():
    return _load_npy(image_file), _load_npy(label_file)
  source = _builder(name, data_dir).as_data_source(split=tfds_split)
  examples = source.__getitems__(list(range(len(source))))
  images = np.stack([np.asarray(e['image'], np.uint8) for e in examples])
  labels = np.array([e['label'] for e in examples], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  _save_cache({image_file: images, label_file: labels})
  return images, labels


def _load_npy(path) -> np.ndarray:
  with path.open('rb') as f:
    return np.load(f)


def _save_cache(arrays: dict) -> None:
  """Each array to its path (an etils.epath.Path), atomically: a reader sees the whole file or
  none (a local file is renamed into place; an object store's object appears whole)."""
  try:
    for path, array in arrays.items():
      if outputs.is_remote(path):
        buffer = io.BytesIO()
        np.save(buffer, array)
        path.write_bytes(buffer.getvalue())
        continue
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = f'{path}.tmp{os.getpid()}.npy'
      np.save(tmp, array)
      os.replace(tmp, path)
  except Exception:  # pylint: disable=broad-except   # read-only data dir or bucket: no cache
    pass


class _RecordSource:
  """Random access to the encoded images and labels of a prepared tfds data set (ArrayRecord)."""

  def __init__(self, name: str, data_dir: str, split: str):
    tfds = _tfds()
    prepare(name, data_dir)
    builder = _builder(name, data_dir)
    self._source = builder.as_data_source(
        split=_tfds_split(name, split), decoders={'image': tfds.decode.SkipDecoding()})
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    with self._lock:  # the reader is shared by the worker threads
      examples = self._source.__getitems__([int(i) for i in indices])
    return [e['image'] for e in examples], np.array([e['label'] for e in examples], np.int32)


_RECORD_SOURCES: dict[tuple, object] = {}


def record_source(name: str, data_dir: str | os.PathLike | None, split: str):
  """Random access to a large data set's (or an image folder's) split: an object with `len()` and
  `read(indices) -> (list of encoded images, int32 labels)`."""
  if split not in ('train', 'test'):
    raise ValueError(f'split must be train or test, not {split!r}')
  if _is_folder(name):
    return _FileSource(_folder(name), split)
  data_dir = default_data_dir(data_dir)
  key = (name, str(outputs.location(data_dir)), split)
  with _CACHE_LOCK:
    if key not in _RECORD_SOURCES:
      _RECORD_SOURCES[key] = _RecordSource(name, data_dir, split)
    return _RECORD_SOURCES[key]


# --- synthetic data in the real on-disk formats (tests, smoke runs) ------------------------------

def make_fake_dataset(name: str, data_dir: str | os.PathLike, *, num_train: int = 40,
                      num_test: int = 24, image_size: tuple[int, int] = (48, 64),
                      seed: int = 0) -> str:
  """Prepares a tiny synthetic `name` (a tfds data set) with the real builder's name, version,
  features and ArrayRecord files, through the same locked preparation as `prepare`.

  Images have a class-dependent brightness (label k -> mean about 20 + 20 * (k % 10)) so tests can
  check image/label alignment. Large data sets get JPEGs of `image_size` (varied per example).
  """
  base = _base(name)
  if base not in _TFDS_NAMES:
    raise ValueError(f'{name} is not a tfds data set')
  spec = DATASETS[base]
  data_dir = os.fspath(data_dir)
  tfds = _tfds()
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
    # tfds locates checksums / metadata beside the builder's module: use the real one's.
    code_path = real.code_path

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._fake('train', num_train), test_split: self._fake(test_split, num_test)}

    def _fake(self, split: str, n: int):
      for i in range(n):
        yield i, example(i, split)

  Fake.__name__ = real.__name__

  def build(builder):
    del builder
    Fake(data_dir=data_dir, config=config).download_and_prepare(file_format='array_record')

  return _prepare_tfds_locked(name, data_dir, build)


# --- command line ---------------------------------------------------------------------------------

@guarded
def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog='python -m experiments.data',
                          description='Prepare or describe a data set.')
  parser.add_argument('command', choices=['prepare', 'info'])
  parser.add_argument('name', help='fashion_mnist, cifar10, cifar100, imagenette, imagenet2012 '
                                   'or folder:PATH')
  parser.add_argument('--data-dir', default=None, help='tfds data dir (default $TFDS_DATA_DIR or '
                                                       '~/tensorflow_datasets)')
  parser.add_argument('--download', action='store_true', help='allow tfds to download')
  parser.add_argument('--manual-dir', default=None, help='imagenet2012: where the tars are')
  args = parser.parse_args(argv)
  try:
    validate_name(args.name)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if args.command == 'prepare':
    print(prepare(args.name, args.data_dir, download=args.download or None,
                  manual_dir=args.manual_dir))
  else:
    print(info(args.name, args.data_dir))
  return 0


if __name__ == '__main__':
  sys.exit(main())
