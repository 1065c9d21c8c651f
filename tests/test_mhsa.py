"""BoTNet's global self-attention in the last stage (Srinivas et al. 2021): the layer
(`RelPosSelfAttention`), the `mhsa_last_stage` flag, the network built for one input size, the
ladder's `mhsa_last_stage` side branch, and the layer against timm's `BottleneckAttn`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modernize import (
  LADDER,
  ConfigError,
  LadderBlock,
  NetConfig,
  Network,
  RelPosSelfAttention,
  count_macs,
  count_params,
  create_model,
  preset,
  stage_blocks,
)
from modernize.config import MHSA_HEAD_DIM


def _attention(dim, size, head_dim, seed=0):
  return RelPosSelfAttention(dim, size, head_dim=head_dim, init='trunc_normal',
                             rngs=nnx.Rngs(seed))


# --- the layer ------------------------------------------------------------------------------------

def _reference(x, kernel, height_rel, width_rel, heads):
  """Attention with 2-D relative position logits in float64 numpy, one query at a time, written
  from the formula rather than from the layer: logits q.k / sqrt(d) + q.r_h[y'-y] + q.r_w[x'-x]."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  b, h, w, c = x.shape
  d = c // heads
  qkv = x @ kernel.reshape(c, 3 * c)
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h, w, heads, d) for i in range(3))
  logits = np.zeros((b, heads, h, w, h, w))
  for y in range(h):
    for xx in range(w):
      for y2 in range(h):
        for x2 in range(w):
          qq = q[:, y, xx]                                          # (b, heads, d)
          logits[:, :, y, xx, y2, x2] = (
              (qq * k[:, y2, x2]).sum(-1) / np.sqrt(d)
              + qq @ height_rel[y2 - y + h - 1] + qq @ width_rel[x2 - xx + w - 1])
  logits = logits.reshape(b, heads, h, w, h * w)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bnyxk,bknd->byxnd', weights, v.reshape(b, h * w, heads, d))
  return logits, out.reshape(b, h, w, c)


@pytest.mark.parametrize('size', [(3, 5), (1, 1), (2, 2)])
def test_attention_formula(size):
  rng = np.random.RandomState(0)
  layer = _attention(32, size, head_dim=8)
  assert layer.heads == 4 and layer.qkv.kernel.shape == (1, 1, 32, 96)
  assert layer.height_rel.shape == (2 * size[0] - 1, 8)
  assert layer.width_rel.shape == (2 * size[1] - 1, 8)
  x = rng.randn(2, *size, 32).astype(np.float32)
  logits = layer.logits(*layer.project(jnp.asarray(x))[:2])
  ref_logits, ref_out = _reference(x, layer.qkv.kernel[...], np.asarray(layer.height_rel[...]),
                                   np.asarray(layer.width_rel[...]), 4)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer(jnp.asarray(x)), ref_out, rtol=1e-5, atol=1e-5)


def test_attention_init():
  layer = _attention(768, (7, 7), head_dim=32)
  assert layer.heads == 24
  # timm's: N(0, head_dim ** -0.5) for the offset embeddings; the qkv conv takes the network's
  # init (N(0, 0.02) for ConvNeXt, as every conv there).
  for table in (layer.height_rel[...], layer.width_rel[...]):
    assert table.shape == (13, 32) and abs(float(table.std()) / 32 ** -0.5 - 1) < 0.1
  assert abs(float(layer.qkv.kernel[...].std()) / 0.02 - 1) < 0.01
  assert layer.qkv.bias is None


def test_attention_size_is_fixed_at_construction():
  layer = _attention(32, (2, 3), head_dim=8)
  with pytest.raises(ConfigError, match=r'^mhsa_last_stage: .*built for a 2x3 .* got 3x2'):
    layer(jnp.zeros((1, 3, 2, 32)))
  with pytest.raises(ConfigError, match='head width'):
    _attention(48, (2, 2), head_dim=32)


def test_bfloat16_keeps_float32_logits():
  layer = RelPosSelfAttention(32, (2, 2), head_dim=8, init='trunc_normal', dtype=jnp.bfloat16,
                              rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 32))
  q, k, _ = layer.project(x)
  assert q.dtype == jnp.bfloat16 and layer.logits(q, k).dtype == jnp.float32
  out = layer(x)
  assert out.dtype == jnp.bfloat16
  ref = _attention(32, (2, 2), head_dim=8)(x)   # same seed: same weights, float32
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05)


# --- the flag, the blocks, the network ------------------------------------------------------------

