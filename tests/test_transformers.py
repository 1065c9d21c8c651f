"""The transformer references, Swin-T and ViT-S/16 (`modernize.transformers`): their configs and
presets, parameters and MACs against timm's and the published figures, training at small sizes,
and (marked `torch`) converted timm weights giving timm's logits and one AdamW step giving
PyTorch's parameters.

The timm comparisons randomise every LayerNorm affine, every bias, Swin's relative position bias
tables, ViT's class token and LayerScale gammas (where present) so that no layout error can hide
behind an identity or a zero.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modernize import (
  PRESETS,
  ConfigError,
  count_macs,
  count_params,
  create_model,
  preset,
  transformers,
)
from modernize.network import model_class
from modernize.presets import REFERENCES

FWD_TOL = 1e-4     # max |logit diff| / max |logit|, float32
STEP_TOL = 1e-5    # parameters after one AdamW step, as tests/test_torch_parity.py
LR, BETAS, WD = 1e-3, (0.9, 0.999), 0.05

TIMM_NAMES = {'swin_t': 'swin_tiny_patch4_window7_224', 'vit_s': 'vit_small_patch16_224'}
# One other size each supports: Swin at 28 px with 2x2 patches and 4x4 windows (stage maps 14, 7
# (padded to 8 for its windows), 4 (patch merging pads 7), 2 (one 2x2 window, unshifted)); ViT at
# 32 px with 4x4 patches and LayerScale (timm's init_values).
SMALL = {'swin_t': (28, {'img_size': 28, 'patch_size': 2, 'window_size': 4}),
         'vit_s': (32, {'img_size': 32, 'patch_size': 4, 'layer_scale_init': 1e-5})}


def _build(cfg):
  return nnx.eval_shape(lambda: model_class(cfg)(cfg, rngs=nnx.Rngs(0)))


# --- configs and presets --------------------------------------------------------------------------

def test_presets_by_name():
  assert isinstance(preset('swin_t'), transformers.SwinConfig)
  assert isinstance(preset('vit_s'), transformers.ViTConfig)
  assert preset('swin_t', window_size=4).window_size == 4
  assert set(REFERENCES) == {'swin_t', 'vit_s'} and not set(REFERENCES) & set(PRESETS)
  with pytest.raises(ConfigError, match='swin_t'):   # the known names include the references
    preset('swin_b')


@pytest.mark.parametrize('name, flags, flag', [
    ('swin_t', {'img_size': 30, 'patch_size': 4}, 'img_size'),
    ('swin_t', {'num_heads': (3, 6, 12)}, 'num_heads'),
    ('swin_t', {'num_heads': (3, 5, 12, 24)}, 'num_heads'),
    ('swin_t', {'dtype': 'float16'}, 'dtype'),
    ('vit_s', {'num_heads': 5}, 'num_heads'),
    ('vit_s', {'patch_size': 0}, 'patch_size'),
    ('vit_s', {'drop_path_rate': 1.0}, 'drop_path_rate'),
    ('vit_s', {'layer_scale_init': -1.0}, 'layer_scale_init'),
])
def test_config_errors_name_the_flag(name, flags, flag):
  with pytest.raises(ConfigError, match=rf'^{flag}='):
    preset(name, **flags)


def test_unknown_flag():
  with pytest.raises(ConfigError, match='window_size'):
    preset('vit_s', window_size=7)


@pytest.mark.parametrize('name, params, published_gflops', [
    ('swin_t', 28_288_354, 4.5), ('vit_s', 22_050_664, 4.6)])
def test_params_and_macs(name, params, published_gflops):
  """timm's parameter counts exactly; MACs (attention's matmuls included) within 2% of the
  published FLOPs (Swin paper Table 1: 4.5 G; DeiT paper Table 1: 4.6 G)."""
  cfg = preset(name)
  assert count_params(_build(cfg)) == params
  gmacs = count_macs(cfg, 224) / 1e9
  assert abs(gmacs / published_gflops - 1) < 0.02, gmacs


def test_macs_count_attention():
  """A one-block ViT counted by hand: patch conv, qkv, q k^T, attention x v, proj, MLP, head."""
  cfg = preset('vit_s', img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2,
               num_classes=5)
  n, c = 16 + 1, 8
  expected = (16 * c * 4 * 4 * 3 + n * c * 3 * c + 2 * n * n * c + n * c * c
              + 2 * n * c * 4 * c + c * 5)
  assert count_macs(cfg, 16) == expected


def test_swin_window_shrinks_to_the_map():
  model = _build(preset('swin_t'))
  assert [(b.window, b.shift) for b in model.layers[2].blocks[:2]] == [(7, 0), (7, 3)]
  assert [(b.window, b.shift) for b in model.layers[3].blocks] == [(7, 0), (7, 0)]   # 7x7 map
  small = _build(preset('swin_t', **SMALL['swin_t'][1]))
  assert [(b.window, b.shift) for b in small.layers[3].blocks] == [(2, 0), (2, 0)]
  assert small.layers[3].blocks[0].attn.relative_position_bias_table.shape == (9, 24)


def test_shifted_window_mask_regions():
  """4x4 map, 2x2 windows shifted by 1: the last window holds four regions, the first one."""
  mask = transformers.shifted_window_mask(4, 4, 2, 2, 1, 1)
  assert mask.shape == (4, 4, 4)
  assert not mask[0].any()
  assert (mask[3] != 0).sum() == 12 and set(np.unique(mask)) == {-100.0, 0.0}


def test_wrong_input_size_is_named():
  model = create_model(preset('vit_s', **SMALL['vit_s'][1], depth=1, embed_dim=12, num_heads=2))
  with pytest.raises(ValueError, match='32x32'):
    model(jnp.zeros((1, 64, 64, 3)))


# --- training at small sizes ----------------------------------------------------------------------

def _tiny(name, dtype):
  size, flags = SMALL[name]
  shape = ({'depths': (2, 2), 'num_heads': (2, 4), 'embed_dim': 8} if name == 'swin_t'
           else {'depth': 2, 'embed_dim': 16, 'num_heads': 2})
  return size, preset(name, **flags, **shape, num_classes=7, drop_path_rate=0.2, dtype=dtype)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', ['swin_t', 'vit_s'])
def test_trains_and_evaluates(name, dtype, train_step):
  """Forward and backward in train mode (stochastic depth from the key) and eval; logits and every
  parameter's gradient float32 and finite, each parameter gets a gradient."""
  size, cfg = _tiny(name, dtype)
  model = create_model(cfg, seed=0)
  x = jax.random.normal(jax.random.key(0), (4, size, size, 3))
  y = jnp.array([1, 3, 5, 6])
  # train_step checks: loss and gradients finite.
  _, logits, grads, (eval_logits, eval_again) = train_step(
      model, x, y, evaluate=lambda m: (m(x), m(x, key=jax.random.key(2))))
  assert logits.dtype == eval_logits.dtype == jnp.float32 and logits.shape == (4, 7)
  np.testing.assert_array_equal(eval_logits, eval_again)   # eval: no stochastic depth
  for path, g in nnx.to_flat_state(grads):
    g = g.get_value()
    assert g.dtype == jnp.float32, path
    assert float(jnp.abs(g).sum()) > 0, path


