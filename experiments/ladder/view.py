"""`python -m experiments.ladder show`: the step table as the paper's cumulative ladder.

Rows are grouped into ladders by (ladder, data set, model scale, image size); each becomes a
Markdown table (OUT/ladder.md, every group) and a chart in the spirit of the paper's Figure 2
(OUT/ladder.png for the largest group, OUT/ladder_<data>_<scale>_<size>.png for each group when
there are several).

A step's change from the previous adopted step is marked '~' when it is within the noise: when
|change| <= 2 x its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% interval), and '?'
when either step has a single seed, so that no noise estimate exists.

The same numbers, machine-readable, go to OUT/ladder.json (see `as_json`): per group, per step the
mean, std and standard error over seeds, the change from the previous adopted step with its
standard error, whether it is resolved (outside the noise), the paper's change over the same two
steps and whether ours has its sign; per group, how many resolved changes agree with the paper.

Rows of the transformer references (`swin_t`, `vit_s`: `ladder run --references`) are not steps:
each group's table lists them under its steps (mean ± std, n, beside the paper's Swin-T 81.3% /
4.5 GFLOPs and DeiT-S 79.8% / 4.6 GFLOPs), the chart draws them as vertical lines across the bars
(ours on the left, the paper's on the right) and ladder.json gives them per group under
'references'.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics

from experiments import outputs
from experiments.cli import UsageError
from experiments.training import steptable
from modernize import ladder as ladders
from modernize import presets

GROUP_COLOURS = {
    'baseline': '#9e9e9e', 'training recipe': '#8d6e63', 'macro design': '#42a5f5',
    'ResNeXt': '#66bb6a', 'inverted bottleneck': '#ffa726', 'large kernel': '#ab47bc',
    'micro design': '#ef5350', 'beyond the paper': '#26a69a',
}


# The step-table columns `summarize` reads and what each must hold (older tables lack 'val_top1').
TABLE_COLUMNS = {
    'step': 'text', 'data': 'text', 'scale': 'text', 'image_size': 'text', 'seed': 'an integer',
    'params': 'an integer', 'gmacs': 'a number', 'top1': 'a number or empty',
    'val_top1': 'a number or empty', 'train_img_per_s': 'a number or empty',
    'wall_s': 'a number or empty',
}


def _macs(gmacs: float) -> str:
  return f'{gmacs:.3g} GMACs' if gmacs >= 0.1 else f'{gmacs * 1e3:.3g} MMACs'


def _float(value, default=None):
  try:
    return float(value)
  except (TypeError, ValueError):
    return default


def _values(runs: list[dict], column: str) -> list[float]:
  """The finite numbers in `column` of `runs` (missing or empty cells skipped)."""
  values = [_float(r.get(column)) for r in runs]
  return [v for v in values if v is not None and math.isfinite(v)]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
  """Mean (None without values) and sample std (None under two values)."""
  mean = statistics.fmean(values) if values else None
  return mean, statistics.stdev(values) if len(values) > 1 else None


def _se(std: float | None, n: int) -> float | None:
  """Standard error of a mean over n seeds; None without a std (n < 2)."""
  return None if std is None else std / math.sqrt(n)


def _difference(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None else a - b


def _same_sign(ours: float | None, paper: float | None) -> bool | None:
  """Whether two nonzero changes go the same way; None when either is missing or zero."""
  if not ours or not paper:
    return None
  return (ours > 0) == (paper > 0)


def _group_key(r: dict) -> tuple:
  """(ladder, data, scale, image_size) of a row; runs of another compute dtype than float32 form
  their own group (scale 'cpu-bfloat16')."""
  dtype = r.get('dtype') or 'float32'
  scale = r['scale'] if dtype == 'float32' else f"{r['scale']}-{dtype}"
  return (r.get('ladder') or 'resnet50', r['data'], scale, r['image_size'])


def _run_stats(runs: list[dict]) -> dict:
  """What a step's (or a reference's) runs give over seeds: n, mean top-1 (NaN without any), its
  std and standard error, the validation top-1, params, GMACs, speed and time per run."""
  top1 = _values(runs, 'top1')
  mean, std = _mean_std(top1)
  val_mean, val_std = _mean_std(_values(runs, 'val_top1'))
  return {
      'n': len(top1), 'top1': math.nan if mean is None else mean, 'std': std,
      'se': _se(std, len(top1)), 'val_top1': val_mean, 'val_std': val_std,
      'seeds': sorted(int(r['seed']) for r in runs),
      'params': int(runs[0]['params']), 'gmacs': _float(runs[0]['gmacs']),
      'img_per_s': statistics.fmean(_float(r['train_img_per_s'], 0.0) for r in runs),
      'wall_s': statistics.fmean(_float(r['wall_s'], 0.0) for r in runs),
  }


def reference_summaries(rows: list[dict]) -> dict[tuple, list[dict]]:
  """{(ladder, data, scale, image_size): [one summary per transformer reference trained there]}:
  `_run_stats` plus 'step', 'label' and the published 'paper_top1' / 'paper_gflops'."""
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in rows:
    if r['step'] in presets.REFERENCES:
      groups[_group_key(r)][r['step']].append(r)
  return {key: [{'step': name, 'label': presets.REFERENCE_LABELS[name],
                 **_run_stats(by_step[name]), 'paper_top1': presets.REFERENCE_TOP1[name],
                 'paper_gflops': presets.REFERENCE_GFLOPS[name]}
                for name in presets.REFERENCES if name in by_step]
          for key, by_step in groups.items()}


def summarize(rows: list[dict]) -> dict[tuple, list[dict]]:
  """{(ladder, data, scale, image_size): [one summary per step, in ladder order]}; rows of a
  compute dtype other than float32 have it appended to their scale ('cpu-bfloat16').

  'top1' is the mean over seeds (NaN without any), 'se' its standard error; 'delta' the change from
  the previous adopted step in the table, 'delta_se' that change's standard error and 'within_noise'
  whether |delta| <= 2 delta_se (None when either step has one seed); 'paper_delta' the paper's
  change over the same two steps and 'agrees' whether ours has its sign; 'val_top1' and 'val_std'
  the same over the validation split, where the table has a 'val_top1' column.
  """
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in rows:
    if r['step'] not in presets.REFERENCES:   # those: reference_summaries
      groups[_group_key(r)][r['step']].append(r)
  out = {}
  for key, by_step in groups.items():
    ladder = ladders.get_ladder(key[0])
    known = [s for s in ladder.steps if s.name in by_step]
    summaries, previous = [], None
    for step in known:
      s = {
          'step': step.name, 'label': step.label, 'group': step.group, 'adopted': step.adopted,
          'index': ladder.names().index(step.name), **_run_stats(by_step[step.name]),
          'paper_top1': step.paper_top1, 'paper_std': step.paper_top1_std,
          'paper_gflops': step.paper_gflops, 'delta': None, 'delta_se': None,
          'within_noise': None, 'paper_delta': None, 'agrees': None,
      }
      if previous is not None:
        if s['n'] and previous['n']:
          s['delta'] = s['top1'] - previous['top1']
        if s['se'] is not None and previous['se'] is not None:
          s['delta_se'] = math.hypot(s['se'], previous['se'])
          s['within_noise'] = abs(s['delta']) <= 2 * s['delta_se']
        s['paper_delta'] = _difference(s['paper_top1'], previous['paper_top1'])
        s['agrees'] = _same_sign(s['delta'], s['paper_delta'])
      summaries.append(s)
      if step.adopted:
        previous = s
    out[key] = summaries
  return out


def _number(value: float | None) -> float | None:
  """JSON has no NaN or infinity: those, like a missing number, become null."""
  return value if value is not None and math.isfinite(value) else None


def _resolved(s: dict) -> bool | None:
  return None if s['within_noise'] is None else not s['within_noise']


def _json_step(s: dict) -> dict:
  return {
      'name': s['step'], 'label': s['label'], 'group': s['group'], 'adopted': s['adopted'],
      'index': s['index'], 'n': s['n'], 'mean': _number(s['top1']), 'std': _number(s['std']),
      'se': _number(s['se']), 'delta': _number(s['delta']), 'delta_se': _number(s['delta_se']),
      'resolved': _resolved(s), 'paper_top1': s['paper_top1'],
      'paper_delta': _number(s['paper_delta']), 'agrees_with_paper': s['agrees'],
      'params': s['params'], 'gmacs': _number(s['gmacs']), 'val_mean': _number(s['val_top1']),
      'val_std': _number(s['val_std']),
  }


def _json_summary(steps: list[dict]) -> dict:
  """Over the adopted steps: the changes measured, those outside the noise, and of those the ones
  going the paper's way."""
  changes = [s for s in steps if s['adopted'] and s['delta'] is not None]
  resolved = [s for s in changes if _resolved(s)]
  return {'changes': len(changes), 'resolved': len(resolved),
          'resolved_agree': sum(s['agrees'] is True for s in resolved)}


