"""Test-session settings."""

import os
import shutil
import tempfile

import pytest

# The session's caches, not the user's (~/.cache/modernize), removed when the session ends:
# training subprocesses share one compilation cache (the same smoke configs are compiled by several
# tests), and the native depthwise kernel is built once into a cache of its own.
# Under pytest-xdist (`make test`: two workers) the workers inherit the controlling process's
# directory through the environment, so they share its caches too; the process that made the
# directory removes it.
_OWN_DIR = 'MODERNIZE_TEST_SESSION_DIR' not in os.environ
if _OWN_DIR:
  os.environ['MODERNIZE_TEST_SESSION_DIR'] = tempfile.mkdtemp(prefix='modernize-test-')
_SESSION_DIR = os.environ['MODERNIZE_TEST_SESSION_DIR']
os.environ.setdefault('MODERNIZE_COMPILATION_CACHE', os.path.join(_SESSION_DIR, 'jax'))
os.environ.setdefault('MODERNIZE_CACHE_DIR', os.path.join(_SESSION_DIR, 'native'))


def pytest_sessionfinish(session, exitstatus):
  if _OWN_DIR:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def hermetic(tmp_path, monkeypatch):
  """No test reads the user's tfds dir, Fashion-MNIST dir or download setting."""
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'default-tfds-dir'))
  monkeypatch.delenv('MODERNIZE_FASHION_MNIST_DIR', raising=False)
  monkeypatch.delenv('MODERNIZE_DATA_DOWNLOAD', raising=False)


@pytest.fixture
def fashion(monkeypatch):
  """Debian's Fashion-MNIST directory (package dataset-fashion-mnist): the suite's one outside
  input, selected explicitly."""
  from experiments import datasets
  source = datasets.FASHION_MNIST_DEBIAN_DIR
  if not all(os.path.exists(os.path.join(source, f))
             for files in datasets.FASHION_MNIST_FILES.values() for f in files):
    pytest.skip(f'needs the Debian package dataset-fashion-mnist ({source}): '
                'apt-get install dataset-fashion-mnist')
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', source)
  return source
