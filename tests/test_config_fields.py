"""Every config field that changes a run changes what it feeds, and the right way round.

A field is followed to the cheapest fingerprint of what it feeds:
* the learning-rate schedule: `recipe.Schedule` and `recipe.learning_rate` as the trainer's set-up
  builds them (pure Python);
* the first training batch: `pipeline.train_batches` called as the trainer's loop calls it (with
  `runconfig.augment_config` and `runconfig.data_channels`), made model input by
  `pipeline.model_input`, on Fashion-MNIST;
* the optimizer: `recipe.optimizer` on a toy problem, against the update rules written out here;
* the network: `runconfig.net_config` and `build` under `nnx.eval_shape` (its graph and parameter
  shapes; nothing computed);
* one compiled train step of a one-stage, two-block ConvNeXt (`runconfig.net_config`,
  `state.create_state`, `state.make_train_step`, as tests/test_accumulate.py builds it), each
  compiled variant cached and shared by the tests that need it.
The sensitivity tests (parametrized over a field and another value) assert the fingerprint
changes; the direction tests check what the field must do, where the wrong way round (a flag
inverted, a probability p taken as 1 - p, two fields swapped) would still change it. Whether the
trainer's loop itself uses these fields (epochs, batch size, training examples, EMA at
evaluation) is tests/test_evaluation.py's; docs/testing.md, "Config fields and their tests", maps
every field to the tests that fail when it is ignored or inverted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.ladder import get_config
from experiments.data import augment as A
from experiments.data import datasets, pipeline
from experiments.training import loop, recipe, runconfig
from experiments.training import state as train_state
from modernize.config import NetConfig
from modernize.network import build


def configured(arg: str, **fields):
  """get_config(arg) with dotted fields set: configured('convnext_t', **{'optimizer.b1': 0.5})."""
  config = get_config(arg)
  with config.unlocked():
    for path, value in fields.items():
      *parents, name = path.split('.')
      node = config
      for parent in parents:
        node = node[parent]
      node[name] = value
  return config


def _key(fields: dict):
  """Hashable: a cache key of dotted fields."""
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in fields.items()))


def _changed(a, b, rtol=1e-6) -> bool:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return True
  return float(np.max(np.abs(a - b), initial=0.0)) > rtol * (float(np.max(np.abs(b))) + 1e-30)


# --- wiring: the config's sections reach what they configure --------------------------------------

AUGMENT_CASES = [
    dict(),
    {'augment.crop': 'random_resized', 'augment.hflip': False},
    {'augment.crop': 'none', 'augment.randaugment_n': 3, 'augment.randaugment_m': 7,
     'augment.randaugment_mstd': 1.5, 'augment.randaugment_prob': 0.2,
     'augment.random_erasing': 0.4},
    {'augment.crop': 'pad', 'augment.crop_pad': 2},
]


@pytest.mark.parametrize('fields', AUGMENT_CASES)
def test_augment_config_carries_every_augmentation_field(fields):
  """runconfig.augment_config: each augment.* field of the host pipeline in its own place (no
  field dropped, swapped or inverted)."""
  config = configured('convnext_t,smoke', **fields)
  a, got = config.augment, runconfig.augment_config(config)
  assert got.random_resized_crop == (a.crop == 'random_resized')
  assert got.random_crop_pad == (a.crop_pad if a.crop == 'pad' else 0)
  assert got.hflip == a.hflip
  assert (got.randaugment_n, got.randaugment_m, got.randaugment_mstd, got.randaugment_prob) == \
      (a.randaugment_n, a.randaugment_m, a.randaugment_mstd, a.randaugment_prob)
  assert got.random_erasing_prob == a.random_erasing


NET_CASES = [
    ('convnext_t,smoke', {}),
    ('resnet50,smoke', {}),
    ('resnet50,smoke', {'model.groups': 2, 'model.expansion': 2, 'model.kernel_size': 5,
                        'model.init': 'trunc_normal', 'model.dtype': 'bfloat16',
                        'model.drop_path_rate': 0.2}),
    ('convnext_t,smoke', {'model.use_grn': True, 'model.layer_scale_init': 0.0,
                          'model.depthwise_impl': 'xla', 'model.init': 'kaiming'}),
    ('convnext_t,smoke', {'model.mhsa_last_stage': True}),
]


def test_net_config_carries_every_model_field():
  """runconfig.net_config: every model.* field reaches the network's config as it is (classes and
  channels of -1 from the data); each field is checked somewhere at a value other than
  NetConfig's default, so a field dropped on the way (the default taken instead) fails."""
  default = NetConfig()
  off_default = set()
  for arg, fields in NET_CASES:
    config = configured(arg, **fields)
    cfg = runconfig.net_config(config, num_classes=7, in_channels=1)
    for name, value in config.model.items():
      want = {'num_classes': 7, 'in_channels': 1}.get(name, value) if value == -1 else value
      got = getattr(cfg, name)
      assert (tuple(got) if name == 'depths' else got) == \
          (tuple(want) if name == 'depths' else want), (arg, fields, name)
      if got != getattr(default, name):
        off_default.add(name)
  assert off_default == {f.name for f in dataclasses.fields(NetConfig)}, \
      {f.name for f in dataclasses.fields(NetConfig)} - off_default


ARCHITECTURE_BASE = {'model.depths': (1, 1, 1, 1)}


