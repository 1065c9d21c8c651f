"""Training-step throughput of the ladder's networks in JAX, side by side with PyTorch/timm.

  python -m experiments.bench                  # ResNet-50 and ConvNeXt-T, batch 32, 32x32 and 64x64
  python -m experiments.bench --steps all --shapes 32x32,64x64 --json > bench.jsonl
  python -m experiments.bench --steps resnet50 --shapes 224x224          # batch 8 at 224x224

For every ladder step and input shape it measures one training step (forward, backward, AdamW with
the enhanced recipe's masked weight decay), jitted over the `nnx.split` state with donated buffers
by `experiments.training.state.make_train_step` (mixing and label smoothing off, drop path 0, as
timm's defaults), on random data already in memory. Where timm has the same network (ResNet-50, the
enhanced-recipe ResNet-50, ResNet with (3, 3, 9, 3) blocks, ConvNeXt-T), the timm model is trained
the same way in PyTorch (train mode, AdamW with the same decay mask, `torch.set_num_threads(2)`,
channels_last or contiguous, whichever is faster). The steps from the patchify stem up to the
last micro-design change have no timm counterpart.

JAX and PyTorch run in two worker processes that the parent drives in alternating rounds (ABBA),
so that the machine's drift (other jobs) hits both; only one of them computes at a time. Each
reports the medians and spreads of its step times, its compile (or set-up) time and its own peak
resident memory. The table also gives the ratio JAX/timm (and its range over the rounds), this
machine's float32 matmul rate (a 2048^3 `jnp.dot`), each model's achieved training FLOP rate
(3 x forward MACs x 2 per image) as a fraction of it, and, for the CPU ladder's configuration
(configs/ladder.py, scale 'cpu': batch 128, 32x32, 1 channel, each step's own recipe), the
training images/s beside the input pipeline's (`experiments.data.pipeline.train_batches` with the
enhanced recipe's augmentation), alternating the same way. Timings on a shared machine are noisy:
compare the ratios measured in one run. Not a test: nothing here asserts a speed.

Both workers start with `experiments.runtime.keep_freed_memory()` (as the trainer does); pass
--no-malloc-tuning to measure glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.cli import ArgumentParser, guarded, names

DEFAULT_STEPS = 'resnet50,convnext_t'
DEFAULT_SHAPES = '32x32,64x64'
NUM_CLASSES = 10
ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

# Ladder steps with an identical timm network (the enhanced recipe changes only the init).
TIMM_EQUIVALENT = {
    'resnet50': 'timm resnet50',
    'enhanced_recipe': 'timm resnet50',
    'stage_ratio': 'timm ResNet(Bottleneck, (3, 3, 9, 3))',
    'convnext_t': 'timm convnext_tiny',
}


# --- statistics -----------------------------------------------------------------------------------

def _quantile(values, q):
  v = sorted(values)
  pos = q * (len(v) - 1)
  lo = int(pos)
  hi = min(lo + 1, len(v) - 1)
  return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times: list[float], batch: int) -> dict:
  """Step times (s) -> images/s at the median, quartiles and extremes of the step time."""
  med = statistics.median(times)
  return {'steps': len(times), 'median_s': med, 'img_s': batch / med,
          'img_s_q1': batch / _quantile(times, 0.75), 'img_s_q3': batch / _quantile(times, 0.25),
          'img_s_min': batch / max(times), 'img_s_max': batch / min(times)}


# --- workers --------------------------------------------------------------------------------------

class Worker:
  """A `python -m experiments.bench --worker KIND` process, driven by JSON lines over pipes."""

  def __init__(self, kind: str, args, env: dict | None = None):
    self.kind = kind
    self.log = tempfile.TemporaryFile(mode='w+')
    cmd = [sys.executable, '-m', 'experiments.bench', '--worker', kind,
           '--torch-threads', str(args.torch_threads)]
    if not args.malloc_tuning:
      cmd.append('--no-malloc-tuning')
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, bufsize=1,
                                 env={**os.environ, **(env or {})})

  def call(self, cmd: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({'cmd': cmd, **kwargs}) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      self.log.seek(0)
      tail = self.log.read()[-3000:]
      raise RuntimeError(f'{self.kind} worker died during {cmd!r}:\n{tail}')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'{self.kind} worker: {reply["error"]}')
    return reply

  def close(self):
    try:
      if self.proc.poll() is None:
        self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()
    self.log.close()


def _peak_memory() -> dict:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  with open('/proc/self/statm') as f:
    rss_pages = int(f.read().split()[1])
  return {'peak_rss_mb': usage.ru_maxrss / 1024,
          'rss_mb': rss_pages * os.sysconf('SC_PAGE_SIZE') / 2**20}


class _JaxWorker:
  def __init__(self):
    import jax  # noqa: F401  (the backend starts here, after the malloc settings)
    self.fn = self.state = self.batch = None

  def setup(self, step, size, batch, scale, dtype=None, warmup=True):
    """warmup=False: compile only (several workers can then compile at once and run in turn)."""
    import jax
    import jax.numpy as jnp
    import optax

    import modernize
    from configs import ladder as ladder_config
    from experiments.training import recipe, runconfig
    from experiments.training import state as train_state

    if scale == 'cpu':
      # The CPU ladder's run, as experiments.train builds it: recipe, mixing, drop path, batch.
      config = ladder_config.get_config(step)
      cfg = runconfig.net_config(config, NUM_CLASSES)
      schedule = recipe.Schedule(60000 / config.batch_size, config.epochs,
                                recipe.paper_epochs(config))
      lr = recipe.learning_rate(config, schedule)
      batch, size, channels = config.batch_size, config.data.image_size, config.data.channels
    else:
      # The enhanced recipe's AdamW (masked decay) for every step; no mixing, label smoothing or
      # drop path, as the timm side (whose models default to drop_path_rate 0).
      config = ladder_config.get_config('convnext_t,data=cifar10,scale=full')
      config.augment.mixup_alpha = config.augment.cutmix_alpha = 0.0
      config.augment.label_smoothing = 0.0
      config.data.image_size = size   # the network is built for it (mhsa_last_stage)
      # dtype: the compute dtype (NetConfig.dtype, e.g. 'bfloat16'); None: the config's default.
      extra = {} if dtype is None else {'dtype': dtype}
      cfg = modernize.LADDER.net_config(step, num_classes=NUM_CLASSES, in_channels=3,
                                        drop_path_rate=0.0, **extra)
      lr = optax.constant_schedule(1e-3)
      channels = 3
    tx = recipe.optimizer(config, lr)
    start = time.perf_counter()
    graphdef, constants, self.state = train_state.create_state(config, cfg, tx)
    jax.block_until_ready(self.state)
    init_s = time.perf_counter() - start
    key = jax.random.key(0)
    self.batch = {'image': jax.random.normal(key, (batch, size, size, channels), jnp.float32),
                  'label': jax.random.randint(key, (batch,), 0, NUM_CLASSES, jnp.int32)}
    fn = jax.jit(train_state.make_train_step(config, graphdef, constants, tx, lr, NUM_CLASSES),
                 donate_argnums=(0,))
    start = time.perf_counter()
    self.fn = fn.lower(self.state, self.batch).compile()
    compile_s = time.perf_counter() - start
    if warmup:
      self.run(2)
    params = sum(int(p.size) for p in jax.tree.leaves(self.state['params']))
    return {'compile_s': compile_s, 'init_s': init_s, 'params': params, 'batch': batch,
            'macs': modernize.count_macs(cfg, size), 'config': cfg.to_dict()}

  def run(self, n):
    import jax
    times = []
    cpu = time.process_time()
    for _ in range(n):
      start = time.perf_counter()
      self.state, metrics = self.fn(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - start)
    return {'times': times, 'cpu_s': (time.process_time() - cpu) / n}

  def matmul(self, n=2048, reps=10):
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    rates = []
    for _ in range(reps):
      start = time.perf_counter()
      f(a, b).block_until_ready()
      rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {'gflops': rates}

  @staticmethod
  def device_peak():
    """The accelerator's peak bytes in use by this process (None on CPU, which reports none)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    return {'device_peak_mb': None if peak is None else peak / 2**20,
            'device': jax.devices()[0].device_kind}


