"""`ladder calibrate` end to end on smoke runs: what it trains, what it writes, how it chooses."""

import json
import statistics

import pytest

from experiments import ladder
from experiments.cli import UsageError
from experiments.ladder import calibrate
from experiments.training import steptable


def test_calibration_steps_are_the_first_and_last_of_each_recipe():
  assert calibrate.calibration_steps('resnet50', 'original') == ['resnet50']
  assert calibrate.calibration_steps('resnet50', 'enhanced') == ['enhanced_recipe', 'convnext_t']
  # A transformer reference is calibrated alone, under the enhanced recipe only.
  assert calibrate.calibration_steps('resnet50', 'enhanced', ['vit_s']) == ['vit_s']
  for recipe, references in (('original', ['swin_t']), ('enhanced', ['convnext_t'])):
    with pytest.raises(UsageError, match='the references are swin_t,vit_s'):
      calibrate.calibration_steps('resnet50', recipe, references)


def test_calibrate_a_reference(tmp_path, capsys):
  """`calibrate --references swin_t` trains that reference alone for each setting."""
  out = tmp_path / 'cal'
  assert ladder.main(['calibrate', '--out', str(out), '--recipe', 'enhanced', '--validation', '64',
                      '--references', 'swin_t', '--grid', 'optimizer.base_lr=1e-3,2e-3',
                      '--options', 'smoke']) == 0
  result = json.loads((out / 'calibration.json').read_text())
  assert result['steps'] == ['swin_t'] and len(result['tried']) == 2
  for setting in ('optimizer.base_lr=1e-3', 'optimizer.base_lr=2e-3'):
    rows = steptable.read_rows(str(out / setting / 'steps.csv'))
    assert [r['step'] for r in rows] == ['swin_t'] and rows[0]['validation'] == '64'


def test_grid():
  grid = calibrate.parse_grid(['optimizer.base_lr=1e-3, 2e-3', 'model.layer_scale_init=1e-6,0.1'])
  assert grid == [('optimizer.base_lr', ['1e-3', '2e-3']),
                  ('model.layer_scale_init', ['1e-6', '0.1'])]
  assert calibrate.settings(grid) == [
      {'optimizer.base_lr': a, 'model.layer_scale_init': b}
      for a in ('1e-3', '2e-3') for b in ('1e-6', '0.1')]
  for bad in (['x'], ['a=,'], ['=1'], ['a=1', 'a=2'], ['a b=1']):
    with pytest.raises(UsageError):
      calibrate.parse_grid(bad)


def test_calibrate_end_to_end(tmp_path, capsys):
  out = tmp_path / 'cal'
  code = ladder.main(['calibrate', '--out', str(out), '--recipe', 'original', '--validation',
                      '200', '--seeds', '2', '--grid', 'optimizer.base_lr=0.01,0.1',
                      '--options', 'smoke'])
  assert code == 0
  result = json.loads((out / 'calibration.json').read_text())
  trials = [json.loads(l) for l in (out / 'trials.jsonl').read_text().splitlines()]
  assert result['steps'] == ['resnet50'] and result['validation'] == 200
  assert len(trials) == 2 * 2                     # settings x seeds x steps
  # The choice, recomputed from the trials: the highest mean validation top-1.
  means = {}
  for lr in ('0.01', '0.1'):
    means[lr] = statistics.fmean(t['val_top1'] for t in trials
                                 if t['setting'] == {'optimizer.base_lr': lr})
  assert [t['mean_val_top1'] for t in result['tried']] == pytest.approx(list(means.values()))
  assert result['chosen'] == {'optimizer.base_lr': max(means, key=means.get)}
  # Each trial is an ordinary run with the hold-out and the setting; the test split is not shown.
  for lr in ('0.01', '0.1'):
    rows = steptable.read_rows(str(out / f'optimizer.base_lr={lr}' / 'steps.csv'))
    assert sorted(int(r['seed']) for r in rows) == [0, 1]
    assert all(r['validation'] == '200' and r['val_top1'] for r in rows)
    config = json.loads((out / f'optimizer.base_lr={lr}' / 'runs' / 'resnet50' / 'seed0' /
                         'config.json').read_text())
    assert config['optimizer']['base_lr'] == float(lr) and config['data']['validation'] == 200
  assert 'top1' not in json.dumps(result).replace('val_top1', '')
  assert 'chosen' in capsys.readouterr().out
  # Rerunning trains nothing new and chooses the same.
  assert ladder.main(['calibrate', '--out', str(out), '--recipe', 'original', '--validation',
                      '200', '--seeds', '2', '--grid', 'optimizer.base_lr=0.01,0.1',
                      '--options', 'smoke']) == 0
  assert json.loads((out / 'calibration.json').read_text())['chosen'] == result['chosen']
  assert 'already in' in capsys.readouterr().out


def test_calibrate_grid_of_a_config_option(tmp_path):
  # A field without a dot is a config option after the step name.
  out = tmp_path / 'cal'
  result = calibrate.calibrate(str(out), recipe='original', grid=[('longer', ['0.5', '1'])],
                               validation=100, options='smoke')
  assert [t['setting'] for t in result['tried']] == [{'longer': '0.5'}, {'longer': '1'}]
  epochs = [json.loads((out / f'longer={f}' / 'runs' / 'resnet50' / 'seed0' / 'config.json')
                       .read_text())['epochs'] for f in ('0.5', '1')]
  assert epochs[1] == 2 * epochs[0] > 0


def test_calibrate_bad_input(tmp_path, capsys):
  for args in (['--validation', '0', '--grid', 'optimizer.base_lr=1'],
               ['--validation', '10', '--grid', 'data.validation=1'],
               ['--validation', '10', '--grid', 'optimizer.base_lr=1',
                '--set', 'optimizer.base_lr=2'],
               ['--validation', '10', '--grid', 'longer=1,2', '--options', 'smoke,longer=2']):
    with pytest.raises(SystemExit) as e:
      ladder.main(['calibrate', '--out', str(tmp_path), '--recipe', 'original', *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1


def test_plateau_check(tmp_path, capsys):
  out = tmp_path / 'plateau'
  assert ladder.main(['run', '--plateau-check', '--out', str(out), '--steps', 'resnet50',
                      '--seeds', '2', '--options', 'smoke', '--set', 'data.validation=100']) == 0
  result = json.loads((out / 'plateau.json').read_text())
  entry = result['steps']['resnet50']
  for name, factor in (('1x', 1), ('2x', 2)):
    rows = steptable.read_rows(str(out / name / 'steps.csv'))
    assert sorted(int(r['seed']) for r in rows) == [0, 1]
    assert {float(r['epochs']) for r in rows} == {0.5 * factor}   # smoke trains 0.5 epochs
    assert entry[f'top1_{name}'] == pytest.approx(statistics.fmean(float(r['top1']) for r in rows))
    assert entry[f'val_top1_{name}'] == pytest.approx(
        statistics.fmean(float(r['val_top1']) for r in rows))
  assert entry['top1_change'] == pytest.approx(entry['top1_2x'] - entry['top1_1x'])
  assert 'resnet50' in capsys.readouterr().out


def test_plateau_check_refuses_a_length_it_could_not_double(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    ladder.main(['run', '--plateau-check', '--out', str(tmp_path), '--steps', 'resnet50',
                 '--options', 'smoke', '--set', 'epochs=3'])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'epochs=X' in err and err.count('\n') == 1
  assert not (tmp_path / '1x').exists()