@functools.lru_cache(maxsize=None)
def _network_fingerprint(arg: str, key):
  """The network the trainer builds for a config (`runconfig.net_config`, `build`), without
  computing it: its graph (module types and their static attributes: activations, kernel sizes,
  drop-path rates, dtypes) and every parameter's shape and dtype."""
  config = configured(arg, **dict(key))
  cfg = runconfig.net_config(config, num_classes=10, in_channels=1)
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), image_size=config.data.image_size))
  graphdef, state = nnx.split(model)
  text = repr(graphdef) + repr(jax.tree.map(lambda x: (x.shape, str(x.dtype)), state))
  return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize('arg, field, value', [
    ('convnext_t,smoke', 'model.depths', (1, 1, 2, 1)),
    ('convnext_t,smoke', 'model.width', 16),
    ('convnext_t,smoke', 'model.stem', 'resnet'),
    ('resnet50,smoke', 'model.groups', 2),
    ('resnet50,smoke', 'model.depthwise', True),
    ('convnext_t,smoke', 'model.expansion', 2),
    ('resnet50,smoke', 'model.inverted_bottleneck', True),
    ('convnext_t,smoke', 'model.depthwise_position', 'middle'),
    ('convnext_t,smoke', 'model.kernel_size', 5),
    ('convnext_t,smoke', 'model.activation', 'relu'),
    ('convnext_t,smoke', 'model.activations', 'all'),
    ('convnext_t,smoke', 'model.norms', 'all'),
    ('convnext_t,smoke', 'model.norm', 'batch'),
    ('convnext_t,smoke', 'model.downsampling', 'in_block'),
    ('convnext_t,smoke', 'model.layer_scale_init', 0.0),
    ('convnext_t,smoke', 'model.use_grn', True),
    ('convnext_t,smoke', 'model.mhsa_last_stage', True),
    ('convnext_t,smoke', 'model.drop_path_rate', 0.3),
    ('convnext_t,smoke', 'model.dtype', 'bfloat16'),
    ('convnext_t,smoke', 'model.depthwise_impl', 'xla'),
    ('convnext_t,smoke', 'model.num_classes', 7),
    ('convnext_t,smoke', 'model.in_channels', 3),
])
def test_network_depends_on(arg, field, value):
  """Every model.* flag changes the network built (which change it makes, step by step, is
  tests/test_network.py's; the initialisation scheme, model.init, is checked below)."""
  base = _network_fingerprint(arg, _key(ARCHITECTURE_BASE))
  assert _network_fingerprint(arg, _key({**ARCHITECTURE_BASE, field: value})) != base



@pytest.mark.parametrize('arg, field, value', [
    ('swin_t,smoke', 'model.embed_dim', 24),
    ('swin_t,smoke', 'model.num_heads', (1, 1, 3, 3)),
    ('swin_t,smoke', 'model.mlp_ratio', 2.0),
    ('swin_t,smoke', 'model.patch_size', 4),
    ('swin_t,smoke', 'model.window_size', 2),
    ('swin_t,smoke', 'model.depths', (1, 1, 1, 1)),
    ('vit_s,smoke', 'model.depth', 2),
    ('vit_s,smoke', 'model.embed_dim', 24),
    ('vit_s,smoke', 'model.num_heads', 2),
    ('vit_s,smoke', 'model.mlp_ratio', 2.0),
    ('vit_s,smoke', 'model.patch_size', 8),
    ('vit_s,smoke', 'model.layer_scale_init', 1e-5),
])
def test_reference_network_depends_on(arg, field, value):
  """The transformer references' model.* flags change the network built as well (what each
  builds is tests/test_transformers.py's, against timm)."""
  assert _network_fingerprint(arg, _key({field: value})) != _network_fingerprint(arg, _key({}))

# --- the learning-rate schedule -------------------------------------------------------------------

NUM_TRAIN = 640   # with batch 128: 5 updates per epoch
SCHEDULE_BASE = {'convnext_t': 'convnext_t,length=0.1',   # 30 epochs, warm-up 2 (10 updates)
                 'resnet50': 'resnet50,length=0.1'}       # 9 epochs, decays at 3 and 6


def schedule_of(config, num_train: int = NUM_TRAIN) -> recipe.Schedule:
  """As the trainer's set-up (experiments/training/loop.py, `_set_up`) builds it."""
  return recipe.Schedule(num_train / config.batch_size, config.epochs, recipe.paper_epochs(config))


def lrs(config, horizon: int = 400) -> np.ndarray:
  lr = recipe.learning_rate(config, schedule_of(config))
  return np.asarray(lr(np.arange(horizon)), np.float64)


@pytest.mark.parametrize('base, field, value', [
    ('convnext_t', 'optimizer.base_lr', 2e-3),
    ('convnext_t', 'optimizer.lr_batch', 1024),
    ('convnext_t', 'batch_size', 256),
    ('convnext_t', 'optimizer.schedule', 'step'),
    ('convnext_t', 'optimizer.warmup_epochs', 40),
    ('convnext_t', 'optimizer.min_lr', 1e-4),
    ('convnext_t', 'epochs', 20.0),
    ('convnext_t', 'recipe', 'original'),
    ('resnet50', 'optimizer.step_epochs', (20, 60)),
    ('resnet50', 'optimizer.schedule', 'cosine'),
    ('resnet50', 'epochs', 18.0),
    ('resnet50', 'batch_size', 64),
])
def test_schedule_depends_on(base, field, value):
  before = lrs(configured(SCHEDULE_BASE[base]))
  assert _changed(lrs(configured(SCHEDULE_BASE[base], **{field: value})), before)


