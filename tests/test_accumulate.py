"""Gradient accumulation (`accumulate_steps`): one optimizer update from A microbatches.

Without BatchNorm, 4 microbatches of 32 give the update of one batch of 128 (float rounding
apart), through the trainer's own optimizer, schedule and train step; with BatchNorm they do not
(statistics per microbatch), and the test says so rather than hiding it. The comparison uses the
trainer's SGD (momentum, decay on all weights): AdamW divides each gradient by its own running
scale, which turns float rounding in near-zero gradients into updates of full size (measured:
4e-4 of a tensor's largest value after two steps), so its equality would only show rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.ladder import get_config
from experiments.cli import UsageError
from experiments.training import recipe, runconfig
from experiments.training import state as train_state


def _trainer(step: str, accumulate: int, optimizer: str = 'sgd'):
  """The trainer's train step (compiled) and initial state for a smoke config at batch 128."""
  config = get_config(f'{step},smoke,batch=128')
  with config.unlocked():
    config.accumulate_steps = accumulate
    config.optimizer.optimizer = optimizer
    config.model.drop_path_rate = 0.0
    config.augment.mix_prob = 0.0
  cfg = runconfig.net_config(config, num_classes=10, in_channels=1)
  schedule = recipe.Schedule(steps_per_epoch=100, epochs=1.0, paper_epochs=300.0)
  lr = recipe.learning_rate(config, schedule)
  tx = recipe.optimizer(config, lr)
  graphdef, constants, state = train_state.create_state(config, cfg, tx)
  return jax.jit(train_state.make_train_step(config, graphdef, constants, tx, lr, 10)), state


def _two_updates(trainer, batch):
  """Two updates on `batch` (the second also goes through the optimizer's momentum)."""
  step_fn, state = trainer
  for _ in range(2):
    state, metrics = step_fn(state, batch)
  return state, float(metrics['loss'])


def _batch(n=128, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.standard_normal((n, 32, 32, 1)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def _max_relative_difference(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)),
                       a, b)
  return max(jax.tree.leaves(diffs))


def test_four_microbatches_of_32_equal_one_batch_of_128_without_batchnorm():
  batch = _batch()
  whole, loss_whole = _two_updates(_trainer('layer_norm', 1), batch)
  accumulated = _trainer('layer_norm', 4)
  parts, loss_parts = _two_updates(accumulated, batch)
  assert loss_parts == pytest.approx(loss_whole, rel=1e-5)
  assert _max_relative_difference(parts['params'], whole['params']) < 1e-5
  assert int(parts['step']) == int(whole['step']) == 2          # one update per batch
  # A different batch would not pass: the test can tell updates apart.
  other, _ = _two_updates(accumulated, _batch(seed=1))
  assert _max_relative_difference(other['params'], whole['params']) > 1e-3


def test_with_batchnorm_statistics_are_per_microbatch():
  batch = _batch()
  whole, _ = _two_updates(_trainer('resnet50', 1), batch)
  parts, _ = _two_updates(_trainer('resnet50', 4), batch)
  assert _max_relative_difference(parts['batch_stats'], whole['batch_stats']) > 1e-4
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(parts['params']))


def test_accumulate_steps_must_divide_the_batch():
  config = get_config('layer_norm,smoke,batch=32')
  for bad, message in ((3, 'accumulate_steps=3'), (0, 'at least 1')):
    with config.unlocked():
      config.accumulate_steps = bad
    with pytest.raises(UsageError, match=message):
      runconfig.validate(config)