def _json_reference(s: dict) -> dict:
  return {'name': s['step'], 'label': s['label'], 'n': s['n'], 'mean': _number(s['top1']),
          'std': _number(s['std']), 'se': _number(s['se']), 'params': s['params'],
          'gmacs': _number(s['gmacs']), 'val_mean': _number(s['val_top1']),
          'val_std': _number(s['val_std']), 'paper_top1': s['paper_top1'],
          'paper_gflops': s['paper_gflops']}


def _keys(groups: dict, references: dict | None) -> list[tuple]:
  """The groups' keys, then those of groups that hold only references."""
  return list(groups) + [k for k in (references or {}) if k not in groups]


def as_json(groups: dict[tuple, list[dict]], references: dict | None = None) -> dict:
  """`summarize`'s groups as OUT/ladder.json's object: {'groups': [{'ladder', 'data', 'scale',
  'image_size', 'steps': [one per step, in ladder order], 'summary'}]}; a group where
  transformer references were trained (`reference_summaries`) has 'references' too: per
  reference its name, label, n, mean, std, se, params, GMACs, validation top-1 and the paper's
  top-1 and GFLOPs."""
  out = []
  for key in _keys(groups, references):
    ladder, data, scale, size = key
    steps = groups.get(key, [])
    group = {'ladder': ladder, 'data': data, 'scale': scale,
             'image_size': int(size) if str(size).isdigit() else size,
             'steps': [_json_step(s) for s in steps], 'summary': _json_summary(steps)}
    if (references or {}).get(key):
      group['references'] = [_json_reference(r) for r in references[key]]
    out.append(group)
  return {'groups': out}


