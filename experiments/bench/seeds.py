"""Several small runs on one device: the seeds of one ladder step trained as one program (`vmap`)
or as processes sharing the device (`processes`), and which trains more images per second.

  python -m experiments.bench.seeds --step convnext_t \\
      --options data=fashion_mnist,scale=cpu,image_size=32,batch=128,miniature \\
      --seeds 1,2,4 --kinds vmap,processes --updates 40 --dispatch 8 [--check] --out DIR

Each run's config is the one `ladder run` trains (configs/ladder.py through the trainer's flags,
`--ladder`, `--options`), with the data on the device (data.placement=device; a config that cannot
place it there is refused in one line) and `--dispatch` K updates per dispatch
(steps_per_dispatch). Every run is set up by the trainer's own set-up (`loop._set_up`: the state
initialised by `create_state`, the train step of `make_train_step`, the device program of
`placement.DeviceFeed`), so what is timed is what the trainer runs.

* **vmap**: one process, S seeds' states (seed i initialised as the trainer initialises seed i)
  stacked on a leading axis; one jitted program, `jax.vmap` of the device program over the state
  and each seed's host inputs (its example indices and augmentation parameters, computed on the
  host as the trainer computes them for that seed), the uploaded uint8 split shared. K updates per
  dispatch: one warm-up dispatch (compile_s: its time, tracing and compiling included), then
  `--updates` updates timed, blocking only at the end. One process runs every S of a step.
* **processes**: S processes of this module, one seed each, with the environment of
  `ladder run --share-device` (`shared_device_env`: an equal share of the device's memory). Each
  sets up, compiles and runs one warm-up dispatch, then waits at a common start (a file this
  process creates once all are ready) and times `--updates` updates; aggregate img/s =
  S x updates x batch / (the last one's end - the common start).

S = 1 of either kind is one run alone. A step's processes cases run first, then its vmap cases;
its workers share a fresh compilation cache (unless MODERNIZE_COMPILATION_CACHE is set): as under
`ladder run --share-device`, the first processes case compiles the one-seed program cold and the
later ones load it (their compile_s is that load), and so does the equivalence check; each S of
vmap compiles its own program cold.

`--check`: for each vmap case with S >= 2, the equivalence check: from the same initial states,
`--check-updates` updates (default 2) of the vmapped program against each seed trained alone by
the trainer's (unvmapped) device program; records the largest |difference| over the params and
BatchNorm statistics, whether they are bitwise equal, and the smallest difference of a vmapped
seed from another seed's lone run (seeds mixed up would make that one small). On the CPU the
vmapped program is not bitwise the lone one (the batched convolutions round differently), and
training amplifies the rounding (AdamW's first updates are about +-lr wherever a gradient's sign
differs), so the differences grow with the updates, faster with BatchNorm: docs/performance.md
gives what was measured; `TOLERANCE` is what tests/test_bench_seeds.py allows.

Prints one JSON line per case (kind, seeds, updates, dispatch, img_per_s, per_seed_img_per_s,
compile_s, backend, device_kind, check); with `--out`, writes DIR/seeds.json (every case and the
environment) and DIR/seeds.md (a table). Progress on stderr. `--dry-run`: convnext_t `smoke` (tiny
network, batch 32, 32x32 Fashion-MNIST), seeds 1,2, 2 updates, dispatch 2, with --check. Exit
code 0, 1 where a case failed (recorded with its error line), 2 for bad input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from experiments import outputs
from experiments.cli import ArgumentParser, UsageError, guarded, names, positive

ROOT = outputs.REPOSITORY
KINDS = ('processes', 'vmap')   # the order the cases run in
# The largest |difference| of a vmapped seed from the same seed trained alone that
# tests/test_bench_seeds.py allows for convnext_t (smoke, no BatchNorm) after a few updates on the
# CPU, where 4e-9 to 8e-9 was measured (docs/performance.md); ResNet-50's grow faster.
TOLERANCE = 1e-6
CHECK_UPDATES = 2   # the equivalence check's updates: differences grow as a run goes on
DRY_RUN = {'step': 'convnext_t', 'options': 'data=fashion_mnist,smoke', 'seeds': '1,2',
           'updates': 2, 'dispatch': 2}
POLL_S = 0.002   # how often a waiting worker looks for the common start


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:') or 'Error' in l]
  return (errors[-1] if errors else lines[-1] if lines else 'failed')[:400]


# --- configs (no JAX backend is started here: the parent only orchestrates) -----------------------

def overrides(dispatch: int) -> list[str]:
  """The trainer's --config overrides of every run of the bench."""
  return ['data.placement=device', f'steps_per_dispatch={dispatch}']