@pytest.mark.parametrize('base_lr, lr_batch, batch, warmup, min_lr, epochs, name', [
    (4e-3, 4096, 128, 20, 1e-6, 30.0, 'enhanced'),
    (1e-3, 256, 512, 40, 1e-5, 60.0, 'enhanced'),
    (4e-3, 4096, 128, 20, 1e-6, 30.0, 'original'),
])
def test_cosine_schedule_follows_its_fields(base_lr, lr_batch, batch, warmup, min_lr, epochs,
                                            name):
  """The peak is base_lr * batch / lr_batch, reached after the warm-up's share of the paper's
  epochs (of 300, or 90 for the original recipe), and the rate ends at min_lr after `epochs`."""
  config = configured(SCHEDULE_BASE['convnext_t'], **{
      'optimizer.base_lr': base_lr, 'optimizer.lr_batch': lr_batch, 'batch_size': batch,
      'optimizer.warmup_epochs': warmup, 'optimizer.min_lr': min_lr, 'epochs': epochs,
      'recipe': name})
  per_epoch = NUM_TRAIN / batch
  total = round(epochs * per_epoch)
  warmup_steps = round(warmup * epochs / (300 if name == 'enhanced' else 90) * per_epoch)
  got = lrs(config, total + 1)
  peak = base_lr * batch / lr_batch
  assert got[0] == 0.0 and int(np.argmax(got)) == warmup_steps
  np.testing.assert_allclose(got.max(), peak, rtol=1e-5)
  np.testing.assert_allclose(got[total], min_lr, rtol=1e-3)
  assert np.all(np.diff(got[:warmup_steps + 1]) > 0) and np.all(np.diff(got[warmup_steps:]) < 0)


@pytest.mark.parametrize('step_epochs, batch, epochs', [((30, 60), 128, 9.0), ((20, 80), 64, 18.0)])
def test_step_schedule_follows_its_fields(step_epochs, batch, epochs):
  """The original recipe: the peak until the first of `step_epochs` (of the paper's 90, scaled to
  `epochs`), a tenth of it from each."""
  config = configured(SCHEDULE_BASE['resnet50'], **{
      'optimizer.step_epochs': step_epochs, 'batch_size': batch, 'epochs': epochs})
  per_epoch = NUM_TRAIN / batch
  peak = config.optimizer.base_lr * batch / config.optimizer.lr_batch
  got = lrs(config, round(epochs * per_epoch))
  boundaries = [round(e * epochs / 90 * per_epoch) for e in step_epochs]
  expected = peak * 0.1 ** np.searchsorted(boundaries, np.arange(len(got)), side='right')
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- the optimizer, on a toy problem --------------------------------------------------------------

TOY_LR = 0.1


def toy_problem():
  """A matrix (decayed by the enhanced recipe's mask) and a vector (not), and a loss
  sum(0.5 a p^2 + b p) whose gradient a p + b depends on the parameters."""
  rng = np.random.RandomState(0)
  params = {'w': rng.randn(3, 4), 'v': rng.randn(4)}
  coef = {k: (rng.uniform(0.5, 2.0, p.shape), rng.randn(*p.shape)) for k, p in params.items()}
  return params, coef


def run_optimizer(config, steps: int = 3, scale: float = 1.0):
  """The trainer's optimizer (float32, a constant learning rate) for `steps` updates; the
  gradients are `scale` times the toy loss's. Returns the parameters after each update."""
  params, coef = toy_problem()
  tx = recipe.optimizer(config, optax.constant_schedule(TOY_LR))
  params = {k: jnp.asarray(p, jnp.float32) for k, p in params.items()}
  opt = tx.init(params)
  history = []
  for _ in range(steps):
    grads = {k: scale * (coef[k][0] * p + coef[k][1]) for k, p in params.items()}
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    history.append({k: np.asarray(p, np.float64) for k, p in params.items()})
  return history


def flat_history(history) -> np.ndarray:
  return np.concatenate([p.ravel() for step in history for _, p in sorted(step.items())])


@pytest.mark.parametrize('base, field, value', [
    ('convnext_t', 'optimizer.optimizer', 'sgd'),
    ('convnext_t', 'optimizer.b1', 0.5),
    ('convnext_t', 'optimizer.b2', 0.9),
    ('convnext_t', 'optimizer.eps', 1e-2),
    ('convnext_t', 'optimizer.weight_decay', 0.5),
    ('convnext_t', 'optimizer.decay_all', True),
    ('convnext_t', 'optimizer.grad_clip', 0.5),
    ('resnet50', 'optimizer.optimizer', 'adamw'),
    ('resnet50', 'optimizer.momentum', 0.5),
    ('resnet50', 'optimizer.weight_decay', 0.1),
    ('resnet50', 'optimizer.decay_all', False),
    ('resnet50', 'optimizer.grad_clip', 0.5),
])
def test_optimizer_depends_on(base, field, value):
  # AdamW with gradients of ~1e-2, so that its eps (1e-8 vs 1e-2) shows in a few updates.
  scale = 1e-2 if field == 'optimizer.eps' else 1.0
  before = flat_history(run_optimizer(configured(base), scale=scale))
  after = flat_history(run_optimizer(configured(base, **{field: value}), scale=scale))
  assert _changed(after, before, rtol=1e-5)


