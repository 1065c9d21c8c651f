"""Test-session settings."""

import os
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

# Everything the tests compile (in the workers and in every training subprocess, which inherit the
# environment) is compiled at XLA's lowest backend (LLVM) optimisation level and without XLA:CPU's
# fusion emitters (fusions go through the older loop emitter): the same HLO and the same
# semantics, and compiling is most of what the suite does. CPU of a smoke run, measured one after
# the other with the compilation cache off: convnext_t 22.7 s (XLA's defaults) -> 16.1 s (level 0)
# -> 11.4 s (and no fusion emitters), resnet50 13.6 -> 7.3 s for the last step; top-1 identical,
# train loss equal to 1e-7. Speed is measured by the benchmarks and real runs, never here. A
# setting already given in $XLA_FLAGS is kept.
for _flag, _value in (('xla_backend_optimization_level', '0'),
                      ('xla_cpu_use_fusion_emitters', 'false')):
  if _flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()


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
  from experiments.data import datasets
  source = datasets.FASHION_MNIST_DEBIAN_DIR
  if not all(os.path.exists(os.path.join(source, f))
             for files in datasets.FASHION_MNIST_FILES.values() for f in files):
    pytest.skip(f'needs the Debian package dataset-fashion-mnist ({source}): '
                'apt-get install dataset-fashion-mnist')
  monkeypatch.setenv('MODERNIZE_FASHION_MNIST_DIR', source)
  return source


# Put first on the path of every process of a run (a ladder's isolated trainings included): to
# `import` and to `importlib.util.find_spec` the packages look absent.
_TENSORFLOW_BLOCKER = '''import sys
for name in ('tensorflow', 'tensorflow_datasets'):
  sys.modules[name] = None
'''


@pytest.fixture(scope='session')
def no_tensorflow_env(tmp_path_factory):
  """The environment of a subprocess in which TensorFlow and tensorflow-datasets are unimportable
  (as on an accelerator image that ships neither), with a home of its own; Fashion-MNIST then
  comes from the Debian files."""
  from experiments.data import datasets
  try:
    datasets.fashion_mnist_dir()
  except datasets.DatasetUnavailable as e:
    pytest.skip(str(e))
  blocker = tmp_path_factory.mktemp('blocker')
  (blocker / 'sitecustomize.py').write_text(_TENSORFLOW_BLOCKER)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), ROOT]),
             HOME=str(tmp_path_factory.mktemp('home')))
  env.pop('TFDS_DATA_DIR', None)
  return env


def _train_step(model, x, y, *, evaluate=None, compiler_options=None):
  """One forward and backward pass of `model` in train mode on images `x` and integer labels `y`
  (softmax cross-entropy, stochastic depth from a fixed key), and, given `evaluate`, that function
  of the model in eval mode, all in one compiled function (`compiler_options` for XLA). Checks that
  the loss and every parameter's gradient are finite; returns (loss, train-mode logits, gradients
  as an `nnx.State` of the parameters, `evaluate`'s result or None)."""
  import jax
  import numpy as np
  import optax
  from flax import nnx

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, rest):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest, copy=True)
      m.train()
      logits = m(x, key=jax.random.key(1))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    evaluated = None
    if evaluate is not None:
      m = nnx.merge(graphdef, params, rest, copy=True)
      m.eval()
      evaluated = evaluate(m)
    return loss, logits, grads, evaluated

  compiled = jax.jit(step).lower(params, rest).compile(compiler_options=compiler_options)
  loss, logits, grads, evaluated = compiled(params, rest)
  assert np.isfinite(float(loss))
  for path, g in nnx.to_flat_state(grads):
    assert np.all(np.isfinite(g.get_value())), path
  return loss, logits, grads, evaluated


@pytest.fixture
def train_step():
  """`_train_step`: the train-mode forward / backward scaffold shared by the model tests."""
  return _train_step


@pytest.fixture(scope='module')
def gcs():
  """The environment that points gs:// at a local stand-in for Cloud Storage holding an empty
  bucket 'runs' (tests/gcs_emulator.py); a test sets it with monkeypatch."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  with gcs_emulator.running('runs') as url:
    yield gcs_emulator.environment(url)


@pytest.fixture
def small_disk(tmp_path):
  """Mounts a tmpfs of the given size and returns its path; skipped where one cannot be mounted
  (not root, or no mount permission in this container). Shared by the full-disk and the
  shared-memory tests."""
  mounted = []

  def mount(size: str) -> str:
    point = tmp_path / f'disk{len(mounted)}'
    point.mkdir()
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size},nr_inodes=4096', 'tmpfs',
                          str(point)],
                         capture_output=True, text=True)
    if res.returncode != 0:
      pytest.skip(f'cannot mount a tmpfs here to fill a disk: '
                  f'{res.stderr.strip() or res.returncode}')
    mounted.append(str(point))
    return str(point)

  yield mount
  for point in mounted:
    subprocess.run(['umount', '-l', point], check=False)