class _TorchWorker:
  def __init__(self, threads):
    import torch
    torch.set_num_threads(threads)
    self.threads = threads
    self.step_fn = None
    self.device = 'cpu'

  @staticmethod
  def _model(step):
    import timm
    from timm.models.resnet import Bottleneck, ResNet
    if step in ('resnet50', 'enhanced_recipe'):
      return timm.create_model('resnet50', num_classes=NUM_CLASSES)
    if step == 'stage_ratio':
      return ResNet(block=Bottleneck, layers=(3, 3, 9, 3), num_classes=NUM_CLASSES)
    if step == 'convnext_t':
      return timm.create_model('convnext_tiny', num_classes=NUM_CLASSES)
    raise ValueError(f'no timm equivalent for {step!r}')

  def _build(self, step, size, batch, channels_last, amp=False):
    import contextlib

    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = self._model(step).train().to(self.device)
    x = torch.randn(batch, 3, size, size, device=self.device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=self.device)
    if channels_last:
      model = model.to(memory_format=torch.channels_last)
      x = x.contiguous(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=1e-3)

    # amp: bfloat16 autocast (no loss scaling needed), as timm's --amp-dtype bfloat16.
    autocast = (lambda: torch.autocast(self.device, dtype=torch.bfloat16)) if amp else \
        contextlib.nullcontext

    def step_fn():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = F.cross_entropy(model(x), y)
      loss.backward()
      opt.step()
      return loss

    return model, step_fn

  def setup(self, step, size, batch, memory_format='auto', device='cpu', amp=False):
    """device: 'cpu' or 'cuda'; amp: bfloat16 autocast."""
    start = time.perf_counter()
    self.device = device
    if device == 'cuda':
      import torch
      torch.backends.cudnn.benchmark = True   # as timm's train.py and benchmark.py
    choices = {'auto': (True, False), 'channels_last': (True,), 'contiguous': (False,)}
    probe = {}
    for cl in choices[memory_format]:
      model, step_fn = self._build(step, size, batch, cl, amp)
      if len(choices[memory_format]) > 1:
        for _ in range(2):
          step_fn()
        times = []
        for _ in range(3):
          t = time.perf_counter()
          step_fn()
          self._sync()
          times.append(time.perf_counter() - t)
        probe[cl] = statistics.median(times)
      del model, step_fn
    channels_last = min(probe, key=probe.get) if probe else choices[memory_format][0]
    model, self.step_fn = self._build(step, size, batch, channels_last, amp)
    self.run(2)
    return {'setup_s': time.perf_counter() - start, 'channels_last': channels_last,
            'device': device, 'amp': 'bfloat16' if amp else None,
            'params': sum(p.numel() for p in model.parameters()),
            'probe_s': {('channels_last' if k else 'contiguous'): v for k, v in probe.items()}}

  def run(self, n):
    times = []
    cpu = time.process_time()
    for _ in range(n):
      start = time.perf_counter()
      self.step_fn()
      self._sync()
      times.append(time.perf_counter() - start)
    return {'times': times, 'cpu_s': (time.process_time() - cpu) / n}

  def _sync(self):
    if self.device != 'cpu':
      import torch
      torch.cuda.synchronize()

  def device_peak(self):
    """torch.cuda.max_memory_allocated of this process (None on CPU)."""
    import torch
    if self.device == 'cpu' or not torch.cuda.is_initialized():
      return {'device_peak_mb': None}
    return {'device_peak_mb': torch.cuda.max_memory_allocated() / 2**20,
            'device': torch.cuda.get_device_name()}

  def matmul(self, n=2048, reps=10):
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(reps):
      start = time.perf_counter()
      a @ b
      rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return {'gflops': rates}


