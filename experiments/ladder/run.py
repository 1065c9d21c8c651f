"""`python -m experiments.ladder run`: train every (step, seed) of a ladder once, resumably.

Each run is a separate `python -m experiments.train` process with its workdir at
OUT/runs/<step>/seed<seed> and the shared step table OUT/steps.csv. A (step, seed) whose row is
already in the table is skipped; one that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from experiments import outputs
from experiments.cli import Stopped, UsageError
from experiments.training import steptable
from experiments.training import workdir as workdirs
from modernize import ladder as ladders
from modernize import presets

ROOT = outputs.REPOSITORY
CONFIG = os.path.join(ROOT, 'configs', 'ladder.py')


def plan(ladder_name: str, steps: list[str] | None, seeds: int, side: bool,
         references: bool = False, seed_major: bool = False) -> list[tuple[str, int]]:
  """(step, seed) pairs in ladder order: every adopted step (and side branches with `side`), or
  exactly `steps`; then, with `references` (or where `steps` names them), the transformer
  references Swin-T and ViT-S (`presets.REFERENCES`: `swin_t`, `vit_s`). Each step's seeds follow
  it, or with `seed_major` every step's seed 0 comes first, then every step's seed 1, and so on."""
  ladder = ladders.get_ladder(ladder_name)
  if steps:
    for name in steps:
      if name not in presets.REFERENCES:
        ladder.step(name)                    # unknown step: ConfigError naming it
    names = [n for n in ladder.names() if n in steps]
  else:
    names = ladder.names(include_side=side)
  names += [n for n in presets.REFERENCES if references or n in (steps or ())]
  if seeds < 1:
    raise UsageError(f'--seeds must be at least 1, got {seeds}')
  if seed_major:
    return [(name, seed) for seed in range(seeds) for name in names]
  return [(name, seed) for name in names for seed in range(seeds)]


def _config_arg(step: str, seed: int, ladder_name: str, options: str) -> str:
  parts = [step, f'ladder={ladder_name}', f'seed={seed}'] + [o for o in options.split(',') if o]
  return ','.join(parts)


def _resolve(config_arg: str, overrides: list[str]):
  """The config `experiments.train` resolves from the same arguments."""
  from experiments.training import runconfig  # pylint: disable=import-outside-toplevel
  config, _ = runconfig.parse_flags(['train', f'--config={CONFIG}:{config_arg}', '--workdir=-',
                                  *[f'--config.{o}' for o in overrides]])
  return config


def _key(config) -> tuple:
  """What identifies a finished run in the step table."""
  from experiments.training.runconfig import config_hash  # pylint: disable=import-outside-toplevel
  return config.step, config.seed, config_hash(config)


def _done(table: str) -> set[tuple]:
  rows = steptable.read_rows(table)
  steptable.check_columns(table, rows,
                          {'step': 'text', 'seed': 'an integer', 'config_hash': 'text'})
  return {(r['step'], int(r['seed']), r['config_hash']) for r in rows}


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
      f'{seconds // 60}m{seconds % 60:02d}s'


def _train_in_process(step, seed, workdir, table, ladder_name, options, overrides) -> dict | None:
  """Trains one run in this process; returns its phase times, or None where it was not trained
  here (another process holds its workdir, or the table already holds it)."""
  from experiments.training import loop, runconfig  # pylint: disable=import-outside-toplevel
  config, _ = runconfig.parse_flags(
      ['train', f'--config={CONFIG}:{_config_arg(step, seed, ladder_name, options)}',
       f'--workdir={workdir}', f'--config.step_table={table}',
       *[f'--config.{o}' for o in overrides]])
  try:
    result = loop.train_and_evaluate(config, workdir)
  except workdirs.RunInUse:
    return None
  except (loop.Interrupted, loop.Preempted) as e:
    raise Stopped(130 if isinstance(e, loop.Interrupted) else 143,
                  f'checkpoint of {step} seed {seed} saved at update {e}') from None
  except (loop.TrainingDiverged, loop.datasets.DatasetUnavailable) as e:
    raise UsageError(f'training {step} seed {seed} failed: {e}') from None
  return None if result.get('already_recorded') else result.get('times', {})


def _train_command(step, seed, workdir, table, ladder_name, options, overrides) -> list[str]:
  return [sys.executable, '-m', 'experiments.train',
          f'--config={CONFIG}:{_config_arg(step, seed, ladder_name, options)}',
          f'--workdir={workdir}', f'--config.step_table={table}',
          *[f'--config.{o}' for o in overrides]]


class _Job:
  """One training process, its output in workdir/train.log, optionally pinned to some cores."""

  def __init__(self, pair, command, workdir, env, cores=None):
    self.pair, self.workdir, self.start = pair, workdir, time.time()
    os.makedirs(workdir, exist_ok=True)
    self._out = open(os.path.join(workdir, 'train.out'), 'w+')
    self._err = open(os.path.join(workdir, 'train.err'), 'w+')
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._out, stderr=self._err, text=True,
                                 env={**os.environ, **(env or {})}, preexec_fn=pin)

  def _collect(self) -> tuple[str, str]:
    """The process's stdout and stderr, appended to train.log (the two files removed)."""
    texts = []
    for f in (self._out, self._err):
      f.seek(0)
      texts.append(f.read())
      f.close()
      os.remove(f.name)
    with open(os.path.join(self.workdir, 'train.log'), 'a') as log:
      log.write(texts[0] + texts[1])
    return texts[0], texts[1]

  def finish(self) -> dict | None:
    """Waits; returns the trainer's phase times, or None where it did not train the run (another
    process holds the workdir, or the table already holds the run). A run stopped by a signal:
    `Stopped`; one that failed: UsageError naming it."""
    self.proc.wait()
    stdout, stderr = self._collect()
    step, seed = self.pair
    last = ([l for l in stderr.strip().splitlines() if l.strip()][-1:] or ['(no message)'])[0]
    if self.proc.returncode == workdirs.IN_USE_EXIT:
      return None
    if self.proc.returncode in (130, 143):   # Ctrl-C or SIGTERM reached it: it saved and stopped
      raise Stopped(self.proc.returncode, f'{step} seed {seed} stopped; its log: '
                    f'{self.workdir}/train.log')
    if self.proc.returncode != 0:
      raise UsageError(f'training {step} seed {seed} failed (exit {self.proc.returncode}): '
                       f'{last} (log: {self.workdir}/train.log)')
    try:   # the trainer's last stdout line is its result (a line of words: already recorded)
      return json.loads(stdout.strip().splitlines()[-1]).get('times', {})
    except (ValueError, IndexError):
      return None

  def stop(self) -> None:
    """SIGTERM: the trainer checkpoints and exits, so a rerun resumes it."""
    if self.proc.poll() is None:
      self.proc.terminate()
    try:
      self.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    if not self._out.closed:
      self._collect()


