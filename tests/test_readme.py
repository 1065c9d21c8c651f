"""The README's Python examples run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


def test_readme_has_examples():
  assert len(_examples()) >= 2


@pytest.mark.torch
@pytest.mark.parametrize('index', range(2))
def test_readme_example_runs(index):
  exec(compile('import jax.numpy as jnp\nimport modernize\n' + _examples()[index],
               f'README example {index}', 'exec'), {})
