"""One command-line contract for the suite's nine commands (experiments/cli.py): --help exits 0;
a bad flag, a bad value and an unknown name each end in exactly one line on stderr and exit 2,
before any work. Real processes, as a user runs them."""

import argparse
import os
import subprocess
import sys

import pytest

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ['--config=configs/ladder.py:convnext_t,smoke', '--workdir={tmp}/run']

# command: (bad flag, bad value, unknown name), each the arguments after the command.
CASES = {
    'experiments.train': (
        [*TRAIN, '--no-such-flag'],
        [*TRAIN, '--config.batch_size=many'],
        ['--config=configs/ladder.py:convnext_q', '--workdir={tmp}/run']),
    'experiments.ladder': (
        ['steps', '--no-such-flag'],
        ['run', '--out', '{tmp}/ladder', '--seeds', 'many'],
        ['run', '--out', '{tmp}/ladder', '--steps', 'convnext_q']),
    'experiments.analyze': (
        ['cka', '--out', '{tmp}', '--no-such-flag'],
        ['cka', '--out', '{tmp}', '--batch-size', '-3'],
        ['cka', '--out', '{tmp}', '--reference', 'swin_x']),
    'experiments.data': (
        ['info', 'fashion_mnist', '--no-such-flag'],
        ['describe', 'fashion_mnist'],
        ['info', 'cifar11']),
    'experiments.bench': (
        ['--no-such-flag'],
        ['--rounds', 'many'],
        ['--steps', 'convnext_q']),
    'experiments.bench.gpu_check': (
        ['--no-such-flag'],
        ['--out', '{tmp}', '--budget-a', 'many'],
        ['--out', '{tmp}', '--stages', 'a,x']),
    'experiments.bench.data': (
        ['--no-such-flag'],
        ['--batch-size', '0'],
        ['--data', 'cifar11']),
    'experiments.bench.seeds': (
        ['--no-such-flag'],
        ['--updates', 'many'],
        ['--step', 'convnext_q']),
    'experiments.bench.depthwise': (
        ['--no-such-flag'],
        ['--repeats', '0'],
        ['--impls', 'fast']),
}


def _run(command, args, tmp_path):
  args = [a.replace('{tmp}', str(tmp_path)) for a in args]
  return subprocess.run([sys.executable, '-m', command, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('command', sorted(CASES))
def test_help_exits_0_and_bad_input_is_one_line_and_exit_2(command, tmp_path):
  res = _run(command, ['--help'], tmp_path)
  assert res.returncode == 0 and 'usage' in res.stdout.lower() + res.stderr.lower(), res.stderr
  for kind, args in zip(('bad flag', 'bad value', 'unknown name'), CASES[command]):
    res = _run(command, args, tmp_path)
    assert res.returncode == 2, (kind, res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), (kind, res.stderr[-2000:])
    assert not res.stdout.strip(), (kind, res.stdout[-2000:])   # nothing started
  if command == 'experiments.train':   # and the run never began
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_names_and_positive():
  assert cli.names(' a, b,,c ') == ['a', 'b', 'c'] and cli.names(None) == []
  assert cli.names('b,a', known=('a', 'b')) == ['b', 'a']
  with pytest.raises(cli.UsageError, match=r"^--steps: unknown step 'x'; choose from a,b$"):
    cli.names('a,x', known=('a', 'b'), what='step', flag='--steps')
  assert cli.positive()('3') == 3 and cli.positive(float)('0.5') == 0.5
  for bad in ('0', '-1', 'x', '1.5'):
    with pytest.raises(argparse.ArgumentTypeError):
      cli.positive()(bad)
