"""The GPU acceptance run: one command, at most 8 minutes on one GPU with 16 cores and no internet.

  python -m experiments.bench.gpu_check --out DIR [--stages a,b,c,d,e,f] [--b-steps S]
                                            [--b-variants V] [--e-seeds N] [--e-epochs X]
                                            [--e-jobs N] [--dry-run]

Stages (each with a time budget, --budget-a ... --budget-f; the default stages a-d 120 + 230 + 40 +
150 = 540 s, leaving ~60 s for start-up, the environment probe and overruns: a stage stops between
cases):
  a  every adopted ladder step trained through the real trainer (`python -m experiments.train`,
     one subprocess per step) on Fashion-MNIST: top-1, train img/s, compile (first step) time.
     Choice: scale cpu, 32x32x1, batch 128, the CPU miniature recipe (`miniature`: learning rates
     quoted at batch 128, no Mixup/CutMix) without its validation split, 300 updates (0.64 epoch).
     Why: the 14 steps' compilation (tens of seconds each on a GPU) dominates, so the networks are
     the CPU ladder's (top-1 comparable with the CPU ladder's early training) and all 14 steps
     run at once (min(14, cpus - 2) processes) as trainer subprocesses sharing the GPU
     (XLA_PYTHON_CLIENT_PREALLOCATE=false), each with os.cpu_count() // procs input threads: one
     wave, expected ~90-150 s, most of it compilation. At this size the GPU outruns the input
     pipeline, and 14 processes share the GPU (and its autotuning), so stage a's train img/s
     measures the pipeline with one thread, not the GPU (stage b does). The persistent
     compilation cache is off, so compile times are cold.
  b  the training step (fwd + bwd + AdamW) of ResNet-50 and ConvNeXt-T, paper scale, 224x224,
     batch 128, float32 and bfloat16 (`NetConfig.dtype`), beside timm's resnet50 / convnext_tiny on
     the same GPU (channels_last; float32 beside float32, bfloat16 autocast beside bfloat16), with
     peak GPU memory (jax `memory_stats()['peak_bytes_in_use']`, `torch.cuda.max_memory_allocated`):
     `experiments.bench.bench_case` (its workers, alternation and `summarize`). `--b-steps` picks
     other steps with a timm counterpart; `--b-variants default,shift,cpu-paths` also times the
     JAX step with the shift depthwise and with the CPU fast paths (`VARIANTS`), each beside timm.
  c  the depthwise 7x7 conv of ConvNeXt-T's four stages at 224px, batch 128, forward and
     forward + backward, for every implementation in `modernize.depthwise`
     (`experiments.bench.depthwise.bench`; 'native' is CPU-only and is recorded as failed on a GPU).
  d  the input pipeline (`experiments.bench.data.bench`) on two sources, Fashion-MNIST at
     224x224x3 and generated RGB JPEGs of ImageNet's sizes (`experiments.bench.data.jpeg_folder`),
     with the enhanced recipe's augmentation for large images (RandomResizedCrop, flip,
     RandAugment(2, 9), Random Erasing), batch 128: threads (os.cpu_count(), half of it, 1) and
     worker processes (os.cpu_count() - 1, half, 1); then ResNet-50 in bfloat16 trained from the
     pipeline (os.cpu_count() - 1 worker processes) against its rate on synthetic input.
  e  the default CPU ladder trained on the GPU as `make ladder-gpu` trains it (not in the default
     stages: `--stages e`, budget --budget-e, default 480 s): `python -m experiments.ladder run
     --share-device` over the 14 adopted steps x 4 seeds (--e-seeds), 4 epochs (the miniature's;
     --e-epochs), 4 trainer processes sharing the GPU (--e-jobs), the data on the device with 8
     updates per dispatch, a fresh compilation cache (later seeds reuse a step's programs); then
     `ladder show`. Records every run (top-1, train img/s, compile and train time), the ladder's
     wall time, its aggregate img/s (the runs' updates x batch over that wall time) and its img/s
     of training (over the runs' summed train time / jobs), and each step's mean top-1 beside the
     committed CPU ladder's (results/ladder_4ep/ladder.json); copies the step table, run times
     and ladder view to DIR/ladder_gpu/. Past its budget the runs are stopped (SIGTERM: they save)
     and those not finished are recorded as skipped.
  f  several runs per chip: vmap over seeds against processes sharing the device (not in the
     default stages: `--stages f`, budget --budget-f, default 360 s): `experiments.bench.seeds`
     for convnext_t and resnet50 under the miniature (32x32, batch 128), the data on the device,
     8 updates per dispatch, 1, 2, 4 and 8 seeds trained as one vmapped program and as processes
     sharing the GPU (`ladder run --share-device`'s environment), 40 updates timed per case, with
     the equivalence check (each vmapped seed against that seed trained alone). Records each
     case's aggregate img/s, its ratio to one seed alone, compile time and the check's largest
     difference. Cases past the budget (convnext_t's come first) are recorded as skipped.

Writes DIR/gpu_check.json (rewritten atomically after every case, so a timeout keeps what
finished) and DIR/gpu_check.md (a table per stage); prints one line per case. A failing case is
recorded as failed with its error in one line, and the run goes on; a stage past its budget stops
cleanly, recording the cases it skipped. Exit code 0 when the run reached its end (whatever failed:
read the JSON's 'failed' counts), 2 for bad arguments. `--dry-run`: the same code paths at tiny
sizes on the CPU (2 ladder steps, 32px / batch 2 benchmarks; stage e: 2 steps x 1 seed of the
smoke option, 2 jobs; stage f: convnext_t of the smoke option, 1 and 2 seeds, 2 updates), ~2-3
minutes here.

On the lent GPU machine (Python 3.12, jax 0.11 with CUDA, torch, timm; no ml_collections, no
network), from the repository root with carry = ['.whl', '.data'] (wheels of ml_collections and of
the flax / optax / orbax-checkpoint versions tested here; the four Fashion-MNIST files):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/ml_collections-*.whl && \
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 \
      MODERNIZE_FASHION_MNIST_DIR=$PWD/.data/fashion-mnist && \
    python3 -m experiments.bench.gpu_check --out $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
STAGES = ('a', 'b', 'c', 'd', 'e', 'f')
DEFAULT_STAGES = 'a,b,c,d'   # e, the whole GPU ladder, and f take a command of their own
STAGE_NAMES = {'env': 'environment', 'a': 'ladder on Fashion-MNIST', 'b': 'train step vs timm',
               'c': 'depthwise conv', 'd': 'input pipeline', 'e': 'the GPU ladder',
               'f': 'several runs per chip: vmap over seeds against processes sharing the device'}
# Each stage's budget, set from what the stages took on the first GPU run (docs/gpu.md); e's from
# an estimate (not yet run on a GPU): 14 cold compiles, then 42 runs that reuse them. f's too: per
# step one cold compile of the one-seed program and 4 of vmapped ones (stage a's cold compiles took
# 35-86 s with 14 at once; alone, less), so a step takes 2-3 minutes.
BUDGETS = {'a': 120.0, 'b': 230.0, 'c': 40.0, 'd': 150.0, 'e': 480.0, 'f': 360.0}
# Stage e: the ladder `make ladder-gpu` trains (Makefile: LADDER_OPTIONS, LADDER_SEEDS,
# LADDER_GPU_JOBS and the ladder-gpu target's --set flags; tests/test_gpu_check.py compares them),
# and the committed CPU ladder its numbers are set beside.
GPU_LADDER = {'options': 'data=fashion_mnist,scale=cpu,image_size=32,batch=128,miniature',
              'seeds': 4, 'jobs': 4, 'placement': 'device', 'steps_per_dispatch': 8}
CPU_LADDER = os.path.join('results', 'ladder_4ep', 'ladder.json')
# Environment of every JAX subprocess: share the GPU instead of taking 75% of it each.
JAX_ENV = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'TF_CPP_MIN_LOG_LEVEL': '2'}
# Stage b's variants (--b-variants): the JAX step traced with these variables (modernize.backend,
# modernize.depthwise), each timed beside timm. 'default' is what this backend picks by itself.
VARIANTS = {
    'default': {},
    'shift': {'MODERNIZE_DEPTHWISE_IMPL': 'shift'},   # the shifted multiply-add depthwise
    # the CPU fast paths (BN/LN/max-pool VJPs, erf GELU, conv plans), not the 'native' depthwise
    'cpu-paths': {'MODERNIZE_FAST_PATHS': 'cpu', 'MODERNIZE_DEPTHWISE_IMPL': 'xla'},
}
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin',
            'jax-cuda12-pjrt', 'flax', 'optax', 'orbax-checkpoint', 'ml_collections', 'numpy',
            'torch', 'timm', 'pillow', 'opencv-python-headless')
FORCE_FAIL_ENV = 'MODERNIZE_GPU_CHECK_FAIL'   # 'STAGE:CASE': that case fails (tests)


def _log(msg: str) -> None:
  print(msg, flush=True)


def _one_line(text: str) -> str:
  lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith('error:') or 'Error' in l]
  return (errors[-1] if errors else lines[-1] if lines else 'failed')[:400]


def _forced(stage: str, case: str) -> bool:
  return os.environ.get(FORCE_FAIL_ENV, '') == f'{stage}:{case}'


# --- settings -------------------------------------------------------------------------------------

def settings(dry_run: bool, b_steps=None, b_variants=('default',), e_seeds=None, e_epochs=None,
             e_jobs=None) -> dict:
  """Every stage's sizes; stage b's models (default ConvNeXt-T and ResNet-50, ConvNeXt-T alone in
  a dry run) and `VARIANTS` as given; stage e's seeds, epochs (None: the options' own) and jobs
  where given."""
  conf = _sizes(dry_run)
  if b_steps:
    conf['b']['steps'] = list(b_steps)
  conf['b']['variants'] = list(b_variants)
  for key, value in (('seeds', e_seeds), ('epochs', e_epochs), ('jobs', e_jobs)):
    if value is not None:
      conf['e'][key] = value
  return conf


def _sizes(dry_run: bool) -> dict:
  cpus = os.cpu_count() or 2
  if dry_run:
    return {'a': {'steps': 'ends', 'options': 'smoke', 'updates': 3, 'batch': 32, 'procs': 2,
                  'threads': 1, 'image_size': 32},
            'b': {'steps': ['convnext_t'], 'dtypes': ['float32', 'bfloat16'], 'size': 32,
                  'batch': 2, 'rounds': 1, 'round_seconds': 0.05, 'device': 'cpu', 'matmul_n': 256},
            'c': {'shapes': [(2, 8, 8, 96, 7, 1), (2, 4, 4, 192, 7, 1), (2, 2, 2, 384, 7, 1),
                             (2, 1, 1, 768, 7, 1)], 'impls': ['xla', 'shift', 'native'],
                  'repeats': 3, 'budget_s': 0.2},
            'd': {'image_size': 64, 'batch': 16, 'steps': 3, 'warmup': 1, 'jpeg_images': 24,
                  'workers': {'threads': [2, 1], 'processes': [2, 1]}, 'fed_step': 'resnet50',
                  'fed_dtype': 'bfloat16', 'fed_depths': (1, 1, 1, 1), 'fed_workers': 2,
                  'fed_steps': 2},
            'e': {'steps': 'ends', 'options': 'data=fashion_mnist,smoke,miniature', 'seeds': 1,
                  'epochs': None, 'jobs': 2, 'placement': 'device', 'steps_per_dispatch': 8},
            'f': {'steps': ['convnext_t'], 'options': 'data=fashion_mnist,smoke', 'seeds': [1, 2],
                  'updates': 2, 'dispatch': 2}}
  procs = max(2, min(14, cpus - 2))   # 14 adopted steps: all at once on 16 cores
  return {'a': {'steps': 'adopted', 'options': 'miniature', 'updates': 300, 'batch': 128,
                'procs': procs, 'threads': max(1, cpus // procs), 'image_size': 32},
          'b': {'steps': ['convnext_t', 'resnet50'], 'dtypes': ['bfloat16', 'float32'],
                'size': 224, 'batch': 128, 'rounds': 2, 'round_seconds': 1.5, 'device': 'cuda',
                'matmul_n': 2048},
          'c': {'shapes': [(128, 56, 56, 96, 7, 1), (128, 28, 28, 192, 7, 1),
                           (128, 14, 14, 384, 7, 1), (128, 7, 7, 768, 7, 1)],
                'impls': ['xla', 'shift', 'native'], 'repeats': 20, 'budget_s': 1.0},
          'd': {'image_size': 224, 'batch': 128, 'steps': 10, 'warmup': 3, 'jpeg_images': 384,
                'workers': {'threads': sorted({cpus, max(1, cpus // 2), 1}, reverse=True),
                            'processes': sorted({max(1, cpus - 1), max(1, cpus // 2), 1},
                                                reverse=True)},
                'fed_step': 'resnet50', 'fed_dtype': 'bfloat16', 'fed_depths': None,
                'fed_workers': max(1, cpus - 1), 'fed_steps': 30},
          'e': {'steps': 'adopted', 'epochs': None, **GPU_LADDER},
          'f': {'steps': ['convnext_t', 'resnet50'], 'options': GPU_LADDER['options'],
                'seeds': [1, 2, 4, 8], 'updates': 40, 'dispatch': GPU_LADDER['steps_per_dispatch']}}


# --- the result file ------------------------------------------------------------------------------

class Report:
  """gpu_check.json and gpu_check.md, both rewritten whole after every change."""

  def __init__(self, out: str, args, conf: dict, command: str):
    self.out = out
    self.data = {'command': command, 'dry_run': args.dry_run,
                 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'settings': conf,
                 'budgets_s': {s: getattr(args, f'budget_{s}') for s in STAGES}, 'stages': {}}
    path = os.path.join(out, 'gpu_check.json')
    if os.path.exists(path):   # a rerun of some stages keeps the others' results
      try:
        with open(path) as f:
          self.data['stages'] = json.load(f).get('stages', {})
      except (OSError, ValueError):
        pass

  def stage(self, name: str) -> dict:
    self.data['stages'][name] = {'name': STAGE_NAMES[name], 'status': 'running', 'cases': [],
                                 'skipped': [], 'started': time.time()}
    self.save()
    return self.data['stages'][name]

  def save(self) -> None:
    stages = self.data['stages']
    self.data['failed'] = {k: sum(c.get('status') == 'failed' for c in v.get('cases', []))
                           for k, v in stages.items()}
    outputs.write_json(os.path.join(self.out, 'gpu_check.json'), self.data)
    outputs.write_atomic(os.path.join(self.out, 'gpu_check.md'), markdown(self.data))


def _f(value, fmt='.1f') -> str:
  return '-' if value is None else format(value, fmt)


def markdown(data: dict) -> str:
  lines = ['# GPU acceptance run' + (' (dry run, CPU)' if data.get('dry_run') else ''), '']
  env = data['stages'].get('env', {}).get('cases', [])
  if env and env[0].get('status') == 'ok':
    e = env[0]
    lines += [f"Device: {e.get('device_kind')} ({e.get('platform')}, {e.get('device_count')} "
              f"device(s)); GPU {e.get('gpu_name') or '-'}; {e.get('cpu_count')} CPUs; "
              f"jax_default_matmul_precision {e.get('matmul_precision')}.",
              'Versions: ' + ', '.join(f'{k} {v}' for k, v in e.get('versions', {}).items()), '']
  for key in STAGES:
    st = data['stages'].get(key)
    if not st:
      continue
    lines += [f"## {key}: {st['name']} ({st['status']}, {_f(st.get('wall_s'))} s)", '']
    cases = st['cases']
    if key == 'a':
      lines += ['| step | status | updates | top-1 % | train img/s | compile s | wall s |',
                '|---|---|---|---|---|---|---|']
      lines += [f"| {c['case']} | {c['status']} | {c.get('updates', '-')} | "
                f"{_f(c.get('top1'), '.2f')} | {_f(c.get('train_img_s'), '.0f')} | "
                f"{_f(c.get('compile_s'))} | {_f(c.get('wall_s'))} |" for c in cases]
    elif key == 'b':
      lines += ['| model | dtype | variant | status | JAX img/s | timm img/s | JAX/timm '
                '| JAX compile s | peak GB JAX / timm |', '|---|---|---|---|---|---|---|---|---|']
      for c in cases:
        j, t = c.get('jax') or {}, c.get('torch') or {}
        gb = lambda r: _f(r['device_peak_mb'] / 1024, '.2f') if r.get('device_peak_mb') else '-'
        peak = f'{gb(j)} / {gb(t)}'
        lines.append(f"| {c['step']} | {c['dtype']} | {c.get('variant', 'default')} | "
                     f"{c['status']} | {_f(j.get('img_s'), '.0f')} "
                     f"| {_f(t.get('img_s'), '.0f')} | {_f(c.get('ratio'), '.2f')} | "
                     f"{_f(j.get('compile_s'))} | {peak} |")
    elif key == 'c':
      lines += ['| shape NxHxWxC k s | impl | status | fwd ms | fwd+bwd ms | f+b vs xla |',
                '|---|---|---|---|---|---|']
      lines += [f"| {c['shape']} | {c['impl']} | {c['status']} | {_f(c.get('fwd_ms'), '.2f')} | "
                f"{_f(c.get('fwd_bwd_ms'), '.2f')} | {_f(c.get('speedup_fwd_bwd'), '.2f')} |"
                for c in cases]
    elif key == 'd':
      lines += ['| case | status | images/s | per worker | parent ms/batch | synthetic images/s '
                '| fed / synthetic |', '|---|---|---|---|---|---|---|']
      lines += [f"| {c['case']} | {c['status']} | {_f(c.get('img_s'), '.0f')} | "
                f"{_f(c.get('img_s_per_worker'), '.0f')} | {_f(c.get('parent_ms'), '.2f')} | "
                f"{_f(c.get('synthetic_img_s'), '.0f')} | "
                f"{_f(c.get('fed_over_synthetic'), '.2f')} |" for c in cases]
    elif key == 'e':
      lines += _markdown_e(st)
    elif key == 'f':
      from experiments.bench import seeds as bench_seeds
      lines += bench_seeds.table(cases, failures=False)
    failed = [c for c in cases if c.get('status') == 'failed']
    if failed:
      lines += [''] + [f"- failed {c['case']}: {c.get('error')}" for c in failed]
    if st.get('skipped'):
      lines += ['', f"Skipped (budget of {_f(data['budgets_s'].get(key), '.0f')} s spent): "
                + ', '.join(st['skipped'])]
    lines.append('')
  return '\n'.join(lines)


def _markdown_e(st: dict) -> list[str]:
  """Stage e's summary line and its steps, the GPU ladder's top-1 beside the CPU ladder's."""
  lad = st.get('ladder') or {}
  if not lad:
    return []
  lines = [f"{lad['runs']} of {lad['planned']} runs ({lad['steps']} steps x {lad['seeds']} "
           f"seed(s), {lad['jobs']} at a time sharing the device, data.placement "
           f"{lad['placement']}, {lad['steps_per_dispatch']} updates per dispatch; options "
           f"`{lad['options']}`) in {_f(lad.get('wall_s'))} s: "
           f"{_f(lad.get('aggregate_img_s'), '.0f')} img/s aggregate (updates x batch over the "
           "wall time), "
           f"{_f(lad.get('training_img_s'), '.0f')} img/s of training; compiles "
           f"{_f(lad.get('compile_s'))} s summed over the runs, training "
           f"{_f(lad.get('train_s'))} s.", '',
           "| step | top-1 % here (n) | CPU ladder top-1 % (n) | here - CPU |",
           '|---|---|---|---|']
  for row in st.get('steps', []):
    here = f"{_f(row.get('top1'), '.2f')} ({row.get('n', 0)})"
    cpu = (f"{_f(row.get('cpu_top1'), '.2f')} ({row.get('cpu_n')})"
           if row.get('cpu_top1') is not None else '-')
    lines.append(f"| {row['step']} | {here} | {cpu} | {_f(row.get('difference'), '+.2f')} |")
  return lines + ['', f"CPU ladder: {st.get('cpu_ladder') or 'not found'}."]


