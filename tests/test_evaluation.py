"""Evaluation recomputed: the trainer's recorded top-1, top-5 and mean test loss equal a
per-example count made here from the trained network's logits.

Two short smoke trainings (`layer_norm,smoke`, the trainer's SGD, as tests/test_train.py runs
them) evaluate 250 test examples, which divide neither the batch (32) nor the device count (8):
the last eval batch is padded on one device and on eight. The run on one device keeps a weight
EMA (`ema_decay` 0.9, a learning rate large enough for the average to lag the weights), so its
result must come from the averaged weights. Here the trained network is loaded
(`checkpoint.load_trained_model`, with the checkpoint's EMA weights where the run kept them), the
same 250 inputs are built as the trainer builds them (`pipeline.eval_batches` as one batch of 250,
`pipeline.model_input`), and top-1 / top-5 are counted with numpy's argsort and the loss is a
float64 log-softmax. Tolerances: top-1 and top-5 exact (the same count of the same examples; the
row's 4 decimals equal), the mean loss to 1e-5 relative (float32 logits computed in other batch
shapes), the row's to its 6 decimals.

The same runs check that the loop trains for the config's length: the row's update count and the
learning rate it logged are the schedule of the config's epochs, batch size, training examples and
recipe (`recipe.Schedule`, `recipe.learning_rate`).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from test_train import SGD, run_train

from experiments.data import datasets, pipeline
from experiments.training import recipe, steptable
from experiments.training.checkpoint import load_numpy, load_trained_model

TEST_EXAMPLES = 250
COMMON = [*SGD, f'--config.data.test_examples={TEST_EXAMPLES}']
# The one-device run: EMA on, and the learning rate quoted at the run's own batch (0.05, not
# 0.05 * 32 / 4096), so that the weights move and their average lags them.
EMA = ['--config.ema_decay=0.9', '--config.optimizer.lr_batch=32']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{devices: (workdir, row, final result line of metrics.jsonl)} of the two trainings."""
  try:
    source = datasets.fashion_mnist_dir(datasets.FASHION_MNIST_DEBIAN_DIR)
  except datasets.DatasetUnavailable as e:
    pytest.skip(str(e))
  out = {}
  for devices, extra in (('8', []), ('1', EMA)):
    parent = tmp_path_factory.mktemp(f'eval{devices}')
    workdir = str(parent / 'run')
    run_train(workdir, 'layer_norm,smoke', *COMMON, *extra,
              env={'JAX_NUM_CPU_DEVICES': devices, 'MODERNIZE_FASHION_MNIST_DIR': source})
    (row,) = steptable.read_rows(str(parent / 'steps.csv'))
    lines = [json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))]
    out[devices] = workdir, row, lines
  return out


def _with_weights(model, tree):
  """`model` with its parameters replaced by `tree` (a checkpoint's nested dicts, e.g. 'ema')."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def lookup(path, _):
    node = tree
    for key in path:
      node = node[str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))]
    return jax.numpy.asarray(node['value'] if isinstance(node, dict) else node)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(lookup, params), rest)
  model.eval()
  return model


def _test_inputs(config: dict):
  """The 250 test inputs and labels, as the trainer's evaluation builds them (one batch)."""
  channels = config['data']['channels'] or 1
  batch = next(pipeline.eval_batches(
      config['data']['name'], batch_size=TEST_EXAMPLES, image_size=config['data']['image_size'],
      channels=channels, num_examples=TEST_EXAMPLES, num_workers=0))
  assert batch['mask'].all() and len(batch['label']) == TEST_EXAMPLES
  spec = pipeline.input_spec(config['data']['name'], None, channels)
  return pipeline.model_input(batch, spec), np.asarray(batch['label'])


def _count(logits, labels) -> dict:
  """top-1 and top-5 (%) by argsort and the mean cross-entropy by a float64 log-softmax."""
  z = np.asarray(logits, np.float64)
  order = np.argsort(-z, axis=1, kind='stable')
  n = len(labels)
  z = z - z.max(1, keepdims=True)
  loss = np.log(np.exp(z).sum(1)) - z[np.arange(n), labels]
  return {'top1': 100.0 * int(np.sum(order[:, 0] == labels)) / n,
          'top5': 100.0 * int(np.sum(np.any(order[:, :5] == labels[:, None], axis=1))) / n,
          'loss': float(loss.mean())}


@pytest.mark.parametrize('devices', ['1', '8'])
def test_recorded_metrics_equal_a_count_from_the_logits(runs, fashion, devices):
  workdir, row, lines = runs[devices]
  result = lines[-1]
  assert row['device_count'] == devices and result['test_examples'] == TEST_EXAMPLES
  model, config = load_trained_model(workdir)
  inputs, labels = _test_inputs(config)
  counted = _count(model(inputs), labels)
  if config['ema_decay'] > 0:
    _, saved = load_numpy(os.path.join(workdir, 'checkpoints'))
    trained = counted
    counted = _count(_with_weights(model, saved['ema'])(inputs), labels)
    # The average is not the trained weights: their evaluations differ by far more than the
    # tolerance, so the result below tells which weights were evaluated.
    assert abs(trained['loss'] - counted['loss']) > 1e-3 * counted['loss'], (trained, counted)
  assert result['top1'] == counted['top1'] and result['top5'] == counted['top5'], (result,
                                                                                 counted)
  assert result['test_loss'] == pytest.approx(counted['loss'], rel=1e-5)
  assert (row['top1'], row['top5']) == (f'{counted["top1"]:.4f}', f'{counted["top5"]:.4f}')
  assert float(row['test_loss']) == pytest.approx(counted['loss'], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('devices', ['1', '8'])
def test_the_run_trains_for_the_configs_length(runs, devices):
  """The row's updates are round(epochs * training examples / batch size), and every logged
  learning rate is the config's schedule at that update."""
  workdir, row, lines = runs[devices]
  with open(os.path.join(workdir, 'config.json')) as f:
    config = ml_collections.ConfigDict(json.load(f))
  schedule = recipe.Schedule(config.data.train_examples / config.batch_size, config.epochs,
                             300.0 if config.recipe == 'enhanced' else 90.0)
  total = round(config.epochs * config.data.train_examples / config.batch_size)
  assert int(row['steps']) == total == schedule.total_steps
  lr = recipe.learning_rate(config, schedule)
  logged = [x for x in lines if 'lr' in x]
  assert logged and logged[-1]['updates'] == total
  for record in logged:
    assert record['lr'] == pytest.approx(float(lr(record['updates'] - 1)), rel=1e-6)
  peak = config.optimizer.base_lr * config.batch_size / config.optimizer.lr_batch
  assert max(x['lr'] for x in logged) <= peak * (1 + 1e-6)