@pytest.mark.parametrize('flags', [
    {},                                                                  # ResNet-50
    {'inverted_bottleneck': True, 'depthwise': True},                    # Fig. 3b
    {'inverted_bottleneck': True, 'depthwise': True, 'depthwise_position': 'top'},   # in-block d.s.
])
def test_mhsa_last_stage_needs_convnext_blocks_and_separate_downsampling(flags):
  with pytest.raises(ConfigError, match=r'^mhsa_last_stage='):
    NetConfig(mhsa_last_stage=True, **flags)


def test_mhsa_last_stage_flag_checks():
  with pytest.raises(ConfigError, match=r'^mhsa_last_stage='):
    preset('convnext_tiny', mhsa_last_stage=1)
  with pytest.raises(ConfigError, match=r'^mhsa_last_stage=.*head width 32'):
    preset('convnext_tiny', mhsa_last_stage=True, width=10)      # last stage 80 channels
  assert MHSA_HEAD_DIM == 32


def test_convnext_t_with_mhsa_params_macs_and_blocks():
  """At 224: 24 heads of 32 over the 7x7 map in each of the last stage's 3 blocks; params and MACs
  counted by hand from ConvNeXt-T's."""
  cfg = LADDER.net_config('mhsa_last_stage')
  model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0)))
  for stage in model.stages[:3]:
    assert all(b.attn is None and b.conv1 is not None for b in stage.blocks)
  for block in model.stages[3].blocks:
    assert block.conv1 is None and block.attn.heads == 24 and block.attn.feature_size == (7, 7)
    assert block.norm1 is not None and block.layer_scale is not None
  c, n, side = 768, 49, 7
  dw_params, dw_macs = c * 49 + c, n * c * 49               # the 7x7 depthwise conv, with bias
  attn_params = c * 3 * c + 2 * (2 * side - 1) * MHSA_HEAD_DIM
  attn_macs = n * c * 3 * c + 2 * n * n * c + n * 2 * (2 * side - 1) * c   # qkv, qk + wv, q.r
  base = LADDER.net_config('convnext_t')
  assert count_params(model) == 28_589_128 + 3 * (attn_params - dw_params) == 33_784_840
  assert count_macs(cfg) == count_macs(base) + 3 * (attn_macs - dw_macs) == 4_724_110_848


