"""Throughput of the training input pipeline (images/s), not a test.

  python -m experiments.bench_data --data fashion_mnist --image-size 32 --batch-size 128
  python -m experiments.bench_data --augment paper --workers 2 --steps 400

Prints, for each augmentation preset asked for, the images/s of `pipeline.train_batches` consumed as fast
as possible (the first batches, which include thread start-up, are not timed).
"""

from __future__ import annotations

import argparse
import time

from experiments import datasets, pipeline
from experiments.augment import AugmentConfig


def bench(name: str, *, data_dir, image_size, batch_size, channels, augment: AugmentConfig,
          steps: int, warmup: int, workers: int | None, prefetch: int) -> float:
  it = pipeline.train_batches(name, data_dir=data_dir, batch_size=batch_size, image_size=image_size,
                          channels=channels, seed=0, augment=augment, num_workers=workers,
                          prefetch=prefetch)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  return steps * batch_size / elapsed


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', default='fashion_mnist')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--image-size', type=int, default=None)
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--channels', type=int, default=None)
  parser.add_argument('--augment', default='all', choices=['all', 'none', 'standard', 'paper'])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--workers', type=int, default=None,
                      help='batch-building threads (default: half the cores; 0 = synchronous)')
  parser.add_argument('--prefetch', type=int, default=2)
  args = parser.parse_args(argv)

  start = time.perf_counter()
  datasets.prepare(args.data, args.data_dir)
  large = datasets.info(args.data, args.data_dir).large
  if not large:
    datasets.load_arrays(args.data, 'train', args.data_dir)
  print(f'{args.data}: prepared and loaded in {time.perf_counter() - start:.1f} s')
  presets = ['none', 'standard', 'paper'] if args.augment == 'all' else [args.augment]
  # pylint: disable-next=protected-access
  workers = args.workers if args.workers is not None else pipeline._default_workers()
  for preset in presets:
    rate = bench(args.data, data_dir=args.data_dir, image_size=args.image_size,
                 batch_size=args.batch_size, channels=args.channels,
                 augment=AugmentConfig.preset(preset, large), steps=args.steps,
                 warmup=args.warmup, workers=args.workers, prefetch=args.prefetch)
    print(f'augment={preset:8s} batch={args.batch_size} size={args.image_size} workers={workers}: '
          f'{rate:,.0f} images/s')


if __name__ == '__main__':
  main()
