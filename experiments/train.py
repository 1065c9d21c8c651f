"""Train one ladder step (one config) and append its row to the step table.

  python -m experiments.train --config configs/ladder.py:convnext_t,smoke --workdir /tmp/convnext_t

The train step is a plain `jax.jit` over the `nnx.split` state with explicit shardings over a 1-D
'data' mesh of every device of every host: the batch is split, the state replicated and donated.
BatchNorm statistics under that sharding are global (synchronised BN). Runs resume from the newest
checkpoint in WORKDIR/checkpoints that reads back, with the logging state it carries (`LogState`),
so a resumed run writes the row an unbroken one does; SIGTERM saves a checkpoint and exits 143 (on
several processes, every process saves the same step, agreed through JAX's preemption service).
Writes WORKDIR/config.json, WORKDIR/metrics.jsonl (one JSON line per logging step) and a row of
the step table (default runs/steps.csv).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import datasets, mixing, outputs, pipeline, steptable
from experiments import workdir as workdirs
from experiments.checkpoint import Checkpoints, latest_step
from experiments.cli import UsageError
from experiments.malloc import keep_freed_memory
from modernize import backend, presets
from modernize.config import NetConfig, feature_size, min_image_size
from modernize.flops import count_macs
from modernize.network import build, count_params, model_class


class TrainingDiverged(Exception):
  """The loss became NaN or infinite; checkpoints saved before it (all good) are kept."""


class Preempted(Exception):
  """SIGTERM arrived during training; a checkpoint was saved."""


class Interrupted(Exception):
  """Ctrl-C (SIGINT) arrived during training; a checkpoint was saved."""


# --- durations ------------------------------------------------------------------------------------

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


class Stopwatch:
  """Seconds spent per phase of a run (setup, compile, train, checkpoint, eval), for
  `run_times.jsonl`: where a run's time goes."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._start = time.perf_counter()

  def add(self, phase: str, seconds: float) -> None:
    self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

  def phase(self, name: str):
    watch = self

    class _Timer:
      def __enter__(self):
        self.t0 = time.perf_counter()

      def __exit__(self, *exc):
        watch.add(name, time.perf_counter() - self.t0)
    return _Timer()

  def summary(self) -> dict[str, float]:
    total = time.perf_counter() - self._start
    out = {k: round(v, 2) for k, v in self.seconds.items()}
    out['other_s'] = round(total - sum(self.seconds.values()), 2)
    out['total_s'] = round(total, 2)
    return out


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


# --- configuration --------------------------------------------------------------------------------

def net_config(config, num_classes: int, in_channels: int = 1):
  """The network of `config`: a `NetConfig`, or with `model.arch` the transformer reference's
  `SwinConfig` / `ViTConfig` built for `data.image_size`; num_classes / in_channels of -1 are
  taken from the data."""
  values = config.model.to_dict()
  if values.get('num_classes', -1) == -1:
    values['num_classes'] = num_classes
  if values.get('in_channels', -1) == -1:
    values['in_channels'] = in_channels
  arch = values.pop('arch', None)
  if arch is None:
    return NetConfig.from_dict(values)
  if arch not in presets.REFERENCES:
    raise UsageError(f'model.arch={arch!r}: must be one of {sorted(presets.REFERENCES)}')
  return presets.preset(arch, **values, img_size=config.data.image_size)


def data_channels(config, info: datasets.DataInfo) -> int:
  """The model's input channels: config.data.channels, or (0) the data set's own."""
  return config.data.channels or info.channels


def data_workers(config) -> int | None:
  """Input-pipeline threads: config.data.threads, or (when negative) the pipeline's default, one
  per core ($MODERNIZE_DATA_WORKERS overrides)."""
  threads = config.data.threads
  return None if threads < 0 else threads