def run_config(step: str, seed: int, ladder: str, options: str, dispatch: int):
  """The config `ladder run` trains for (step, seed) with these options, the data on the device
  and `dispatch` updates per dispatch. UsageError (one line) for a bad option or field."""
  from experiments.ladder import run as ladder_run  # pylint: disable=import-outside-toplevel
  from experiments.training import placement  # pylint: disable=import-outside-toplevel
  config = ladder_run._resolve(  # pylint: disable=protected-access
      ladder_run._config_arg(step, seed, ladder, options), overrides(dispatch))  # pylint: disable=protected-access
  problems = placement.field_problems(config)
  if problems:
    raise UsageError('; '.join(problems))
  return config


def check_steps(steps: list[str], ladder: str) -> None:
  from modernize import ladder as ladders  # pylint: disable=import-outside-toplevel
  from modernize import presets  # pylint: disable=import-outside-toplevel
  known = ladders.get_ladder(ladder).names(include_side=True) + list(presets.REFERENCES)
  names(','.join(steps), known, 'step', '--step')


def seed_counts(text: str) -> list[int]:
  counts = []
  for item in names(text):
    try:
      value = int(item)
    except ValueError:
      raise UsageError(f'--seeds: {item!r} is not an integer') from None
    if value < 1:
      raise UsageError(f'--seeds: {value} must be at least 1')
    counts.append(value)
  if not counts:
    raise UsageError('--seeds: give at least one number of seeds, e.g. 1,2,4')
  return sorted(set(counts))


# --- the runs (in the worker processes) -----------------------------------------------------------

def _start_worker() -> None:
  """The trainer's process-wide settings (experiments/train.py)."""
  from experiments import runtime  # pylint: disable=import-outside-toplevel
  from modernize import backend  # pylint: disable=import-outside-toplevel
  if backend.host_fast_paths():
    runtime.keep_freed_memory()
  runtime.quiet_libraries()
  runtime.enable_compilation_cache()