class _DataWorker:
  def __init__(self):
    self.it = None

  def setup(self, **_):
    from configs import ladder as ladder_config
    from experiments.data import pipeline
    from experiments.training import runconfig
    config = ladder_config.get_config('convnext_t')   # the CPU ladder's data, enhanced recipe
    start = time.perf_counter()
    self.it = pipeline.train_batches(
        config.data.name, batch_size=config.batch_size, image_size=config.data.image_size,
        channels=config.data.channels, seed=0, augment=runconfig.augment_config(config),
        num_workers=runconfig.data_workers(config))
    workers = runconfig.data_workers(config)
    workers = pipeline.default_workers() if workers is None else workers
    for _ in range(3):
      next(self.it)
    self.batch = config.batch_size
    return {'setup_s': time.perf_counter() - start, 'batch': config.batch_size,
            'workers': workers, 'data': config.data.name,
            'image_size': config.data.image_size, 'channels': config.data.channels}

  def run(self, n):
    start = time.perf_counter()
    for _ in range(n):
      next(self.it)
    return {'times': [(time.perf_counter() - start) / n] * n}


def worker_main(kind: str, torch_threads: int, malloc_tuning: bool) -> int:
  protocol = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # library prints go to the log, not into the protocol
  sys.stdout = sys.stderr
  if malloc_tuning:
    from experiments.runtime import keep_freed_memory
    tune = True
    if kind == 'jax':   # where JAX runs on the CPU only, as the trainer does
      from modernize.backend import host_fast_paths
      tune = host_fast_paths()
    if tune:
      keep_freed_memory()
  impl = {'jax': _JaxWorker, 'torch': lambda: _TorchWorker(torch_threads),
          'data': _DataWorker}[kind]()
  for line in sys.stdin:
    request = json.loads(line)
    cmd = request.pop('cmd')
    if cmd == 'quit':
      break
    try:
      reply = _peak_memory() if cmd == 'peak' else getattr(impl, cmd)(**request)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which carries on
      import traceback
      traceback.print_exc()
      reply = {'error': f'{type(e).__name__}: {e}'}
    protocol.write(json.dumps(reply) + '\n')
  return 0


