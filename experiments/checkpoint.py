"""Orbax checkpoints behind three calls, so the rest of the code never touches orbax's API.

Saves are periodic and keep the newest N; orbax writes each into a temporary directory and renames
it when complete, so a run killed mid-save resumes from the previous checkpoint. Every process of a
multi-host run calls these functions; orbax coordinates the hosts.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging


class Checkpoints:
  def __init__(self, directory: str, *, keep: int = 2):
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, *, wait: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, like):
    """Restores into the structure, dtypes and shardings of `like` (arrays or ShapeDtypeStructs)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_numpy(directory: str, step: int | None = None) -> tuple[int, dict]:
  """(step, state) of a run's checkpoint as nested dicts of numpy arrays, on any topology (e.g. a
  checkpoint written by 8 devices or 2 hosts, read by one process). `step` None: the latest."""
  import os

  import numpy as np

  if step is None:
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    step = max(steps)
  path = os.path.join(os.path.abspath(directory), str(step), 'default')   # orbax wants absolute
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
  """
  import json
  import os

  from flax import nnx

  from modernize.config import NetConfig
  from modernize.network import create_model

  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  _, saved = load_numpy(os.path.join(workdir, 'checkpoints'), step)
  # Classes and input channels may be 'from the data' (-1) in the config: read them off the weights.
  values = dict(config['model'], depths=tuple(config['model']['depths']),
                num_classes=saved['params']['head']['fc']['bias']['value'].shape[0],
                in_channels=saved['params']['stem']['conv']['kernel']['value'].shape[2])
  model = create_model(NetConfig.from_dict(values))

  def lookup(tree, path):
    for key in path:
      name = getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key)))
      tree = tree[str(name)]
    return tree['value'] if isinstance(tree, dict) else tree

  for kind, name in ((nnx.Param, 'params'), (nnx.BatchStat, 'batch_stats')):
    state = nnx.state(model, kind)
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda path, _: jax.numpy.asarray(lookup(saved[name], path)), state))
  model.eval()
  return model, config
