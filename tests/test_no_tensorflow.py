"""The trainer, `ladder run` and `show` on Fashion-MNIST with TensorFlow and tensorflow-datasets
unimportable, as on an accelerator image that ships neither (`analyze` and `ladder run
--references` without them: tests/test_analyze_cli.py)."""

import json
import os
import subprocess
import sys

import pytest
from test_analyze_cli import FINAL_CHECKPOINT_ONLY

from experiments.training import steptable
from modernize import LADDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def without_tensorflow(no_tensorflow_env):
  """Runs `python ARGS...` without TensorFlow (conftest.py's `no_tensorflow_env`)."""
  env = no_tensorflow_env

  def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f'{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}'
    return proc.stdout
  return run


def test_the_blocker_blocks(without_tensorflow):
  out = without_tensorflow('-c', 'import importlib.util as u; print(u.find_spec("tensorflow"), '
                           'u.find_spec("tensorflow_datasets"))\n'
                           'try:\n  import tensorflow_datasets\nexcept ImportError:\n'
                           '  print("unimportable")')
  assert out.split() == ['None', 'None', 'unimportable']


def test_full_ladder_on_smoke_without_tensorflow(without_tensorflow, tmp_path):
  """Every adopted step of the main ladder trains (two runs at a time, each its own `python -m
  experiments.train` process, with a validation split), the view renders it and a second run
  trains nothing: all without TensorFlow. (Each side branch's network trains in
  tests/test_network.py; the view's side-branch rows: tests/test_ladder.py.)"""
  out = tmp_path / 'ladder'
  jobs = str(min(2, len(os.sched_getaffinity(0))))
  # Only the final checkpoint (saving every 4 steps is a quarter of a smoke run's CPU; resuming
  # is tested elsewhere).
  without_tensorflow('-m', 'experiments.ladder', 'run', '--out', str(out), '--options', 'smoke',
                     '--set', 'data.validation=500', *FINAL_CHECKPOINT_ONLY, '--jobs', jobs,
                     '--show', timeout=1500)
  rows = steptable.read_rows(str(out / 'steps.csv'))
  adopted = LADDER.names(include_side=False)
  assert sorted(r['step'] for r in rows) == sorted(adopted)   # in the order they finished
  assert all(r['validation'] == '500' and r['data'] == 'fashion_mnist' for r in rows)
  md = (out / 'ladder.md').read_text()
  table_rows = [line for line in md.splitlines() if line.startswith('| ') and line[2].isdigit()]
  assert len(table_rows) == len(adopted) == 14 and not any('(side)' in l for l in table_rows)
  assert (out / 'ladder.png').stat().st_size > 10_000
  summary = json.loads((out / 'ladder.json').read_text())
  assert [s['name'] for s in summary['groups'][0]['steps']] == adopted
  # A second run trains nothing.
  again = without_tensorflow('-m', 'experiments.ladder', 'run', '--out', str(out), '--options',
                             'smoke', '--set', 'data.validation=500', *FINAL_CHECKPOINT_ONLY)
  assert '0 to train' in again
  assert len(steptable.read_rows(str(out / 'steps.csv'))) == 14
