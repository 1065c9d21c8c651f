"""Bad input to the command lines: one line on stderr naming the problem, exit code 2, nothing
trained and no step table touched; and the smallest image size checked against the network."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.ladder import get_config
from experiments.training import loop, runconfig, steptable
from modernize import LADDER, NetConfig, feature_size, min_image_size, presets
from modernize.network import Network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW = {'ladder': 'resnet50', 'step': 'resnet50', 'step_index': 0, 'seed': 0,
       'data': 'fashion_mnist', 'image_size': 32, 'scale': 'cpu', 'params': 1000, 'gmacs': 0.01,
       'top1': 80.0, 'top5': 99.0, 'train_img_per_s': 100.0, 'wall_s': 10.0, 'config_hash': 'abc'}


def _snapshot(path):
  """A file's contents and modification time: a failed run must leave them as they were."""
  with open(path, 'rb') as f:
    return f.read(), os.stat(path).st_mtime_ns


def _one_error_line(res):
  assert res.returncode == 2, res.stderr[-3000:]
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, res.stderr[-3000:]
  assert lines[0].startswith('error: ')
  return lines[0]


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


# --- the trainer ---------------------------------------------------------------------------------

def _not_a_directory(tmp):
  (tmp / 'file').write_text('not a directory\n')


def _metrics_is_a_directory(tmp):
  os.makedirs(tmp / 'run' / 'metrics.jsonl')


def _table_is_a_directory(tmp):
  os.makedirs(tmp / 'steps_dir.csv')


def _table_of_other_columns(tmp):
  (tmp / 'old.csv').write_text('step,seed,top1\nresnet50,0,80.0\n')


# (config argument, extra flags, what to set up in tmp, facts the one line must name);
# '{tmp}' stands for the test's directory. The table is tmp/steps.csv unless the flags say.
TRAIN_CASES = {
    # data.channels alone: the network built for the config's 1 channel would be fed 3.
    'channels_without_the_network': ('resnet50,smoke', ['--config.data.channels=3'], None,
                                     ['data.channels=3', 'model.in_channels=1',
                                      '--config.model.in_channels=3']),
    'convnext_too_small_28': ('convnext_t,smoke,image_size=28', [], None,
                              ['image_size=28', 'smallest valid size is 32']),
    'convnext_too_small_30': ('convnext_t,smoke,image_size=30', [], None,
                              ['image_size=30', 'smallest valid size is 32']),
    'patchify_too_small': ('patchify_stem,smoke,image_size=3', [], None,
                           ['image_size=3', 'smallest valid size is 4']),
    'unknown_data_set': ('convnext_t,smoke,data=mnist', [], None, ["'mnist'", 'fashion_mnist']),
    'unknown_tfds_config': ('convnext_t,smoke,data=cifar10/foo', [], None, ["'cifar10/foo'"]),
    'config_on_fashion_mnist': ('convnext_t,smoke,data=fashion_mnist/x', [], None,
                                ["'fashion_mnist/x'"]),
    'table_is_a_directory': ('convnext_t,smoke', ['--config.step_table={tmp}/steps_dir.csv'],
                             _table_is_a_directory, ['{tmp}/steps_dir.csv', 'is a directory']),
    'table_under_a_file': ('convnext_t,smoke', ['--config.step_table={tmp}/file/steps.csv'],
                           _not_a_directory, ['{tmp}/file/steps.csv', 'not a directory']),
    'table_of_other_columns': ('convnext_t,smoke', ['--config.step_table={tmp}/old.csv'],
                               _table_of_other_columns, ['{tmp}/old.csv', 'other columns']),
    'workdir_under_a_file': ('convnext_t,smoke', ['--workdir={tmp}/file/run'], _not_a_directory,
                             ['workdir {tmp}/file/run', 'not a directory']),
    'metrics_file_is_a_directory': ('convnext_t,smoke', [], _metrics_is_a_directory,
                                    ['{tmp}/run/metrics.jsonl', 'is a directory']),
    # A workdir and a data dir may be gs:// (tests/test_reliability.py, tests/test_datasets.py),
    # no other URL; the step table must be local or mounted. Refused, rather than written to a
    # local directory 's3:'.
    'workdir_is_another_url': ('convnext_t,smoke', ['--workdir=s3://bucket/run'], None,
                               ['workdir s3://bucket/run', 'only object store supported is gs://']),
    'data_dir_is_another_url': ('convnext_t,smoke', ['--config.data.dir=s3://bucket/data'], None,
                                ['data.dir s3://bucket/data', 'only object store supported']),
    'table_is_a_url': ('convnext_t,smoke', ['--config.step_table=gs://bucket/steps.csv'], None,
                       ['gs://bucket/steps.csv', 'remote URL']),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES))