# --- the parent -----------------------------------------------------------------------------------

def _iterations(step_s: float, target_s: float) -> int:
  return int(min(20, max(2, round(target_s / max(step_s, 1e-6)))))


def alternate(workers: dict, rounds: int, target_s: float) -> tuple[dict, list[dict]]:
  """Runs the workers' steps in alternating rounds (ABBA...); returns their step times and the
  per-round medians."""
  probe = {name: statistics.median(w.call('run', n=2)['times']) for name, w in workers.items()}
  iters = {name: _iterations(t, target_s) for name, t in probe.items()}
  names = list(workers)
  times = {name: [] for name in names}
  per_round = []
  for r in range(rounds):
    order = names if r % 2 == 0 else names[::-1]
    medians = {}
    for name in order:
      t = workers[name].call('run', n=iters[name])['times']
      times[name] += t
      medians[name] = statistics.median(t)
    per_round.append(medians)
  return times, per_round


def _fmt_rate(s: dict | None) -> str:
  if not s:
    return '-'
  return f"{s['img_s']:.1f} [{s['img_s_q1']:.1f}-{s['img_s_q3']:.1f}]"


def _ratio_cell(r: dict, bold: bool = False) -> str:
  """A train record's JAX/timm ratio with its range over the rounds, or why there is none."""
  if 'torch' not in r:
    return 'no timm model' if not r['timm'] else 'not run'
  ratio = f"**{r['ratio']:.2f}**" if bold else f"{r['ratio']:.2f}"
  return f"{ratio} ({r['ratio_rounds'][0]:.2f}-{r['ratio_rounds'][1]:.2f})"


