"""experiments.bench: its statistics, its table, its errors, and one real (tiny) run end to end.

No speed is asserted anywhere: the run checks that every number the table shows is measured and
consistent with the others (images/s = batch / median step time, FLOP rate from the counted MACs).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench import timing as bench

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  return subprocess.run([sys.executable, '-m', 'experiments.bench', *args], capture_output=True,
                        text=True, cwd=ROOT, env=env, timeout=timeout)


def test_summarize_reports_rates_at_the_median_and_quartiles():
  times = [0.5, 0.1, 0.2, 0.3, 0.4]        # unordered on purpose
  s = bench.summarize(times, batch=8)
  assert s['steps'] == 5 and s['median_s'] == pytest.approx(0.3)
  assert s['img_s'] == pytest.approx(8 / 0.3)
  assert s['img_s_min'] == pytest.approx(8 / 0.5) and s['img_s_max'] == pytest.approx(8 / 0.1)
  # The rate's lower quartile comes from the step time's upper quartile.
  assert s['img_s_q1'] == pytest.approx(8 / 0.4) and s['img_s_q3'] == pytest.approx(8 / 0.2)


@pytest.mark.parametrize('args, message', [
    (['--steps', 'resnet51'], "unknown step 'resnet51'"),
    (['--shapes', '32x64'], "'32x64' is not a square"),
    (['--shapes', '4x4'], 'at least 8x8'),
    (['--batch', '0'], '--batch: must be at least 1'),
    (['--rounds', '0'], '--rounds'),
])
def test_bad_arguments_exit_2_with_one_message(args, message):
  r = _run(*args, timeout=120)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and 'Traceback' not in r.stderr


def test_data_bench_without_grain_says_so_in_one_line_before_any_work():
  code = ("import sys; sys.modules['grain'] = None; from experiments.bench import data; "
          "sys.exit(data.main(['--kinds', 'threads,grain']))")
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                     env=env, timeout=120)
  assert r.returncode == 2 and not r.stdout, (r.stdout, r.stderr)
  assert r.stderr.strip() == 'error: --kinds grain: grain is not installed here (pip install grain)'


def _check_train_record(r, batch):
  assert r['kind'] == 'train' and 'error' not in r, r
  j = r['jax']
  assert j['steps'] >= 2 and j['compile_s'] > 0
  assert j['img_s'] == pytest.approx(batch / j['median_s'])
  assert j['gflops'] == pytest.approx(6 * j['macs'] * batch / j['median_s'] / 1e9)
  assert 0 < j['matmul_fraction'] and j['peak_rss_mb'] > 100
  return j


def test_tiny_run_without_torch(tmp_path):
  r = _run('--steps', 'resnet50,patchify_stem', '--shapes', '16x16', '--batch', '2', '--rounds',
           '1', '--round-seconds', '0.05', '--no-torch', '--no-cpu-ladder', '--json')
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in r.stdout.splitlines()]
  assert records[0]['kind'] == 'matmul' and records[0]['jax_gflops_max'] > 0
  train = records[1:]
  assert [t['step'] for t in train] == ['resnet50', 'patchify_stem']
  for t in train:
    _check_train_record(t, 2)
    assert 'torch' not in t and 'ratio' not in t
  assert train[0]['timm'] and not train[1]['timm']
  # The table (on stderr with --json) names both rows and says why there is no ratio.
  assert 'not run' in r.stderr and 'no timm' in r.stderr


def test_print_table_renders_every_kind_of_record():
  rate = bench.summarize([0.1, 0.2], 4)
  jax = {**rate, 'gflops': 1.0, 'matmul_fraction': 0.5, 'compile_s': 2.0, 'peak_rss_mb': 900.0}
  records = [
      {'kind': 'matmul', 'n': 2048, 'jax_gflops_max': 2.0, 'jax_gflops_median': 1.9},
      {'kind': 'train', 'step': 'resnet50', 'shape': '32x32', 'batch': 4, 'timm': 'timm resnet50',
       'jax': jax, 'torch': {**jax, 'peak_rss_mb': 800.0}, 'ratio': 1.0,
       'ratio_rounds': [0.9, 1.1], 'load_avg_start': 0.5},
      {'kind': 'train', 'step': 'gelu', 'shape': '32x32', 'batch': 4, 'error': 'worker died'},
      {'kind': 'cpu_ladder', 'step': 'gelu', 'batch': 128, 'width': 32, 'depths': [1, 1, 3, 1],
       'train': {**rate, 'compile_s': 3.0}},
      {'kind': 'data', **rate, 'data': 'fashion_mnist', 'image_size': 32, 'channels': 1,
       'batch': 128, 'workers': 1, 'data_over_train': 6.5},
  ]
  out = io.StringIO()
  bench.print_table(records, out)
  text = out.getvalue()
  for expected in ('2 GFLOP/s best', '1.00 (0.90-1.10)', '900/800', 'error: worker died',
                   'width  32', '6.5x the fastest'):
    assert expected in text, (expected, text)


@pytest.mark.torch
def test_tiny_run_beside_timm():
  """JAX and timm alternate in one run; the ratio is the ratio of the two medians."""
  r = _run('--steps', 'convnext_t', '--shapes', '32x32', '--batch', '2', '--rounds', '2',
           '--round-seconds', '0.05', '--no-cpu-ladder', '--torch-wait-policy', 'passive',
           '--json')
  assert r.returncode == 0, r.stderr[-3000:]
  records = [json.loads(line) for line in r.stdout.splitlines()]
  assert records[0]['torch_gflops_max'] > 0
  t = records[1]
  j = _check_train_record(t, 2)
  torch = t['torch']
  assert torch['params'] == j['params']             # the same network on both sides
  assert t['ratio'] == pytest.approx(j['img_s'] / torch['img_s'])
  lo, hi = t['ratio_rounds']
  assert 0 < lo <= hi