def test_trainer_rejects_bad_input_before_training(tmp_path, case):
  arg, flags, setup, facts = TRAIN_CASES[case]
  tmp = str(tmp_path)
  table = str(tmp_path / 'steps.csv')
  steptable.append_row(table, ROW)   # a table with a finished run, which must stay as it is
  before = _snapshot(table)
  if setup:
    setup(tmp_path)
  tables = [f.replace('{tmp}', tmp).split('=', 1)[1] for f in flags if 'step_table' in f]
  kept = {p: _snapshot(p) for p in tables if os.path.isfile(p)}
  res = _run('experiments.train', f'--config=configs/ladder.py:{arg}', f'--workdir={tmp}/run',
             f'--config.step_table={table}', *[f.replace('{tmp}', tmp) for f in flags])
  line = _one_error_line(res)
  for fact in facts:
    assert fact.replace('{tmp}', tmp) in line, line
  assert _snapshot(table) == before
  assert all(_snapshot(p) == snap for p, snap in kept.items())
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')   # nothing trained
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


# --- the ladder view -----------------------------------------------------------------------------

def _good_table(path):
  steptable.append_row(path, ROW)
  with open(path) as f:
    return f.read()


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


# (what to make of tmp/steps.csv from a good table's text, facts the one line must name)
SHOW_CASES = {
    'missing_columns': (lambda p, t: _write(p, 'step,seed,top1\nresnet50,0,80.0\n'),
                        ['no column', 'gmacs']),
    'non_numeric_top1': (lambda p, t: _write(p, t.replace(',80.0,', ',eighty,')),
                         ['top1', "'eighty'", 'row 1']),
    'non_integer_seed': (lambda p, t: _write(p, t.replace('resnet50,resnet50,0,0,',
                                                          'resnet50,resnet50,0,zero,')),
                         ['seed', "'zero'"]),
    'ragged_row': (lambda p, t: _write(p, t + 'resnet50,stage_ratio\n'), ['line 3', 'fields']),
    'empty_file': (lambda p, t: _write(p, ''), ['no finished runs']),
    'not_text': (lambda p, t: open(p, 'wb').write(b'\xff\xfe\x00garbage'), ['UTF-8']),
    'a_directory': (lambda p, t: os.makedirs(p), ['is a directory']),
}


@pytest.mark.parametrize('case', list(SHOW_CASES))
def test_ladder_show_rejects_malformed_tables(tmp_path, case):
  make, facts = SHOW_CASES[case]
  table = str(tmp_path / 'steps.csv')
  text = _good_table(str(tmp_path / 'good.csv'))
  make(table, text)
  before = _snapshot(table) if os.path.isfile(table) else None
  res = _run('experiments.ladder', 'show', '--out', str(tmp_path / 'view'), '--table', table)
  line = _one_error_line(res)
  assert table in line, line
  for fact in facts:
    assert fact in line, line
  if before:
    assert _snapshot(table) == before
  assert not os.path.exists(tmp_path / 'view' / 'ladder.md')


def test_ladder_run_rejects_a_table_without_its_columns(tmp_path):
  out = tmp_path / 'ladder'
  os.makedirs(out)
  table = str(out / 'steps.csv')
  _write(table, 'step,top1\nresnet50,80.0\n')
  before = _snapshot(table)
  res = _run('experiments.ladder', 'run', '--out', str(out), '--steps', 'resnet50',
             '--options', 'smoke')
  line = _one_error_line(res)
  assert table in line and 'seed' in line and 'config_hash' in line, line
  assert _snapshot(table) == before


