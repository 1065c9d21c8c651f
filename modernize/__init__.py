"""modernize: the ConvNeXt paper's ResNet -> ConvNeXt ladder as one configurable Flax NNX network.

Public API:
  NetConfig, ConfigError          one named flag per ladder change (`modernize.config`)
  min_image_size, feature_size    the smallest input a config takes; its last feature map's side
  Network, create_model, count_params   the configurable network (`modernize.network`)
  stage_blocks                     the block of each stage (`Network(blocks=...)` takes others)
  LadderBlock, resnet_bottleneck, convnext_block, Stem, Downsample, Head   (`modernize.blocks`)
  LayerNorm, BatchNorm, DropPath, LayerScale, GlobalResponseNorm           (`modernize.layers`)
  RelPosSelfAttention              BoTNet's attention (`mhsa_last_stage`, `modernize.layers`)
  DepthwiseConv, depthwise_conv2d  a depthwise conv that is fast on CPU too (`modernize.depthwise`)
  LADDER, LADDER_200, Ladder, Step, get_ladder   the ladders (`modernize.ladder`)
  preset, PRESETS                  ResNet-50/200, ConvNeXt T/S/B/L/XL, V2-T (`modernize.presets`)
  REFERENCES, SwinConfig, ViTConfig, SwinTransformer, VisionTransformer
                                   Swin-T and ViT-S/16 as timm's (`modernize.transformers`)
  count_macs                       multiply-accumulates the paper's way (`modernize.flops`)
  from_torch_state_dict            PyTorch (timm / torchvision / official) weights
                                   (`modernize.convert`)
"""

from modernize.blocks import Downsample, Head, LadderBlock, Stem, convnext_block, resnet_bottleneck
from modernize.config import ConfigError, NetConfig, feature_size, min_image_size
from modernize.depthwise import DepthwiseConv, depthwise_conv2d
from modernize.flops import count_macs
from modernize.ladder import LADDER, LADDER_200, Ladder, Step, get_ladder
from modernize.layers import (
  BatchNorm,
  DropPath,
  GlobalResponseNorm,
  LayerNorm,
  LayerScale,
  RelPosSelfAttention,
)
from modernize.network import Network, count_params, create_model, stage_blocks
from modernize.presets import PRESETS, REFERENCES, preset
from modernize.transformers import SwinConfig, SwinTransformer, VisionTransformer, ViTConfig


def from_torch_state_dict(state_dict, arch: str, **kwargs):
  """Builds the model `arch` from a PyTorch state dict; see `modernize.convert`."""
  from modernize.convert import from_torch_state_dict as convert  # torch-free import of the package
  return convert(state_dict, arch, **kwargs)


__version__ = '0.1.0'
