"""ConvNeXt V2's Global Response Normalization (Woo et al. 2023): the layer, the `use_grn` flag,
the `convnextv2_tiny` preset and its conversion from timm, and the ladder's `grn` side branch.

The timm comparisons (marked `torch`) randomise every norm affine, bias and GRN gamma/beta, which
timm initialises to zero, so that a layout or placement error cannot hide behind an identity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modernize import (
  LADDER,
  ConfigError,
  GlobalResponseNorm,
  NetConfig,
  Network,
  count_params,
  create_model,
  preset,
)

FWD_TOL = 1e-4   # logits, float32, as tests/test_torch_parity.py


# --- the layer ------------------------------------------------------------------------------------

def _grn_reference(x, gamma, beta, eps=1e-6):
  """The paper's formula in float64 numpy, written independently of the layer."""
  x = np.asarray(x, np.float64)
  gx = np.sqrt((x ** 2).sum(axis=(1, 2), keepdims=True))
  nx = gx / (gx.mean(axis=-1, keepdims=True) + eps)
  return gamma * (x * nx) + beta + x


def _grn_with(dim, gamma, beta):
  layer = GlobalResponseNorm(dim)
  layer.scale[...] = jnp.asarray(gamma, jnp.float32)
  layer.bias[...] = jnp.asarray(beta, jnp.float32)
  return layer


def test_grn_formula_and_zero_init():
  rng = np.random.RandomState(0)
  x = rng.randn(3, 5, 6, 8).astype(np.float32)
  layer = GlobalResponseNorm(8)
  assert layer.eps == 1e-6
  assert not np.any(layer.scale[...]) and not np.any(layer.bias[...])
  np.testing.assert_array_equal(layer(jnp.asarray(x)), x)   # gamma = beta = 0: the identity
  gamma, beta = rng.randn(8), rng.randn(8)
  out = _grn_with(8, gamma, beta)(jnp.asarray(x))
  np.testing.assert_allclose(out, _grn_reference(x, gamma, beta), rtol=1e-5, atol=1e-5)
  # eps: with ||x|| near 1e-6 it decides Nx (an eps of 1e-5 would nearly halve the response).
  tiny = x * 1e-6
  out = _grn_with(8, gamma, np.zeros(8))(jnp.asarray(tiny))
  np.testing.assert_allclose(out, _grn_reference(tiny, gamma, 0.0), rtol=1e-4, atol=0)


def test_grn_gradient_at_an_all_zero_channel():
  """A channel that is zero over the whole map (e.g. after a ReLU) has ||x|| = 0, where sqrt's
  derivative is infinite: the gradient must stay finite (PyTorch's norm takes 0 there)."""
  rng = np.random.RandomState(1)
  x = rng.randn(2, 4, 4, 6).astype(np.float32)
  x[0, :, :, 2] = 0.0
  layer = _grn_with(6, rng.randn(6), rng.randn(6))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

  gs, gx = jax.grad(loss, argnums=(0, 1))(state, jnp.asarray(x))
  for g in [gx, *jax.tree.leaves(gs)]:
    assert np.all(np.isfinite(g))


# --- the flag and the preset ----------------------------------------------------------------------

@pytest.mark.parametrize('flags', [
    {},                                                          # ResNet-50's bottleneck
    {'inverted_bottleneck': True},                               # Fig. 3b, dense 3x3
    {'inverted_bottleneck': True, 'depthwise': True},            # Fig. 3b, depthwise in the middle
])
def test_use_grn_needs_the_convnext_block(flags):
  with pytest.raises(ConfigError, match=r'^use_grn='):
    NetConfig(use_grn=True, **flags)


def test_use_grn_must_be_a_bool():
  with pytest.raises(ConfigError, match=r'^use_grn='):
    preset('convnext_tiny', use_grn=1)


