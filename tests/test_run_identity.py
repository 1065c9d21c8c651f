"""The step table tells the truth: one row per run, a workdir bound to its config, ladders on one
--out that share the work, and Ctrl-C as a clean stop (its bitwise resume: test_train.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train import run_train

from experiments.ladder import view as ladder_view
from experiments.training import steptable
from experiments.training import workdir as workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(step='resnet50', seed=0, config_hash='aaa', top1=80.0, **extra):
  return {'ladder': 'resnet50', 'step': step, 'step_index': 0, 'seed': seed,
          'data': 'fashion_mnist', 'image_size': 32, 'scale': 'cpu', 'params': 10, 'gmacs': 0.1,
          'top1': top1, 'train_img_per_s': 1.0, 'wall_s': 1.0, 'config_hash': config_hash,
          **extra}


# --- the table: one row per run -----------------------------------------------------------------

def test_the_table_refuses_a_second_row_of_a_run_and_replaces_it_when_asked(tmp_path):
  table = str(tmp_path / 'steps.csv')
  steptable.append_row(table, _row(seed=0, top1=80.0))
  steptable.append_row(table, _row(seed=1, top1=81.0))          # another seed: another run
  steptable.append_row(table, _row(seed=0, config_hash='bbb'))   # another config: another run
  with pytest.raises(steptable.DuplicateRun,
                     match=r'resnet50 seed 0 \(config aaa, workdir \?\) \(line 2\)'):
    steptable.append_row(table, _row(seed=0, top1=99.0))
  assert [r['top1'] for r in steptable.read_rows(table)] == ['80.0', '81.0', '80.0']
  assert steptable.append_row(table, _row(seed=0, top1=99.0), replace=True) == [2]
  rows = steptable.read_rows(table)
  assert [(r['seed'], r['config_hash'], r['top1']) for r in rows] == [
      ('0', 'aaa', '99.0'), ('1', 'aaa', '81.0'), ('0', 'bbb', '80.0')]   # in place
  assert not os.path.exists(table + '.bak')
  assert steptable.append_row(table, _row(seed=2), replace=True) == []   # nothing to replace
  assert len(steptable.read_rows(table)) == 4


def test_show_refuses_two_rows_of_one_run_or_two_configs_of_one_step(tmp_path):
  table = str(tmp_path / 'steps.csv')
  steptable.append_row(table, _row(seed=0))
  steptable.append_row(table, _row(seed=1))
  with open(table, 'a') as f:   # written past the writer's check, as an older version could
    f.write(steptable._line(_row(seed=0, top1=70.0)))
  with pytest.raises(steptable.TableError,
                     match=r'2 rows of one run, resnet50 seed 0 .*lines 2, 4'):
    ladder_view.show(str(tmp_path), table)
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'show', '--out',
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert res.returncode == 2 and res.stderr.count('\n') == 1 and 'lines 2, 4' in res.stderr
  other = str(tmp_path / 'two_configs.csv')
  steptable.append_row(other, _row(seed=0, config_hash='aaa', epochs=4))
  steptable.append_row(other, _row(seed=0, config_hash='bbb', epochs=16))
  with pytest.raises(steptable.TableError,
                     match=r'2 rows of resnet50 seed 0 in one ladder \(lines 2, 3\): several'):
    ladder_view.show(str(tmp_path), other)


# --- the trainer: a rerun adds nothing, a workdir keeps its config -------------------------------

def test_a_rerun_adds_no_row_and_force_replaces_it(tmp_path):
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  run_train(workdir, 'resnet50,smoke')
  first = steptable.read_rows(table)
  res = run_train(workdir, 'resnet50,smoke')
  assert res.stdout.strip().count('\n') == 0 and 'already in the step table' in res.stdout
  assert f'{table} (line 2' in res.stdout and 'Traceback' not in res.stderr
  assert steptable.read_rows(table) == first
  # --force evaluates it again (from its last checkpoint: no update trained) and replaces the row.
  res = run_train(workdir, 'resnet50,smoke', '--force')
  assert 'replaced line(s) [2]' in res.stderr
  assert json.loads(res.stdout.strip().splitlines()[-1])['times']['compile_s'] == 0.0
  (row,) = steptable.read_rows(table)
  assert row['top1'] == first[0]['top1'] and row['time'] >= first[0]['time']
  # The same config in another workdir is another run (a replicate: its own row), but a ladder
  # cannot count both as seeds: show names the two lines.
  run_train(str(tmp_path / 'other'), 'resnet50,smoke')
  assert len(steptable.read_rows(table)) == 2
  with pytest.raises(steptable.TableError, match=r'lines 2, 3\): one config trained in several'):
    ladder_view.show(str(tmp_path / 'view'), table)


def test_a_workdir_refuses_another_config_unless_told_and_records_it(tmp_path):
  workdir, table = str(tmp_path / 'run'), str(tmp_path / 'steps.csv')
  longer = ('--config.epochs=4', '--config.checkpoint_every_steps=8')
  proc = run_train(workdir, 'resnet50,smoke', *longer, wait=False)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '8')):   # then killed mid-run
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  proc.kill()
  proc.communicate()
  res = run_train(workdir, 'resnet50,smoke', *longer, '--config.optimizer.base_lr=0.01',
                  '--config.augment.hflip=false', check=False)
  assert res.returncode == 2 and 'Traceback' not in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1
  assert 'augment.hflip (True -> False), optimizer.base_lr (0.1 -> 0.01)' in res.stderr
  assert 'resume_any' in res.stderr and not os.path.exists(table)
  # Fields outside the run's identity may differ: the run goes on (here, to its end).
  run_train(workdir, 'resnet50,smoke', *longer, '--config.log_every_steps=3',
            '--config.data.threads=1')
  # Told to, it goes on under the new config, and says so in its row.
  run_train(workdir, 'resnet50,smoke', *longer, '--config.optimizer.base_lr=0.01',
            '--config.resume_any=true')
  first, second = steptable.read_rows(table)
  assert first['config_changes'] == '' and first['config_hash'] != second['config_hash']
  changes = [json.loads(line) for line in open(os.path.join(workdir, 'config_changes.jsonl'))]
  assert len(changes) == 1 and changes[0]['fields'] == ['optimizer.base_lr']
  assert changes[0]['from'] == first['config_hash'] and changes[0]['to'] == second['config_hash']
  assert second['config_changes'] == f'optimizer.base_lr@{first["steps"]}'
  assert json.load(open(os.path.join(workdir, 'config.json')))['optimizer']['base_lr'] == 0.01


def test_a_workdir_in_use_is_refused_with_exit_75(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  with workdirs.Claim(workdir):
    assert workdirs.in_use(workdir)
    res = run_train(workdir, 'resnet50,smoke', check=False)
    assert res.returncode == workdirs.IN_USE_EXIT, res.stderr[-2000:]
    assert 'in use by another process' in res.stderr and f'pid {os.getpid()}' in res.stderr
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  assert not workdirs.in_use(workdir)


# --- ladders that share work ---------------------------------------------------------------------

def _ladder(out, *extra):
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.ladder', 'run', '--out', out, '--options', 'smoke',
       '--steps', 'resnet50,stage_ratio', '--seeds', '2', *extra], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_two_ladders_on_one_out_train_each_run_once(tmp_path):
  """Two `ladder run` started together on one --out (real processes, one in-process, one with
  isolated runs): every (step, seed) is trained by one of them, both end with exit 0, and the
  table holds one row per run."""
  out = str(tmp_path / 'ladder')
  procs = [_ladder(out), _ladder(out, '--isolate')]
  results = [p.communicate(timeout=900) for p in procs]
  for p, (stdout, stderr) in zip(procs, results):
    assert p.returncode == 0, stderr[-3000:]
  rows = steptable.read_rows(os.path.join(out, 'steps.csv'))
  assert sorted((r['step'], r['seed']) for r in rows) == [
      ('resnet50', '0'), ('resnet50', '1'), ('stage_ratio', '0'), ('stage_ratio', '1')]
  with open(os.path.join(out, 'run_times.jsonl')) as f:   # one line per run trained, by either
    trained = sorted((t['step'], t['seed']) for t in map(json.loads, f))
  assert trained == [('resnet50', 0), ('resnet50', 1), ('stage_ratio', 0), ('stage_ratio', 1)]
  said = [stdout.strip().splitlines()[-1] for stdout, _ in results]
  assert all(line.startswith('done: ') for line in said), said


def test_ctrl_c_stops_a_parallel_ladder_in_one_line_and_the_same_command_resumes(tmp_path):
  """SIGINT to the ladder's process group (Ctrl-C in a terminal) while two runs train: every
  child saves and stops, the ladder ends in one line with exit 130, and the same command finishes
  the ladder with one row per run."""
  out = str(tmp_path / 'ladder')
  longer = ('--set', 'epochs=6', '--set', 'checkpoint_every_steps=8')
  proc = _ladder(out, '--jobs', '2', *longer)
  ckpt = os.path.join(out, 'runs', 'resnet50', 'seed0', 'checkpoints')
  deadline = time.time() + 600
  while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr and len(stderr.strip().splitlines()) == 1, stderr
  assert 'interrupted' in stderr and 'run the same command again' in stderr
  logs = [os.path.join(out, 'runs', 'resnet50', f'seed{seed}', 'train.log') for seed in (0, 1)]
  # The run that had saved a checkpoint saved its update and stopped; the other stopped too
  # (before its first update, if it was still starting: then with nothing to save).
  assert 'interrupted: checkpoint saved at update' in open(logs[0]).read()
  assert 'interrupted' in open(logs[1]).read()
  assert 'Traceback' not in open(logs[0]).read() + open(logs[1]).read()
  again = _ladder(out, '--jobs', '2', *longer)
  stdout, stderr = again.communicate(timeout=900)
  assert again.returncode == 0, stderr[-3000:]
  assert 'resuming from checkpoint' in open(logs[0]).read()
  rows = steptable.read_rows(os.path.join(out, 'steps.csv'))
  assert len(rows) == 4 and len({(r['step'], r['seed']) for r in rows}) == 4
