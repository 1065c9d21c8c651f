"""Tests of data.placement and steps_per_dispatch (experiments/training/placement.py): the training
data on the device, several updates per dispatch.

Runs of `gelu,smoke` (64 updates of 32 examples) logging every 5 updates and saving every 7, so
that dispatches of 8 updates are cut unevenly (5, 2, 3, 4, 1, ...). With the data on the device,
8 updates per dispatch end bitwise where one per dispatch does, with the same logged losses and
the same row; a run preempted (SIGTERM) and resumed too. The host and device programs differ
(the device gathers and augments inside the compiled loop), so their runs are compared within a
tolerance: after 64 updates the parameters differed by at most 2e-4 (measured: 6e-5 after 27),
the last window's train loss by 1e-6; the test allows parameters 1e-3 apart, train loss 1e-4 and
top-1 one test example (of 256). The device's eval batches equal the host's (the same eval step
then gives the same numbers).
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs.ladder import get_config
from experiments.cli import UsageError
from experiments.data import datasets, pipeline
from experiments.training import loop, placement, runconfig, steptable
from tests.test_train import final_params, flat, run_train

INTERVALS = ['--config.epochs=4', '--config.log_every_steps=5', '--config.checkpoint_every_steps=7']
DEVICE = [*INTERVALS, '--config.data.placement=device']


def _metrics(workdir):
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k in ('updates', 'train_loss', 'lr')}
          for line in lines if '"train_loss"' in line and '"top1"' not in line]


def _assert_bitwise(a_dir, b_dir):
  sa, a = final_params(a_dir)
  sb, b = final_params(b_dir)
  assert sa == sb
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _row(workdir):
  rows = [r for r in steptable.read_rows(os.path.join(os.path.dirname(workdir), 'steps.csv'))
          if r['workdir'].endswith(os.path.basename(workdir))]
  assert len(rows) == 1
  return rows[0]


@pytest.fixture(scope='module')
def one_per_dispatch(tmp_path_factory):
  """The reference: the data on the device, one update per dispatch."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  run_train(workdir, 'gelu,smoke', *DEVICE)
  return workdir


def test_dispatches_end_on_every_boundary():
  chunks = list(placement.dispatches(3, 64, 8, 5, 7))
  assert chunks[:5] == [(3, 2), (5, 2), (7, 3), (10, 4), (14, 1)]
  starts = [first for first, _ in chunks]
  assert starts == [3] + [first + n for first, n in chunks[:-1]]
  assert chunks[-1][0] + chunks[-1][1] == 64
  ends = {first + n for first, n in chunks}
  assert {u for u in range(4, 65) if u % 5 == 0 or u % 7 == 0 or u == 64} <= ends
  assert max(n for _, n in chunks) <= 8
  assert list(placement.dispatches(0, 5, 1)) == [(u, 1) for u in range(5)]


def test_eight_updates_per_dispatch_equal_one(tmp_path, one_per_dispatch):
  """Bitwise: the final state, every logged loss and learning rate, the row's numbers."""
  workdir = str(tmp_path / 'run')
  run_train(workdir, 'gelu,smoke', *DEVICE, '--config.steps_per_dispatch=8')
  _assert_bitwise(one_per_dispatch, workdir)
  logged = _metrics(workdir)
  assert [m['updates'] for m in logged] == [*range(5, 64, 5), 64]
  assert logged == _metrics(one_per_dispatch)
  ours, theirs = _row(workdir), _row(one_per_dispatch)
  for col in ('steps', 'top1', 'top5', 'test_loss', 'train_loss', 'config_hash', 'placement'):
    assert ours[col] == theirs[col], col
  assert ours['placement'] == 'device'


def test_preempted_and_resumed_on_the_device_equals_unbroken(tmp_path, one_per_dispatch):
  workdir = str(tmp_path / 'run')
  proc = run_train(workdir, 'gelu,smoke', *DEVICE, '--config.steps_per_dispatch=8', wait=False)
  ckpt = os.path.join(workdir, 'checkpoints')
  while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    assert proc.poll() is None, 'the run ended before it could be preempted'
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  step, _ = final_params(workdir)
  assert 7 <= step < 64
  res = run_train(workdir, 'gelu,smoke', *DEVICE, '--config.steps_per_dispatch=8')
  assert f'resuming from checkpoint {step}' in res.stderr, res.stderr[-2000:]
  _assert_bitwise(one_per_dispatch, workdir)
  for col in ('top1', 'top5', 'test_loss', 'train_loss'):
    assert _row(workdir)[col] == _row(one_per_dispatch)[col], col