def test_convnextv2_tiny_params_and_blocks():
  cfg = preset('convnextv2_tiny')
  assert cfg.use_grn and cfg.layer_scale_init == 0.0
  assert cfg == preset('convnext_tiny', use_grn=True, layer_scale_init=0.0)
  model = nnx.eval_shape(lambda: Network(cfg, rngs=nnx.Rngs(0)))
  assert count_params(model) == 28_635_496   # timm's convnextv2_tiny
  for stage, width in zip(model.stages, (96, 192, 384, 768)):
    for block in stage.blocks:
      assert block.layer_scale is None
      assert block.grn.scale.shape == block.grn.bias.shape == (4 * width,)
  # ConvNeXt-T's blocks have no GRN; use_grn alone keeps LayerScale (timm's flags are independent).
  tiny = nnx.eval_shape(lambda: Network(preset('convnext_tiny'), rngs=nnx.Rngs(0)))
  assert tiny.stages[0].blocks[0].grn is None
  both = nnx.eval_shape(lambda: Network(preset('convnext_tiny', use_grn=True), rngs=nnx.Rngs(0)))
  assert both.stages[0].blocks[0].grn is not None
  assert both.stages[0].blocks[0].layer_scale is not None


# --- the side branch ------------------------------------------------------------------------------

def test_grn_side_branch_sits_on_convnext_t():
  step = LADDER.step('grn')
  assert not step.adopted and step.paper_top1 is None and step.paper_gflops is None
  assert step.note == 'ConvNeXt V2 (Woo et al. 2023), side branch'
  assert LADDER.base('grn') == 'convnext_t'
  assert LADDER.names().index('grn') == LADDER.names().index('convnext_t') + 1
  assert LADDER.net_config('grn') == LADDER.net_config('convnext_t', use_grn=True,
                                                       layer_scale_init=0.0)
  assert LADDER.recipe('grn') == LADDER.recipe('convnext_t')
  assert 'grn' not in LADDER.names(include_side=False)


def test_grn_side_branch_trains_at_32px(train_step):
  """The side branch at full size, 10 classes, 32x32 input: forward and backward in train mode,
  every parameter (GRN's zero-initialised gamma and beta included) gets a gradient."""
  model = create_model(LADDER.net_config('grn', num_classes=10), seed=0)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  y = jnp.array([1, 7])
  _, logits, grads, _ = train_step(model, x, y)   # checks: loss and gradients finite
  assert logits.shape == (2, 10)
  flat = nnx.to_flat_state(grads)
  grn = [(path, g) for path, g in flat if 'grn' in path]
  assert len(grn) == 2 * 18   # gamma and beta in each of ConvNeXt-T's 18 blocks
  assert all(float(jnp.abs(g.get_value()).sum()) > 0 for _, g in grn)


# --- against timm ---------------------------------------------------------------------------------

def _timm():
  pytest.importorskip('torch')
  return pytest.importorskip('timm')


def _randomize_v2(model, seed: int):
  """Random LayerNorm affines, conv / linear biases and GRN gamma / beta (all zero or one in a
  fresh timm model)."""
  import torch
  from timm.layers.grn import GlobalResponseNorm as TimmGRN
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):            # LayerNorm2d is one too
        module.weight.uniform_(0.5, 1.5, generator=g)
        module.bias.normal_(0.0, 0.1, generator=g)
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        module.bias.normal_(0.0, 0.05, generator=g)
      elif isinstance(module, TimmGRN):
        module.weight.normal_(0.0, 0.5, generator=g)
        module.bias.normal_(0.0, 0.1, generator=g)
  return model.eval()


@functools.lru_cache(maxsize=None)
def _timm_v2():
  timm = _timm()
  import torch
  torch.manual_seed(0)
  return _randomize_v2(timm.create_model('convnextv2_tiny', pretrained=False), 4)


