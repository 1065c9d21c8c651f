"""Tests of experiments/data/datasets.py: Fashion-MNIST read from Debian's idx files, idx parsing,
the validation hold-out, preparing tfds data sets (once, under a lock, also when processes race) and
image folders. Every data dir is under pytest's tmp_path; Debian's Fashion-MNIST files (the
`fashion` fixture) are the only outside input."""

import gzip
import hashlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.data import datasets, pipeline
from experiments.training import steptable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_FILES = [f for files in datasets.FASHION_MNIST_FILES.values() for f in files]


def _raw(source, split):
  image_file, label_file = datasets.FASHION_MNIST_FILES[split]
  return (datasets.read_idx(os.path.join(source, image_file)),
          datasets.read_idx(os.path.join(source, label_file)))


def _fingerprints(images, labels):
  return sorted(hashlib.md5(bytes([int(l)]) + im.tobytes()).digest() for im, l in
                zip(images.reshape(len(images), -1), labels))


def _write_idx(path, array, compress=True):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _write_small_fashion(directory, num_train=7, num_test=5, seed=0):
  """A Fashion-MNIST look-alike in the four idx files; returns {split: (images, labels)}."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in (('train', num_train), ('test', num_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    image_file, label_file = datasets.FASHION_MNIST_FILES[split]
    _write_idx(os.path.join(directory, image_file), images)
    _write_idx(os.path.join(directory, label_file), labels)
    out[split] = images, labels
  return out


def _one_line_error(fn):
  with pytest.raises(datasets.DatasetUnavailable) as error:
    fn()
  message = str(error.value)
  assert message and '\n' not in message, message
  return message


# --- Fashion-MNIST from Debian's files ------------------------------------------------------------

def test_fashion_mnist_is_read_from_the_debian_idx_files(fashion):
  for split, n in (('train', 60000), ('test', 10000)):
    images, labels = datasets.load_arrays('fashion_mnist', split)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [n // 10] * 10
    raw_images, raw_labels = _raw(fashion, split)  # the files' own order
    np.testing.assert_array_equal(images[..., 0], raw_images)
    np.testing.assert_array_equal(labels, raw_labels)
    assert _fingerprints(images, labels) == _fingerprints(raw_images, raw_labels)
  info = datasets.info('fashion_mnist')
  assert (info.num_classes, info.num_train, info.num_test) == (10, 60000, 10000)
  assert info.image_shape == (28, 28, 1) and info.channels == 1 and not info.large
  train = datasets.load_arrays('fashion_mnist', 'train')[0] / 255.0
  assert abs(train.mean() - info.mean[0]) < 5e-4 and abs(train.std() - info.std[0]) < 5e-4
  # Nothing to prepare: `prepare` only checks the files and says where they are.
  assert datasets.fashion_mnist_dir() == fashion
  assert datasets.prepare('fashion_mnist', '/nonexistent/data/dir') == fashion


def test_fashion_mnist_from_another_directory(tmp_path, monkeypatch):
  source = tmp_path / 'fm'
  written = _write_small_fashion(source)
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(source))
  monkeypatch.setattr(datasets, '_ARRAYS', {})  # this process may have read another source
  assert datasets.fashion_mnist_dir() == str(source)
  assert datasets.prepare('fashion_mnist') == str(source)
  for split in ('train', 'test'):
    images, labels = datasets.load_arrays('fashion_mnist', split)
    np.testing.assert_array_equal(images[..., 0], written[split][0])
    np.testing.assert_array_equal(labels, written[split][1])
    assert labels.dtype == np.int32
  other = tmp_path / 'other'
  _write_small_fashion(other, num_train=3, num_test=2)
  assert datasets.fashion_mnist_dir(other) == str(other)  # an explicit directory wins


def test_fashion_mnist_source_change_is_not_hidden_by_the_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, '_ARRAYS', {})
  first, second = tmp_path / 'first', tmp_path / 'second'
  _write_small_fashion(first, num_test=5, seed=1)
  _write_small_fashion(second, num_test=3, seed=2)
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(first))
  assert len(datasets.load_arrays('fashion_mnist', 'test')[1]) == 5
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(second))
  assert len(datasets.load_arrays('fashion_mnist', 'test')[1]) == 3


def test_missing_or_bad_fashion_mnist_files_give_one_line_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, '_ARRAYS', {})  # read the files, not an earlier test's arrays
  empty = tmp_path / 'empty'
  empty.mkdir()
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(empty))
  for fn in (lambda: datasets.prepare('fashion_mnist'), datasets.fashion_mnist_dir,
             lambda: datasets.load_arrays('fashion_mnist', 'test'),
             lambda: pipeline.train_batches('fashion_mnist', batch_size=4)):
    msg = _one_line_error(fn)
    assert 'apt-get install dataset-fashion-mnist' in msg and str(empty) in msg
  # One file missing: the message names it.
  partial = tmp_path / 'partial'
  _write_small_fashion(partial)
  os.remove(partial / 't10k-labels-idx1-ubyte.gz')
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(partial))
  assert 't10k-labels-idx1-ubyte.gz' in _one_line_error(lambda: datasets.prepare('fashion_mnist'))
  # All four present, but one is not an idx file / has the wrong image shape.
  corrupt = tmp_path / 'corrupt'
  _write_small_fashion(corrupt)
  (corrupt / 't10k-images-idx3-ubyte.gz').write_bytes(b'not gzip at all')
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(corrupt))
  assert str(corrupt) in _one_line_error(lambda: datasets.load_arrays('fashion_mnist', 'test'))
  wrong = tmp_path / 'wrong'
  _write_small_fashion(wrong)
  _write_idx(wrong / 'train-images-idx3-ubyte.gz', np.zeros((7, 20, 20), np.uint8))
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', str(wrong))
  assert 'unexpected train files' in _one_line_error(
      lambda: datasets.load_arrays('fashion_mnist', 'train'))


def test_read_idx(tmp_path):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / 'a.gz', array)
  _write_idx(tmp_path / 'a', array, compress=False)
  for path in ('a.gz', 'a'):
    got = datasets.read_idx(str(tmp_path / path))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize('content', [
    b'\x00\x00\x0d\x01' + b'\x00' * 8,            # float32 values, not unsigned bytes
    b'\x01\x00\x08\x01\x00\x00\x00\x02\x05\x06',  # bad magic
    b'\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03' + b'\x00' * 5,  # 5 values for 2 x 3
    b'\x00\x00',                                  # too short
], ids=['float-type', 'bad-magic', 'truncated', 'too-short'])
def test_read_idx_rejects_other_files(tmp_path, content):
  bad = tmp_path / 'bad.gz'
  with gzip.open(bad, 'wb') as f:
    f.write(content)
  with pytest.raises(ValueError):
    datasets.read_idx(str(bad))


# --- names, info, validation hold-out -------------------------------------------------------------

def test_info_and_names(tmp_path):
  assert {'fashion_mnist', 'cifar10', 'cifar100', 'imagenette', 'imagenet2012'} <= set(
      datasets.DATASETS)
  info = datasets.info('imagenet2012', tmp_path)  # known before preparation
  assert (info.num_train, info.num_test, info.num_classes) == (1281167, 50000, 1000)
  assert info.large and info.default_size == 224 and info.channels == 3
  assert datasets.info('cifar100', tmp_path).num_classes == 100
  for name in ('fashion_mnist', 'imagenette/320px-v2', 'folder:/some/where'):
    datasets.validate_name(name)
  for name in ('mnist', 'folder:'):
    with pytest.raises(ValueError):
      datasets.validate_name(name)
  assert 'mnist' in _one_line_error(lambda: datasets.info('mnist'))
  assert 'mnist' in _one_line_error(lambda: datasets.prepare('mnist', tmp_path))
  with pytest.raises(ValueError):
    datasets.load_arrays('imagenette', 'train', tmp_path)   # read by index, not loaded whole
  with pytest.raises(ValueError):
    datasets.load_arrays('cifar10', 'validation', tmp_path)
  with pytest.raises(ValueError):
    datasets.record_source('imagenette', tmp_path, 'validation')


@pytest.mark.parametrize('n,v', [(10, 3), (60000, 5000), (7, 6), (5, 0)])
def test_split_indices(n, v):
  train, held_out = datasets.split_indices(n, v)
  assert len(train) == n - v and len(held_out) == v
  assert train.dtype == held_out.dtype == np.int64
  assert not set(train.tolist()) & set(held_out.tolist())
  np.testing.assert_array_equal(np.sort(np.concatenate([train, held_out])), np.arange(n))
  assert (np.diff(train) > 0).all() and (np.diff(held_out) > 0).all()
  again = datasets.split_indices(n, v)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(held_out, again[1])
  if v == 0:
    np.testing.assert_array_equal(train, np.arange(n))
  if n >= 1000:  # a shuffle, not the tail of the stored order
    assert held_out[0] < n // 10 and held_out[-1] > n - n // 10


def test_split_indices_rejects_holding_out_everything():
  with pytest.raises(ValueError):
    datasets.split_indices(10, 10)
  with pytest.raises(ValueError):
    datasets.split_indices(10, 11)


# --- tfds data sets: preparation ------------------------------------------------------------------

def test_unavailable_tfds_data_says_how_to_get_it(tmp_path, monkeypatch):
  msg = _one_line_error(lambda: datasets.prepare('cifar10', tmp_path / 'b', download=False))
  assert 'prepare cifar10 --download' in msg and str(tmp_path / 'b') in msg
  msg = _one_line_error(lambda: datasets.prepare('cifar10', tmp_path / 'b'))  # default: no download
  assert 'prepare cifar10 --download' in msg
  with monkeypatch.context() as m:  # downloading allowed, but the network is down: no retry loop
    def refuse(*args, **kwargs):
      raise OSError('network disabled by the test')
    m.setattr(socket, 'create_connection', refuse)
    m.setattr(socket.socket, 'connect', refuse)
    msg = _one_line_error(lambda: datasets.prepare('cifar10', tmp_path / 'b', download=True))
    assert 'cannot download' in msg and 'network disabled by the test' in msg
    m.setenv('MODERNIZE_DATA_DOWNLOAD', '1')  # the environment's permission, the same way
    msg = _one_line_error(lambda: datasets.prepare('cifar10', tmp_path / 'b'))
    assert 'cannot download' in msg
  assert not os.path.exists(tmp_path / 'b' / 'cifar10' / '3.0.2' / 'dataset_info.json')
  msg = _one_line_error(lambda: datasets.prepare('imagenet2012', tmp_path / 'c'))
  assert 'ILSVRC2012_img_train.tar' in msg and os.path.join('downloads', 'manual') in msg
  manual = tmp_path / 'tars'
  msg = _one_line_error(lambda: datasets.prepare('imagenet2012', tmp_path / 'c', manual_dir=manual))
  assert str(manual) in msg


def test_fake_dataset_is_prepared_once(tmp_path):
  data_dir = tmp_path / 'tfds'
  path = datasets.make_fake_dataset('cifar10', data_dir, num_train=12, num_test=6)
  assert path == os.path.join(str(data_dir), 'cifar10', '3.0.2')
  assert os.path.exists(os.path.join(path, 'dataset_info.json'))
  assert any(f.endswith('array_record-00000-of-00001') for f in os.listdir(path))
  info = datasets.info('cifar10', data_dir)
  assert (info.num_train, info.num_test, info.image_shape) == (12, 6, (32, 32, 3))
  # Prepared: `prepare` reuses it without downloading (which it may not), and so does another
  # make_fake_dataset (it would otherwise write 30 training examples).
  assert datasets.prepare('cifar10', data_dir, download=False) == path
  assert datasets.make_fake_dataset('cifar10', data_dir, num_train=30) == path
  assert datasets.info('cifar10', data_dir).num_train == 12
  with pytest.raises(ValueError):
    datasets.make_fake_dataset('fashion_mnist', data_dir)


# Several processes prepare the same data set in the same empty directory at the same moment: each
# first imports and loads everything (the cifar10 builder, TensorFlow) elsewhere, says it is ready,
# and starts when the parent creates the `go` file.
_PREPARE_AT_ONCE = r'''
import os, sys, time
from experiments.data import datasets
data_dir, ready, go = sys.argv[1:4]
datasets.info('cifar10', ready + '.warm-up')
datasets.configure_tensorflow()
open(ready, 'w').close()
while not os.path.exists(go):
  time.sleep(0.002)
print(datasets.make_fake_dataset('cifar10', data_dir, num_train=50, num_test=20, seed=7))
'''


def _prepare_concurrently(data_dir, scratch, processes=3, code=_PREPARE_AT_ONCE):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', MODERNIZE_TF_THREADS='1')
  go = os.path.join(scratch, 'go')
  ready = [os.path.join(scratch, f'ready{i}') for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, '-c', code, str(data_dir), r, go], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for r in ready]
  try:
    deadline = time.time() + 600   # a guard against hanging, not a speed requirement
    while not all(os.path.exists(r) for r in ready):
      if any(p.poll() is not None for p in procs) or time.time() > deadline:
        pytest.fail('a preparing process ended or hung before the start: '
                    + ' | '.join(p.communicate()[1][-1000:] for p in procs if p.poll() is not None))
      time.sleep(0.01)
    open(go, 'w').close()
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


def test_concurrent_first_time_preparation(tmp_path):
  data_dir = tmp_path / 'shared'
  results = _prepare_concurrently(data_dir, tmp_path)
  for returncode, stdout, stderr in results:
    assert returncode == 0, stderr[-3000:]
  paths = {stdout.strip().splitlines()[-1] for _, stdout, _ in results}
  assert paths == {os.path.join(str(data_dir), 'cifar10', '3.0.2')}
  assert os.listdir(data_dir / 'cifar10') == ['3.0.2']  # no incomplete copies left behind
  info = datasets.info('cifar10', data_dir)
  assert (info.num_train, info.num_test) == (50, 20)
  # The same data as one process alone prepares.
  alone = tmp_path / 'alone'
  datasets.make_fake_dataset('cifar10', alone, num_train=50, num_test=20, seed=7)
  for split in ('train', 'test'):
    images, labels = datasets.load_arrays('cifar10', split, data_dir)
    expected_images, expected_labels = datasets.load_arrays('cifar10', split, alone)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(images, expected_images)
  got = np.concatenate([b['label'][b['mask']] for b in pipeline.eval_batches(
      'cifar10', data_dir=data_dir, batch_size=8, num_workers=0)])
  np.testing.assert_array_equal(got, datasets.load_arrays('cifar10', 'test', alone)[1])


# --- image folders --------------------------------------------------------------------------------

CLASSES = {'zebra': 40, 'apple': 120, 'mango': 200}  # created in this order; sorted, apple is 0
SORTED = ('apple', 'mango', 'zebra')
SIZES = ((20, 24), (31, 17), (26, 26))


def _write_folder(root, *, rgb=False, ext='.png', num_train=3, num_test=2, seed=0):
  """An ImageFolder with class-dependent brightness; returns {split: [(pixels, class), ...]}."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in (('train', num_train), ('test', num_test)):
    written[split] = []
    for cls, level in CLASSES.items():
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        shape = (h, w, 3) if rgb else (h, w)
        offset = np.array([0, 15, 30]) if rgb else 0   # distinct channel means
        pixels = np.clip(rng.normal(level, 8, shape) + offset, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, cls, f'{i:03d}{ext}'), quality=95)
        written[split].append((pixels, cls))
  return written