def _masked(decay_all: bool):
  return {'w': 1.0, 'v': 1.0 if decay_all else 0.0}


@pytest.mark.parametrize('decay_all', [False, True])
def test_adamw_follows_its_fields(decay_all):
  """AdamW written out in float64 (bias-corrected moments, eps outside the square root, decay
  decoupled and scaled by the learning rate, vectors decayed only with decay_all) at b1, b2, eps
  and weight decay that are not the defaults."""
  b1, b2, eps, wd, scale = 0.5, 0.8, 1e-2, 0.3, 1e-2
  config = configured('convnext_t', **{'optimizer.b1': b1, 'optimizer.b2': b2,
                                       'optimizer.eps': eps, 'optimizer.weight_decay': wd,
                                       'optimizer.decay_all': decay_all})
  got = run_optimizer(config, scale=scale)
  params, coef = toy_problem()
  m = {k: np.zeros_like(p) for k, p in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  decay = _masked(decay_all)
  for t in range(1, 4):
    for k, p in params.items():
      g = scale * (coef[k][0] * p + coef[k][1])
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      params[k] = p - TOY_LR * (step + decay[k] * wd * p)
    for k in params:
      np.testing.assert_allclose(got[t - 1][k], params[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f'update {t}: {k}')


@pytest.mark.parametrize('decay_all', [True, False])
def test_sgd_follows_its_fields(decay_all):
  """SGD as PyTorch's: weight decay added to the gradient (vectors only with decay_all), then
  momentum (buffer = momentum * buffer + gradient), at a momentum that is not the default."""
  momentum, wd = 0.5, 0.2
  config = configured('resnet50', **{'optimizer.momentum': momentum,
                                     'optimizer.weight_decay': wd,
                                     'optimizer.decay_all': decay_all})
  got = run_optimizer(config)
  params, coef = toy_problem()
  buf = {k: np.zeros_like(p) for k, p in params.items()}
  decay = _masked(decay_all)
  for t in range(3):
    for k, p in params.items():
      g = coef[k][0] * p + coef[k][1] + decay[k] * wd * p
      buf[k] = momentum * buf[k] + g
      params[k] = p - TOY_LR * buf[k]
    for k in params:
      np.testing.assert_allclose(got[t][k], params[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f'update {t + 1}: {k}')


@pytest.mark.parametrize('clip', [0.5, 2.0, 100.0])
def test_grad_clip_bounds_the_gradient_norm(clip):
  """grad_clip: the update is lr times the gradient scaled to global norm min(norm, clip), as
  optax.clip_by_global_norm defines it, computed here (SGD without momentum or decay, so that
  the update is the clipped gradient itself)."""
  config = configured('resnet50', **{'optimizer.momentum': 0.0, 'optimizer.weight_decay': 0.0,
                                     'optimizer.grad_clip': clip})
  got = run_optimizer(config, steps=1)[0]
  params, coef = toy_problem()
  grads = {k: coef[k][0] * p + coef[k][1] for k, p in params.items()}
  norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
  assert 0.5 < norm < 100.0   # clipped at 0.5 and 2, not at 100
  used = {k: (params[k] - got[k]) / TOY_LR for k in params}
  used_norm = math.sqrt(sum(float((g * g).sum()) for g in used.values()))
  assert used_norm <= clip * (1 + 1e-5)
  for k in params:
    np.testing.assert_allclose(used[k], grads[k] * min(1.0, clip / norm), rtol=1e-4, atol=1e-5)


# --- the first training batch ---------------------------------------------------------------------

BATCH_BASE = 'convnext_t,smoke'   # pad-crop 4, flip, RandAugment 2 x m9, erasing 0.25, batch 32
PLAIN = {'augment.crop': 'none', 'augment.hflip': False, 'augment.randaugment_n': 0,
         'augment.random_erasing': 0.0}


def first_batch(config):
  """Training batch 0 of `config`, from the trainer's loop's own call of the input pipeline
  (`loop.train_batches`), and its model input (`pipeline.model_input`, as in the train step)."""
  info = datasets.info(config.data.name, None)
  channels = runconfig.data_channels(config, info)
  batch = next(loop.train_batches(config, channels))
  spec = pipeline.input_spec(config.data.name, None, channels)
  return batch, np.asarray(pipeline.model_input(batch, spec))


def batch_config(**fields):
  # One batch, built in this thread (data.threads 0).
  return configured(BATCH_BASE, **{'data.train_examples': 64, 'data.threads': 0, **fields})


@pytest.mark.parametrize('field, value', [
    ('seed', 1),
    ('batch_size', 16),
    ('data.image_size', 28),
    ('data.channels', 3),
    ('data.validation', 5000),
    ('data.train_examples', 128),
    ('augment.crop', 'random_resized'),
    ('augment.crop', 'none'),
    ('augment.crop_pad', 2),
    ('augment.hflip', False),
    ('augment.randaugment_n', 0),
    ('augment.randaugment_n', 1),
    ('augment.randaugment_m', 5),
    ('augment.randaugment_mstd', 0.0),
    ('augment.randaugment_prob', 1.0),
    ('augment.random_erasing', 0.0),
    ('augment.random_erasing', 1.0),
])
def test_first_batch_depends_on(fashion, field, value):
  base_batch, base_input = first_batch(batch_config())
  batch, model_input = first_batch(batch_config(**{field: value}))
  assert _changed(model_input, base_input) or not np.array_equal(batch['label'],
                                                                 base_batch['label'])


def stored_examples(validation: int, train_examples: int):
  """(images, labels) of the training examples a run may use: the train split without the
  `validation` held out, its first `train_examples`."""
  images, labels = datasets.load_arrays('fashion_mnist', 'train')
  rows = datasets.split_indices(len(labels), validation)[0][:train_examples]
  return images[rows], labels[rows]


@pytest.mark.parametrize('fields', [
    {},
    {'seed': 3},
    {'batch_size': 16},
    {'data.train_examples': 100},
    {'data.validation': 5000},
    {'data.image_size': 28},
])
def test_plain_batch_is_the_stored_examples(fashion, fields):
  """Without augmentation (crop 'none', no flip, RandAugment or erasing) batch 0 is the stored
  examples at the positions the seed's permutation of the run's examples gives, only resized:
  seed, batch size, training examples, validation hold-out and image size each in its place."""
  config = batch_config(**PLAIN, **fields)
  batch, model_input = first_batch(config)
  images, labels = stored_examples(config.data.validation, config.data.train_examples)
  index, _ = pipeline.train_indices(len(labels), seed=config.seed, step=0,
                                    batch_size=config.batch_size)
  size = config.data.image_size
  np.testing.assert_array_equal(batch['image'], A.resize(images[index], size))
  np.testing.assert_array_equal(batch['label'], labels[index])
  assert 'erase_box' not in batch and model_input.shape == (config.batch_size, size, size, 1)
  info = datasets.info('fashion_mnist', None)
  np.testing.assert_allclose(model_input, (batch['image'] / 255.0 - info.mean[0]) / info.std[0],
                             rtol=1e-5, atol=1e-5)


def test_hflip_flips_exactly_where_its_draw_says(fashion):
  config = batch_config(**{**PLAIN, 'augment.hflip': True})
  batch, _ = first_batch(config)
  plain, _ = first_batch(batch_config(**PLAIN))
  flip = A.flip_mask(A.example_keys(config.seed, np.arange(config.batch_size)))
  assert flip.any() and (~flip).any()
  np.testing.assert_array_equal(batch['image'][flip], plain['image'][flip][:, :, ::-1])
  np.testing.assert_array_equal(batch['image'][~flip], plain['image'][~flip])


@pytest.mark.parametrize('pad', [2, 4])
def test_pad_crop_shifts_by_at_most_crop_pad(fashion, pad):
  """crop 'pad': each image is the resized example shifted by (dy, dx) within +-crop_pad, the
  uncovered border zero; shifts up to crop_pad occur."""
  fields = {**PLAIN, 'augment.crop': 'pad', 'augment.crop_pad': pad, 'batch_size': 128,
            'data.train_examples': 128}
  batch, _ = first_batch(batch_config(**fields))
  plain, _ = first_batch(batch_config(**{**fields, 'augment.crop': 'none'}))
  reach = 6   # look for shifts beyond crop_pad too
  padded = np.pad(plain['image'], ((0, 0), (reach, reach), (reach, reach), (0, 0)))
  size = plain['image'].shape[1]
  largest = 0
  for i, image in enumerate(batch['image']):
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)
              if np.array_equal(image, padded[i, reach + dy:reach + dy + size,
                                              reach + dx:reach + dx + size])]
    assert shifts, f'image {i} is no shift of its example'
    assert min(max(abs(dy), abs(dx)) for dy, dx in shifts) <= pad, (i, shifts)
    largest = max(largest, min(max(abs(dy), abs(dx)) for dy, dx in shifts))
  assert largest == pad


def test_randaugment_prob_is_the_rate_of_applied_ops(fashion):
  """randaugment_prob 0: RandAugment changes nothing; the share of images it changes grows with
  the probability (0.5 < 1)."""
  fields = {**PLAIN, 'augment.randaugment_n': 2, 'batch_size': 128, 'data.train_examples': 128}
  plain, _ = first_batch(batch_config(**{**fields, 'augment.randaugment_n': 0}))

  def changed(prob):
    batch, _ = first_batch(batch_config(**{**fields, 'augment.randaugment_prob': prob}))
    return np.any(batch['image'] != plain['image'], axis=(1, 2, 3)).mean()

  assert changed(0.0) == 0.0
  assert 0.0 < changed(0.5) < changed(1.0)


def test_random_erasing_is_its_probability(fashion):
  """random_erasing 0: no image erased; 1: every image erased, by N(0, 1) noise inside its box
  and nowhere else."""
  _, plain_input = first_batch(batch_config(**PLAIN))
  batch, model_input = first_batch(batch_config(**{**PLAIN, 'augment.random_erasing': 1.0}))
  top, left, h, w = batch['erase_box'].T
  assert (h > 0).all() and (w > 0).all()
  rows, cols = np.arange(model_input.shape[1]), np.arange(model_input.shape[2])
  inside = (((rows[None] >= top[:, None]) & (rows[None] < (top + h)[:, None]))[:, :, None]
            & ((cols[None] >= left[:, None]) & (cols[None] < (left + w)[:, None]))[:, None, :])
  np.testing.assert_array_equal(model_input[~inside], plain_input[~inside])
  assert np.mean(model_input[inside] != plain_input[inside]) > 0.99
  assert abs(float(model_input[inside].std()) - 1.0) < 0.1
  none, none_input = first_batch(batch_config(**{**PLAIN, 'augment.random_erasing': 0.0}))
  assert 'erase_box' not in none
  np.testing.assert_array_equal(none_input, plain_input)


def test_channels_three_replicates_the_grayscale_input(fashion):
  _, one = first_batch(batch_config(**PLAIN))
  _, three = first_batch(batch_config(**{**PLAIN, 'data.channels': 3}))
  _, own = first_batch(batch_config(**{**PLAIN, 'data.channels': 0}))   # 0: the data's own (1)
  assert one.shape[-1] == own.shape[-1] == 1 and three.shape[-1] == 3
  np.testing.assert_array_equal(own, one)
  for c in range(3):
    np.testing.assert_array_equal(three[..., c:c + 1], one)


# --- one compiled train step ----------------------------------------------------------------------

STEP_LR = 0.5
NUM_CLASSES = 10
_rng = np.random.RandomState(0)
STEP_BATCH = {'image': jnp.asarray(_rng.randn(8, 32, 32, 1), jnp.float32),
              'label': jnp.arange(8, dtype=jnp.int32)}   # every label differs from its mirror's


def step_config(**fields):
  """A one-stage, two-block ConvNeXt (LayerNorm: train mode computes what eval mode does unless
  a block is dropped); plain SGD (no momentum or decay), so that an update is lr times the
  gradient; no mixing, label smoothing 0.3, LayerScale 0.5, EMA 0.9."""
  base = {'model.depths': (2,), 'model.width': 8, 'model.drop_path_rate': 0.0,
          'model.layer_scale_init': 0.5, 'optimizer.optimizer': 'sgd',
          'optimizer.momentum': 0.0, 'optimizer.weight_decay': 0.0, 'augment.mix_prob': 0.0,
          'augment.label_smoothing': 0.3, 'ema_decay': 0.9}
  return configured('convnext_t,smoke', **{**base, **fields})


@functools.lru_cache(maxsize=None)
def _initial(key):
  """(graphdef, constants, initial state, tx) of step_config(**dict(key)): one compiled init."""
  config = step_config(**dict(key))
  cfg = runconfig.net_config(config, NUM_CLASSES, 1)
  tx = recipe.optimizer(config, optax.constant_schedule(STEP_LR))
  graphdef, constants, state = train_state.create_state(config, cfg, tx)
  return graphdef, constants, state, tx


# Fields that change the network, the optimizer or the initial state: a config that differs from
# the base only in other fields trains from the base's initial state.
_INIT_FIELDS = ('model.', 'optimizer.', 'seed', 'ema_decay')


def initial(**fields):
  return _initial(_key({k: v for k, v in fields.items() if k.startswith(_INIT_FIELDS)}))


@functools.lru_cache(maxsize=None)
def _step_fn(key):
  # The train step reads the seed from the state (create_state puts config.seed there).
  config = step_config(**dict(key))
  graphdef, constants, _, tx = initial(**dict(key))
  return jax.jit(train_state.make_train_step(config, graphdef, constants, tx,
                                             optax.constant_schedule(STEP_LR), NUM_CLASSES))


def train_steps(steps: int = 1, state=None, **fields):
  """The states after each of `steps` updates on STEP_BATCH (from the initial state of `fields`
  unless `state`), and the last loss."""
  step = _step_fn(_key({k: v for k, v in fields.items() if k != 'seed'}))
  state = initial(**fields)[2] if state is None else state
  states = []
  for _ in range(steps):
    state, metrics = step(state, STEP_BATCH)
    states.append(state)
  return states, float(metrics['loss'])


def fingerprint(**fields) -> np.ndarray:
  """The parameters after one update, and the loss."""
  states, loss = train_steps(1, **fields)
  leaves = jax.tree.leaves(states[0]['params'])
  return np.concatenate([np.ravel(np.asarray(x)) for x in leaves] + [[loss]])


def merged(key_fields: dict, params, batch_stats=None):
  graphdef, constants, state, _ = initial(**key_fields)
  return nnx.merge(graphdef, params, state['batch_stats'] if batch_stats is None else batch_stats,
                   constants)


def _log_softmax64(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


MIXING = {'augment.mix_prob': 1.0}
CUTMIX = {**MIXING, 'augment.switch_prob': 1.0}
MIXUP = {**MIXING, 'augment.switch_prob': 0.0}


@pytest.mark.parametrize('base, field, value', [
    ({}, 'augment.label_smoothing', 0.0),
    ({}, 'augment.mix_prob', 1.0),
    (MIXUP, 'augment.mixup_alpha', 0.2),
    (CUTMIX, 'augment.cutmix_alpha', 0.3),
    (CUTMIX, 'augment.switch_prob', 0.0),
    ({}, 'model.drop_path_rate', 0.5),
    (CUTMIX, 'seed', 1),
])
def test_train_step_depends_on(base, field, value):
  assert _changed(fingerprint(**{**base, field: value}), fingerprint(**base), rtol=1e-4)


def test_label_smoothing_without_mixing_gives_the_smoothed_one_hot_targets():
  """mix_prob 0 (Mixup and CutMix alphas set): the images are left alone and the targets are
  exactly the smoothed one-hot ones, (1 - s) one_hot + s / K, s = label_smoothing. Checked on the
  step's loss (their cross-entropy with the logits computed here, float64 softmax, to 1e-5) and on
  its update of the classifier's bias, which is -lr (mean softmax - mean target): the mean target
  read back from it is the smoothed one to 1e-5 (the unsmoothed one is 7.5e-3 away)."""
  _, _, state, _ = initial()
  model = merged({}, state['params'])
  model.train()   # drop_path_rate 0 and LayerNorm: the train-mode forward is deterministic
  log_p = _log_softmax64(model(STEP_BATCH['image']))
  labels = np.asarray(STEP_BATCH['label'])
  one_hot = np.eye(NUM_CLASSES)[labels]
  targets = {s: one_hot * (1 - s) + s / NUM_CLASSES for s in (0.0, 0.3)}
  (after,), loss = train_steps(1)
  assert loss == pytest.approx(float(-(targets[0.3] * log_p).sum(1).mean()), rel=1e-5)
  bias = lambda st: np.asarray(st['params']['head']['fc']['bias'].get_value(), np.float64)
  mean_target = np.exp(log_p).mean(0) + (bias(after) - bias(state)) / STEP_LR
  np.testing.assert_allclose(mean_target, targets[0.3].mean(0), rtol=0, atol=1e-5)
  assert np.abs(targets[0.3].mean(0) - targets[0.0].mean(0)).max() > 5e-3   # the test can tell


def test_switch_prob_picks_cutmix_with_its_probability():
  """switch_prob 1 is CutMix (the step CutMix alone, mixup_alpha 0, takes), 0 is Mixup (that of
  cutmix_alpha 0); the two differ. The same key, so the same draws."""
  cutmix, mixup = fingerprint(**CUTMIX), fingerprint(**MIXUP)
  only_cutmix = fingerprint(**{**MIXING, 'augment.mixup_alpha': 0.0})
  only_mixup = fingerprint(**{**MIXING, 'augment.cutmix_alpha': 0.0})
  assert not _changed(cutmix, only_cutmix, rtol=1e-6)
  assert not _changed(mixup, only_mixup, rtol=1e-6)
  assert _changed(cutmix, mixup, rtol=1e-4)


def test_ema_is_the_exponential_average_and_evaluation_uses_it():
  """ema_decay d: after each update, ema = d * ema + (1 - d) * params, from ema = the initial
  parameters; computed here in float64 over 3 updates, equal to the step's to 1e-6 of each
  tensor's scale (float32 rounding). make_eval_step(use_ema=True) evaluates those weights (loss
  and counts as computed here), use_ema=False the trained ones; the two differ."""
  decay = 0.9
  _, _, state, _ = initial()
  states, _ = train_steps(3)
  ema = jax.tree.map(lambda p: np.asarray(p, np.float64), state['params'])
  for s in states:
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p, np.float64), ema,
                       s['params'])
  final = states[-1]
  flat_ema = jax.tree_util.tree_leaves(final['ema'])
  flat_want = jax.tree_util.tree_leaves(ema)
  flat_params = jax.tree_util.tree_leaves(final['params'])
  moved = 0.0
  for got, want, trained in zip(flat_ema, flat_want, flat_params):
    scale = float(np.max(np.abs(want))) + 1e-12
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * scale)
    moved = max(moved, float(np.max(np.abs(np.asarray(trained) - want))) / scale)
  assert moved > 1e-3   # the average is not the trained weights

  graphdef, constants, _, _ = initial()
  mask = jnp.asarray([True] * 6 + [False] * 2)
  batch = {**STEP_BATCH, 'mask': mask}
  labels = np.asarray(STEP_BATCH['label'])
  results = {}
  for use_ema in (True, False):
    out = jax.jit(train_state.make_eval_step(graphdef, constants, use_ema))(final, batch)
    weights = final['ema'] if use_ema else final['params']
    model = merged({}, weights, final['batch_stats'])
    model.eval()
    logits = np.asarray(model(STEP_BATCH['image']), np.float64)
    loss = -_log_softmax64(logits)[np.arange(8), labels]
    order = np.argsort(-logits, axis=1, kind='stable')
    m = np.asarray(mask)
    assert int(out['count']) == 6
    assert int(out['correct1']) == int(np.sum((order[:, 0] == labels) & m))
    assert int(out['correct5']) == int(np.sum(np.any(order[:, :5] == labels[:, None], 1) & m))
    assert float(out['loss']) == pytest.approx(float(loss[m].sum()), rel=1e-5)
    results[use_ema] = float(out['loss'])
  assert abs(results[True] - results[False]) > 1e-3 * abs(results[False])


