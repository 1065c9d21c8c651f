"""experiments.analyze end to end on a smoke ladder of two steps and the two transformer
references (`ladder run --references`, also checked here: its rows, its view, a rerun, a trained
reference loading back): outputs, numbers in range, the comparison with the references, bad
input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs.ladder import get_config
from experiments import analyze
from experiments.training import runconfig, steptable
from experiments.training.checkpoint import load_numpy, load_trained_model
from modernize.transformers import VisionTransformer, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('resnet50', 'convnext_t')
REFERENCES = ('swin_t', 'vit_s')
# Only each run's final checkpoint: saving every 4 steps is a quarter of a smoke run's CPU, and
# nothing here resumes.
FINAL_CHECKPOINT_ONLY = ('--set', 'checkpoint_every_steps=100000')


def _command(*args):
  return [sys.executable, '-m', *args]


def _start(cmd, env=None):
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'{proc.args}: exit {proc.returncode}\n{err[-3000:]}')
  return out


@pytest.fixture(scope='module')
def ladder_dir(tmp_path_factory, no_tensorflow_env):
  """`ladder run --references --options smoke --steps resnet50,convnext_t --show` (DIR/runs/STEP/
  seed0 for the two steps and the two references), then both analyses against the references (in
  parallel; `cka` on the first 1,000 test images, with its seed baseline against seed 0 itself,
  where every value must be 1); all without TensorFlow (conftest.py)."""
  out = tmp_path_factory.mktemp('ladder')
  logs = {'run': _finish(_start(_command(
      'experiments.ladder', 'run', '--out', str(out), '--references', '--options', 'smoke',
      '--steps', ','.join(STEPS), *FINAL_CHECKPOINT_ONLY, '--jobs', '2', '--show'),
      no_tensorflow_env), timeout=900)}
  analyses = {command: _start(_command('experiments.analyze', command, '--out', str(out),
                                       '--reference', ','.join(REFERENCES),
                                       *(('--num', '500') if command == 'bias' else
                                         ('--baseline-seed', '0', '--examples', '1000'))),
                              no_tensorflow_env)
              for command in ('cka', 'bias')}
  logs.update({command: _finish(proc) for command, proc in analyses.items()})
  return out, logs


def test_cka_outputs(ladder_dir):
  out, logs = ladder_dir
  analysis = out / 'analysis'
  for name in ('cka_resnet50__convnext_t.png', 'cka_within_resnet50.png',
               'cka_within_convnext_t.png', 'cka_steps.png', 'cka_along_ladder.png'):
    assert (analysis / name).stat().st_size > 1000, name
  result = json.loads((analysis / 'cka.json').read_text())
  assert result['steps'] == list(STEPS) and result['num_examples'] == 1000   # --examples 1000
  assert result['reference'] == {'resnet50': None, 'convnext_t': 'resnet50'}
  assert result['num_batches'] == 4   # 1,000 test images in batches of 256, the last one short
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
  assert set(result['test_accuracy']) == set(STEPS + REFERENCES)
  assert all(0 <= v <= 1 for v in result['test_accuracy'].values())
  assert (analysis / 'cka_to_reference.png').stat().st_size > 1000


def test_cka_seed_baseline(ladder_dir):
  """--baseline-seed 0 on seed-0 runs: each step and reference against itself, 1 at every layer."""
  out, logs = ladder_dir
  result = json.loads((out / 'analysis' / 'cka.json').read_text())
  baseline = result['seed_baseline']
  assert baseline['seed'] == 0 and set(baseline['per_layer']) == set(STEPS + REFERENCES)
  for name, layers in baseline['per_layer'].items():
    assert [layers[layer] for layer in result['layers']] == pytest.approx([1.0] * 5, abs=1e-4)
    assert baseline['mean'][name] == pytest.approx(1.0, abs=1e-4)
  assert baseline['test_accuracy'] == result['test_accuracy']
  assert 'swin_t                 to its seed 0: 1.000' in logs['cka']


def test_cka_against_the_references(ladder_dir):
  """Every step's layers against each transformer's: Swin stage by stage, ViT (4 blocks at scale
  tiny) by depth fraction; the matched values are the diagonal of each pair's matrix."""
  out, logs = ladder_dir
  result = json.loads((out / 'analysis' / 'cka.json').read_text())
  assert result['references'] == list(REFERENCES)
  assert result['reference_layers'] == {
      'swin_t': ['stage1', 'stage2', 'stage3', 'stage4', 'logits'],
      'vit_s': ['block 1 of 4', 'block 2 of 4', 'block 3 of 4', 'block 4 of 4', 'logits']}
  pairs = {(p['a'], p['b']): np.array(p['matrix']) for p in result['reference_pairs']}
  assert sorted(pairs) == sorted((r, s) for r in REFERENCES for s in STEPS)
  for (ref, step), matrix in pairs.items():
    assert matrix.shape == (5, 5) and np.all(matrix > -0.05) and np.all(matrix < 1.05)
    matched = result['to_reference'][ref][step]
    assert [matched[layer] for layer in result['layers']] == pytest.approx(np.diag(matrix))
    assert result['cka_reference'][ref][step] == pytest.approx(np.mean(np.diag(matrix)[:4]))
  for ref in REFERENCES:   # a reference against itself: 1 on the diagonal
    within = np.array(result['reference_within'][ref])
    assert np.allclose(np.diag(within), 1, atol=1e-4)
  # The references' rows are their own, not a step's: no pair equals a block among the steps.
  steps_only = [np.array(m) for m in result['within'].values()]
  steps_only += [np.array(p['matrix']) for p in result['pairs']]
  steps_only += [m.T for m in steps_only]
  for matrix in pairs.values():
    assert not any(np.allclose(matrix, m, atol=1e-3) for m in steps_only)
  for step in STEPS:
    assert f'to swin_t: {result["cka_reference"]["swin_t"][step]:.3f}' in logs['cka']