def _environment() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  return {'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count()}


def _one_device() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.device_count() > 1:
    raise UsageError(f'the bench trains runs sharing one device; {jax.device_count()} are '
                     'visible (make one visible, e.g. CUDA_VISIBLE_DEVICES=0)')


class Seeds:
  """The runs of `configs` (one config per seed, the same step) set up as the trainer sets each up:
  the first by `loop._set_up` (the split uploaded once, its `DeviceFeed`), the others' initial
  states by `create_state` with their own seed and their host inputs by their own batch stream;
  `vmapped`: the feed's device program mapped over seeds."""

  def __init__(self, configs):
    import jax  # pylint: disable=import-outside-toplevel
    from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

    from experiments.data import pipeline  # pylint: disable=import-outside-toplevel
    from experiments.training import loop, recipe  # pylint: disable=import-outside-toplevel
    from experiments.training.state import create_state  # pylint: disable=import-outside-toplevel
    _one_device()
    config = configs[0]
    self.run = loop._set_up(config, loop.Stopwatch())  # pylint: disable=protected-access
    self.feed = self.run.feed
    self.batch = config.batch_size
    lr = recipe.learning_rate(config, self.run.schedule)
    tx = recipe.optimizer(config, lr, recipe.no_weight_decay(self.run.cfg))
    replicated = NamedSharding(self.run.mesh, P())
    self.initial = [self.run.state] + [
        create_state(c, self.run.cfg, tx, replicated)[2] for c in configs[1:]]
    self.builders = [self.feed.builder] + [
        pipeline.train_builder(**loop._train_stream(c, self.run.channels))  # pylint: disable=protected-access
        for c in configs[1:]]
    self.vmapped = jax.jit(jax.vmap(self.feed.function, in_axes=(0, None, None, 0, 0, None)),
                           donate_argnums=(0,))

  def stacked(self, seeds: int):
    """The first `seeds` initial states on a leading axis (new arrays: the program donates them)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *self.initial[:seeds])

  def alone(self, seed: int):
    """Seed `seed`'s initial state, copied (the lone program donates it)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return jax.tree.map(jnp.copy, self.initial[seed])

  def run_vmapped(self, state, seeds: int, first: int, n: int):
    """Updates first, ..., first + n - 1 of the first `seeds` seeds in one dispatch."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    inputs = [self.feed.host_inputs(first, n, b) for b in self.builders[:seeds]]
    indices = np.stack([i for i, _ in inputs])
    params = {k: np.stack([p[k] for _, p in inputs]) for k in inputs[0][1]}
    return self.vmapped(state, self.feed.images, self.feed.labels, indices, params, np.int32(n))

  def run_alone(self, state, seed: int, first: int, n: int):
    """The trainer's own dispatch of seed `seed` (`DeviceFeed.program`)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    indices, params = self.feed.host_inputs(first, n, self.builders[seed])
    return self.feed.program(state, self.feed.images, self.feed.labels, indices, params,
                             np.int32(n))


def _finite(metrics, n: int) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  return bool(np.isfinite(np.asarray(metrics['loss'])[..., :n]).all())


def time_vmapped(seeds: Seeds, count: int, updates: int, dispatch: int) -> dict:
  """One warm-up dispatch of `dispatch` updates (compile_s), then `updates` timed."""
  import jax  # pylint: disable=import-outside-toplevel

  from experiments.training import placement  # pylint: disable=import-outside-toplevel
  state = seeds.stacked(count)
  t0 = time.perf_counter()
  state, metrics = seeds.run_vmapped(state, count, 0, dispatch)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  start = time.perf_counter()
  last = dispatch
  for first, n in placement.dispatches(dispatch, dispatch + updates, dispatch):
    state, metrics = seeds.run_vmapped(state, count, first, n)
    last = n
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start
  rate = updates * seeds.batch / elapsed
  return {'img_per_s': count * rate, 'per_seed_img_per_s': [rate] * count, 'compile_s': compile_s,
          'timed_s': elapsed, 'finite': _finite(metrics, last)}


def _leaves(state) -> dict:
  """name -> array of the params and BatchNorm statistics of a state."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = {}
  for part in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(state[part]):
      out[part + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def _max_abs_diff(a: dict, b: dict) -> float:
  import numpy as np  # pylint: disable=import-outside-toplevel
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
             for k in a)


def equivalence(seeds: Seeds, count: int, updates: int, dispatch: int) -> dict:
  """`updates` updates of the first `count` seeds by the vmapped program and of each seed alone by
  the trainer's program, from the same initial states, in dispatches of `dispatch`: per seed the
  largest |difference| over params and BatchNorm statistics and whether all are bitwise equal,
  and the smallest difference of a vmapped seed from the next seed's lone run."""
  import jax  # pylint: disable=import-outside-toplevel

  from experiments.training import placement  # pylint: disable=import-outside-toplevel
  chunks = list(placement.dispatches(0, updates, dispatch))
  state = seeds.stacked(count)
  for first, n in chunks:
    state, _ = seeds.run_vmapped(state, count, first, n)
  mapped = [_leaves(jax.tree.map(lambda x, i=i: x[i], state)) for i in range(count)]
  alone = []
  for i in range(count):
    lone = seeds.alone(i)
    for first, n in chunks:
      lone, _ = seeds.run_alone(lone, i, first, n)
    alone.append(_leaves(lone))
  per_seed = [_max_abs_diff(mapped[i], alone[i]) for i in range(count)]
  bitwise = [all((mapped[i][k] == alone[i][k]).all() for k in mapped[i]) for i in range(count)]
  other = min(_max_abs_diff(mapped[i], alone[(i + 1) % count]) for i in range(count))
  return {'updates': updates, 'max_abs_diff': max(per_seed), 'bitwise': all(bitwise),
          'per_seed_max_abs_diff': per_seed, 'other_seed_min_diff': other}


def worker_vmap(args) -> int:
  """Every S of `--seeds` of one step, vmapped: one JSON line per case on stdout."""
  _start_worker()
  counts = seed_counts(args.seeds)
  configs = [run_config(args.step, seed, args.ladder, args.options, args.dispatch)
             for seed in range(max(counts))]
  t0 = time.perf_counter()
  seeds = Seeds(configs)
  setup_s = time.perf_counter() - t0
  env = _environment()
  for count in counts:
    case = {'kind': 'vmap', 'step': args.step, 'seeds': count, 'updates': args.updates,
            'dispatch': args.dispatch, 'batch': seeds.batch, 'setup_s': setup_s, **env}
    try:
      case.update(time_vmapped(seeds, count, args.updates, args.dispatch))
      if args.check and count >= 2:
        case['check'] = equivalence(seeds, count, args.check_updates, args.dispatch)
      case['status'] = 'ok'
    except Exception as e:  # noqa: BLE001 - recorded, the next case runs
      if isinstance(e, UsageError):
        raise
      case.update(status='failed', error=_one_line(f'{type(e).__name__}: {e}'))
    print(json.dumps(case), flush=True)
  return 0


def worker_seed(args) -> int:
  """One seed alone (a processes case's member): set up, warm up, report ready (the file
  `--ready`), wait for the common start (the file `--barrier`), time `--updates` updates, print
  one JSON line."""
  import jax  # pylint: disable=import-outside-toplevel

  from experiments.training import loop, placement  # pylint: disable=import-outside-toplevel
  _start_worker()
  _one_device()
  config = run_config(args.step, args.seed, args.ladder, args.options, args.dispatch)
  run = loop._set_up(config, loop.Stopwatch())  # pylint: disable=protected-access
  feed, k = run.feed, args.dispatch
  t0 = time.perf_counter()
  state, metrics = feed(run.state, 0, k)
  jax.block_until_ready((state, metrics))
  compile_s = time.perf_counter() - t0
  outputs.write_atomic(args.ready, json.dumps({'compile_s': compile_s}))
  while not os.path.exists(args.barrier):
    time.sleep(POLL_S)
  start_wall, start = time.time(), time.perf_counter()
  last = k
  for first, n in placement.dispatches(k, k + args.updates, k):
    state, metrics = feed(state, first, n)
    last = n
  jax.block_until_ready((state, metrics))
  end_wall, elapsed = time.time(), time.perf_counter() - start
  print(json.dumps({'seed': args.seed, 'compile_s': compile_s, 'start': start_wall,
                    'end': end_wall, 'timed_s': elapsed, 'batch': config.batch_size,
                    'img_per_s': args.updates * config.batch_size / elapsed,
                    'finite': _finite(metrics, last), **_environment()}), flush=True)
  return 0


# --- the parent: cases in worker processes ------------------------------------------------------

def _worker_command(mode: str, step: str, settings: dict, **extra) -> list[str]:
  cmd = [sys.executable, '-m', 'experiments.bench.seeds', '--worker', mode, '--step', step,
         '--ladder', settings['ladder'], '--options', settings['options'],
         '--updates', str(settings['updates']), '--dispatch', str(settings['dispatch'])]
  for key, value in extra.items():
    if value is True:
      cmd.append(f"--{key.replace('_', '-')}")
    elif value not in (None, False):
      cmd += [f"--{key.replace('_', '-')}", str(value)]
  return cmd


def _worker_env(extra: dict, cache: str) -> dict:
  env = {**os.environ, **extra,
         'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))}
  env.setdefault('MODERNIZE_COMPILATION_CACHE', cache)
  return env


def _failure(proc_returncode: int, stderr: str) -> str:
  line = _one_line(stderr)
  if proc_returncode == 2 and line.startswith('error: '):
    raise UsageError(line[len('error: '):])   # e.g. the data cannot go on the device
  return f'worker exited {proc_returncode}: {line}'


def vmap_cases(step: str, settings: dict, cache: str, deadline: float, on_case) -> None:
  """Every S of `settings['seeds']` vmapped, in one worker process; its cases to `on_case`."""
  counts = settings['seeds']
  base = {'kind': 'vmap', 'step': step, 'updates': settings['updates'],
          'dispatch': settings['dispatch']}
  cmd = _worker_command('vmap', step, settings, seeds=','.join(map(str, counts)),
                        check=settings['check'], check_updates=settings.get('check_updates'))
  log = tempfile.TemporaryFile(mode='w+')
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                          env=_worker_env({}, cache))
  done, error = set(), None
  try:
    for line in _lines(proc, deadline):
      case = json.loads(line)
      done.add(case['seeds'])
      on_case(case)
  except TimeoutError:
    error = 'skipped'
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    log.seek(0)
    stderr = log.read()
    log.close()
  if error is None and proc.returncode:
    error = _failure(proc.returncode, stderr)
  for count in counts:
    if count not in done:
      status = 'skipped' if error == 'skipped' else 'failed'
      on_case({**base, 'seeds': count, 'status': status,
               'error': 'budget spent' if status == 'skipped' else error})


def _lines(proc, deadline: float):
  """The JSON lines `proc` prints until it exits; TimeoutError past `deadline` (time.time())."""
  import selectors  # pylint: disable=import-outside-toplevel
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ)
  while True:
    left = deadline - time.time()
    if left <= 0:
      raise TimeoutError
    if not sel.select(timeout=min(left, 1.0)):
      continue
    line = proc.stdout.readline()
    if not line:
      return
    if line.startswith('{'):
      yield line


