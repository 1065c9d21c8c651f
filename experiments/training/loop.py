"""Train one ladder step (one config) in a workdir and append its row to the step table:
`train_and_evaluate`, in its phases (set-up, restore, the loop, evaluation, the row).

The train step is a plain `jax.jit` over the `nnx.split` state with explicit shardings over a 1-D
'data' mesh of every device of every host: the batch is split, the state replicated and donated.
BatchNorm statistics under that sharding are global (synchronised BN). With the data on the
device (`data.placement`, experiments/training/placement.py) one program runs several updates per
dispatch (`steps_per_dispatch`), each gathering and augmenting its batch there. Runs resume from
the newest checkpoint in WORKDIR/checkpoints that reads back, with the logging state it carries
(`LogState`), so a resumed run writes the row an unbroken one does; SIGTERM saves a checkpoint and
exits 143 (on several processes, every process saves the same update, agreed through JAX's
preemption service), Ctrl-C saves one and exits 130. Writes WORKDIR/config.json,
WORKDIR/metrics.jsonl (one JSON line per logging step) and a row of the step table (default
runs/steps.csv).
"""

from __future__ import annotations

import collections
import dataclasses
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
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import outputs
from experiments.cli import UsageError
from experiments.data import datasets, device_augment, pipeline
from experiments.training import placement as placements
from experiments.training import steptable
from experiments.training import workdir as workdirs
from experiments.training.checkpoint import Checkpoints, latest_step
from experiments.training.recipe import (
  Schedule,
  learning_rate,
  no_weight_decay,
  optimizer,
  paper_epochs,
)
from experiments.training.runconfig import (
  _NOT_HASHED,
  _NOT_HASHED_DATA,
  augment_config,
  config_hash,
  data_channels,
  data_worker_kind,
  data_workers,
  net_config,
  validate,
)
from experiments.training.state import create_state, make_eval_step, make_train_step
from modernize.flops import count_macs
from modernize.network import count_params


class TrainingDiverged(Exception):
  """The loss became NaN or infinite; checkpoints saved before it (all good) are kept."""


class Preempted(Exception):
  """SIGTERM arrived during training; a checkpoint was saved."""


class Interrupted(Exception):
  """Ctrl-C (SIGINT) arrived during training; a checkpoint was saved."""


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
  """The losses of the updates up to `done` (host values; `window`: (device losses, the first how
  many are updates) per dispatch), or TrainingDiverged at the first bad one."""
  values = jax.device_get([losses for losses, _ in window])
  losses = np.concatenate([np.reshape(v, -1)[:n] for v, (_, n) in zip(values, window)])
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
               changes: str, placement: str) -> dict:
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
      'config_changes': changes, 'placement': placement}


def _recorded(config, workdir: str, force: bool) -> dict | None:
  """Where the step table already holds this run (its config hash, seed and workdir): a result
  saying so (nothing to do) unless `force`. None: train (with `force`, then replace the row)."""
  if force or jax.process_count() > 1:   # several processes: the table's lock refuses a second row
    return None
  key = (config_hash(config), str(config.seed), outputs.recorded(workdir))
  rows = steptable.runs_of(config.step_table, key)
  if not rows:
    return None
  row, line = rows[0]
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
  augment_config(config)              # bad augmentation values fail here,
  net_config(config, num_classes=1)   # and bad flags, before any data is touched
  workdirs.make(workdir)
  claim = workdirs.claim(workdir, enabled=jax.process_count() == 1)   # RunInUse: not ours now
  try:
    recorded = _recorded(config, workdir, force)
    if recorded:
      return recorded
    binding = workdirs.check_config(
        workdir, config.to_dict(), config_hash,
        ignored=_NOT_HASHED + tuple(f'data.{k}' for k in _NOT_HASHED_DATA),
        resume_any=config.get('resume_any', False))
    return _train(config, workdir, start_time, commit, binding, force)
  finally:
    if claim:
      claim.release()


@dataclasses.dataclass
class _SetUp:
  """What a run's set-up builds: the data's description, the network, the schedule, the compiled
  steps and the initial state."""
  info: datasets.DataInfo
  cfg: object
  channels: int
  spec: pipeline.InputSpec | None
  batch_sharding: NamedSharding
  local_batch: int
  schedule: Schedule
  graphdef: object
  constants: object
  state: dict
  train_step: object
  eval_step: object
  mesh: object
  placement: str                          # data.placement resolved: 'host' or 'device'
  feed: placements.DeviceFeed | None      # with the data on the device: its training program


