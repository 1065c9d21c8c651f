"""The ladder run and view: resume after a kill, the plan, rendering. (The whole ladder on the smoke
option: tests/test_no_tensorflow.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.ladder import run as ladder_run
from experiments.ladder import view as ladder_view
from experiments.training import steptable
from modernize import LADDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ladder_cmd(*args):
  return [sys.executable, '-m', 'experiments.ladder', *args]


def test_plan_takes_side_branches_with_side_or_by_name():
  side = [n for n in LADDER.names() if n not in LADDER.names(include_side=False)]
  assert set(side) == {'kernel_5', 'kernel_9', 'kernel_11', 'grn', 'mhsa_last_stage'}
  assert [s for s, _ in ladder_run.plan('resnet50', None, 1, False)] == \
      LADDER.names(include_side=False)
  assert [s for s, _ in ladder_run.plan('resnet50', None, 1, True)] == LADDER.names()
  assert ladder_run.plan('resnet50', ['grn', 'resnet50'], 2, False) == [
      ('resnet50', 0), ('resnet50', 1), ('grn', 0), ('grn', 1)]   # ladder order


def test_jobs_sharing_a_device_are_not_pinned_and_split_its_memory(monkeypatch, tmp_path):
  """--share-device: any number of jobs on any number of cores, none pinned, each preallocating an
  equal share of the accelerator's memory (unless the user set one), the runs seed-major."""
  cores = len(os.sched_getaffinity(0))
  assert ladder_run.core_groups(cores + 3, shared=True) == [None] * (cores + 3)
  with pytest.raises(ladder_run.UsageError, match=r'^--jobs \d+: only \d+ cores'):
    ladder_run.core_groups(cores + 3)
  monkeypatch.delenv('XLA_PYTHON_CLIENT_MEM_FRACTION', raising=False)
  assert ladder_run.shared_device_env(4) == {'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.225'}
  assert ladder_run.shared_device_env(1) == {}
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.1')
  assert ladder_run.shared_device_env(4) == {}
  assert ladder_run.plan('resnet50', ['grn', 'resnet50'], 2, False, seed_major=True) == [
      ('resnet50', 0), ('grn', 0), ('resnet50', 1), ('grn', 1)]
  res = subprocess.run(ladder_cmd('run', '--out', str(tmp_path), '--share-device', '--jobs', '0'),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and res.stderr.startswith('error: --jobs') and \
      res.stderr.count('\n') == 1, res.stderr


def test_killed_ladder_resumes_without_retraining(tmp_path):
  """Two runs at a time (--jobs 2), killed with the whole process group, then run again."""
  out = str(tmp_path / 'ladder')
  args = ('run', '--out', out, '--options', 'smoke', '--steps',
          'resnet50,stage_ratio', '--seeds', '2', '--jobs', '2')
  proc = subprocess.Popen(ladder_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  table = os.path.join(out, 'steps.csv')
  deadline = time.time() + 600
  while time.time() < deadline and len(steptable.read_rows(table)) < 1:   # killed mid-ladder
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.1)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  done_before = {(r['step'], r['seed']) for r in steptable.read_rows(table)}
  assert 1 <= len(done_before) < 4
  times = os.path.join(out, 'run_times.jsonl')   # written after a run's row: may not exist yet
  timed_before = len(open(times).readlines()) if os.path.exists(times) else 0
  res = subprocess.run(ladder_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f'{len(done_before)} already in' in res.stdout
  rows = steptable.read_rows(table)
  pairs = [(r['step'], r['seed']) for r in rows]
  assert len(pairs) == len(set(pairs)) == 4           # each (step, seed) exactly once
  if len(os.sched_getaffinity(0)) >= 2:                # each run pinned to its share: one core
    assert {r['cpu_cores'] for r in rows} == {'1'}
  with open(times) as f:
    trained_after = {(t['step'], str(t['seed']))
                     for t in map(json.loads, f.readlines()[timed_before:])}
  assert trained_after.isdisjoint(done_before) and len(trained_after) == 4 - len(done_before)


def _row(step, seed, top1, data='fashion_mnist', scale='cpu', size=32):
  return {'ladder': 'resnet50', 'step': step, 'step_index': LADDER.index(step), 'seed': seed,
          'data': data, 'image_size': size, 'scale': scale, 'params': 1000, 'gmacs': 0.01,
          'top1': top1, 'top5': 99.0, 'train_img_per_s': 100.0, 'wall_s': 10.0}


def test_show_partial_single_seed_and_mixed_tables(tmp_path):
  table = str(tmp_path / 'steps.csv')
  rows = [_row('resnet50', 0, 80.0), _row('resnet50', 1, 82.0), _row('stage_ratio', 0, 85.5),
          _row('stage_ratio', 1, 86.5), _row('convnext_t', 0, 90.25),   # missing steps, 1 seed
          _row('kernel_9', 0, 88.0),                                     # a side branch
          _row('grn', 0, 90.5),                          # a side branch with no paper figures
          _row('resnet50', 0, 70.0, data='cifar10', size=32),            # another data set
          _row('convnext_t', 0, 75.0, data='cifar10', size=32)]
  for r in rows:
    steptable.append_row(table, r)
  out = str(tmp_path / 'view')
  res = subprocess.run(ladder_cmd('show', '--out', out, '--table', table), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  md = open(os.path.join(out, 'ladder.md')).read()
  assert 'fashion_mnist' in md and 'cifar10' in md
  # The table's numbers are the table file's numbers.
  assert '| 0 | resnet50 | 81.00 ± 1.41 (n=2) |' in md
  assert '| 2 | stage_ratio | 86.00 ± 0.71 (n=2) | +5.00 |' in md
  assert '| 16 | convnext_t | 90.25 (n=1) | +4.25 ? |' in md
  assert 'kernel_9 (side)' in md
  grn = next(line for line in md.splitlines() if line.startswith('| 17 | grn (side) |'))
  assert grn.startswith('| 17 | grn (side) | 90.50 (n=1) | +0.25 ? |')   # vs convnext_t
  assert grn.endswith('|  |  |')                                        # no paper top-1, GFLOPs
  for name in ('ladder.png', 'ladder_fashion_mnist_cpu_32.png', 'ladder_cifar10_cpu_32.png'):
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 10_000
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_within_noise_marker():
  rows = [_row('resnet50', 0, 80.0), _row('resnet50', 1, 82.0),
          _row('stage_ratio', 0, 80.5), _row('stage_ratio', 1, 82.5)]
  (steps,) = ladder_view.summarize([{k: str(v) for k, v in r.items()} for r in rows]).values()
  assert steps[1]['delta'] == pytest.approx(0.5) and steps[1]['within_noise'] is True


def test_bad_input(tmp_path):
  for args, message in ((('show', '--out', str(tmp_path)), 'no finished runs'),
                        (('run', '--out', str(tmp_path), '--steps', 'resnet51'), 'resnet51'),
                        (('run', '--out', str(tmp_path), '--seeds', '0'), 'seeds')):
    res = subprocess.run(ladder_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and message in res.stderr and 'Traceback' not in res.stderr, \
        res.stderr


def test_a_failing_run_among_parallel_jobs_ends_the_ladder_in_one_line(tmp_path):
  out = tmp_path / 'ladder'
  res = subprocess.run(ladder_cmd('run', '--out', str(out), '--steps', 'resnet50,stage_ratio',
                                  '--options', f'smoke,data=folder:{tmp_path / "missing"}',
                                  '--jobs', '2'),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 2
  assert res.stderr.startswith('error: training ') and res.stderr.count('\n') == 1, res.stderr
  assert not (out / 'steps.csv').exists()
  for step in ('resnet50', 'stage_ratio'):    # each run's output kept in its log, nothing else
    # (and its claim, where it got that far before it failed or was stopped)
    assert set(os.listdir(out / 'runs' / step / 'seed0')) - {'run.lock'} == {'train.log'}
  res = subprocess.run(ladder_cmd('run', '--out', str(out), '--jobs', '0'), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 2 and res.stderr.startswith('error: --jobs')