def _peak_cell(r: dict) -> str:
  t = r.get('torch')
  return f"{r['jax']['peak_rss_mb']:.0f}/" + (f"{t['peak_rss_mb']:.0f}" if t else '-')


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _torch_worker(step, size, batch, args, device='cpu', amp=False) -> tuple[Worker, dict]:
  """The PyTorch worker, with the faster OpenMP wait policy when asked for 'auto'.

  PyTorch's OpenMP threads spin at barriers by default; when another process holds one of the
  machine's cores, a 2-thread step can then take 10-20x longer (measured here: timm ResNet-50 at
  batch 32, 32x32: 3 img/s with the default policy, 57 with OMP_WAIT_POLICY=PASSIVE, while one
  core was busy). 'auto' sets up one worker with each policy and keeps the faster.
  """
  policies = {'auto': ('default', 'passive'), 'default': ('default',), 'passive': ('passive',)}
  candidates = []
  try:
    for policy in policies[args.torch_wait_policy]:
      env = {'OMP_WAIT_POLICY': 'PASSIVE'} if policy == 'passive' else {}
      w = Worker('torch', args, env)
      candidates.append((w, policy))
      extra = {} if device == 'cpu' and not amp else {'device': device, 'amp': amp}
      setup = w.call('setup', step=step, size=size, batch=batch, memory_format=args.torch_format,
                     **extra)
      probe = statistics.median(w.call('run', n=3)['times']) if len(policies[
          args.torch_wait_policy]) > 1 else 0.0
      candidates[-1] = (w, policy, setup, probe)
    best = min(candidates, key=lambda c: c[3])
  except BaseException:
    for c in candidates:
      c[0].close()
    raise
  for c in candidates:
    if c is not best:
      c[0].close()
  w, policy, setup, probe = best
  return w, {**setup, 'omp_wait_policy': policy,
             'policy_probe_s': {c[1]: c[3] for c in candidates} if len(candidates) > 1 else {}}


def bench_case(step, size, batch, args, matmul_gflops, *, dtype=None, torch_device='cpu',
               amp=False, env=None) -> dict:
  """One training-step case, JAX beside timm. dtype: the JAX compute dtype (None: the default);
  torch_device / amp: where timm runs and whether under bfloat16 autocast; env: extra environment
  of the workers (e.g. XLA_PYTHON_CLIENT_PREALLOCATE). Off the CPU, each worker also reports its
  accelerator's peak memory ('device_peak_mb')."""
  record = {'kind': 'train', 'step': step, 'shape': f'{size}x{size}', 'batch': batch,
            'timm': TIMM_EQUIVALENT.get(step),
            'load_avg_start': os.getloadavg()[0]}
  if dtype is not None:
    record['dtype'] = dtype
  workers = {'jax': Worker('jax', args, env)}
  device_peak = torch_device != 'cpu'
  try:
    extra = {} if dtype is None else {'dtype': dtype}
    setup = {'jax': workers['jax'].call('setup', step=step, size=size, batch=batch,
                                        scale='full', **extra)}
    if record['timm'] and args.torch:
      workers['torch'], setup['torch'] = _torch_worker(step, size, batch, args, torch_device, amp)
    times, per_round = alternate(workers, args.rounds, args.round_seconds)
    for name, w in workers.items():
      record[name] = {**summarize(times[name], batch), **setup[name], **w.call('peak')}
      if device_peak:
        record[name].update(w.call('device_peak'))
      record[name].pop('config', None)
  except RuntimeError as e:
    record['error'] = str(e).splitlines()[0]
    _log(f'  {step} {size}x{size}: {e}')
    return record
  finally:
    for w in workers.values():
      w.close()
  macs = record['jax']['macs']
  flops_per_step = 3 * 2 * macs * batch
  record['jax']['gflops'] = flops_per_step / record['jax']['median_s'] / 1e9
  record['jax']['matmul_fraction'] = record['jax']['gflops'] / matmul_gflops
  if 'torch' in record:
    record['torch']['gflops'] = flops_per_step / record['torch']['median_s'] / 1e9
    record['torch']['matmul_fraction'] = record['torch']['gflops'] / matmul_gflops
    record['ratio'] = record['jax']['img_s'] / record['torch']['img_s']
    round_ratios = [r['torch'] / r['jax'] for r in per_round]
    record['ratio_rounds'] = [min(round_ratios), max(round_ratios)]
  record['load_avg_end'] = os.getloadavg()[0]
  return record