def test_ema_averages_the_batchnorm_statistics_too():
  """As timm's ModelEma (the paper's code), the average covers the BatchNorm statistics as well
  as the weights, and evaluation with EMA uses both: a network with BatchNorm (ResNet-50's block),
  its statistics averaged here in float64 over 2 updates."""
  decay = 0.9
  config = configured('resnet50,smoke', **{'model.depths': (1,), 'model.width': 8,
                                             'ema_decay': decay, 'augment.mix_prob': 0.0})
  cfg = runconfig.net_config(config, NUM_CLASSES, 1)
  tx = optax.sgd(STEP_LR)
  graphdef, constants, state = train_state.create_state(config, cfg, tx)
  step = jax.jit(train_state.make_train_step(config, graphdef, constants, tx,
                                             optax.constant_schedule(STEP_LR), NUM_CLASSES))
  want = jax.tree.map(lambda v: np.asarray(v, np.float64), state['batch_stats'])
  for _ in range(2):
    state, _ = step(state, STEP_BATCH)
    want = jax.tree.map(lambda e, v: decay * e + (1 - decay) * np.asarray(v, np.float64), want,
                        state['batch_stats'])
  got = jax.tree_util.tree_leaves(state['ema_batch_stats'])
  assert got and len(got) == len(jax.tree_util.tree_leaves(want))
  for g, w, now in zip(got, jax.tree_util.tree_leaves(want),
                       jax.tree_util.tree_leaves(state['batch_stats'])):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(now), w, rtol=1e-4)   # not the current statistics
  batch = {**STEP_BATCH, 'mask': jnp.ones(8, bool)}
  out = jax.jit(train_state.make_eval_step(graphdef, constants, True))(state, batch)
  model = nnx.merge(graphdef, state['ema'], state['ema_batch_stats'], constants)
  model.eval()
  logits = np.asarray(model(STEP_BATCH['image']), np.float64)
  loss = -_log_softmax64(logits)[np.arange(8), np.asarray(STEP_BATCH['label'])]
  assert float(out['loss']) == pytest.approx(float(loss.sum()), rel=1e-5)