def test_bfloat16_logits_close_to_float32():
  size, cfg = _tiny('swin_t', 'float32')
  m32 = create_model(cfg, seed=0)
  m16 = create_model(cfg.replace(dtype='bfloat16'), seed=0)
  m32.eval()
  m16.eval()
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  a, b = np.asarray(m32(x)), np.asarray(m16(x))
  assert b.dtype == np.float32
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3


# --- against timm ---------------------------------------------------------------------------------

def _torch():
  pytest.importorskip('torch')
  return pytest.importorskip('timm')


def _randomize(model, seed: int):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.uniform_(0.5, 1.5, generator=g)
        module.bias.normal_(0.0, 0.1, generator=g)
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        module.bias.normal_(0.0, 0.05, generator=g)
    for name, p in model.named_parameters():
      if name.endswith('gamma'):                       # LayerScale
        p.uniform_(0.5, 1.5, generator=g)
      elif name.endswith(('relative_position_bias_table', 'cls_token')):
        p.normal_(0.0, 0.5, generator=g)
  return model.eval()


def _timm_kwargs(flags: dict) -> dict:
  flags = dict(flags)
  if 'layer_scale_init' in flags:
    flags['init_values'] = flags.pop('layer_scale_init')
  return flags


@functools.lru_cache(maxsize=None)
def _reference(name: str, small: bool):
  """(timm model in eval mode, our overrides, image size)."""
  timm = _torch()
  import torch
  torch.set_num_threads(2)
  size, flags = SMALL[name] if small else (224, {})
  torch.manual_seed(0)
  # No stochastic depth (timm's Swin defaults to 0.1): the AdamW step runs in train mode.
  model = timm.create_model(TIMM_NAMES[name], pretrained=False, drop_path_rate=0.0,
                            **_timm_kwargs(flags))
  return _randomize(model, 1 if small else 2), flags, size


