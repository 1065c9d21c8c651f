"""The network's configuration: one named flag per change of the ResNet -> ConvNeXt ladder.

`NetConfig()` with no arguments is torchvision's ResNet-50 (v1.5). Every step of the paper's
ladder flips one flag (see `modernize.ladder`), and the final step is ConvNeXt-T. Any combination
that makes sense builds; one that does not raises `ConfigError` naming the flag at construction.
`feature_size` and `min_image_size` say which input sizes a config can take.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration value that cannot build a network; the message names the flag."""


# Channels per attention head with `mhsa_last_stage`: Swin-T's 32, the network ConvNeXt-T is built
# against (same stage widths): 24 heads at ConvNeXt-T's 768 channels, and a scaled-down ladder keeps
# the head width (6 heads at the CPU scale's 192).
MHSA_HEAD_DIM = 32


_CHOICES = {
    'stem': ('resnet', 'patchify'),
    'depthwise_position': ('middle', 'top'),
    'activation': ('relu', 'gelu'),
    'activations': ('all', 'one'),
    'norms': ('all', 'one'),
    'norm': ('batch', 'layer'),
    'downsampling': ('in_block', 'separate'),
    'init': ('kaiming', 'trunc_normal'),
    'depthwise_impl': ('auto', 'xla', 'shift', 'native'),
    'dtype': ('float32', 'bfloat16'),
}