def core_groups(jobs: int, shared: bool = False) -> list[set[int] | None]:
  """This process's cores split into `jobs` disjoint groups (one job, or jobs that share one
  accelerator (`shared`): no pinning, any number of jobs)."""
  if jobs == 1 or shared:
    return [None] * jobs
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise UsageError(f'--jobs {jobs}: only {len(cores)} cores are available to this process')
  return [set(cores[i::jobs]) for i in range(jobs)]


# With --share-device, the part of the accelerator's memory all the jobs together take: each job
# preallocates SHARED_MEMORY / jobs of it (XLA_PYTHON_CLIENT_MEM_FRACTION), so that N processes fit
# on the one device; the rest is left to the CUDA contexts and to other programs.
SHARED_MEMORY = 0.9


def shared_device_env(jobs: int) -> dict[str, str]:
  """The environment of each of `jobs` processes sharing one accelerator: an equal share of its
  memory, unless XLA_PYTHON_CLIENT_MEM_FRACTION is set already (then that is every job's)."""
  if jobs == 1 or 'XLA_PYTHON_CLIENT_MEM_FRACTION' in os.environ:
    return {}
  return {'XLA_PYTHON_CLIENT_MEM_FRACTION': f'{SHARED_MEMORY / jobs:.3f}'}


# How often a ladder whose remaining runs are all being trained by another process looks again.
WAIT_S = 2.0


