"""The trainer's optimizers and learning-rate schedules against PyTorch's and timm's.

`experiments.training.recipe.learning_rate` and `.optimizer`, built from the ladder's two
recipes (configs/ladder.py: the original SGD + step recipe of ResNet-50, the enhanced AdamW +
warm-up + cosine recipe of ConvNeXt), are compared with torch.optim.SGD / torch.optim.AdamW,
torch's MultiStepLR, timm's CosineLRScheduler and timm's weight-decay parameter groups, step by
step, in float64 where parameters are compared.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import timm.optim
import timm.scheduler
import torch
from flax import nnx
from torch import nn

from configs.ladder import get_config
from experiments.training.recipe import Schedule, learning_rate, optimizer, paper_epochs
from modernize.convert import from_torch_state_dict, to_torch_state_dict

pytestmark = pytest.mark.torch
torch.set_num_threads(2)


def lrs(config, schedule, steps):
  lr = learning_rate(config, schedule)
  return np.array([float(lr(t)) for t in steps])


def dummy_torch_optimizer(lr):
  return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def multistep_reference(peak, milestones, steps):
  """torch's MultiStepLR, stepped once per update: the lr of update t (0-based)."""
  opt = dummy_torch_optimizer(peak)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
  out = []
  for _ in range(steps):
    out.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  return np.array(out)


def cosine_reference(peak, min_lr, warmup, total, steps):
  """timm's CosineLRScheduler per update: linear warm-up from 0 over `warmup` updates, then a
  half cosine from the peak to min_lr over the remaining total - warmup updates."""
  opt = dummy_torch_optimizer(peak)
  sched = timm.scheduler.CosineLRScheduler(
      opt, t_initial=total - warmup, lr_min=min_lr, warmup_t=warmup, warmup_lr_init=0.0,
      warmup_prefix=True, t_in_epochs=False)
  out = []
  for t in steps:
    sched.step_update(num_updates=t)
    out.append(opt.param_groups[0]['lr'])
  return np.array(out)


# --- schedules ------------------------------------------------------------------------------------

@pytest.mark.parametrize('batch', [128, 256, 1024])
def test_step_schedule_matches_multistep_lr(batch):
  config = get_config(f'resnet50,length=0.1,batch={batch}')   # 9 epochs out of the paper's 90
  assert config.optimizer.schedule == 'step' and config.optimizer.step_epochs == (30, 60)
  spe = 7.0                                                  # updates per epoch
  schedule = Schedule(spe, config.epochs, paper_epochs(config))
  total = 63
  assert schedule.total_steps == total
  peak = 0.1 * batch / 256                                   # linear scaling from batch 256
  # The paper's decays at epochs 30 and 60 of 90 stay at a third and two thirds of the run.
  milestones = [21, 42]
  got = lrs(config, schedule, range(total))
  np.testing.assert_allclose(got, multistep_reference(peak, milestones, total), rtol=1e-6)
  # Boundaries, independently: the decay applies from the milestone update on.
  np.testing.assert_allclose(got[[0, 20, 21, 41, 42, 62]],
                             peak * np.array([1, 1, 0.1, 0.1, 0.01, 0.01]), rtol=1e-6)


