"""`ladder compare A B` on hand-made step tables, against deltas and standard errors computed here
from the definitions (mean over seeds, SE = sample std / sqrt(n), SE of a difference = the root of
the sum of squares): one change resolved at both budgets, one within the noise, one flipped."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from experiments.cli import UsageError
from experiments.ladder import compare
from experiments.training import steptable
from modernize import LADDER, LADDER_200

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# top-1 per seed (3 seeds) of four adopted steps, at two budgets.
A = {'resnet50': [80.0, 80.2, 79.8], 'enhanced_recipe': [82.0, 82.1, 81.9],
     'stage_ratio': [82.1, 82.5, 81.6], 'patchify_stem': [83.0, 83.1, 82.9]}
B = {'resnet50': [84.0, 84.2, 83.8], 'enhanced_recipe': [86.0, 86.2, 85.8],
     'stage_ratio': [86.5, 86.6, 86.4], 'patchify_stem': [85.0, 85.1, 84.9]}


def _write(path, values, ladder=LADDER, epochs=4, scale='cpu'):
  for step, top1s in values.items():
    for seed, top1 in enumerate(top1s):
      steptable.append_row(str(path), {
          'ladder': ladder.name, 'step': step, 'step_index': ladder.index(step), 'seed': seed,
          'data': 'fashion_mnist', 'image_size': 32, 'scale': scale, 'epochs': epochs,
          'params': 1000, 'gmacs': 0.002, 'top1': top1, 'train_img_per_s': 1.0, 'wall_s': 1.0,
          'config_hash': f'{step}-{epochs}-{scale}', 'workdir': f'runs/{scale}/{step}/seed{seed}'})
  return str(path)


def _delta(values, previous, step):
  se = [statistics.stdev(values[s]) / math.sqrt(len(values[s])) for s in (previous, step)]
  return (statistics.fmean(values[step]) - statistics.fmean(values[previous]),
          math.hypot(*se))


def test_compare_matches_deltas_computed_from_the_definitions(tmp_path):
  a = _write(tmp_path / 'a.csv', A, epochs=4)
  b = _write(tmp_path / 'b.csv', B, epochs=16)
  result, written = compare.run(a, b, str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == ['compare.json', 'compare.md', 'compare.png']
  assert json.loads((tmp_path / 'out' / 'compare.json').read_text())['summary'] == \
      result['summary']
  by = {c['step']: c for c in result['changes']}
  assert list(by) == ['enhanced_recipe', 'stage_ratio', 'patchify_stem']
  for c in result['changes']:
    for side, values in (('a', A), ('b', B)):
      delta, se = _delta(values, c['from'], c['step'])
      assert c[side]['delta'] == pytest.approx(delta, abs=1e-9)
      assert c[side]['delta_se'] == pytest.approx(se, abs=1e-9)
      assert c[side]['resolved'] == (abs(delta) > 2 * se)
    da, sa = _delta(A, c['from'], c['step'])
    db, sb = _delta(B, c['from'], c['step'])
    assert c['difference'] == pytest.approx(db - da, abs=1e-9)
    assert c['difference_se'] == pytest.approx(math.hypot(sa, sb), abs=1e-9)
    paper = LADDER.step(c['step']).paper_top1 - LADDER.step(c['from']).paper_top1
    assert c['paper_delta'] == pytest.approx(paper, abs=1e-9)
  # The three kinds, as built: resolved at both and kept; in the noise at A; flipped (resolved).
  assert by['enhanced_recipe']['a']['resolved'] and by['enhanced_recipe']['b']['resolved']
  assert by['enhanced_recipe']['sign'] == 'kept'
  assert by['stage_ratio']['a']['resolved'] is False and by['stage_ratio']['b']['resolved']
  assert by['patchify_stem']['sign'] == 'flipped' and by['patchify_stem']['flip_resolved']
  assert by['patchify_stem']['a']['agrees_with_paper'] is True        # the paper: +0.15
  assert by['patchify_stem']['b']['agrees_with_paper'] is False
  assert result['summary'] == {
      'changes': 3, 'resolved_a': 2, 'resolved_b': 3, 'resolved_agree_a': 2,
      'resolved_agree_b': 2, 'kept': 2, 'flipped': 1, 'flipped_resolved': 1,
      'difference_resolved': sum(c['difference_resolved'] for c in result['changes'])}
  assert result['a']['label'] == 'fashion_mnist 32px scale cpu, 4 epochs'
  assert result['b']['label'] == 'fashion_mnist 32px scale cpu, 16 epochs'
  md = (tmp_path / 'out' / 'compare.md').read_text()
  assert '| patchify_stem | +0.15 |' in md and 'flipped (both resolved)' in md


def test_compare_takes_only_changes_both_tables_measure(tmp_path):
  """A step missing from one table: the change into it and out of it are left out there (the
  delta of B's next step would span two changes)."""
  b_values = {k: v for k, v in B.items() if k != 'stage_ratio'}
  result = compare.compare(_write(tmp_path / 'a.csv', A), _write(tmp_path / 'b.csv', b_values))
  assert [c['step'] for c in result['changes']] == ['enhanced_recipe']


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.ladder', 'compare', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
  a = _write(tmp_path / 'a.csv', A)
  other_ladder = _write(tmp_path / 'r200.csv', {'resnet200': [80.0], 'enhanced_recipe': [81.0]},
                        ladder=LADDER_200)
  no_overlap = _write(tmp_path / 'c.csv', {'resnet50': [1.0], 'depthwise': [2.0]})
  two_groups = _write(tmp_path / 'd.csv', {'resnet50': [1.0], 'enhanced_recipe': [2.0]})
  _write(tmp_path / 'd.csv', {'resnet50': [1.0], 'enhanced_recipe': [2.0]}, scale='tiny')
  for b, message in ((other_ladder, 'compare takes two of one ladder'),
                     (no_overlap, 'share no change'),
                     (two_groups, 'holds 2 ladders'),
                     (str(tmp_path / 'missing'), 'no step table')):
    res = _cli(a, b, '--out', str(tmp_path / 'out'))
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(UsageError, match='share no change'):
    compare.compare(a, no_overlap)


def test_print_writes_nothing(tmp_path):
  """`compare --print` and `show --print` (what the docs quote) print the table, write no file."""
  _write(tmp_path / 'a' / 'steps.csv', A)
  _write(tmp_path / 'b' / 'steps.csv', B, epochs=16)
  res = _cli(str(tmp_path / 'a'), str(tmp_path / 'b'), '--print')
  assert res.returncode == 0 and '| patchify_stem | +0.15 |' in res.stdout, res.stderr
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'show', '--out',
                        str(tmp_path / 'b'), '--print'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0 and '| 3 | patchify_stem | 85.00 ± 0.10 (n=3) |' in res.stdout
  assert os.listdir(tmp_path / 'b') == ['steps.csv'] and os.listdir(tmp_path / 'a') == [
      'steps.csv']