def _folder_info(root):
  return datasets.info(f'folder:{root}')


def test_image_folder_info(tmp_path):
  root = tmp_path / 'images'
  written = _write_folder(root)
  (root / 'train' / 'apple' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'apple' / '.hidden.png').write_bytes(b'ignored, not an image')
  info = _folder_info(root)
  assert info.classes == SORTED and info.num_classes == 3
  assert (info.num_train, info.num_test) == (9, 6)
  assert info.channels == 1 and info.image_shape == (None, None, 1)   # sizes vary
  assert info.large and info.default_size is None
  pixels = np.concatenate([p.reshape(-1) for p, _ in written['train']]) / 255.0
  np.testing.assert_allclose(info.mean, [pixels.mean()], atol=1e-6)
  np.testing.assert_allclose(info.std, [pixels.std()], atol=1e-6)
  assert datasets.prepare(f'folder:{root}') == str(root)   # nothing to prepare
  source = datasets.record_source(f'folder:{root}', None, 'test')
  assert len(source) == 6
  blobs, labels = source.read(np.array([0, 2, 5]))
  assert labels.tolist() == [0, 1, 2] and all(b.startswith(b'\x89PNG') for b in blobs)


def test_image_folder_of_one_size(tmp_path):
  from PIL import Image
  root = tmp_path / 'same'
  for split in ('train', 'test'):
    for cls in ('b', 'a'):
      os.makedirs(root / split / cls)
      Image.fromarray(np.full((12, 16), 90, np.uint8)).save(root / split / cls / 'x.png')
  info = _folder_info(root)
  assert info.image_shape == (12, 16, 1) and info.classes == ('a', 'b')
  assert info.std == (1e-3,)   # a constant image: a floor, not a division by zero


