"""Named networks: the two ResNets the ladders start from, ConvNeXt T/S/B/L/XL and ConvNeXt V2-T
(`PRESETS`, each a `NetConfig` for `Network`), and the paper's transformer references Swin-T and
ViT-S/16 (`REFERENCES`, a `SwinConfig` / `ViTConfig` each, `modernize.transformers`).

Drop-path rates are the paper's ImageNet-1K ones (Table 5: T/S/B/L = 0.1/0.4/0.5/0.5; XL, trained on
ImageNet-22K only in the paper, takes L's; V2-T keeps T's); pass `drop_path_rate=` to change them.
"""

from __future__ import annotations

from modernize.blocks import CONVNEXT_BLOCK
from modernize.config import ConfigError, NetConfig
from modernize.transformers import swin_t, vit_s


def resnet50(**overrides) -> NetConfig:
  return NetConfig().replace(**overrides)


def resnet200(**overrides) -> NetConfig:
  return NetConfig(depths=(3, 24, 36, 3)).replace(**overrides)


def _convnext(depths, width, drop_path_rate):
  def preset(**overrides) -> NetConfig:
    return CONVNEXT_BLOCK.replace(
        **{'depths': depths, 'width': width, 'drop_path_rate': drop_path_rate, **overrides})
  return preset


convnext_tiny = _convnext((3, 3, 9, 3), 96, 0.1)
convnext_small = _convnext((3, 3, 27, 3), 96, 0.4)
convnext_base = _convnext((3, 3, 27, 3), 128, 0.5)
convnext_large = _convnext((3, 3, 27, 3), 192, 0.5)
convnext_xlarge = _convnext((3, 3, 27, 3), 256, 0.5)


def convnextv2_tiny(**overrides) -> NetConfig:
  """timm's `convnextv2_tiny` (Woo et al. 2023): ConvNeXt-T with GRN in place of LayerScale."""
  return convnext_tiny(**{'use_grn': True, 'layer_scale_init': 0.0, **overrides})


PRESETS = {
    'resnet50': resnet50, 'resnet200': resnet200,
    'convnext_tiny': convnext_tiny, 'convnext_small': convnext_small,
    'convnext_base': convnext_base, 'convnext_large': convnext_large,
    'convnext_xlarge': convnext_xlarge, 'convnextv2_tiny': convnextv2_tiny,
}


# The transformers the paper compares against (Tables 1 and 3); not `Network`s.
REFERENCES = {'swin_t': swin_t, 'vit_s': vit_s}
# Their published FLOPs at 224x224 (multiply-accumulates, as fvcore counts them): Swin paper
# Table 1 (Swin-T 4.5G) and DeiT paper Table 1 (DeiT-S 4.6G), repeated in the ConvNeXt paper's
# Table 1.
REFERENCE_GFLOPS = {'swin_t': 4.5, 'vit_s': 4.6}
# Their published ImageNet-1K top-1 at 224x224: Swin-T 81.3 (Swin paper Table 1, the ConvNeXt
# paper's Table 1 and Figure 2) and DeiT-S 79.8 (DeiT paper Table 1), and their names in tables.
REFERENCE_TOP1 = {'swin_t': 81.3, 'vit_s': 79.8}
REFERENCE_LABELS = {'swin_t': 'Swin-T', 'vit_s': 'ViT-S/16'}


def preset(name: str, **overrides):
  """The config of a named network: a `NetConfig` for a `PRESETS` name, a `SwinConfig` or
  `ViTConfig` for a `REFERENCES` one."""
  known = {**PRESETS, **REFERENCES}
  if name not in known:
    raise ConfigError(f'unknown architecture {name!r}; known: {sorted(known)}')
  return known[name](**overrides)