def processes_case(step: str, count: int, settings: dict, cache: str, deadline: float) -> dict:
  """`count` seed workers sharing the device (`shared_device_env`), released together."""
  from experiments.ladder.run import shared_device_env  # pylint: disable=import-outside-toplevel
  case = {'kind': 'processes', 'step': step, 'seeds': count, 'updates': settings['updates'],
          'dispatch': settings['dispatch']}
  work = tempfile.mkdtemp(prefix='bench_seeds_')
  barrier = os.path.join(work, 'start')
  env = _worker_env(shared_device_env(count), cache)
  procs = []
  try:
    for seed in range(count):
      cmd = _worker_command('seed', step, settings, seed=seed,
                            ready=os.path.join(work, f'ready{seed}'), barrier=barrier)
      log = tempfile.TemporaryFile(mode='w+')
      procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env), log))

    def failed() -> str | None:
      for proc, log in procs:
        if proc.poll() not in (None, 0):
          log.seek(0)
          return _failure(proc.returncode, log.read())
      return None

    while not all(os.path.exists(os.path.join(work, f'ready{s}')) for s in range(count)):
      problem = failed()
      if problem:
        return {**case, 'status': 'failed', 'error': problem}
      if time.time() > deadline:
        return {**case, 'status': 'skipped', 'error': 'budget spent'}
      time.sleep(0.05)
    compile_s = [json.loads(open(os.path.join(work, f'ready{s}')).read())['compile_s']
                 for s in range(count)]
    common = time.time()
    outputs.write_atomic(barrier, '')
    results = []
    for proc, log in procs:
      out = list(_lines(proc, deadline))
      proc.wait()
      if proc.returncode or not out:
        log.seek(0)
        return {**case, 'status': 'failed', 'error': _failure(proc.returncode, log.read())}
      results.append(json.loads(out[-1]))
  except TimeoutError:
    return {**case, 'status': 'skipped', 'error': 'budget spent'}
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
      log.close()
    shutil.rmtree(work, ignore_errors=True)
  batch = results[0]['batch']
  wall = max(r['end'] for r in results) - common
  return {**case, 'status': 'ok', 'batch': batch,
          'img_per_s': count * settings['updates'] * batch / wall,
          'per_seed_img_per_s': [r['img_per_s'] for r in results],
          'compile_s': max(compile_s), 'compile_s_per_seed': compile_s, 'timed_s': wall,
          'start_lag_s': max(r['start'] for r in results) - common,
          'finite': all(r['finite'] for r in results),
          **{k: results[0][k] for k in ('backend', 'device_kind', 'device_count')}}


