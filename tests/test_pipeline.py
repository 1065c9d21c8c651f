"""Tests of experiments/data/pipeline.py: batches from Fashion-MNIST (Debian's idx files), synthetic
tfds data sets in the real on-disk format and image folders; determinism, resume, epoch boundaries,
host sharding, exact eval, the validation hold-out and smoke subsets. Every data dir is under
pytest's tmp_path; Debian's Fashion-MNIST files (the `fashion` fixture) are the only outside
input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.data import augment as aug
from experiments.data import datasets, pipeline
from experiments.data.augment import AugmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_SMALL = AugmentConfig.paper(large=False)
FM = 'fashion_mnist'


def _model_input(batch, name, channels=None, data_dir=None):
  """The float32 model input of a uint8 batch, as the jitted steps compute it."""
  return np.asarray(pipeline.model_input(batch, pipeline.input_spec(name, data_dir, channels)))


def _denormalize(images, info):
  return (images * np.array(info.std) + np.array(info.mean)) * 255.0


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


def _gather_eval(per_host):
  """The examples of per-host eval batches in global order: (images, labels)."""
  images, labels = [], []
  for k in range(len(per_host[0])):
    for host in per_host:
      b = host[k]
      assert (b['image'][~b['mask']] == 0).all() and (b['label'][~b['mask']] == 0).all()
      images.append(b['image'][b['mask']])
      labels.append(b['label'][b['mask']])
  return np.concatenate(images), np.concatenate(labels)


# --- sampling (pure functions) --------------------------------------------------------------------

def test_every_example_once_per_epoch_across_hosts():
  n, batch, hosts = 103, 5, 3
  seen = []
  for step in range(-(-n // (batch * hosts)) + 1):
    for p in range(hosts):
      idx, pos = pipeline.train_indices(n, seed=9, step=step, batch_size=batch, process_index=p,
                                        process_count=hosts)
      seen.extend(idx[pos < n])
  assert sorted(seen) == list(range(n))


def test_sizes():
  assert pipeline.num_eval_batches(10000, 128) == 79
  assert pipeline.num_eval_batches(10000, 128, 3) == 27
  assert pipeline.num_eval_batches(384, 128, 3) == 1
  assert pipeline.split_size(60000, 10000, 'test', 5000) == 10000
  assert pipeline.split_size(60000, 10000, 'train', 5000) == 55000
  assert pipeline.split_size(60000, 10000, 'validation', 5000) == 5000
  assert pipeline.split_size(60000, 10000, 'train') == 60000
  assert pipeline.split_size(60000, 10000, 'validation') == 0


def test_transform_arguments(tmp_path):
  info = datasets.DataInfo('x', 3, 10, 5, (None, None, 3), (0.5,) * 3, (0.25,) * 3, large=True)
  with pytest.raises(ValueError):
    pipeline._make_transform(info, None, None, None, None)  # varying sizes need an image_size
  with pytest.raises(ValueError):
    pipeline._make_transform(info, 32, 2, None, None)
  t = pipeline._make_transform(info, 32, 1, None, None)     # RGB statistics -> luma
  assert (t.channels, t.stored_channels, t.image_size, t.crop_pct) == (1, 3, 32, 1.0)
  np.testing.assert_allclose(t.mean, [0.5])
  np.testing.assert_allclose(t.std, [0.25])
  imagenet = datasets.info('imagenet2012', tmp_path)
  assert pipeline._make_transform(imagenet, None, None, None, None).image_size == 224
  assert pipeline._make_transform(imagenet, None, None, None, None).crop_pct == 0.875


# --- Fashion-MNIST: training batches --------------------------------------------------------------

def test_train_batch_format(fashion):
  batch = next(pipeline.train_batches(FM, batch_size=32, image_size=32, channels=3, seed=0,
                                      augment=PAPER_SMALL))
  assert set(batch) == {'image', 'label', 'erase_box', 'erase_key'}
  # Grayscale travels as one uint8 channel; the model input is replicated on the device.
  assert batch['image'].shape == (32, 32, 32, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert batch['erase_box'].shape == (32, 4) and batch['erase_box'].dtype == np.int32
  assert batch['erase_key'].shape == (32, 2) and batch['erase_key'].dtype == np.uint32
  assert 0 <= batch['label'].min() <= batch['label'].max() < 10
  x = _model_input(batch, FM, 3)
  assert x.shape == (32, 32, 32, 3) and x.dtype == np.float32 and np.isfinite(x).all()
  np.testing.assert_array_equal(x[..., 0], x[..., 2])  # replicated gray
  assert set(next(pipeline.train_batches(FM, batch_size=4, seed=0))) == {'image', 'label'}


def test_model_input_normalises_and_erases(fashion):
  """(x / 255 - mean) / std outside the erased boxes; N(0, 1) noise inside, a pure function of the
  batch's 'erase_key'; a box of size zero erases nothing."""
  info = datasets.info(FM)
  augment = AugmentConfig(random_erasing_prob=0.5)
  batch = next(pipeline.train_batches(FM, batch_size=256, image_size=28, seed=2, augment=augment,
                                      num_workers=0))
  x = _model_input(batch, FM)
  expected = (batch['image'] / 255.0 - info.mean[0]) / info.std[0]
  box = batch['erase_box']
  erased = box[:, 2] > 0
  assert 0.35 < erased.mean() < 0.65 and (box[~erased] == 0).all()
  inside = np.zeros(x.shape, bool)
  for i, (top, left, h, w) in enumerate(box):
    inside[i, top:top + h, left:left + w] = True
  np.testing.assert_allclose(x[~inside], expected[~inside], atol=1e-5)
  noise = x[inside]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  np.testing.assert_array_equal(x, _model_input(batch, FM))
  other = dict(batch, erase_key=batch['erase_key'] + np.uint32(1))
  assert not np.array_equal(_model_input(other, FM)[inside], noise)


