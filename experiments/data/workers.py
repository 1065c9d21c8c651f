"""Batches built by worker processes, handed over through shared memory.

Python threads share one interpreter lock, and the per-image Python around PIL's C code holds it:
on a 16-core host 8 threads built no more batches than 16 (docs/performance.md). Here each of N
worker processes builds whole batches: batch k is `builder(k)` (a picklable batch builder of
experiments/data/pipeline.py, which loads its data once per worker), so the stream is the same
for any number and kind of workers, and resuming at step s is `start=s`.

- **Processes.** Started with `python -m experiments.data.workers` (a fresh interpreter: no fork of
  a process that runs JAX's threads, no re-import of the trainer's `__main__`), with JAX kept off
  any accelerator and numerical libraries at one thread each. A worker imports no JAX at all, and
  says everything through its result pipe (its own output goes nowhere: a command's stderr keeps
  its one line).
- **Shared memory.** A ring of `slots` batch-sized files in $MODERNIZE_SHM_DIR (default
  /dev/shm), each reserved with posix_fallocate before use, so that a shared-memory area too small
  (containers default to 64 MiB) ends in one line naming it and the fix, never a SIGBUS. Every
  worker maps them at start; then the files are unlinked, so nothing outlives the processes. The
  worker writes a batch into its slot; the parent copies it out (a batch handed to JAX owns its
  memory: on CPU `device_put` may alias a numpy buffer) before the slot takes another batch.
- **In order.** Batch k goes to worker (k - start) mod N and slot (k - start) mod slots; each
  worker answers in the order it was asked, so the parent reads batch k from worker k's pipe.
- **Failures.** A worker that dies ends the iteration with one line naming it, its signal and the
  batch and examples it was building (`WorkerDied`, exit code 2 in the commands); the other
  workers are stopped, and a worker whose parent is gone exits (its task pipe closes). An error
  the builder raises as a `UsageError` (an unreadable image) arrives as that error.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback

import numpy as np

from experiments.cli import UsageError

# Environment of a worker: no accelerator for JAX (a worker must never take GPU memory; it imports
# no JAX, and this holds if a library does), one thread per numerical library.
WORKER_ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1',
              'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
ALIGNMENT = 64


class WorkerDied(UsageError):
  """A data worker process ended while building a batch."""


class SharedMemoryTooSmall(UsageError):
  """The shared-memory area cannot hold the ring of batches."""


def shm_dir() -> str:
  return os.environ.get('MODERNIZE_SHM_DIR') or '/dev/shm'


def _size(nbytes: int) -> str:
  return f'{nbytes / 2**20:.1f} MiB' if nbytes >= 2**20 else f'{nbytes / 2**10:.0f} KiB'


def _slot_files(slots: int, slot_bytes: int) -> tuple[str, list[str]]:
  """A directory of `slots` files of `slot_bytes` each, their space reserved; SharedMemoryTooSmall
  (one line) where the area cannot hold them."""
  base = shm_dir()
  need = slots * slot_bytes
  try:
    directory = tempfile.mkdtemp(prefix='modernize-batches-', dir=base)
  except OSError as e:
    raise SharedMemoryTooSmall(f'cannot use the shared-memory area {base} for the data workers '
                               f'({e.strerror}); set MODERNIZE_SHM_DIR, or use threads '
                               '(--config.data.worker_kind=threads)') from None
  paths = []
  try:
    for i in range(slots):
      path = os.path.join(directory, f'slot{i}')
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
      try:
        os.posix_fallocate(fd, 0, slot_bytes)
      finally:
        os.close(fd)
      paths.append(path)
  except OSError as e:
    shutil.rmtree(directory, ignore_errors=True)
    free = shutil.disk_usage(base).free
    raise SharedMemoryTooSmall(
        f'the shared-memory area {base} cannot hold the data workers\' {slots} batches of '
        f'{_size(slot_bytes)} ({_size(need)}; {_size(free)} free: {e.strerror}): give it more '
        '(docker run --shm-size=2g), point MODERNIZE_SHM_DIR at a larger tmpfs, or use threads '
        '(--config.data.worker_kind=threads)') from None
  return directory, paths


def _write(slot: np.ndarray, batch: dict[str, np.ndarray]) -> list[tuple]:
  """Copies the batch's arrays into `slot`; returns their layout: (key, dtype, shape, offset)."""
  layout, offset = [], 0
  for key, value in batch.items():
    value = np.ascontiguousarray(value)
    end = offset + value.nbytes
    if end > len(slot):
      raise ValueError(f'batch larger than its shared-memory slot ({len(slot)} bytes)')
    slot[offset:end] = value.reshape(-1).view(np.uint8)
    layout.append((key, value.dtype.str, value.shape, offset))
    offset = -(-end // ALIGNMENT) * ALIGNMENT
  return layout


def _read(slot: np.ndarray, layout: list[tuple]) -> dict[str, np.ndarray]:
  """The batch of `layout`, copied out of `slot` (arrays that own their memory)."""
  out = {}
  for key, dtype, shape, offset in layout:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    out[key] = slot[offset:offset + nbytes].view(dtype).reshape(shape).copy()
  return out


class _Worker:
  """One worker process and its two pipes (tasks in, results out)."""

  def __init__(self, index: int, builder, paths: list[str], slot_bytes: int):
    self.index = index
    task_read, self._task_write = os.pipe()
    self._result_read, result_write = os.pipe()
    env = {**os.environ, **WORKER_ENV}
    self.proc = subprocess.Popen(
        [sys.executable, '-m', 'experiments.data.workers', str(task_read), str(result_write)],
        pass_fds=(task_read, result_write), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    os.close(task_read)
    os.close(result_write)
    self.tasks = os.fdopen(self._task_write, 'wb')
    self.results = os.fdopen(self._result_read, 'rb')
    pickle.dump((builder, paths, slot_bytes), self.tasks)
    self.tasks.flush()

  def send(self, message) -> None:
    try:
      pickle.dump(message, self.tasks)
      self.tasks.flush()
    except (BrokenPipeError, OSError):   # it died: said when its next result is due
      pass

  def receive(self):
    """The worker's next message, or None where it died (its pipe closed)."""
    try:
      return pickle.load(self.results)
    except (EOFError, pickle.UnpicklingError, OSError):
      return None

  def how_it_ended(self) -> str:
    try:
      code = self.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      return 'stopped answering'
    if code < 0:
      return f'was killed by {signal.Signals(-code).name}'
    return f'exited with code {code}'

  def stop(self) -> None:
    for f in (self.tasks, self.results):
      try:
        f.close()
      except OSError:
        pass
    if self.proc.poll() is None:   # the closed task pipe tells it to exit
      try:
        self.proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


def _raise(message, worker: _Worker, doing: str):
  """The error a worker's message (None: it died) stands for, raised."""
  if message is None:
    raise WorkerDied(f'data worker {worker.index} (pid {worker.proc.pid}) '
                     f'{worker.how_it_ended()} while {doing}')
  status, _, payload = message
  if status == 'error':   # a UsageError of the builder's, as it was raised there
    kind, text = payload
    raise kind(text) if isinstance(kind, type) and issubclass(kind, UsageError) else \
        UsageError(text)
  raise WorkerDied(f'data worker {worker.index} failed while {doing}: '
                   f'{str(payload).splitlines()[0]}')


def batches(builder, start: int, stop: int | None, num_workers: int, prefetch: int):
  """builder(start), builder(start + 1), ... (up to `stop`, or forever) built by `num_workers`
  worker processes, `prefetch` batches ahead beyond one per worker."""
  slots = num_workers + prefetch
  slot_bytes = builder.slot_bytes()
  directory, paths = _slot_files(slots, slot_bytes)
  workers: list[_Worker] = []
  try:
    maps = [np.memmap(p, np.uint8, 'r+', shape=(slot_bytes,)) for p in paths]
    workers = [_Worker(i, builder, paths, slot_bytes) for i in range(num_workers)]
    for w in workers:   # every worker has mapped the slots: the files can go
      message = w.receive()
      if message != 'ready':
        _raise(message, w, 'starting (loading its data)')
    shutil.rmtree(directory, ignore_errors=True)
    k = start
    ahead = start
    while stop is None or k < stop:
      while ahead - k < slots and (stop is None or ahead < stop):
        workers[(ahead - start) % num_workers].send((ahead, (ahead - start) % slots))
        ahead += 1
      worker = workers[(k - start) % num_workers]
      message = worker.receive()
      if not (isinstance(message, tuple) and message[:2] == ('ok', k)):
        _raise(message, worker, f'building {builder.describe(k)}')
      yield _read(maps[(k - start) % slots], message[2])
      k += 1
  finally:
    for w in workers:
      w.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _serve(task_fd: int, result_fd: int) -> None:
  """A worker: builds the batches it is asked for into their slots until its task pipe closes."""
  tasks, results = os.fdopen(task_fd, 'rb'), os.fdopen(result_fd, 'wb')
  builder, paths, slot_bytes = pickle.load(tasks)
  maps = [np.memmap(p, np.uint8, 'r+', shape=(slot_bytes,)) for p in paths]
  try:
    builder.load()
    ready = 'ready'
  except UsageError as e:   # the data cannot be read: the parent says so
    ready = ('error', None, (type(e), str(e)))
  pickle.dump(ready, results)
  results.flush()
  if ready != 'ready':
    return
  while True:
    try:
      k, slot = pickle.load(tasks)
    except (EOFError, OSError):   # the parent is done, or gone
      return
    try:
      message = ('ok', k, _write(maps[slot], builder(k)))
    except UsageError as e:   # an expected failure (an unreadable image): the parent raises it
      message = ('error', k, (type(e), str(e)))
    except Exception as e:  # pylint: disable=broad-except
      message = ('failed', k, f'{type(e).__name__}: {e}\n{traceback.format_exc()}')
    try:
      pickle.dump(message, results)
      results.flush()
    except (BrokenPipeError, OSError):
      return


if __name__ == '__main__':
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
  try:
    _serve(int(sys.argv[1]), int(sys.argv[2]))
  except (BrokenPipeError, EOFError, OSError):   # the parent stopped listening: done
    pass