def bench(steps: list[str], settings: dict, on_case, deadline: float = float('inf')) -> list:
  """Every (step, kind, S) case, vmap's S values in one worker, each processes case in its own
  workers; cases past `deadline` (time.time()) are recorded as skipped. Returns the cases."""
  cases = []

  def record(case):
    case = {'case': f"{case['step']} {case['kind']} x{case['seeds']}", **case}
    alone = next((c for c in cases if c['step'] == case['step'] and c['kind'] == case['kind']
                  and c['seeds'] == 1 and c.get('img_per_s')), None)
    if alone and case.get('img_per_s'):   # beside the same kind's one run alone
      case['over_one_seed'] = case['img_per_s'] / alone['img_per_s']
    cases.append(case)
    on_case(case)

  cache_dir = tempfile.mkdtemp(prefix='bench_seeds_cache_')
  try:
    for step in steps:
      cache = os.path.join(cache_dir, step)   # one per step: see the module's docstring
      for kind in [k for k in KINDS if k in settings['kinds']]:   # processes first
        if kind == 'vmap':
          vmap_cases(step, settings, cache, deadline, record)
          continue
        for count in settings['seeds']:
          if time.time() > deadline:
            record({'kind': kind, 'step': step, 'seeds': count, 'status': 'skipped',
                    'error': 'budget spent'})
            continue
          record(processes_case(step, count, settings, cache, deadline))
  finally:
    shutil.rmtree(cache_dir, ignore_errors=True)
  return cases