class FlagsConfig:
  """`from_dict`, `to_dict` and `replace` for a frozen dataclass of named flags (`NetConfig` and
  the transformers' configs): unknown flags are refused in one `ConfigError` that names them."""

  _KIND = None   # the word for the flags in error messages; default: the class's name

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]):
    """A config from a mapping (e.g. an ml_collections ConfigDict), rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f'unknown {cls._KIND or cls.__name__} flag(s) {unknown}; '
                        f'known flags: {sorted(names)}')
    return cls(**dict(values))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes):
    return self.from_dict({**self.to_dict(), **changes})


@dataclasses.dataclass(frozen=True)
class NetConfig(FlagsConfig):
  """Architecture flags. Defaults give torchvision's ResNet-50.

  Attributes:
    depths: residual blocks per stage; (3, 4, 6, 3) is ResNet-50, (3, 3, 9, 3) the "stage ratio"
      step.
    width: base width; stage i is `width * 2**i` channels wide (ResNet: the bottleneck's inner
      width; inverted bottleneck: the residual stream's width). 64 is ResNet-50, 96 is ConvNeXt-T.
    stem: 'resnet' (7x7 stride-2 conv, norm, activation, 3x3 stride-2 max-pool) or 'patchify'
      (4x4 stride-4 conv followed by a norm).
    groups: groups of the spatial conv (ResNeXt); ignored when `depthwise`.
    depthwise: the spatial conv is depthwise (groups = channels).
    expansion: channel ratio between a block's wide and narrow layers (4 in ResNet and ConvNeXt).
    inverted_bottleneck: narrow -> wide -> narrow (Fig. 3b) instead of wide -> narrow -> wide.
    depthwise_position: 'middle' (between the 1x1 convs) or 'top' (first layer of the block,
      Fig. 3c).
    kernel_size: spatial conv kernel (odd).
    activation: 'relu' or 'gelu' (exact erf GELU, as PyTorch's nn.GELU()).
    activations: 'all' (after the block's first two layers and after the residual add, as ResNet)
      or 'one' (a single activation after the block's middle layer, i.e. between the 1x1 convs).
    norms: 'all' (a norm after each of the block's three layers) or 'one' (after the first only).
    norm: 'batch' (BatchNorm) or 'layer' (channels-last LayerNorm, eps 1e-6).
    downsampling: 'in_block' (stride 2 in the spatial conv of each stage's first block plus a 1x1
      stride-2 projection shortcut, as ResNet) or 'separate' (a norm and a 2x2 stride-2 conv between
      stages, plus a norm after global pooling, as ConvNeXt).
    layer_scale_init: initial value of LayerScale's per-channel gain (0 disables LayerScale).
    use_grn: ConvNeXt V2's Global Response Normalization on the block's expanded features, after
      the activation between the two 1x1 convs (timm's `use_grn`); needs ConvNeXt's block
      (`depthwise_position='top'`). V2 drops LayerScale: set `layer_scale_init=0` too.
    mhsa_last_stage: BoTNet's change (Srinivas et al. 2021): in the last stage's blocks, global
      multi-head self-attention with 2-D relative position logits (`layers.RelPosSelfAttention`,
      heads of `MHSA_HEAD_DIM` channels) in place of the depthwise conv. Needs ConvNeXt's block and
      separate downsampling; the network is then built for one input size (`Network(image_size=)`).
    drop_path_rate: stochastic depth rate of the last block; rates grow linearly from 0 over blocks.
    init: 'kaiming' (torchvision's ResNet: fan-out normal convs, PyTorch-default linear) or
      'trunc_normal' (N(0, 0.02) for every conv and linear, zero biases: ConvNeXt and Table 5).
    num_classes: classifier outputs.
    in_channels: image channels.
    depthwise_impl: implementation of the depthwise conv ('auto' picks a fast one per backend);
      changes speed, not results.
    dtype: compute dtype, 'float32' or 'bfloat16' (mixed precision: parameters stay float32;
      activations, convs and matmuls run in bfloat16; the norms' statistics, the logits, softmax
      and the loss in float32).
  """
  depths: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  stem: str = 'resnet'
  groups: int = 1
  depthwise: bool = False
  expansion: int = 4
  inverted_bottleneck: bool = False
  depthwise_position: str = 'middle'
  kernel_size: int = 3
  activation: str = 'relu'
  activations: str = 'all'
  norms: str = 'all'
  norm: str = 'batch'
  downsampling: str = 'in_block'
  layer_scale_init: float = 0.0
  use_grn: bool = False
  mhsa_last_stage: bool = False
  drop_path_rate: float = 0.0
  init: str = 'kaiming'
  num_classes: int = 1000
  in_channels: int = 3
  depthwise_impl: str = 'auto'
  dtype: str = 'float32'

  _KIND = 'network'

  def __post_init__(self):
    object.__setattr__(self, 'depths', tuple(self.depths))
    self._validate()

  def stage_widths(self) -> tuple[int, ...]:
    """Channels of the residual stream in each stage."""
    scale = 1 if self.inverted_bottleneck else self.expansion
    return tuple(self.width * 2**i * scale for i in range(len(self.depths)))

  def _validate(self):
    def fail(flag, message):
      raise ConfigError(f'{flag}={getattr(self, flag)!r}: {message}')

    for flag, choices in _CHOICES.items():
      if getattr(self, flag) not in choices:
        fail(flag, f'must be one of {list(choices)}')
    for flag in ('width', 'groups', 'expansion', 'kernel_size', 'num_classes', 'in_channels'):
      value = getattr(self, flag)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(flag, 'must be a positive integer')
    for flag in ('depthwise', 'inverted_bottleneck', 'use_grn', 'mhsa_last_stage'):
      if not isinstance(getattr(self, flag), bool):
        fail(flag, 'must be True or False')
    if not self.depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                              for d in self.depths):
      fail('depths', 'must be a non-empty sequence of positive integers')
    if self.kernel_size % 2 == 0:
      fail('kernel_size', 'must be odd, so that padding keeps the feature map centred')
    if not 0.0 <= self.drop_path_rate < 1.0:
      fail('drop_path_rate', 'must be in [0, 1)')
    if self.layer_scale_init < 0:
      fail('layer_scale_init', 'must be >= 0 (0 disables LayerScale)')
    if self.depthwise and self.groups != 1:
      fail('groups', 'conflicts with depthwise=True, which already sets groups = channels')
    if self.depthwise_position == 'top' and not (self.inverted_bottleneck and self.depthwise):
      fail('depthwise_position',
           "'top' moves the depthwise conv of an inverted bottleneck up; it needs "
           'inverted_bottleneck=True and depthwise=True')
    if self.use_grn and self.depthwise_position != 'top':
      fail('use_grn',
           "GRN sits between the two 1x1 convs of ConvNeXt's block (Fig. 3c); it needs "
           "inverted_bottleneck=True, depthwise=True and depthwise_position='top'")
    if self.mhsa_last_stage and not (self.depthwise_position == 'top'
                                     and self.downsampling == 'separate'):
      fail('mhsa_last_stage',
           "attention replaces the depthwise conv of ConvNeXt's block (Fig. 3c) in a stage that "
           "keeps its resolution; it needs depthwise_position='top' and downsampling='separate'")
    if self.mhsa_last_stage and self.stage_widths()[-1] % MHSA_HEAD_DIM:
      fail('mhsa_last_stage', f'the last stage width {self.stage_widths()[-1]} must be a multiple '
           f'of the head width {MHSA_HEAD_DIM}')
    if self.groups > 1:
      narrow = self.width if not self.inverted_bottleneck else self.width * self.expansion
      if narrow % self.groups:
        fail('groups', f'must divide the spatial conv width {narrow} of the first stage')


# --- input sizes ----------------------------------------------------------------------------------

def _spatial_layers(cfg: NetConfig) -> list[tuple[int, int, int]]:
  """(kernel, stride, padding) of each layer that shrinks the feature map, in order; a layer of
  size k, stride s and padding p maps n pixels to (n + 2p - k) // s + 1, PyTorch's floor."""
  stem = [(7, 2, 3), (3, 2, 1)] if cfg.stem == 'resnet' else [(4, 4, 0)]   # + max-pool
  k = cfg.kernel_size   # in-block: the spatial conv's stride (its 1x1 shortcut gives the same size)
  down = (2, 2, 0) if cfg.downsampling == 'separate' else (k, 2, k // 2)
  return stem + [down] * (len(cfg.depths) - 1)


def feature_size(cfg: NetConfig, image_size: int) -> int:
  """Side of the last stage's feature map for a square input of `image_size` pixels; 0 when the
  input is too small for the network (its pooled features would be empty)."""
  n = image_size
  for k, s, p in _spatial_layers(cfg):
    n = max(0, (n + 2 * p - k) // s + 1) if n > 0 else 0
  return n


def min_image_size(cfg: NetConfig) -> int:
  """The smallest square input the network can classify: the last feature map is then 1x1.

  ResNet stem with in-block downsampling: 1 (every layer rounds up); patchify stem: 4 with in-block
  downsampling, 32 with separate 2x2/2 downsampling (ConvNeXt: 28 or 30 pixels leave a 0x0 map);
  ResNet stem with separate downsampling: 29. Found by inverting each layer's size from the end.
  """
  n = 1
  for k, s, p in reversed(_spatial_layers(cfg)):
    n = max(1, (n - 1) * s + k - 2 * p)
  return n