def test_device_trains_as_the_host_does(tmp_path, one_per_dispatch):
  """The default (auto) on the CPU is the host pipeline; the device run is close to it (the
  tolerances: the module's docstring) and records its placement."""
  workdir = str(tmp_path / 'run')
  run_train(workdir, 'gelu,smoke', *INTERVALS)
  host, device = _row(workdir), _row(one_per_dispatch)
  assert (host['placement'], device['placement']) == ('host', 'device')
  assert host['config_hash'] == device['config_hash']
  assert abs(float(host['top1']) - float(device['top1'])) <= 100 / 256 + 1e-9
  assert abs(float(host['train_loss']) - float(device['train_loss'])) < 1e-4
  _, a = final_params(workdir)
  _, b = final_params(one_per_dispatch)
  fa, fb = flat(a['params']), flat(b['params'])
  worst = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
  assert worst < 1e-3, worst


def test_the_new_fields_leave_the_run_identity_alone():
  config = get_config('convnext_t,smoke')
  before = runconfig.config_hash(config)
  with config.unlocked():
    config.data.placement, config.steps_per_dispatch = 'device', 8
  assert runconfig.config_hash(config) == before
  values = config.to_dict()
  del values['data']['placement'], values['steps_per_dispatch']   # a config.json from before
  assert runconfig.config_hash(values) == before


def test_device_eval_batches_are_the_hosts(fashion):
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  kw = dict(batch_size=48, image_size=32, channels=1, num_examples=100, num_workers=0)
  host = [jax.device_get(b) for b in loop._on_device(pipeline.eval_batches('fashion_mnist', **kw),
                                                     sharding)]
  ours = [jax.device_get(b) for b in placement.device_eval_batches(
      pipeline.eval_batches('fashion_mnist', **kw), mesh, sharding)]
  assert len(ours) == len(host) == 3
  for a, b in zip(ours, host):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_auto_is_the_host_on_the_cpu(fashion):
  config = get_config('convnext_t,smoke')
  info = datasets.info('fashion_mnist')
  assert placement.resolve(config, info, 512, 1) == 'host'
  with config.unlocked():
    config.data.placement = 'device'
  assert placement.resolve(config, info, 512, 1) == 'device'
  with config.unlocked():
    config.data.placement, config.steps_per_dispatch = 'auto', 4
  with pytest.raises(UsageError, match='steps_per_dispatch=4 needs the data on the device.*CPU'):
    placement.resolve(config, info, 512, 1)


def _folder(root):
  from PIL import Image
  for split in ('train', 'test'):
    for name in ('a', 'b'):
      os.makedirs(root / split / name)
      for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(root / split / name / f'{i}.png')
  return root


@pytest.mark.parametrize('arg, overrides, message', [
    ('convnext_t,smoke,data=folder:{tmp}/images,image_size=32', ['--config.data.placement=device'],
     'data.placement=device: folder:'),
    ('convnext_t,smoke', ['--config.data.placement=device', '--config.steps_per_dispatch=33'],
     'steps_per_dispatch=33 must be between 1 and 32'),
    ('convnext_t,smoke', ['--config.data.placement=host', '--config.steps_per_dispatch=2'],
     'steps_per_dispatch=2 needs the data on the device'),
    ('convnext_t,smoke', ['--config.data.placement=gpu'], "data.placement='gpu' must be"),
])
def test_bad_placement_exits_2_in_one_line(tmp_path, arg, overrides, message):
  if 'folder:' in arg:
    _folder(tmp_path / 'images')
  res = run_train(str(tmp_path / 'run'), arg.replace('{tmp}', str(tmp_path)), *overrides,
                  check=False)
  assert res.returncode == 2, res.stderr[-2000:]
  assert message in res.stderr and 'Traceback' not in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1, res.stderr
  assert not os.path.exists(tmp_path / 'steps.csv')