@pytest.mark.parametrize('command', ['run', 'show', 'calibrate'])
def test_ladder_refuses_a_remote_out(command):
  extra = ['--recipe', 'enhanced', '--validation', '100'] if command == 'calibrate' else []
  line = _one_error_line(_run('experiments.ladder', command, '--out', 'gs://bucket/ladder', *extra))
  assert '--out gs://bucket/ladder' in line and 'remote URL' in line, line
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


def test_the_divergence_message_says_whether_a_checkpoint_is_kept(tmp_path):
  workdir = str(tmp_path)
  losses = [(np.float32(2.3), 1), (np.float32('nan'), 1)]   # (device losses, updates) per dispatch
  with pytest.raises(loop.TrainingDiverged, match='at step 6; no checkpoint was saved'):
    loop._finite_losses(losses, 6, workdir)
  os.makedirs(tmp_path / 'checkpoints' / '4')
  os.makedirs(tmp_path / 'checkpoints' / '2')
  os.makedirs(tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp-123')   # not a checkpoint
  with pytest.raises(loop.TrainingDiverged, match=r'checkpoint \(step 4\) is kept'):
    loop._finite_losses(losses, 6, workdir)


# --- the smallest image size ---------------------------------------------------------------------

def _last_feature_sides(cfg: NetConfig, sizes) -> dict[int, int]:
  """{size: the side of the last stage's output at a size x size input}, from the traced network."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0))))

  def features(state, x):
    return nnx.merge(graphdef, state).features(x)[-1]

  sides = {}
  for size in sizes:
    x = jax.ShapeDtypeStruct((2, size, size, cfg.in_channels), jnp.float32)
    out = jax.eval_shape(features, state, x).shape
    assert out[1] == out[2]
    sides[size] = out[1]
  return sides


# The smallest size by the stem and the downsampling (checked against the traced shapes below).
EXPECTED_MIN = {'resnet': 1, 'patchify': 4, 'separate': 32}


@pytest.mark.parametrize('step', LADDER.names(include_side=False))
def test_min_image_size_matches_the_network(step, monkeypatch):
  # XLA's own convs: the CPU matmul form refuses a negative output size instead of giving 0.
  monkeypatch.setenv('MODERNIZE_CONV_IMPL', 'xla')
  cfg = runconfig.net_config(get_config(f'{step},scale=tiny'), num_classes=10, in_channels=1)
  cfg = cfg.replace(depthwise_impl='xla')
  smallest = min_image_size(cfg)
  kind = 'separate' if cfg.downsampling == 'separate' else cfg.stem
  assert smallest == EXPECTED_MIN[kind]
  sides = _last_feature_sides(cfg, sorted({smallest - 1, smallest, smallest + 1, 28, 30} - {0}))
  for size, side in sides.items():
    assert side == feature_size(cfg, size), size
    assert (side >= 1) == (size >= smallest), size


@pytest.mark.parametrize('cfg, smallest', [
    (NetConfig(depths=(1, 1, 1, 1), width=8, downsampling='separate'), 29),   # ResNet stem
    (presets.convnext_tiny().replace(depths=(1, 1, 1, 1), width=8), 32),
    (NetConfig(depths=(1, 1), width=8, stem='patchify', downsampling='separate'), 8),
    (NetConfig(depths=(1, 1, 1, 1, 1), width=8, kernel_size=7, stem='patchify'), 4),
])
def test_min_image_size_of_other_networks(cfg, smallest, monkeypatch):
  monkeypatch.setenv('MODERNIZE_CONV_IMPL', 'xla')
  assert min_image_size(cfg) == smallest
  sides = _last_feature_sides(cfg, [smallest - 1, smallest])
  assert sides[smallest] == feature_size(cfg, smallest) >= 1
  assert sides[smallest - 1] == feature_size(cfg, smallest - 1) == 0
