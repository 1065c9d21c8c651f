"""The ladder from the command line.

  python -m experiments.ladder steps [--ladder resnet50|resnet200] [--presets | --side] [--json]
  python -m experiments.ladder run --out DIR [--steps a,b,...] [--seeds N] [--side] [--jobs N]
                                   [--share-device] [--references] [--options data=...,scale=...]
                                   [--set field=value ...] [--plateau-check]
  python -m experiments.ladder show --out DIR [--table PATH]
  python -m experiments.ladder calibrate --out DIR --recipe original|enhanced --validation N
                                         --grid field=v1,v2 [--grid ...] [--seeds N] [--options ...]
  python -m experiments.ladder compare A B [--out DIR] [--labels A,B]

`steps` prints every step's parameters and multiply-accumulates (GMACs, the paper's "FLOPs") at
224x224 with 1000 classes, beside the paper's GFLOPs and ImageNet top-1 (Tables 10 and 11);
`steps --side` the side branches only (kernel 5/9/11, grn, mhsa_last_stage), each beside the
adopted step it branches from; `--presets` the same for the named networks, the transformer
references (Swin-T, ViT-S/16) beside their published GFLOPs.
`run` trains each (step, seed) of the ladder once through `experiments.train` (finished ones, found
in DIR/steps.csv, are skipped; an interrupted one resumes; `--jobs N` trains N at once, each pinned
to its share of the cores, or with `--share-device` all sharing one GPU: `make ladder-gpu`,
docs/gpu.md); `--references` adds the transformer references Swin-T and ViT-S/16 (`swin_t`,
`vit_s`), trained under the enhanced recipe with the same options (under the miniature at a
learning rate of their own), and `show` draws them as
reference lines beside the paper's figures. `show` renders
DIR/steps.csv as DIR/ladder.md, DIR/ladder.png and DIR/ladder.json (per step: mean, std, n, the
change from the previous adopted step, whether it is beyond 2 standard errors, and whether it
agrees in sign with the paper). `compare` sets two ladders of one config (two budgets, scales or
data sets) side by side, change by change (experiments/ladder/compare.py).
"""

from __future__ import annotations

import json
import sys

from experiments import outputs
from experiments.cli import ArgumentParser, UsageError, guarded, names
from experiments.ladder import steps as profiles
from modernize import ladder as ladders