def test_train_without_augmentation_is_the_stored_images(fashion):
  images, labels = datasets.load_arrays(FM, 'train')
  info = datasets.info(FM)
  batch = next(pipeline.train_batches(FM, batch_size=16, image_size=28, channels=1, seed=5,
                                      start_step=7))
  idx, positions = pipeline.train_indices(60000, seed=5, step=7, batch_size=16)
  np.testing.assert_array_equal(positions, np.arange(7 * 16, 8 * 16))
  np.testing.assert_array_equal(batch['label'], labels[idx])
  np.testing.assert_array_equal(batch['image'], images[idx])
  np.testing.assert_allclose(_denormalize(_model_input(batch, FM), info), images[idx], atol=1e-3)


@pytest.mark.parametrize('validation', [None, 0])
def test_train_stream_is_a_function_of_the_indices(fashion, validation):
  """Bit-exact: batch `step` is the transform of the stored examples at `train_indices`, with the
  augmentation keyed by (seed, position); validation=0 is the same stream as no hold-out."""
  images, labels = datasets.load_arrays(FM, 'train')
  transform = pipeline._make_transform(datasets.info(FM), 28, 1, None, PAPER_SMALL)
  kwargs = {} if validation is None else {'validation': validation}
  batches = _take(pipeline.train_batches(FM, batch_size=24, image_size=28, channels=1, seed=3,
                                         start_step=40, augment=PAPER_SMALL, num_workers=0,
                                         **kwargs), 2)
  for step, batch in zip((40, 41), batches):
    idx, positions = pipeline.train_indices(60000, seed=3, step=step, batch_size=24)
    np.testing.assert_array_equal(batch['label'], labels[idx])
    _assert_same([batch], [{**transform.train_arrays(images[idx], aug.example_keys(3, positions)),
                            'label': labels[idx]}])


def test_determinism_resume_and_workers(fashion):
  kwargs = dict(batch_size=48, image_size=32, channels=3, augment=PAPER_SMALL)
  unbroken = _take(pipeline.train_batches(FM, seed=1, **kwargs), 5)
  _assert_same(unbroken, _take(pipeline.train_batches(FM, seed=1, **kwargs), 5))
  resumed = _take(pipeline.train_batches(FM, seed=1, start_step=3, **kwargs), 2)
  _assert_same(unbroken[3:], resumed)
  _assert_same(unbroken[:3], _take(pipeline.train_batches(FM, seed=1, num_workers=0, **kwargs), 3))
  _assert_same(unbroken[:3], _take(pipeline.train_batches(FM, seed=1, num_workers=3, prefetch=0,
                                                          **kwargs), 3))
  other = next(pipeline.train_batches(FM, seed=2, **kwargs))
  assert not np.array_equal(other['image'], unbroken[0]['image'])