def test_bias_outputs(ladder_dir):
  out, logs = ladder_dir
  analysis = out / 'analysis'
  for name in ('shape_bias.png', 'error_consistency.png', 'cue_conflict_examples.png'):
    assert (analysis / name).stat().st_size > 1000, name
  result = json.loads((analysis / 'bias.json').read_text())
  assert result['steps'] == list(STEPS) and result['num_test'] == 10000
  assert result['references'] == list(REFERENCES)
  assert result['cue_conflict']['num'] == 500
  for step in STEPS + REFERENCES:
    b = result['shape_bias'][step]
    assert b['total'] == 500 and b['shape_decisions'] + b['texture_decisions'] <= 500
    assert b['shape_bias'] is None or 0 <= b['shape_bias'] <= 1
    assert 0 <= result['test_accuracy'][step] <= 1
  models = result['error_consistency']['models']
  assert models == list(STEPS + REFERENCES)
  kappa = np.array(result['error_consistency']['kappa'], dtype=float)
  assert kappa.shape == (4, 4) and np.all((kappa >= -1) & (kappa <= 1))
  assert np.allclose(np.diag(kappa), 1)
  for ref in REFERENCES:
    for step in STEPS:
      assert result['error_consistency_to_reference'][ref][step] == \
          kappa[models.index(ref), models.index(step)]
  assert 'shape bias' in logs['bias'] and 'kappa to vit_s' in logs['bias']


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