@functools.lru_cache(maxsize=None)
def _converted():
  from modernize.convert import from_torch_state_dict
  return from_torch_state_dict(_timm_v2().state_dict(), 'convnextv2_tiny')


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _both_logits(model, tm, x_nhwc):
  import torch
  ours = np.asarray(_apply(*nnx.split(model), jnp.asarray(x_nhwc)))
  with torch.no_grad():
    theirs = tm(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()
  return ours, theirs


@pytest.mark.torch
def test_grn_layer_matches_timm():
  """Values and gradients (input, gamma, beta) against timm's channels-last GlobalResponseNorm,
  with one channel zero over a whole map."""
  _timm()
  import torch
  from timm.layers.grn import GlobalResponseNorm as TimmGRN
  rng = np.random.RandomState(2)
  x = rng.randn(2, 7, 5, 24).astype(np.float32)
  x[1, :, :, 3] = 0.0
  cot = rng.randn(*x.shape).astype(np.float32)
  gamma, beta = rng.randn(24).astype(np.float32), rng.randn(24).astype(np.float32)

  ref = TimmGRN(24, channels_last=True)
  assert ref.eps == 1e-6
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(gamma))
    ref.bias.copy_(torch.from_numpy(beta))
  xt = torch.from_numpy(x).requires_grad_(True)
  out_t = ref(xt)
  (out_t * torch.from_numpy(cot)).sum().backward()

  layer = _grn_with(24, gamma, beta)
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    out = nnx.merge(graphdef, state)(x)
    return jnp.sum(out * cot), out

  (_, out), (gs, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      state, jnp.asarray(x))
  np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gs['scale'].get_value(), ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gs['bias'].get_value(), ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.torch
def test_timm_key_names():
  keys = set(_timm_v2().state_dict())
  assert 'stages.2.blocks.8.mlp.grn.weight' in keys and 'stages.2.blocks.8.mlp.grn.bias' in keys
  assert not any(k.endswith('gamma') for k in keys)   # no LayerScale


@pytest.mark.torch
@pytest.mark.parametrize('size', [224, 64])
def test_convnextv2_tiny_logits_match_timm(size):
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  ours, theirs = _both_logits(_converted(), _timm_v2(), x)
  diff = float(np.abs(ours - theirs).max())
  print(f'convnextv2_tiny {size}x{size}: max |logit diff| {diff:.2e}, '
        f'logit std {theirs.std():.2f}')
  assert theirs.std() > 0.1   # the randomised model is far from constant
  assert diff <= FWD_TOL


@pytest.mark.torch
def test_convnextv2_tiny_state_dicts_round_trip():
  """timm -> ours -> timm is the identity; ours -> the official repo's names (GRN as
  grn.gamma/beta [1, 1, 1, C]) -> timm's own FB-checkpoint remapping loads into timm strictly and
  gives back the same tensors; the official-format dict converts to the same model."""
  import torch
  from timm.models.convnext import checkpoint_filter_fn

  from modernize.convert import from_torch_state_dict, to_torch_state_dict
  tm, model = _timm_v2(), _converted()
  ref = tm.state_dict()

  timm_sd = to_torch_state_dict(model, 'convnextv2_tiny')
  assert set(timm_sd) == set(ref)
  for k, v in timm_sd.items():
    torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)

  fb = to_torch_state_dict(model, 'convnextv2_tiny', 'fb')
  assert fb['stages.1.2.grn.gamma'].shape == (1, 1, 1, 4 * 192)
  assert 'stages.1.2.grn.beta' in fb and not any('mlp' in k for k in fb)
  remapped = checkpoint_filter_fn({'model': fb}, tm)
  fresh = _timm().create_model('convnextv2_tiny', pretrained=False)
  fresh.load_state_dict(remapped, strict=True)
  for k, v in fresh.state_dict().items():
    torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)

  again = from_torch_state_dict({'model': fb}, 'convnextv2_tiny')
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again, nnx.Param)),
                               nnx.to_flat_state(nnx.state(model, nnx.Param))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


@pytest.mark.torch
def test_convnext_v1_weights_do_not_load_as_v2():
  """A ConvNeXt-T (V1) state dict into convnextv2_tiny: every GRN key is named missing and every
  LayerScale gamma unexpected."""
  timm = _timm()
  from modernize.convert import from_torch_state_dict
  v1 = timm.create_model('convnext_tiny', pretrained=False).state_dict()
  with pytest.raises(ValueError) as info:
    from_torch_state_dict(v1, 'convnextv2_tiny')
  message = str(info.value)
  assert 'missing keys (36)' in message and 'mlp.grn.weight' in message
  assert 'unexpected keys (18)' in message and 'blocks.0.gamma' in message