def test_image_folder_rgb_and_jpeg(tmp_path):
  root = tmp_path / 'rgb'
  written = _write_folder(root, rgb=True)
  info = _folder_info(root)
  assert info.channels == 3 and len(info.mean) == len(info.std) == 3
  pixels = np.concatenate([p.reshape(-1, 3) for p, _ in written['train']]) / 255.0
  np.testing.assert_allclose(info.mean, pixels.mean(0), atol=1e-6)
  np.testing.assert_allclose(info.std, pixels.std(0), atol=1e-6)
  # One RGB image among grayscale ones: three channels.
  from PIL import Image
  mixed = tmp_path / 'mixed'
  _write_folder(mixed)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / 'test' / 'zebra' / 'rgb.png')
  assert _folder_info(mixed).channels == 3
  # .jpg, .jpeg (any case) are read too.
  jpegs = tmp_path / 'jpegs'
  _write_folder(jpegs, ext='.jpg', num_train=2, num_test=1)
  _write_folder(jpegs, ext='.jpeg', num_train=1, num_test=1, seed=1)
  os.rename(jpegs / 'test' / 'apple' / '000.jpeg', jpegs / 'test' / 'apple' / '000.JPEG')
  info = _folder_info(jpegs)
  assert (info.num_train, info.num_test, info.channels) == (9, 6, 1)
  assert abs(info.mean[0] * 255 - np.mean(list(CLASSES.values()))) < 3


