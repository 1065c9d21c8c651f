"""Orbax checkpoints behind a few calls, so the rest of the code never touches orbax's API.

Saves are synchronous: `save` returns once orbax has written the step into a temporary directory
and renamed it, so a checkpoint that exists is complete and a kill loses at most the steps since
the last save. Beside the arrays, a checkpoint keeps a small JSON dict (orbax's step metadata).
`restore_latest` resumes from the newest checkpoint that reads back whole: newer ones that do not
(an unreadable or truncated file, missing metadata, an interrupted save's temporary directory) are
named in one line each and moved to CHECKPOINTS.corrupt; when none reads back, CheckpointError
says how to start over. Every process of a multi-host run calls these functions; orbax
coordinates the hosts.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from experiments import outputs
from experiments.cli import UsageError

# Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames it to `<step>` when whole.
_TMP_SUFFIX = '.orbax-checkpoint-tmp'
# On gs:// orbax writes a step in place (no rename) and writes this file in it last, when whole.
_COMMITTED = 'commit_success.txt'


class CheckpointError(UsageError):
  """A run has checkpoints and none reads back: one line on how to start over, exit code 2."""


class _Unreadable(Exception):
  """Why one checkpoint does not read back (the message is the reason)."""


@contextlib.contextmanager
def _quiet():
  """Silences what orbax, asyncio and abandoned coroutines print while a bad checkpoint is read
  (the caller reports it in one line)."""
  previous, hook = logging.root.manager.disable, sys.unraisablehook
  logging.disable(logging.CRITICAL)
  sys.unraisablehook = lambda _: None
  try:
    yield
  finally:
    gc.collect()   # the failed reads' futures and coroutines report their errors when collected
    logging.disable(previous)
    sys.unraisablehook = hook


def _silence_the_rest() -> None:
  """For a run that ends on a checkpoint error: orbax's and tensorstore's failed background work
  reports the same error again when it is collected or its threads wind down at exit (through
  logging, the unraisable hook, a bare traceback printed via sys.excepthook, or a warning about a
  coroutine never awaited), in up to hundreds of lines; the one-line error has said it."""
  logging.disable(logging.CRITICAL)
  warnings.simplefilter('ignore')
  sys.unraisablehook = lambda _: None
  sys.excepthook = lambda *_: None


def _reason(e: BaseException) -> str:
  """An exception as a short one-line reason."""
  first = (str(e).strip().splitlines() or [''])[0]
  if isinstance(e, _Unreadable):
    return first
  text = f'{type(e).__name__}: {first}' if first else type(e).__name__
  return text if len(text) <= 120 else text[:117] + '...'


def _target(x):
  """What a leaf restores as: an array of its shape, dtype and sharding."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f'modernize: {name}')


class Checkpoints:
  def __init__(self, directory, *, keep: int = 2):
    """`directory`: a local path or a gs:// URL (str or etils.epath.Path)."""
    self.directory = outputs.location(directory)
    # Synchronous: an async save becomes a checkpoint only when orbax's background thread renames
    # it, steps later, and a kill before that loses a second interval. The handler is named up
    # front: only so does a fresh manager read a checkpoint's tree metadata.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, step: int, tree, metadata: dict | None = None) -> None:
    """Writes `tree` (arrays) and `metadata` (JSON values, kept in orbax's step metadata) as
    checkpoint `step`; returns once the checkpoint is committed."""
    existed = (self.directory / str(step)).is_dir()
    try:
      with _quiet():
        self.manager.save(step, args=ocp.args.StandardSave(tree),
                          custom_metadata=metadata or {}, force=True)
    except Exception as e:  # pylint: disable=broad-except
      problem = outputs.storage_problem(e)
      if problem is None:
        raise   # not the storage: a bug, with its traceback
      self._remove_partial(step, keep_whole=existed)
      _silence_the_rest()
      raise CheckpointError(f'cannot write checkpoint {step} in {self.directory} ({problem}); '
                            'the checkpoints saved before it are kept') from None

  def _remove_partial(self, step: int, keep_whole: bool) -> None:
    """Removes what a failed save of `step` left (process 0), so no part of it is taken for a
    checkpoint; `keep_whole`: checkpoint `step` existed before this save and stays."""
    if jax.process_index() != 0:
      return
    for name in outputs.names(self.directory):
      if (name == str(step) and not keep_whole) or name.startswith(f'{step}{_TMP_SUFFIX}'):
        with contextlib.suppress(OSError):
          (self.directory / name).rmtree()

  def metadata(self, step: int) -> dict:
    """The `metadata` checkpoint `step` was saved with ({} for one saved without)."""
    return dict(self.manager.metadata(step).custom_metadata or {})

  def _read(self, step: int, like):
    if self.manager.metadata(step).commit_timestamp_nsecs is None:
      raise _Unreadable('its step metadata is missing or unreadable')
    if self.manager.item_metadata(step) is None:
      raise _Unreadable('its tree metadata is missing or unreadable')
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(jax.tree.map(_target, like)))
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(f'its arrays do not read back: {_reason(e)}') from None

  def restore_latest(self, like) -> tuple[int | None, object, dict, list]:
    """(step, tree, metadata, notes): the newest checkpoint that reads back into the structure,
    dtypes and shardings of `like` (arrays or ShapeDtypeStructs), what it was saved with, and one
    line per checkpoint set aside. (None, None, {}, notes) where no save was ever completed;
    CheckpointError where there are checkpoints and none reads back."""
    aside = [n for n in outputs.names(self.directory) if _TMP_SUFFIX in n]
    notes = [f'checkpoint {n.split(".")[0]} in {self.directory} is an interrupted save '
             f'({n}); moved to {self.directory}.corrupt' for n in aside]
    failed, found = [], None
    with _quiet():
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          found = step, self._read(step, like), self.metadata(step)
          break
        except Exception as e:  # pylint: disable=broad-except   # whatever keeps it from reading
          failed.append((step, _reason(e)))
    if failed and found is None:
      step, reason = failed[0]
      _silence_the_rest()
      raise CheckpointError(
          f'no checkpoint in {self.directory} reads back (the newest, step {step}: {reason}); '
          f'to start over from step 0, delete {self.directory}')
    for step, reason in failed:
      notes.append(f'checkpoint {step} in {self.directory} is unreadable ({reason}); '
                   f'moved to {self.directory}.corrupt')
      aside.append(str(step))
    if aside:
      self._set_aside(aside)
    return (*found, notes) if found else (None, None, {}, notes)

  def _set_aside(self, names: list) -> None:
    """Moves step directories to DIRECTORY.corrupt, out of orbax's sight (process 0 moves)."""
    _sync('checkpoints read')
    if jax.process_index() == 0:
      target = self.directory.parent / f'{self.directory.name}.corrupt'
      target.mkdir(parents=True, exist_ok=True)
      for name in names:
        destination = target / name
        if destination.exists():
          destination.rmtree()
        (self.directory / name).rename(destination)
    _sync('checkpoints set aside')
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _complete(step_dir) -> bool:
  """Whether `step_dir` is a whole checkpoint: a STEP directory (a local save is renamed to it
  when whole), on gs:// also holding orbax's commit mark."""
  if not step_dir.name.isdigit():
    return False
  return not outputs.is_remote(step_dir) or (step_dir / _COMMITTED).exists()


