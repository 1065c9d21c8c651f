"""Train one step of the ResNet -> ConvNeXt ladder.

  python -m experiments.train --config configs/ladder.py:patchify_stem,data=fashion_mnist,seed=1 \
      --workdir runs/patchify_stem
  python -m experiments.train --config configs/ladder.py:swin_t,miniature --workdir runs/swin_t

The argument after ':' is a step name followed by comma-separated options. The step is a step of
the ladder or one of the paper's transformer references, `swin_t` (Swin-T) or `vit_s` (ViT-S/16):
those train under the enhanced recipe, as the steps from `enhanced_recipe` on, with the same
options, shrunk by the same scale and for small images as `reference_model` says. Options:
  ladder=resnet50|resnet200   which ladder (default resnet50: Table 10)
  data=NAME                   fashion_mnist (default), cifar10, cifar100, imagenette, imagenet2012,
                              or folder:PATH (your images: PATH/{train,test}/<class>/*.png|jpg)
  seed=N                      seed of init, data order, augmentation and stochastic depth
  scale=full|small|cpu|tiny   model scale (default: full on imagenet2012/imagenette, cpu otherwise)
  length=X                    training length as a fraction of the paper's (90 epochs for the
                              original recipe, 300 for the enhanced one); the 90:300 ratio is kept
  batch=N                     global batch size
  image_size=N                input resolution
  epochs=X                    train X epochs (both recipes; schedules keep their place in training)
  longer=F                    train F times as long (the plateau check: F=2)
  miniature                   the CPU miniature recipe (MINIATURE below): short runs calibrated on a
                              validation split; the default of `make ladder`
  layer_scale_init=X          LayerScale's initial gain, in the steps that have LayerScale only
                              (the recipe's value otherwise: 1e-6, Table 5)
  smoke                       tiny everything: a few steps on a few hundred examples (tests, CI)
Any field below can then be overridden with --config.FIELD=VALUE, e.g.
  --config.model.kernel_size=9 --config.optimizer.base_lr=2e-3 --config.epochs=2
"""

from __future__ import annotations

import os

import ml_collections

from modernize import ladder as ladders
from modernize import presets
from modernize.config import ConfigError

# Model scales: depths are multiplied (and rounded, at least 1 block) and widths divided so that
# each step's change survives: 1:1:3:1 stays 1:1:3:1, 64 -> 96 stays a 1.5x widening, and the
# expansion ratio 4 stays 4. ResNet-50's (3, 4, 6, 3) becomes (1, 1, 2, 1) at a third.
SCALES = {
    'full': (1.0, 1),
    'small': (1 / 3, 2),
    'cpu': (1 / 3, 4),
    'tiny': (1 / 3, 8),
}

# The two recipes of the paper (Table 5 and torchvision's reference). Learning rates are given at
# a reference batch size and scaled linearly with the actual global batch.
RECIPES = {
    'original': dict(
        epochs=90, optimizer='sgd', base_lr=0.1, lr_batch=256, momentum=0.9, weight_decay=1e-4,
        decay_all=True, schedule='step', warmup_epochs=0, step_epochs=(30, 60), min_lr=0.0,
        label_smoothing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0, randaugment_n=0,
        randaugment_m=0, randaugment_mstd=0.0, random_erasing=0.0, drop_path_rate=0.0),
    'enhanced': dict(
        epochs=300, optimizer='adamw', base_lr=4e-3, lr_batch=4096, momentum=0.9,
        weight_decay=0.05, decay_all=False, schedule='cosine', warmup_epochs=20, step_epochs=(),
        min_lr=1e-6, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0,
        randaugment_n=2,
        randaugment_m=9, randaugment_mstd=0.5, random_erasing=0.25, drop_path_rate=0.1),
}

