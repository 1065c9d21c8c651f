"""The code's style, checked: ruff (pyproject.toml: 100 columns, import order, pyflakes) over the
whole tree, and what ruff's pycodestyle rules cannot check, blocks indented in steps of exactly 2
spaces (its E111 knows only multiples of 4)."""

import os
import shutil
import subprocess
import sys
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ('.venv', 'build', 'results', 'runs', '.git', '.pytest_cache')


def _python_files():
  for base, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith('.egg-info')]
    for name in files:
      if name.endswith('.py'):
        yield os.path.join(base, name)


def indentation_problems(path: str) -> list[str]:
  """'PATH:LINE: ...' for each block that is not indented 2 spaces deeper than the one around it
  (or that uses a tab)."""
  problems, levels = [], [0]
  with open(path, 'rb') as f:
    for token in tokenize.tokenize(f.readline):
      if token.type == tokenize.INDENT:
        text = token.string
        if '\t' in text:
          problems.append(f'{path}:{token.start[0]}: a tab in the indentation')
        width = len(text.expandtabs(8))
        if width != levels[-1] + 2:
          problems.append(f'{path}:{token.start[0]}: indented {width - levels[-1]} spaces, not 2')
        levels.append(width)
      elif token.type == tokenize.DEDENT:
        levels.pop()
  return problems


def test_blocks_are_indented_two_spaces(tmp_path):
  problems = [p for path in _python_files() for p in indentation_problems(path)]
  assert not problems, '\n'.join(problems[:20])
  # And the check can fail: a block indented 4 spaces is found.
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  if True:\n      return 1\n')
  assert indentation_problems(str(bad)) == [f'{bad}:3: indented 4 spaces, not 2']


def test_ruff_passes():
  ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
  if ruff is None:
    pytest.fail('ruff is not installed: pip install -e ".[test]"')
  res = subprocess.run([ruff, 'check', '--no-cache', '.'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
