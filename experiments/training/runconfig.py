"""A run's config: reading it from the command line (`parse_flags`), what it builds (`net_config`,
`augment_config`, ...), its identity (`config_hash`) and the checks made before anything is read or
trained (`validate`)."""

from __future__ import annotations

import copy
import hashlib
import json
import os

import jax

from experiments import outputs
from experiments.cli import UsageError
from experiments.data import datasets, pipeline
from experiments.training import placement, steptable
from modernize import presets
from modernize.config import NetConfig, feature_size, min_image_size


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


def data_worker_kind(config) -> str | None:
  """How the input pipeline builds batches: config.data.worker_kind, where 'auto' is worker
  processes when JAX runs on an accelerator (the host must keep up with it) and the pipeline's
  default on the CPU (threads, unless $MODERNIZE_DATA_WORKER_KIND says otherwise)."""
  kind = config.data.get('worker_kind', 'auto')
  if kind != 'auto':
    return kind
  return 'processes' if jax.default_backend() != 'cpu' else None


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
# steps_per_dispatch and data.placement: the same updates, dispatched differently (bitwise for
# steps_per_dispatch; the device's batches equal the host's, up to the resamplers' rounding).
_NOT_HASHED = ('step_table', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
               'resume_any', 'steps_per_dispatch')
_NOT_HASHED_DATA = ('dir', 'threads', 'worker_kind', 'placement')


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
  if config.data.get('worker_kind', 'auto') not in ('auto', *pipeline.WORKER_KINDS):
    problems.append(f'data.worker_kind={config.data.worker_kind!r} must be auto, '
                    f'{" or ".join(pipeline.WORKER_KINDS)}')
  problems += placement.field_problems(config)
  if config.data.channels not in (0, 1, 3):
    problems.append(f'data.channels={config.data.channels} must be 0 (the data\'s own), 1 or 3')
  in_channels = config.model.get('in_channels', -1)
  if config.data.channels and in_channels not in (-1, config.data.channels):
    # The config sets model.in_channels from data.channels when it is built; an override of one
    # alone would feed a network the other number of channels.
    problems.append(f'data.channels={config.data.channels} but model.in_channels={in_channels}: '
                    f'set both (--config.model.in_channels={config.data.channels})')
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


HELP_FLAGS = ('-h', '--help', '--helpfull')


def _flag_values(argv):
  """The trainer's flags, defined (argv: for the --config.FIELD overrides it holds)."""
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
  return flag_values


def flags_help() -> str:
  """The trainer's flags, described (for --help)."""
  return _flag_values(['train']).get_help()


def parse_flags(argv):
  """(config, flag values) from a trainer command line (argv[0] is the program); UsageError on
  bad flags. The ladder runner resolves its configs through here, exactly as the trainer does."""
  from absl import flags

  flag_values = _flag_values(argv)
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
