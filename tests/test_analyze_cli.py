"""experiments.analyze end to end on two smoke runs: outputs, numbers in range, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import analyze

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('resnet50', 'convnext_t')


def _command(*args):
  return [sys.executable, '-m', *args]


def _start(cmd):
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'{proc.args}: exit {proc.returncode}\n{err[-3000:]}')
  return out


@pytest.fixture(scope='module')
def ladder_dir(tmp_path_factory):
  """DIR/runs/{resnet50,convnext_t}/seed0 from smoke training, then both analyses (in parallel)."""
  out = tmp_path_factory.mktemp('ladder')
  trainings = [_start(_command(
      'experiments.train', f'--config=configs/ladder.py:{step},smoke',
      f'--workdir={out}/runs/{step}/seed0', f'--config.step_table={out}/steps.csv'))
      for step in STEPS]
  for proc in trainings:
    _finish(proc)
  analyses = {command: _start(_command('experiments.analyze', command, '--out', str(out),
                                       *(('--num', '500') if command == 'bias' else ())))
              for command in ('cka', 'bias')}
  logs = {command: _finish(proc) for command, proc in analyses.items()}
  return out, logs


def test_cka_outputs(ladder_dir):
  out, logs = ladder_dir
  analysis = out / 'analysis'
  for name in ('cka_resnet50__convnext_t.png', 'cka_within_resnet50.png',
               'cka_within_convnext_t.png', 'cka_steps.png', 'cka_along_ladder.png'):
    assert (analysis / name).stat().st_size > 1000, name
  result = json.loads((analysis / 'cka.json').read_text())
  assert result['steps'] == list(STEPS) and result['num_examples'] == 10000
  assert result['reference'] == {'resnet50': None, 'convnext_t': 'resnet50'}
  assert result['num_batches'] == 40   # 10,000 test images in batches of 256, the last one short
  for step, matrix in result['within'].items():
    m = np.array(matrix)
    assert m.shape == (5, 5) and np.allclose(np.diag(m), 1, atol=1e-4)
    assert np.allclose(m, m.T, atol=1e-5)
  pair = np.array(result['pairs'][0]['matrix'])
  assert pair.shape == (5, 5) and np.all(pair > -0.05) and np.all(pair < 1.05)
  assert result['cka_prev']['resnet50'] is None
  assert 0 < result['cka_prev']['convnext_t'] < 1
  assert result['cka_prev']['convnext_t'] == pytest.approx(np.mean(np.diag(pair)[:4]))
  assert 'CKA to resnet50' in logs['cka']


def test_bias_outputs(ladder_dir):
  out, logs = ladder_dir
  analysis = out / 'analysis'
  for name in ('shape_bias.png', 'error_consistency.png', 'cue_conflict_examples.png'):
    assert (analysis / name).stat().st_size > 1000, name
  result = json.loads((analysis / 'bias.json').read_text())
  assert result['steps'] == list(STEPS) and result['num_test'] == 10000
  assert result['cue_conflict']['num'] == 500
  for step in STEPS:
    b = result['shape_bias'][step]
    assert b['total'] == 500 and b['shape_decisions'] + b['texture_decisions'] <= 500
    assert b['shape_bias'] is None or 0 <= b['shape_bias'] <= 1
    assert 0 <= result['test_accuracy'][step] <= 1
  kappa = np.array(result['error_consistency']['kappa'], dtype=float)
  assert kappa.shape == (2, 2) and np.all((kappa >= -1) & (kappa <= 1))
  assert 'shape bias' in logs['bias']


def test_summary_has_both_columns(ladder_dir):
  out, _ = ladder_dir
  summary = json.loads((out / 'analysis' / 'summary.json').read_text())
  assert set(summary) == set(STEPS)
  for step, entry in summary.items():
    assert set(entry) == {'cka_prev', 'shape_bias'}
  assert summary['resnet50']['cka_prev'] is None
  assert isinstance(summary['convnext_t']['cka_prev'], float)
  bias = json.loads((out / 'analysis' / 'bias.json').read_text())
  assert summary['convnext_t']['shape_bias'] == bias['shape_bias']['convnext_t']['shape_bias']


def test_bad_input_exits_2_in_one_line(ladder_dir, tmp_path):
  out, _ = ladder_dir
  res = subprocess.run(_command('experiments.analyze', 'cka', '--out', str(tmp_path)), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 2
  assert res.stderr.startswith('error: no trained runs') and 'Traceback' not in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1
  for argv, message in (
      (['bias', '--out', str(out), '--steps', 'patchify_stem'], 'no trained run of step'),
      (['cka', '--out', str(out), '--steps', 'resnet_9000'], 'unknown step'),
      (['cka', '--out', str(out), '--seed', '3'], 'no trained run with seed 3'),
      (['cka', '--out', str(tmp_path / 'missing')], 'is not a directory'),
      (['cka', '--out', str(out), '--batch-size', '0'], 'not positive'),
      (['shape'], 'invalid choice')):
    with pytest.raises(SystemExit) as exit_info:
      analyze.main(argv)
    assert exit_info.value.code == 2, argv


def test_bad_input_messages(ladder_dir, capsys):
  out, _ = ladder_dir
  with pytest.raises(SystemExit):
    analyze.main(['cka', '--out', str(out), '--steps', 'patchify_stem,convnext_t'])
  err = capsys.readouterr().err
  assert err.startswith("error: no trained run of step(s) ['patchify_stem'] with seed 0")
  assert len(err.strip().splitlines()) == 1


def test_references_skip_side_branches():
  steps = ['move_up_depthwise', 'kernel_5', 'kernel_7', 'kernel_9', 'kernel_11', 'gelu']
  assert analyze.references(steps) == {
      'move_up_depthwise': None, 'kernel_5': 'move_up_depthwise', 'kernel_7': 'move_up_depthwise',
      'kernel_9': 'kernel_7', 'kernel_11': 'kernel_7', 'gelu': 'kernel_7'}


def test_preprocess_matches_the_test_pipeline():
  from experiments import datasets, pipeline
  images, _ = datasets.load_arrays('fashion_mnist', 'test')
  for size, channels in ((32, 1), (28, 3)):
    batch = next(iter(pipeline.eval_batches('fashion_mnist', batch_size=64, image_size=size,
                                            channels=channels, num_workers=0)))
    mine = analyze.preprocess(images[:64], ('fashion_mnist', '', size, channels))
    theirs = np.asarray(pipeline.model_input(
        batch, pipeline.input_spec('fashion_mnist', channels=channels)))
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine, theirs, atol=1e-6)


def test_merge_summary_keeps_the_other_column(tmp_path):
  analyze.merge_summary(str(tmp_path), 'shape_bias', {'a': 0.25, 'b': float('nan')})
  analyze.merge_summary(str(tmp_path), 'cka_prev', {'a': None, 'c': 0.5})
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary == {'a': {'cka_prev': None, 'shape_bias': 0.25},
                     'b': {'cka_prev': None, 'shape_bias': None},
                     'c': {'cka_prev': 0.5, 'shape_bias': None}}
  with pytest.raises(ValueError):
    analyze.merge_summary(str(tmp_path), 'top1', {})