# --- stage workers (subprocesses: a crash or a hung GPU costs one stage, not the run) -----------

def _stream(stage: str, extra: list[str], timeout: float, on_case) -> str | None:
  """Runs `python -m experiments.bench.gpu_check --worker STAGE ...`, handing every JSON line it
  prints to on_case; returns an error line, or None."""
  cmd = [sys.executable, '-m', 'experiments.bench.gpu_check', '--worker', stage, *extra]
  log = tempfile.TemporaryFile(mode='w+')
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                          env={**os.environ, **JAX_ENV})
  deadline = time.time() + timeout
  import selectors
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ)
  error = None
  try:
    while True:
      left = deadline - time.time()
      if left <= 0:
        error = f'stage worker killed after {timeout:.0f} s'
        break
      if not sel.select(timeout=min(left, 1.0)):
        continue
      line = proc.stdout.readline()
      if not line:
        break
      if line.startswith('{'):
        on_case(json.loads(line))
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
    log.seek(0)
    tail = log.read()
    log.close()
  if error is None and proc.returncode:
    error = f'stage worker exited {proc.returncode}: {_one_line(tail)}'
  return error


def worker_c(conf: dict, budget: float) -> None:
  from experiments.bench import depthwise as bench_depthwise
  start = time.time()
  for shape in conf['shapes']:
    base = None
    for impl in conf['impls']:
      label = 'x'.join(map(str, shape[:4])) + f' k{shape[4]} s{shape[5]}'
      case = {'case': f'{label} {impl}', 'shape': label, 'impl': impl}
      if time.time() - start > budget:
        print(json.dumps({**case, 'status': 'skipped'}), flush=True)
        continue
      try:
        if _forced('c', impl):
          raise RuntimeError('forced failure (test)')
        fwd, fb = bench_depthwise.bench(tuple(shape), impl, conf['repeats'], conf['budget_s'])
        case.update(status='ok', fwd_ms=fwd, fwd_bwd_ms=fb)
        if impl == 'xla':
          base = (fwd, fb)
        if base:
          case.update(speedup_fwd=base[0] / fwd, speedup_fwd_bwd=base[1] / fb)
      except Exception as e:  # noqa: BLE001 - recorded, the stage goes on
        case.update(status='failed', error=_one_line(f'{type(e).__name__}: {e}'))
      print(json.dumps(case), flush=True)