def test_image_folder_problems_give_one_line_errors(tmp_path):
  from PIL import Image
  missing = tmp_path / 'missing'
  msg = _one_line_error(lambda: _folder_info(missing))
  assert str(missing) in msg and 'no such directory' in msg
  msg = _one_line_error(lambda: pipeline.train_batches(f'folder:{missing}', batch_size=2,
                                                       image_size=8))
  assert str(missing) in msg

  no_test = tmp_path / 'no_test'
  _write_folder(no_test)
  shutil.rmtree(no_test / 'test')
  msg = _one_line_error(lambda: _folder_info(no_test))
  assert str(no_test / 'test') in msg and 'test split is missing' in msg

  no_classes = tmp_path / 'no_classes'
  os.makedirs(no_classes / 'train')
  os.makedirs(no_classes / 'test')
  assert str(no_classes / 'train') in _one_line_error(lambda: _folder_info(no_classes))

  empty_class = tmp_path / 'empty_class'
  _write_folder(empty_class)
  os.makedirs(empty_class / 'train' / 'kiwi')
  (empty_class / 'train' / 'kiwi' / 'readme.txt').write_text('no images here')
  msg = _one_line_error(lambda: _folder_info(empty_class))
  assert "'kiwi'" in msg and str(empty_class / 'train' / 'kiwi') in msg

  unknown_class = tmp_path / 'unknown_class'
  _write_folder(unknown_class)
  os.makedirs(unknown_class / 'test' / 'kiwi')
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(unknown_class / 'test' / 'kiwi' / 'k.png')
  msg = _one_line_error(lambda: _folder_info(unknown_class))
  assert "'kiwi'" in msg and str(unknown_class) in msg

  for split in ('train', 'test'):
    corrupt = tmp_path / f'corrupt_{split}'
    _write_folder(corrupt)
    bad = corrupt / split / 'mango' / 'bad.png'
    bad.write_bytes(b'these bytes are not a PNG image\x00\x01\x02' * 10)
    msg = _one_line_error(lambda: _folder_info(corrupt))   # pylint: disable=cell-var-from-loop
    assert str(bad) in msg

  # A training image whose header is fine but whose pixel data is cut off (found when measuring
  # the mean / std).
  truncated = tmp_path / 'truncated'
  _write_folder(truncated)
  cut = truncated / 'train' / 'apple' / 'cut.png'
  cut.write_bytes(_png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8))[:300])
  assert str(cut) in _one_line_error(lambda: _folder_info(truncated))