def test_resume_across_an_epoch_boundary(fashion):
  kwargs = dict(batch_size=64, image_size=32, channels=1, seed=4, augment=PAPER_SMALL,
                num_workers=0)
  # Step 937 holds the last 32 examples of epoch 0 and the first 32 of epoch 1 (60000 = 937.5 * 64).
  unbroken = _take(pipeline.train_batches(FM, start_step=936, **kwargs), 3)
  _assert_same(unbroken[1:], _take(pipeline.train_batches(FM, start_step=937, **kwargs), 2))
  idx, _ = pipeline.train_indices(60000, seed=4, step=937, batch_size=64)
  epoch0, epoch1 = aug.permutation(4, 0, 60000), aug.permutation(4, 1, 60000)
  np.testing.assert_array_equal(idx, np.concatenate([epoch0[-32:], epoch1[:32]]))
  labels = datasets.load_arrays(FM, 'train')[1]
  np.testing.assert_array_equal(unbroken[1]['label'], labels[idx])


def test_hosts_read_disjoint_shares_of_the_global_batch(fashion):
  kwargs = dict(image_size=32, channels=3, seed=3, augment=PAPER_SMALL, start_step=11,
                num_workers=0)
  whole = next(pipeline.train_batches(FM, batch_size=60, **kwargs))
  indices = []
  for p in range(3):
    share = next(pipeline.train_batches(FM, batch_size=20, process_index=p, process_count=3,
                                        **kwargs))
    for key in share:  # host p's share is rows [20p, 20p + 20) of the global batch
      np.testing.assert_array_equal(share[key], whole[key][20 * p:20 * (p + 1)])
    indices.append(pipeline.train_indices(60000, seed=3, step=11, batch_size=20, process_index=p,
                                          process_count=3)[0])
  assert len(set(np.concatenate(indices).tolist())) == 60
  for bad in (dict(process_index=3, process_count=3), dict(process_index=-1, process_count=2),
              dict(batch_size=0), dict(start_step=-1)):
    with pytest.raises(ValueError):
      pipeline.train_batches(FM, **{'batch_size': 20, **bad})


# --- Fashion-MNIST: eval --------------------------------------------------------------------------

@pytest.mark.parametrize('hosts', [1, 3])
def test_eval_covers_the_test_split_exactly_once(fashion, hosts):
  images, labels = datasets.load_arrays(FM, 'test')
  per_host = [list(pipeline.eval_batches(FM, batch_size=128, image_size=28, channels=1,
                                         process_index=p, process_count=hosts))
              for p in range(hosts)]
  expected_batches = -(-10000 // (128 * hosts))
  assert [len(b) for b in per_host] == [expected_batches] * hosts
  for host in per_host:
    for b in host:
      assert b['image'].shape == (128, 28, 28, 1) and b['mask'].dtype == bool
  got_images, got_labels = _gather_eval(per_host)
  np.testing.assert_array_equal(got_labels, labels)
  np.testing.assert_array_equal(got_images, images)
  assert np.bincount(got_labels).tolist() == [1000] * 10


def test_subsets_for_smoke_runs(fashion):
  _, labels = datasets.load_arrays(FM, 'test')
  batches = list(pipeline.eval_batches(FM, batch_size=64, num_examples=300))
  assert len(batches) == 5 and sum(int(b['mask'].sum()) for b in batches) == 300
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]),
                                labels[:300])
  train_labels = datasets.load_arrays(FM, 'train')[1]
  got = np.concatenate([b['label'] for b in _take(pipeline.train_batches(
      FM, batch_size=50, num_examples=100, num_workers=0), 2)])
  assert sorted(got.tolist()) == sorted(train_labels[:100].tolist())  # one epoch of the subset


def test_eval_resizes_and_replicates_channels(fashion):
  b = next(pipeline.eval_batches(FM, batch_size=10, image_size=32, channels=3))
  assert b['image'].shape == (10, 32, 32, 1) and b['mask'].all()
  x = _model_input(b, FM, 3)
  assert x.shape == (10, 32, 32, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 1])
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  one = next(pipeline.eval_batches(FM, batch_size=10, image_size=32, channels=1))
  np.testing.assert_array_equal(one['image'], b['image'])
  np.testing.assert_array_equal(_model_input(one, FM, 1)[..., 0], x[..., 0])
  np.testing.assert_array_equal(one['label'], b['label'])