def bench_cpu_ladder(steps, args) -> list[dict]:
  """Training img/s of the CPU ladder's configuration beside the input pipeline's."""
  records = []
  data = Worker('data', args)
  try:
    data_setup = data.call('setup')
    data_times = []
    for step in steps:
      jax_worker = Worker('jax', args)
      try:
        setup = jax_worker.call('setup', step=step, size=32, batch=128, scale='cpu')
        times, _ = alternate({'jax': jax_worker, 'data': data}, max(2, args.rounds // 2),
                             args.round_seconds / 2)
        data_times += times['data']
        train = {**summarize(times['jax'], setup['batch']), **setup}
        cfg = train.pop('config')
        records.append({'kind': 'cpu_ladder', 'step': step, 'batch': setup['batch'],
                        'width': cfg['width'], 'depths': cfg['depths'], 'train': train})
      except RuntimeError as e:
        records.append({'kind': 'cpu_ladder', 'step': step, 'error': str(e).splitlines()[0]})
      finally:
        jax_worker.close()
    if data_times:
      summary = {**summarize(data_times, data_setup['batch']), **data_setup}
      fastest = max((r['train']['img_s'] for r in records if 'train' in r), default=0.0)
      records.append({'kind': 'data', **summary, 'fastest_train_img_s': fastest,
                      'data_over_train': summary['img_s'] / fastest if fastest else None})
  finally:
    data.close()
  return records


def print_table(records, out) -> None:
  def p(line=''):
    print(line, file=out)

  for r in records:
    if r['kind'] == 'matmul':
      torch_mm = (f"; PyTorch {r['torch_gflops_max']:.0f} best" if 'torch_gflops_max' in r
                  else '')
      p(f"float32 matmul ({r['n']}^3): JAX {r['jax_gflops_max']:.0f} GFLOP/s best, "
        f"{r['jax_gflops_median']:.0f} median{torch_mm}. Fractions below are of JAX's best.")
  train = [r for r in records if r['kind'] == 'train']
  if train:
    p()
    p('Training step (fwd + bwd + AdamW), images/s: median [IQR]; ratio over rounds in ();'
      ' % = achieved FLOP rate / matmul rate')
    head = (f"{'step':<20}{'shape':>10}{'JAX img/s':>22}{'timm img/s':>22}{'JAX/timm':>18}"
            f"{'JAX GF/s':>9}{'%mm':>5}{'timm %mm':>9}{'compile':>8}{'peak MB jax/torch':>18}")
    p(head)
    p('-' * len(head))
    for r in train:
      shape = f"b{r['batch']}x{r['shape']}"
      if 'error' in r:
        p(f"{r['step']:<20}{shape:>10}  error: {r['error']}")
        continue
      j, t = r['jax'], r.get('torch')
      torch_mm = f"{100 * t['matmul_fraction']:.1f}" if t else '-'
      p(f"{r['step']:<20}{shape:>10}{_fmt_rate(j):>22}{_fmt_rate(t):>22}{_ratio_cell(r):>18}"
        f"{j['gflops']:9.1f}{100 * j['matmul_fraction']:5.1f}"
        f"{torch_mm:>9}"
        f"{j['compile_s']:7.1f}s{_peak_cell(r):>18}")
    loads = [r['load_avg_start'] for r in train if 'load_avg_start' in r]
    if loads:
      p(f'(1-min load average during the run: {min(loads):.1f}-{max(loads):.1f} on '
        f'{os.cpu_count()} CPUs)')
  ladder = [r for r in records if r['kind'] == 'cpu_ladder']
  data = [r for r in records if r['kind'] == 'data']
  if ladder:
    p()
    p('CPU ladder configuration (scale cpu, batch 128, 32x32x1, each step\'s recipe): training '
      'images/s')
    for r in ladder:
      if 'error' in r:
        p(f"  {r['step']:<20} error: {r['error']}")
      else:
        p(f"  {r['step']:<20} width {r['width']:>3} depths {str(tuple(r['depths'])):<14}"
          f"{_fmt_rate(r['train']):>26}   compile {r['train']['compile_s']:.1f}s")
  for r in data:
    p(f"  input pipeline ({r['data']}, {r['image_size']}x{r['image_size']}x{r['channels']}, batch "
      f"{r['batch']}, enhanced augmentation, {r['workers']} threads): {_fmt_rate(r)} images/s = "
      f"{r['data_over_train']:.1f}x the fastest step's training")


def print_markdown(records, out) -> None:
  """The same results as markdown tables (for the README)."""
  def p(line=''):
    print(line, file=out)

  for r in records:
    if r['kind'] == 'matmul':
      torch_mm = (f", PyTorch {r['torch_gflops_max']:.0f}" if 'torch_gflops_max' in r else '')
      p(f"float32 matmul, 2048^3: JAX {r['jax_gflops_max']:.0f} GFLOP/s (best of 10){torch_mm}. "
        f"`% mm` = achieved training FLOP rate (3 x forward FLOPs) / JAX's matmul rate.")
  train = [r for r in records if r['kind'] == 'train']
  if train:
    p()
    p('| step | batch x shape | JAX img/s [IQR] | timm img/s [IQR] | JAX/timm (rounds) | JAX % mm '
      '| timm % mm | compile | peak MB JAX/torch |')
    p('|---|---|---|---|---|---|---|---|---|')
    for r in train:
      shape = f"{r['batch']} x {r['shape']}"
      if 'error' in r:
        p(f"| {r['step']} | {shape} | error: {r['error']} | | | | | | |")
        continue
      j, t = r['jax'], r.get('torch')
      torch_mm = f"{100 * t['matmul_fraction']:.0f}%" if t else '-'
      p(f"| {r['step']} | {shape} | {_fmt_rate(j)} | {_fmt_rate(t)} | "
        f"{_ratio_cell(r, bold=True)} | "
        f"{100 * j['matmul_fraction']:.0f}% | {torch_mm} | {j['compile_s']:.1f} s | "
        f"{_peak_cell(r)} |")
  ladder = [r for r in records if r['kind'] == 'cpu_ladder']
  data = [r for r in records if r['kind'] == 'data']
  if ladder:
    p()
    p('| CPU ladder step (batch 128, 32x32x1) | width | depths | train img/s [IQR] |')
    p('|---|---|---|---|')
    for r in ladder:
      if 'error' in r:
        p(f"| {r['step']} | | | error: {r['error']} |")
      else:
        p(f"| {r['step']} | {r['width']} | {tuple(r['depths'])} | {_fmt_rate(r['train'])} |")
  for r in data:
    p()
    p(f"Input pipeline ({r['data']}, {r['image_size']}x{r['image_size']}x{r['channels']}, batch "
      f"{r['batch']}, the enhanced recipe's augmentation, {r['workers']} thread(s)): "
      f"{_fmt_rate(r)} images/s, {r['data_over_train']:.1f}x the fastest step's training.")


@guarded
def main(argv=None) -> int:
  parser = ArgumentParser(prog='python -m experiments.bench', description=__doc__)
  parser.add_argument('--steps', default=DEFAULT_STEPS,
                      help="comma-separated ladder steps, or 'all' (default: %(default)s)")
  parser.add_argument('--shapes', default=DEFAULT_SHAPES,
                      help='comma-separated HxW (square) sizes (default: %(default)s)')
  parser.add_argument('--batch', type=int, default=None,
                      help='batch size (default: 32, or 8 at sizes above 128)')
  parser.add_argument('--rounds', type=int, default=6, help='alternating rounds per case')
  parser.add_argument('--round-seconds', type=float, default=2.5,
                      help='target seconds of steps per framework per round')
  parser.add_argument('--json', action='store_true',
                      help='JSON lines on stdout (the table goes to stderr)')
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  parser.add_argument('--no-cpu-ladder', dest='cpu_ladder', action='store_false',
                      help='skip the CPU-scale training and input-pipeline comparison')
  parser.add_argument('--torch-threads', type=int, default=2)
  parser.add_argument('--torch-format', default='auto',
                      choices=['auto', 'channels_last', 'contiguous'])
  parser.add_argument('--torch-wait-policy', default='auto',
                      choices=['auto', 'default', 'passive'],
                      help="PyTorch's OMP_WAIT_POLICY: 'auto' keeps the faster (see _torch_worker)")
  parser.add_argument('--no-malloc-tuning', dest='malloc_tuning', action='store_false')
  parser.add_argument('--no-train', dest='train', action='store_false',
                      help='skip the JAX/timm training cases (e.g. only the CPU ladder)')
  parser.add_argument('--show', metavar='JSONL',
                      help='print the tables of an earlier --json run instead of measuring')
  parser.add_argument('--markdown', action='store_true', help='tables as markdown')
  parser.add_argument('--worker', choices=['jax', 'torch', 'data'], help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker_main(args.worker, args.torch_threads, args.malloc_tuning)

  sys.path.insert(0, ROOT)
  render = print_markdown if args.markdown else print_table
  if args.show:
    try:
      with open(args.show) as f:
        records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
      parser.error(f'--show: cannot read {args.show}: {e}')
    render(records, sys.stdout)
    return 0
  from modernize import LADDER
  steps = LADDER.names() if args.steps == 'all' else names(args.steps, LADDER.names(), 'step',
                                                           '--steps')
  if not steps:
    parser.error('--steps: give at least one step')
  if args.batch is not None and args.batch < 1:
    parser.error(f'--batch: must be at least 1, got {args.batch}')
  if args.rounds < 1 or args.round_seconds <= 0 or args.torch_threads < 1:
    parser.error('--rounds and --torch-threads must be at least 1, --round-seconds positive')
  sizes = []
  for shape in names(args.shapes) or ['']:
    h, _, w = shape.strip().partition('x')
    if not w or h != w or not h.isdigit() or int(h) < 8:
      parser.error(f'--shapes: {shape!r} is not a square HxW size of at least 8x8')
    sizes.append(int(h))

  out = sys.stderr if args.json else sys.stdout
  records = []

  def emit(record):
    records.append(record)
    if args.json:
      print(json.dumps(record), flush=True)

  _log(f'bench: steps {steps}, sizes {sizes}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}')
  mm = Worker('jax', args)
  try:
    rates = mm.call('matmul')['gflops']
  finally:
    mm.close()
  record = {'kind': 'matmul', 'n': 2048, 'jax_gflops_max': max(rates),
            'jax_gflops_median': statistics.median(rates)}
  if args.torch:
    tw = Worker('torch', args, {'OMP_WAIT_POLICY': 'PASSIVE'}
                if args.torch_wait_policy == 'passive' else None)
    try:
      record['torch_gflops_max'] = max(tw.call('matmul')['gflops'])
    finally:
      tw.close()
  emit(record)
  matmul = record['jax_gflops_max']

  for size in sizes if args.train else []:
    batch = args.batch or (8 if size > 128 else 32)
    for step in steps:
      _log(f'bench: {step} b{batch}x{size}x{size} ...')
      r = bench_case(step, size, batch, args, matmul)
      emit(r)
      if 'jax' in r:
        extra = f", timm {r['torch']['img_s']:.1f}, ratio {r['ratio']:.2f}" if 'ratio' in r else ''
        _log(f"  JAX {r['jax']['img_s']:.1f} img/s{extra}")
  if args.cpu_ladder:
    _log('bench: CPU ladder configuration and input pipeline ...')
    for r in bench_cpu_ladder(steps, args):
      emit(r)
  render(records, out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