def environment() -> dict:
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return {'versions': versions, 'python': platform.python_version(),
          'cpu_count': os.cpu_count(),
          'cpu_affinity': (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                           else None)}


def _f(value, fmt='.1f') -> str:
  return '-' if value is None else format(value, fmt)


def markdown(data: dict) -> str:
  cases = data['cases']
  first = next((c for c in cases if c.get('device_kind')), {})
  s = data['settings']
  lines = ['# Several runs per device: vmap over seeds or processes', '',
           f"{first.get('device_kind', '-')} ({first.get('backend', '-')}), "
           f"{data['environment']['cpu_count']} CPUs; options `{s['options']}`, "
           f"{s['updates']} updates timed, {s['dispatch']} per dispatch.", '']
  return '\n'.join(lines + table(cases)).rstrip() + '\n'


def table(cases: list[dict], failures: bool = True) -> list[str]:
  """The cases as Markdown: every case, then vmap's img/s over processes' at each S, then (with
  `failures`) the failed cases' errors (also gpu_check.md's stage f)."""
  lines = ['| step | kind | seeds | status | img/s | per seed img/s | vs 1 seed | compile s | '
           'check: max abs diff (bitwise; other seed) |', '|---|---|---|---|---|---|---|---|---|']
  for c in cases:
    per = c.get('per_seed_img_per_s') or []
    check = c.get('check')
    shown = (f"{check['max_abs_diff']:.1e} ({'yes' if check['bitwise'] else 'no'}; "
             f"{check['other_seed_min_diff']:.1e})" if check else '-')
    lines.append(f"| {c['step']} | {c['kind']} | {c['seeds']} | {c['status']} | "
                 f"{_f(c.get('img_per_s'), '.0f')} | "
                 f"{_f(sum(per) / len(per) if per else None, '.0f')} | "
                 f"{_f(c.get('over_one_seed'), '.2f')} | {_f(c.get('compile_s'))} | {shown} |")
  lines += ['', '| step | seeds | vmap / processes img/s |', '|---|---|---|']
  for c in cases:
    if c['kind'] != 'vmap' or not c.get('img_per_s'):
      continue
    other = next((o for o in cases if o['kind'] == 'processes' and o['step'] == c['step']
                  and o['seeds'] == c['seeds'] and o.get('img_per_s')), None)
    if other:
      lines.append(f"| {c['step']} | {c['seeds']} | {c['img_per_s'] / other['img_per_s']:.2f} |")
  failed = [c for c in cases if c['status'] == 'failed' and failures]
  return lines + [''] + [f"- failed {c['step']} {c['kind']} {c['seeds']}: {c.get('error')}"
                         for c in failed]