def _nchw(x):
  import torch
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


@pytest.mark.torch
@pytest.mark.parametrize('small', [False, True], ids=['224', 'small'])
@pytest.mark.parametrize('name', ['swin_t', 'vit_s'])
def test_logits_match_timm(name, small):
  import torch

  from modernize.convert import from_torch_state_dict
  ref, flags, size = _reference(name, small)
  model = from_torch_state_dict(ref.state_dict(), name, **flags)
  assert count_params(model) == sum(p.numel() for p in ref.parameters())
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  got = np.asarray(_apply(*nnx.split(model), jnp.asarray(x)))
  with torch.no_grad():
    expected = ref(_nchw(x)).numpy()
  rel = float(np.abs(got - expected).max() / np.abs(expected).max())
  print(f'{name} {size}x{size} {flags}: max |logit diff| / max |logit| = {rel:.2e} '
        f'(logit std {expected.std():.2f})')
  assert got.shape == expected.shape == (2, 1000)
  assert expected.std() > 0.1   # the randomised model is far from constant
  assert rel <= FWD_TOL


@pytest.mark.torch
@pytest.mark.parametrize('name', ['swin_t', 'vit_s'])
def test_layer_norm_eps_as_timm(name):
  """Every LayerNorm's eps, in order (Swin: nn.LayerNorm's 1e-5; ViT: 1e-6). A wrong eps changes
  the logits by far less than the tolerance, so it is checked directly."""
  import torch

  from modernize.layers import LayerNorm
  ref, flags, _ = _reference(name, True)
  theirs = [m.eps for m in ref.modules() if isinstance(m, torch.nn.LayerNorm)]
  ours = [m.eps for _, m in nnx.iter_graph(_build(preset(name, **flags)))
          if isinstance(m, LayerNorm)]
  assert sorted(ours) == sorted(theirs) and len(set(theirs)) == 1


@pytest.mark.torch
@pytest.mark.parametrize('name', ['swin_t', 'vit_s'])
def test_state_dict_round_trip(name):
  """timm -> ours -> timm is the identity, and timm loads it strictly."""
  import torch

  from modernize.convert import from_torch_state_dict, to_torch_state_dict
  ref, flags, _ = _reference(name, True)
  model = from_torch_state_dict(ref.state_dict(), name, **flags)
  back = to_torch_state_dict(model, name)
  assert sorted(back) == sorted(ref.state_dict())
  for key, value in ref.state_dict().items():
    assert torch.equal(back[key], value), key
  copy.deepcopy(ref).load_state_dict(back, strict=True)


