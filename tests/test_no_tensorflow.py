"""The trainer, `ladder run` / `show` and `analyze` on Fashion-MNIST with TensorFlow and
tensorflow-datasets unimportable, as on an accelerator image that ships neither."""

import json
import os
import subprocess
import sys

import pytest

from experiments import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Put first on the path of every process of the run (the ladder's isolated trainings included):
# to `import` and to `importlib.util.find_spec` the packages look absent.
BLOCKER = '''import sys
for name in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None
'''


@pytest.fixture(scope='module')
def without_tensorflow(tmp_path_factory):
  try:
    datasets.fashion_mnist_dir()
  except datasets.DatasetUnavailable as e:
    pytest.skip(str(e))
  blocker = tmp_path_factory.mktemp('blocker')
  (blocker / 'sitecustomize.py').write_text(BLOCKER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), ROOT]),
             HOME=str(tmp_path_factory.mktemp('home')))
  env.pop('TFDS_DATA_DIR', None)

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


def test_train_ladder_and_analyze_without_tensorflow(without_tensorflow, tmp_path):
  out = tmp_path / 'ladder'
  # --isolate: each run is `python -m experiments.train` in its own process.
  without_tensorflow('-m', 'experiments.ladder', 'run', '--out', str(out), '--isolate',
                     '--steps', 'resnet50,convnext_t', '--seeds', '1', '--options', 'smoke',
                     '--set', 'data.validation=500', '--show')
  rows = (out / 'steps.csv').read_text().splitlines()
  assert len(rows) == 3 and rows[1].startswith('resnet50,resnet50,0,0,fashion_mnist,')
  summary = json.loads((out / 'ladder.json').read_text())
  assert [s['name'] for s in summary['groups'][0]['steps']] == ['resnet50', 'convnext_t']
  without_tensorflow('-m', 'experiments.analyze', 'cka', '--out', str(out))
  without_tensorflow('-m', 'experiments.analyze', 'bias', '--out', str(out), '--num', '200')
  cka = json.loads((out / 'analysis' / 'cka.json').read_text())
  assert cka['steps'] == ['resnet50', 'convnext_t'] and cka['num_examples'] == 10000
  assert (out / 'analysis' / 'bias.json').exists()
