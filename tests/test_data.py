"""Tests of experiments/data.py: offline Fashion-MNIST, the tfds code paths on synthetic data in the
real on-disk formats, determinism, resume, host sharding and exact eval. Needs TensorFlow (tfds)."""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import data
from experiments.augment import AugmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_SMALL = AugmentConfig.paper(large=False)

# Prepares Fashion-MNIST with every socket connection refused, then loads both splits (which also
# writes the .npy cache the parent process reads) and reports what TensorFlow was configured with.
_OFFLINE_PREPARE = r'''
import json, socket, sys
def blocked(*args, **kwargs):
  raise OSError('network disabled by the test')
socket.socket.connect = socket.socket.connect_ex = blocked
socket.create_connection = socket.getaddrinfo = blocked
try:
  socket.create_connection(('pypi.org', 443), timeout=1)
  sys.exit('the network is not blocked')
except OSError:
  pass
import numpy as np
from experiments import data
path = data.prepare('fashion_mnist', sys.argv[1])
counts = {s: np.bincount(data.load_arrays('fashion_mnist', s, sys.argv[1])[1], minlength=10).tolist()
          for s in ('train', 'test')}
import tensorflow as tf
print(json.dumps({'path': path, 'counts': counts,
                  'gpus': len(tf.config.get_visible_devices('GPU')),
                  'intra': tf.config.threading.get_intra_op_parallelism_threads(),
                  'inter': tf.config.threading.get_inter_op_parallelism_threads()}))
'''