def augment_config(config) -> pipeline.AugmentConfig:
  a = config.augment
  if a.crop not in ('random_resized', 'pad', 'none'):
    raise UsageError(f"augment.crop={a.crop!r}: must be 'random_resized', 'pad' or 'none'")
  try:
    return pipeline.AugmentConfig(
        random_resized_crop=a.crop == 'random_resized',
        random_crop_pad=a.crop_pad if a.crop == 'pad' else 0, hflip=a.hflip,
        randaugment_n=a.randaugment_n, randaugment_m=a.randaugment_m,
        randaugment_mstd=a.randaugment_mstd, randaugment_prob=a.randaugment_prob,
        random_erasing_prob=a.random_erasing)
  except ValueError as e:
    raise UsageError(f'augment: {e}') from None


# Fields that do not change what a run computes: left out of its identity.
_NOT_HASHED = ('step_table', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
               'resume_any')
_NOT_HASHED_DATA = ('dir', 'threads')


# Fields added after runs were recorded, with their default: at the default a field is left out of
# the hash, so that a run hashes as it did before the field existed ('model.dtype': ...).
_ADDED_FIELDS = {'accumulate_steps': 1, 'model.dtype': 'float32', 'model.use_grn': False,
                 'model.mhsa_last_stage': False}


def config_hash(config) -> str:
  """Identity of what a run computes (the step table's `config_hash`): of a config, or of the
  dict a workdir's config.json holds. A field of `_ADDED_FIELDS` at its default leaves the hash as
  it was before the field existed."""
  values = copy.deepcopy(config if isinstance(config, dict) else config.to_dict())
  for key in _NOT_HASHED:
    values.pop(key, None)
  values['data'] = {k: v for k, v in values['data'].items() if k not in _NOT_HASHED_DATA}
  for field, default in _ADDED_FIELDS.items():
    *parents, name = field.split('.')
    node = values
    for parent in parents:
      node = node.get(parent, {})
    if name in node and node[name] == default:
      del node[name]
  text = json.dumps(values, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def paper_epochs(config) -> float:
  return 90.0 if config.recipe == 'original' else 300.0


def _image_size_problem(config) -> str | None:
  """Why the network cannot take config.data.image_size (its last feature map would be empty)."""
  cfg, size = net_config(config, num_classes=1), config.data.image_size
  if not isinstance(cfg, NetConfig) or size >= min_image_size(cfg):   # a reference checks itself
    return None
  side = feature_size(cfg, size)
  return (f'data.image_size={size} is too small for {config.step}: its last feature map would be '
          f'{side}x{side}; the smallest valid size is {min_image_size(cfg)}')


def _output_problems(config, workdir: str) -> list[str]:
  """What would stop the run from writing its outputs, found before it trains: creates nothing
  (in a gs:// workdir, one probe object, removed at once)."""
  problem = outputs.write_problem(workdir, directory=True, remote_ok=True)
  if problem:
    return [f'workdir {workdir} {problem}']
  problems = []
  # In a gs:// workdir the probe object written above stands for every file.
  names = () if outputs.is_remote(workdir) else (
      ('checkpoints', True), ('config.json', False), ('metrics.jsonl', False))
  for name, directory in names:
    path = os.path.join(workdir, name)
    problem = outputs.write_problem(path, directory=directory)
    if problem:
      problems.append(f'{path} {problem}')
  if jax.process_index() == 0:   # the only writer of the step table
    try:
      steptable.check_writable(config.step_table, {'dtype': config.model.get('dtype', 'float32')})
    except steptable.TableError as e:
      problems.append(str(e))
  return problems


def validate(config, workdir: str | None = None) -> None:
  """UsageError, one line, for every problem of `config` (and of the outputs in `workdir`) found
  before anything is read or trained."""
  problems = []
  if config.batch_size <= 0:
    problems.append('batch_size must be positive')
  if config.epochs <= 0:
    problems.append('epochs must be positive')
  accumulate = config.get('accumulate_steps', 1)
  if accumulate < 1:
    problems.append(f'accumulate_steps={accumulate} must be at least 1')
  elif config.batch_size % (jax.device_count() * accumulate):
    problems.append(f'batch_size={config.batch_size} must be divisible by the device count '
                    f'{jax.device_count()}' + (f' times accumulate_steps={accumulate}'
                                              if accumulate > 1 else ''))
  if config.log_every_steps <= 0 or config.checkpoint_every_steps <= 0:
    problems.append('log_every_steps and checkpoint_every_steps must be positive')
  if config.data.validation < 0:
    problems.append(f'data.validation={config.data.validation} must be >= 0')
  if config.data.channels not in (0, 1, 3):
    problems.append(f'data.channels={config.data.channels} must be 0 (the data\'s own), 1 or 3')
  try:
    datasets.validate_name(config.data.name)
  except ValueError as e:
    problems.append(f'data.name: {e}')
  data_dir_problem = config.data.dir and outputs.remote_problem(config.data.dir, remote_ok=True)
  if data_dir_problem:
    problems.append(f'data.dir {config.data.dir} {data_dir_problem}')
  size_problem = _image_size_problem(config)
  if size_problem:
    problems.append(size_problem)
  if workdir is not None:
    problems += _output_problems(config, workdir)
  if problems:
    raise UsageError('; '.join(problems))


# --- state and steps ------------------------------------------------------------------------------

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
    if config.ema_decay > 0:
      state['ema'] = jax.tree.map(jnp.copy, params)
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
    metrics = {'loss': loss, 'lr': lr(step)}
    return new, metrics

  return train_step


def make_eval_step(graphdef, constants, use_ema: bool, spec: pipeline.InputSpec | None = None):
  def eval_step(state, batch):
    params = state['ema'] if use_ema else state['params']
    model = nnx.merge(graphdef, params, state['batch_stats'], constants)
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


# --- the run --------------------------------------------------------------------------------------

def _versions() -> str:
  names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-datasets')
  out = []
  for n in names:
    try:
      out.append(f'{n}={importlib.metadata.version(n)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  return ' '.join(out)


def _git_commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def _workdir_id(workdir: str) -> tuple[int, int] | None:
  """The local `workdir`'s identity (device, inode); None for a gs:// one (an object store has no
  directories to delete or replace)."""
  if outputs.is_remote(workdir):
    return None
  st = os.stat(workdir)
  return st.st_dev, st.st_ino


def _check_same_workdir(workdir: str, expected: tuple[int, int] | None) -> None:
  """UsageError if the local `workdir` was deleted or replaced during the run (orbax would quietly
  make a new one, and the logs written so far would be lost with the old)."""
  if expected is None:
    return
  try:
    same = _workdir_id(workdir) == expected
  except OSError:
    same = False
  if not same:
    raise UsageError(f'workdir {workdir} vanished during the run (deleted or moved); '
                     'run again to start over there')


def _make_workdir(workdir: str) -> None:
  """Creates `workdir` (`validate` has already found that it can be written)."""
  try:
    outputs.location(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f'workdir {workdir!r} cannot be created: {e.strerror}') from None


def _global_batch(local: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _on_device(batches: Iterator[dict], sharding, ahead: int = 2) -> Iterator[dict]:
  """The host batches as global device arrays, `ahead` of them in flight: each is sent (an
  asynchronous copy) before the step that needs it is dispatched, so that the copy overlaps the
  steps before it. No host sync."""
  queue = collections.deque()
  for local in batches:
    queue.append(_global_batch(local, sharding))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def _finite_losses(window: list, done: int, workdir: str) -> np.ndarray:
  """The losses of the steps up to `done` (host values), or TrainingDiverged at the first bad one."""
  losses = np.asarray(jax.device_get(window))
  bad = ~np.isfinite(losses)
  if bad.any():
    first = int(np.argmax(bad))
    where = str(outputs.location(workdir) / 'checkpoints')
    try:
      kept = latest_step(where)   # saves are synchronous: none is half-written while training
    except OSError:
      kept = None
    raise TrainingDiverged(
        f'loss became {losses[first]} at step {done - len(losses) + first + 1}; ' +
        (f'the last good checkpoint (step {kept}) is kept in {where}' if kept is not None else
         f'no checkpoint was saved before it, so {where} holds nothing to resume from'))
  return losses


@dataclasses.dataclass
class LogState:
  """What a checkpoint carries beside the train state (in its step metadata) so that a resumed run
  logs and reports what an unbroken one does: the open logging window's loss (a float64 sum in
  step order, so that it does not depend on where a run was cut), the last closed window's mean
  loss (the row's train_loss), the steps and seconds behind train_img_per_s (training time
  without compilation or checkpoint saves), and the wall time of earlier processes up to their
  last checkpoint."""
  loss_sum: float = 0.0
  loss_steps: int = 0
  last_loss: float = math.nan
  timed_steps: int = 0
  timed_s: float = 0.0
  wall_s: float = 0.0

  def add_losses(self, losses) -> None:
    for loss in losses:
      self.loss_sum += float(loss)
    self.loss_steps += len(losses)

  def close_window(self) -> float:
    """The window's mean loss, kept as `last_loss`; the next window starts empty."""
    self.last_loss = self.loss_sum / self.loss_steps
    self.loss_sum, self.loss_steps = 0.0, 0
    return self.last_loss

  def img_per_s(self, batch_size: int) -> float:
    return self.timed_steps * batch_size / self.timed_s if self.timed_s else 0.0

  @classmethod
  def from_dict(cls, values: dict) -> 'LogState':
    """From `dataclasses.asdict` (JSON: floats round-trip exactly); {}: a fresh state."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


class _Progress:
  """A tqdm bar on a terminal (process 0 only); silent otherwise (the metrics file has it all)."""

  def __init__(self, total, initial, desc, enabled):
    self.bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True)

  def update(self, n=1):
    if self.bar:
      self.bar.update(n)

  def show(self, **values):
    if self.bar:
      self.bar.set_postfix(values, refresh=False)

  def close(self):
    if self.bar:
      self.bar.close()


def prepare_data(name: str, data_dir: str | None) -> None:
  """Prepares the data set once: with several processes, process 0 first while the others wait at
  a barrier; then every process checks it can read the data (a no-op on a shared data dir)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    failure = ''
    if jax.process_index() == 0:
      try:
        datasets.prepare(name, data_dir)
      except datasets.DatasetUnavailable as e:
        failure = str(e)
    multihost_utils.sync_global_devices(f'modernize: prepared {name}')
    if failure:
      raise datasets.DatasetUnavailable(failure)
  datasets.prepare(name, data_dir)


class _StopSignals:
  """SIGTERM and SIGINT while training (a context manager): each asks the loop to save the update
  in progress and stop (`stop`: Preempted or Interrupted). With several processes JAX's
  distributed runtime owns SIGTERM (its preemption notifier, started by
  jax.distributed.initialize) and tells every process the same update to save at, so that all of
  them write the same checkpoint: `requested` asks it at every update; Ctrl-C is then left as it
  is (KeyboardInterrupt)."""

  def __init__(self, multihost: bool):
    self.multihost, self.reason, self._previous = multihost, None, {}

  def __enter__(self):
    wanted = {} if self.multihost else {signal.SIGTERM: Preempted, signal.SIGINT: Interrupted}
    for sig, reason in wanted.items():
      self._previous[sig] = signal.signal(sig, lambda *_, r=reason: self._ask(r))
    return self

  def _ask(self, reason):
    self.reason = self.reason or reason

  def requested(self, done: int) -> bool:
    if self.multihost and multihost_utils.reached_preemption_sync_point(done):
      self._ask(Preempted)
    return self.reason is not None

  def stop(self, done: int):
    raise self.reason(done)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _evaluate(eval_step, state, batches) -> dict:
  """Top-1, top-5, mean loss and count over a whole split (`batches`: device batches whose padding
  is masked out, so exact on any device count)."""
  totals = {'correct1': 0, 'correct5': 0, 'loss': 0.0, 'count': 0}
  for batch in batches:
    out = jax.device_get(eval_step(state, batch))
    for k in totals:
      totals[k] += out[k]
  count = int(totals['count'])
  return {'top1': 100.0 * totals['correct1'] / count, 'top5': 100.0 * totals['correct5'] / count,
          'loss': float(totals['loss']) / count, 'count': count}


def _table_row(config, workdir, cfg, result: dict, params: int, commit: str,
               changes: str) -> dict:
  """The run's row of the step table (steptable.COLUMNS; `steps` is its count of updates)."""
  validation = config.data.validation
  return {
      'ladder': config.ladder, 'step': config.step, 'step_index': config.step_index,
      'seed': config.seed, 'data': config.data.name, 'image_size': config.data.image_size,
      'scale': config.scale.name, 'epochs': f'{config.epochs:g}', 'steps': result['updates'],
      'batch_size': config.batch_size, 'params': params,
      'gmacs': f'{count_macs(cfg, config.data.image_size) / 1e9:.6f}',
      'top1': f'{result["top1"]:.4f}', 'top5': f'{result["top5"]:.4f}',
      'test_loss': f'{result["test_loss"]:.6f}', 'train_loss': f'{result["train_loss"]:.6f}',
      'validation': validation,
      'val_top1': f'{result["val_top1"]:.4f}' if validation else '',
      'val_loss': f'{result["val_loss"]:.6f}' if validation else '',
      'train_img_per_s': f'{result["train_img_per_s"]:.2f}',
      'wall_s': f'{result["wall_s"]:.1f}', 'device_kind': jax.devices()[0].device_kind,
      'device_count': jax.device_count(), 'process_count': jax.process_count(),
      'versions': _versions(), 'git_commit': commit, 'config_hash': config_hash(config),
      'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'workdir': outputs.recorded(workdir),
      'dtype': cfg.dtype,
      'cpu_cores': len(os.sched_getaffinity(0)) if jax.default_backend() == 'cpu' else '',
      'config_changes': changes}


def _recorded(config, workdir: str, force: bool) -> dict | None:
  """Where the step table already holds this run (its config hash and seed): from this workdir,
  a result saying so (nothing to do) unless `force`; from another workdir, UsageError (a second
  row would count one run twice) unless `force`. None: train (and, with `force`, replace the
  run's row)."""
  if force or jax.process_count() > 1:   # several processes: the table's lock refuses a second row
    return None
  rows = steptable.runs_of(config.step_table, (config_hash(config), str(config.seed)))
  if not rows:
    return None
  row, line = rows[0]
  if outputs.recorded(row['workdir']) != outputs.recorded(workdir):
    raise UsageError(
        f'step table {config.step_table} already holds {steptable.describe(row)} (line {line}), '
        f'trained in workdir {row["workdir"]}: a second row would count one run twice; use that '
        'workdir, another --config.step_table, or --force to replace that row')
  return {'already_recorded': True, 'table': config.step_table, 'line': line,
          'top1': float(row['top1']), 'seed': config.seed}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       force: bool = False) -> dict:
  """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final metrics and
  appends the run's row to the step table. A run the table already holds is not trained or
  recorded again (the result says `already_recorded`) unless `force`: then it is evaluated again
  from its last checkpoint (trained, where it has none) and its row replaced. Another process
  training in `workdir` now: `workdir.RunInUse`; `workdir` holding a run of another config:
  UsageError (unless config.resume_any)."""
  start_time = time.time()
  commit = _git_commit()   # the code this process runs, not the checkout's HEAD when it ends
  validate(config, workdir)
  augment = augment_config(config)
  net_config(config, num_classes=1)   # bad flags fail here, before any data is touched
  _make_workdir(workdir)
  claim = workdirs.claim(workdir, enabled=jax.process_count() == 1)   # RunInUse: not ours now
  try:
    recorded = _recorded(config, workdir, force)
    if recorded:
      return recorded
    changes = workdirs.bind_config(
        workdir, config.to_dict(), config_hash, write=jax.process_index() == 0,
        ignored=_NOT_HASHED + tuple(f'data.{k}' for k in _NOT_HASHED_DATA),
        resume_any=config.get('resume_any', False),
        update=latest_step(str(outputs.location(workdir) / 'checkpoints')))
    return _train(config, workdir, augment, start_time, commit, changes, force)
  finally:
    if claim:
      claim.release()


def _train(config, workdir: str, augment, start_time: float, commit: str, changes: str,
           force: bool) -> dict:
  """`train_and_evaluate` once the workdir is this process's: set-up, restore, the loop, the
  evaluation, the row."""
  watch = Stopwatch()
  workdir_id = _workdir_id(workdir)
  is_main = jax.process_index() == 0

  # Set-up: the data, the network, the mesh, the compiled steps.
  data_dir = config.data.dir or None
  with watch.phase('data_s'):
    prepare_data(config.data.name, data_dir)   # DatasetUnavailable: one line on how to get it
    info = datasets.info(config.data.name, data_dir)
  validation = config.data.validation
  num_train = pipeline.split_size(info.num_train, info.num_test, 'train', validation)
  if config.data.train_examples:
    num_train = min(num_train, config.data.train_examples)
  channels = data_channels(config, info)
  cfg = net_config(config, info.num_classes, channels)
  spec = pipeline.input_spec(config.data.name, data_dir, channels)

  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  local_batch = config.batch_size // jax.process_count()

  schedule = Schedule(num_train / config.batch_size, config.epochs, paper_epochs(config))
  lr = learning_rate(config, schedule)
  tx = optimizer(config, lr, no_weight_decay(cfg))
  with watch.phase('init_s'):
    graphdef, constants, state = create_state(config, cfg, tx, replicated)

  train_step = jax.jit(make_train_step(config, graphdef, constants, tx, lr, info.num_classes,
                                       spec),
                       in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, constants, config.ema_decay > 0, spec),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  # Restore: the newest checkpoint that reads back, with its logging state.
  checkpoints = Checkpoints(outputs.location(workdir) / 'checkpoints',
                            keep=config.keep_checkpoints)
  start = 0
  with watch.phase('restore_s'):
    # CheckpointError (one line, exit 2) where there are checkpoints and none reads back.
    latest, saved, carried, notes = checkpoints.restore_latest(state)
  if latest is not None:
    state, start = saved, int(saved['step'])
  logged = LogState.from_dict(carried.get('log', {}))   # older checkpoints carry none
  if is_main:
    for note in notes:
      print(f'warning: {note}', file=sys.stderr)
    if latest is not None:
      print(f'resuming from checkpoint {latest} in {checkpoints.directory}', file=sys.stderr)
    elif notes:
      print('no complete checkpoint: starting from update 0', file=sys.stderr)

  def wall_s() -> float:   # earlier processes' up to their last checkpoint, and this one's
    return logged.wall_s + time.time() - start_time

  metrics_file = outputs.Log(outputs.location(workdir) / 'metrics.jsonl') if is_main else None

  def log(record):
    if metrics_file:
      try:
        metrics_file.write(json.dumps(record))
      except OSError as e:
        problem = outputs.storage_problem(e)
        if problem is None:
          raise
        raise UsageError(f'cannot write {metrics_file.name} ({problem})') from None

  # The loop: one update per batch; a host sync only to log or save.
  total = schedule.total_steps
  data_start = time.perf_counter()
  batches = _on_device(pipeline.train_batches(
      config.data.name, data_dir=data_dir, batch_size=local_batch,
      image_size=config.data.image_size, channels=channels, seed=config.seed,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), augment=augment,
      num_examples=config.data.train_examples or None, validation=validation,
      num_workers=data_workers(config)), batch_sharding)
  watch.add('data_s', time.perf_counter() - data_start)

  progress = _Progress(total, start, f'{config.step} seed {config.seed}', is_main)
  pending = []   # device losses of the updates since the last host sync
  # A window's speed leaves out the compilation and the checkpoint saves in it.
  window_start, window_updates, window_excluded_s = time.perf_counter(), 0, 0.0
  loop_start, compile_s, checkpoint_s = time.perf_counter(), 0.0, 0.0
  try:
    with _StopSignals(jax.process_count() > 1) as signals:
      for update in range(start, total):
        batch = next(batches)
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        if update == start:   # tracing and compiling (or loading from the cache) happened here
          compile_s = time.perf_counter() - t0
          window_excluded_s += compile_s
        pending.append(metrics['loss'])
        window_updates += 1
        progress.update()
        done = update + 1
        stopping = signals.requested(done)
        log_now = done % config.log_every_steps == 0 or done == total
        save_now = done % config.checkpoint_every_steps == 0 or done == total or stopping
        if log_now or save_now:
          # The only host sync between logs; never log or save a state that diverged.
          logged.add_losses(_finite_losses(pending, done, workdir))
          pending = []
        if log_now:
          elapsed = max(time.perf_counter() - window_start - window_excluded_s, 0.0)
          loss = logged.close_window()
          logged.timed_steps += window_updates
          logged.timed_s += elapsed
          img_s = window_updates * config.batch_size / max(elapsed, 1e-9)
          record = {'updates': done, 'epoch': done / schedule.steps_per_epoch,
                    'train_loss': loss, 'lr': float(metrics['lr']), 'img_per_s': img_s,
                    'wall_s': wall_s()}
          log(record)
          progress.show(loss=f'{loss:.4f}', lr=f'{record["lr"]:.2e}', img_s=f'{img_s:.0f}')
          window_start, window_updates, window_excluded_s = time.perf_counter(), 0, 0.0
        if save_now:
          t0 = time.perf_counter()
          carried = dataclasses.asdict(dataclasses.replace(logged, wall_s=wall_s()))
          _check_same_workdir(workdir, workdir_id)
          checkpoints.save(done, state, {'log': carried})   # returns once committed
          window_excluded_s += time.perf_counter() - t0
          checkpoint_s += time.perf_counter() - t0
          if stopping:
            signals.stop(done)
  finally:
    progress.close()
    t0 = time.perf_counter()
    checkpoints.close()
    checkpoint_s += time.perf_counter() - t0
    watch.add('compile_s', compile_s)
    watch.add('checkpoint_s', checkpoint_s)
    watch.add('train_s', time.perf_counter() - loop_start - compile_s - checkpoint_s)

  # Evaluate: whole splits.
  def split_batches(split: str):
    return _on_device(pipeline.eval_batches(
        config.data.name, data_dir=data_dir, batch_size=local_batch,
        image_size=config.data.image_size, channels=channels,
        process_index=jax.process_index(), process_count=jax.process_count(), split=split,
        validation=validation, num_examples=config.data.test_examples or None,
        num_workers=data_workers(config)), batch_sharding)

  eval_start = time.perf_counter()
  test = _evaluate(eval_step, state, split_batches('test'))
  result = {'updates': total, 'top1': test['top1'], 'top5': test['top5'],
            'test_loss': test['loss'], 'test_examples': test['count'],
            'train_loss': logged.last_loss,
            'train_img_per_s': logged.img_per_s(config.batch_size)}
  if validation:
    val = _evaluate(eval_step, state, split_batches('validation'))
    result.update({'val_top1': val['top1'], 'val_top5': val['top5'], 'val_loss': val['loss'],
                   'val_examples': val['count']})
  watch.add('eval_s', time.perf_counter() - eval_start)
  result['wall_s'] = wall_s()
  result['times'] = watch.summary()
  log(result)
  if metrics_file:
    metrics_file.close()

  # Record: the run's one row.
  if is_main:
    params = count_params(nnx.merge(graphdef, state['params'], state['batch_stats'], constants))
    row = _table_row(config, workdir, cfg, result, params, commit, changes)
    replaced = steptable.append_row(config.step_table, row, replace=force)
    if replaced:
      result['replaced_lines'] = replaced
  return result


# --- command line ---------------------------------------------------------------------------------

def quiet_libraries() -> None:
  """Orbax reports routine events (e.g. a save waiting for the previous one) as absl warnings;
  the command lines show errors only."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)


def enable_compilation_cache() -> None:
  """Reuses compiled train steps across runs (seeds of one step, resumed runs): a step's compile
  takes 5-30 s on a small CPU. Off with MODERNIZE_COMPILATION_CACHE=0."""
  directory = os.environ.get('MODERNIZE_COMPILATION_CACHE',
                             os.path.join(os.path.expanduser('~'), '.cache', 'modernize', 'jax'))
  if directory in ('', '0'):
    return
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # The depthwise conv's custom_partitioning would otherwise put a per-process pointer into the
  # cache key of every multi-device program, so that the cache never hits.
  jax.config.update('jax_remove_custom_partitioning_ptr_from_cache_key', True)


def parse_flags(argv):
  """(config, flag values) from a trainer command line (argv[0] is the program); UsageError on
  bad flags. The ladder runner resolves its configs through here, exactly as the trainer does."""
  from absl import flags
  from ml_collections import config_flags

  flag_values = flags.FlagValues()
  # sys_argv: config_flags registers the --config.FIELD overrides it finds in these arguments.
  config_flags.DEFINE_config_file('config', None, 'configs/ladder.py:STEP[,options]',
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None,
                      'directory for checkpoints, metrics and config: local or gs://',
                      flag_values=flag_values)
  flags.DEFINE_bool('force', False,
                    'a run the step table already holds: evaluate it again from its last '
                    'checkpoint (train it where it has none) and replace its row',
                    flag_values=flag_values)
  flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() (multi-host)',
                    flag_values=flag_values)
  flags.DEFINE_string('coordinator', None, 'host:port of process 0 (when not auto-detected)',
                      flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None, 'number of processes (with --coordinator)',
                       flag_values=flag_values)
  flags.DEFINE_integer('process_id', None, 'this process (with --coordinator)',
                       flag_values=flag_values)
  try:
    flag_values(argv)
    config = flag_values.config
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections reports unknown keys and wrong types through these.
    raise UsageError(f'bad config override: {e}') from None
  if config is None:
    raise UsageError('--config is required, e.g. --config configs/ladder.py:convnext_t')
  if not flag_values.workdir:
    raise UsageError('--workdir is required')
  return config, flag_values


def main(argv=None) -> int:
  from experiments.cli import EXPECTED

  argv = list(sys.argv if argv is None else argv)
  # Before JAX starts its threads: reuse freed memory instead of page-faulting every step's
  # buffers back in (experiments/malloc.py; MODERNIZE_MALLOC_TUNING=0 turns it off). A CPU fast
  # path: not where JAX will run on a GPU/TPU (modernize.backend).
  if backend.host_fast_paths():
    keep_freed_memory()
  quiet_libraries()
  enable_compilation_cache()
  try:
    config, flag_values = parse_flags(argv)
    if flag_values.distributed:
      kwargs = {}
      if flag_values.coordinator:
        kwargs = dict(coordinator_address=flag_values.coordinator,
                      num_processes=flag_values.num_processes, process_id=flag_values.process_id)
      jax.distributed.initialize(**kwargs)
    result = train_and_evaluate(config, flag_values.workdir, force=flag_values.force)
  except (*EXPECTED, datasets.DatasetUnavailable, TrainingDiverged) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except workdirs.RunInUse as e:
    print(f'error: {e}', file=sys.stderr)
    return workdirs.IN_USE_EXIT
  except Preempted as e:
    print(f'preempted: checkpoint saved at update {e}; run the same command again to resume',
          file=sys.stderr)
    return 143
  except Interrupted as e:
    print(f'interrupted: checkpoint saved at update {e}; run the same command again to resume',
          file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print('interrupted (before or after training: nothing new saved); run the same command '
          'again to resume', file=sys.stderr)
    return 130
  if jax.process_index() != 0:
    return 0
  if result.get('already_recorded'):
    print(f'{config.step} seed {config.seed} is already in the step table {result["table"]} '
          f'(line {result["line"]}, top-1 {result["top1"]:.2f}): nothing to do (--force '
          'evaluates it again and replaces that row)')
    return 0
  if result.get('replaced_lines'):
    print(f'replaced line(s) {result["replaced_lines"]} of {config.step_table} with this run\'s '
          'new row', file=sys.stderr)
  print(json.dumps({'step': config.step, 'seed': config.seed, **result}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