def _logits_shape(model, x):
  """The logits' shape, traced (nothing computed): size errors are raised while tracing."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x).shape


def test_network_is_built_for_its_image_size():
  cfg = LADDER.net_config('mhsa_last_stage', depths=(1, 1, 1, 1), width=12, num_classes=5)
  for size, side in ((224, 7), (64, 2), (32, 1), ((64, 96), (2, 3))):
    model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0), image_size=size))
    assert model.stages[3].blocks[0].attn.feature_size == (side if isinstance(side, tuple)
                                                           else (side, side))
  model = create_model(cfg, seed=0, image_size=64)
  assert _logits_shape(model, jnp.zeros((1, 64, 64, 3))) == (1, 5)
  with pytest.raises(ConfigError, match=r'built for a 2x2 feature map .* got 7x7'):
    _logits_shape(model, jnp.zeros((1, 224, 224, 3)))
  with pytest.raises(ConfigError, match='image_size=16'):
    nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0), image_size=16))
  # Without attention the size is not used: ConvNeXt-T takes any input.
  plain = nnx.eval_shape(lambda: Network(cfg.replace(mhsa_last_stage=False), rngs=nnx.Rngs(0)))
  assert _logits_shape(plain, jnp.zeros((1, 64, 64, 3))) == (1, 5)


def test_network_takes_a_block_per_stage():
  """`blocks=`: one constructor per stage; the default is `stage_blocks(cfg, image_size)`, and a
  stage can be given another block without editing `Network`."""
  cfg = preset('convnext_tiny', depths=(1, 1, 1, 1), width=8, num_classes=3)
  default = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0)))
  given = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0), blocks=stage_blocks(cfg)))
  assert nnx.graphdef(default) == nnx.graphdef(given)
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))

  class Identity(nnx.Module):
    def __init__(self, in_dim, out_dim, *, stride, drop_path, rngs):
      assert in_dim == out_dim and stride == 1
      self.dim = out_dim

    def __call__(self, x, *, key=None):
      return x

  blocks = stage_blocks(cfg)
  blocks[2] = Identity
  model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0), blocks=blocks))
  assert isinstance(model.stages[2].blocks[0], Identity)
  assert isinstance(model.stages[3].blocks[0], LadderBlock)
  assert _logits_shape(model, x) == (1, 3)
  with pytest.raises(ConfigError, match='3 given for 4 stages'):
    nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0), blocks=blocks[:3]))


# --- the side branch ------------------------------------------------------------------------------

def test_mhsa_side_branch_sits_on_convnext_t():
  step = LADDER.step('mhsa_last_stage')
  assert not step.adopted and step.paper_top1 is None and step.paper_gflops is None
  assert step.group == 'beyond the paper'
  assert step.note == 'BoTNet (Srinivas et al. 2021), side branch'
  assert LADDER.names()[-3:] == ['convnext_t', 'grn', 'mhsa_last_stage']
  assert LADDER.base('mhsa_last_stage') == LADDER.base('grn') == 'convnext_t'
  assert LADDER.net_config('mhsa_last_stage') == LADDER.net_config('convnext_t',
                                                                   mhsa_last_stage=True)
  assert not LADDER.net_config('mhsa_last_stage').use_grn      # side branches are not inherited
  assert LADDER.recipe('mhsa_last_stage') == LADDER.recipe('convnext_t')
  assert 'mhsa_last_stage' not in LADDER.names(include_side=False)


def test_mhsa_side_branch_config_and_hash():
  """The ladder's config for the side branch differs from convnext_t's in the flag only; a run
  without attention hashes as it did before the flag existed."""
  from configs import ladder as ladder_config
  from experiments.training import runconfig
  a = ladder_config.get_config('convnext_t,smoke').to_dict()
  b = ladder_config.get_config('mhsa_last_stage,smoke').to_dict()
  assert b['model'].pop('mhsa_last_stage') is True and a['model'].pop('mhsa_last_stage') is False
  assert a['model'] == b['model']
  config = ladder_config.get_config('convnext_t,smoke')
  assert runconfig.config_hash(config) == '8c07bdfd0723'     # tests/test_mixed_precision.py's
  with config.unlocked():
    config.model.mhsa_last_stage = True
  assert runconfig.config_hash(config) != '8c07bdfd0723'


def test_mhsa_side_branch_trains_at_64px(train_step):
  """The side branch at full width and depth, 10 classes, 64x64 input (the last stage 2x2): forward
  and backward in train mode, every parameter (the offset embeddings included) gets a gradient."""
  model = create_model(LADDER.net_config('mhsa_last_stage', num_classes=10), seed=0,
                       image_size=64)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  y = jnp.array([1, 7])
  _, logits, grads, _ = train_step(model, x, y)   # checks: loss and gradients finite
  assert logits.shape == (2, 10)
  flat = nnx.to_flat_state(grads)
  assert all(float(jnp.abs(g.get_value()).sum()) > 0 for _, g in flat)
  attn = [path for path, _ in flat if 'attn' in path]
  assert len(attn) == 3 * 3   # qkv kernel, height and width offsets in each of the 3 blocks


# --- against timm ---------------------------------------------------------------------------------

def _timm_attention(dim, size, heads, seed, **kwargs):
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  import torch
  from timm.layers.bottleneck_attn import BottleneckAttn
  torch.manual_seed(seed)
  return BottleneckAttn(dim, feat_size=size, num_heads=heads, **kwargs).eval()


def _copied(ref, dim, size, head_dim):
  """Our layer with timm's weights: qkv [3C, C, 1, 1] -> [1, 1, C, 3C] (the same q | k | v and
  head-major channel order), the offset tables as they are."""
  layer = _attention(dim, size, head_dim)
  layer.qkv.kernel[...] = jnp.asarray(ref.qkv.weight.detach().numpy().transpose(2, 3, 1, 0))
  layer.height_rel[...] = jnp.asarray(ref.pos_embed.height_rel.detach().numpy())
  layer.width_rel[...] = jnp.asarray(ref.pos_embed.width_rel.detach().numpy())
  return layer


def _timm_logits(ref, xt):
  """timm's logits, read the way its forward computes them (B * heads, HW, HW)."""
  import torch
  b, _, h, w = xt.shape
  q, k, _ = torch.split(ref.qkv(xt), [ref.dim_out_qk, ref.dim_out_qk, ref.dim_out_v], dim=1)
  q = q.reshape(b * ref.num_heads, ref.dim_head_qk, -1).transpose(-1, -2)
  k = k.reshape(b * ref.num_heads, ref.dim_head_qk, -1)
  return (q @ k) * ref.scale + ref.pos_embed(q)


@pytest.mark.torch
@pytest.mark.parametrize('dim, size, head_dim', [(768, (7, 7), 32), (96, (5, 3), 32),
                                                 (64, (2, 2), 16)])
