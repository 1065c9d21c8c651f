"""Throughput of the training input pipeline (images/s), not a test.

  python -m experiments.bench.data --data fashion_mnist --image-size 32 --batch-size 128
  python -m experiments.bench.data --augment paper --workers 2 --steps 400
  python -m experiments.bench.data --image-size 224 --augment paper --large --workers 1 --steps 20

Prints, for each augmentation preset asked for, the images/s of `pipeline.train_batches` consumed as
fast as possible (the first batches, which include thread start-up, are not timed), and per worker.
What is timed is the host's part: uint8 batches; the normalisation, Random Erasing and channel
replication happen on the device (`pipeline.model_input`), and `--on-device` times them too (each
batch sent to the default device and made a model input there, two in flight).
"""

from __future__ import annotations

import sys
import time

from experiments.cli import ArgumentParser, UsageError, guarded, positive
from experiments.data import datasets, pipeline
from experiments.data.augment import AugmentConfig


def bench(name: str, *, data_dir, image_size, batch_size, channels, augment: AugmentConfig,
          steps: int, warmup: int, workers: int | None, prefetch: int,
          on_device: bool = False) -> float:
  it = pipeline.train_batches(name, data_dir=data_dir, batch_size=batch_size, image_size=image_size,
                          channels=channels, seed=0, augment=augment, num_workers=workers,
                          prefetch=prefetch)
  consume = (lambda batch: batch) if not on_device else _device_consumer(name, data_dir, channels)
  last = None
  for _ in range(warmup):
    last = consume(next(it))
  _block(last)
  start = time.perf_counter()
  for _ in range(steps):
    last = consume(next(it))
  _block(last)
  elapsed = time.perf_counter() - start
  it.close()
  return steps * batch_size / elapsed


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
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--image-size', type=positive(), default=None)
  parser.add_argument('--batch-size', type=positive(), default=128)
  parser.add_argument('--channels', type=int, choices=[1, 3], default=None)
  parser.add_argument('--augment', default='all', choices=['all', 'none', 'standard', 'paper'])
  parser.add_argument('--steps', type=positive(), default=200)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--workers', type=int, default=None,
                      help='batch-building threads (default: one per core, at most 8; '
                           '0 = synchronous)')
  parser.add_argument('--prefetch', type=positive(), default=2)
  parser.add_argument('--large', action='store_true',
                      help="the presets for large images (random-resized crop), as gpu_check's "
                      'stage d uses them on Fashion-MNIST')
  parser.add_argument('--on-device', action='store_true',
                      help='also send each batch to the default device and make it a model input')
  args = parser.parse_args(argv)
  if args.warmup < 0 or (args.workers is not None and args.workers < 0):
    parser.error('--warmup and --workers must be at least 0')
  try:
    datasets.validate_name(args.data)
  except ValueError as e:
    raise UsageError(f'--data: {e}') from None

  start = time.perf_counter()
  datasets.prepare(args.data, args.data_dir)
  large = datasets.info(args.data, args.data_dir).large
  if not large:
    datasets.load_arrays(args.data, 'train', args.data_dir)
  print(f'{args.data}: prepared and loaded in {time.perf_counter() - start:.1f} s')
  presets = ['none', 'standard', 'paper'] if args.augment == 'all' else [args.augment]
  workers = args.workers if args.workers is not None else pipeline.default_workers()
  for preset in presets:
    rate = bench(args.data, data_dir=args.data_dir, image_size=args.image_size,
                 batch_size=args.batch_size, channels=args.channels,
                 augment=AugmentConfig.preset(preset, large or args.large), steps=args.steps,
                 warmup=args.warmup, workers=args.workers, prefetch=args.prefetch,
                 on_device=args.on_device)
    crop = ' random-resized-crop' if (large or args.large) and preset != 'none' else ''
    where = ' (to model inputs on the device)' if args.on_device else ''
    print(f'augment={preset:8s}{crop} batch={args.batch_size} size={args.image_size} '
          f'workers={workers}: {rate:,.0f} images/s, {rate / max(workers, 1):,.0f} per worker'
          f'{where}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