# The CPU miniature (option `miniature`; `make ladder`): Fashion-MNIST at 32x32, scale cpu, batch
# 128, a few epochs: a budget that fits a 2-core machine, not a plateau (docs/results.md, "Not yet
# at the plateau"). Each value replaces the paper's (RECIPES above, unchanged) for that recipe;
# everything else stays the paper's. Chosen once per recipe on a validation split of
# MINIATURE_VALIDATION training examples with `python -m experiments.ladder calibrate` on the
# recipe's first and last steps (never per step, never on the test split): the commands and every
# setting's score are in docs/results.md, "Calibrating the CPU miniature" (stated there only).
MINIATURE_VALIDATION = 5000
MINIATURE = {
    'original': dict(
        # As long as the enhanced steps (the budget, not a plateau).
        epochs=4,
        # The learning rate is quoted at the run's own batch: no linear scaling from 256.
        lr_batch=128,
        # Calibrated (0.025 to 0.2 tried).
        base_lr=0.05,
    ),
    'enhanced': dict(
        epochs=4,
        # The paper's 4e-3 is quoted at batch 4096 and linearly scaled (to 1.25e-4 at 128); too
        # small for a few thousand updates.
        lr_batch=128,
        # Calibrated (1e-3 to 8e-3 tried).
        base_lr=4e-3,
        # Mixup / CutMix off (calibrated): mixing slows convergence most at short budgets. Label
        # smoothing and stochastic depth stay the paper's.
        mix_prob=0.0,
        # RandAugment and Random Erasing off (calibrated): at 32px over a few epochs they cost
        # more than they regularize.
        randaugment_n=0,
        random_erasing=0.0,
        # LayerScale's initial gain (steps that have it; calibrated): the paper's 1e-6 grows too
        # slowly in a few thousand updates ("fewer norms" collapsed).
        layer_scale_init=0.1,
    ),
}

# The transformer references' own learning rate under the miniature: the ConvNets' 4e-3 made ViT-S
# diverge. Chosen once for each with `python -m experiments.ladder calibrate --references NAME` on
# the same validation split (its grid and every setting's score: docs/results.md, "The transformer
# references' learning rate"); everything else is the enhanced recipe's miniature above.
MINIATURE_REFERENCES = {
    'swin_t': dict(base_lr=5e-4),
    'vit_s': dict(base_lr=2.5e-4),
}

LARGE_DATA = ('imagenet2012', 'imagenette')

# The transformer references below 224 px (the miniature's 28/32 px): smaller patches and windows,
# so that the token grids stay grids (at 32 px Swin's stage maps are 16, 8, 4, 2 and ViT sees 8x8
# patches, as the ConvNets' 8x8 map after their stride-4 stem). At 224 px and above: the paper's
# (Swin patch 4 window 7, ViT patch 16).
SMALL_IMAGE_PATCHES = {'swin_t': dict(patch_size=2, window_size=4), 'vit_s': dict(patch_size=4)}


def _parse(arg: str | None) -> tuple[str, dict[str, str]]:
  parts = [p.strip() for p in (arg or 'convnext_t').split(',') if p.strip()]
  step, options = parts[0], {}
  if '=' in step:
    raise ConfigError(f'the config argument must start with a step name, got {step!r}')
  for part in parts[1:]:
    key, _, value = part.partition('=')
    options[key] = value if _ else 'true'
  known = {'ladder', 'data', 'seed', 'scale', 'length', 'batch', 'image_size', 'smoke',
           'miniature', 'longer', 'layer_scale_init', 'epochs'}
  unknown = sorted(set(options) - known)
  if unknown:
    raise ConfigError(f'unknown config option(s) {unknown}; options: {sorted(known)}')
  return step, options


def _number(options, key, kind, default):
  if key not in options:
    return default
  try:
    return kind(options[key])
  except ValueError:
    raise ConfigError(f'{key}={options[key]!r} is not a valid {kind.__name__}') from None


def scaled_depths(depths, multiplier: float) -> tuple[int, ...]:
  return tuple(max(1, round(d * multiplier)) for d in depths)


