"""modernize: the ConvNeXt paper's ResNet-50 -> ConvNeXt-T ladder in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Ranges we test (constraints.txt pins the exact set CI installs, on Python 3.11, with jax 0.10.2;
# jax 0.11 needs Python >= 3.12 and is what the accelerator images ship). Training, the ladder and
# the analyses need no TensorFlow: Fashion-MNIST and image folders are read with numpy and PIL.
CORE = [
  'jax>=0.10.2,<0.12',
  'flax>=0.12.8,<0.13',
  'optax>=0.2.8,<0.3',
  'orbax-checkpoint>=0.12.8,<0.13',
  'ml-collections>=1.1.0,<1.2',
  'numpy>=2.0,<3',
  'pillow>=10',
  'tqdm>=4.66,<5',
]
EXTRAS = {
  # tfds data sets (cifar10/100, imagenette, imagenet2012): reading a prepared one needs
  # tensorflow-datasets only; preparing one (downloading, converting) needs TensorFlow too.
  'tfds': ['tensorflow-datasets>=4.9.10,<4.10'],
  'data': ['tensorflow-datasets>=4.9.10,<4.10', 'tensorflow-cpu>=2.21,<2.22'],
  # The ladder chart.
  'plot': ['matplotlib>=3.9,<4'],
  # gs:// workdirs (checkpoints, metrics, config) through etils.epath.
  'gcs': ['gcsfs>=2026.9'],
  # PyTorch references (parity tests, benchmarks) and weight conversion from torch checkpoints.
  'torch': ['torch==2.14.1', 'torchvision==0.29.1', 'timm>=1.0.31,<1.1'],
}
# pytest-xdist: `make test` runs the suite on two worker processes; gcp-storage-emulator: a local
# stand-in for Google Cloud Storage that gs:// runs are tested against.
EXTRAS['test'] = (
  ['pytest>=8,<10', 'pytest-xdist>=3.6,<4', 'gcp-storage-emulator>=2026.7', 'ruff>=0.17,<0.18']
  + EXTRAS['data']
  + EXTRAS['plot']
  + EXTRAS['torch']
  + EXTRAS['gcs']
)
EXTRAS['all'] = EXTRAS['test']

setup(
  name='modernize',
  version='0.1.0',
  description=__doc__,
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  python_requires='>=3.11',
  packages=find_packages(include=['modernize', 'modernize.*', 'experiments', 'experiments.*']),
  package_data={'modernize': ['_native/*.cc']},
  install_requires=CORE,
  extras_require=EXTRAS,
)
