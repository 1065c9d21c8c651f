"""Throughput of the training input pipeline (images/s), not a test.

  python -m experiments.bench.data --data fashion_mnist --image-size 32 --batch-size 128
  python -m experiments.bench.data --augment paper --workers 1,2 --kinds threads,processes
  python -m experiments.bench.data --source jpeg --image-size 224 --augment paper --workers 1,2

Prints, for each augmentation preset, kind of worker (threads, processes, or grain's worker
processes driving the same batch function: `--kinds grain`, where grain is installed) and worker
count asked for, the images/s of `pipeline.train_batches` consumed as fast as possible (the first
batches, which include start-up, are not timed), per worker, the efficiency against one worker of
the same kind, and the parent's CPU time per batch (with processes: receiving and copying a batch
out; with threads it includes the threads' work). What is timed is the host's part: uint8 batches;
the normalisation, Random Erasing and channel replication happen on the device
(`pipeline.model_input`), and `--on-device` times them too (each batch sent to the default device
and made a model input there, two in flight).

`--source jpeg` reads a folder of generated RGB JPEGs instead of `--data` (`jpeg_folder`: about
ImageNet's sizes, 500x375 give or take, quality 90, smooth shapes over a textured ground), through
the image-folder path: decode, random-resized crop, the recipe's augmentation.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from experiments import cli
from experiments.cli import ArgumentParser, UsageError, guarded, positive
from experiments.data import datasets, pipeline
from experiments.data.augment import AugmentConfig


def jpeg_folder(root: str, train: int = 384, test: int = 16, classes: int = 4,
                seed: int = 0) -> str:
  """A folder:PATH data set of RGB JPEGs like ImageNet's photographs in size and cost to decode:
  `train` / `test` images over `classes` classes, each W x H with W in [400, 600] and H in [300,
  450], quality 90, 4:2:0; content: a few smooth blobs over a low-frequency gradient and a
  textured ground (noise at two scales). Written once per `root`; returns 'folder:root'."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  for split, count in (('train', train), ('test', test)):
    for i in range(count):
      path = os.path.join(root, split, f'c{i % classes}', f'{i}.jpg')
      if os.path.exists(path):
        continue
      os.makedirs(os.path.dirname(path), exist_ok=True)
      w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
      yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
      colour = rng.uniform(40, 215, 3).astype(np.float32)
      image = colour + rng.uniform(-40, 40, 3) * (xx / w)[..., None] \
          + rng.uniform(-40, 40, 3) * (yy / h)[..., None]
      for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 150)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        image += blob * rng.uniform(-90, 90, 3)
      coarse = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
      image += coarse + rng.normal(0, 6, (h, w, 3))
      Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
  return f'folder:{root}'


def bench(name: str, *, data_dir, image_size, batch_size, channels, augment: AugmentConfig,
          steps: int, warmup: int, workers: int | None, prefetch: int, kind: str | None = None,
          on_device: bool = False) -> dict:
  """{'img_s': images/s after `warmup` batches, 'parent_ms': this process's CPU ms per batch}."""
  if kind == 'grain':
    builder = pipeline.train_builder(name, data_dir=data_dir, batch_size=batch_size,
                                     image_size=image_size, channels=channels, seed=0,
                                     augment=augment)
    it = grain_batches(builder, workers, prefetch)
    first = next(it)
    if not all(np.array_equal(first[k], v) for k, v in builder(0).items()):
      raise RuntimeError('grain gave another first batch than the pipeline')   # a bug, not input
  else:
    it = pipeline.train_batches(name, data_dir=data_dir, batch_size=batch_size,
                                image_size=image_size, channels=channels, seed=0, augment=augment,
                                num_workers=workers, worker_kind=kind, prefetch=prefetch)
  consume = (lambda batch: batch) if not on_device else _device_consumer(name, data_dir, channels)
  last = None
  for _ in range(warmup):
    last = consume(next(it))
  _block(last)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    last = consume(next(it))
  _block(last)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  it.close()
  return {'img_s': steps * batch_size / elapsed, 'parent_ms': 1000 * cpu / steps}


def grain_batches(builder, workers: int, prefetch: int):
  """The same batches (builder(0), builder(1), ...) through grain's worker processes
  (`mp_prefetch`, `workers` of them), each set up as this project's pool sets up one of its own:
  one thread building batches, `prefetch` batches ahead (grain's defaults, 16 threads and 500
  elements ahead per process, are meant for small records read from remote disks; 500 batches at
  224px would be gigabytes per worker). The library this project would use instead of its own
  pool if it measured as fast (docs/performance.md)."""
  grain = _grain()
  dataset = grain.MapDataset.range(0, 2**62).map(builder).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=prefetch))
  it = iter(dataset)
  it.close = lambda: None   # grain stops its workers when the iterator is collected
  return it