def _png_bytes(pixels):
  import io

  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, 'PNG')
  return buffer.getvalue()


@pytest.mark.parametrize('name', ['cifar10', 'imagenette'])
def test_a_prepared_data_set_is_read_from_a_bucket(tmp_path, gcs, monkeypatch, name):
  """A tfds data set prepared locally (a synthetic copy in the real format) and copied to gs://
  trains as the local copy does (the same row); a bucket without it ends in one line, exit 2.
  cifar10 is loaded whole (its arrays cached beside it, in the bucket); imagenette is read by
  index through ArrayRecord's own GCS reader."""
  from etils import epath
  from test_train import run_train
  for key, value in gcs.items():
    monkeypatch.setenv(key, value)
  local = tmp_path / 'tfds'
  prepared = datasets.make_fake_dataset(name, local, num_train=40, num_test=24)
  bucket = f'gs://runs/{tmp_path.name}/tfds'
  for path in pathlib.Path(prepared).rglob('*'):
    if path.is_file():
      (epath.Path(bucket) / path.relative_to(local)).write_bytes(path.read_bytes())
  config = f'resnet50,smoke,data={name},image_size=32'
  rows = {}
  for where, data_dir in (('local', str(local)), ('bucket', bucket)):
    table = str(tmp_path / f'{where}.csv')
    run_train(str(tmp_path / where), config, f'--config.data.dir={data_dir}', table=table)
    rows[where], = steptable.read_rows(table)
  for column in ('steps', 'top1', 'top5', 'test_loss', 'train_loss', 'params', 'data'):
    assert rows['bucket'][column] == rows['local'][column], column
  if name == 'cifar10':
    assert (epath.Path(bucket) / pathlib.Path(prepared).relative_to(local) / 'modernize_cache' /
            'train-images.npy').exists()
  res = run_train(str(tmp_path / 'none'), config, f'--config.data.dir=gs://runs/{tmp_path.name}/x',
                  table=str(tmp_path / 'none.csv'), check=False)
  lines = res.stderr.strip().splitlines()
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
  assert f'{name} is not prepared in gs://runs/{tmp_path.name}/x' in lines[0], lines[0]