def test_attention_matches_timm(dim, size, head_dim):
  """Logits, outputs and gradients (input, qkv, both offset tables) against timm's BottleneckAttn
  (stride 1, default scale_pos_embed=False), float32, ConvNeXt-T's last stage first."""
  import torch
  ref = _timm_attention(dim, size, dim // head_dim, seed=dim)
  rng = np.random.RandomState(dim)
  x = rng.randn(2, *size, dim).astype(np.float32)
  cot = rng.randn(2, *size, dim).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
  out_t = ref(xt)
  (out_t * torch.from_numpy(np.ascontiguousarray(cot.transpose(0, 3, 1, 2)))).sum().backward()
  with torch.no_grad():
    logits_t = _timm_logits(ref, xt).numpy()

  layer = _copied(ref, dim, size, head_dim)
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    out = nnx.merge(graphdef, state)(x)
    return jnp.sum(out * cot), out

  (_, out), (gs, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      state, jnp.asarray(x))
  q, k, _ = layer.project(jnp.asarray(x))
  logits = np.asarray(layer.logits(q, k)).reshape(logits_t.shape)   # (b, heads) first in both
  out_t = out_t.detach().numpy().transpose(0, 2, 3, 1)
  errors = {'logits': np.abs(logits - logits_t).max(), 'out': np.abs(np.asarray(out) - out_t).max()}
  print(f'{dim} channels {size}: max |diff| logits {errors["logits"]:.1e} (std '
        f'{logits_t.std():.2f}), outputs {errors["out"]:.1e} (std {out_t.std():.2f})')
  assert logits_t.std() > 0.3   # far from uniform attention
  np.testing.assert_allclose(logits, logits_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, out_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gs['qkv']['kernel'].get_value(),
                             ref.qkv.weight.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-4, atol=1e-4)
  for name in ('height_rel', 'width_rel'):
    np.testing.assert_allclose(gs[name].get_value(), getattr(ref.pos_embed, name).grad.numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_timm_scaled_position_logits_differ():
  """timm's scale_pos_embed=True (the position terms scaled by 1/sqrt(d) too) is another layer:
  the comparison above would see it."""
  import torch
  ref = _timm_attention(96, (5, 3), 3, seed=96, scale_pos_embed=True)
  x = np.random.RandomState(96).randn(2, 5, 3, 96).astype(np.float32)
  with torch.no_grad():
    out_t = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  out = _copied(ref, 96, (5, 3), 32)(jnp.asarray(x))
  assert np.abs(np.asarray(out) - out_t.transpose(0, 2, 3, 1)).max() > 1e-3


def test_mhsa_side_branch_through_the_trainer(tmp_path, fashion):
  """`experiments.train` builds the side branch for data.image_size (64: the last stage 2x2), and
  a trained run loads back built for the same size."""
  import os
  import subprocess
  import sys

  from experiments.training import steptable
  from experiments.training.checkpoint import load_trained_model
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir, table = tmp_path / 'run', tmp_path / 'steps.csv'
  res = subprocess.run(
      [sys.executable, '-m', 'experiments.train',
       '--config=configs/ladder.py:mhsa_last_stage,smoke,image_size=64', f'--workdir={workdir}',
       f'--config.step_table={table}'], cwd=root, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  (row,) = steptable.read_rows(str(table))
  assert row['step'] == 'mhsa_last_stage' and row['image_size'] == '64'
  model, config = load_trained_model(str(workdir))
  assert config['model']['mhsa_last_stage'] is True
  assert model.stages[3].blocks[0].attn.feature_size == (2, 2)
  assert model(np.zeros((2, 64, 64, 1), np.float32)).shape == (2, 10)


def test_steps_side_cli():
  """`python -m experiments.ladder steps --side`: the side branches with params and GMACs at 224,
  each beside the adopted step it branches from."""
  import json
  import subprocess
  import sys
  cmd = [sys.executable, '-m', 'experiments.ladder', 'steps', '--side']
  rows = json.loads(subprocess.run(cmd + ['--json'], capture_output=True, text=True,
                                   check=True).stdout)
  assert [(r['step'], r['base']) for r in rows] == [
      ('kernel_5', 'move_up_depthwise'), ('kernel_9', 'kernel_7'), ('kernel_11', 'kernel_7'),
      ('grn', 'convnext_t'), ('mhsa_last_stage', 'convnext_t')]
  by_step = {r['step']: r for r in rows}
  assert by_step['grn']['params'] == 28_635_496
  mhsa = by_step['mhsa_last_stage']
  assert mhsa['params'] == 33_784_840 and mhsa['params_vs_base'] == 33_784_840 - 28_589_128
  assert round(mhsa['gmacs'], 6) == 4.724111 and mhsa['gmacs_vs_base'] > 0.26
  from experiments.ladder.steps import format_side  # what the command prints without --json
  line = next(line for line in format_side(rows).splitlines() if 'mhsa_last_stage' in line)
  assert 'convnext_t' in line and '33,784,840' in line and '4.724' in line and '+5,195,712' in line
  res = subprocess.run(cmd + ['--presets'], capture_output=True, text=True)
  assert res.returncode == 2 and 'Traceback' not in res.stderr
