"""OUT/ladder.json, written by the ladder view: checked against the step table it comes from."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from experiments.ladder import view as ladder_view
from experiments.training import steptable
from modernize import LADDER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# fashion_mnist: top-1 per seed of each step (ladder order; kernel_9 is a side branch).
TOP1 = {
    'resnet50': [80.0, 80.2, 79.8],
    'enhanced_recipe': [85.0, 85.1, 84.9],        # +5.0: clearly resolved, the paper's way
    'stage_ratio': [84.9, 85.9, 85.55],           # +0.45: within the noise (1.5 standard errors)
    'depthwise': [87.0, 87.2, 86.8],              # +1.55 over stage_ratio: resolved, against
    'kernel_9': [86.8, 87.2],                     # side branch: no change from depthwise
    'convnext_t': [90.0],                         # one seed: no noise estimate
}


def _row(step, seed, top1, data='fashion_mnist', size=32, **extra):
  return {'ladder': 'resnet50', 'step': step, 'step_index': LADDER.index(step), 'seed': seed,
          'data': data, 'image_size': size, 'scale': 'cpu', 'params': 1000 + LADDER.index(step),
          'gmacs': 0.01, 'top1': top1, 'top5': 99.0, 'train_img_per_s': 100.0, 'wall_s': 10.0,
          **extra}


def _rows():
  rows = [_row(step, seed, v) for step, values in TOP1.items() for seed, v in enumerate(values)]
  # Another data set: a step whose only run has no top-1, then a single-seed step.
  return rows + [_row('resnet50', 0, '', data='cifar10'), _row('convnext_t', 0, 75.0,
                                                                data='cifar10')]


def _show(tmp_path, rows, write=None):
  table = str(tmp_path / 'steps.csv')
  if write is None:
    for r in rows:
      steptable.append_row(table, r)
  else:
    write(table, rows)
  out = str(tmp_path / 'view')
  _, written = ladder_view.show(out, table)
  path = os.path.join(out, 'ladder.json')
  assert path in written
  with open(path) as f:
    text = f.read()
  assert 'NaN' not in text and 'Infinity' not in text
  return json.loads(text, parse_constant=pytest.fail), table, out


def _group(doc, data):
  (group,) = [g for g in doc['groups'] if g['data'] == data]
  return group


def _by_name(group):
  return {s['name']: s for s in group['steps']}


def _expected(table, data):
  """Per step of `data`, computed here from the CSV file: mean, std, n and the adopted step each
  step is compared with."""
  with open(table, newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['data'] == data]
  values = {}
  for r in rows:
    values.setdefault(r['step'], [])
    if r['top1']:
      values[r['step']].append(float(r['top1']))
  expected, previous = {}, None
  for step in LADDER.steps:
    if step.name not in values:
      continue
    v = values[step.name]
    expected[step.name] = {
        'n': len(v), 'mean': statistics.mean(v) if v else None,
        'std': statistics.stdev(v) if len(v) > 1 else None, 'previous': previous,
        'paper_top1': step.paper_top1, 'adopted': step.adopted}
    if step.adopted:
      previous = step.name
  return expected


def test_json_agrees_with_the_table(tmp_path):
  doc, table, out = _show(tmp_path, _rows())
  assert [(g['ladder'], g['data'], g['scale'], g['image_size']) for g in doc['groups']] == [
      ('resnet50', 'fashion_mnist', 'cpu', 32), ('resnet50', 'cifar10', 'cpu', 32)]
  assert not [name for name in os.listdir(out) if name.endswith('.tmp')]
  for data in ('fashion_mnist', 'cifar10'):
    group, expected = _group(doc, data), _expected(table, data)
    # Every step of the table, once, in ladder order.
    assert [s['name'] for s in group['steps']] == list(expected)
    assert [s['index'] for s in group['steps']] == [LADDER.index(n) for n in expected]
    for s in group['steps']:
      e = expected[s['name']]
      step = LADDER.step(s['name'])
      assert (s['label'], s['group'], s['adopted']) == (step.label, step.group, step.adopted)
      assert s['n'] == e['n'] and s['params'] == 1000 + s['index'] and s['gmacs'] == 0.01
      assert s['mean'] == pytest.approx(e['mean'])
      assert s['std'] == pytest.approx(e['std'])
      se = None if e['std'] is None else e['std'] / math.sqrt(e['n'])
      assert s['se'] == pytest.approx(se)
      assert s['paper_top1'] == e['paper_top1']
      assert s['val_mean'] is None and s['val_std'] is None     # no val_top1 column
      prev = expected.get(e['previous'])
      if prev is None or e['mean'] is None or prev['mean'] is None:
        assert s['delta'] is None
      else:
        assert s['delta'] == pytest.approx(e['mean'] - prev['mean'])
      if prev is None or e['std'] is None or prev['std'] is None:
        assert s['delta_se'] is None and s['resolved'] is None
      else:
        delta_se = math.sqrt(e['std'] ** 2 / e['n'] + prev['std'] ** 2 / prev['n'])
        assert s['delta_se'] == pytest.approx(delta_se)
        assert s['resolved'] is (abs(s['delta']) > 2 * delta_se)
      if prev is None:
        assert s['paper_delta'] is None and s['agrees_with_paper'] is None
      else:
        paper_delta = e['paper_top1'] - prev['paper_top1']
        assert s['paper_delta'] == pytest.approx(paper_delta)
        agrees = (s['delta'] > 0) == (paper_delta > 0) if s['delta'] and paper_delta else None
        assert s['agrees_with_paper'] is agrees


def test_resolved_within_noise_single_seed_and_paper(tmp_path):
  doc, _, _ = _show(tmp_path, _rows())
  group = _group(doc, 'fashion_mnist')
  steps = _by_name(group)
  p = {s.name: s.paper_top1 for s in LADDER.steps}

  first = steps['resnet50']
  assert first['mean'] == pytest.approx(80.0) and first['std'] == pytest.approx(0.2)
  assert first['delta'] is first['paper_delta'] is first['agrees_with_paper'] is None

  resolved = steps['enhanced_recipe']
  assert resolved['delta'] == pytest.approx(5.0)
  assert resolved['delta_se'] == pytest.approx(math.sqrt(0.2 ** 2 / 3 + 0.1 ** 2 / 3))
  assert resolved['resolved'] is True
  assert resolved['paper_delta'] == pytest.approx(p['enhanced_recipe'] - p['resnet50'])
  assert resolved['agrees_with_paper'] is True

  within = steps['stage_ratio']
  assert within['delta'] == pytest.approx(0.45)
  assert within['delta_se'] < within['delta'] < 2 * within['delta_se']
  assert within['resolved'] is False
  assert within['paper_delta'] == pytest.approx(p['stage_ratio'] - p['enhanced_recipe'])
  assert within['agrees_with_paper'] is True           # but, unresolved, not counted below

  # patchify_stem is not in the table: depthwise compares with stage_ratio, and so does the paper.
  against = steps['depthwise']
  assert against['delta'] == pytest.approx(1.55) and against['resolved']
  assert against['paper_delta'] == pytest.approx(p['depthwise'] - p['stage_ratio'])
  assert against['agrees_with_paper'] is False

  side = steps['kernel_9']
  assert side['adopted'] is False and side['delta'] == pytest.approx(0.0, abs=1e-9)
  assert side['paper_delta'] == pytest.approx(p['kernel_9'] - p['depthwise'])
  assert side['agrees_with_paper'] is None                # no change has no sign

  single = steps['convnext_t']                         # after the side branch: vs depthwise
  assert single['n'] == 1 and single['mean'] == pytest.approx(90.0)
  assert single['std'] is single['se'] is single['delta_se'] is single['resolved'] is None
  assert single['delta'] == pytest.approx(3.0)
  assert single['paper_delta'] == pytest.approx(p['convnext_t'] - p['depthwise'])
  assert single['agrees_with_paper'] is True

  # Adopted changes: enhanced_recipe, stage_ratio, depthwise, convnext_t; two resolved, one of
  # them the paper's way.
  assert group['summary'] == {'changes': 4, 'resolved': 2, 'resolved_agree': 1}

  empty = _group(doc, 'cifar10')
  assert [s['mean'] for s in empty['steps']] == [None, 75.0]
  assert empty['steps'][1]['delta'] is None and empty['steps'][1]['agrees_with_paper'] is None
  assert empty['steps'][1]['paper_delta'] == pytest.approx(p['convnext_t'] - p['resnet50'])
  assert empty['summary'] == {'changes': 0, 'resolved': 0, 'resolved_agree': 0}


def _write_with_val(table, rows):
  """A step table with a val_top1 column (whether or not steptable has it yet)."""
  columns = list(steptable.COLUMNS) + ['val_top1'] * ('val_top1' not in steptable.COLUMNS)
  with open(table, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, restval='')
    writer.writeheader()
    writer.writerows(rows)


def test_val_top1_column(tmp_path):
  rows = [_row('resnet50', 0, 80.0), _row('resnet50', 1, 80.4),       # an older run: no val_top1
          _row('stage_ratio', 0, 85.0, val_top1=84.0), _row('stage_ratio', 1, 85.2, val_top1=84.5),
          _row('stage_ratio', 2, 85.1, val_top1=''),                   # one empty cell
          _row('convnext_t', 0, 90.0, val_top1=88.25)]
  doc, _, _ = _show(tmp_path, rows, write=_write_with_val)
  steps = _by_name(_group(doc, 'fashion_mnist'))
  assert steps['resnet50']['val_mean'] is None and steps['resnet50']['val_std'] is None
  assert steps['stage_ratio']['val_mean'] == pytest.approx(84.25)
  assert steps['stage_ratio']['val_std'] == pytest.approx(statistics.stdev([84.0, 84.5]))
  assert steps['stage_ratio']['n'] == 3                  # test top-1 still counts every seed
  assert steps['convnext_t']['val_mean'] == pytest.approx(88.25)
  assert steps['convnext_t']['val_std'] is None


def test_cli_show_writes_json(tmp_path):
  table = str(tmp_path / 'steps.csv')
  for r in (_row('resnet50', 0, 80.0), _row('resnet50', 1, 82.0), _row('stage_ratio', 0, 85.5),
            _row('stage_ratio', 1, 86.5)):
    steptable.append_row(table, r)
  out = str(tmp_path / 'view')
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'show', '--out', out,
                        '--table', table], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  path = os.path.join(out, 'ladder.json')
  assert f'wrote {path}' in res.stderr and res.stdout.startswith('### resnet50 ladder')
  with open(path) as f:
    (group,) = json.load(f)['groups']
  assert [(s['name'], s['n']) for s in group['steps']] == [('resnet50', 2), ('stage_ratio', 2)]
  assert group['steps'][1]['delta'] == pytest.approx(5.0)
  assert group['steps'][1]['resolved'] is True and group['steps'][1]['agrees_with_paper'] is True
