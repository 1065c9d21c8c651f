"""Every ladder step: the block structure the paper describes, exact counts, forward and
backward."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modernize import (
  LADDER,
  LADDER_200,
  BatchNorm,
  DepthwiseConv,
  LayerNorm,
  NetConfig,
  Network,
  count_macs,
  count_params,
  create_model,
  preset,
)

# The paper prints GFLOPs to two decimals: a count that rounds to the printed figure is off by at
# most half a unit of its last digit.
PRINTED = 0.005 + 1e-9


def _conv_facts(conv):
  if isinstance(conv, DepthwiseConv):
    return ('dw', conv.kernel_size, conv.channels, conv.channels, conv.stride)
  kind = 'dense' if conv.feature_group_count == 1 else f'g{conv.feature_group_count}'
  return (kind, conv.kernel_size[0], conv.in_features, conv.out_features, conv.strides[0])


def _norm_kind(norm):
  return {BatchNorm: 'BN', LayerNorm: 'LN', type(None): None}[type(norm)]


def structure(cfg: NetConfig) -> dict:
  """Facts about a network read off the built modules (not off the config)."""
  model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0)))
  stage1 = model.stages[1]
  first, later = stage1.blocks[0], stage1.blocks[-1]

  def block(b):
    return {
        'layers': [_conv_facts(c) for c in (b.conv1, b.conv2, b.conv3)],
        'norms': [_norm_kind(n) for n in (b.norm1, b.norm2, b.norm3)],
        'acts': list(b.act_after) + [b.act_after_add],
        'activation': b.activation,
        'shortcut': None if b.shortcut_conv is None else (
            _conv_facts(b.shortcut_conv), _norm_kind(b.shortcut_norm)),
        'layer_scale': b.layer_scale is not None,
        'grn': b.grn is not None,
    }
  downsample = stage1.downsample
  return {
      'depths': tuple(len(s.blocks) for s in model.stages),
      'stem': (_conv_facts(model.stem.conv), _norm_kind(model.stem.norm), model.stem.kind),
      'first_block': block(first),
      'later_block': block(later),
      'downsample': None if downsample is None else (
          _norm_kind(downsample.norm), _conv_facts(downsample.conv)),
      'head_norm': _norm_kind(model.head.norm),
      'params': count_params(model),
  }


# What each step of Table 10 looks like, as facts about stage 2 (index 1): its first block (which
# downsamples unless downsampling is separate) and a later block.
RELU3 = [True, True, False, True]          # after layers 1 and 2 (not 3) and after the residual add
EXPECTED = {
    'resnet50': {
        'depths': (3, 4, 6, 3), 'stem': (('dense', 7, 3, 64, 2), 'BN', 'resnet'),
        'first_block': {'layers': [('dense', 1, 256, 128, 1), ('dense', 3, 128, 128, 2),
                                   ('dense', 1, 128, 512, 1)],
                        'norms': ['BN'] * 3, 'acts': RELU3, 'activation': 'relu',
                        'shortcut': (('dense', 1, 256, 512, 2), 'BN'), 'layer_scale': False,
                        'grn': False},
        'later_block': {'layers': [('dense', 1, 512, 128, 1), ('dense', 3, 128, 128, 1),
                                   ('dense', 1, 128, 512, 1)],
                        'norms': ['BN'] * 3, 'acts': RELU3, 'activation': 'relu',
                        'shortcut': None, 'layer_scale': False, 'grn': False},
        'downsample': None, 'head_norm': None, 'params': 25_557_032,
    },
}


def _expected(step):
  """Cumulative expectations: each step states only what it changes."""
  import copy
  e = copy.deepcopy(EXPECTED['resnet50'])
  fb, lb = e['first_block'], e['later_block']
  order = LADDER.names()
  for name in order[1:order.index(step) + 1]:
    if not LADDER.step(name).adopted and name != step:
      continue
    if name == 'stage_ratio':
      e['depths'] = (3, 3, 9, 3)
    elif name == 'patchify_stem':
      e['stem'] = (('dense', 4, 3, 64, 4), 'BN', 'patchify')
    elif name == 'depthwise':
      for b in (fb, lb):
        _, k, c, _, s = b['layers'][1]
        b['layers'][1] = ('dw', k, c, c, s)
    elif name == 'width_96':
      e['stem'] = (('dense', 4, 3, 96, 4), 'BN', 'patchify')
      fb['layers'] = [('dense', 1, 384, 192, 1), ('dw', 3, 192, 192, 2), ('dense', 1, 192, 768, 1)]
      lb['layers'] = [('dense', 1, 768, 192, 1), ('dw', 3, 192, 192, 1), ('dense', 1, 192, 768, 1)]
      fb['shortcut'] = (('dense', 1, 384, 768, 2), 'BN')
    elif name == 'inverted_bottleneck':
      # Fig. 3b: narrow (residual) -> 4x wide -> narrow; the residual stream is 96*2**i wide.
      fb['layers'] = [('dense', 1, 96, 768, 1), ('dw', 3, 768, 768, 2), ('dense', 1, 768, 192, 1)]
      lb['layers'] = [('dense', 1, 192, 768, 1), ('dw', 3, 768, 768, 1), ('dense', 1, 768, 192, 1)]
      fb['shortcut'] = (('dense', 1, 96, 192, 2), 'BN')
    elif name == 'move_up_depthwise':
      # Fig. 3c: the depthwise conv first, on the narrow input.
      fb['layers'] = [('dw', 3, 96, 96, 2), ('dense', 1, 96, 768, 1), ('dense', 1, 768, 192, 1)]
      lb['layers'] = [('dw', 3, 192, 192, 1), ('dense', 1, 192, 768, 1), ('dense', 1, 768, 192, 1)]
    elif name.startswith('kernel_'):
      k = int(name.split('_')[1])
      for b in (fb, lb):
        kind, _, ci, co, s = b['layers'][0]
        b['layers'][0] = (kind, k, ci, co, s)
    elif name == 'gelu':
      fb['activation'] = lb['activation'] = 'gelu'
    elif name == 'fewer_activations':
      fb['acts'] = lb['acts'] = [False, True, False, False]  # one GELU, between the 1x1 convs
    elif name == 'fewer_norms':
      fb['norms'] = lb['norms'] = ['BN', None, None]        # one norm, before the 1x1 convs
      fb['layer_scale'] = lb['layer_scale'] = True
    elif name == 'layer_norm':
      e['stem'] = e['stem'][:1] + ('LN', 'patchify')
      fb['norms'] = lb['norms'] = ['LN', None, None]
      fb['shortcut'] = (fb['shortcut'][0], 'LN')
    elif name == 'convnext_t':
      e['downsample'] = ('LN', ('dense', 2, 96, 192, 2))
      e['head_norm'] = 'LN'
      fb['shortcut'] = None
      fb['layers'] = [('dw', 7, 192, 192, 1), ('dense', 1, 192, 768, 1), ('dense', 1, 768, 192, 1)]
      e['params'] = 28_589_128
    elif name == 'grn':   # ConvNeXt V2-T: GRN between the 1x1 convs instead of LayerScale
      fb['layer_scale'] = lb['layer_scale'] = False
      fb['grn'] = lb['grn'] = True
      e['params'] = 28_635_496
    elif name == 'mhsa_last_stage':   # attention in the last stage only: stage 2 as ConvNeXt-T
      e['params'] = 33_784_840
  if step not in ('resnet50', 'enhanced_recipe', 'convnext_t', 'grn', 'mhsa_last_stage'):
    e.pop('params')
  return e


@pytest.mark.parametrize('step', LADDER.names())
def test_step_structure(step):
  facts = structure(LADDER.net_config(step))
  expected = _expected(step)
  if 'params' not in expected:
    facts.pop('params')
  assert facts == expected


def test_side_branches_are_not_inherited():
  assert LADDER.net_config('kernel_9').kernel_size == 9
  assert LADDER.net_config('kernel_11').kernel_size == 11
  assert LADDER.net_config('gelu').kernel_size == 7
  assert [s.name for s in LADDER.steps if not s.adopted] == ['kernel_5', 'kernel_9', 'kernel_11',
                                                             'grn', 'mhsa_last_stage']
  assert len(LADDER.names(include_side=False)) == 14


def test_recipes():
  assert LADDER.recipe('resnet50') == 'original'
  assert all(LADDER.recipe(n) == 'enhanced' for n in LADDER.names()[1:])


def test_endpoints_are_the_presets():
  assert LADDER.net_config('resnet50') == preset('resnet50')
  # The ladder's ConvNeXt-T differs from the preset only in the recipe's drop-path rate.
  assert LADDER.net_config('convnext_t', drop_path_rate=0.1) == preset('convnext_tiny')
  assert LADDER_200.net_config('convnext_b', drop_path_rate=0.5) == preset('convnext_base')


@pytest.mark.parametrize('name, params', [
    ('resnet50', 25_557_032), ('convnext_tiny', 28_589_128), ('convnext_small', 50_223_688),
    ('convnext_base', 88_591_464), ('convnext_large', 197_767_336),
    ('convnext_xlarge', 350_196_968), ('convnextv2_tiny', 28_635_496)])
def test_preset_params(name, params):
  model = nnx.eval_shape(lambda: Network(preset(name), rngs=nnx.Rngs(0)))
  assert count_params(model) == params


def test_macs_count_convs_and_linears():
  # A 1x1 conv net is easy to count by hand: stem 4x4x3x8 per output pixel at 8x8 ...
  cfg = NetConfig(depths=(1,), width=8, stem='patchify', inverted_bottleneck=True, expansion=2,
                  depthwise=True, depthwise_position='top', kernel_size=3, num_classes=5)
  hw = 32 // 4
  stem = hw * hw * 8 * 4 * 4 * 3
  block = hw * hw * 8 * 9 + hw * hw * 8 * 16 + hw * hw * 16 * 8
  head = 8 * 5
  assert count_macs(cfg, 32) == stem + block + head


def _scaled(cfg: NetConfig) -> NetConfig:
  """The same step in miniature (same flags), to run forward and backward quickly."""
  return cfg.replace(depths=tuple(1 for _ in cfg.depths), width=max(cfg.width // 8, 4),
                     num_classes=7, drop_path_rate=0.1)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('step', LADDER.names())
def test_step_forward_backward(step, dtype, train_step):
  """Every step trains and evaluates, in float32 and in mixed precision (bfloat16 activations:
  features in bfloat16; logits and every parameter's gradient in float32). The attention side
  branch at 64x64: at 32x32 its last stage is 1x1, one key, where the position terms get no
  gradient."""
  cfg = _scaled(LADDER.net_config(step)).replace(dtype=dtype)
  size = 64 if cfg.mhsa_last_stage else 32
  model = create_model(cfg, seed=0, image_size=size)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  y = jnp.array([1, 3])
  # XLA's lowest backend optimisation: the same program, compiled in ~60% of the time (38 cases).
  # train_step checks: loss and gradients finite.
  _, _, grads, (out, features) = train_step(
      model, x, y, evaluate=lambda m: (m(x), m.features(x)[-1]),
      compiler_options={'xla_backend_optimization_level': 0})
  assert out.dtype == jnp.float32 and features.dtype == jnp.dtype(dtype)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(g.dtype == jnp.float32 for g in leaves)
  # Every parameter gets a gradient signal (float32 only). In bfloat16, fewer_activations' stage-3
  # norm1 bias and stage-2 shortcut_norm bias get exactly zero: a per-channel constant that only
  # linear layers separate from the next BatchNorm has a zero gradient in exact arithmetic, and
  # float32 passes it on rounding noise alone (issue 15).
  if dtype == 'float32':
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)
  assert out.shape == (2, 7) and np.all(np.isfinite(out))


def test_eval_mode_is_deterministic_and_train_mode_updates_batch_stats():
  cfg = _scaled(LADDER.net_config('resnet50'))
  model = Network(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  model.eval()
  a, b = model(x), model(x)
  np.testing.assert_array_equal(a, b)
  before = model.stem.norm.mean[...].copy()
  model.train()
  model(x)
  assert not np.allclose(before, model.stem.norm.mean[...])


def test_steps_cli_json():
  out = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'steps', '--json'],
                       capture_output=True, text=True, check=True).stdout
  rows = json.loads(out)
  assert [r['step'] for r in rows] == LADDER.names()
  by_step = {r['step']: r for r in rows}
  for r in rows:
    assert {'step', 'params', 'gmacs', 'paper_gflops', 'paper_top1'} <= set(r)
    if r['step'] == 'layer_norm':     # Table 10's 4.46 is a typo (README): BN -> LN adds no MACs
      assert r['gmacs'] == by_step['fewer_norms']['gmacs']
      assert abs(r['gmacs'] / 4.2 - 1) <= 0.015, r   # Figure 2's 4.2, printed to 2 digits
    elif r['step'] == 'convnext_t':   # the one row off (README): 4.456 against 4.49, -0.77%
      assert abs(r['gmacs'] / r['paper_gflops'] - 1) <= 0.008, r
    elif r['step'] == 'grn':          # outside the paper: GRN adds no conv or linear
      assert r['paper_gflops'] is r['flops_reference'] is None, r
      assert r['gmacs'] == by_step['convnext_t']['gmacs']
    elif r['step'] == 'mhsa_last_stage':   # outside the paper; tests/test_mhsa.py counts it
      assert r['paper_gflops'] is r['flops_reference'] is None, r
      assert r['gmacs'] > by_step['convnext_t']['gmacs']
    else:
      assert abs(r['gmacs'] - r['paper_gflops']) <= PRINTED, r

  assert by_step['resnet50']['params'] == by_step['enhanced_recipe']['params'] == 25_557_032
  assert by_step['convnext_t']['params'] == 28_589_128
  assert by_step['grn']['params'] == 28_635_496
  assert by_step['mhsa_last_stage']['params'] == 33_784_840


def test_steps_cli_bad_input():
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'steps', '--ladder', 'vgg'],
                       capture_output=True, text=True)
  assert res.returncode == 2 and 'vgg' in res.stderr and 'Traceback' not in res.stderr


def test_resnet200_ladder_matches_table_11():
  for step in LADDER_200.steps:
    gmacs = count_macs(LADDER_200.net_config(step.name)) / 1e9
    assert abs(gmacs - step.paper_gflops) <= PRINTED, (step.name, gmacs)
