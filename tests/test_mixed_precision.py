"""Mixed precision: `NetConfig(dtype='bfloat16')` through the public API and the trainer.

Parameters stay float32; activations, convs and matmuls run in bfloat16; the norms' statistics,
the logits, softmax and the loss are float32.

Tolerance of bf16 against float32 logits: bfloat16 keeps 8 significant bits, so every rounding of
an activation or weight is off by up to 2^-9 ~ 0.2% of its value. A forward pass rounds the input,
every weight and every layer's output; over the ~10-15 layers of the small networks here (width
16, one block per stage) these errors add up to about 1% of the logits' largest value. Measured
(max |bf16 - f32| / max |f32|), eval mode, 4 x 32x32: resnet50 1.5%, convnext_t 0.4%; train mode,
8 x 64x64: resnet50 3.6%, convnext_t 0.7%. Train-mode BatchNorm is the outlier: it divides by the
batch std, so where a conv output's mean is large against its spread over the batch (the last
stage's 2x2 maps give 32 values per channel) the rounding of that bf16 output is magnified (at
4 x 32x32, 4 values per channel, it reaches 6%). Tolerances: 5% in eval mode, 10% in train mode,
each 3x the largest error measured, while a layer computing in the wrong place (statistics in
bf16, a missing cast, a swapped op) gives errors of O(10-100%).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.ladder import get_config
from experiments.training import runconfig, steptable
from experiments.training import state as train_state
from modernize import LADDER, ConfigError, NetConfig, create_model, depthwise
from modernize.depthwise import DepthwiseConv, depthwise_conv2d
from modernize.layers import BatchNorm, LayerNorm, LayerScale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_TOL = {'eval': 0.05, 'train': 0.10}   # of the largest float32 logit; see the docstring


def _small(step: str, **changes) -> NetConfig:
  return LADDER.net_config(step, num_classes=10, width=16, depths=(1, 1, 1, 1), in_channels=3,
                           drop_path_rate=0.0, **changes)


def _images(n=4, size=32, channels=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((n, size, size, channels)),
                     jnp.float32)


def test_dtype_is_a_validated_flag():
  assert NetConfig().dtype == 'float32'
  assert NetConfig(dtype='bfloat16').dtype == 'bfloat16'
  for bad in ('float16', 'bf16', jnp.bfloat16):
    with pytest.raises(ConfigError, match='dtype'):
      NetConfig(dtype=bad)
  assert get_config('convnext_t,smoke').model.dtype == 'float32'   # the trainer's model.* has it


@pytest.mark.parametrize('step', ['resnet50', 'convnext_t'])
def test_bf16_logits_close_to_float32(step):
  m32 = create_model(_small(step), seed=0)
  m16 = create_model(_small(step, dtype='bfloat16'), seed=0)
  # The same float32 parameters: the dtype changes the computation, not the initialisation.
  for a, b in zip(jax.tree.leaves(nnx.state(m32, nnx.Param)),
                  jax.tree.leaves(nnx.state(m16, nnx.Param))):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
  for mode, x in (('eval', _images(4, 32)), ('train', _images(8, 64))):
    getattr(m32, mode)()
    getattr(m16, mode)()
    a, b = m32(x), m16(x)
    assert a.dtype == b.dtype == jnp.float32   # logits in float32 either way
    err = float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(a)))
    print(f'{step} {mode}: max |bf16 - f32| / max |f32| = {err:.4f}')
    assert err < LOGIT_TOL[mode], (step, mode, err)
  assert all(f.dtype == jnp.bfloat16 for f in m16.features(x))   # activations in bf16
  # Running statistics stay float32 after a train-mode pass.
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.BatchStat)))


def _trainer_parts(step: str, dtype: str):
  """The trainer's own state and step builders on a smoke config, with a constant learning rate
  and no mixing, so that a few steps on one batch must lower the loss."""
  config = get_config(f'{step},smoke')
  with config.unlocked():
    config.model.dtype = dtype
    config.model.drop_path_rate = 0.0
    config.augment.mix_prob = 0.0
    config.augment.label_smoothing = 0.0
  cfg = runconfig.net_config(config, num_classes=10, in_channels=1)
  assert cfg.dtype == dtype
  lr = optax.constant_schedule(1e-3)
  tx = optax.adamw(lr)
  graphdef, constants, state = train_state.create_state(config, cfg, tx)
  step_fn = jax.jit(train_state.make_train_step(config, graphdef, constants, tx, lr, 10))
  return step_fn, state


@pytest.mark.parametrize('step', ['resnet50', 'convnext_t'])
def test_bf16_training_step_lowers_the_loss_and_keeps_float32_state(step):
  step_fn, state = _trainer_parts(step, 'bfloat16')
  rng = np.random.default_rng(1)
  batch = {'image': jnp.asarray(rng.standard_normal((16, 32, 32, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  losses = []
  for _ in range(4):
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert metrics['loss'].dtype == jnp.float32
  # Parameters, BatchNorm statistics and the optimizer's moments stay float32.
  for part in ('params', 'batch_stats', 'opt'):
    floats = [v for v in jax.tree.leaves(state[part]) if jnp.issubdtype(v.dtype, jnp.floating)]
    assert all(v.dtype == jnp.float32 for v in floats), part


@pytest.mark.parametrize('impl', ['xla', 'shift', 'native', 'auto'])
def test_depthwise_keeps_the_compute_dtype(impl):
  """DepthwiseConv(dtype=bf16) returns bf16 and float32 parameter gradients in every
  implementation; 'auto' takes XLA's op for bf16 on CPU too (the native kernel is float32-only)."""
  if impl == 'native' and not depthwise.native_available():
    pytest.skip('native kernel unavailable')
  if impl == 'native' and jax.default_backend() != 'cpu':
    pytest.skip('the native kernel runs on CPU only')
  layer = DepthwiseConv(16, 7, impl=impl, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ref = DepthwiseConv(16, 7, impl='xla', rngs=nnx.Rngs(0))
  x = _images(2, 10, 16)
  gd, params = nnx.split(layer)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(gd, p)(x).astype(jnp.float32) ** 2))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  y32 = ref(x)
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, rtol=0.05,
                             atol=0.02 * float(jnp.max(jnp.abs(y32))))
  assert depthwise.resolve_impl('auto', jnp.bfloat16) == 'xla'
  jaxpr = str(jax.make_jaxpr(functools.partial(depthwise_conv2d, impl='auto'))(
      x.astype(jnp.bfloat16), layer.kernel[...].astype(jnp.bfloat16)))
  assert 'conv_general_dilated' in jaxpr and 'f32[' not in jaxpr