def worker_d(conf: dict, budget: float) -> None:
  """Stage d: the input pipeline on both sources, threads against worker processes at each worker
  count, then ResNet-50 (bfloat16) trained from the pipeline against its synthetic-input rate."""
  from experiments.bench import data as bench_data
  from experiments.data import datasets
  from experiments.data.augment import AugmentConfig
  start = time.time()
  sources = {'fashion_mnist': 'fashion_mnist',
             'jpeg': bench_data.jpeg_folder(os.path.join(tempfile.gettempdir(),
                                                         'modernize-bench-jpeg'),
                                            train=conf['jpeg_images'])}
  datasets.load_arrays('fashion_mnist', 'train')
  for source, name in sources.items():
    for kind, counts in conf['workers'].items():
      for workers in counts:
        case = {'case': f'{source} {workers} {kind}', 'source': source, 'kind': kind,
                'workers': workers, 'image_size': conf['image_size'], 'batch': conf['batch']}
        if time.time() - start > budget:
          print(json.dumps({**case, 'status': 'skipped'}), flush=True)
          continue
        try:
          if _forced('d', case['case']):
            raise RuntimeError('forced failure (test)')
          # The workers compute workers + prefetch batches ahead: the warm-up takes that
          # backlog and the timed steps are many more, so that batches made before the clock
          # starts count little (at most 1/6).
          ahead = workers + 2
          r = bench_data.bench(name, data_dir=None, image_size=conf['image_size'],
                               batch_size=conf['batch'], channels=3,
                               augment=AugmentConfig.paper(large=True),
                               steps=max(conf['steps'], 6 * ahead),
                               warmup=max(conf['warmup'], ahead), workers=workers, prefetch=2,
                               kind=kind)
          case.update(status='ok', img_s=r['img_s'], img_s_per_worker=r['img_s'] / workers,
                      parent_ms=r['parent_ms'])
        except Exception as e:  # noqa: BLE001
          case.update(status='failed', error=_one_line(f'{type(e).__name__}: {e}'))
        print(json.dumps(case), flush=True)
  case = {'case': f'{conf["fed_step"]} {conf["fed_dtype"]} fed', 'kind': 'processes',
          'workers': conf['fed_workers'], 'image_size': conf['image_size'],
          'batch': conf['batch']}
  if time.time() - start > budget:
    print(json.dumps({**case, 'status': 'skipped'}), flush=True)
    return
  try:
    case.update(status='ok', **_fed_training(conf))
  except Exception as e:  # noqa: BLE001
    case.update(status='failed', error=_one_line(f'{type(e).__name__}: {e}'))
  print(json.dumps(case), flush=True)


