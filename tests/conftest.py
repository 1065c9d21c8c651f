"""Test-session settings."""

import os
import tempfile

import pytest

# Training subprocesses share one compilation cache for the session (not the user's): the same
# smoke configs are compiled by several tests.
os.environ.setdefault('MODERNIZE_COMPILATION_CACHE',
                      tempfile.mkdtemp(prefix='modernize-test-jax-cache-'))


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