def test_norms_compute_statistics_in_float32_and_layer_scale_keeps_dtype():
  x = _images(2, 5, 24, seed=3) * 3 + 100.0   # a large mean: bf16 statistics would be poor
  xb = x.astype(jnp.bfloat16)
  for make in (lambda d: LayerNorm(24, dtype=d), lambda d: BatchNorm(24, dtype=d)):
    mixed, full = make(jnp.bfloat16), make(None)
    y = mixed(xb)
    assert y.dtype == jnp.bfloat16
    # Same float32 arithmetic on the (exactly representable) upcast input, then one rounding.
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(full(xb.astype(jnp.float32)).astype(jnp.bfloat16),
                                             np.float32))
  bn = BatchNorm(24, dtype=jnp.bfloat16)
  bn(xb)
  assert bn.mean[...].dtype == bn.var[...].dtype == jnp.float32
  ls = LayerScale(24, 1e-6, dtype=jnp.bfloat16)
  assert ls(xb).dtype == jnp.bfloat16 and ls.scale[...].dtype == jnp.float32
  # Without a dtype the old promotion holds: float32 in, float32 out.
  assert LayerScale(24, 1e-6)(x).dtype == jnp.float32


def test_float32_config_hash_is_unchanged():
  """Adding model.dtype did not change the identity of float32 runs (so `ladder run` finds the
  rows it already has); a bf16 run is another run."""
  config = get_config('convnext_t,smoke')
  assert runconfig.config_hash(config) == '8c07bdfd0723'    # as before model.dtype existed
  assert runconfig.config_hash(get_config('resnet50,miniature')) == 'df2fd7140388'
  with config.unlocked():
    config.model.dtype = 'bfloat16'
  assert runconfig.config_hash(config) != '8c07bdfd0723'


def test_older_step_tables_stay_readable_and_take_float32_rows(tmp_path):
  old_columns = steptable.LAYOUTS[-1]
  assert 'dtype' not in old_columns
  table = tmp_path / 'steps.csv'
  table.write_text(','.join(old_columns) + '\n' + ','.join(
      {'step': 'resnet50', 'seed': '0', 'top1': '80.0'}.get(c, '') for c in old_columns) + '\n')
  steptable.check_writable(str(table), {'dtype': 'float32'})
  steptable.append_row(str(table), {'step': 'stage_ratio', 'seed': 0, 'top1': 81.0,
                                    'dtype': 'float32'})
  rows = steptable.read_rows(str(table))
  assert [(r['step'], r['dtype']) for r in rows] == [('resnet50', 'float32'),
                                                     ('stage_ratio', 'float32')]
  assert table.read_text().splitlines()[0] == ','.join(old_columns)   # layout kept
  with pytest.raises(steptable.TableError, match='dtype'):
    steptable.check_writable(str(table), {'dtype': 'bfloat16'})
  with pytest.raises(steptable.TableError, match='dtype'):
    steptable.append_row(str(table), {'step': 'x', 'seed': 0, 'dtype': 'bfloat16'})
  assert len(steptable.read_rows(str(table))) == 2


def test_a_table_without_cpu_cores_takes_rows_that_record_it(tmp_path):
  """cpu_cores only records: a table of the layout before it takes new rows without it."""
  columns = next(c for c in steptable.LAYOUTS if 'dtype' in c and 'cpu_cores' not in c)
  table = tmp_path / 'steps.csv'
  table.write_text(','.join(columns) + '\n')
  steptable.append_row(str(table), {'step': 'resnet50', 'seed': 0, 'top1': 80.0,
                                    'dtype': 'bfloat16', 'cpu_cores': 1})
  [row] = steptable.read_rows(str(table))
  assert (row['dtype'], row['cpu_cores']) == ('bfloat16', '')
  assert table.read_text().splitlines()[0] == ','.join(columns)


def test_trainer_cli_bf16_smoke_writes_a_bfloat16_row(tmp_path):
  """The command of the README: `--config.model.dtype=bfloat16` trains and records its dtype."""
  table = tmp_path / 'steps.csv'
  cmd = [sys.executable, '-m', 'experiments.train', '--config=configs/ladder.py:convnext_t,smoke',
         f'--workdir={tmp_path / "run"}', f'--config.step_table={table}',
         '--config.model.dtype=bfloat16']
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  (row,) = steptable.read_rows(str(table))
  assert row['dtype'] == 'bfloat16' and row['step'] == 'convnext_t'
  assert set(row) == set(steptable.COLUMNS)
  assert 0 <= float(row['top1']) <= 100 and np.isfinite(float(row['train_loss']))
  bad = subprocess.run([*cmd[:-1], '--config.model.dtype=float16'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and 'dtype' in bad.stderr