def _set_up(config, watch: Stopwatch) -> _SetUp:
  """The data (prepared once), the network, the mesh, the schedule, the initial state and the
  compiled train and eval steps."""
  data_dir = config.data.dir or None
  with watch.phase('data_s'):
    prepare_data(config.data.name, data_dir)   # DatasetUnavailable: one line on how to get it
    info = datasets.info(config.data.name, data_dir)
  num_train = pipeline.split_size(info.num_train, info.num_test, 'train', config.data.validation)
  if config.data.train_examples:
    num_train = min(num_train, config.data.train_examples)
  channels = data_channels(config, info)
  cfg = net_config(config, info.num_classes, channels)
  spec = pipeline.input_spec(config.data.name, data_dir, channels)
  placement = placements.resolve(config, info, num_train, channels)   # UsageError: one line

  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))

  schedule = Schedule(num_train / config.batch_size, config.epochs, paper_epochs(config))
  lr = learning_rate(config, schedule)
  tx = optimizer(config, lr, no_weight_decay(cfg))
  with watch.phase('init_s'):
    graphdef, constants, state = create_state(config, cfg, tx, replicated)
  step_fn = make_train_step(config, graphdef, constants, tx, lr, info.num_classes, spec)
  train_step = jax.jit(step_fn, in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(graphdef, constants, config.ema_decay > 0, spec),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  feed = None
  if placement == 'device':
    with watch.phase('data_s'):   # the split loaded and uploaded once
      transform = device_augment.for_dataset(
          config.data.name, data_dir=data_dir, image_size=config.data.image_size,
          channels=channels, augment=augment_config(config))
      feed = placements.DeviceFeed(pipeline.train_builder(**_train_stream(config, channels)),
                                   transform, step_fn, mesh)
  return _SetUp(info, cfg, channels, spec, batch_sharding,
                config.batch_size // jax.process_count(), schedule, graphdef, constants, state,
                train_step, eval_step, mesh, placement, feed)


def _restore(checkpoints: Checkpoints, state: dict, watch: Stopwatch,
             is_main: bool) -> tuple[dict, int, LogState]:
  """(state, first update, logging state) from the newest checkpoint that reads back, or the
  initial state at update 0; each checkpoint set aside is named on stderr."""
  start = 0
  with watch.phase('restore_s'):
    # CheckpointError (one line, exit 2) where there are checkpoints and none reads back.
    latest, saved, carried, notes = checkpoints.restore_latest(state)
  if latest is not None:
    state, start = saved, int(saved['step'])
  if is_main:
    for note in notes:
      print(f'warning: {note}', file=sys.stderr)
    if latest is not None:
      print(f'resuming from checkpoint {latest} in {checkpoints.directory}', file=sys.stderr)
    elif notes:
      print('no complete checkpoint: starting from update 0', file=sys.stderr)
  return state, start, LogState.from_dict(carried.get('log', {}))   # older ones carry none


def _train_stream(config, channels: int) -> dict:
  """What determines this process's training batches (`pipeline.train_builder`'s arguments)."""
  return dict(
      name=config.data.name, data_dir=config.data.dir or None,
      batch_size=config.batch_size // jax.process_count(), image_size=config.data.image_size,
      channels=channels, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), augment=augment_config(config),
      num_examples=config.data.train_examples or None, validation=config.data.validation)


def train_batches(config, channels: int, start: int = 0) -> Iterator[dict]:
  """The host batches a run trains on from update `start` (this process's share of each global
  batch): the training loop's one call of the input pipeline."""
  return pipeline.train_batches(
      **_train_stream(config, channels), start_step=start, num_workers=data_workers(config),
      worker_kind=data_worker_kind(config))


def _updates(config, run: _SetUp, start: int):
  """(dispatches: (first update, n) ..., feed(state, first, n) -> (state, metrics)): how the loop
  runs its updates. Host: one per dispatch, each from the input pipeline's next batch. Device:
  up to steps_per_dispatch per dispatch (`placement.dispatches`), the data on the device."""
  total = run.schedule.total_steps
  if run.feed is not None:
    k = config.get('steps_per_dispatch', 1)
    return (placements.dispatches(start, total, k, config.log_every_steps,
                                  config.checkpoint_every_steps), run.feed)
  batches = _on_device(train_batches(config, run.channels, start), run.batch_sharding)

  def feed(state, first, n):
    del first, n   # one update: the pipeline's batches come in order
    return run.train_step(state, next(batches))
  return placements.dispatches(start, total, 1), feed