@pytest.fixture(scope='module')
def fashion(tmp_path_factory):
  if not all(os.path.exists(os.path.join(data.FASHION_MNIST_DEBIAN_DIR, f))
             for files in data.FASHION_MNIST_FILES.values() for f in files):
    pytest.skip('needs Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist)')
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  env = dict(os.environ, PYTHONPATH=ROOT, MODERNIZE_TF_THREADS='2',
             HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9')
  env.pop('MODERNIZE_DATA_DOWNLOAD', None)
  run = subprocess.run([sys.executable, '-c', _OFFLINE_PREPARE, data_dir], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout.strip().splitlines()[-1])
  return data_dir, report


def _raw(split):
  image_file, label_file = data.FASHION_MNIST_FILES[split]
  images = data.read_idx(os.path.join(data.FASHION_MNIST_DEBIAN_DIR, image_file))
  labels = data.read_idx(os.path.join(data.FASHION_MNIST_DEBIAN_DIR, label_file))
  return images, labels


def _fingerprints(images, labels):
  return sorted(hashlib.md5(bytes([int(l)]) + im.tobytes()).digest() for im, l in
                zip(images.reshape(len(images), -1), labels))


def _denormalize(images, info):
  return (images * np.array(info.std) + np.array(info.mean)) * 255.0


# --- Fashion-MNIST, built offline -----------------------------------------------------------------

def test_fashion_mnist_prepared_offline_from_debian_files(fashion):
  data_dir, report = fashion
  assert report['counts'] == {'train': [6000] * 10, 'test': [1000] * 10}
  assert report['path'].endswith(os.path.join('fashion_mnist', '3.0.1'))
  assert os.path.exists(os.path.join(report['path'], 'dataset_info.json'))
  for split, n in (('train', 60000), ('test', 10000)):
    images, labels = data.load_arrays('fashion_mnist', split, data_dir)
    assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.int32
    assert np.bincount(labels).tolist() == [n // 10] * 10
    raw_images, raw_labels = _raw(split)  # same examples (tfds stores them in its own order)
    assert _fingerprints(images, labels) == _fingerprints(raw_images, raw_labels)
  train = data.load_arrays('fashion_mnist', 'train', data_dir)[0] / 255.0
  info = data.info('fashion_mnist', data_dir)
  assert abs(train.mean() - info.mean[0]) < 5e-4 and abs(train.std() - info.std[0]) < 5e-4
  start = time.time()
  assert data.prepare('fashion_mnist', data_dir) == report['path']  # idempotent, immediate
  assert time.time() - start < 5


def test_tensorflow_kept_off_gpus_with_few_threads(fashion):
  _, report = fashion
  assert report['gpus'] == 0 and report['intra'] == 2 and report['inter'] == 2


def test_the_prepared_data_is_plain_tfds(fashion):
  import tensorflow_datasets as tfds
  data_dir, _ = fashion
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  assert builder.info.splits['train'].num_examples == 60000
  assert builder.info.splits['test'].num_examples == 10000
  assert builder.info.features['label'].num_classes == 10


def test_info(fashion):
  data_dir, _ = fashion
  info = data.info('fashion_mnist', data_dir)
  assert (info.num_classes, info.num_train, info.num_test) == (10, 60000, 10000)
  assert info.image_shape == (28, 28, 1) and len(info.mean) == len(info.std) == 1
  assert data.info('imagenet2012', data_dir).num_train == 1281167  # known before preparation


# --- training batches -----------------------------------------------------------------------------

def _take(iterator, n):
  out = [next(iterator) for _ in range(n)]
  iterator.close()
  return out


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_train_batch_format(fashion):
  data_dir, _ = fashion
  batch = next(data.train_batches('fashion_mnist', data_dir=data_dir, batch_size=32, image_size=32,
                                  channels=3, seed=0, augment=PAPER_SMALL))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert np.isfinite(batch['image']).all() and 0 <= batch['label'].min() <= batch['label'].max() < 10
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # replicated gray


def test_train_without_augmentation_is_the_stored_images(fashion):
  data_dir, _ = fashion
  images, labels = data.load_arrays('fashion_mnist', 'train', data_dir)
  info = data.info('fashion_mnist', data_dir)
  batch = next(data.train_batches('fashion_mnist', data_dir=data_dir, batch_size=16, image_size=28,
                                  channels=1, seed=5, start_step=7))
  idx, positions = data.train_indices(60000, seed=5, step=7, batch_size=16)
  np.testing.assert_array_equal(positions, np.arange(7 * 16, 8 * 16))
  np.testing.assert_array_equal(batch['label'], labels[idx])
  np.testing.assert_allclose(_denormalize(batch['image'], info), images[idx], atol=1e-3)


def test_determinism_resume_and_workers(fashion):
  data_dir, _ = fashion
  kwargs = dict(data_dir=data_dir, batch_size=48, image_size=32, channels=3, augment=PAPER_SMALL)
  unbroken = _take(data.train_batches('fashion_mnist', seed=1, **kwargs), 5)
  _assert_same(unbroken, _take(data.train_batches('fashion_mnist', seed=1, **kwargs), 5))
  resumed = _take(data.train_batches('fashion_mnist', seed=1, start_step=3, **kwargs), 2)
  _assert_same(unbroken[3:], resumed)
  _assert_same(unbroken[:3], _take(data.train_batches('fashion_mnist', seed=1, num_workers=0,
                                                      **kwargs), 3))
  _assert_same(unbroken[:3], _take(data.train_batches('fashion_mnist', seed=1, num_workers=3,
                                                      prefetch=0, **kwargs), 3))
  other = next(data.train_batches('fashion_mnist', seed=2, **kwargs))
  assert not np.array_equal(other['image'], unbroken[0]['image'])


def test_resume_across_an_epoch_boundary(fashion):
  data_dir, _ = fashion
  kwargs = dict(data_dir=data_dir, batch_size=64, image_size=32, channels=1, seed=4,
                augment=PAPER_SMALL, num_workers=0)
  # Step 937 holds the last 32 examples of epoch 0 and the first 32 of epoch 1 (60000 = 937.5 * 64).
  unbroken = _take(data.train_batches('fashion_mnist', start_step=936, **kwargs), 3)
  _assert_same(unbroken[1:], _take(data.train_batches('fashion_mnist', start_step=937, **kwargs), 2))
  idx, _ = data.train_indices(60000, seed=4, step=937, batch_size=64)
  epoch0, epoch1 = data.aug.permutation(4, 0, 60000), data.aug.permutation(4, 1, 60000)
  np.testing.assert_array_equal(idx, np.concatenate([epoch0[-32:], epoch1[:32]]))


def test_every_example_once_per_epoch_across_hosts():
  n, batch, hosts = 103, 5, 3
  seen = []
  for step in range(-(-n // (batch * hosts)) + 1):
    for p in range(hosts):
      idx, pos = data.train_indices(n, seed=9, step=step, batch_size=batch, process_index=p,
                                    process_count=hosts)
      seen.extend(idx[pos < n])
  assert sorted(seen) == list(range(n))


def test_hosts_read_disjoint_shares_of_the_global_batch(fashion):
  data_dir, _ = fashion
  kwargs = dict(data_dir=data_dir, image_size=32, channels=3, seed=3, augment=PAPER_SMALL,
                start_step=11, num_workers=0)
  whole = next(data.train_batches('fashion_mnist', batch_size=60, **kwargs))
  indices = []
  for p in range(3):
    share = next(data.train_batches('fashion_mnist', batch_size=20, process_index=p,
                                    process_count=3, **kwargs))
    for key in ('image', 'label'):  # host p's share is rows [20p, 20p + 20) of the global batch
      np.testing.assert_array_equal(share[key], whole[key][20 * p:20 * (p + 1)])
    indices.append(data.train_indices(60000, seed=3, step=11, batch_size=20, process_index=p,
                                      process_count=3)[0])
  assert len(set(np.concatenate(indices).tolist())) == 60
  with pytest.raises(ValueError):
    data.train_batches('fashion_mnist', batch_size=20, process_index=3, process_count=3,
                       data_dir=data_dir)


# --- eval -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('hosts', [1, 3])
def test_eval_covers_the_test_split_exactly_once(fashion, hosts):
  data_dir, _ = fashion
  images, labels = data.load_arrays('fashion_mnist', 'test', data_dir)
  info = data.info('fashion_mnist', data_dir)
  per_host = [list(data.eval_batches('fashion_mnist', data_dir=data_dir, batch_size=128,
                                     image_size=28, channels=1, process_index=p,
                                     process_count=hosts)) for p in range(hosts)]
  expected_batches = -(-10000 // (128 * hosts))
  assert [len(b) for b in per_host] == [expected_batches] * hosts
  got_images, got_labels = [], []
  for k in range(expected_batches):
    for p in range(hosts):
      b = per_host[p][k]
      assert b['image'].shape == (128, 28, 28, 1) and b['mask'].dtype == bool
      assert (b['image'][~b['mask']] == 0).all()
      got_images.append(b['image'][b['mask']])
      got_labels.append(b['label'][b['mask']])
  got_labels = np.concatenate(got_labels)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_allclose(_denormalize(np.concatenate(got_images), info), images, atol=1e-3)
  assert np.bincount(got_labels).tolist() == [1000] * 10


def test_subsets_for_smoke_runs(fashion):
  data_dir, _ = fashion
  _, labels = data.load_arrays('fashion_mnist', 'test', data_dir)
  batches = list(data.eval_batches('fashion_mnist', data_dir=data_dir, batch_size=64,
                                   num_examples=300))
  assert len(batches) == 5 and sum(int(b['mask'].sum()) for b in batches) == 300
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]),
                                labels[:300])
  train_labels = data.load_arrays('fashion_mnist', 'train', data_dir)[1]
  got = np.concatenate([b['label'] for b in _take(data.train_batches(
      'fashion_mnist', data_dir=data_dir, batch_size=50, num_examples=100, num_workers=0), 2)])
  assert sorted(got.tolist()) == sorted(train_labels[:100].tolist())  # one epoch of the subset


def test_eval_resizes_and_replicates_channels(fashion):
  data_dir, _ = fashion
  b = next(data.eval_batches('fashion_mnist', data_dir=data_dir, batch_size=10, image_size=32,
                             channels=3))
  assert b['image'].shape == (10, 32, 32, 3) and b['mask'].all()
  np.testing.assert_array_equal(b['image'][..., 0], b['image'][..., 1])


# --- the other data sets, on synthetic data in the real tfds formats ------------------------------

FAKE = {  # name -> (file format, image_size)
    'cifar10': ('tfrecord', 32),
    'cifar100': ('array_record', 32),
    'imagenette': ('array_record', 40),
    'imagenet2012': ('array_record', 48),
}


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('fake_tfds'))
  for name, (file_format, _) in FAKE.items():
    data.make_fake_dataset(name, data_dir, num_train=40, num_test=23, file_format=file_format)
  return data_dir


@pytest.mark.parametrize('name', list(FAKE))
def test_fake_dataset_through_the_pipeline(fake_dir, name):
  import tensorflow_datasets as tfds
  _, size = FAKE[name]
  info = data.info(name, fake_dir)
  assert (info.num_train, info.num_test) == (40, 23)
  assert info.num_classes == data.DATASETS[name].num_classes
  large = data.DATASETS[name].large
  kwargs = dict(data_dir=fake_dir, batch_size=8, image_size=size, seed=0,
                augment=AugmentConfig.paper(large))
  unbroken = _take(data.train_batches(name, **kwargs), 7)  # 56 > 40: rolls into epoch 1
  assert unbroken[0]['image'].shape == (8, size, size, 3)
  assert unbroken[0]['image'].dtype == np.float32 and np.isfinite(unbroken[0]['image']).all()
  _assert_same(unbroken[4:], _take(data.train_batches(name, start_step=4, **kwargs), 3))
  hosts = [next(data.train_batches(name, **dict(kwargs, batch_size=4, process_index=p,
                                                process_count=2, start_step=1))) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in hosts]), unbroken[1]['label'])

  # Eval: every test example once, in stored order, images matching their labels.
  batches = list(data.eval_batches(name, data_dir=fake_dir, batch_size=10, image_size=size))
  assert len(batches) == 3 and [int(b['mask'].sum()) for b in batches] == [10, 10, 3]
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  split = data.DATASETS[name].test_split
  builder = tfds.builder(name, data_dir=fake_dir)
  if FAKE[name][0] == 'array_record':
    stored = [e['label'] for e in builder.as_data_source(split=split)]
  else:
    stored = [int(e['label']) for e in tfds.as_numpy(builder.as_dataset(split=split))]
  np.testing.assert_array_equal(labels, stored)
  brightness = np.concatenate([_denormalize(b['image'][b['mask']], info).mean(axis=(1, 2, 3))
                               for b in batches])
  expected = 20 + 20 * (labels % 10)  # make_fake_dataset's class-dependent brightness
  assert np.abs(brightness - expected).max() < 8