@guarded
def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog='python -m experiments.ladder', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  steps = sub.add_parser('steps', help='params and GMACs of every step beside the paper')
  steps.add_argument('--ladder', default='resnet50', choices=sorted(ladders.LADDERS))
  steps.add_argument('--presets', action='store_true', help='profile the presets instead')
  steps.add_argument('--side', action='store_true',
                     help='the side branches only, each beside the adopted step it branches from')
  steps.add_argument('--json', action='store_true', help='print a JSON list')
  steps.add_argument('--markdown', action='store_true', help='print a Markdown table')
  run = sub.add_parser('run', help='train every (step, seed) of the ladder once')
  run.add_argument('--out', required=True, help='output directory (step table, runs, views)')
  run.add_argument('--ladder', default='resnet50', choices=sorted(ladders.LADDERS))
  run.add_argument('--steps', default='', help='comma-separated step names (default: all adopted)')
  run.add_argument('--side', action='store_true',
                   help='include the side branches (kernel 5/9/11, grn, mhsa_last_stage)')
  run.add_argument('--seeds', type=int, default=1, help='seeds 0..N-1 per step')
  run.add_argument('--references', action='store_true',
                   help='also train the transformer references swin_t and vit_s (enhanced recipe, '
                        'same options)')
  run.add_argument('--options', default='',
                   help='config options after the step name, e.g. data=fashion_mnist,scale=cpu')
  run.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                   help='config override passed as --config.FIELD=VALUE (repeatable)')
  run.add_argument('--show', action='store_true', help='render the ladder view when done')
  run.add_argument('--note', default='', help='with --show: a line under every title')
  run.add_argument('--isolate', action='store_true',
                   help='train each run in its own process (default: all in this one)')
  run.add_argument('--jobs', type=int, default=1,
                   help='runs trained at once, each in its own process pinned to its share of the '
                        'cores (default 1)')
  run.add_argument('--share-device', action='store_true',
                   help='the --jobs processes share one accelerator (a GPU): none pinned to cores, '
                        'each given an equal share of its memory, the runs seed-major so that '
                        "later seeds reuse a step's compiled programs (make ladder-gpu)")
  run.add_argument('--plateau-check', action='store_true',
                   help='train --steps (default resnet50, enhanced_recipe, convnext_t) as '
                        'configured (OUT/1x) and twice as long (OUT/2x); print and write '
                        'OUT/plateau.json')
  cal = sub.add_parser('calibrate', help="choose a recipe's settings on a validation split "
                      '(experiments/ladder/calibrate.py)')
  cal.add_argument('--out', required=True)
  cal.add_argument('--recipe', required=True, choices=['original', 'enhanced'])
  cal.add_argument('--grid', action='append', default=[], metavar='FIELD=V1,V2',
                   help='config field and the values to try (repeatable; every combination)')
  cal.add_argument('--validation', type=int, required=True,
                   help='training examples held out as the validation split')
  cal.add_argument('--ladder', default='resnet50', choices=sorted(ladders.LADDERS))
  cal.add_argument('--seeds', type=int, default=1)
  cal.add_argument('--references', default='', metavar='NAMES',
                   help='calibrate these transformer references (swin_t, vit_s) instead of the '
                        "recipe's first and last steps")
  cal.add_argument('--options', default='')
  cal.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                   help='config override fixed for every trial (repeatable)')
  cal.add_argument('--isolate', action='store_true')
  cal.add_argument('--jobs', type=int, default=1, help='runs trained at once (as for run)')
  view = sub.add_parser('show', help='render the step table as the ladder (table + chart)')
  view.add_argument('--out', required=True)
  view.add_argument('--table', default=None, help='step table (default OUT/steps.csv)')
  view.add_argument('--note', default='', help="a line under every title (e.g. 'not at plateau')")
  view.add_argument('--print', action='store_true',
                    help='print the table only, write nothing (what the docs quote)')
  cmp = sub.add_parser('compare', help='two ladders of one config side by side, change by change '
                       '(e.g. two budgets): OUT/compare.json, .md, .png')
  cmp.add_argument('a', help='step table (CSV) or a folder holding steps.csv: ladder A')
  cmp.add_argument('b', help='the same for ladder B')
  cmp.add_argument('--out', default=None, help="where to write (default: B's folder)")
  cmp.add_argument('--labels', default=None, metavar='A,B',
                   help='names of the two ladders (default: data, scale, size and epochs)')
  cmp.add_argument('--print', action='store_true',
                   help='print the table only, write nothing (what the docs quote)')
  args = parser.parse_args(argv)
  out = getattr(args, 'out', None)
  if out and outputs.remote_problem(out):
    raise UsageError(f'--out {out} {outputs.remote_problem(out)}')

  if args.command == 'compare':
    from experiments.ladder import compare  # pylint: disable=import-outside-toplevel
    labels = names(args.labels) if args.labels else None
    if labels is not None and len(labels) != 2:
      raise UsageError(f'--labels {args.labels!r}: give two names, A,B')
    labels = tuple(labels) if labels else None
    if args.print:
      print(compare.markdown(compare.compare(args.a, args.b, labels)), end='')
      return 0
    result, written = compare.run(args.a, args.b, args.out, labels)
    print(compare.markdown(result), end='')
    for path in written:
      print(f'wrote {path}', file=sys.stderr)
    return 0

  if args.command == 'calibrate':
    from experiments.ladder import calibrate  # pylint: disable=import-outside-toplevel
    from experiments.runtime import enable_compilation_cache, quiet_libraries  # pylint: disable=import-outside-toplevel
    quiet_libraries()
    enable_compilation_cache()
    result = calibrate.calibrate(
        args.out, recipe=args.recipe, grid=calibrate.parse_grid(args.grid),
        validation=args.validation, ladder_name=args.ladder, seeds=args.seeds,
        options=args.options, overrides=args.set, isolate=args.isolate, jobs=args.jobs,
        references=names(args.references) or None)
    print(calibrate.format_result(result))
    print(f'wrote {args.out}/calibration.json and {args.out}/trials.jsonl')
    return 0

  if args.command in ('run', 'show'):
    from experiments.ladder import run as ladder_run  # pylint: disable=import-outside-toplevel
    from experiments.ladder import view as ladder_view
    from experiments.runtime import enable_compilation_cache, quiet_libraries  # pylint: disable=import-outside-toplevel
    quiet_libraries()
    enable_compilation_cache()
    if args.command == 'run' and args.plateau_check:
      result = ladder_run.plateau_check(
          args.out, ladder_name=args.ladder, steps=names(args.steps) or None,
          seeds=args.seeds, options=args.options, overrides=args.set, isolate=args.isolate,
          jobs=args.jobs, share_device=args.share_device)
      print(ladder_run.format_plateau(result))
      print(f'wrote {args.out}/plateau.json')
      return 0
    if args.command == 'run':
      ladder_run.run(args.out, ladder_name=args.ladder,
                     steps=names(args.steps) or None, seeds=args.seeds,
                     side=args.side, options=args.options, overrides=args.set,
                     isolate=args.isolate, jobs=args.jobs, references=args.references,
                     share_device=args.share_device)
    if args.command == 'show' and args.print:
      print(ladder_view.render(args.out, args.table, args.note)[0], end='')
      return 0
    if args.command == 'show' or args.show:
      text, written = ladder_view.show(args.out, getattr(args, 'table', None), args.note)
      print(text, end='')
      for path in written:
        print(f'wrote {path}', file=sys.stderr)
    return 0

  if args.command == 'steps':
    if args.presets and args.side:
      raise UsageError('steps: --presets and --side list different things; give one')
    if args.side:
      rows = profiles.side_rows(args.ladder)
    else:
      rows = profiles.preset_rows() if args.presets else profiles.step_rows(args.ladder)
    if args.json:
      print(json.dumps(rows, indent=1))
    elif args.markdown and not args.presets:
      print(profiles.markdown_steps(rows))
    elif args.presets:
      print(profiles.format_presets(rows))
    elif args.side:
      print(profiles.format_side(rows))
    else:
      print(profiles.format_steps(rows))
    return 0
  raise UsageError(f'unknown command {args.command!r}')


if __name__ == '__main__':
  sys.exit(main())
