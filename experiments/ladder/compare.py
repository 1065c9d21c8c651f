"""`python -m experiments.ladder compare A B`: two ladders of one config side by side, change by
change (e.g. the same miniature at 4 and at 16 epochs, or at two scales, or on two data sets).

A and B are step tables (CSV) or result folders holding one (`steps.csv`); each must hold one
ladder (one group of `ladder show`: ladder, data set, scale, image size). A change is an adopted
step measured against the adopted step before it, in both tables. Per change and per table: its
delta (mean top-1 difference) with the standard error sqrt(se_a^2 + se_b^2), whether it is
resolved (|delta| > 2 SE; none with one seed), whether its sign is the paper's (Table 10); across
the two: whether the sign is kept or flipped, and the difference of the two deltas with its own
standard error (a flip between two resolved deltas is a flip with the budget; one where either
side is in the noise is not evidence of one). Writes OUT/compare.json, OUT/compare.md and
OUT/compare.png (both ladders on one axis, the paper's on a second).
"""

from __future__ import annotations

import math
import os

from experiments import outputs
from experiments.cli import UsageError
from experiments.ladder import view
from experiments.training import steptable


def _table(path: str) -> str:
  """The step table of `path` (a CSV, or a folder holding steps.csv); UsageError if none."""
  table = os.path.join(path, 'steps.csv') if os.path.isdir(path) else path
  if not os.path.isfile(table):
    raise UsageError(f'{path}: no step table (give a steps.csv or a folder holding one)')
  return table


def load(path: str) -> dict:
  """One ladder's summary from a table: {'table', 'key' (ladder, data, scale, size), 'epochs',
  'steps' (`view.summarize`'s, in ladder order)}; UsageError for a table of several ladders or
  none, or two rows of one run."""
  table = _table(path)
  rows = steptable.read_rows(table)
  steptable.check_columns(table, rows, view.TABLE_COLUMNS, optional=('val_top1',))
  view.check_one_row_per_run(table)
  groups = view.summarize(rows)
  if len(groups) != 1:
    found = '; '.join(' '.join(map(str, k)) for k in groups) or 'none'
    raise UsageError(f'{table} holds {len(groups)} ladders ({found}): compare takes one ladder '
                     'per table')
  (key, steps), = groups.items()
  epochs = sorted({r.get('epochs', '') for r in rows if r['step'] in {s['step'] for s in steps}})
  return {'table': outputs.recorded(table), 'key': key, 'epochs': epochs, 'steps': steps}


def _changes(steps: list[dict]) -> dict[tuple[str, str], dict]:
  """{(previous adopted step, step): the step's summary} for each adopted step after the first."""
  out, previous = {}, None
  for s in steps:
    if not s['adopted']:
      continue
    if previous is not None:
      out[(previous['step'], s['step'])] = s
    previous = s
  return out


def _sign(x: float | None) -> int | None:
  return None if x is None or x == 0 or math.isnan(x) else (1 if x > 0 else -1)


def _side(s: dict) -> dict:
  resolved = None if s['within_noise'] is None else not s['within_noise']
  return {'mean': view._number(s['top1']), 'n': s['n'], 'delta': view._number(s['delta']),
          'delta_se': view._number(s['delta_se']), 'resolved': resolved,
          'agrees_with_paper': s['agrees']}


def label(ladder: dict) -> str:
  ladder_name, data, scale, size = ladder['key']
  epochs = '/'.join(ladder['epochs'])
  return f'{data} {size}px scale {scale}, {epochs} epochs'