def run(out: str, *, ladder_name: str = 'resnet50', steps: list[str] | None = None,
        seeds: int = 1, side: bool = False, options: str = '', overrides: list[str] = (),
        isolate: bool = False, env: dict | None = None, jobs: int = 1,
        references: bool = False, share_device: bool = False) -> int:
  """Trains what is missing; returns the number of runs trained by this process (`references`:
  Swin-T and ViT-S too, under the same options, after the ladder's steps). Runs train in this
  process (one import, one compilation cache), or each in its own process with `isolate`, or
  `jobs` at a time, each in its own process pinned to its share of the cores (on a few cores, two
  small runs side by side train more images per second than one run on both).

  `share_device`: the `jobs` processes share one accelerator (a GPU): none is pinned to cores (any
  number of jobs on any number of cores), each preallocates an equal share of the device's memory
  (`shared_device_env`), and the runs go seed-major (`plan`), so that the jobs train different
  steps at once and each step's later seeds load its compiled programs from the persistent
  compilation cache instead of compiling them again. Nothing checks that there is an accelerator:
  on the CPU the jobs run unpinned.

  Several ladders may work on one OUT at once: a run is trained by the process that claims its
  workdir (experiments/training/workdir.py); the others skip it, train what is unclaimed, and then
  wait until the claimed runs are in the table (or their claim is dropped: a crashed process's run
  is then trained here). Each (step, seed) gets one row."""
  if jobs < 1:
    raise UsageError(f'--jobs must be at least 1, got {jobs}')
  groups = core_groups(jobs, share_device)
  if share_device:
    env = {**shared_device_env(jobs), **(env or {})}
  pairs = plan(ladder_name, steps, seeds, side, references, seed_major=share_device)
  os.makedirs(out, exist_ok=True)
  table = os.path.join(out, 'steps.csv')
  configs = {pair: _resolve(_config_arg(*pair, ladder_name, options), list(overrides))
             for pair in pairs}

  def missing() -> list:
    done = _done(table)
    return [p for p in pairs if _key(configs[p]) not in done]

  todo = missing()
  # Time left is estimated per epoch of training (the original recipe's runs are shorter).
  work = {p: configs[p].epochs for p in todo}
  print(f'ladder {ladder_name}: {len(pairs)} runs, {len(pairs) - len(todo)} already in {table}, '
        f'{len(todo)} to train' + (f', {jobs} at a time' if jobs > 1 else '')
        + (' sharing one device' if share_device and jobs > 1 else ''), flush=True)
  start, done_work, started, trained = time.time(), 0.0, 0, 0
  times_file = os.path.join(out, 'run_times.jsonl')

  def record(pair, seconds, phases):
    # Where the run's time went; 'outside_s' is what the trainer did not see (process start and
    # imports in a process of its own, the runner's own work).
    nonlocal done_work, trained
    if phases is None:   # not trained here
      return
    entry = {'step': pair[0], 'seed': pair[1], 'seconds': round(seconds, 1), **phases}
    if phases.get('total_s') is not None:
      entry['outside_s'] = round(seconds - phases['total_s'], 2)
    with open(times_file, 'a') as f:
      f.write(json.dumps(entry) + '\n')
    done_work += work.get(pair, 0.0)
    trained += 1

  def announce(pair):
    nonlocal started
    started += 1
    eta = ''
    if done_work:
      left = sum(work.get(p, 0.0) for p in missing()) - work.get(pair, 0.0)
      eta = f', about {_format_duration((time.time() - start) / done_work * max(left, 0))} left'
    print(f'[{started}/{len(todo)}] {pair[0]} seed {pair[1]} (elapsed '
          f'{_format_duration(time.time() - start)}{eta})', flush=True)

  def workdir(pair):
    return os.path.join(out, 'runs', pair[0], f'seed{pair[1]}')

  running, free, waiting = [], list(groups), False
  try:
    while True:
      for job, cores in [r for r in running if r[0].proc.poll() is not None]:
        running.remove((job, cores))
        free.append(cores)
        record(job.pair, time.time() - job.start, job.finish())
      busy = {job.pair for job, _ in running}
      left = [p for p in missing() if p not in busy]
      if not left and not running:
        break
      # The next unclaimed run; those another process trains now wait (their rows will come).
      ready = [p for p in left if not workdirs.in_use(workdir(p))] if free else []
      if ready:
        pair, waiting = ready[0], False
        announce(pair)
        if jobs == 1 and not isolate:
          t0 = time.time()
          phases = _train_in_process(*pair, workdir(pair), table, ladder_name, options, overrides)
          record(pair, time.time() - t0, phases)
          continue
        cores = free.pop(0)
        job = _Job(pair, _train_command(*pair, workdir(pair), table, ladder_name, options,
                                        overrides), workdir(pair), env, cores)
        running.append((job, cores))
        continue
      if left and not running and not waiting:
        print(f'waiting for {len(left)} run(s) another process is training: '
              + ', '.join(f'{s} seed {n}' for s, n in left[:4]) + (' ...' if len(left) > 4 else ''),
              flush=True)
        waiting = True
      time.sleep(0.2 if running else WAIT_S)
  except BaseException:
    for job, _ in running:       # a failure or an interrupt stops the others resumably
      job.stop()
    raise
  others = len(todo) - trained
  print(f'done: {trained} runs trained in {_format_duration(time.time() - start)}'
        + (f', {others} by another process' if others > 0 else ''), flush=True)
  return trained


