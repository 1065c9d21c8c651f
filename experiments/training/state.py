"""The train state and the compiled steps: one jitted init, the train step (one optimizer update
from one global batch, optionally accumulated over microbatches) and the eval step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.data import pipeline
from experiments.training import mixing
from modernize.network import build


def create_state(config, cfg, tx, sharding=None):
  """The model's graph, its constant part, and the train state pytree (params, BN statistics,
  optimizer state, step counter), initialised by one jitted function (eager init would compile a
  small program per parameter shape)."""
  def make():
    return build(cfg, rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
                 image_size=config.data.image_size)

  graphdef = nnx.split(nnx.eval_shape(make), nnx.Param, nnx.BatchStat, ...)[0]

  # The seed is an argument, not a constant of the compiled program, so that runs differing only
  # in their seed share one compiled init (and its cache entry), as they share the train step.
  def init(seed):
    model = build(cfg, rngs=nnx.Rngs(params=jax.random.key(seed),
                                     dropout=jax.random.key(seed + 1)),
                  image_size=config.data.image_size)
    _, params, batch_stats, constants = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    state = {'params': params, 'batch_stats': batch_stats, 'opt': tx.init(params),
             'step': jnp.zeros((), jnp.int32),
             # The seed travels as data in the train step too.
             'seed': seed}
    if config.ema_decay > 0:   # timm's ModelEma: the weights and the BatchNorm statistics
      state['ema'] = jax.tree.map(jnp.copy, params)
      state['ema_batch_stats'] = jax.tree.map(jnp.copy, batch_stats)
    return constants, state

  # Runs once: XLA's backend optimisations would only make it compile slower (13 s -> 1.3 s).
  seed = jnp.asarray(config.seed, jnp.uint32)
  compiled = jax.jit(init, out_shardings=sharding).lower(seed).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  constants, state = compiled(seed)
  return graphdef, constants, state


def make_train_step(config, graphdef, constants, tx, lr, num_classes,
                    spec: pipeline.InputSpec | None = None):
  """The jitted training step: one optimizer update from one global batch. With
  `accumulate_steps` A > 1 the batch's gradient is the mean of A microbatch gradients computed one
  after another (`lax.scan`), so a batch that does not fit in memory at once takes A times less
  activation memory. Without BatchNorm that is the same update as the whole batch at once (up to
  float rounding); BatchNorm normalises and updates its statistics per microbatch. Mixing is
  drawn on the whole batch; stochastic depth draws per microbatch. With `spec`, batches are the
  pipeline's uint8 batches, made model inputs here (`pipeline.model_input`); without, batch['image']
  is the model input already."""
  a = config.augment
  accumulate = config.get('accumulate_steps', 1)

  def loss_fn(params, batch_stats, images, targets, drop_key):
    # copy: fresh Variables in this trace, so BatchNorm may update its statistics here.
    model = nnx.merge(graphdef, params, batch_stats, constants, copy=True)
    model.train()
    # The network returns float32 logits in any compute dtype: softmax and the loss in float32.
    logits = model(images, key=drop_key).astype(jnp.float32)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, nnx.state(model, nnx.BatchStat)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch_stats, images, targets, drop_key):
    # Microbatch i takes rows i, i + A, i + 2A, ...: each device keeps its own rows.
    def split(x):
      return jnp.swapaxes(x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:]), 0, 1)

    def body(carry, micro):
      grad_sum, loss_sum, stats = carry
      (loss, stats), grads = grad_fn(params, stats, *micro)
      return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, stats), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro = (split(images), split(targets), jax.random.split(drop_key, accumulate))
    (grad_sum, loss_sum, batch_stats), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), batch_stats), micro)
    return (loss_sum / accumulate, batch_stats), jax.tree.map(lambda g: g / accumulate, grad_sum)

  def train_step(state, batch):
    step = state['step']
    key = jax.random.fold_in(jax.random.key(state['seed']), step)
    mix_key, drop_key = jax.random.split(key)
    images = batch['image'] if spec is None else pipeline.model_input(batch, spec)
    images, targets = mixing.mix(
        mix_key, images, batch['label'], num_classes=num_classes,
        mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha, switch_prob=a.switch_prob,
        mix_prob=a.mix_prob, label_smoothing=a.label_smoothing)
    gradients = grad_fn if accumulate == 1 else accumulated
    (loss, batch_stats), grads = gradients(state['params'], state['batch_stats'], images, targets,
                                           drop_key)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'params': params, 'batch_stats': batch_stats, 'opt': opt, 'step': step + 1,
           'seed': state['seed']}
    if 'ema' in state:
      new['ema'] = optax.incremental_update(params, state['ema'], 1.0 - config.ema_decay)
      new['ema_batch_stats'] = optax.incremental_update(batch_stats, state['ema_batch_stats'],
                                                        1.0 - config.ema_decay)
    metrics = {'loss': loss, 'lr': lr(step)}
    return new, metrics

  return train_step


def make_eval_step(graphdef, constants, use_ema: bool, spec: pipeline.InputSpec | None = None):
  def eval_step(state, batch):
    params = state['ema'] if use_ema else state['params']
    batch_stats = state['ema_batch_stats'] if use_ema else state['batch_stats']
    model = nnx.merge(graphdef, params, batch_stats, constants)
    model.eval()
    images = batch['image'] if spec is None else pipeline.model_input(batch, spec)
    logits = model(images).astype(jnp.float32)
    mask = batch['mask']
    labels = batch['label']
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {'correct1': jnp.sum((top5[:, 0] == labels) & mask),
            'correct5': jnp.sum(jnp.any(top5 == labels[:, None], axis=1) & mask),
            'loss': jnp.sum(jnp.where(mask, loss, 0.0)), 'count': jnp.sum(mask)}
  return eval_step