# --- the validation hold-out ----------------------------------------------------------------------

HOLD_OUT = 5000


def test_training_never_sees_the_held_out_examples(fashion):
  images, labels = datasets.load_arrays(FM, 'train')
  train_rows, held_out = datasets.split_indices(60000, HOLD_OUT)
  n = 60000 - HOLD_OUT
  batch_size = 1000   # 55 steps: one epoch
  seen = []
  iterator = pipeline.train_batches(FM, batch_size=batch_size, image_size=28, channels=1, seed=6,
                                    validation=HOLD_OUT, num_workers=0)
  for step in range(n // batch_size):
    batch = next(iterator)
    idx = train_rows[pipeline.train_indices(n, seed=6, step=step, batch_size=batch_size)[0]]
    np.testing.assert_array_equal(batch['label'], labels[idx])
    np.testing.assert_array_equal(batch['image'], images[idx])
    seen.append(idx)
  iterator.close()
  seen = np.sort(np.concatenate(seen))
  np.testing.assert_array_equal(seen, train_rows)   # each remaining example once in the epoch
  assert not np.isin(held_out, seen).any()


def test_smoke_subset_applies_after_the_hold_out(fashion):
  labels = datasets.load_arrays(FM, 'train')[1]
  train_rows, held_out = datasets.split_indices(60000, 6000)
  assert (held_out < train_rows[199]).any()   # else the subset could not tell the difference
  got = np.concatenate([b['label'] for b in _take(pipeline.train_batches(
      FM, batch_size=50, num_examples=200, validation=6000, num_workers=0), 4)])
  assert sorted(got.tolist()) == sorted(labels[train_rows[:200]].tolist())
  assert sorted(got.tolist()) != sorted(labels[:200].tolist())


@pytest.mark.parametrize('hosts', [1, 2])
def test_validation_split_is_exactly_the_held_out_examples(fashion, hosts):
  images, labels = datasets.load_arrays(FM, 'train')
  _, held_out = datasets.split_indices(60000, HOLD_OUT)
  per_host = [list(pipeline.eval_batches(FM, batch_size=256, image_size=28, channels=1,
                                         split='validation', validation=HOLD_OUT,
                                         process_index=p, process_count=hosts))
              for p in range(hosts)]
  assert [len(b) for b in per_host] == [pipeline.num_eval_batches(HOLD_OUT, 256, hosts)] * hosts
  got_images, got_labels = _gather_eval(per_host)
  np.testing.assert_array_equal(got_labels, labels[held_out])
  np.testing.assert_array_equal(got_images, images[held_out])
  subset = list(pipeline.eval_batches(FM, batch_size=64, split='validation', validation=HOLD_OUT,
                                      num_examples=100))
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in subset]),
                                labels[held_out[:100]])


def test_validation_split_needs_a_hold_out(fashion):
  for kwargs in (dict(split='validation'), dict(split='validation', validation=0),
                 dict(split='val', validation=10)):
    with pytest.raises(ValueError):
      pipeline.eval_batches(FM, batch_size=8, **kwargs)
  with pytest.raises(ValueError):
    pipeline.train_batches(FM, batch_size=8, validation=60000)
  # The test split does not depend on the hold-out.
  a = next(pipeline.eval_batches(FM, batch_size=8))
  _assert_same([a], [next(pipeline.eval_batches(FM, batch_size=8, validation=HOLD_OUT))])


# --- the other data sets, on synthetic data in the real tfds format -------------------------------

FAKE = {'cifar10': 32, 'cifar100': 32, 'imagenette': 40, 'imagenet2012': 48}  # name -> image_size


@pytest.fixture(scope='module')
def fake_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('fake_tfds'))
  for name in FAKE:
    datasets.make_fake_dataset(name, data_dir, num_train=40, num_test=23)
  return data_dir


@pytest.mark.parametrize('name', list(FAKE))
def test_fake_dataset_through_the_pipeline(fake_dir, name):
  size = FAKE[name]
  info = datasets.info(name, fake_dir)
  assert (info.num_train, info.num_test) == (40, 23)
  assert info.num_classes == datasets.DATASETS[name].num_classes
  large = datasets.DATASETS[name].large
  assert info.large == large
  kwargs = dict(data_dir=fake_dir, batch_size=8, image_size=size, seed=0,
                augment=AugmentConfig.paper(large))
  unbroken = _take(pipeline.train_batches(name, **kwargs), 7)  # 56 > 40: rolls into epoch 1
  assert unbroken[0]['image'].shape == (8, size, size, 3) and unbroken[0]['image'].dtype == np.uint8
  x = _model_input(unbroken[0], name, None, fake_dir)
  assert x.shape == (8, size, size, 3) and np.isfinite(x).all()
  _assert_same(unbroken[4:], _take(pipeline.train_batches(name, start_step=4, **kwargs), 3))
  hosts = [next(pipeline.train_batches(name, **dict(kwargs, batch_size=4, process_index=p,
                                                    process_count=2, start_step=1)))
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in hosts]), unbroken[1]['label'])
  # The first epoch (5 batches of 8) holds every training example once.
  if large:
    stored_train = datasets.record_source(name, fake_dir, 'train').read(np.arange(40))[1]
  else:
    stored_train = datasets.load_arrays(name, 'train', fake_dir)[1]
  assert sorted(np.concatenate([b['label'] for b in unbroken[:5]]).tolist()) == sorted(
      stored_train.tolist())

  # Eval: every test example once, in stored order, images matching their labels.
  batches = list(pipeline.eval_batches(name, data_dir=fake_dir, batch_size=10, image_size=size))
  assert len(batches) == 3 and [int(b['mask'].sum()) for b in batches] == [10, 10, 3]
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  if large:
    stored = datasets.record_source(name, fake_dir, 'test').read(np.arange(23))[1]
  else:
    stored = datasets.load_arrays(name, 'test', fake_dir)[1]
  np.testing.assert_array_equal(labels, stored)
  brightness = np.concatenate([b['image'][b['mask']].mean(axis=(1, 2, 3)) for b in batches])
  expected = 20 + 20 * (labels % 10)  # make_fake_dataset's class-dependent brightness
  assert np.abs(brightness - expected).max() < 8

  # A validation hold-out of the fake training split.
  held = list(pipeline.eval_batches(name, data_dir=fake_dir, batch_size=16, image_size=size,
                                    split='validation', validation=6))
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in held]),
                                stored_train[datasets.split_indices(40, 6)[1]])


def test_rgb_to_one_channel(fake_dir):
  b = next(pipeline.eval_batches('cifar10', data_dir=fake_dir, batch_size=4, channels=1))
  assert b['image'].shape == (4, 32, 32, 1)
  b = next(pipeline.train_batches('imagenette', data_dir=fake_dir, batch_size=4, image_size=24,
                                  channels=1))
  assert b['image'].shape == (4, 24, 24, 1)


# Reading prepared data (Fashion-MNIST; ArrayRecord files) needs neither TensorFlow nor a network.
_READ_OFFLINE = r'''
import socket, sys
def blocked(*args, **kwargs):
  raise OSError('network disabled by the test')
socket.socket.connect = socket.socket.connect_ex = blocked
socket.create_connection = socket.getaddrinfo = blocked
from experiments.data import pipeline
names = sys.argv[2:]
for name in names:
  size = 28 if name == 'fashion_mnist' else 32
  next(pipeline.train_batches(name, data_dir=sys.argv[1], batch_size=4, image_size=size))
  next(pipeline.eval_batches(name, data_dir=sys.argv[1], batch_size=4, image_size=size))
loaded = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))
assert not loaded, loaded[:5]
print('ok')
'''