def _extra_columns(out: str) -> dict:
  path = os.path.join(out, 'analysis', 'summary.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _top1_cell(s: dict) -> str:
  std = f' ± {s["std"]:.2f}' if s['std'] is not None else ''
  return f'{s["top1"]:.2f}{std} (n={s["n"]})'


def markdown(groups: dict[tuple, list[dict]], extra: dict, note: str = '',
             references: dict | None = None) -> str:
  has_cka = any(v.get('cka_prev') is not None for v in extra.values())
  has_bias = any(v.get('shape_bias') is not None for v in extra.values())
  lines = []
  for key in _keys(groups, references):
    (ladder, data, scale, size), steps = key, groups.get(key, [])
    refs = (references or {}).get(key, [])
    lines += [f'### {ladder} ladder on {data}, scale {scale}, {size}x{size}', '']
    if note:
      lines += [f'**{note}**', '']
    head = ['#', 'step', 'top-1 (mean ± std, n)', 'Δ prev', 'params', 'GMACs', 'train img/s',
            'time/run (s)']
    head += ['CKA to prev'] * has_cka + ['shape bias'] * has_bias
    head += ['paper top-1', 'paper GFLOPs']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for s in steps:
      top1 = _top1_cell(s)
      delta = ''
      if s['delta'] is not None:
        mark = {True: ' ~', False: '', None: ' ?'}[s['within_noise']]
        delta = f'{s["delta"]:+.2f}{mark}'
      name = s['step'] + ('' if s['adopted'] else ' (side)')
      paper = '' if s['paper_top1'] is None else f'{s["paper_top1"]:.2f}'
      if s['paper_std'] is not None:
        paper += f' ± {s["paper_std"]:.2f}'
      speed = f'{s["img_per_s"]:.0f}' if s['img_per_s'] else '–'   # too short to measure
      row = [str(s['index']), name, top1, delta, f'{s["params"]:,}', f'{s["gmacs"]:.4f}',
             speed, f'{s["wall_s"]:.0f}']
      e = extra.get(s['step'], {})
      if has_cka:
        row.append('' if e.get('cka_prev') is None else f'{e["cka_prev"]:.3f}')
      if has_bias:
        row.append('' if e.get('shape_bias') is None else f'{e["shape_bias"]:.3f}')
      row += [paper, f'{s["paper_gflops"]:.2f}' if s['paper_gflops'] else '']
      lines.append('| ' + ' | '.join(row) + ' |')
    for r in refs:
      speed = f'{r["img_per_s"]:.0f}' if r['img_per_s'] else '–'
      row = ['ref', f'{r["label"]} (`{r["step"]}`, reference)', _top1_cell(r), '',
             f'{r["params"]:,}', f'{r["gmacs"]:.4f}', speed, f'{r["wall_s"]:.0f}']
      row += [''] * (has_cka + has_bias) + [f'{r["paper_top1"]:.2f}', f'{r["paper_gflops"]:.2f}']
      lines.append('| ' + ' | '.join(row) + ' |')
    lines += ['', 'Δ prev: change of mean top-1 from the previous adopted step; "~": within the '
              'noise (|Δ| <= 2 standard errors over seeds); "?": one seed, no noise estimate. '
              'GMACs at this image size; paper figures are ImageNet-1K at 224x224 (Table 10/11).',
              '']
    if refs:
      lines += ['ref: a transformer reference (`ladder run --references`), trained under the '
                'enhanced recipe with the same options (under the miniature at its own learning '
                'rate, `MINIATURE_REFERENCES`), shrunk by the same scale '
                '(configs/ladder.py, `reference_model`); paper: Swin-T 81.3 / 4.5 GFLOPs (Swin '
                'paper, ConvNeXt paper Table 1), ViT-S/16 = DeiT-S 79.8 / 4.6 GFLOPs (DeiT paper '
                'Table 1).', '']
  return '\n'.join(lines)


REFERENCE_COLOURS = {'swin_t': '#37474f', 'vit_s': '#d81b60'}


def chart(steps: list[dict], title: str, path: str, references: list[dict] = ()) -> None:
  """Figure 2 in spirit: a bar per step, top to bottom, coloured by the paper's groups; ours with
  error bars and GMACs on the left, the paper's ImageNet top-1 on the right; side branches hatched.
  Each transformer reference (`reference_summaries`) is a dashed vertical line: ours on the left
  (its mean top-1), the paper's on the right."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel

  n = len(steps)
  fig, (ours, paper) = plt.subplots(1, 2, figsize=(13, 0.42 * max(n, 2) + 1.8), sharey=True,
                                    gridspec_kw={'width_ratios': [3, 2]})
  y = list(range(n))[::-1]
  colours = [GROUP_COLOURS.get(s['group'], '#607d8b') for s in steps]
  hatches = ['' if s['adopted'] else '//' for s in steps]

  def bars(ax, values, errors, lo):
    for yi, v, e, c, h in zip(y, values, errors, colours, hatches):
      if v is None or math.isnan(v):
        continue
      ax.barh(yi, v - lo, left=lo, color=c, hatch=h, edgecolor='white' if not h else 'black',
              xerr=e, error_kw={'ecolor': 'black', 'capsize': 3}, height=0.7)

  ours_vals = [s['top1'] for s in steps]
  ref_vals = [r['top1'] for r in references if not math.isnan(r['top1'])]
  valid = [v for v in ours_vals if not math.isnan(v)] + ref_vals or [0.0]
  spread = max(max(valid) - min(valid), 1.0)
  lo = max(0.0, min(valid) - 0.6 * spread)
  bars(ours, ours_vals, [s['std'] or 0.0 for s in steps], lo)
  for yi, s in zip(y, steps):
    if not math.isnan(s['top1']):
      ours.text(s['top1'] + (s['std'] or 0) + 0.03 * spread, yi,
                f'{s["top1"]:.1f}  ({_macs(s["gmacs"])})', va='center', fontsize=8)
  ours.set_xlim(lo, max(valid) + 0.9 * spread)
  ours.set_xlabel('our top-1 (%), mean ± std over seeds')
  ours.set_yticks(y, [s['label'] for s in steps], fontsize=9)

  p_vals = [s['paper_top1'] for s in steps]
  p_valid = [v for v in p_vals if v is not None] + [r['paper_top1'] for r in references]
  if p_valid:
    plo = min(p_valid) - 1.5
    bars(paper, [v if v is not None else math.nan for v in p_vals],
         [s['paper_std'] or 0.0 for s in steps], plo)
    for yi, s in zip(y, steps):
      if s['paper_top1'] is not None:
        paper.text(s['paper_top1'] + 0.15, yi, f'{s["paper_top1"]:.1f}  ({s["paper_gflops"]}G)',
                   va='center', fontsize=8)
    paper.set_xlim(plo, max(p_valid) + 1.8)
  paper.set_xlabel("paper's ImageNet-1K top-1 (%), Table 10")
  used = []
  for s in steps:
    if s['group'] not in used:
      used.append(s['group'])
  handles = [Patch(color=GROUP_COLOURS.get(g, '#607d8b'), label=g) for g in used]
  if any(not s['adopted'] for s in steps):
    handles.append(Patch(facecolor='white', edgecolor='black', hatch='//', label='not adopted'))
  for r in references:
    colour = REFERENCE_COLOURS.get(r['step'], 'black')
    if not math.isnan(r['top1']):
      ours.axvline(r['top1'], color=colour, linestyle='--', linewidth=1.2)
    paper.axvline(r['paper_top1'], color=colour, linestyle='--', linewidth=1.2)
    ours_text = 'no top-1' if math.isnan(r['top1']) else f'{r["top1"]:.1f} (n={r["n"]})'
    handles.append(Line2D([], [], color=colour, linestyle='--', label=(
        f'{r["label"]}: ours {ours_text}, paper {r["paper_top1"]} ({r["paper_gflops"]}G)')))
  fig.legend(handles=handles, loc='lower center', ncol=min(len(handles), 7), fontsize=8,
             frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, 0.06, 1, 0.96))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def check_one_row_per_run(table: str) -> None:
  """TableError, one line naming the lines, where the table holds two rows of one run (its config
  hash, seed and workdir) or two rows of one (step, seed) in one ladder: the same config trained
  again in another workdir (a seed counted twice) or two configs of a step (two budgets or
  recipes in one table would be pooled as seeds)."""
  for row, lines in steptable.duplicates(table):
    raise steptable.TableError(
        f'step table {table} holds {len(lines)} rows of one run, {steptable.describe(row)} '
        f'(lines {", ".join(map(str, lines))}): a run counts once; remove all but one')
  rows = {line: row for row, line in zip(*steptable.rows_and_lines(table))}
  def ladder_place(r):
    return (*_group_key(r), r['step'], r['seed'])
  for row, lines in steptable.duplicates(table, key=ladder_place):
    hashes = {rows[line].get('config_hash') for line in lines}
    what = ('one config trained in several workdirs, a seed counted twice' if len(hashes) == 1
            else 'several configs, which a ladder would pool as seeds')
    raise steptable.TableError(
        f'step table {table} holds {len(lines)} rows of {row["step"]} seed {row["seed"]} in one '
        f'ladder (lines {", ".join(map(str, lines))}): {what}; a ladder shows one run per step '
        'and seed: give each config a table of its own (ladder compare A B sets two side by side)')


def render(out: str, table: str | None = None, note: str = '') -> tuple[str, dict, dict, dict]:
  """(OUT/ladder.md's text, OUT/ladder.json's object, the groups, the references) of the step
  table (default OUT/steps.csv; the CKA and shape-bias columns from OUT/analysis, where the
  analyses have run). Writes nothing."""
  table = table or os.path.join(out, 'steps.csv')
  rows = steptable.read_rows(table)
  steptable.check_columns(table, rows, TABLE_COLUMNS, optional=('val_top1',))
  check_one_row_per_run(table)
  if not rows:
    raise UsageError(f'no finished runs in {table}: train some first '
                     f'(python -m experiments.ladder run --out {out})')
  groups, references = summarize(rows), reference_summaries(rows)
  text = markdown(groups, _extra_columns(out), note, references)
  return text, as_json(groups, references), groups, references


def show(out: str, table: str | None = None, note: str = '') -> tuple[str, list[str]]:
  """Renders OUT/ladder.md, OUT/ladder.json and the chart(s); returns (the Markdown, the files
  written). `note` (e.g. 'quick look, not at plateau') is printed under every title."""
  text, summary, groups, references = render(out, table, note)
  keys = _keys(groups, references)
  os.makedirs(out, exist_ok=True)
  written = []
  md = os.path.join(out, 'ladder.md')
  outputs.write_atomic(md, text)
  written.append(md)
  path = os.path.join(out, 'ladder.json')
  outputs.write_atomic(path, json.dumps(summary, indent=1, allow_nan=False) + '\n')
  written.append(path)
  largest = max(keys, key=lambda k: len(groups.get(k, [])) + len(references.get(k, [])))
  for key in keys:
    (ladder, data, scale, size), steps = key, groups.get(key, [])
    title = f'{ladder} ladder on {data} (scale {scale}, {size}x{size}): ours vs the paper'
    if note:
      title += f'\n{note}'
    names = [os.path.join(out, 'ladder.png')] if key == largest else []
    if len(keys) > 1:
      names.append(os.path.join(out, f'ladder_{data}_{scale}_{size}.png'))
    for path in names:
      chart(steps, title, path, references.get(key, []))
      written.append(path)
  return text, written
