"""Where a run's training data lives (`data.placement`) and, with the data on the device, how the
trainer feeds it: several updates per dispatch (`steps_per_dispatch`).

* **host** (the input pipeline, experiments/data/pipeline.py): batches built on the host, one
  update per dispatch.
* **device**: an in-memory training split (uint8, resized once as the host pipeline does) and its
  labels are uploaded once, replicated; one compiled program takes the state, the split and the
  example indices and augmentation parameters of up to `CAPACITY` updates (the host computes them:
  the same (seed, step) indices as the pipeline, `augment.py`'s draws through
  `device_augment.host_params`), and runs n of them in a `lax.fori_loop` whose trip count is an
  argument: each update gathers and augments its batch on the device
  (`device_augment.train_batch`) and applies the train step (`state.make_train_step`, unchanged).
  Its inputs have the same shapes for every n, so it is one compiled program, and the updates are
  bitwise those of n = 1 dispatched n times (tests/test_placement.py); a `lax.scan` over n batches
  of shape (n, B) is not (another program per n, and XLA's float work differs between them).
  Dispatches end on every logging and checkpoint boundary and at the end (`dispatches`), so a run
  logs, saves and stops on the updates it does with one update per dispatch. Evaluation uploads
  each split's padded batches once and evaluates them with the same eval step.
* **auto**: device where JAX runs on an accelerator, one process drives it, the data set is held in
  memory, the recipe's augmentations all run on the device and the uint8 split takes under a
  quarter of the device's memory; else host. On the CPU always host, so CPU runs and their numbers
  are unchanged.

The device batches equal the host pipeline's exactly on Fashion-MNIST; on RGB data the two
resamplers (random-resized crop, RandAugment's warps) round a rare value one grey level apart
(tests/test_device_augment.py). The programs differ, so device and host runs are not bitwise equal.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.cli import UsageError
from experiments.data import augment as aug
from experiments.data import device_augment, pipeline

PLACEMENTS = ('auto', 'host', 'device')
CAPACITY = 32   # the most updates one dispatch runs (the program's input buffers hold this many)


def field_problems(config) -> list[str]:
  """The problems of `data.placement` and `steps_per_dispatch` found before any data is read."""
  placement, k = config.data.get('placement', 'auto'), config.get('steps_per_dispatch', 1)
  problems = []
  if placement not in PLACEMENTS:
    problems.append(f'data.placement={placement!r} must be {", ".join(PLACEMENTS[:-1])} or '
                    f'{PLACEMENTS[-1]}')
  if not 1 <= k <= CAPACITY:
    problems.append(f'steps_per_dispatch={k} must be between 1 and {CAPACITY}')
  elif k > 1 and placement == 'host':
    problems.append(f'steps_per_dispatch={k} needs the data on the device: with '
                    'data.placement=host each update is dispatched on its own')
  return problems


def device_problem(config, info, augment: pipeline.AugmentConfig, channels: int) -> str | None:
  """Why the training data of `config` cannot be placed on the device (None: it can)."""
  if jax.process_count() > 1:
    return f'{jax.process_count()} processes (the data goes on the device of one process only)'
  try:
    device_augment.for_dataset(info.name, data_dir=config.data.dir or None,
                               image_size=config.data.image_size, channels=channels,
                               augment=augment)
  except ValueError as e:
    return str(e)
  return None


def split_bytes(info, num_train: int, image_size: int, augment: pipeline.AugmentConfig) -> int:
  """The uint8 bytes of the training split as it is uploaded (`pipeline.TrainBatches.arrays`)."""
  h, w, c = info.image_shape
  side = (h * w) if augment.random_resized_crop else image_size * image_size
  return num_train * side * c


def _device_memory() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # a backend without memory statistics
    stats = {}
  return stats.get('bytes_limit')


def resolve(config, info, num_train: int, channels: int) -> str:
  """'host' or 'device': `data.placement` resolved (auto: see the module's docstring).
  UsageError, one line, where 'device' is asked for and cannot be, or where steps_per_dispatch > 1
  resolves to host."""
  asked = config.data.get('placement', 'auto')
  k = config.get('steps_per_dispatch', 1)
  augment = _augment(config)
  if asked == 'host':
    return 'host'
  if asked == 'auto' and jax.default_backend() == 'cpu':
    problem = 'JAX runs on the CPU'
  else:
    problem = device_problem(config, info, augment, channels)
  if asked == 'device':
    if problem:
      raise UsageError(f'data.placement=device: {problem}')
    return 'device'
  if problem is None:
    memory, size = _device_memory(), split_bytes(info, num_train, config.data.image_size, augment)
    if not memory or size > memory / 4:
      problem = (f'the training split ({size / 2**20:.0f} MiB) is not under a quarter of the '
                 'device memory' + (f' ({memory / 2**20:.0f} MiB)' if memory else ' (unknown)'))
  if problem is None:
    return 'device'
  if k > 1:
    raise UsageError(f'steps_per_dispatch={k} needs the data on the device, and '
                     f'data.placement=auto chose host: {problem}')
  return 'host'


def _augment(config) -> pipeline.AugmentConfig:
  from experiments.training.runconfig import augment_config  # pylint: disable=import-outside-toplevel
  return augment_config(config)


def dispatches(start: int, total: int, k: int, *intervals: int) -> Iterator[tuple[int, int]]:
  """(first update, n) of each dispatch from update `start` to `total`: n = k, or fewer where a
  multiple of one of `intervals` (logging, checkpoints) or the end comes first, so that every
  such boundary ends a dispatch."""
  update = start
  while update < total:
    n = min(k, total - update, *(every - update % every for every in intervals))
    yield update, n
    update += n


class DeviceFeed:
  """The training split on the device and the program that trains on it: `feed(state, first, n)`
  runs updates first, ..., first + n - 1 (n <= CAPACITY) in one dispatch and returns (state,
  metrics: 'loss' (CAPACITY,), its first n entries the updates' losses; 'lr' of the last). The
  state is donated."""

  def __init__(self, builder: pipeline.TrainBatches, transform: device_augment.DeviceTransform,
               train_step, mesh):
    self.builder, self.transform = builder, transform
    replicated = NamedSharding(mesh, P())
    self.stacked = NamedSharding(mesh, P(None, 'data'))   # (CAPACITY, B, ...): a batch per update
    images, labels = builder.arrays()
    self.height, self.width = images.shape[1:3]
    self.images = jax.device_put(images, replicated)       # once
    self.labels = jax.device_put(labels, replicated)
    batch_sharding = NamedSharding(mesh, P('data'))

    def program(state, images, labels, indices, params, n):
      def body(i, carry):
        state, losses, _ = carry
        batch = device_augment.train_batch(images, indices[i], jax.tree.map(lambda p: p[i], params),
                                           transform, labels=labels)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        state, metrics = train_step(state, batch)
        return state, losses.at[i].set(metrics['loss']), metrics['lr'].astype(jnp.float32)
      carry = (state, jnp.zeros((CAPACITY,), jnp.float32), jnp.zeros((), jnp.float32))
      state, losses, lr = jax.lax.fori_loop(0, n, body, carry)
      return state, {'loss': losses, 'lr': lr}

    self.function = program   # unjitted: experiments/bench/seeds.py maps it over seeds
    self.program = jax.jit(
        program, in_shardings=(replicated, replicated, replicated, self.stacked, self.stacked,
                               replicated),
        out_shardings=(replicated, replicated), donate_argnums=(0,))

  def host_inputs(self, first: int, n: int, builder: pipeline.TrainBatches | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(example indices (CAPACITY, B) int32, augmentation parameters (CAPACITY, B, ...)) of updates
    first, ..., first + n - 1, zero past the n-th: the pipeline's indices and augment.py's draws
    for the same stream positions (of `builder`'s stream, another seed's over the same split;
    default this feed's)."""
    if not 1 <= n <= CAPACITY:
      raise ValueError(f'{n} updates in one dispatch: must be between 1 and {CAPACITY}')
    builder = self.builder if builder is None else builder
    rows, positions = zip(*(builder.indices(u) for u in range(first, first + n)))
    positions = np.stack(positions)
    batch = positions.shape[1]
    keys = aug.example_keys(builder.spec.seed, positions.reshape(-1))
    params = device_augment.host_params(keys, self.transform, self.height, self.width)

    def padded(x):
      x = np.asarray(x).reshape(n, batch, *np.shape(x)[1:])
      return np.concatenate([x, np.zeros((CAPACITY - n, *x.shape[1:]), x.dtype)])
    return (padded(np.stack(rows).reshape(-1).astype(np.int32)),
            {k: padded(v) for k, v in params.items()})

  def __call__(self, state, first: int, n: int):
    indices, params = self.host_inputs(first, n)
    return self.program(state, self.images, self.labels, indices, params, np.int32(n))


def device_eval_batches(batches: Iterator[dict], mesh, batch_sharding) -> Iterator[dict]:
  """A split's padded eval batches (`pipeline.eval_batches`) uploaded at once, then yielded one
  after another as device batches with `batch_sharding` (what the eval step takes): the same
  values as the host path's, so the same eval results."""
  host = list(batches)
  if not host:
    return
  stacked = {k: np.stack([b[k] for b in host]) for k in host[0]}
  on_device = jax.device_put(stacked, NamedSharding(mesh, P(None, 'data')))
  take = jax.jit(lambda arrays, k: jax.tree.map(lambda a: a[k], arrays),
                 out_shardings=batch_sharding)
  for k in range(len(host)):
    yield take(on_device, np.int32(k))