def test_ema_off_keeps_no_average():
  _, _, state, _ = initial(ema_decay=0.0)
  assert 'ema' not in state and 'ema' in initial()[2]


@pytest.mark.parametrize('value', [0.5, 0.1])
def test_layer_scale_starts_at_layer_scale_init(value):
  _, _, state, _ = initial(**{'model.layer_scale_init': value})
  scales = [np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state['params'])
            if path[-2:] == ('layer_scale', 'scale')]
  assert len(scales) == 2
  for s in scales:
    np.testing.assert_array_equal(s, np.float32(value))


def test_seed_sets_the_initial_weights_and_the_step_draws():
  """The seed initialises the weights, and the step's Mixup / CutMix (and stochastic depth)
  draws come from it: the same weights under another seed take another update."""
  a = jax.tree.leaves(initial()[2]['params'])
  b = jax.tree.leaves(initial(seed=1)[2]['params'])
  c = jax.tree.leaves(initial(seed=0)[2]['params'])
  assert any(_changed(x, y) for x, y in zip(a, b))
  assert not any(_changed(x, y, rtol=0) for x, y in zip(a, c))
  state = initial()[2]
  reseeded = {**state, 'seed': jnp.asarray(1, state['seed'].dtype)}
  (one,), _ = train_steps(1, state=state, **CUTMIX)
  (other,), _ = train_steps(1, state=reseeded, **CUTMIX)
  assert any(_changed(x, y, rtol=1e-4) for x, y in zip(jax.tree.leaves(one['params']),
                                                       jax.tree.leaves(other['params'])))