PLATEAU_STEPS = ('resnet50', 'enhanced_recipe', 'convnext_t')


def plateau_check(out: str, *, ladder_name: str = 'resnet50', steps: list[str] | None = None,
                  seeds: int = 1, options: str = '', overrides: list[str] = (),
                  isolate: bool = False, factor: float = 2.0, jobs: int = 1,
                  share_device: bool = False) -> dict:
  """Trains `steps` (default: the ladder's first step, the first of the enhanced recipe and the
  last) as configured (OUT/1x) and `factor` times as long (OUT/2x); returns and writes
  OUT/plateau.json: per step the mean (and std) test and validation top-1 at both lengths and their
  difference."""
  if any(o.partition('=')[0].strip() in ('epochs', 'length') for o in overrides):
    raise UsageError('--plateau-check doubles the training length through the config: give it '
                     'as the option epochs=X in --options, not as --set epochs=X')
  steps = list(steps or PLATEAU_STEPS)
  longer = ','.join(o for o in (options, f'longer={factor:g}') if o)
  lengths = {'1x': options, f'{factor:g}x': longer}
  for name, opts in lengths.items():
    print(f'plateau check: {name}', flush=True)
    run(os.path.join(out, name), ladder_name=ladder_name, steps=steps, seeds=seeds, options=opts,
        overrides=overrides, isolate=isolate, jobs=jobs, share_device=share_device)
  result = {'factor': factor, 'seeds': seeds, 'options': options, 'steps': {}}
  for step in steps:
    entry = {}
    for name in lengths:
      rows = [r for r in steptable.read_rows(os.path.join(out, name, 'steps.csv'))
              if r['step'] == step and int(r['seed']) < seeds]
      for key, column in (('top1', 'top1'), ('val_top1', 'val_top1')):
        values = [float(r[column]) for r in rows if r.get(column)]
        entry[f'{key}_{name}'] = statistics.fmean(values) if values else None
        entry[f'{key}_{name}_std'] = statistics.stdev(values) if len(values) > 1 else None
      entry[f'epochs_{name}'] = float(rows[0]['epochs']) if rows else None
    long_name = list(lengths)[1]
    for key in ('top1', 'val_top1'):
      a, b = entry[f'{key}_1x'], entry[f'{key}_{long_name}']
      entry[f'{key}_change'] = None if a is None or b is None else b - a
    result['steps'][step] = entry
  outputs.write_json(os.path.join(out, 'plateau.json'), result)
  return result


def format_plateau(result: dict) -> str:
  long_name = f'{result["factor"]:g}x'
  lines = [f'{"step":<18} {"epochs":>7} {"top-1 1x":>9} {"top-1 " + long_name:>9} {"change":>7} '
           f'{"val 1x":>7} {"val " + long_name:>7} {"change":>7}   (mean over {result["seeds"]} '
           'seed(s))']
  def cell(v, width, signed=False):
    if v is None:
      return f'{"":>{width}}'
    return f'{v:>+{width}.2f}' if signed else f'{v:>{width}.2f}'
  for step, e in result['steps'].items():
    lines.append(f'{step:<18} {cell(e["epochs_1x"], 7)} {cell(e["top1_1x"], 9)} '
                 f'{cell(e["top1_" + long_name], 9)} {cell(e["top1_change"], 7, True)} '
                 f'{cell(e["val_top1_1x"], 7)} {cell(e["val_top1_" + long_name], 7)} '
                 f'{cell(e["val_top1_change"], 7, True)}')
  return '\n'.join(lines)
