"""`python -m experiments.ladder calibrate`: choose a recipe's short-run settings on a validation
split.

  python -m experiments.ladder calibrate --out runs/calibrate/enhanced --recipe enhanced \
      --grid optimizer.base_lr=1e-3,2e-3,4e-3 --grid optimizer.warmup_epochs=20,50 \
      --validation 5000 --seeds 1 --options data=fashion_mnist,scale=cpu,image_size=32,batch=128

For one recipe, every combination of the --grid values is trained on the ladder's first and last
steps of that recipe only (original: `resnet50`; enhanced: `enhanced_recipe` and the ladder's last
adopted step), never on the steps in between, with `data.validation` examples held out of training;
with `--references swin_t` (or `vit_s`) on that transformer reference instead, once per
architecture.
A FIELD with a dot is a config field (`--config.FIELD=V`); one without is a config option after the
step name (e.g. `layer_scale_init`, applied only to the steps that have LayerScale). A
combination's score is its mean validation top-1 over those steps and seeds; the best one is
chosen. The test split takes no part in the choice: the output files do not even show it.

Writes OUT/trials.jsonl (one line per trained (setting, step, seed): validation top-1 and loss) and
OUT/calibration.json (every setting tried with its score and per-step means, and the chosen one).
Every trial is an ordinary ladder run in OUT/<setting>/ (step table, checkpoints), so an
interrupted calibration resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics

from experiments import outputs
from experiments.cli import UsageError
from experiments.ladder import run as ladder_run
from experiments.training import steptable
from modernize import ladder as ladders
from modernize import presets


def calibration_steps(ladder_name: str, recipe: str,
                      references: list[str] | None = None) -> list[str]:
  """The first and the last adopted step of `ladder_name` trained with `recipe`; with
  `references`, those transformer references instead (they train under the enhanced recipe):
  each architecture outside the ladder gets its own setting, chosen once."""
  if references:
    unknown = [n for n in references if n not in presets.REFERENCES]
    if unknown or recipe != 'enhanced':
      raise UsageError(f'--references {",".join(references)}: the references are '
                       f'{",".join(presets.REFERENCES)}, under --recipe enhanced')
    return list(dict.fromkeys(references))
  ladder = ladders.get_ladder(ladder_name)
  names = [n for n in ladder.names(include_side=False) if ladder.recipe(n) == recipe]
  if not names:
    raise UsageError(f'no step of ladder {ladder_name} uses recipe {recipe!r}')
  return list(dict.fromkeys([names[0], names[-1]]))


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
  """['field=v1,v2', ...] -> [(field, [v1, v2]), ...]; UsageError on malformed items."""
  grid = []
  for item in items:
    field, sep, values = item.partition('=')
    field = field.strip()
    choices = [v.strip() for v in values.split(',') if v.strip()]
    if not sep or not re.fullmatch(r'[A-Za-z_][\w.]*', field) or not choices:
      raise UsageError(f'--grid {item!r}: expected FIELD=V1,V2,... '
                       '(e.g. optimizer.base_lr=1e-3,2e-3)')
    if field in dict(grid):
      raise UsageError(f'--grid {field} given twice')
    grid.append((field, choices))
  return grid


def settings(grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """Every combination of the grid's values, in the order given."""
  fields = [f for f, _ in grid]
  return [dict(zip(fields, values)) for values in itertools.product(*[v for _, v in grid])]


def setting_name(setting: dict[str, str]) -> str:
  """A directory name for a setting: 'optimizer.base_lr=0.002,model.x=1' made path-safe."""
  if not setting:
    return 'default'
  return ','.join(f'{k}={v}' for k, v in setting.items()).replace('/', '_')


def _score(rows: list[dict], steps: list[str]) -> tuple[float, dict[str, float]]:
  per_step = {}
  for step in steps:
    values = [float(r['val_top1']) for r in rows if r['step'] == step and r.get('val_top1')]
    per_step[step] = statistics.fmean(values) if values else math.nan
  return statistics.fmean(per_step.values()), per_step


