"""The ladders, defined once: ordered, cumulative steps from a ResNet to a ConvNeXt.

Each `Step` names the flags it changes. A step's network is its ladder's starting config with the
changes of every *adopted* step up to and including it applied in order; side branches (the kernel
sizes the paper tried but did not adopt; on top of ConvNeXt-T, ConvNeXt V2's GRN and BoTNet's
attention in the last stage) apply on top of the step before them and are not inherited.

Two ladders: `LADDER` (ResNet-50 -> ConvNeXt-T, Table 10 of the paper) and `LADDER_200`
(ResNet-200 -> ConvNeXt-B, Table 11). `presets` has ConvNeXt T/S/B/L/XL, ConvNeXt V2-T and the
ResNets.

Choices the paper leaves open, made here and documented in the README:
- the patchify stem is the 4x4/4 conv followed by the network's norm (ResNet's stem cell ended in
  BN too; the activation and max-pool go);
- a block's single norm ('fewer norms') follows its first layer, its single activation follows its
  middle layer; the post-add activation goes with 'fewer activations';
- LayerScale (a learnable per-channel gain, init 1e-6) arrives with 'fewer norms': before it, the
  branch ends in a BatchNorm whose scale plays that role; removing that BN would otherwise leave the
  branch without one. This keeps both endpoints' parameter counts exact (25,557,032 / 28,589,128).
- the weight init of Table 5 (trunc. normal 0.02) is part of the enhanced recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from modernize.config import ConfigError, NetConfig

# The groups of the paper's Figure 2, then one for side branches from outside the paper.
GROUPS = ('baseline', 'training recipe', 'macro design', 'ResNeXt', 'inverted bottleneck',
          'large kernel', 'micro design', 'beyond the paper')


@dataclasses.dataclass(frozen=True)
class Step:
  name: str                     # stable identifier, e.g. 'patchify_stem'
  label: str                    # the paper's table label
  description: str              # one line: what changes
  group: str                    # one of GROUPS
  changes: Mapping[str, Any]    # NetConfig flags set by this step
  paper_top1: float | None
  paper_gflops: float | None
  paper_top1_std: float | None = None
  recipe: str | None = None     # 'original' | 'enhanced' when the step sets the training recipe
  adopted: bool = True          # False: a side branch (not carried into later steps)
  # Where the paper prints two different figures for the same step, the one we check against.
  flops_reference: float | None = None
  note: str = ''


@dataclasses.dataclass(frozen=True)
class Ladder:
  name: str
  start: NetConfig
  steps: tuple[Step, ...]

  def names(self, include_side: bool = True) -> list[str]:
    return [s.name for s in self.steps if include_side or s.adopted]

  def step(self, name: str) -> Step:
    for s in self.steps:
      if s.name == name:
        return s
    raise ConfigError(f'unknown step {name!r} of ladder {self.name!r}; steps: {self.names()}')

  def base(self, name: str) -> str:
    """The adopted step that step `name` builds on: the last adopted step before it."""
    target, base = self.step(name), self.steps[0].name
    for s in self.steps:
      if s is target:
        return base
      if s.adopted:
        base = s.name
    return base

  def index(self, name: str) -> int:
    return self.names().index(self.step(name).name)

  def net_config(self, name: str, **overrides) -> NetConfig:
    """The network of step `name`: every adopted change up to it, then its own, then `overrides`."""
    target = self.step(name)
    values = self.start.to_dict()
    for s in self.steps:
      if s.adopted or s is target:
        values.update(s.changes)
      if s is target:
        break
    values.update(overrides)
    return NetConfig.from_dict(values)

  def recipe(self, name: str) -> str:
    """The training recipe in force at step `name` ('original' or 'enhanced')."""
    target, recipe = self.step(name), 'original'
    for s in self.steps:
      if s.recipe and (s.adopted or s is target):
        recipe = s.recipe
      if s is target:
        break
    return recipe


def _kernel_steps(ks, tops, flops, adopted_k, std=None):
  steps = []
  for k, top1, gf, sd in zip(ks, tops, flops, std or [None] * len(ks)):
    adopted = k == adopted_k
    steps.append(Step(
        f'kernel_{k}', f'kernel size -> {k}',
        f'depthwise kernel {k}x{k}' + (' (adopted)' if adopted else ' (side branch, not adopted)'),
        'large kernel', {'kernel_size': k}, top1, gf, sd, adopted=adopted))
  return steps


_MICRO = [
    ('gelu', 'ReLU -> GELU', 'every ReLU becomes an (exact) GELU', {'activation': 'gelu'}),
    ('fewer_activations', 'fewer activations',
     'keep one GELU per block, between the two 1x1 convs; none after the add',
     {'activations': 'one'}),
    ('fewer_norms', 'fewer norms',
     "keep one norm per block, after the depthwise conv; LayerScale takes the last BN's role",
     {'norms': 'one', 'layer_scale_init': 1e-6}),
    ('layer_norm', 'BN -> LN', 'every BatchNorm becomes a channels-last LayerNorm',
     {'norm': 'layer'}),
]
_LN_NOTE = ('Table 10 prints 4.46 GFLOPs for BN -> LN, but Figure 2 prints 4.2 for the same step, '
            "and swapping BN for LN changes no conv or linear (Table 11's same step stays at "
            '14.81): 4.46 looks like a typo, so we check against 4.2.')


def _micro_steps(results, ln_flops_reference=None):
  steps = [Step(name, label, desc, 'micro design', changes, *res)
           for (name, label, desc, changes), res in zip(_MICRO, results)]
  if ln_flops_reference is not None:
    steps[-1] = dataclasses.replace(steps[-1], flops_reference=ln_flops_reference, note=_LN_NOTE)
  return steps


def _ladder(name, start, *, stage_ratio, widen, results, kernels, last, beyond=()):
  """The shared shape of both ladders; `results` maps step name -> (top1, gflops[, std]);
  `beyond`: side branches after the last step, from outside the paper."""
  def step(step_name, label, desc, group, changes, **kw):
    return Step(step_name, label, desc, group, changes, *results[step_name], **kw)

  base = start.depths
  return Ladder(name, start, tuple([
      step(name, f'ResNet-{name[6:]} (PyTorch)',
           f'torchvision ResNet-{name[6:]} (v1.5) with the original 90-epoch recipe', 'baseline',
           {}, recipe='original'),
      step('enhanced_recipe', f'ResNet-{name[6:]} (enhanced recipe)',
           'same network, trained with the enhanced (DeiT/Swin-like) recipe: 300 vs 90 epochs, '
           'AdamW, heavy augmentation, trunc-normal init', 'training recipe',
           {'init': 'trunc_normal'}, recipe='enhanced'),
      step('stage_ratio', 'stage ratio',
           f'blocks per stage {base} -> {stage_ratio["depths"]} (1:1:3:1)'
           + (f', width {start.width} -> {stage_ratio["width"]}' if 'width' in stage_ratio else ''),
           'macro design', stage_ratio),
      step('patchify_stem', '"patchify" stem',
           '7x7/2 conv + 3x3/2 max-pool stem -> 4x4 stride-4 non-overlapping conv',
           'macro design', {'stem': 'patchify'}),
      step('depthwise', 'depthwise conv', "the bottleneck's 3x3 conv becomes depthwise",
           'ResNeXt', {'depthwise': True}),
      step(f'width_{widen}', 'increase width', f'base width -> {widen} (Swin\'s C)', 'ResNeXt',
           {'width': widen}),
      step('inverted_bottleneck', 'inverting dimensions',
           'inverted bottleneck: 1x1 expand x4, depthwise, 1x1 reduce (Fig. 3b)',
           'inverted bottleneck', {'inverted_bottleneck': True}),
      step('move_up_depthwise', 'move up depthwise conv',
           'the depthwise conv moves to the top of the block (Fig. 3c)', 'large kernel',
           {'depthwise_position': 'top'}),
      *_kernel_steps((5, 7, 9, 11), kernels[0], kernels[1], 7, kernels[2]),
      *_micro_steps([results[n] for n, *_ in _MICRO], ln_flops_reference=results.get('ln_ref')),
      step(last, f'separate d.s. conv (ConvNeXt-{last[-1].upper()})',
           'separate 2x2/2 conv downsampling, with a norm before it, after the stem and after '
           'global pooling', 'micro design', {'downsampling': 'separate'}),
      *beyond,
  ]))


# Table 10 (ResNet-50 / Swin-T regime): top-1 (mean of 3 seeds), GFLOPs, std.
LADDER = _ladder(
    'resnet50', NetConfig(),
    stage_ratio={'depths': (3, 3, 9, 3)}, widen=96, last='convnext_t',
    results={'resnet50': (76.13, 4.09), 'enhanced_recipe': (78.82, 4.09, 0.07),
             'stage_ratio': (79.36, 4.53, 0.07), 'patchify_stem': (79.51, 4.42, 0.18),
             'depthwise': (78.28, 2.35, 0.08), 'width_96': (80.50, 5.27, 0.02),
             'inverted_bottleneck': (80.64, 4.64, 0.03), 'move_up_depthwise': (79.92, 4.07, 0.08),
             'gelu': (80.62, 4.15, 0.14), 'fewer_activations': (81.27, 4.15, 0.06),
             'fewer_norms': (81.41, 4.15, 0.09), 'layer_norm': (81.47, 4.46, 0.09),
             'ln_ref': 4.2, 'convnext_t': (81.97, 4.49, 0.06)},
    kernels=((80.35, 80.57, 80.57, 80.47), (4.10, 4.15, 4.21, 4.29), (0.08, 0.14, 0.06, 0.11)),
    beyond=[
        Step('grn', 'GRN (ConvNeXt V2)',
             "Global Response Normalization after the block's GELU, between the two 1x1 convs; "
             'LayerScale removed (ConvNeXt V2-T, side branch, not adopted)', 'beyond the paper',
             {'use_grn': True, 'layer_scale_init': 0.0}, None, None, adopted=False,
             note='ConvNeXt V2 (Woo et al. 2023), side branch'),
        Step('mhsa_last_stage', 'MHSA in the last stage (BoTNet)',
             'global multi-head self-attention with 2-D relative position logits in place of the '
             "last stage's depthwise convs (BoTNet, side branch, not adopted)", 'beyond the paper',
             {'mhsa_last_stage': True}, None, None, adopted=False,
             note='BoTNet (Srinivas et al. 2021), side branch'),
    ])

# Table 11 (ResNet-200 / Swin-B regime): single runs. Its stage-ratio step also widens 64 -> 84.
LADDER_200 = _ladder(
    'resnet200', NetConfig(depths=(3, 24, 36, 3)),
    stage_ratio={'depths': (3, 3, 27, 3), 'width': 84}, widen=128, last='convnext_b',
    results={'resnet200': (78.20, 15.01), 'enhanced_recipe': (81.14, 15.01),
             'stage_ratio': (81.33, 14.52), 'patchify_stem': (81.59, 14.38),
             'depthwise': (80.54, 7.23), 'width_128': (81.85, 16.76),
             'inverted_bottleneck': (82.64, 15.68), 'move_up_depthwise': (82.04, 14.63),
             'gelu': (82.19, 14.81), 'fewer_activations': (82.71, 14.81),
             'fewer_norms': (83.17, 14.81), 'layer_norm': (83.35, 14.81),
             'convnext_b': (83.60, 15.35)},
    kernels=((82.32, 82.30, 82.27, 82.18), (14.70, 14.81, 14.95, 15.13), None))

LADDERS = {ladder.name: ladder for ladder in (LADDER, LADDER_200)}


def get_ladder(name: str) -> Ladder:
  if name not in LADDERS:
    raise ConfigError(f'unknown ladder {name!r}; ladders: {sorted(LADDERS)}')
  return LADDERS[name]