def test_bad_input_exits_2_in_one_line(ladder_dir, tmp_path, capsys):
  out, _ = ladder_dir
  no_references = tmp_path / 'steps_only'   # the ladder's resnet50 run without the references
  (no_references / 'runs').mkdir(parents=True)
  (no_references / 'runs' / 'resnet50').symlink_to(out / 'runs' / 'resnet50')
  mixed = tmp_path / 'mixed'   # resnet50 as trained; convnext_t and swin_t "on cifar10"
  (mixed / 'runs').mkdir(parents=True)
  (mixed / 'runs' / 'resnet50').symlink_to(out / 'runs' / 'resnet50')
  for name in ('convnext_t', 'swin_t'):
    run = mixed / 'runs' / name / 'seed0'
    run.mkdir(parents=True)
    (run / 'checkpoints').symlink_to(out / 'runs' / name / 'seed0' / 'checkpoints')
    config = json.loads((out / 'runs' / name / 'seed0' / 'config.json').read_text())
    config['data']['name'] = 'cifar10'
    (run / 'config.json').write_text(json.dumps(config))
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
      (['cka', '--out', str(out), '--reference', 'swin_b'],
       "--reference: unknown reference 'swin_b'"),
      (['cka', '--out', str(out), '--baseline-seed', '5'],
       "no trained run of step(s) ['resnet50', 'convnext_t'] with seed 5"),
      (['bias', '--out', str(out), '--reference', 'vit_s,vit_s'], 'names a reference twice'),
      (['cka', '--out', str(no_references), '--reference', 'swin_t'],
       "no trained run of reference(s) ['swin_t'] with seed 0"),
      (['cka', '--out', str(mixed)],
       "the runs use different data sets ['cifar10', 'fashion_mnist']"),
      (['bias', '--out', str(mixed), '--steps', 'resnet50', '--reference', 'swin_t'],
       "reference run(s) {'swin_t': 'cifar10'} use another data set than the ladder "
       '(fashion_mnist)'),
      (['shape'], 'invalid choice')):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      analyze.main(argv)
    assert exit_info.value.code == 2, argv
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_bad_input_messages(ladder_dir, capsys):
  out, _ = ladder_dir
  with pytest.raises(SystemExit):
    analyze.main(['cka', '--out', str(out), '--steps', 'patchify_stem,convnext_t'])
  err = capsys.readouterr().err
  assert err.startswith("error: no trained run of step(s) ['patchify_stem'] with seed 0")
  assert len(err.strip().splitlines()) == 1


def test_depth_fraction_blocks():
  assert analyze.depth_fraction_blocks(12) == [2, 5, 8, 11]   # ViT-S/16: blocks 3, 6, 9, 12
  assert analyze.depth_fraction_blocks(4) == [0, 1, 2, 3]
  assert analyze.depth_fraction_blocks(3) == [0, 1, 2, 2]
  assert analyze.depth_fraction_blocks(2) == [0, 0, 1, 1]


def test_analysis_layers_of_a_vit_are_its_patch_tokens_as_maps():
  """A 6-block ViT on 16x16 images with patch 4: blocks 2, 3, 5, 6's patch tokens (the class token
  left out), row-major as the patch grid, and the logits of the same pass."""
  cfg = ViTConfig(img_size=16, patch_size=4, embed_dim=8, depth=6, num_heads=2, num_classes=3,
                  in_channels=1)
  model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  model.eval()
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
  maps, logits = analyze.analysis_layers(model, x)
  tokens = model.features(x)
  assert [m.shape for m in maps] == [(2, 4, 4, 8)] * 4
  for m, block in zip(maps, (1, 2, 4, 5)):
    for r, c in ((0, 0), (0, 3), (2, 1), (3, 3)):
      np.testing.assert_array_equal(m[:, r, c], tokens[block][:, 1 + 4 * r + c])
  np.testing.assert_allclose(logits, model(x), rtol=1e-6, atol=1e-6)


def test_references_skip_side_branches():
  steps = ['move_up_depthwise', 'kernel_5', 'kernel_7', 'kernel_9', 'kernel_11', 'gelu']
  assert analyze.references(steps) == {
      'move_up_depthwise': None, 'kernel_5': 'move_up_depthwise', 'kernel_7': 'move_up_depthwise',
      'kernel_9': 'kernel_7', 'kernel_11': 'kernel_7', 'gelu': 'kernel_7'}


def test_preprocess_matches_the_test_pipeline():
  from experiments.data import datasets, pipeline
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


