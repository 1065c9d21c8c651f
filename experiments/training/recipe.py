"""The recipe's arithmetic: durations (epochs become updates here and nowhere else), the learning
rate schedule, the optimizer and its weight-decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

from experiments.cli import UsageError
from modernize.network import model_class


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every duration of a run in steps. Epochs become steps here and nowhere else.

  The recipe's warm-up and step-decay epochs are the paper's (out of `paper_epochs`); a run of
  `epochs` epochs scales them by epochs / paper_epochs, keeping their place in training.
  """
  steps_per_epoch: float
  epochs: float
  paper_epochs: float

  @property
  def total_steps(self) -> int:
    return max(1, self.steps(self.epochs))

  def steps(self, epochs: float) -> int:
    return int(round(epochs * self.steps_per_epoch))

  def paper_steps(self, paper_epochs: float) -> int:
    return self.steps(paper_epochs * self.epochs / self.paper_epochs)


def paper_epochs(config) -> float:
  return 90.0 if config.recipe == 'original' else 300.0


def learning_rate(config, schedule: Schedule) -> optax.Schedule:
  o = config.optimizer
  peak = o.base_lr * config.batch_size / o.lr_batch
  total = schedule.total_steps
  if o.schedule == 'step':
    boundaries = {schedule.paper_steps(e): 0.1 for e in o.step_epochs}
    return optax.piecewise_constant_schedule(peak, {b: s for b, s in boundaries.items() if b > 0})
  warmup = min(schedule.paper_steps(o.warmup_epochs), total - 1)
  if warmup <= 0:
    return optax.cosine_decay_schedule(peak, total, alpha=o.min_lr / peak)
  # decay_steps counts the warm-up steps too.
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=o.min_lr)


def _key_name(key) -> str:
  return str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))


def decay_mask(params, no_decay=frozenset()):
  """The enhanced recipe's weight-decay mask: True for weights with ndim > 1 (not biases, norms
  or LayerScale), except parameters named in `no_decay` (`no_weight_decay`: a transformer's
  position embeddings, class token and relative position bias tables, as timm)."""
  def decays(path, p):
    return p.ndim > 1 and not any(_key_name(k) in no_decay for k in path)
  return jax.tree_util.tree_map_with_path(decays, params)


def no_weight_decay(cfg) -> frozenset[str]:
  """Names of the parameters of `cfg`'s module that are never decayed (its class's
  `NO_WEIGHT_DECAY`; none for a `Network`)."""
  return frozenset(getattr(model_class(cfg), 'NO_WEIGHT_DECAY', ()))


def optimizer(config, lr: optax.Schedule,
              no_decay: frozenset[str] = frozenset()) -> optax.GradientTransformation:
  """The recipe's optimizer; `decay_all` false: decay masked by `decay_mask` (`no_decay`: the
  names `no_weight_decay` gives for the model)."""
  o = config.optimizer
  mask = None if o.decay_all else (lambda params: decay_mask(params, no_decay))
  if o.optimizer == 'sgd':
    # PyTorch's SGD adds weight decay to the gradient before momentum.
    tx = optax.chain(optax.masked(optax.add_decayed_weights(o.weight_decay), mask)
                     if mask else optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(lr, momentum=o.momentum))
  elif o.optimizer == 'adamw':
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  else:
    raise UsageError(f'optimizer.optimizer={o.optimizer!r}: must be sgd or adamw')
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx
