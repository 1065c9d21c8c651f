"""NetConfig: every flag validated at construction, with a message naming the flag."""

import pytest

from modernize import ConfigError, NetConfig, preset


@pytest.mark.parametrize('changes, flag', [
    ({'kernel_size': 4}, 'kernel_size'),
    ({'kernel_size': 0}, 'kernel_size'),
    ({'stem': 'conv'}, 'stem'),
    ({'norm': 'group'}, 'norm'),
    ({'activation': 'swish'}, 'activation'),
    ({'activations': 'two'}, 'activations'),
    ({'norms': 'none'}, 'norms'),
    ({'downsampling': 'pool'}, 'downsampling'),
    ({'depthwise_position': 'top'}, 'depthwise_position'),              # needs inverted + depthwise
    ({'depthwise_position': 'top', 'inverted_bottleneck': True}, 'depthwise_position'),
    ({'depthwise_position': 'bottom'}, 'depthwise_position'),
    ({'depthwise': True, 'groups': 32}, 'groups'),                       # conflicting flags
    ({'groups': 3}, 'groups'),                                           # 64 is not divisible by 3
    ({'depths': ()}, 'depths'),
    ({'depths': (3, 0, 6, 3)}, 'depths'),
    ({'width': 0}, 'width'),
    ({'width': 1.5}, 'width'),
    ({'expansion': True}, 'expansion'),
    ({'drop_path_rate': 1.0}, 'drop_path_rate'),
    ({'layer_scale_init': -1e-6}, 'layer_scale_init'),
    ({'depthwise': 'yes'}, 'depthwise'),
    ({'init': 'xavier'}, 'init'),
    ({'depthwise_impl': 'cuda'}, 'depthwise_impl'),
    ({'use_grn': True}, 'use_grn'),                                      # needs ConvNeXt's block
    ({'use_grn': 'yes'}, 'use_grn'),
])
def test_invalid_flag_is_named(changes, flag):
  with pytest.raises(ConfigError, match=rf'^{flag}='):
    NetConfig(**changes)


def test_unknown_flag_is_named():
  with pytest.raises(ConfigError, match='kernal_size'):
    NetConfig.from_dict({'kernal_size': 7})


def test_sensible_combinations_build():
  # Off-ladder combinations that make sense are accepted.
  NetConfig(groups=32)                                     # ResNeXt
  NetConfig(inverted_bottleneck=True)                      # inverted, dense spatial conv
  NetConfig(norm='layer', downsampling='separate')         # ResNet with ConvNeXt's downsampling
  NetConfig(stem='patchify', kernel_size=9, activation='gelu', norms='one', activations='one')
  preset('convnext_tiny', kernel_size=11, num_classes=10, in_channels=1)
  preset('convnext_tiny', use_grn=True)                    # GRN beside LayerScale (V2 drops it)


def test_replace_validates():
  with pytest.raises(ConfigError, match='kernel_size'):
    NetConfig().replace(kernel_size=2)


def test_unknown_preset():
  with pytest.raises(ConfigError, match='convnext_huge'):
    preset('convnext_huge')


def test_preset_overrides_any_flag():
  assert preset('convnext_tiny', drop_path_rate=0.0).drop_path_rate == 0.0
  assert preset('convnext_base', kernel_size=9).width == 128