def test_rgb_to_one_channel(fake_dir):
  b = next(data.eval_batches('cifar10', data_dir=fake_dir, batch_size=4, channels=1))
  assert b['image'].shape == (4, 32, 32, 1)


# --- failures -------------------------------------------------------------------------------------

def _one_line_error(fn):
  start = time.time()
  with pytest.raises(data.DatasetUnavailable) as error:
    fn()
  assert time.time() - start < 30  # fails fast, no network wait
  message = str(error.value)
  assert '\n' not in message
  return message


def test_unavailable_data_says_how_to_get_it(tmp_path, monkeypatch):
  empty = tmp_path / 'empty'
  empty.mkdir()
  msg = _one_line_error(lambda: data.prepare('fashion_mnist', tmp_path / 'a', source_dir=empty))
  assert 'apt-get install dataset-fashion-mnist' in msg
  msg = _one_line_error(lambda: data.prepare('cifar10', tmp_path / 'b', download=False))
  assert 'prepare cifar10 --download' in msg
  with monkeypatch.context() as m:  # downloading allowed, but the network is down: no retry loop
    def refuse(*args, **kwargs):
      raise OSError('network disabled by the test')
    m.setattr(socket, 'create_connection', refuse)
    m.setattr(socket.socket, 'connect', refuse)
    msg = _one_line_error(lambda: data.prepare('cifar10', tmp_path / 'b', download=True))
    assert 'cannot download' in msg and 'network disabled by the test' in msg
  msg = _one_line_error(lambda: data.train_batches('cifar100', data_dir=tmp_path / 'b',
                                                   batch_size=4))
  assert 'cifar100' in msg
  msg = _one_line_error(lambda: data.prepare('imagenet2012', tmp_path / 'c'))
  assert 'ILSVRC2012_img_train.tar' in msg and os.path.join('downloads', 'manual') in msg
  data.make_fake_dataset('imagenette', tmp_path / 'd', num_train=4, num_test=2,
                         file_format='tfrecord')
  msg = _one_line_error(lambda: data.prepare('imagenette', tmp_path / 'd'))
  assert 'tfds convert_format' in msg and 'array_record' in msg
  with pytest.raises(ValueError):
    data.info('mnist')


def test_read_idx_rejects_other_files(tmp_path):
  bad = tmp_path / 'bad.gz'
  with gzip.open(bad, 'wb') as f:
    f.write(b'\x00\x00\x0d\x01' + b'\x00' * 8)
  with pytest.raises(ValueError):
    data.read_idx(str(bad))
