"""The input pipeline's worker processes (experiments/data/workers.py): the same batches as threads
and as one thread for any worker count and start step; a worker that dies and a shared-memory area
too small each end a real training run in one line and exit 2, leaving no process behind; a worker
never loads JAX."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.data import pipeline
from experiments.data.augment import AugmentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = AugmentConfig.paper(False)   # pad-crop, flip, RandAugment, erasing: every random draw


def _train(kind, workers, start=0, n=5, **kw):
  it = pipeline.train_batches('fashion_mnist', batch_size=48, seed=3, augment=PAPER,
                              start_step=start, num_workers=workers, worker_kind=kind,
                              num_examples=2000, **kw)
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_processes_build_the_batches_threads_and_one_thread_build(fashion):
  reference = _train('threads', 0)
  assert set(reference[0]) == {'image', 'label', 'erase_box', 'erase_key'}
  assert _equal(_train('threads', 2), reference)
  for workers in (1, 2, 3):
    assert _equal(_train('processes', workers), reference), workers
  # From any step, with another worker count than the run had: what an unbroken stream holds.
  assert _equal(_train('processes', 2, start=3, n=2), reference[3:5])
  assert _equal(_train('processes', 3, start=1, n=3), reference[1:4])
  # Evaluation batches (padded: 500 examples in batches of 3 x 64) too.
  kw = dict(batch_size=64, num_examples=500, image_size=36)
  one = list(pipeline.eval_batches('fashion_mnist', num_workers=0, **kw))
  many = list(pipeline.eval_batches('fashion_mnist', num_workers=3, worker_kind='processes', **kw))
  assert len(one) == 8 and _equal(many, one) and not one[-1]['mask'][-1]
  assert not [f for f in os.listdir('/dev/shm') if f.startswith('modernize-batches-')]


def test_a_worker_loads_no_jax():
  code = ('import sys\nimport experiments.data.workers, experiments.data.pipeline\n'
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax")))')
  res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0 and res.stdout.strip() == '[]', res.stdout + res.stderr


def _children(pid: int) -> set[int]:
  """The live child processes of `pid` (from /proc)."""
  out = set()
  for task in os.listdir(f'/proc/{pid}/task'):
    with open(f'/proc/{pid}/task/{task}/children') as f:
      out |= {int(c) for c in f.read().split()}
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(') ')[1][0] != 'Z'
  except FileNotFoundError:
    return False


def _trainer(tmp_path, *overrides, env=None):
  cmd = [sys.executable, '-m', 'experiments.train', '--config=configs/ladder.py:resnet50,smoke',
         f'--workdir={tmp_path}/run', f'--config.step_table={tmp_path}/steps.csv',
         '--config.data.worker_kind=processes', '--config.data.threads=2', *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **(env or {})})


def test_a_worker_killed_mid_run_ends_the_run_in_one_line(tmp_path, fashion):
  proc = _trainer(tmp_path, '--config.epochs=40', '--config.checkpoint_every_steps=1000')
  deadline = time.time() + 300
  workers = set()
  metrics = tmp_path / 'run' / 'metrics.jsonl'
  while len(workers) < 2 or not (metrics.exists() and metrics.read_text().count('\n') >= 2):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    workers = {c for c in _children(proc.pid) if 'experiments.data.workers' in
               open(f'/proc/{c}/cmdline').read().replace('\0', ' ')}
    time.sleep(0.05)
  for pid in workers:   # no JAX library mapped in a worker
    maps = open(f'/proc/{pid}/maps').read()
    assert 'xla_extension' not in maps and 'jaxlib' not in maps
  victim = min(workers)
  os.kill(victim, signal.SIGKILL)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  assert lines[0].startswith('error: data worker') and 'killed by SIGKILL' in lines[0]
  assert 'while building batch' in lines[0] and 'stored training examples' in lines[0]
  time.sleep(1)
  assert not [p for p in workers if _alive(p)]   # no orphan
  assert not os.path.exists(tmp_path / 'steps.csv')


def test_too_little_shared_memory_is_one_line(tmp_path, fashion, small_disk):
  shm = small_disk('64k')   # the smoke run's 4 slots need about 134 KiB
  proc = _trainer(tmp_path, env={'MODERNIZE_SHM_DIR': shm})
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
  assert f'shared-memory area {shm} cannot hold' in lines[0] and '--shm-size' in lines[0]
  assert os.listdir(shm) == [] and not os.path.exists(tmp_path / 'steps.csv')


@pytest.mark.parametrize('bad', ['fast', 'thread'])
def test_a_bad_worker_kind_is_refused(bad):
  with pytest.raises(ValueError, match='worker kind'):
    _train(bad, 2)