def test_ladder_run_references_rows_view_rerun_and_loading(ladder_dir):
  """The fixture's `ladder run --references --options smoke --steps resnet50,convnext_t --show`:
  the references' step-table rows, their rows and lines in the view, a rerun that trains nothing,
  a trained reference loading back for the analyses."""
  out = str(ladder_dir[0])
  rows = {r['step']: r for r in steptable.read_rows(os.path.join(out, 'steps.csv'))}
  assert sorted(rows) == sorted(STEPS + REFERENCES)
  for name in ('swin_t', 'vit_s'):
    config = get_config(f'{name},ladder=resnet50,seed=0,smoke')
    assert rows[name]['config_hash'] == runconfig.config_hash(config)
    assert rows[name]['step_index'] == '-1' and rows[name]['scale'] == 'tiny'
    assert float(rows[name]['gmacs']) > 0 and int(rows[name]['params']) > 0
  md = open(os.path.join(out, 'ladder.md')).read()
  assert '| ref | Swin-T (`swin_t`, reference) |' in md and '| 81.30 | 4.50 |' in md
  assert '| ref | ViT-S/16 (`vit_s`, reference) |' in md and '| 79.80 | 4.60 |' in md
  (group,) = json.load(open(os.path.join(out, 'ladder.json')))['groups']
  assert [s['name'] for s in group['steps']] == list(STEPS)
  refs = {r['name']: r for r in group['references']}
  assert refs['swin_t']['paper_top1'] == 81.3 and refs['swin_t']['paper_gflops'] == 4.5
  assert refs['vit_s']['mean'] == pytest.approx(float(rows['vit_s']['top1']))
  assert os.path.getsize(os.path.join(out, 'ladder.png')) > 10_000
  # A rerun finds all four done.
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'run', '--out', out,
                        '--references', '--options', 'smoke', '--steps', ','.join(STEPS),
                        *FINAL_CHECKPOINT_ONLY],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and '0 to train' in res.stdout, res.stdout + res.stderr
  # load_trained_model rebuilds the trained Swin with the checkpoint's weights.
  workdir = os.path.join(out, 'runs', 'swin_t', 'seed0')
  model, _ = load_trained_model(workdir)
  _, saved = load_numpy(os.path.join(workdir, 'checkpoints'))
  table = model.layers[2].blocks[0].attn.relative_position_bias_table[...]
  np.testing.assert_array_equal(
      table, saved['params']['layers']['2']['blocks']['0']['attn']
      ['relative_position_bias_table']['value'])
  assert model(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 10)
  # Every weight and BatchNorm statistic of a loaded ResNet-50 is its checkpoint's.
  workdir = os.path.join(out, 'runs', 'resnet50', 'seed0')
  model, _ = load_trained_model(workdir)
  _, saved = load_numpy(os.path.join(workdir, 'checkpoints'))
  for kind, name in ((nnx.Param, 'params'), (nnx.BatchStat, 'batch_stats')):
    loaded, stored = _flat(nnx.to_pure_dict(nnx.state(model, kind))), _flat(saved[name])
    assert sorted(loaded) == sorted(stored) and len(loaded) > 10, name
    for key, value in loaded.items():
      np.testing.assert_array_equal(value, stored[key], err_msg=f'{name} {key}')


def _flat(tree, prefix=()):
  """{path: array} of a nested dict (a checkpoint's {'value': array} leaves unwrapped)."""
  if not isinstance(tree, dict):
    return {prefix: np.asarray(tree)}
  if set(tree) == {'value'}:
    return {prefix: np.asarray(tree['value'])}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (str(key),)).items()}