@pytest.mark.parametrize('batch,lr_batch', [(128, 4096), (4096, 4096), (256, 128)])
def test_cosine_schedule_matches_timm(batch, lr_batch):
  config = get_config(f'convnext_t,length=0.1,batch={batch}')  # 30 epochs out of 300
  config.optimizer.lr_batch = lr_batch
  o = config.optimizer
  assert (o.schedule, o.warmup_epochs, o.min_lr, o.base_lr) == ('cosine', 20, 1e-6, 4e-3)
  spe = 5.0
  schedule = Schedule(spe, config.epochs, paper_epochs(config))
  total, warmup = 150, 10                    # 20 of 300 paper epochs = 2 epochs of 30 = 10 updates
  assert schedule.total_steps == total
  peak = 4e-3 * batch / lr_batch
  steps = list(range(total + 1))
  got = lrs(config, schedule, steps)
  np.testing.assert_allclose(got, cosine_reference(peak, 1e-6, warmup, total, steps),
                             rtol=2e-5, atol=1e-10)

  # The same, from the formula at the boundaries.
  def formula(t):
    if t < warmup:
      return peak * t / warmup
    return 1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
  for t in [0, 1, warmup - 1, warmup, warmup + 1, (total + warmup) // 2, total - 1, total]:
    np.testing.assert_allclose(got[t], formula(t), rtol=2e-5, atol=1e-10, err_msg=f'step {t}')
  assert got[0] == 0.0 and abs(got[warmup] - peak) <= 1e-6 * peak
  assert got.max() <= peak * (1 + 1e-6)
  np.testing.assert_allclose(got[total], 1e-6, rtol=1e-4)


def test_cosine_schedule_without_warmup_matches_timm():
  config = get_config('convnext_t,length=0.1,batch=4096')
  config.optimizer.warmup_epochs = 0
  schedule = Schedule(2.0, config.epochs, paper_epochs(config))
  steps = list(range(61))
  np.testing.assert_allclose(lrs(config, schedule, steps),
                             cosine_reference(4e-3, 1e-6, 0, 60, steps), rtol=2e-5, atol=1e-10)


# --- parameter trajectories -----------------------------------------------------------------------

class Toy(nn.Module):
  """A few parameters of every kind the masks must tell apart: conv and linear weights, biases,
  a norm's scale and shift, a layer-scale gamma."""

  def __init__(self):
    super().__init__()
    self.conv = nn.Conv2d(3, 4, 3)
    self.norm = nn.LayerNorm(4)
    self.gamma = nn.Parameter(torch.ones(4))
    self.head = nn.Linear(4, 5)


def toy_problem(seed=0):
  """(torch module in float64, the same parameters as a {name: array} tree, the loss's
  coefficients). The loss is sum(0.5 * a * p**2 + b * p) per parameter: gradients depend on the
  parameters, so every step differs."""
  torch.manual_seed(seed)
  model = Toy().double()
  rng = np.random.RandomState(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.from_numpy(rng.randn(*p.shape)))
  coef = {n: (rng.uniform(0.5, 2.0, p.shape), rng.randn(*p.shape))
          for n, p in model.named_parameters()}
  params = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
  return model, params, coef


def toy_loss_torch(model, coef):
  total = 0.0
  for n, p in model.named_parameters():
    a, b = (torch.from_numpy(c) for c in coef[n])
    total = total + (0.5 * a * p ** 2 + b * p).sum()
  return total


def run_ours(config, lr, params, coef, steps):
  """The trainer's transformation in float64 over `steps` updates; the parameters after each."""
  with jax.enable_x64(True):
    return run_in_x64(optimizer(config, lr), params, coef, steps)


def run_in_x64(tx, params, coef, steps):
  params = {n: jnp.asarray(p, jnp.float64) for n, p in params.items()}

  def grads(params):
    return {n: jnp.asarray(coef[n][0]) * p + jnp.asarray(coef[n][1]) for n, p in params.items()}

  @jax.jit
  def step(params, opt):
    updates, opt = tx.update(grads(params), opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  history = []
  for _ in range(steps):
    params, opt = step(params, opt)
    history.append({n: np.asarray(p) for n, p in params.items()})
  return history


def run_torch(model, opt, lr_of_step, coef, steps):
  history = []
  for t in range(steps):
    for group in opt.param_groups:
      group['lr'] = lr_of_step[t]
    opt.zero_grad()
    toy_loss_torch(model, coef).backward()
    opt.step()
    history.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
  return history


def assert_same_trajectory(ours, theirs, initial, tol):
  moved = diff = 0.0
  for t, (a, b) in enumerate(zip(ours, theirs)):
    assert sorted(a) == sorted(b)
    for n in a:
      np.testing.assert_allclose(a[n], b[n], rtol=tol, atol=tol, err_msg=f'step {t}: {n}')
      moved = max(moved, float(np.abs(a[n] - initial[n]).max()))
      diff = max(diff, float(np.abs(a[n] - b[n]).max()))
  print(f'{len(ours)} updates: max |ours - torch| {diff:.3g}, largest change {moved:.3g}')
  assert moved > 1e-2   # the parameters did move


@pytest.mark.parametrize('batch', [128, 512])
def test_sgd_recipe_matches_torch_sgd(batch):
  config = get_config(f'resnet50,length=0.1,batch={batch}')
  o = config.optimizer
  assert (o.optimizer, o.momentum, o.weight_decay, o.decay_all) == ('sgd', 0.9, 1e-4, True)
  schedule = Schedule(1.0, config.epochs, paper_epochs(config))   # 9 updates, decays at 3 and 6
  steps = schedule.total_steps
  assert steps == 9
  model, params, coef = toy_problem()
  peak = 0.1 * batch / 256
  lr_of_step = multistep_reference(peak, [3, 6], steps)
  ours = run_ours(config, learning_rate(config, schedule), params, coef, steps)
  # The original recipe decays every parameter, norms and biases included (torchvision's
  # reference); PyTorch adds weight_decay * p to the gradient before the momentum buffer.
  opt = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9, weight_decay=1e-4)
  theirs = run_torch(model, opt, lr_of_step, coef, steps)
  assert_same_trajectory(ours, theirs, params, tol=1e-12)


def test_sgd_weight_decay_enters_the_momentum_buffer():
  """With a large weight decay and zero loss gradient, torch's SGD (decay added to the gradient,
  then momentum) and ours agree; decoupled or post-momentum decay would not."""
  config = get_config('resnet50,length=0.1,batch=256')
  config.optimizer.weight_decay = 0.5
  schedule = Schedule(1.0, config.epochs, paper_epochs(config))
  model, params, _ = toy_problem(1)
  zero = {n: (np.zeros(p.shape), np.zeros(p.shape)) for n, p in params.items()}
  ours = run_ours(config, learning_rate(config, schedule), params, zero, 3)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
  theirs = run_torch(model, opt, [0.1] * 3, zero, 3)
  # By hand: p1 = p0 (1 - lr wd); buffer_2 = 0.9 wd p0 + wd p1; p2 = p1 - lr buffer_2.
  p0 = np.asarray(params['head.weight'])
  p1 = p0 * (1 - 0.05)
  p2 = p1 - 0.1 * (0.9 * 0.5 * p0 + 0.5 * p1)
  np.testing.assert_allclose(ours[1]['head.weight'], p2, rtol=1e-12)
  assert_same_trajectory(ours, theirs, params, tol=1e-12)


@pytest.mark.parametrize('batch', [4096, 1024])
def test_adamw_recipe_matches_torch_adamw(batch):
  config = get_config(f'convnext_t,length=0.05,batch={batch}')   # 15 epochs out of 300
  o = config.optimizer
  assert (o.optimizer, o.weight_decay, o.decay_all, o.b1, o.b2, o.eps) == \
      ('adamw', 0.05, False, 0.9, 0.999, 1e-8)
  config.optimizer.base_lr = 0.4    # large steps so that any difference shows in a few updates
  schedule = Schedule(3.0, config.epochs, paper_epochs(config))  # 45 updates, 3 of warm-up
  total, warmup = 45, 3
  assert schedule.total_steps == total
  model, params, coef = toy_problem(2)
  peak = 0.4 * batch / 4096
  lr_of_step = cosine_reference(peak, 1e-6, warmup, total, range(total))
  ours = run_ours(config, learning_rate(config, schedule), params, coef, total)
  # timm's rule (and the official ConvNeXt's): no decay for 1-D parameters and biases.
  groups = timm.optim.param_groups_weight_decay(model, weight_decay=0.05)
  decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
  assert {n for n, p in model.named_parameters() if id(p) in decayed} == \
      {'conv.weight', 'head.weight'}
  opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.999), eps=1e-8)
  theirs = run_torch(model, opt, lr_of_step, coef, total)
  # optax evaluates the schedule in float32 (its step counter is int32): learning rates differ
  # from timm's float64 ones in the 8th digit, parameters after 45 updates in the 7th.
  assert_same_trajectory(ours, theirs, params, tol=1e-6)