def calibrate(out: str, *, recipe: str, grid: list[tuple[str, list[str]]], validation: int,
              ladder_name: str = 'resnet50', seeds: int = 1, options: str = '',
              overrides: list[str] = (), isolate: bool = False, jobs: int = 1,
              references: list[str] | None = None) -> dict:
  """Trains every setting of `grid` on the recipe's calibration steps; returns (and writes to
  OUT/calibration.json) what was tried and what was chosen."""
  if validation <= 0:
    raise UsageError('--validation must hold out at least one training example')
  for field, _ in grid:
    if field == 'data.validation' or any(o.split('=')[0] == field for o in overrides):
      raise UsageError(f'{field} is both searched (--grid) and fixed (--set/--validation)')
    if '.' not in field and any(o.split('=')[0].strip() == field for o in options.split(',')):
      raise UsageError(f'{field} is both searched (--grid) and fixed (--options)')
  steps = calibration_steps(ladder_name, recipe, references)
  os.makedirs(out, exist_ok=True)
  tried = []
  trials_path = os.path.join(out, 'trials.jsonl')
  trials = []
  for setting in settings(grid):
    run_dir = os.path.join(out, setting_name(setting))
    print(f'calibrate {recipe}: {setting_name(setting)} on {", ".join(steps)}', flush=True)
    setting_options = ','.join([options, *[f'{k}={v}' for k, v in setting.items() if '.' not in k]])
    ladder_run.run(run_dir, ladder_name=ladder_name, steps=steps, seeds=seeds,
                   options=setting_options.strip(','),
                   overrides=[*overrides, f'data.validation={validation}',
                              *[f'{k}={v}' for k, v in setting.items() if '.' in k]],
                   isolate=isolate, jobs=jobs)
    rows = [r for r in steptable.read_rows(os.path.join(run_dir, 'steps.csv'))
            if r['step'] in steps and int(r['seed']) < seeds
            and str(r.get('validation')) == str(validation)]
    for r in rows:
      trials.append({'setting': setting, 'step': r['step'], 'seed': int(r['seed']),
                     'val_top1': float(r['val_top1']), 'val_loss': float(r['val_loss'])})
    score, per_step = _score(rows, steps)
    tried.append({'setting': setting, 'mean_val_top1': score, 'per_step': per_step})
  finite = [t for t in tried if not math.isnan(t['mean_val_top1'])]
  if not finite:
    raise UsageError('no setting produced a validation top-1')
  chosen = max(finite, key=lambda t: t['mean_val_top1'])   # ties: the first given
  result = {'recipe': recipe, 'ladder': ladder_name, 'steps': steps, 'seeds': seeds,
            'validation': validation, 'options': options, 'fixed': list(overrides),
            'grid': [{'field': f, 'values': v} for f, v in grid], 'tried': tried,
            'chosen': chosen['setting'], 'chosen_mean_val_top1': chosen['mean_val_top1'],
            'chosen_by': 'highest mean validation top-1 over the steps and seeds above'}
  outputs.write_json(os.path.join(out, 'calibration.json'), result)
  outputs.write_atomic(trials_path, ''.join(json.dumps(t) + '\n' for t in trials))
  return result


def format_result(result: dict) -> str:
  lines = [f'{result["recipe"]} recipe, steps {", ".join(result["steps"])}, '
           f'{result["seeds"]} seed(s), {result["validation"]} validation examples:']
  for t in result['tried']:
    per_step = '  '.join(f'{s} {v:.2f}' for s, v in t['per_step'].items())
    mark = '  <- chosen' if t['setting'] == result['chosen'] else ''
    lines.append(f'  {setting_name(t["setting"]):<50} val top-1 {t["mean_val_top1"]:6.2f}  '
                 f'({per_step}){mark}')
  return '\n'.join(lines)
