"""Nothing lost: a kill loses at most one checkpoint interval, a resumed run's row equals an
unbroken run's wherever the kill hit, and a corrupt or partial checkpoint is named, set aside and
skipped; a full disk ends a run in one line with nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx
from test_train import flat, run_train

from experiments.training import steptable
from experiments.training.checkpoint import Checkpoints, load_numpy, load_trained_model

# resnet50 (SGD, a small program) for 160 steps: checkpoints at 40, 80, 120 and 160, logs at 82 and
# 160, so a checkpoint (80) lies 2 steps before a log and another (120) inside the last log window.
CONFIG = 'resnet50,smoke'
ARGS = ('--config.epochs=10', '--config.checkpoint_every_steps=40', '--config.log_every_steps=82')
EVERY, TOTAL = 40, 160
TIMINGS = ('train_img_per_s', 'wall_s', 'time', 'workdir')   # the only fields that may differ


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
  """(workdir, row, metrics by step) of the run nothing interrupts."""
  root = tmp_path_factory.mktemp('unbroken')
  with pytest.MonkeyPatch.context() as env:   # as the `hermetic` fixture does for each test
    env.setenv('TFDS_DATA_DIR', str(root / 'default-tfds-dir'))
    env.delenv('MODERNIZE_FASHION_MNIST_DIR', raising=False)
    env.delenv('MODERNIZE_DATA_DOWNLOAD', raising=False)
    run_train(str(root / 'run'), CONFIG, *ARGS)
  row, = steptable.read_rows(str(root / 'steps.csv'))
  return str(root / 'run'), row, _metrics(str(root / 'run'))


def _committed(workdir) -> list:
  """The steps of the complete checkpoints in workdir (orbax renames a save to STEP when whole)."""
  ckpt = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _metrics(workdir) -> dict:
  """The logging records of metrics.jsonl by update count (the last one of an update logged twice);
  `workdir` local or gs://."""
  records = {}
  path = epath.Path(workdir) / 'metrics.jsonl'
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except ValueError:   # a line being written
        continue
      if 'img_per_s' in record:
        records[record['updates']] = record
  return records


def _kill_when(proc, ready, timeout=300):
  """SIGKILLs the run as soon as `ready()`; fails if it ends first."""
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      pytest.fail(f'the run ended (exit {proc.returncode}) before it could be killed')
    if time.time() > deadline:
      proc.kill()
      pytest.fail('the run never got there')
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL


def _state(workdir) -> dict:
  """The final train state's arrays."""
  step, tree = load_numpy(os.path.join(workdir, 'checkpoints'))
  assert step == TOTAL
  return flat(tree)


def _assert_same_run(workdir, table, unbroken):
  """The run in `workdir` ended with the unbroken run's state, row and logged metrics."""
  reference_dir, reference_row, reference_metrics = unbroken
  a, b = _state(reference_dir), _state(workdir)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  row, = steptable.read_rows(table)
  for column in set(row) | set(reference_row):
    if column not in TIMINGS:
      assert row[column] == reference_row[column], column
  assert float(row['train_img_per_s']) > 0
  metrics = _metrics(workdir)
  assert metrics.keys() == reference_metrics.keys()
  for step, record in metrics.items():
    for key in ('train_loss', 'lr', 'epoch'):
      assert record[key] == reference_metrics[step][key], (step, key)
  return row


def _resume(workdir, table):
  """Runs the same command again; returns its stderr."""
  res = run_train(workdir, CONFIG, *ARGS, table=table)
  assert 'Traceback' not in res.stderr, res.stderr[-3000:]
  return res.stderr


def test_sigkill_after_a_save_loses_at_most_one_interval(tmp_path, unbroken):
  """Killed 2 steps after checkpoint 80 (at the log of step 82), the run resumes from 80: a save is
  complete before training goes on. (An async save was still being written then: the run went
  back to 40, or to 0.)"""
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  proc = run_train(workdir, CONFIG, *ARGS, table=table, wait=False)
  _kill_when(proc, lambda: 82 in _metrics(workdir))
  newest = max(_committed(workdir), default=0)
  assert newest >= 82 - EVERY, f'killed at step 82, the newest checkpoint is {newest}'
  assert not os.path.exists(table)
  err = _resume(workdir, table)
  assert f'resuming from checkpoint {newest} in' in err, err
  _assert_same_run(workdir, table, unbroken)