def test_reading_needs_no_tensorflow(fake_dir, fashion):
  env = dict(os.environ, PYTHONPATH=ROOT)
  run = subprocess.run([sys.executable, '-c', _READ_OFFLINE, fake_dir, FM, 'cifar10', 'imagenette'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0 and run.stdout.strip().endswith('ok'), run.stderr[-3000:]


def test_unavailable_data_fails_at_the_call(tmp_path):
  with pytest.raises(datasets.DatasetUnavailable) as error:
    pipeline.train_batches('cifar100', data_dir=tmp_path / 'b', batch_size=4)
  assert 'cifar100' in str(error.value) and '\n' not in str(error.value)
  with pytest.raises(datasets.DatasetUnavailable) as error:
    pipeline.eval_batches('imagenette', data_dir=tmp_path / 'b', batch_size=4)
  assert 'imagenette' in str(error.value) and '\n' not in str(error.value)


# --- image folders --------------------------------------------------------------------------------

CLASSES = {'zebra': 40, 'apple': 120, 'mango': 200}  # created in this order; sorted, apple is 0
SORTED = ('apple', 'mango', 'zebra')
SIZES = ((20, 24), (31, 17), (26, 26))


def _write_folder(root, *, rgb=False, ext='.png', num_train=3, num_test=2, seed=0):
  """An ImageFolder of grayscale (or RGB) images of varying sizes, class-dependent brightness."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split, n in (('train', num_train), ('test', num_test)):
    for cls, level in CLASSES.items():
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        pixels = np.clip(rng.normal(level, 8, (h, w, 3) if rgb else (h, w)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(
            os.path.join(root, split, cls, f'{i:03d}{ext}'), quality=95)
  return f'folder:{root}'


def _brightness_by_label(images, labels, info):
  expected = np.array([CLASSES[c] for c in info.classes])[labels]
  return images.mean(axis=(1, 2, 3)), expected


@pytest.mark.parametrize('rgb,ext', [(False, '.png'), (True, '.png'), (False, '.jpg'),
                                     (True, '.jpeg')])
def test_image_folder_through_the_pipeline(tmp_path, rgb, ext):
  name = _write_folder(tmp_path / 'images', rgb=rgb, ext=ext)
  info = datasets.info(name)
  c = 3 if rgb else 1
  assert info.classes == SORTED and info.channels == c
  with pytest.raises(ValueError):   # sizes vary: the run must choose one
    pipeline.train_batches(name, batch_size=3)

  batches = list(pipeline.eval_batches(name, batch_size=4, image_size=16))
  assert len(batches) == 2 and [int(b['mask'].sum()) for b in batches] == [4, 2]
  assert batches[0]['image'].shape == (4, 16, 16, c) and batches[0]['image'].dtype == np.uint8
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert labels.tolist() == [0, 0, 1, 1, 2, 2]   # class by class, in sorted class order
  brightness, expected = _brightness_by_label(images, labels, info)
  assert np.abs(brightness - expected).max() < 10

  augment = AugmentConfig.standard(large=True)   # random-resized crop + flip keep the brightness
  kwargs = dict(batch_size=9, image_size=12, seed=2, augment=augment, num_workers=0)
  epoch = _take(pipeline.train_batches(name, **kwargs), 2)
  assert epoch[0]['image'].shape == (9, 12, 12, c)
  assert sorted(epoch[0]['label'].tolist()) == [0] * 3 + [1] * 3 + [2] * 3   # each example once
  brightness, expected = _brightness_by_label(epoch[0]['image'], epoch[0]['label'], info)
  assert np.abs(brightness - expected).max() < 10
  _assert_same(epoch[1:], _take(pipeline.train_batches(name, start_step=1, **kwargs), 1))

  # Channel conversions: gray -> 3 replicated channels, RGB -> luma.
  other = 1 if rgb else 3
  b = next(pipeline.eval_batches(name, batch_size=6, image_size=16, channels=other))
  assert b['image'].shape == (6, 16, 16, 1)   # luma, or gray replicated on the device
  x = _model_input(b, name, other)
  assert x.shape == (6, 16, 16, other)
  if other == 3:
    np.testing.assert_array_equal(x[..., 0], x[..., 2])


def test_image_folder_validation_split(tmp_path):
  name = _write_folder(tmp_path / 'images', num_train=4)
  source = datasets.record_source(name, None, 'train')
  _, held_out = datasets.split_indices(12, 3)
  batches = list(pipeline.eval_batches(name, batch_size=2, image_size=8, split='validation',
                                       validation=3))
  np.testing.assert_array_equal(np.concatenate([b['label'][b['mask']] for b in batches]),
                                source.read(held_out)[1])
  train = next(pipeline.train_batches(name, batch_size=9, image_size=8, validation=3))
  assert sorted(train['label'].tolist()) == sorted(
      source.read(datasets.split_indices(12, 3)[0])[1].tolist())


def test_image_folder_of_one_size_needs_no_image_size(tmp_path):
  from PIL import Image
  root = tmp_path / 'square'
  for split in ('train', 'test'):
    for cls, level in (('b', 200), ('a', 50)):
      os.makedirs(root / split / cls)
      Image.fromarray(np.full((10, 10), level, np.uint8)).save(root / split / cls / 'x.png')
  b = next(pipeline.eval_batches(f'folder:{root}', batch_size=2))
  assert b['image'].shape == (2, 10, 10, 1) and b['label'].tolist() == [0, 1]
  info = datasets.info(f'folder:{root}')
  np.testing.assert_array_equal(b['image'][:, 0, 0, 0], [50, 200])
  np.testing.assert_allclose(_denormalize(_model_input(b, f'folder:{root}'), info)[:, 0, 0, 0],
                             [50, 200], atol=1e-3)


def test_truncated_test_image_gives_a_one_line_error(tmp_path):
  import io

  from PIL import Image
  name = _write_folder(tmp_path / 'images', rgb=True)
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
      buffer, 'PNG')
  cut = tmp_path / 'images' / 'test' / 'mango' / 'cut.png'
  cut.write_bytes(buffer.getvalue()[:300])   # the header is intact, the pixels are cut off
  datasets.info(name)   # the scan reads headers only, and the test split has no statistics
  with pytest.raises(datasets.DatasetUnavailable) as error:
    list(pipeline.eval_batches(name, batch_size=16, image_size=8, num_workers=0))
  assert str(cut) in str(error.value) and '\n' not in str(error.value)


def test_default_workers_one_per_core_at_most_8(monkeypatch):
  monkeypatch.delenv('MODERNIZE_DATA_WORKERS', raising=False)
  for cores, expected in ((1, 1), (2, 2), (8, 8), (16, 8)):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid, n=cores: set(range(n)), raising=False)
    assert pipeline.default_workers() == expected, cores
  monkeypatch.setenv('MODERNIZE_DATA_WORKERS', '12')
  assert pipeline.default_workers() == 12


def test_a_jpeg_decodes_at_the_smallest_scale_its_crop_allows():
  """`pipeline.draft`: a 1,000 x 800 JPEG whose 600-pixel crop is resized to 64 decodes at 1/8
  (125 x 100: the crop keeps 75 >= 64 pixels), within a few grey levels of the full decode; one
  resized to 224 at 1/2 (the crop keeps 300 >= 224 pixels there, 150 < 224 at 1/4); one larger
  than its crop whole; and a PNG always whole."""
  import io

  from PIL import Image
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:800, 0:1000]
  pixels = (np.sin(xx / 37.0)[..., None] * 60 + np.cos(yy / 23.0)[..., None] * 60 + 128
            + rng.normal(0, 3, (800, 1000, 3))).clip(0, 255).astype(np.uint8)
  blob = io.BytesIO()
  Image.fromarray(pixels).save(blob, 'JPEG', quality=90)
  box = (100, 200, 600, 600)   # top, left, height, width

  def decode(size, use_draft, data=blob, fmt=None):
    im = Image.open(io.BytesIO(data.getvalue()))
    full = (box[1], box[0], box[1] + box[3], box[0] + box[2])
    crop = pipeline.draft(im, box, size) if use_draft else full
    return im, np.asarray(im.convert('RGB').resize((size, size), Image.BICUBIC, box=crop),
                          np.float64)

  im, small = decode(64, True)
  assert im.size == (125, 100)
  _, whole = decode(64, False)
  assert np.abs(small - whole).mean() < 3.0
  im, _ = decode(224, True)
  assert im.size == (500, 400)   # the crop keeps 300 >= 224 pixels at 1/2, not at 1/4
  im, _ = decode(700, True)
  assert im.size == (1000, 800)  # a crop smaller than its output: no reduction
  png = io.BytesIO()
  Image.fromarray(pixels).save(png, 'PNG')
  im = Image.open(io.BytesIO(png.getvalue()))
  assert pipeline.draft(im, box, 64) == (200.0, 100.0, 800.0, 700.0) and im.size == (1000, 800)