@pytest.mark.parametrize('init', ['trunc_normal', 'kaiming'])
def test_init_draws_the_weights_of_its_scheme(init):
  """model.init: 'trunc_normal' N(0, 0.02) for every conv and linear weight, zero biases;
  'kaiming' N(0, 2 / fan_out) for convs (fan_out = out channels x kernel area) and PyTorch's
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the classifier's weight and bias. Checked on the
  weights pooled, standardised by the scheme's std: their std is 1 to 6 standard errors."""
  _, _, state, _ = initial(**{'model.init': init})
  fan_in = state['params']['head']['fc']['kernel'].get_value().shape[0]
  pooled, uniform = [], []
  for path, v in nnx.to_flat_state(state['params']):
    x = np.asarray(v.get_value(), np.float64)
    if path[-1] == 'kernel' and x.ndim == 4:
      std = 0.02 if init == 'trunc_normal' else math.sqrt(2.0 / (x.shape[-1] * x.shape[0]
                                                                 * x.shape[1]))
      pooled.append(x.ravel() / std)
    elif path[-2:] == ('fc', 'kernel') and init == 'trunc_normal':
      pooled.append(x.ravel() / 0.02)
    elif path[-2] == 'fc' and init == 'kaiming':
      uniform.append(x.ravel() * math.sqrt(fan_in))
    elif path[-1] == 'bias' and path[-2] in ('fc', 'conv', 'conv1', 'conv2', 'conv3'):
      assert not x.any(), path
  pooled = np.concatenate(pooled)
  assert abs(pooled.std() - 1.0) < 6 / math.sqrt(2 * pooled.size), (init, pooled.std())
  if init == 'kaiming':   # U(-1, 1) once scaled by sqrt(fan_in): std 1/sqrt(3), se 0.45/sqrt(n)
    uniform = np.concatenate(uniform)
    assert np.abs(uniform).max() <= 1.0
    assert abs(uniform.std() * math.sqrt(3) - 1.0) < 6 * 0.45 / math.sqrt(uniform.size)