def latest_step(directory) -> int | None:
  """The newest complete checkpoint in `directory` (a local path or a gs:// URL), or None."""
  directory = outputs.location(directory)
  return max((int(n) for n in outputs.names(directory) if _complete(directory / n)), default=None)


def load_numpy(directory, step: int | None = None) -> tuple[int, dict]:
  """(step, state) of a run's checkpoint as nested dicts of numpy arrays, on any topology (e.g. a
  checkpoint written by 8 devices or 2 hosts, read by one process). `step` None: the latest
  complete one. `directory`: a local path or a gs:// URL."""
  import numpy as np

  directory = outputs.location(directory)
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
  path = directory / str(step) / 'default'
  # orbax warns that the item directory has no step metadata of its own; that is expected here.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.metadata(path).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    absl_logging.set_verbosity(verbosity)
  return step, state


def load_trained_model(workdir: str, step: int | None = None):
  """The network a run of `experiments.train` left in `workdir`, in eval mode, with its config.

  Returns (model, config dict). Uses WORKDIR/config.json and WORKDIR/checkpoints (the latest step
  unless `step` is given); the number of classes and of input channels are read off the weights.
  `workdir`: a local path or a gs:// URL.
  """
  import json

  from flax import nnx

  from modernize import presets
  from modernize.config import NetConfig
  from modernize.network import build

  workdir = outputs.location(workdir)
  config = json.loads((workdir / 'config.json').read_text())
  _, saved = load_numpy(workdir / 'checkpoints', step)
  params, image_size = saved['params'], config['data']['image_size']
  # Classes and input channels may be 'from the data' (-1) in the config: read them off the weights.
  values = dict(config['model'])
  arch = values.pop('arch', None)
  if arch is None:   # a step of the ladder
    cfg = NetConfig.from_dict(dict(
        values, depths=tuple(values['depths']),
        num_classes=params['head']['fc']['bias']['value'].shape[0],
        in_channels=params['stem']['conv']['kernel']['value'].shape[2]))
  else:              # a transformer reference (experiments.train's net_config)
    head = params['head']['fc'] if arch == 'swin_t' else params['head']
    cfg = presets.preset(arch, **dict(
        values, img_size=image_size, num_classes=head['bias']['value'].shape[0],
        in_channels=params['patch_embed']['proj']['kernel']['value'].shape[2]))
  # The network's structure without computing an initialisation (it would be overwritten): the
  # weights and statistics come from the checkpoint, the DropPath random state (unused in eval
  # mode) is a fixed key.
  graphdef, params, batch_stats, rest = nnx.split(
      nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), image_size=image_size)),
      nnx.Param, nnx.BatchStat, ...)

  def lookup(tree, path):
    for key in path:
      name = getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key)))
      tree = tree[str(name)]
    return tree['value'] if isinstance(tree, dict) else tree

  def concrete(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    return jax.numpy.zeros(leaf.shape, leaf.dtype)

  def restored(state, name):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.numpy.asarray(lookup(saved[name], path)), state)

  model = nnx.merge(graphdef, restored(params, 'params'), restored(batch_stats, 'batch_stats'),
                    jax.tree.map(concrete, rest))
  model.eval()
  return model, config
