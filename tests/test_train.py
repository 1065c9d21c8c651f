"""Training end to end on the smoke option: runs, rows, sharding, multi-process, resume, bad
input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.training import steptable
from experiments.training.checkpoint import load_numpy, load_trained_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(workdir, config_arg, *overrides, env=None, table=None, check=True, wait=True):
  table = table or os.path.join(os.path.dirname(workdir), 'steps.csv')
  cmd = [sys.executable, '-m', 'experiments.train', f'--config=configs/ladder.py:{config_arg}',
         f'--workdir={workdir}', f'--config.step_table={table}', *overrides]
  full_env = {**os.environ, **(env or {})}
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
  if check and res.returncode != 0:
    raise AssertionError(f'exit {res.returncode}\n{res.stderr[-3000:]}')
  return res


def final_params(workdir):
  return load_numpy(os.path.join(workdir, 'checkpoints'))


def flat(tree, prefix=''):
  if isinstance(tree, (dict, list, tuple)):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
      out.update(flat(v, f'{prefix}/{k}'))
    return out
  return {prefix: np.asarray(tree)}


def test_smoke_run_appends_a_row(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  start = time.time()
  res = run_train(str(workdir), 'convnext_t,smoke')
  elapsed = time.time() - start
  rows = steptable.read_rows(str(tmp_path / 'steps.csv'))
  assert len(rows) == 1
  row = rows[0]
  assert row['step'] == 'convnext_t' and row['data'] == 'fashion_mnist' and row['scale'] == 'tiny'
  assert set(row) == set(steptable.COLUMNS)
  assert 0 <= float(row['top1']) <= 100 and int(row['params']) > 0
  assert (workdir / 'config.json').exists()
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) >= 2 and '"train_loss"' in lines[0]
  assert '"top1"' in res.stdout
  print(f'smoke convnext_t: {elapsed:.1f} s')
  # The trained network loads back, from a relative workdir too.
  monkeypatch.chdir(tmp_path)
  model, config = load_trained_model('run')
  assert config['step'] == 'convnext_t'
  assert model(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 10)


def test_trains_on_an_image_folder(tmp_path):
  """data=folder:PATH: a folder of PNGs the test writes trains, and its row names the folder."""
  from PIL import Image
  rng = np.random.default_rng(0)
  root = tmp_path / 'images'
  for split, per_class in (('train', 12), ('test', 4)):
    for level, name in ((40, 'b_dark'), (200, 'a_bright'), (120, 'c_mid')):
      os.makedirs(root / split / name)
      for i in range(per_class):
        pixels = np.clip(rng.normal(level, 8, (20 + i % 3, 22, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.png')
  run_train(str(tmp_path / 'run'), f'convnext_t,smoke,data=folder:{root},image_size=32',
            '--config.data.validation=6')
  row, = steptable.read_rows(str(tmp_path / 'steps.csv'))
  assert row['data'] == f'folder:{root}' and row['image_size'] == '32'
  assert row['validation'] == '6' and row['val_top1'] != ''
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert config['data']['channels'] == 0 and config['model']['in_channels'] == -1
  model, _ = load_trained_model(str(tmp_path / 'run'))
  assert model(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 3)   # RGB, three classes


def test_original_recipe_step_runs(tmp_path):
  run_train(str(tmp_path / 'run'), 'resnet50,smoke,seed=3')
  row = steptable.read_rows(str(tmp_path / 'steps.csv'))[0]
  assert row['step'] == 'resnet50' and row['seed'] == '3' and row['step_index'] == '0'


SGD = ['--config.optimizer.optimizer=sgd', '--config.optimizer.base_lr=0.05',
       '--config.optimizer.decay_all=True', '--config.augment.mixup_alpha=0.0',
       '--config.augment.cutmix_alpha=0.0']


def test_one_device_equals_eight_device_mesh(tmp_path):
  """Trained on 1 and on 8 devices, evaluated on 250 test examples (which the 8-device evaluation
  pads). A step with LayerNorm. With ResNet-50 on Fashion-MNIST the runs differ by 1.6e-4 after one
  step and 1.5e-2 after 16: on 1 (and 2) devices XLA:CPU's own convolution gradient of the stem is
  off by 0.6% of its scale against float64 (long float32 sums over inputs of one sign), on 8
  devices (shorter partial sums) and in the matmul form (`MODERNIZE_CONV_IMPL=gemm`) by 1e-6
  (open, issue 15)."""
  # SGD, not Adam: Adam's division by sqrt(v) magnifies reduction-order rounding (engineering
  # notes).
  one, eight = str(tmp_path / 'one'), str(tmp_path / 'eight')
  common = [*SGD, '--config.data.test_examples=250']
  run_train(one, 'layer_norm,smoke', *common, env={'JAX_NUM_CPU_DEVICES': '1'})
  run_train(eight, 'layer_norm,smoke', *common, env={'JAX_NUM_CPU_DEVICES': '8'})
  s1, a = final_params(one)
  s8, b = final_params(eight)
  assert s1 == s8
  fa, fb = flat(a['params']), flat(b['params'])
  assert fa.keys() == fb.keys()
  worst = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
  assert worst < 1e-5, worst
  rows = steptable.read_rows(str(tmp_path / 'steps.csv'))
  assert [r['device_count'] for r in rows] == ['1', '8']
  assert abs(float(rows[0]['train_loss']) - float(rows[1]['train_loss'])) < 1e-4
  # The same network up to rounding evaluates alike: at most one of 250 examples flips.
  assert abs(float(rows[0]['test_loss']) - float(rows[1]['test_loss'])) < 1e-4
  assert abs(float(rows[0]['top1']) - float(rows[1]['top1'])) <= 100 / 250 + 1e-9


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_in_lockstep_and_resume_after_a_preemption(tmp_path):
  """Two processes (one CPU device each) train what one process trains. SIGTERM to process 1 alone
  mid-run: JAX's preemption service tells both the same step, both save it and exit 143, and the
  restarted pair ends where the single process did."""
  args = ['fewer_norms,smoke', *SGD, '--config.epochs=8', '--config.checkpoint_every_steps=8']
  single = str(tmp_path / 'single')
  run_train(single, *args, env={'JAX_NUM_CPU_DEVICES': '1'})
  multi = str(tmp_path / 'multi')

  def start_pair():
    port = _free_port()
    return [run_train(multi, *args, '--distributed', f'--coordinator=localhost:{port}',
                      '--num_processes=2', f'--process_id={i}', env={'JAX_NUM_CPU_DEVICES': '1'},
                      table=str(tmp_path / 'multi.csv'), wait=False) for i in range(2)]

  procs = start_pair()
  ckpt = os.path.join(multi, 'checkpoints')
  deadline = time.time() + 300
  while not (os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckpt))):
    assert time.time() < deadline and all(p.poll() is None for p in procs), 'no checkpoint 8'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], [err[-2000:] for _, err in outs]
  saved, _ = final_params(multi)
  total = int(steptable.read_rows(str(tmp_path / 'steps.csv'))[0]['steps'])
  assert 8 <= saved < total
  assert not os.path.exists(tmp_path / 'multi.csv')

  procs = start_pair()
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert f'resuming from checkpoint {saved}' in outs[0][1]
  _, a = final_params(single)
  _, b = final_params(multi)
  fa, fb = flat(a['params']), flat(b['params'])
  worst = max(float(np.max(np.abs(fa[k] - fb[k]))) for k in fa)
  assert worst < 1e-5, worst
  rows = steptable.read_rows(str(tmp_path / 'multi.csv'))
  assert len(rows) == 1 and rows[0]['process_count'] == '2'   # only process 0 writes
  assert rows[0]['steps'] == str(total)


LONGER = ['--config.epochs=4', '--config.checkpoint_every_steps=8']


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  """One unbroken `gelu,smoke` run (64 steps), the reference of the kill and preemption tests."""
  workdir = str(tmp_path_factory.mktemp('unbroken') / 'run')
  run_train(workdir, 'gelu,smoke', *LONGER)
  return workdir, steptable.read_rows(os.path.join(os.path.dirname(workdir), 'steps.csv'))[0]


def _interrupt_after_checkpoint(workdir, at_least, sig):
  """Starts the run, sends `sig` once checkpoint `at_least` (or later) exists; returns stderr."""
  proc = run_train(workdir, 'gelu,smoke', *LONGER, wait=False)
  ckpt = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= at_least for d in os.listdir(ckpt)):
      break
    if proc.poll() is not None:
      pytest.fail('the run finished before it could be interrupted')
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


def _assert_equals_unbroken(workdir, reference_row, table):
  _, a = final_params(reference_row['workdir'])
  _, b = final_params(workdir)
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  (row,) = steptable.read_rows(table)
  for col in ('steps', 'top1', 'top5', 'test_loss', 'train_loss'):
    assert row[col] == reference_row[col], col


def test_sigkill_and_resume_equals_unbroken_run(tmp_path, unbroken):
  broken = str(tmp_path / 'broken')
  code, _ = _interrupt_after_checkpoint(broken, 16, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert not steptable.read_rows(str(tmp_path / 'steps.csv'))   # the killed run wrote no row
  run_train(broken, 'gelu,smoke', *LONGER)
  _assert_equals_unbroken(broken, unbroken[1], str(tmp_path / 'steps.csv'))


def test_sigterm_saves_and_resumes(tmp_path, unbroken):
  """Preemption: SIGTERM saves the current step and exits 143; the restart ends where an unbroken
  run does, with the same row."""
  workdir = str(tmp_path / 'run')
  code, err = _interrupt_after_checkpoint(workdir, 8, signal.SIGTERM)
  assert code == 143, err[-2000:]
  assert 'preempted' in err and 'Traceback' not in err
  step, _ = final_params(workdir)
  assert 8 <= step < 64
  assert not os.path.exists(tmp_path / 'steps.csv')
  res = run_train(workdir, 'gelu,smoke', *LONGER)
  assert f'resuming from checkpoint {step}' in res.stderr, res.stderr[-2000:]
  _assert_equals_unbroken(workdir, unbroken[1], str(tmp_path / 'steps.csv'))


def test_ctrl_c_saves_and_resumes_bitwise(tmp_path, unbroken):
  """Ctrl-C (SIGINT): the update in progress is saved, one line, exit 130, no traceback; the same
  command ends where an unbroken run does, with the same row."""
  workdir = str(tmp_path / 'run')
  code, err = _interrupt_after_checkpoint(workdir, 8, signal.SIGINT)
  assert code == 130, err[-2000:]
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith('interrupted: checkpoint saved at update ')
  assert 'Traceback' not in err and 'run the same command again to resume' in err
  step, _ = final_params(workdir)
  assert 8 <= step < 64 and f'saved at update {step};' in err
  assert not os.path.exists(tmp_path / 'steps.csv')
  res = run_train(workdir, 'gelu,smoke', *LONGER)
  assert f'resuming from checkpoint {step}' in res.stderr, res.stderr[-2000:]
  _assert_equals_unbroken(workdir, unbroken[1], str(tmp_path / 'steps.csv'))


@pytest.mark.parametrize('arg, overrides, message', [
    ('convnext_q,smoke', [], 'convnext_q'),                                   # unknown step
    ('convnext_t,smoke', ['--config.optimiser.base_lr=1'], 'optimiser'),       # unknown key
    ('convnext_t,smoke', ['--config.batch_size=many'], 'batch_size'),          # wrong type
    ('convnext_t,smoke', ['--config.model.kernel_size=4'], 'kernel_size'),     # invalid flag
    ('convnext_t,smoke,data=cifar10', ['--config.data.dir={tmp}/empty'], 'cifar10'),  # no data
    ('convnext_t,smoke', ['--workdir=/proc/version/run'], 'workdir'),           # unwritable
    ('convnext_t,smoke,colour=red', [], 'colour'),                             # unknown option
])
def test_bad_input_exits_2_without_row(tmp_path, arg, overrides, message):
  overrides = [o.replace('{tmp}', str(tmp_path)) for o in overrides]
  res = run_train(str(tmp_path / 'run'), arg, *overrides, check=False)
  assert res.returncode == 2, res.stderr[-2000:]
  assert message in res.stderr and 'Traceback' not in res.stderr
  assert len(res.stderr.strip().splitlines()) <= 2, res.stderr
  assert not os.path.exists(tmp_path / 'steps.csv')


def test_nan_loss_exits_2_and_keeps_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  res = run_train(workdir, 'fewer_norms,smoke', '--config.optimizer.base_lr=1e30',
                  '--config.log_every_steps=2', '--config.checkpoint_every_steps=2', check=False)
  assert res.returncode == 2 and 'loss became' in res.stderr, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr
  assert not os.path.exists(tmp_path / 'steps.csv')
  ckpt = os.path.join(workdir, 'checkpoints')
  for d in (os.listdir(ckpt) if os.path.isdir(ckpt) else []):
    if d.isdigit():
      _, state = load_numpy(ckpt, int(d))
      assert all(np.all(np.isfinite(v)) for v in flat(state['params']).values())