def compare(a_path: str, b_path: str, labels: tuple[str, str] | None = None) -> dict:
  """The comparison of ladders A and B (see the module's docstring) as compare.json's object."""
  a, b = load(a_path), load(b_path)
  if a['key'][0] != b['key'][0]:
    raise UsageError(f'{a["table"]} is the {a["key"][0]} ladder and {b["table"]} the '
                     f'{b["key"][0]} ladder: compare takes two of one ladder')
  ca, cb = _changes(a['steps']), _changes(b['steps'])
  common = [pair for pair in ca if pair in cb]
  if not common:
    raise UsageError(f'{a["table"]} and {b["table"]} share no change (an adopted step and the one '
                     'before it in both): nothing to compare')
  labels = labels or (label(a), label(b))
  changes = []
  for previous, step in common:
    sa, sb = ca[(previous, step)], cb[(previous, step)]
    side_a, side_b = _side(sa), _side(sb)
    signs = _sign(sa['delta']), _sign(sb['delta'])
    sign = None if None in signs else ('kept' if signs[0] == signs[1] else 'flipped')
    difference = difference_se = difference_resolved = None
    if sa['delta'] is not None and sb['delta'] is not None:
      difference = sb['delta'] - sa['delta']
      if sa['delta_se'] is not None and sb['delta_se'] is not None:
        difference_se = math.hypot(sa['delta_se'], sb['delta_se'])
        difference_resolved = abs(difference) > 2 * difference_se
    changes.append({
        'step': step, 'from': previous, 'label': sa['label'],
        'paper_delta': view._number(sa['paper_delta']), 'a': side_a, 'b': side_b, 'sign': sign,
        'flip_resolved': sign == 'flipped' and bool(side_a['resolved'] and side_b['resolved']),
        'difference': view._number(difference), 'difference_se': view._number(difference_se),
        'difference_resolved': difference_resolved})

  def count(side: str, what: str) -> int:
    return sum(c[side][what] is True for c in changes)

  summary = {
      'changes': len(changes),
      'resolved_a': count('a', 'resolved'), 'resolved_b': count('b', 'resolved'),
      'resolved_agree_a': sum(c['a']['resolved'] is True and c['a']['agrees_with_paper'] is True
                              for c in changes),
      'resolved_agree_b': sum(c['b']['resolved'] is True and c['b']['agrees_with_paper'] is True
                              for c in changes),
      'kept': sum(c['sign'] == 'kept' for c in changes),
      'flipped': sum(c['sign'] == 'flipped' for c in changes),
      'flipped_resolved': sum(c['flip_resolved'] for c in changes),
      'difference_resolved': sum(c['difference_resolved'] is True for c in changes),
  }
  ends = {}
  for side, ladder in (('a', a), ('b', b)):
    adopted = [s for s in ladder['steps'] if s['adopted']]
    ends[side] = {'first': adopted[0]['step'], 'first_mean': view._number(adopted[0]['top1']),
                  'last': adopted[-1]['step'], 'last_mean': view._number(adopted[-1]['top1'])}
  return {'a': {'table': a['table'], 'label': labels[0], 'ladder': a['key'][0],
                'data': a['key'][1], 'scale': a['key'][2], 'image_size': a['key'][3],
                'epochs': a['epochs'], **ends['a']},
          'b': {'table': b['table'], 'label': labels[1], 'ladder': b['key'][0],
                'data': b['key'][1], 'scale': b['key'][2], 'image_size': b['key'][3],
                'epochs': b['epochs'], **ends['b']},
          'changes': changes, 'summary': summary,
          'steps': {'a': [view._json_step(s) for s in a['steps']],
                    'b': [view._json_step(s) for s in b['steps']]}}


def _cell(side: dict) -> str:
  if side['delta'] is None:
    return ''
  se = f' ± {side["delta_se"]:.2f}' if side['delta_se'] is not None else ''
  mark = {True: '', False: ' ~', None: ' ?'}[side['resolved']]
  return f'{side["delta"]:+.2f}{se}{mark}'


def _yes_no(value) -> str:
  return {True: 'yes', False: 'no', None: ''}[value]