@pytest.mark.torch
def test_wrong_family_and_size_are_named():
  from modernize.convert import from_torch_state_dict
  ref, _, _ = _reference('vit_s', True)
  with pytest.raises(ValueError, match="holds a ViT .* arch='swin_t'"):
    from_torch_state_dict(ref.state_dict(), 'swin_t')
  with pytest.raises(ValueError, match=r'pos_embed: expected shape \(1, 197, 384\), got '
                                       r'\(1, 65, 384\)'):
    from_torch_state_dict(ref.state_dict(), 'vit_s')   # built for 32 px, loaded at 224
  with pytest.raises(ValueError, match='ConvNeXt'):
    from_torch_state_dict(_torch().create_model('convnext_atto').state_dict(), 'vit_s')


# One AdamW step in train mode, compared as tests/test_torch_parity.py compares ConvNeXt's: with
# eps = 1e-8 in float64 on both sides (the first step's slope lr / eps turns float32 rounding of a
# near-zero gradient into a step difference up to 2 lr), and in float32 with eps = 1e-3.

def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jax_step(graphdef, params, rest, x, labels, eps):
  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

  grads = jax.grad(loss_fn)(params)
  tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=eps, weight_decay=WD, mask=_decay_mask)
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def _torch_step(model, x, labels, eps):
  import torch
  model.train()
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': WD},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=LR, betas=BETAS, eps=eps)
  opt.zero_grad()
  torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels)).backward()
  opt.step()
  return {k: v.double().numpy() for k, v in model.state_dict().items()}


@pytest.mark.torch
@pytest.mark.parametrize('dtype,eps', [('float64', 1e-8), ('float32', 1e-3)])
@pytest.mark.parametrize('name', ['swin_t', 'vit_s'])
def test_adamw_step_matches(name, dtype, eps):
  import torch

  from modernize.convert import from_torch_state_dict, to_torch_state_dict
  ref, flags, size = _reference(name, True)
  before = {k: v.double().numpy() for k, v in ref.state_dict().items()}
  x = np.random.RandomState(3).randn(2, size, size, 3).astype(np.float32)
  labels = np.array([3, 917], np.int64)

  with jax.enable_x64(dtype == 'float64'):
    model = from_torch_state_dict(ref.state_dict(), name, drop_path_rate=0.0, **flags)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(lambda a: a.astype(dtype), (params, rest))
    params = _jax_step(graphdef, params, rest, jnp.asarray(x, dtype),
                       jnp.asarray(labels, jnp.int32), eps)
    nnx.update(model, params)
    got = to_torch_state_dict(model, name, tensors='numpy')

  torch_model = copy.deepcopy(ref).to(getattr(torch, dtype))   # timm's drop_path_rate: 0 here
  for module in torch_model.modules():
    assert not isinstance(module, _torch().layers.DropPath), 'timm model with stochastic depth'
  expected = _torch_step(torch_model, _nchw(x).to(getattr(torch, dtype)), labels, eps)

  assert sorted(got) == sorted(expected)
  diff = max(float(np.abs(got[k] - expected[k]).max()) for k in got)
  moved = max(float(np.abs(got[k] - before[k]).max()) for k in got)
  print(f'{name} {dtype} eps={eps:g} 2x{size}x{size}: after one AdamW step max |param diff| = '
        f'{diff:.3g} (largest change {moved:.3g})')
  assert moved > 0.5 * LR
  assert diff <= STEP_TOL


def test_steps_presets_lists_the_references(monkeypatch, capsys):
  """`python -m experiments.ladder steps --presets`: the references after the ConvNet presets
  (here only resnet50, to stay quick), timm's parameters and MACs beside the published FLOPs."""
  from experiments import ladder
  from modernize import presets
  monkeypatch.setattr(presets, 'PRESETS', {'resnet50': presets.resnet50})
  assert ladder.main(['steps', '--presets']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in lines] == ['resnet50', 'swin_t', 'vit_s']
  assert lines[1].split()[:4] == ['swin_t', '28,288,354', 'params', '4.491']
  assert lines[1].endswith('(published 4.5 GFLOPs, -0.2%)')
  assert lines[2].split()[:4] == ['vit_s', '22,050,664', 'params', '4.599']
  assert lines[2].endswith('(published 4.6 GFLOPs, -0.0%)')
  assert 'published' not in lines[0]