def test_sigkill_inside_the_last_logging_window(tmp_path, unbroken):
  """Resumed from checkpoint 120, inside the last log window (83-160), the row's train loss still
  averages the whole window: steps 83-120 come from the checkpoint."""
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  proc = run_train(workdir, CONFIG, *ARGS, table=table, wait=False)
  _kill_when(proc, lambda: 120 in _committed(workdir))
  assert max(_committed(workdir)) == 120, 'killed too late: the last checkpoint was written'
  err = _resume(workdir, table)
  assert 'resuming from checkpoint 120 in' in err, err
  _assert_same_run(workdir, table, unbroken)


def test_sigkill_during_the_final_evaluation(tmp_path, unbroken):
  """Killed after the final checkpoint, the restart only evaluates, and its row still has the
  train loss and the train speed the killed run measured (carried in the checkpoint)."""
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  proc = run_train(workdir, CONFIG, *ARGS, table=table, wait=False)
  _kill_when(proc, lambda: TOTAL in _committed(workdir))
  assert not os.path.exists(table), 'killed too late: the row was written'
  checkpoints = Checkpoints(os.path.join(workdir, 'checkpoints'))
  log = checkpoints.metadata(TOTAL)['log']
  checkpoints.close()
  err = _resume(workdir, table)
  assert f'resuming from checkpoint {TOTAL} in' in err, err
  row = _assert_same_run(workdir, table, unbroken)
  batch = int(row['batch_size'])
  assert row['train_img_per_s'] == f'{log["timed_steps"] * batch / log["timed_s"]:.2f}'


def _truncate_data(step_dir):
  """Halves the largest file of a checkpoint (its array data)."""
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


def _interrupt(step_dir):
  """What a kill during a save leaves: the step still in orbax's temporary directory."""
  os.rename(step_dir, step_dir + '.orbax-checkpoint-tmp')


CORRUPTIONS = {
    'truncated data file': _truncate_data,
    'deleted step metadata': lambda d: os.remove(os.path.join(d, '_CHECKPOINT_METADATA')),
    'deleted tree metadata': lambda d: os.remove(os.path.join(d, 'default', '_METADATA')),
    'interrupted save': _interrupt,
}