def markdown(result: dict) -> str:
  """compare.md: one row per change."""
  a, b = result['a'], result['b']
  lines = [f'### {a["ladder"]} ladder: A = {a["label"]}, B = {b["label"]}', '',
           '| change | paper Δ | A: Δ ± SE | B: Δ ± SE | sign A → B | B − A (± SE) | '
           'agrees with paper (A / B) |',
           '|---|---|---|---|---|---|---|']
  for c in result['changes']:
    paper = '' if c['paper_delta'] is None else f'{c["paper_delta"]:+.2f}'
    sign = c['sign'] or ''
    if c['sign'] == 'flipped':
      sign += ' (both resolved)' if c['flip_resolved'] else ' (in the noise)'
    diff = ''
    if c['difference'] is not None:
      diff = f'{c["difference"]:+.2f}'
      if c['difference_se'] is not None:
        diff += f' ± {c["difference_se"]:.2f}' + ('' if c['difference_resolved'] else ' ~')
    lines.append(f'| {c["step"]} | {paper} | {_cell(c["a"])} | {_cell(c["b"])} | {sign} | '
                 f'{diff} | {_yes_no(c["a"]["agrees_with_paper"])} / '
                 f'{_yes_no(c["b"]["agrees_with_paper"])} |')
  s = result['summary']
  lines += ['', f'Δ: change of mean top-1 from the previous adopted step, ± its standard error; '
            '"~": within 2 standard errors (not resolved), "?": one seed. Resolved changes: '
            f'A {s["resolved_a"]} of {s["changes"]} ({s["resolved_agree_a"]} with the paper\'s '
            f'sign), B {s["resolved_b"]} ({s["resolved_agree_b"]}); signs kept {s["kept"]}, '
            f'flipped {s["flipped"]} (both sides resolved: {s["flipped_resolved"]}); B − A beyond '
            f'2 standard errors: {s["difference_resolved"]}.', '']
  return '\n'.join(lines)


def chart(result: dict, path: str) -> None:
  """Both ladders' mean top-1 (± SE) along the adopted steps on one axis, the paper's Table 10 on
  a second axis."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = [s['name'] for s in result['steps']['b'] if s['adopted']]
  names = [n for n in (s['name'] for s in result['steps']['a'] if s['adopted']) if n in names]
  fig, ax = plt.subplots(figsize=(11, 4.6))
  x = list(range(len(names)))
  for side, colour, marker in (('a', '#90a4ae', 'o'), ('b', '#1e88e5', 's')):
    by = {s['name']: s for s in result['steps'][side]}
    means = [by[n]['mean'] for n in names]
    errors = [by[n]['se'] or 0.0 for n in names]
    ax.errorbar(x, means, yerr=errors, color=colour, marker=marker, capsize=3,
                label=f'{side.upper()}: {result[side]["label"]}')
  ax.set_ylabel('ours: test top-1 (%), mean ± SE over seeds')
  ax.set_xticks(x, names, rotation=35, ha='right', fontsize=8)
  paper = ax.twinx()
  by = {s['name']: s for s in result['steps']['b']}
  paper.plot(x, [by[n]['paper_top1'] for n in names], color='#6d4c41', linestyle='--',
             marker='.', label='paper (Table 10, ImageNet-1K 224px)')
  paper.set_ylabel('paper: ImageNet top-1 (%)')
  handles = ax.get_legend_handles_labels()[0] + paper.get_legend_handles_labels()[0]
  ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc='lower left')
  ax.set_title(f'{result["a"]["ladder"]} ladder: {result["a"]["label"]} vs '
               f'{result["b"]["label"]}', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(a_path: str, b_path: str, out: str | None = None,
        labels: tuple[str, str] | None = None) -> tuple[dict, list[str]]:
  """Compares, writes OUT/compare.json, OUT/compare.md and OUT/compare.png (OUT: B's folder by
  default); returns (the result, the files written)."""
  result = compare(a_path, b_path, labels)
  out = out or os.path.dirname(os.path.abspath(_table(b_path)))
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, name) for name in ('compare.json', 'compare.md', 'compare.png')]
  outputs.write_json(written[0], result)
  outputs.write_atomic(written[1], markdown(result))
  chart(result, written[2])
  return result, written
