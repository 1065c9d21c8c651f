"""Train one ladder step (one config) and append its row to the step table.

  python -m experiments.train --config configs/ladder.py:convnext_t,smoke --workdir /tmp/convnext_t

The run itself is `experiments.training.loop.train_and_evaluate` (importable); this is its command
line: the config from `--config` (and `--config.FIELD=VALUE` overrides), then one line and an exit
code for every way a run can end: 0 done (or already in the step table: nothing to do), 2 bad
input or an expected failure, 75 the workdir is in use by another process, 130 Ctrl-C (the update
in progress saved), 143 SIGTERM (saved).
"""

from __future__ import annotations

import json
import sys

import jax

from experiments import runtime
from experiments.cli import expected_errors
from experiments.training import workdir as workdirs
from experiments.training.loop import Interrupted, Preempted, TrainingDiverged, train_and_evaluate
from experiments.training.runconfig import HELP_FLAGS, flags_help, parse_flags
from modernize import backend


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(f'usage: python -m experiments.train --config=configs/ladder.py:STEP[,OPTIONS] '
          f'--workdir=DIR [--config.FIELD=VALUE ...] [--force]\n\n{__doc__}\nThe options and '
          f'config fields: configs/ladder.py (docs/training.md).\n\n{flags_help()}')
    return 0
  # Before JAX starts its threads: reuse freed memory instead of page-faulting every step's
  # buffers back in (experiments/runtime.py; MODERNIZE_MALLOC_TUNING=0 turns it off). A CPU fast
  # path: not where JAX will run on a GPU/TPU (modernize.backend).
  if backend.host_fast_paths():
    runtime.keep_freed_memory()
  runtime.quiet_libraries()
  runtime.enable_compilation_cache()
  try:
    config, flag_values = parse_flags(argv)
    if flag_values.distributed:
      kwargs = {}
      if flag_values.coordinator:
        kwargs = dict(coordinator_address=flag_values.coordinator,
                      num_processes=flag_values.num_processes, process_id=flag_values.process_id)
      jax.distributed.initialize(**kwargs)
    result = train_and_evaluate(config, flag_values.workdir, force=flag_values.force)
  except (*expected_errors(), TrainingDiverged) as e:   # DatasetUnavailable: a UsageError
    print(f'error: {e}', file=sys.stderr)
    return 2
  except workdirs.RunInUse as e:
    print(f'error: {e}', file=sys.stderr)
    return workdirs.IN_USE_EXIT
  except Preempted as e:
    print(f'preempted: checkpoint saved at update {e}; run the same command again to resume',
          file=sys.stderr)
    return 143
  except Interrupted as e:
    print(f'interrupted: checkpoint saved at update {e}; run the same command again to resume',
          file=sys.stderr)
    return 130
  except KeyboardInterrupt:
    print('interrupted (before or after training: nothing new saved); run the same command '
          'again to resume', file=sys.stderr)
    return 130
  if jax.process_index() != 0:
    return 0
  if result.get('already_recorded'):
    print(f'{config.step} seed {config.seed} is already in the step table {result["table"]} '
          f'(line {result["line"]}, top-1 {result["top1"]:.2f}): nothing to do (--force '
          'evaluates it again and replaces that row)')
    return 0
  if result.get('replaced_lines'):
    print(f'replaced line(s) {result["replaced_lines"]} of {config.step_table} with this run\'s '
          'new row', file=sys.stderr)
  print(json.dumps({'step': config.step, 'seed': config.seed, **result}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