def _fed_training(conf: dict) -> dict:
  """Training images/s of `fed_step` (paper scale, `fed_dtype`) on synthetic input (one batch
  already on the device) and fed by the pipeline (Fashion-MNIST at image_size, the enhanced
  recipe, `fed_workers` worker processes; each batch sent to the device ahead of its step)."""
  import jax
  import numpy as np

  from configs import ladder as ladder_config
  from experiments.data import pipeline
  from experiments.data.augment import AugmentConfig
  from experiments.training import recipe, runconfig
  from experiments.training import state as train_state
  config = ladder_config.get_config(f'{conf["fed_step"]},data=fashion_mnist,scale=full,'
                                    f'image_size={conf["image_size"]},batch={conf["batch"]}')
  with config.unlocked():
    config.model.dtype = conf['fed_dtype']
    config.data.channels = config.model.in_channels = 3   # as ImageNet's, and stage d's
    config.model.depths = tuple(conf.get('fed_depths') or config.model.depths)
  cfg = runconfig.net_config(config, 10, 3)
  schedule = recipe.Schedule(100.0, 1.0, recipe.paper_epochs(config))
  lr = recipe.learning_rate(config, schedule)
  tx = recipe.optimizer(config, lr)
  graphdef, constants, state = train_state.create_state(config, cfg, tx)
  spec = pipeline.input_spec('fashion_mnist', None, 3)
  step = jax.jit(train_state.make_train_step(config, graphdef, constants, tx, lr, 10, spec),
                 donate_argnums=(0,))
  batches = pipeline.train_batches('fashion_mnist', batch_size=conf['batch'],
                                   image_size=conf['image_size'], channels=3,
                                   augment=AugmentConfig.paper(large=True),
                                   num_workers=conf['fed_workers'], worker_kind='processes')
  synthetic = jax.device_put(next(batches))
  compile_start = time.perf_counter()
  state, metrics = step(state, synthetic)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - compile_start
  rates = {}
  for name in ('synthetic', 'fed'):
    for _ in range(2):   # warm-up
      state, metrics = step(state, synthetic if name == 'synthetic' else jax.device_put(
          next(batches)))
    jax.block_until_ready(metrics)
    start, ahead = time.perf_counter(), []
    for _ in range(conf['fed_steps']):
      batch = synthetic if name == 'synthetic' else jax.device_put(next(batches))
      state, metrics = step(state, batch)
      ahead.append(metrics['loss'])
    jax.block_until_ready(ahead)
    rates[name] = conf['fed_steps'] * conf['batch'] / (time.perf_counter() - start)
  batches.close()
  return {'img_s': rates['fed'], 'synthetic_img_s': rates['synthetic'],
          'fed_over_synthetic': rates['fed'] / rates['synthetic'], 'compile_s': compile_s,
          'finite': bool(np.isfinite(float(metrics['loss'])))}