def reference_model(name: str, depth_multiplier: float, width_divisor: int,
                    image_size: int) -> dict:
  """The model fields of a transformer reference (`presets.REFERENCES`) at a scale and image size,
  by the ConvNets' scale rule: depths multiplied (Swin's (2, 2, 6, 2) becomes (1, 1, 2, 1) at a
  third, ViT's 12 blocks 4), the embedding width divided and the heads with it (at least one head:
  Swin-T at scale cpu has widths 24, 48, 96, 192 and 1, 1, 3, 6 heads); below 224 px the patch
  and window of `SMALL_IMAGE_PATCHES`. The input size (`img_size`) is the data's
  (`data.image_size`), filled in by the trainer; classes and channels as for the ConvNets. `arch`
  names the reference."""
  cfg = presets.REFERENCES[name]()
  values = cfg.to_dict()
  del values['img_size']
  values['arch'] = name
  values['embed_dim'] = max(1, cfg.embed_dim // width_divisor)
  if name == 'swin_t':
    values['depths'] = scaled_depths(cfg.depths, depth_multiplier)
    values['num_heads'] = tuple(max(1, h // width_divisor) for h in cfg.num_heads)
  else:
    values['depth'] = max(1, round(cfg.depth * depth_multiplier))
    values['num_heads'] = max(1, cfg.num_heads // width_divisor)
  if image_size < 224:
    values.update(SMALL_IMAGE_PATCHES[name])
  return values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  step, options = _parse(arg)
  ladder = ladders.get_ladder(options.get('ladder', 'resnet50'))
  reference = step in presets.REFERENCES
  if not reference:
    ladder.step(step)  # unknown step: ConfigError naming it
  smoke = options.get('smoke', 'false').lower() in ('1', 'true', 'yes')
  miniature = options.get('miniature', 'false').lower() in ('1', 'true', 'yes')
  if miniature and 'length' in options:
    raise ConfigError('miniature sets the training length itself: drop length= (or use epochs=)')
  if 'length' in options and 'epochs' in options:
    raise ConfigError('length= and epochs= both set the training length: give one')
  data = options.get('data', 'fashion_mnist')
  if data.startswith('folder:'):   # the step table records where the images were
    data = 'folder:' + os.path.abspath(os.path.expanduser(data[len('folder:'):]))
  large = data in LARGE_DATA
  scale = options.get('scale', 'tiny' if smoke else ('full' if large else 'cpu'))
  if scale not in SCALES:
    raise ConfigError(f'scale={scale!r}: must be one of {sorted(SCALES)}')
  # The references train under the enhanced recipe, as the ladder's last steps.
  recipe_name = 'enhanced' if reference else ladder.recipe(step)
  recipe = RECIPES[recipe_name]
  if miniature:
    recipe = {**recipe, **MINIATURE[recipe_name], **MINIATURE_REFERENCES.get(step, {})}
  if 'layer_scale_init' in options:
    recipe = {**recipe, 'layer_scale_init': _number(options, 'layer_scale_init', float, 0.0)}
    if recipe['layer_scale_init'] <= 0:
      raise ConfigError(f'layer_scale_init={recipe["layer_scale_init"]}: must be positive')

  c = ml_collections.ConfigDict()
  c.ladder = ladder.name
  c.step = step
  c.step_index = -1 if reference else ladder.index(step)   # -1: a reference, not a step
  c.seed = _number(options, 'seed', int, 0)
  c.smoke = smoke
  c.miniature = miniature

  c.data = ml_collections.ConfigDict()
  c.data.name = data
  # tfds sets: '' = $TFDS_DATA_DIR or ~/tensorflow_datasets; a local path or gs://.
  c.data.dir = ''
  c.data.image_size = _number(options, 'image_size', int, 224 if large and not smoke else 32)
  # Model input channels: 0 = the data's own (folder:PATH: 1 if every image is grayscale, else 3).
  c.data.channels = 3 if large or data.startswith('cifar') else 0 if data.startswith('folder:') \
      else 1
  # Training examples held out as a validation split (0: none).
  c.data.validation = MINIATURE_VALIDATION if miniature else 0
  c.data.train_examples = 512 if smoke else 0   # 0 = the whole train split
  c.data.test_examples = 256 if smoke else 0    # 0 = the whole test split
  c.data.threads = -1                  # input-pipeline workers per host (-1: one per core, <= 8)
  # How they build batches: 'threads', 'processes' (experiments/data/workers.py) or 'auto'
  # (processes when JAX runs on an accelerator). The batches are the same either way.
  c.data.worker_kind = 'auto'
  # Where the training data lives: 'host' (the input pipeline), 'device' (an in-memory split
  # uploaded once and augmented on the accelerator) or 'auto' (device on an accelerator where the
  # split fits, host on the CPU). Not part of the run's identity (docs/training.md).
  c.data.placement = 'auto'

  c.scale = ml_collections.ConfigDict()
  c.scale.name = scale
  c.scale.depth_multiplier, c.scale.width_divisor = SCALES[scale]

  # The network: the step's flags, scaled. Any NetConfig flag can be overridden here.
  if reference:
    c.model = ml_collections.ConfigDict(reference_model(
        step, c.scale.depth_multiplier, c.scale.width_divisor, c.data.image_size))
  else:
    net = ladder.net_config(step)
    c.model = ml_collections.ConfigDict(net.to_dict())
    c.model.depths = scaled_depths(net.depths, c.scale.depth_multiplier)
    c.model.width = max(1, net.width // c.scale.width_divisor)
  c.model.drop_path_rate = recipe['drop_path_rate']
  if 'layer_scale_init' in recipe and c.model.get('layer_scale_init', 0) > 0:   # where it is
    c.model.layer_scale_init = recipe['layer_scale_init']
  c.model.in_channels = c.data.channels or -1   # -1: taken from the data set
  c.model.num_classes = -1             # -1: taken from the data set

  c.recipe = recipe_name
  c.optimizer = ml_collections.ConfigDict({
      k: recipe[k] for k in ('optimizer', 'base_lr', 'lr_batch', 'momentum', 'weight_decay',
                             'decay_all', 'schedule', 'warmup_epochs', 'step_epochs', 'min_lr')})
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.grad_clip = 0.0          # 0 = none (Table 5)

  c.augment = ml_collections.ConfigDict({
      k: recipe[k] for k in ('label_smoothing', 'mixup_alpha', 'cutmix_alpha', 'mix_prob',
                             'randaugment_n', 'randaugment_m', 'randaugment_mstd',
                             'random_erasing')})
  c.augment.switch_prob = 0.5          # CutMix instead of Mixup with this probability
  c.augment.hflip = True
  c.augment.crop = 'random_resized' if large else 'pad'   # 'random_resized' | 'pad' | 'none'
  c.augment.crop_pad = 4               # pixels, for crop='pad' (small images)
  c.augment.randaugment_prob = 0.5     # probability that each drawn op is applied (timm's)

  c.ema_decay = 0.0                    # 0 = off (the ladder's protocol); 0.9999 in Table 5

  # Duration: the paper's epochs times `length`. All schedules are defined in epochs and turned
  # into steps in one place (experiments.training.recipe.Schedule).
  default_length = 1.0 if large else 0.01
  c.length = _number(options, 'length', float, default_length)
  c.epochs = recipe['epochs'] * c.length
  if miniature:
    c.length = recipe['epochs'] / RECIPES[recipe_name]['epochs']
    c.epochs = float(recipe['epochs'])
  if 'epochs' in options:
    c.epochs = _number(options, 'epochs', float, 0.0)
    if c.epochs <= 0:
      raise ConfigError(f'epochs={options["epochs"]}: must be positive')
    c.length = c.epochs / RECIPES[recipe_name]['epochs']
  c.batch_size = _number(options, 'batch', int, 4096 if large else 128)
  # Gradient accumulation: each global batch as this many microbatches, one after another (the
  # paper's batch 4096 on fewer accelerators); one optimizer update per batch either way.
  c.accumulate_steps = 1
  # Updates per dispatch of the compiled program (data.placement device only; bitwise the same
  # updates as one per dispatch).
  c.steps_per_dispatch = 1
  if smoke:
    c.batch_size = _number(options, 'batch', int, 32)
    if 'epochs' not in options:
      c.epochs = 0.5 if recipe_name == 'original' else 0.5 * 300 / 90
  longer = _number(options, 'longer', float, 1.0)
  if longer <= 0:
    raise ConfigError(f'longer={longer}: must be positive')
  c.length *= longer
  c.epochs *= longer

  c.log_every_steps = 10 if smoke else 50
  c.checkpoint_every_steps = 4 if smoke else 200
  c.keep_checkpoints = 2
  c.step_table = 'runs/steps.csv'      # relative to the working directory of the command
  # A workdir belongs to the config it was started with: a later start under a config that
  # computes something else is refused, unless this is true (the change is recorded in the row's
  # config_changes). Not part of the run's identity (config hash).
  c.resume_any = False
  return c
