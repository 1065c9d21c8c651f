"""experiments.bench.gpu_check: the GPU acceptance run's dry run on the CPU, its failure handling,
its budgets and its command-line errors. No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
      "error: --stages: unknown stage 'x'; choose from a,b,c,d"]
  assert not (tmp_path / 'gpu_check.json').exists()
  r = _run('--out', str(tmp_path), '--b-variants', 'default,fast', timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --b-variants: unknown variant 'fast'; choose from default,shift,cpu-paths"]