def _analysis_files(out, seed=0, bias_seed=0):
  """cka.json and bias.json of three steps and one reference, numbers chosen by hand."""
  steps = ['resnet50', 'enhanced_recipe', 'stage_ratio']
  layers = {n: {f'stage{i}': 0.1 * i for i in range(1, 5)} for n in steps}
  layers['stage_ratio']['stage4'] = 0.77
  cka = {'seed': seed, 'steps': steps, 'num_examples': 10, 'references': ['swin_t'],
         'reference_layers': {'swin_t': ['stage1', 'stage2', 'stage3', 'stage4', 'logits']},
         'reference': {'resnet50': None, 'enhanced_recipe': 'resnet50',
                       'stage_ratio': 'enhanced_recipe'},
         'test_accuracy': {'resnet50': 0.5, 'enhanced_recipe': 0.6, 'stage_ratio': 0.8,
                           'swin_t': 0.4},
         'cka_prev': {'resnet50': None, 'enhanced_recipe': 0.25, 'stage_ratio': 0.5},
         'cka_reference': {'swin_t': {'resnet50': 0.1, 'enhanced_recipe': 0.2,
                                      'stage_ratio': 0.3}},
         'to_reference': {'swin_t': layers},
         'seed_baseline': {'seed': 1, 'mean': {'resnet50': 0.9, 'enhanced_recipe': 0.8,
                                               'stage_ratio': 0.7, 'swin_t': 0.95}}}
  models = steps + ['swin_t']
  kappa = [[1.0, 0.11, 0.12, 0.13], [0.11, 1.0, 0.23, 0.24], [0.12, 0.23, 1.0, 0.34],
           [0.13, 0.24, 0.34, 1.0]]
  bias = {'seed': bias_seed, 'steps': steps, 'references': ['swin_t'], 'num_test': 10,
          'cue_conflict': {'num': 20, 'seed': 0},
          'shape_bias': {n: {'shape_bias': b} for n, b in zip(models, (0.5, 0.6, 0.9, 0.7))},
          'error_consistency': {'models': models, 'kappa': kappa}}
  (out / 'analysis').mkdir(parents=True, exist_ok=True)
  (out / 'analysis' / 'cka.json').write_text(json.dumps(cka))
  (out / 'analysis' / 'bias.json').write_text(json.dumps(bias))


def test_show_tabulates_both_analyses(tmp_path, capsys):
  _analysis_files(tmp_path)
  assert analyze.main(['show', '--out', str(tmp_path)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ('| step | top-1 (seed 0) | CKA to prev | CKA to its seed 1 | CKA to swin_t | '
                      'swin_t stage 4 | shape bias | κ to prev | κ to swin_t |')
  cells = [[c.strip() for c in line.split('|')[1:-1]] for line in lines[2:6]]
  rows = {c[0]: c for c in cells}
  # kappa to the previous step is the (step, previous step) entry; to swin_t the last column
  assert rows['stage_ratio'] == ['stage_ratio', '80.00', '0.500', '0.700', '0.300', '0.770',
                                 '0.900', '0.23', '0.34']
  assert rows['resnet50'][2] == '' and rows['resnet50'][7] == ''
  assert rows['swin_t (reference)'] == ['swin_t (reference)', '40.00', '', '0.950', '', '',
                                        '0.700', '', '']
  # Pearson correlations with top-1 (0.5, 0.6, 0.8) across the three steps, computed here apart
  top1 = np.array([0.5, 0.6, 0.8])

  def pearson(v):
    a, b = top1 - top1.mean(), np.asarray(v) - np.mean(v)
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

  expected = (f'κ to swin_t {pearson([0.13, 0.24, 0.34]):+.2f}, CKA to swin_t '
              f'{pearson([0.1, 0.2, 0.3]):+.2f}, shape bias {pearson([0.5, 0.6, 0.9]):+.2f}.')
  assert lines[-1].endswith(expected), lines[-1]


def test_show_refuses_missing_or_mismatched_analyses(tmp_path, capsys):
  for argv, message in (
      (['show', '--out', str(tmp_path)], 'cka.json: run `python -m experiments.analyze cka'),
      (['show', '--out', str(tmp_path / 'nowhere')], 'is not a directory')):
    with pytest.raises(SystemExit) as exit_info:
      analyze.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
  _analysis_files(tmp_path, seed=0, bias_seed=2)
  with pytest.raises(SystemExit) as exit_info:
    analyze.main(['show', '--out', str(tmp_path)])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and 'describe different runs' in err, err