def worker_f(conf: dict, budget: float) -> None:
  """Stage f: `experiments.bench.seeds` (both kinds, with the equivalence check), one JSON line
  per case; the cases past the budget are recorded as skipped."""
  from experiments.bench import seeds as bench_seeds
  # The processes share the device as `ladder run --share-device`'s do: each preallocates its
  # share of the memory (shared_device_env), not the JAX_ENV's none.
  os.environ.pop('XLA_PYTHON_CLIENT_PREALLOCATE', None)
  settings = {'ladder': 'resnet50', 'options': conf['options'], 'seeds': conf['seeds'],
              'kinds': list(bench_seeds.KINDS), 'updates': conf['updates'],
              'dispatch': conf['dispatch'], 'check': True,
              'check_updates': bench_seeds.CHECK_UPDATES}

  def on_case(case):
    if _forced('f', case['case']) and case['status'] == 'ok':
      case = {**case, 'status': 'failed', 'error': 'forced failure (test)'}
    print(json.dumps(case), flush=True)

  bench_seeds.bench(conf['steps'], settings, on_case, deadline=time.time() + budget)


def worker_env() -> None:
  import jax
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  dev = jax.devices()[0]
  gpu_name = None
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=20)
    gpu_name = out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  print(json.dumps({'case': 'environment', 'status': 'ok', 'versions': versions,
                    'python': platform.python_version(), 'platform': dev.platform,
                    'device_kind': dev.device_kind, 'device_count': jax.device_count(),
                    'gpu_name': gpu_name, 'cpu_count': os.cpu_count(),
                    'matmul_precision': str(getattr(jax.config, 'jax_default_matmul_precision',
                                                    'unknown'))}),
        flush=True)


# --- stage a: the ladder through the trainer ------------------------------------------------------