def parse_args(argv):
  p = ArgumentParser(prog='python -m experiments.bench.seeds', description=__doc__)
  p.add_argument('--step', default='convnext_t',
                 help='ladder step(s), comma-separated (default %(default)s)')
  p.add_argument('--ladder', default='resnet50', help='the ladder (default %(default)s)')
  p.add_argument('--options', default='data=fashion_mnist,scale=cpu,image_size=32,batch=128,'
                 'miniature', help="the config options after the step, as `ladder run --options` "
                 "(default %(default)s)")
  p.add_argument('--seeds', default='1,2,4',
                 help='numbers of seeds trained at once, comma-separated (default %(default)s)')
  p.add_argument('--kinds', default=','.join(KINDS),
                 help=f"comma-separated subset of {','.join(KINDS)} (default %(default)s)")
  p.add_argument('--updates', type=positive(int), default=40,
                 help='updates timed per seed (default %(default)s)')
  p.add_argument('--dispatch', type=positive(int), default=8,
                 help='updates per dispatch, steps_per_dispatch (default %(default)s)')
  p.add_argument('--check', action='store_true',
                 help='the equivalence check in every vmap case with 2 or more seeds')
  p.add_argument('--check-updates', type=positive(int), default=CHECK_UPDATES,
                 help="the check's updates (default %(default)s)")
  p.add_argument('--out', help='directory for seeds.json and seeds.md')
  p.add_argument('--dry-run', action='store_true',
                 help=f"tiny sizes: {DRY_RUN['step']} {DRY_RUN['options']}, seeds "
                      f"{DRY_RUN['seeds']}, {DRY_RUN['updates']} updates, dispatch "
                      f"{DRY_RUN['dispatch']}, with --check")
  p.add_argument('--worker', choices=['vmap', 'seed'], help=argparse.SUPPRESS)
  p.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--ready', help=argparse.SUPPRESS)
  p.add_argument('--barrier', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.dry_run:
    for key, value in DRY_RUN.items():
      setattr(args, key, value)
    args.check = True
  return args


def settings_of(args) -> dict:
  """The bench's settings from its arguments, every one checked (UsageError, one line) before any
  work: the steps, the seed counts, the kinds, the options (the config of each step is built)."""
  steps = names(args.step)
  if not steps:
    raise UsageError('--step: give at least one ladder step')
  from modernize import ladder as ladders  # pylint: disable=import-outside-toplevel
  if args.ladder not in ladders.LADDERS:
    raise UsageError(f"--ladder: unknown ladder {args.ladder!r}; choose from "
                     f"{','.join(sorted(ladders.LADDERS))}")
  check_steps(steps, args.ladder)
  kinds = names(args.kinds, KINDS, 'kind', '--kinds')
  if not kinds:
    raise UsageError(f"--kinds: give at least one of {','.join(KINDS)}")
  counts = seed_counts(args.seeds)
  for step in steps:
    run_config(step, 0, args.ladder, args.options, args.dispatch)
  return {'steps': steps, 'ladder': args.ladder, 'options': args.options, 'seeds': counts,
          'kinds': kinds, 'updates': args.updates, 'dispatch': args.dispatch,
          'check': args.check, 'check_updates': args.check_updates}


@guarded
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker == 'vmap':
    return worker_vmap(args)
  if args.worker == 'seed':
    return worker_seed(args)
  settings = settings_of(args)
  if args.out:
    problem = outputs.write_problem(args.out, directory=True)
    if problem:
      raise UsageError(f'--out {args.out} {problem}')
  given = sys.argv[1:] if argv is None else list(argv)
  data = {'command': ' '.join(['python -m experiments.bench.seeds', *given]),
          'dry_run': args.dry_run, 'settings': settings,
          'environment': environment(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
          'cases': []}

  def on_case(case):
    print(json.dumps(case), flush=True)
    _log(f"{case['step']} {case['kind']} x{case['seeds']}: {case['status']}"
         + (f" {case['img_per_s']:.0f} img/s" if case.get('img_per_s') else '')
         + (f" ({case['error']})" if case.get('error') else ''))

  t0 = time.time()
  data['cases'] = bench(settings['steps'], settings, on_case)
  data['wall_s'] = time.time() - t0
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    outputs.write_json(os.path.join(args.out, 'seeds.json'), data)
    outputs.write_atomic(os.path.join(args.out, 'seeds.md'), markdown(data))
  return 1 if any(c['status'] == 'failed' for c in data['cases']) else 0


if __name__ == '__main__':
  sys.exit(main())
