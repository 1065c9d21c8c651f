"""experiments.bench.gpu_check: the GPU acceptance run's dry run on the CPU, its failure handling,
its budgets and its command-line errors. No speed is asserted."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None, timeout=600):
  env = {**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})}
  return subprocess.run([sys.executable, '-m', 'experiments.bench.gpu_check', *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def _stage_cases(data, stage):
  return {c['case']: c for c in data['stages'][stage]['cases']}


def test_dry_run_writes_every_stage_and_records_a_forced_failure(tmp_path):
  out = tmp_path / 'out'
  # The last ladder step fails (a bad trainer flag, through the trainer's own error path): it is
  # recorded as failed in one line and the run goes on to every other stage, exit code 0.
  r = _run('--out', str(out), '--dry-run', env={'MODERNIZE_GPU_CHECK_FAIL': 'a:convnext_t'})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  data = json.loads((out / 'gpu_check.json').read_text())
  assert set(data['stages']) == {'env', 'a', 'b', 'c', 'd'}
  assert data['dry_run'] is True
  env = data['stages']['env']['cases'][0]
  assert env['status'] == 'ok' and env['versions']['jax'] and env['cpu_count'] >= 1
  a = _stage_cases(data, 'a')
  assert a['resnet50']['status'] == 'ok' and a['resnet50']['updates'] == 3
  assert 0 <= a['resnet50']['top1'] <= 100 and a['resnet50']['compile_s'] > 0
  assert a['convnext_t']['status'] == 'failed' and 'no_such_flag' in a['convnext_t']['error']
  assert data['failed']['a'] == 1
  failed_lines = [l for l in r.stdout.splitlines() if l.startswith('FAILED stage a')]
  assert len(failed_lines) == 1 and 'convnext_t' in failed_lines[0]
  # Stage b: every (model, dtype) case is there, timed or failed with an error line.
  b = data['stages']['b']['cases']
  assert {(c['step'], c['dtype']) for c in b} == {('convnext_t', 'float32'),
                                                  ('convnext_t', 'bfloat16')}
  for c in b:
    assert c['status'] == 'ok' or (c['status'] == 'failed' and c['error']), c
  assert all(c['status'] == 'ok' for c in data['stages']['c']['cases'])
  d = _stage_cases(data, 'd')
  assert set(d) == {f'{source} {n} {kind}' for source in ('fashion_mnist', 'jpeg')
                    for kind in ('threads', 'processes') for n in (2, 1)} | {
                        'resnet50 bfloat16 fed'}
  for name, c in d.items():
    assert c['status'] == 'ok' and c['img_s'] > 0, c
    if name.endswith('fed'):   # trained from the pipeline, and on one synthetic batch
      assert c['synthetic_img_s'] > 0 and c['finite'] and c['workers'] == 2
    else:
      assert c['parent_ms'] >= 0 and c['img_s_per_worker'] == c['img_s'] / c['workers']
  md = (out / 'gpu_check.md').read_text()
  for heading in ('## a:', '## b:', '## c:', '## d:', 'failed convnext_t'):
    assert heading in md, heading
  assert 'Traceback' not in r.stdout


def test_stages_past_their_budget_record_what_they_skipped(tmp_path):
  # Stage b's budget runs out while its JAX workers compile: they are stopped, not waited for.
  # Stage b lists one case per (model, dtype, variant).
  r = _run('--out', str(tmp_path), '--dry-run', '--stages', 'b,d', '--budget-b', '0.0001',
           '--budget-d', '0.0001', '--b-variants', 'default,shift',
           env={'MODERNIZE_GPU_CHECK_FAIL': ''})
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads((tmp_path / 'gpu_check.json').read_text())
  assert data['command'] == (f'python -m experiments.bench.gpu_check --out {tmp_path} --dry-run '
                             '--stages b,d --budget-b 0.0001 --budget-d 0.0001 --b-variants '
                             'default,shift')   # as typed, no machine's path
  for stage, n in (('b', 4), ('d', 9)):   # d: 2 sources x (2 threads + 2 processes), the fed run
    st = data['stages'][stage]
    assert st['status'] == 'stopped (budget)', st
    assert len(st['skipped']) == n and all(c['status'] == 'skipped' for c in st['cases'])
  assert data['stages']['b']['wall_s'] < 60
  assert set(data['stages']['b']['skipped']) == {
      'convnext_t float32', 'convnext_t bfloat16', 'convnext_t float32 shift',
      'convnext_t bfloat16 shift'}
  assert 'Skipped (budget' in (tmp_path / 'gpu_check.md').read_text()


def test_a_rerun_of_one_stage_keeps_the_others(tmp_path):
  (tmp_path / 'gpu_check.json').write_text(json.dumps(
      {'stages': {'a': {'name': 'ladder on Fashion-MNIST', 'status': 'done', 'cases': [],
                        'skipped': []}}}))
  r = _run('--out', str(tmp_path), '--dry-run', '--stages', 'd', '--budget-d', '0.0001')
  assert r.returncode == 0, r.stderr[-3000:]
  data = json.loads((tmp_path / 'gpu_check.json').read_text())
  assert set(data['stages']) == {'env', 'a', 'd'} and data['stages']['a']['status'] == 'done'


def test_bad_stages_exit_2_with_one_line(tmp_path):
  r = _run('--out', str(tmp_path), '--stages', 'x', timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --stages: unknown stage 'x'; choose from a,b,c,d,e,f"]
  assert not (tmp_path / 'gpu_check.json').exists()
  r = _run('--out', str(tmp_path), '--b-variants', 'default,fast', timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --b-variants: unknown variant 'fast'; choose from default,shift,cpu-paths"]


def test_bad_stage_e_settings_exit_2_with_one_line(tmp_path):
  for args, message in (
      (('--budget-e', '0'), 'error: --budget-e must be positive'),
      (('--budget-e', '-5'), 'error: --budget-e must be positive'),
      (('--e-seeds', '0'), "error: argument --e-seeds: 0 is not positive"),
      (('--e-epochs', 'four'), "error: argument --e-epochs: 'four' is not a number"),
      (('--e-jobs', '1.5'), "error: argument --e-jobs: '1.5' is not an integer")):
    r = _run('--out', str(tmp_path), '--stages', 'e', *args, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (args, r.stderr)
  assert not (tmp_path / 'gpu_check.json').exists()


def test_stage_e_trains_the_make_ladder_gpu_ladder():
  """Stage e's ladder is the one `make ladder-gpu` trains: the Makefile's options, seeds and
  jobs, the data on the device, 8 updates per dispatch, the jobs sharing the device."""
  from experiments.bench import gpu_check
  make = (ROOT / 'Makefile').read_text()
  variables = dict(l.split(' ?= ', 1) for l in make.splitlines() if ' ?= ' in l)
  conf = gpu_check.settings(False)['e']
  assert conf['steps'] == 'adopted' and conf['epochs'] is None
  assert conf['options'] == variables['LADDER_OPTIONS']
  assert conf['seeds'] == int(variables['LADDER_SEEDS'])
  assert conf['jobs'] == int(variables['LADDER_GPU_JOBS'])
  recipe = make.split('\nladder-gpu:', 1)[1].split('\n\n', 1)[0]
  for flag in ('--share-device', f"--set data.placement={conf['placement']}",
               f"--set steps_per_dispatch={conf['steps_per_dispatch']}", '--seeds $(LADDER_SEEDS)',
               '--jobs $(LADDER_GPU_JOBS)', '--options $(LADDER_OPTIONS)', '--show'):
    assert flag in recipe, flag
  assert gpu_check.settings(True, e_seeds=2, e_epochs=1.5, e_jobs=3)['e'] == {
      **gpu_check.settings(True)['e'], 'seeds': 2, 'epochs': 1.5, 'jobs': 3}


def test_stage_e_dry_run_trains_the_ladder_with_the_data_on_the_device(tmp_path):
  out = tmp_path / 'out'
  r = _run('--out', str(out), '--dry-run', '--stages', 'e', env={'MODERNIZE_GPU_CHECK_FAIL': ''})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  data = json.loads((out / 'gpu_check.json').read_text())
  assert set(data['stages']) == {'env', 'e'} and data['failed']['e'] == 0
  e = data['stages']['e']
  assert e['status'] == 'done' and not e['skipped'], e
  runs = _stage_cases(data, 'e')
  assert set(runs) == {'resnet50 seed 0', 'convnext_t seed 0'}
  for c in runs.values():
    assert c['status'] == 'ok' and c['placement'] == 'device' and 0 <= c['top1'] <= 100, c
    assert c['updates'] > 0 and c['batch'] == 32 and c['compile_s'] > 0 and c['train_s'] > 0
  lad = e['ladder']
  assert {'wall_s', 'aggregate_img_s', 'training_img_s', 'images', 'compile_s', 'train_s', 'runs',
          'planned', 'jobs', 'seeds', 'placement', 'steps_per_dispatch'} <= set(lad)
  assert lad['runs'] == lad['planned'] == 2 and lad['placement'] == 'device'
  assert lad['images'] == sum(c['updates'] * c['batch'] for c in runs.values())
  assert lad['aggregate_img_s'] == pytest.approx(lad['images'] / lad['wall_s'])
  # Each step's top-1 beside the committed CPU ladder's.
  assert e['cpu_ladder'] == 'results/ladder_4ep/ladder.json'
  steps = {s['step']: s for s in e['steps']}
  assert set(steps) == {'resnet50', 'convnext_t'}
  for name, s in steps.items():
    assert s['n'] == 1 and s['top1'] == pytest.approx(runs[f'{name} seed 0']['top1'])
    assert s['cpu_n'] == 4 and s['difference'] == pytest.approx(s['top1'] - s['cpu_top1'])
  # The runs shared the device: no job was pinned to a share of the cores.
  rows = list(csv.DictReader((out / 'ladder_gpu' / 'steps.csv').open()))
  assert {r['cpu_cores'] for r in rows} == {str(len(os.sched_getaffinity(0)))}
  assert {'steps.csv', 'run_times.jsonl', 'ladder.md', 'ladder.json'} <= set(
      os.listdir(out / 'ladder_gpu'))
  md = (out / 'gpu_check.md').read_text()
  assert '## e: the GPU ladder' in md and '| resnet50 | ' in md and 'img/s aggregate' in md


def test_stage_e_past_its_budget_or_failing_records_it(tmp_path):
  r = _run('--out', str(tmp_path / 'budget'), '--dry-run', '--stages', 'e', '--budget-e', '0.0001')
  assert r.returncode == 0, r.stderr[-3000:]
  e = json.loads((tmp_path / 'budget' / 'gpu_check.json').read_text())['stages']['e']
  assert e['status'] == 'stopped (budget)' and e['wall_s'] < 60, e
  assert set(e['skipped']) == {'resnet50 seed 0', 'convnext_t seed 0'}
  assert e['ladder']['runs'] == 0 and e['ladder']['aggregate_img_s'] is None
  # The ladder itself failing (a bad trainer flag): the stage fails in one line, exit code 0.
  r = _run('--out', str(tmp_path / 'failed'), '--dry-run', '--stages', 'e',
           env={'MODERNIZE_GPU_CHECK_FAIL': 'e:ladder'})
  assert r.returncode == 0, r.stderr[-3000:]
  e = json.loads((tmp_path / 'failed' / 'gpu_check.json').read_text())['stages']['e']
  assert e['status'] == 'failed' and 'no_such_flag' in e['error'] and '\n' not in e['error'], e
  assert [l for l in r.stdout.splitlines() if l.startswith('FAILED stage e')]


def test_stage_f_dry_run_times_both_kinds_and_records_a_forced_failure(tmp_path):
  """Stage f: experiments.bench.seeds at the dry run's sizes (convnext_t smoke, 1 and 2 seeds),
  vmap and processes, with the equivalence check; a case forced to fail is recorded as failed."""
  from experiments.bench import gpu_check
  assert 'f' not in gpu_check.DEFAULT_STAGES.split(',')
  out = tmp_path / 'out'
  r = _run('--out', str(out), '--dry-run', '--stages', 'f',
           env={'MODERNIZE_GPU_CHECK_FAIL': 'f:convnext_t processes x2'})
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  data = json.loads((out / 'gpu_check.json').read_text())
  assert set(data['stages']) == {'env', 'f'} and data['failed']['f'] == 1
  f = data['stages']['f']
  assert f['status'] == 'done' and not f['skipped'], f
  cases = _stage_cases(data, 'f')
  assert set(cases) == {f'convnext_t {kind} x{n}' for kind in ('vmap', 'processes')
                        for n in (1, 2)}
  assert cases['convnext_t processes x2']['status'] == 'failed'
  for name, c in cases.items():
    if name != 'convnext_t processes x2':
      assert c['status'] == 'ok' and c['img_per_s'] > 0 and c['compile_s'] > 0, c
  check = cases['convnext_t vmap x2']['check']
  assert check['updates'] == 2 and check['other_seed_min_diff'] > 1000 * check['max_abs_diff']
  md = (out / 'gpu_check.md').read_text()
  assert '## f: several runs per chip' in md and '| convnext_t | vmap | 2 | ok |' in md
  assert 'failed convnext_t processes x2' in md


def test_stage_f_past_its_budget_records_what_it_skipped(tmp_path):
  r = _run('--out', str(tmp_path), '--dry-run', '--stages', 'f', '--budget-f', '0.0001')
  assert r.returncode == 0, r.stderr[-3000:]
  f = json.loads((tmp_path / 'gpu_check.json').read_text())['stages']['f']
  assert f['status'] == 'stopped (budget)' and f['wall_s'] < 60, f
  assert set(f['skipped']) == {f'convnext_t {kind} x{n}' for kind in ('vmap', 'processes')
                               for n in (1, 2)}
