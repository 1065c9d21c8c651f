"""The network's parts: stems, the ladder block, separate downsampling, the stage, the head.

`LadderBlock` is one residual block that walks from ResNet-50's bottleneck (Fig. 3a of the paper,
with a dense 3x3) to ConvNeXt's block (Fig. 3c / Fig. 4) as `NetConfig` flags change. Its three
layers are always held as `conv1`, `conv2`, `conv3` in the order data flows through them:

  ResNet / ResNeXt      1x1 reduce   -> kxk spatial (dense, grouped or depthwise) -> 1x1 expand
  inverted, middle      1x1 expand   -> kxk depthwise                              -> 1x1 reduce
  inverted, top         kxk depthwise -> 1x1 expand                                -> 1x1 reduce

with `norm{i}` after `conv{i}` where present, activations after layers 1 and 2 plus after the
residual add ('all', ResNet) or after layer 2 only ('one', ConvNeXt's single GELU between the 1x1s).
With `use_grn` (ConvNeXt V2), GRN follows layer 2's activation, on the expanded features. Given an
`attention_size` (`mhsa_last_stage`, BoTNet), layer 1 of ConvNeXt's block is global multi-head
self-attention (`attn`) instead of the depthwise conv (`conv1` is then None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from modernize import layers
from modernize.config import MHSA_HEAD_DIM, ConfigError, NetConfig


def _maybe(module):
  return module if module is not None else nnx.data(None)


def compute_dtype(cfg):
  """The modules' compute dtype (of a `NetConfig`, `SwinConfig` or `ViTConfig`): None for
  'float32' (the promoted dtype of input and parameters, as before mixed precision existed:
  float32, or float64 for float64 parameters), else the jnp dtype (bfloat16). Parameters are
  created float32 either way."""
  return None if cfg.dtype == 'float32' else jnp.dtype(cfg.dtype)


class LadderBlock(nnx.Module):
  """A residual block of the ladder; `in_dim -> out_dim` with `stride` in its spatial conv.

  `attention_size`: (H, W) of the feature map the block sees; when given, BoTNet's global
  self-attention (`layers.RelPosSelfAttention`, built for that size) replaces the depthwise conv of
  ConvNeXt's block (`depthwise_position='top'`, stride 1).
  """

  def __init__(self, in_dim: int, out_dim: int, *, stride: int, cfg: NetConfig,
               drop_path: float = 0.0, attention_size: tuple[int, int] | None = None,
               rngs: nnx.Rngs):
    k = cfg.kernel_size
    if not cfg.inverted_bottleneck:
      # Fig. 3a: wide -> narrow -> wide; the stride sits in the spatial conv (ResNet v1.5).
      mid = out_dim // cfg.expansion
      groups = mid if cfg.depthwise else cfg.groups
      shapes = [(in_dim, mid, 1, 1, 1), (mid, mid, k, stride, groups), (mid, out_dim, 1, 1, 1)]
    elif cfg.depthwise_position == 'middle':
      # Fig. 3b: narrow -> wide -> narrow, the depthwise conv on the wide (expanded) features.
      hidden = out_dim * cfg.expansion
      groups = hidden if cfg.depthwise else cfg.groups
      shapes = [(in_dim, hidden, 1, 1, 1), (hidden, hidden, k, stride, groups),
                (hidden, out_dim, 1, 1, 1)]
    else:
      # Fig. 3c: the depthwise conv moved up, on the narrow input; the 1x1s do the heavy lifting.
      hidden = out_dim * cfg.expansion
      shapes = [(in_dim, in_dim, k, stride, in_dim), (in_dim, hidden, 1, 1, 1),
                (hidden, out_dim, 1, 1, 1)]

    dtype = compute_dtype(cfg)
    with_norm = (True, True, True) if cfg.norms == 'all' else (True, False, False)
    self.activation = cfg.activation
    self.act_after = (True, True, False) if cfg.activations == 'all' else (False, True, False)
    self.act_after_add = cfg.activations == 'all'

    # A conv directly followed by BatchNorm needs no bias (BN's shift replaces it).
    def make(i):
      cin, cout, kk, s, g = shapes[i]
      conv = layers.conv(cin, cout, kk, stride=s, groups=g, init=cfg.init,
                         use_bias=not (with_norm[i] and cfg.norm == 'batch'),
                         depthwise_impl=cfg.depthwise_impl, dtype=dtype, rngs=rngs)
      return conv, norm_after(i)

    def norm_after(i):
      return _maybe(layers.norm(cfg.norm, shapes[i][1], dtype) if with_norm[i] else None)

    if attention_size is None:
      self.conv1, self.norm1 = make(0)
      self.attn = nnx.data(None)
    else:
      # BoTNet: global multi-head self-attention where ConvNeXt's block has its depthwise conv.
      if cfg.depthwise_position != 'top' or stride != 1 or in_dim != out_dim:
        raise ConfigError('mhsa_last_stage: attention replaces the depthwise conv of ConvNeXt\'s '
                          "block (depthwise_position='top') in a block that keeps its resolution "
                          'and width')
      self.conv1 = nnx.data(None)
      self.attn = layers.RelPosSelfAttention(in_dim, attention_size, head_dim=MHSA_HEAD_DIM,
                                             init=cfg.init, dtype=dtype, rngs=rngs)
      self.norm1 = norm_after(0)
    self.conv2, self.norm2 = make(1)
    # ConvNeXt V2's GRN on the expanded features, between the two 1x1 convs.
    self.grn = _maybe(layers.GlobalResponseNorm(shapes[1][1], dtype=dtype) if cfg.use_grn
                      else None)
    self.conv3, self.norm3 = make(2)
    self.layer_scale = _maybe(layers.LayerScale(out_dim, cfg.layer_scale_init, dtype=dtype)
                              if cfg.layer_scale_init > 0 else None)
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)
    if stride != 1 or in_dim != out_dim:
      # ResNet's projection shortcut: 1x1 conv carrying the stride, then a norm.
      self.shortcut_conv = layers.conv(in_dim, out_dim, 1, stride=stride, init=cfg.init,
                                       use_bias=cfg.norm != 'batch', dtype=dtype, rngs=rngs)
      self.shortcut_norm = layers.norm(cfg.norm, out_dim, dtype)
    else:
      self.shortcut_conv = self.shortcut_norm = nnx.data(None)

  def __call__(self, x, *, key: jax.Array | None = None):
    """`key`: the stochastic-depth key (else the block's own RNG stream is used)."""
    act = layers.activation(self.activation)
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = self.shortcut_norm(self.shortcut_conv(x))
    layer1 = self.conv1 if self.attn is None else self.attn   # depthwise conv or attention
    for i, (conv, norm) in enumerate([(layer1, self.norm1), (self.conv2, self.norm2),
                                      (self.conv3, self.norm3)]):
      x = conv(x)
      if norm is not None:
        x = norm(x)
      if self.act_after[i]:
        x = act(x)
      if i == 1 and self.grn is not None:   # after layer 2's activation (ConvNeXt V2)
        x = self.grn(x)
    if self.layer_scale is not None:
      x = self.layer_scale(x)
    x = shortcut + self.drop_path(x, key=key)
    return act(x) if self.act_after_add else x


def resnet_bottleneck(in_dim: int, out_dim: int, *, stride: int = 1,
                      rngs: nnx.Rngs) -> LadderBlock:
  """torchvision's ResNet-50 bottleneck (v1.5): 1x1, 3x3 (stride), 1x1, BN and ReLU."""
  return LadderBlock(in_dim, out_dim, stride=stride, cfg=NetConfig(), rngs=rngs)


def convnext_block(dim: int, *, kernel_size: int = 7, layer_scale_init: float = 1e-6,
                   drop_path: float = 0.0, rngs: nnx.Rngs) -> LadderBlock:
  """ConvNeXt's block: 7x7 depthwise, LayerNorm, 1x1 (4x), GELU, 1x1, LayerScale, DropPath."""
  cfg = CONVNEXT_BLOCK.replace(kernel_size=kernel_size, layer_scale_init=layer_scale_init)
  return LadderBlock(dim, dim, stride=1, cfg=cfg, drop_path=drop_path, rngs=rngs)


CONVNEXT_BLOCK = NetConfig(
    depthwise=True, inverted_bottleneck=True, depthwise_position='top', kernel_size=7,
    activation='gelu', activations='one', norms='one', norm='layer', downsampling='separate',
    layer_scale_init=1e-6, init='trunc_normal', stem='patchify', width=96, depths=(3, 3, 9, 3))


class Stem(nnx.Module):
  """'resnet': 7x7/2 conv, norm, activation, 3x3/2 max-pool. 'patchify': 4x4/4 conv, norm."""

  def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.stem
    batch_norm = cfg.norm == 'batch'
    dtype = compute_dtype(cfg)
    if cfg.stem == 'resnet':
      self.conv = layers.conv(cfg.in_channels, cfg.width, 7, stride=2, init=cfg.init,
                              use_bias=not batch_norm, dtype=dtype, rngs=rngs)
    else:
      # Non-overlapping patches, as ViT's patch embedding.
      self.conv = layers.conv(cfg.in_channels, cfg.width, 4, stride=4, padding=0, init=cfg.init,
                              use_bias=not batch_norm, dtype=dtype, rngs=rngs)
    self.norm = layers.norm(cfg.norm, cfg.width, dtype)
    self.activation = cfg.activation

  def __call__(self, x):
    x = self.norm(self.conv(x))
    if self.kind == 'resnet':
      x = layers.activation(self.activation)(x)
      # PyTorch's MaxPool2d(3, 2, padding=1), which pads with -inf.
      x = layers.max_pool(x, 3, 2, 1)
    return x


class Downsample(nnx.Module):
  """ConvNeXt's separate downsampling layer: norm, then a 2x2 stride-2 conv."""

  def __init__(self, in_dim: int, out_dim: int, cfg: NetConfig, *, rngs: nnx.Rngs):
    self.norm = layers.norm(cfg.norm, in_dim, compute_dtype(cfg))
    self.conv = layers.conv(in_dim, out_dim, 2, stride=2, padding=0, init=cfg.init,
                            use_bias=True, dtype=compute_dtype(cfg), rngs=rngs)

  def __call__(self, x):
    return self.conv(self.norm(x))


class Head(nnx.Module):
  """Global average pool, an optional norm (ConvNeXt), then the classifier. The logits are float32
  whatever the compute dtype (softmax and the loss run in float32)."""

  def __init__(self, dim: int, cfg: NetConfig, *, rngs: nnx.Rngs):
    dtype = compute_dtype(cfg)
    self.norm = _maybe(layers.norm(cfg.norm, dim, dtype) if cfg.downsampling == 'separate'
                       else None)
    self.fc = layers.linear(dim, cfg.num_classes, init=cfg.init, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x.mean(axis=(1, 2))   # jnp's mean accumulates bfloat16 in float32
    if self.norm is not None:
      x = self.norm(x)
    return layers.at_least_float32(self.fc(x))


class Stage(nnx.Module):
  """An optional separate downsampling layer followed by residual blocks: the stage of `Network`
  (`Downsample` or None) and of `SwinTransformer` (`PatchMerging` in every stage but the first,
  then blocks alternating unshifted and shifted windows). Block `j` gets `key` folded with `j`."""

  def __init__(self, downsample: nnx.Module | None, blocks: list[nnx.Module]):
    self.downsample = _maybe(downsample)
    self.blocks = nnx.List(blocks)

  def __call__(self, x, *, key: jax.Array | None = None):
    if self.downsample is not None:
      x = self.downsample(x)
    for j, block in enumerate(self.blocks):
      x = block(x, key=None if key is None else jax.random.fold_in(key, j))
    return x