@pytest.mark.parametrize('corruption', CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back(tmp_path, unbroken, corruption):
  """The newest checkpoint (160) is broken: one line names it and its directory, the run resumes
  from 120 and ends as the unbroken run did; the broken one is moved to checkpoints.corrupt."""
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  shutil.copytree(unbroken[0], workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  assert _committed(workdir) == [120, TOTAL]
  CORRUPTIONS[corruption](os.path.join(ckpt, str(TOTAL)))
  err = _resume(workdir, table)
  warnings = [l for l in err.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and f'checkpoint {TOTAL} in {ckpt} ' in warnings[0], err
  assert f'resuming from checkpoint 120 in {ckpt}' in err, err
  assert os.listdir(ckpt + '.corrupt')
  _assert_same_run(workdir, table, unbroken)


def test_no_readable_checkpoint_exits_2(tmp_path, unbroken):
  """Every checkpoint broken: one line saying how to start over, exit 2, no row, nothing moved."""
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  shutil.copytree(unbroken[0], workdir)
  ckpt = os.path.join(workdir, 'checkpoints')
  _truncate_data(os.path.join(ckpt, '120'))
  os.remove(os.path.join(ckpt, str(TOTAL), 'default', '_METADATA'))
  res = run_train(workdir, CONFIG, *ARGS, table=table, check=False)
  assert res.returncode == 2, res.stderr[-3000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
  assert lines[0].startswith('error: ') and f'delete {ckpt}' in lines[0], lines[0]
  assert f'step {TOTAL}' in lines[0]
  assert not os.path.exists(table) and _committed(workdir) == [120, TOTAL]


def test_an_interrupted_first_save_starts_over_with_a_line(tmp_path):
  """Only an interrupted save (no checkpoint was ever completed): named, set aside, step 0."""
  directory = tmp_path / 'checkpoints'
  os.makedirs(directory / '4.orbax-checkpoint-tmp' / 'default')
  checkpoints = Checkpoints(str(directory))
  step, tree, metadata, notes = checkpoints.restore_latest({'x': np.zeros(3)})
  checkpoints.close()
  assert step is None and tree is None and metadata == {}
  assert len(notes) == 1 and f'checkpoint 4 in {directory} is an interrupted save' in notes[0]
  assert os.listdir(directory) == [] and os.listdir(f'{directory}.corrupt') == [
      '4.orbax-checkpoint-tmp']


def test_metadata_round_trips_and_older_checkpoints_have_none(tmp_path):
  """What `save` is given comes back exactly (NaN and float64 too); a checkpoint saved without
  (as the previous version's were) gives {}, from which the trainer starts a fresh LogState."""
  import jax.numpy as jnp

  from experiments.training.loop import LogState
  state = {'w': jnp.arange(4.0), 'step': jnp.asarray(8)}
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  log = {'loss_sum': 0.1 + 0.2, 'loss_steps': 3, 'last_loss': float('nan'), 'timed_s': 1 / 3}
  checkpoints.save(8, state)
  checkpoints.save(12, state, {'log': log})
  checkpoints.close()
  checkpoints = Checkpoints(str(tmp_path / 'checkpoints'))
  like = {'w': jnp.zeros(4), 'step': jnp.asarray(0)}
  step, tree, metadata, notes = checkpoints.restore_latest(like)
  assert step == 12 and notes == [] and checkpoints.metadata(8) == {}
  np.testing.assert_array_equal(tree['w'], np.arange(4.0))
  restored = LogState.from_dict(metadata['log'])
  assert restored.loss_sum == 0.1 + 0.2 and restored.timed_s == 1 / 3
  assert np.isnan(restored.last_loss) and restored.loss_steps == 3
  assert LogState.from_dict({}) == LogState()
  checkpoints.close()


def _fill(directory: str) -> None:
  """Writes a file into `directory` until its file system is full."""
  fd = os.open(os.path.join(directory, 'filler'), os.O_WRONLY | os.O_CREAT)
  try:
    while os.write(fd, b'\0' * 4096):
      pass
  except OSError:
    pass
  finally:
    os.close(fd)


def _one_line_exit_2(res, *words):
  assert res.returncode == 2, res.stderr[-3000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), res.stderr[-3000:]
  for word in words:
    assert word in lines[0], lines[0]


def test_full_disk_while_saving_a_checkpoint(tmp_path, small_disk):
  """The workdir's disk fills at the first checkpoint: one line naming the directory, exit 2, no
  part of the checkpoint left, and the step table (elsewhere) unchanged."""
  table = str(tmp_path / 'steps.csv')
  steptable.append_row(table, {'step': 'earlier', 'seed': 0})
  before = open(table).read()
  workdir = os.path.join(small_disk('256k'), 'run')
  res = run_train(workdir, 'convnext_t,smoke', table=table, check=False)
  ckpt = os.path.join(workdir, 'checkpoints')
  _one_line_exit_2(res, 'no space left on device', ckpt)
  assert os.listdir(ckpt) == []
  assert open(table).read() == before


def test_full_disk_under_the_step_table(tmp_path, small_disk):
  """The table's disk is full when the run ends: one line naming the table, exit 2, the table
  byte for byte as it was (no half row)."""
  disk = small_disk('1m')
  table = os.path.join(disk, 'steps.csv')
  steptable.append_row(table, {'step': 'earlier', 'seed': 0})
  # A second row that ends the file at a page boundary: appending within a file's last page needs
  # no new space, so a full disk would not stop it.
  scratch = str(tmp_path / 'scratch.csv')
  steptable.append_row(scratch, {'step': 'earlier', 'seed': 0})
  one = os.path.getsize(scratch)
  steptable.append_row(scratch, {'step': 'earlier', 'seed': 1})
  row = os.path.getsize(scratch) - one
  pad = -(os.path.getsize(table) + row) % 4096
  steptable.append_row(table, {'step': 'earlier', 'seed': 1, 'versions': 'x' * pad})
  assert os.path.getsize(table) % 4096 == 0
  before = open(table).read()
  _fill(disk)
  res = run_train(str(tmp_path / 'run'), 'convnext_t,smoke', table=table, check=False)
  _one_line_exit_2(res, 'no space left on device', table)
  assert open(table).read() == before


def test_a_workdir_deleted_during_the_run(tmp_path):
  """One line naming the workdir, exit 2, no row: not a quiet restart in a new directory that
  lost the logs."""
  workdir = str(tmp_path / 'run')
  table = str(tmp_path / 'steps.csv')
  proc = run_train(workdir, 'convnext_t,smoke', '--config.epochs=6',
                   '--config.checkpoint_every_steps=8', table=table, wait=False)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '8')):
    assert proc.poll() is None and time.time() < deadline, 'the run ended before its first save'
    time.sleep(0.05)
  shutil.rmtree(workdir)
  _, err = proc.communicate(timeout=300)
  res = subprocess.CompletedProcess(proc.args, proc.returncode, '', err)
  _one_line_exit_2(res, 'vanished', workdir)
  assert not os.path.exists(table)


# --- a workdir on Google Cloud Storage ------------------------------------------------------------

def test_a_gs_workdir_is_preempted_resumed_and_loaded(tmp_path, unbroken, gcs, monkeypatch):
  """A run whose workdir is gs://: checkpoints (orbax, through TensorStore's GCS driver), config
  and metrics (etils.epath, through gcsfs) go to the bucket. Preempted after its first log (step
  82, after checkpoints 40 and 80) and restarted, it ends with the unbroken local run's state, row
  and logged metrics (the first process's log line kept); the analyses load its network from the
  bucket."""
  for name, value in gcs.items():
    monkeypatch.setenv(name, value)
  workdir, table = f'gs://runs/{tmp_path.name}/run', str(tmp_path / 'steps.csv')
  proc = run_train(workdir, CONFIG, *ARGS, table=table, wait=False)
  deadline = time.time() + 300
  while not _metrics(workdir):
    assert proc.poll() is None, f'the run ended (exit {proc.returncode}) before its first log'
    assert time.time() < deadline, 'no log line appeared in the bucket'
    time.sleep(0.05)
  # Read while it trains, as an evaluator following a run would; the listing must not go stale.
  step, _ = load_numpy(f'{workdir}/checkpoints')
  assert step >= 80
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert not os.path.exists(table)   # the preempted run wrote no row
  err = _resume(workdir, table)
  assert 'resuming from checkpoint' in err and f'in {workdir}/checkpoints' in err, err[-2000:]
  row = _assert_same_run(workdir, table, unbroken)
  assert row['workdir'] == workdir
  assert json.loads((epath.Path(workdir) / 'config.json').read_text())['seed'] == 0
  ours, _ = load_trained_model(workdir)
  reference, _ = load_trained_model(unbroken[0])
  for a, b in zip(jax.tree.leaves(nnx.state(reference)), jax.tree.leaves(nnx.state(ours))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_gs_workdir_that_cannot_be_written_exits_2(tmp_path, gcs, monkeypatch):
  """A bucket that does not exist: one line naming the workdir, exit 2, before any training."""
  for name, value in gcs.items():
    monkeypatch.setenv(name, value)
  res = run_train('gs://no-such-bucket/run', CONFIG, table=str(tmp_path / 'steps.csv'),
                  check=False)
  _one_line_exit_2(res, 'workdir gs://no-such-bucket/run', 'cannot be written')
  assert not os.path.exists(tmp_path / 'steps.csv')


def test_an_uncommitted_gs_checkpoint_is_skipped(tmp_path, gcs, monkeypatch):
  """On gs:// orbax writes a step in place and marks it whole with commit_success.txt last: a save
  cut before that mark is neither loaded nor resumed from; the run resumes from the step before,
  saves the step again and ends with the state the first run ended with."""
  for name, value in gcs.items():
    monkeypatch.setenv(name, value)
  workdir, table = f'gs://runs/{tmp_path.name}/run', str(tmp_path / 'steps.csv')
  args = ('--config.checkpoint_every_steps=4',)
  run_train(workdir, CONFIG, *args, table=table)
  step, first = load_numpy(f'{workdir}/checkpoints')
  assert step == 8
  (epath.Path(workdir) / 'checkpoints' / '8' / 'commit_success.txt').unlink()
  assert load_numpy(f'{workdir}/checkpoints')[0] == 4   # the latest complete one
  # The run is in the table already: --force trains it again from what its workdir holds.
  res = run_train(workdir, CONFIG, *args, '--force', table=table)
  assert f'resuming from checkpoint 4 in {workdir}/checkpoints' in res.stderr, res.stderr[-2000:]
  step, again = load_numpy(f'{workdir}/checkpoints')
  assert step == 8 and (epath.Path(workdir) / 'checkpoints' / '8' / 'commit_success.txt').exists()
  a, b = flat(first), flat(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