def test_adamw_update_rule_matches_torch_adamw():
  """A constant float64 learning rate: the update itself (bias correction, eps outside the
  square root, decoupled decay scaled by lr) to float64 precision."""
  config = get_config('convnext_t')
  model, params, coef = toy_problem(3)
  for n in coef:   # gradients of ~1e-3, so that eps is not negligible against sqrt(v)
    coef[n] = tuple(1e-3 * c for c in coef[n])
  ours = run_ours(config, 0.05, params, coef, 20)
  groups = timm.optim.param_groups_weight_decay(model, weight_decay=0.05)
  opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
  theirs = run_torch(model, opt, [0.05] * 20, coef, 20)
  assert_same_trajectory(ours, theirs, params, tol=1e-12)


def test_adamw_decay_mask_on_convnext_matches_timm_groups():
  """On a real (narrow, shallow) ConvNeXt: the parameters the enhanced recipe decays are exactly
  those in timm's weight-decay group (one update with zero gradients moves only decayed ones)."""
  torch.manual_seed(0)
  shape = dict(depths=(1, 1, 2, 1))
  ref = timm.create_model('convnext_tiny', pretrained=False, num_classes=10,
                          dims=(8, 16, 32, 64), **shape)
  groups = timm.optim.param_groups_weight_decay(ref, weight_decay=0.05)
  decayed_ids = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
  expected = {n for n, p in ref.named_parameters() if id(p) in decayed_ids}

  model = from_torch_state_dict(ref.state_dict(), 'convnext_tiny', drop_path_rate=0.0, width=8,
                                **shape)
  before = to_torch_state_dict(model, 'convnext_tiny', tensors='numpy')
  tx = optimizer(get_config('convnext_t'), lambda _: 1e-2)   # a constant lr (step 0's is 0)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  grads = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  nnx.update(model, optax.apply_updates(params, updates))
  after = to_torch_state_dict(model, 'convnext_tiny', tensors='numpy')
  moved = {n for n in after if not np.array_equal(after[n], before[n])}
  # Convolutions (the depthwise ones too) and the classifier's weight; no bias, norm or gamma.
  assert len(expected) == 20 and expected != set(after)
  assert moved == expected
  for n in moved:   # decoupled: p <- p (1 - lr wd)
    np.testing.assert_allclose(after[n], before[n] * (1 - 1e-2 * 0.05), rtol=1e-6, atol=1e-9)