def _train_loop(config, workdir: str, run: _SetUp, state: dict, start: int, logged: LogState,
                checkpoints: Checkpoints, log, wall_s, watch: Stopwatch) -> dict:
  """Updates `start` to the end, one per batch, in dispatches of one or more updates (`_updates`)
  that end on every logging and checkpoint boundary: a host sync only to log or save; checkpoints
  on their interval, at the end and when SIGTERM or Ctrl-C asks (then Preempted / Interrupted,
  after the dispatch in flight). Returns the final state."""
  total = run.schedule.total_steps
  is_main = jax.process_index() == 0
  workdir_id = workdirs.identity(workdir)
  data_start = time.perf_counter()
  chunks, feed = _updates(config, run, start)
  watch.add('data_s', time.perf_counter() - data_start)

  progress = _Progress(total, start, f'{config.step} seed {config.seed}', is_main)
  pending = []   # (device losses, how many are updates) of the dispatches since the last sync
  # A window's speed leaves out the compilation and the checkpoint saves in it.
  window_start, window_updates, window_excluded_s = time.perf_counter(), 0, 0.0
  loop_start, compile_s, checkpoint_s = time.perf_counter(), 0.0, 0.0
  try:
    with _StopSignals(jax.process_count() > 1) as signals:
      for first, n in chunks:
        t0 = time.perf_counter()
        state, metrics = feed(state, first, n)
        if first == start:   # tracing and compiling (or loading from the cache) happened here
          compile_s = time.perf_counter() - t0
          window_excluded_s += compile_s
        pending.append((metrics['loss'], n))
        window_updates += n
        progress.update(n)
        done = first + n
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
          record = {'updates': done, 'epoch': done / run.schedule.steps_per_epoch,
                    'train_loss': loss, 'lr': float(metrics['lr']), 'img_per_s': img_s,
                    'wall_s': wall_s()}
          log(record)
          progress.show(loss=f'{loss:.4f}', lr=f'{record["lr"]:.2e}', img_s=f'{img_s:.0f}')
          window_start, window_updates, window_excluded_s = time.perf_counter(), 0, 0.0
        if save_now:
          t0 = time.perf_counter()
          carried = dataclasses.asdict(dataclasses.replace(logged, wall_s=wall_s()))
          workdirs.check_same(workdir, workdir_id)
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
  return state


def _evaluate_splits(config, run: _SetUp, state: dict, logged: LogState) -> dict:
  """The run's result: test (and validation) top-1, top-5 and loss over whole splits, with the
  last training window's loss and the training speed."""
  def split(name: str):
    on_device = run.placement == 'device'   # the split's batches built once and uploaded at once
    batches = pipeline.eval_batches(
        config.data.name, data_dir=config.data.dir or None, batch_size=run.local_batch,
        image_size=config.data.image_size, channels=run.channels,
        process_index=jax.process_index(), process_count=jax.process_count(), split=name,
        validation=config.data.validation, num_examples=config.data.test_examples or None,
        num_workers=0 if on_device else data_workers(config),
        worker_kind=data_worker_kind(config))
    if on_device:
      return placements.device_eval_batches(batches, run.mesh, run.batch_sharding)
    return _on_device(batches, run.batch_sharding)

  test = _evaluate(run.eval_step, state, split('test'))
  result = {'updates': run.schedule.total_steps, 'top1': test['top1'], 'top5': test['top5'],
            'test_loss': test['loss'], 'test_examples': test['count'],
            'train_loss': logged.last_loss,
            'train_img_per_s': logged.img_per_s(config.batch_size)}
  if config.data.validation:
    val = _evaluate(run.eval_step, state, split('validation'))
    result.update({'val_top1': val['top1'], 'val_top5': val['top5'], 'val_loss': val['loss'],
                   'val_examples': val['count']})
  return result


def _train(config, workdir: str, start_time: float, commit: str,
           binding: workdirs.Binding, force: bool) -> dict:
  """`train_and_evaluate` once the workdir is this process's, in its phases."""
  watch = Stopwatch()
  is_main = jax.process_index() == 0
  run = _set_up(config, watch)
  checkpoints = Checkpoints(outputs.location(workdir) / 'checkpoints',
                            keep=config.keep_checkpoints)
  state, start, logged = _restore(checkpoints, run.state, watch, is_main)
  changes = binding.record(start) if is_main else ''

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

  state = _train_loop(config, workdir, run, state, start, logged, checkpoints, log, wall_s,
                      watch)
  with watch.phase('eval_s'):
    result = _evaluate_splits(config, run, state, logged)
  result['wall_s'] = wall_s()
  result['times'] = watch.summary()
  log(result)
  if metrics_file:
    metrics_file.close()

  if is_main:   # the run's one row
    params = count_params(nnx.merge(run.graphdef, state['params'], state['batch_stats'],
                                    run.constants))
    row = _table_row(config, workdir, run.cfg, result, params, commit, changes, run.placement)
    replaced = steptable.append_row(config.step_table, row, replace=force)
    if replaced:
      result['replaced_lines'] = replaced
  return result