def stage_a(conf: dict, budget: float, out_dir: str, st: dict, save) -> None:
  from modernize import LADDER
  adopted = LADDER.names(include_side=False)
  steps = adopted if conf['steps'] == 'adopted' else [adopted[0], adopted[-1]]
  work = tempfile.mkdtemp(prefix='gpu_check_a_')
  epochs = conf['updates'] * conf['batch'] / 60000
  env = {**os.environ, **JAX_ENV, 'MODERNIZE_COMPILATION_CACHE': '0',
         'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))}
  if conf['options'] == 'smoke':
    epochs = conf['updates'] * conf['batch'] / 512

  def command(step):
    workdir = os.path.join(work, step)
    cmd = [sys.executable, '-m', 'experiments.train',
           f"--config=configs/ladder.py:{step},{conf['options']},batch={conf['batch']},"
           f"image_size={conf['image_size']}", f'--workdir={workdir}',
           f'--config.epochs={epochs:.6f}', f"--config.data.threads={conf['threads']}",
           '--config.data.validation=0', '--config.checkpoint_every_steps=100000',
           f"--config.step_table={os.path.join(work, 'steps.csv')}"]
    if _forced('a', step):
      cmd.append('--config.model.no_such_flag=1')
    return cmd

  start = time.time()
  pending = list(steps)
  running = {}   # step -> (proc, started, log)
  while pending or running:
    while pending and len(running) < conf['procs']:
      step = pending.pop(0)
      log = tempfile.TemporaryFile(mode='w+')
      proc = subprocess.Popen(command(step), cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                              text=True, env=env)
      running[step] = (proc, time.time(), log)
    time.sleep(0.5)
    over = time.time() - start > budget
    for step, (proc, t0, log) in list(running.items()):
      if proc.poll() is None and not over:
        continue
      stopped = proc.poll() is None
      if stopped:   # budget spent: stop it cleanly
        proc.terminate()
        try:
          proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
          proc.kill()
          proc.wait()
      stdout = proc.stdout.read()
      log.seek(0)
      stderr = log.read()
      log.close()
      del running[step]
      case = {'case': step, 'wall_s': time.time() - t0}
      if stopped:
        case.update(status='skipped', error=f'stopped: stage budget {budget:.0f} s spent')
        st['skipped'].append(step)
      elif proc.returncode == 0:
        result = json.loads([l for l in stdout.splitlines() if l.startswith('{')][-1])
        case.update(status='ok', updates=result['updates'], top1=result['top1'],
                    train_img_s=result['train_img_per_s'],
                    compile_s=result['times'].get('compile_s'),
                    init_s=result['times'].get('init_s'), eval_s=result['times'].get('eval_s'))
      else:
        case.update(status='failed', error=_one_line(stderr), returncode=proc.returncode)
      _report_case('a', case)
      st['cases'].append(case)
      save()
    if over:
      st['skipped'] += pending
      for step in pending:
        _log(f'a {step}: skipped (stage budget {budget:.0f} s spent)')
      pending = []


def _report_case(stage: str, case: dict) -> None:
  if case['status'] == 'failed':
    _log(f"FAILED stage {stage} case {case['case']}: {case.get('error')}")
    return
  if case['status'] == 'skipped':
    _log(f"{stage} {case['case']}: skipped ({case.get('error', 'stage budget spent')})")
    return
  keys = {'a': ('top1', 'train_img_s', 'compile_s'), 'e': ('top1', 'train_img_s', 'compile_s'),
          'c': ('fwd_ms', 'fwd_bwd_ms'), 'f': ('img_per_s', 'over_one_seed', 'compile_s'),
          'd': ('img_s', 'parent_ms', 'fed_over_synthetic')}.get(stage, ())
  shown = ', '.join(f'{k} {case[k]:.2f}' for k in keys if case.get(k) is not None)
  _log(f"{stage} {case['case']}: ok {shown}")


# --- stage b: the train step beside timm ----------------------------------------------------------

def stage_b(conf: dict, budget: float, st: dict, save) -> None:
  """Compiles every case's JAX step at once (one worker process each: compilation is CPU work and
  dominates on a GPU), starts the timm workers meanwhile, then times the cases one at a time, JAX
  alternating with timm (`bench.alternate`), closing each case's workers before the next."""
  from experiments.bench import timing as bench
  args = argparse.Namespace(torch_threads=min(8, os.cpu_count() or 2), malloc_tuning=True,
                            torch=True, torch_wait_policy='default', torch_format='channels_last',
                            rounds=conf['rounds'], round_seconds=conf['round_seconds'])
  if conf['device'] == 'cpu':   # the dry run on a small shared CPU: see bench._torch_worker
    args.torch_threads, args.torch_wait_policy = 2, 'passive'
  start = time.time()
  mm = bench.Worker('jax', args, JAX_ENV)
  try:
    matmul = max(mm.call('matmul', n=conf['matmul_n'])['gflops'])
  except RuntimeError as e:
    matmul = float('nan')
    _log(f'FAILED stage b case matmul: {_one_line(str(e))}')
  finally:
    mm.close()
  st['matmul_gflops'] = matmul
  cases = [(step, dtype, variant) for step in conf['steps'] for dtype in conf['dtypes']
           for variant in conf['variants']]
  size, batch = conf['size'], conf['batch']

  def case_name(step, dtype, variant):
    return f'{step} {dtype}' + ('' if variant == 'default' else f' {variant}')

  def compile_case(w, step, dtype, variant):
    if _forced('b', case_name(step, dtype, variant)):
      raise RuntimeError('forced failure (test)')
    # float32 is the default compute dtype: asked for by leaving dtype out, so that it runs
    # with or without NetConfig.dtype.
    extra = {} if dtype == 'float32' else {'dtype': dtype}
    return w.call('setup', step=step, size=size, batch=batch, scale='full', warmup=False, **extra)

  def record(c, measure) -> None:
    step, dtype, variant = c
    case = {'case': case_name(*c), 'step': step, 'dtype': dtype, 'variant': variant,
            'variant_env': VARIANTS[variant], 'shape': f'{size}x{size}', 'batch': batch,
            'timm': bench.TIMM_EQUIVALENT.get(step)}
    workers = {'jax': jax_workers[c]}
    try:
      measure(case, workers)
    except Exception as e:  # noqa: BLE001 - recorded, the next case runs
      case.update(status='failed', error=_one_line(str(e)))
      _report_case('b', case)
    finally:
      for w in workers.values():
        w.close()
      st['cases'].append(case)
      save()

  def timed(future, compiling_meanwhile):
    def measure(case, workers):
      setup = {'jax': future.result()}   # raises the compile's error
      case['compiling_meanwhile'] = compiling_meanwhile
      workers['jax'].call('run', n=2)   # warm-up
      workers['torch'], setup['torch'] = bench._torch_worker(   # pylint: disable=protected-access
          case['step'], size, batch, args, conf['device'], case['dtype'] == 'bfloat16')
      times, per_round = bench.alternate(workers, args.rounds, args.round_seconds)
      for k, w in workers.items():
        case[k] = {**bench.summarize(times[k], batch), **setup[k], **w.call('peak'),
                   **(w.call('device_peak') if conf['device'] != 'cpu' else {})}
        case[k].pop('config', None)
      flops = 3 * 2 * case['jax']['macs'] * batch
      for k in workers:
        case[k]['gflops'] = flops / case[k]['median_s'] / 1e9
      case['ratio'] = case['jax']['img_s'] / case['torch']['img_s']
      ratios = [r['torch'] / r['jax'] for r in per_round]
      case['ratio_rounds'] = [min(ratios), max(ratios)]
      case['status'] = 'ok'
      j, t = case['jax'], case['torch']
      _log(f"b {case['case']}: ok JAX {j['img_s']:.0f} img/s (compile {j['compile_s']:.1f} s, "
           f"peak {_f(j.get('device_peak_mb'), '.0f')} MB), timm {t['img_s']:.0f} img/s (peak "
           f"{_f(t.get('device_peak_mb'), '.0f')} MB), JAX/timm {case['ratio']:.2f}")
    return measure

  def skipped(case, workers):
    case.update(status='skipped', error=f'not compiled within the stage budget {budget:.0f} s')
    st['skipped'].append(case['case'])
    _report_case('b', case)

  jax_workers = {c: bench.Worker('jax', args, {**JAX_ENV, **VARIANTS[c[2]]}) for c in cases}
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    futures = {pool.submit(compile_case, w, *c): c for c, w in jax_workers.items()}
    # Timed in the order the compiles finish, so that a slow compile costs its own case only (a
    # GPU run once waited minutes on one: docs/gpu.md); a case timed while others still compile
    # shares the CPU and the GPU with them, and says how many ('compiling_meanwhile').
    done = set()
    try:
      for future in concurrent.futures.as_completed(
          futures, timeout=max(0.0, budget - (time.time() - start))):
        if time.time() - start > budget:
          break
        done.add(future)
        record(futures[future], timed(future, sum(not f.done() for f in futures)))
    except concurrent.futures.TimeoutError:
      pass
    for w in jax_workers.values():   # budget spent: stop every compile still running
      if w.proc.poll() is None:
        w.proc.kill()
    for future, c in futures.items():
      if future not in done:
        record(c, skipped)


# --- stage e: the GPU ladder (make ladder-gpu) ---------------------------------------------------

def _read_csv(path: str) -> list[dict]:
  import csv
  try:
    with open(path, newline='') as f:
      return list(csv.DictReader(f))
  except OSError:
    return []


def _read_jsonl(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return [json.loads(l) for l in f if l.strip()]
  except (OSError, ValueError):
    return []


def _stop_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
  """SIGTERM to the ladder and its trainers (each saves a checkpoint and exits); SIGKILL to what is
  left after `grace` seconds."""
  import signal
  try:
    os.killpg(proc.pid, signal.SIGTERM)
  except ProcessLookupError:
    return
  deadline = time.time() + grace
  while time.time() < deadline:
    try:
      os.killpg(proc.pid, 0)
    except ProcessLookupError:
      break
    proc.poll()
    time.sleep(0.5)
  else:
    try:
      os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  proc.wait()


def stage_e(conf: dict, budget: float, out_dir: str, st: dict, save) -> None:
  """The ladder `make ladder-gpu` trains, through `python -m experiments.ladder run --share-device`
  (its own process group, stopped at the budget), in a temporary OUT (removed at the end, what is
  kept copied to OUT_DIR/ladder_gpu) with a fresh compilation cache; one case per run as its row
  and run time arrive; then `ladder show`, the summary (`st['ladder']`) and each step's top-1
  beside the committed CPU ladder's (`st['steps']`)."""
  work = tempfile.mkdtemp(prefix='gpu_check_e_')
  try:
    _ladder_e(conf, budget, out_dir, st, save, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _ladder_e(conf: dict, budget: float, out_dir: str, st: dict, save, work: str) -> None:
  from modernize import LADDER
  adopted = LADDER.names(include_side=False)
  steps = adopted if conf['steps'] == 'adopted' else [adopted[0], adopted[-1]]
  ladder_out = os.path.join(work, 'ladder')
  options = conf['options'] + (f",epochs={conf['epochs']:g}" if conf.get('epochs') else '')
  command = ['-m', 'experiments.ladder', 'run', '--out', ladder_out, '--steps', ','.join(steps),
             '--seeds', str(conf['seeds']), '--jobs', str(conf['jobs']), '--share-device',
             '--options', options, '--set', f"data.placement={conf['placement']}",
             '--set', f"steps_per_dispatch={conf['steps_per_dispatch']}"]
  if _forced('e', 'ladder'):
    command += ['--set', 'model.no_such_flag=1']
  # The trainers preallocate their share of the GPU (--share-device), as under make ladder-gpu.
  env = {**os.environ, **{k: v for k, v in JAX_ENV.items() if k != 'XLA_PYTHON_CLIENT_PREALLOCATE'},
         'MODERNIZE_COMPILATION_CACHE': os.path.join(work, 'jax_cache'),
         'PYTHONPATH': os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))}
  st['command'] = 'python ' + ' '.join(command)
  planned = [(step, seed) for seed in range(conf['seeds']) for step in steps]
  table, times_file = (os.path.join(ladder_out, f) for f in ('steps.csv', 'run_times.jsonl'))
  recorded = {}

  def record_new() -> None:
    rows = {(r['step'], int(r['seed'])): r for r in _read_csv(table)}
    for t in _read_jsonl(times_file):   # a run's times are written after its row
      pair = (t['step'], int(t['seed']))
      if pair in recorded or pair not in rows:
        continue
      r = rows[pair]
      case = {'case': f'{pair[0]} seed {pair[1]}', 'status': 'ok', 'step': pair[0],
              'seed': pair[1], 'updates': int(r['steps']), 'batch': int(r['batch_size']),
              'top1': float(r['top1']), 'train_img_s': float(r['train_img_per_s']),
              'placement': r.get('placement'), 'device_kind': r.get('device_kind'),
              'compile_s': t.get('compile_s'), 'train_s': t.get('train_s'),
              'eval_s': t.get('eval_s'), 'wall_s': t.get('seconds')}
      recorded[pair] = case
      _report_case('e', case)
      st['cases'].append(case)
      save()

  log = tempfile.TemporaryFile(mode='w+')
  start = time.time()
  proc = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
  stopped = False
  try:
    while proc.poll() is None:
      if time.time() - start > budget:
        stopped = True
        _stop_group(proc)
        break
      record_new()
      time.sleep(1.0)
  finally:
    if proc.poll() is None:
      _stop_group(proc, grace=10.0)
  wall = time.time() - start
  record_new()
  log.seek(0)
  output = log.read()
  log.close()
  runs = list(recorded.values())
  images = sum(c['updates'] * c['batch'] for c in runs)
  train_s = sum(c['train_s'] or 0.0 for c in runs)
  jobs = min(conf['jobs'], len(runs)) or 1
  st['ladder'] = {'planned': len(planned), 'runs': len(runs), 'steps': len(steps),
                  'seeds': conf['seeds'], 'jobs': conf['jobs'], 'options': options,
                  'placement': conf['placement'], 'steps_per_dispatch': conf['steps_per_dispatch'],
                  'epochs': conf.get('epochs'), 'wall_s': wall, 'images': images,
                  'aggregate_img_s': images / wall if runs else None,
                  'training_img_s': images / (train_s / jobs) if train_s else None,
                  'train_s': train_s, 'compile_s': sum(c['compile_s'] or 0.0 for c in runs)}
  if not stopped and proc.returncode != 0:
    save()
    raise RuntimeError(f'ladder exited {proc.returncode}: {_one_line(output)}')
  for pair in planned:
    if pair not in recorded:
      case = {'case': f'{pair[0]} seed {pair[1]}', 'step': pair[0], 'seed': pair[1]}
      case.update(status='skipped', error=f'not trained within the stage budget {budget:.0f} s')
      st['skipped'].append(case['case'])
      st['cases'].append(case)
  keep = os.path.join(out_dir, 'ladder_gpu')
  os.makedirs(keep, exist_ok=True)
  if runs:
    show = [sys.executable, '-m', 'experiments.ladder', 'show', '--out', ladder_out]
    shown = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    if shown.returncode:   # e.g. no matplotlib: ladder.md and ladder.json are written first
      st['show_error'] = _one_line(shown.stderr)
  for name in ('steps.csv', 'run_times.jsonl', 'ladder.md', 'ladder.json', 'ladder.png'):
    if os.path.exists(os.path.join(ladder_out, name)):
      shutil.copyfile(os.path.join(ladder_out, name), os.path.join(keep, name))
  st['steps'], st['cpu_ladder'] = _beside_cpu(os.path.join(ladder_out, 'ladder.json'))
  save()


def _ladder_steps(path: str) -> dict:
  """Step name -> (mean top-1, n) of the first group of a `ladder show` ladder.json."""
  try:
    with open(path) as f:
      groups = json.load(f).get('groups') or [{}]
  except (OSError, ValueError):
    return {}
  return {s['name']: (s.get('mean'), s.get('n')) for s in groups[0].get('steps', [])}


def _beside_cpu(path: str) -> tuple[list[dict], str | None]:
  """Each step of the ladder.json at `path` beside the committed CPU ladder's (`CPU_LADDER`)."""
  here = _ladder_steps(path)
  cpu_path = os.path.join(ROOT, CPU_LADDER)
  cpu = _ladder_steps(cpu_path)
  rows = []
  for name, (mean, n) in here.items():
    cpu_mean, cpu_n = cpu.get(name, (None, None))
    rows.append({'step': name, 'top1': mean, 'n': n, 'cpu_top1': cpu_mean, 'cpu_n': cpu_n,
                 'difference': None if mean is None or cpu_mean is None else mean - cpu_mean})
  return rows, (CPU_LADDER if cpu else None)


# --- the run --------------------------------------------------------------------------------------

def parse_args(argv):
  p = ArgumentParser(prog='python -m experiments.bench.gpu_check', description=__doc__)
  p.add_argument('--out', help='directory for gpu_check.json and gpu_check.md')
  p.add_argument('--stages', default=DEFAULT_STAGES,
                 help=f"comma-separated subset of {','.join(STAGES)} (default %(default)s)")
  p.add_argument('--dry-run', action='store_true', help='tiny sizes on the CPU, same code paths')
  for s in STAGES:
    p.add_argument(f'--budget-{s}', type=float, default=BUDGETS[s],
                   help=f'seconds for stage {s} (default %(default)s)')
  p.add_argument('--b-steps', help='stage b\'s ladder steps, comma-separated '
                 '(default convnext_t,resnet50)')
  p.add_argument('--b-variants', default='default',
                 help=f"stage b's variants of the JAX step, comma-separated, from "
                      f"{','.join(VARIANTS)} (default %(default)s)")
  p.add_argument('--e-seeds', type=positive(int),
                 help=f"stage e's seeds per step (default {GPU_LADDER['seeds']})")
  p.add_argument('--e-epochs', type=positive(float),
                 help="stage e's epochs per run (default: the miniature's, 4)")
  p.add_argument('--e-jobs', type=positive(int),
                 help=f"stage e's trainer processes sharing the GPU (default {GPU_LADDER['jobs']})")
  p.add_argument('--worker', choices=['env', 'c', 'd', 'f'], help=argparse.SUPPRESS)
  p.add_argument('--conf', help=argparse.SUPPRESS)
  p.add_argument('--budget', type=float, help=argparse.SUPPRESS)
  return p.parse_args(argv)


@guarded
def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    conf = json.loads(args.conf) if args.conf else {}
    {'env': lambda: worker_env(), 'c': lambda: worker_c(conf, args.budget),
     'd': lambda: worker_d(conf, args.budget), 'f': lambda: worker_f(conf, args.budget)}[
         args.worker]()
    return 0
  stages = names(args.stages, STAGES, 'stage', '--stages')
  if not stages:
    raise UsageError(f"--stages: give at least one of {','.join(STAGES)}")
  if not args.out:
    raise UsageError('--out DIR is required')
  variants = names(args.b_variants, VARIANTS, 'variant', '--b-variants')
  if not variants:
    raise UsageError(f"--b-variants: give at least one of {','.join(VARIANTS)}")
  from experiments.bench.timing import TIMM_EQUIVALENT
  b_steps = names(args.b_steps, TIMM_EQUIVALENT, 'step with a timm counterpart',
                  '--b-steps')
  for s in STAGES:
    if getattr(args, f'budget_{s}') <= 0:
      raise UsageError(f'--budget-{s} must be positive')
  problem = outputs.write_problem(args.out, directory=True)
  if problem:
    raise UsageError(f'--out {args.out} {problem}')
  os.makedirs(args.out, exist_ok=True)
  if args.dry_run:   # the CPU only, whatever the machine has
    JAX_ENV['JAX_PLATFORMS'] = 'cpu'
    JAX_ENV['CUDA_VISIBLE_DEVICES'] = ''
  conf = settings(args.dry_run, b_steps, variants, args.e_seeds, args.e_epochs, args.e_jobs)
  given = sys.argv[1:] if argv is None else list(argv)   # as typed, without this machine's path
  report = Report(args.out, args, conf, ' '.join(['python -m experiments.bench.gpu_check', *given]))
  t_start = time.time()

  def run_stage(name, fn):
    st = report.stage(name)
    t0 = time.time()
    _log(f'== stage {name}: {STAGE_NAMES[name]}')
    try:
      fn(st)
      st['status'] = 'stopped (budget)' if st['skipped'] else 'done'
    except Exception as e:  # noqa: BLE001 - one line, then the next stage
      st['status'] = 'failed'
      st['error'] = _one_line(f'{type(e).__name__}: {e}')
      _log(f"FAILED stage {name}: {st['error']}")
    st['wall_s'] = time.time() - t0
    report.save()

  def streamed(name, budget):
    def fn(st):
      def on_case(case):
        if case['status'] == 'skipped':
          st['skipped'].append(case['case'])
        _report_case(name, case)
        st['cases'].append(case)
        report.save()
      error = _stream(name, ['--conf', json.dumps(conf.get(name, {})), '--budget', str(budget)],
                      budget + 60, on_case)
      if error:
        raise RuntimeError(error)
    return fn

  run_stage('env', streamed('env', 60))
  for s in stages:
    budget = getattr(args, f'budget_{s}')
    if s == 'a':
      run_stage('a', lambda st: stage_a(conf['a'], budget, args.out, st, report.save))
    elif s == 'b':
      run_stage('b', lambda st: stage_b(conf['b'], budget, st, report.save))
    elif s == 'e':
      run_stage('e', lambda st: stage_e(conf['e'], budget, args.out, st, report.save))
    else:
      run_stage(s, streamed(s, budget))
  report.data['wall_s'] = time.time() - t_start
  report.save()
  failed = sum(report.data['failed'].values())
  _log(f"gpu_check: {time.time() - t_start:.0f} s, {failed} failed case(s); "
       f"{os.path.join(args.out, 'gpu_check.json')}, gpu_check.md")
  return 0


if __name__ == '__main__':
  sys.exit(main())