def _grain():
  try:
    import grain  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError('--kinds grain: grain is not installed here (pip install grain)') from None
  return grain


def _block(x) -> None:
  if x is not None and hasattr(x, 'block_until_ready'):
    x.block_until_ready()


def _device_consumer(name, data_dir, channels):
  """batch -> its model input on the default device (jitted `pipeline.model_input`), with at most
  two batches in flight."""
  import collections  # pylint: disable=import-outside-toplevel
  import functools  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  finish = jax.jit(functools.partial(pipeline.model_input,
                                     spec=pipeline.input_spec(name, data_dir, channels)))
  flight = collections.deque()

  def consume(batch):
    flight.append(finish(jax.device_put(batch)))
    if len(flight) > 2:
      flight.popleft().block_until_ready()
    return flight[-1]
  return consume


@guarded
def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog='python -m experiments.bench.data', description=__doc__)
  parser.add_argument('--data', default='fashion_mnist',
                      help='a data set name, or folder:PATH (default %(default)s)')
  parser.add_argument('--source', default='data', choices=['data', 'jpeg'],
                      help="'jpeg': generated RGB JPEGs (see above) instead of --data")
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--image-size', type=positive(), default=None)
  parser.add_argument('--batch-size', type=positive(), default=128)
  parser.add_argument('--channels', type=int, choices=[1, 3], default=None)
  parser.add_argument('--augment', default='all', choices=['all', 'none', 'standard', 'paper'])
  parser.add_argument('--steps', type=positive(), default=200)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--workers', default=None,
                      help='worker counts, comma-separated (default: one per core, at most 8; '
                           '0 = synchronous)')
  parser.add_argument('--kinds', default='threads',
                      help='worker kinds, comma-separated: threads, processes, grain (grain\'s '
                           'worker processes, if installed; default threads)')
  parser.add_argument('--prefetch', type=positive(), default=2)
  parser.add_argument('--large', action='store_true',
                      help="the presets for large images (random-resized crop), as gpu_check's "
                      'stage d uses them on Fashion-MNIST')
  parser.add_argument('--on-device', action='store_true',
                      help='also send each batch to the default device and make it a model input')
  args = parser.parse_args(argv)
  kinds = cli.names(args.kinds, (*pipeline.WORKER_KINDS, 'grain'), 'worker kind', '--kinds')
  try:
    counts = [int(w) for w in cli.names(args.workers)] or [pipeline.default_workers()]
  except ValueError:
    raise UsageError(f'--workers {args.workers!r}: give whole numbers, e.g. 1,2') from None
  if args.warmup < 0 or min(counts) < 0 or not kinds:
    parser.error('--warmup and --workers must be at least 0, --kinds not empty')
  if 'grain' in kinds:
    _grain()
  name = args.data
  if args.source == 'jpeg':
    root = os.path.join(tempfile.gettempdir(), 'modernize-bench-jpeg')
    start = time.perf_counter()
    name = jpeg_folder(root)
    print(f'{name}: generated in {time.perf_counter() - start:.1f} s')
  try:
    datasets.validate_name(name)
  except ValueError as e:
    raise UsageError(f'--data: {e}') from None

  start = time.perf_counter()
  datasets.prepare(name, args.data_dir)
  large = datasets.info(name, args.data_dir).large
  if not large:
    datasets.load_arrays(name, 'train', args.data_dir)
  print(f'{name}: prepared and loaded in {time.perf_counter() - start:.1f} s')
  presets = ['none', 'standard', 'paper'] if args.augment == 'all' else [args.augment]
  print(f'{"augment":<9}{"kind":<10}{"workers":>7}{"images/s":>11}{"per worker":>11}'
        f'{"efficiency":>11}{"parent ms/batch":>16}')
  for preset in presets:
    for kind in kinds:
      one = None
      for workers in counts:
        r = bench(name, data_dir=args.data_dir, image_size=args.image_size,
                  batch_size=args.batch_size, channels=args.channels,
                  augment=AugmentConfig.preset(preset, large or args.large), steps=args.steps,
                  warmup=max(args.warmup, workers + args.prefetch), workers=workers,
                  prefetch=args.prefetch, kind=kind, on_device=args.on_device)
        per = r['img_s'] / max(workers, 1)
        one = per if workers == 1 else one
        efficiency = f'{per / one:.2f}' if one else ''
        print(f'{preset:<9}{kind:<10}{workers:>7}{r["img_s"]:>11,.0f}{per:>11,.0f}'
              f'{efficiency:>11}{r["parent_ms"]:>16.2f}', flush=True)
  crop = 'random-resized crop' if large or args.large else 'pad-crop'
  size = args.image_size or "the data's"
  print(f'(batch {args.batch_size}, size {size}, {crop}'
        + (', to model inputs on the device' if args.on_device else '') + ')')
  return 0


if __name__ == '__main__':
  sys.exit(main())
