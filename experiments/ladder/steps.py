"""Every step's parameters and multiply-accumulates beside the paper's Table 10 / 11 (`ladder
steps`): rows for programs and their text and Markdown renderings."""

from __future__ import annotations

from flax import nnx

from modernize import ladder as ladders
from modernize import presets
from modernize.flops import count_macs
from modernize.network import build, count_params


def profile(cfg, image_size: int = 224) -> dict:
  """Parameters and GMACs of a network config (a ConvNet's or a transformer's), without
  allocating its weights."""
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), image_size=image_size))
  return {'params': count_params(model), 'gmacs': count_macs(cfg, image_size) / 1e9}


def step_rows(ladder_name: str = 'resnet50') -> list[dict]:
  ladder = ladders.get_ladder(ladder_name)
  rows = []
  for index, step in enumerate(ladder.steps):
    row = {'ladder': ladder.name, 'index': index, 'step': step.name, 'label': step.label,
           'group': step.group, 'adopted': step.adopted, 'recipe': ladder.recipe(step.name),
           'description': step.description}
    row.update(profile(ladder.net_config(step.name)))
    row.update({'paper_gflops': step.paper_gflops, 'paper_top1': step.paper_top1,
                'paper_top1_std': step.paper_top1_std,
                'flops_reference': step.flops_reference or step.paper_gflops, 'note': step.note})
    rows.append(row)
  return rows


def side_rows(ladder_name: str = 'resnet50') -> list[dict]:
  """The side branches' rows, each with the adopted step it builds on (`base`) and its change in
  parameters and GMACs from it."""
  ladder = ladders.get_ladder(ladder_name)
  rows = step_rows(ladder_name)
  by_step = {r['step']: r for r in rows}
  side = []
  for r in rows:
    if r['adopted']:
      continue
    base = by_step[ladder.base(r['step'])]
    side.append({**r, 'base': base['step'], 'params_vs_base': r['params'] - base['params'],
                 'gmacs_vs_base': r['gmacs'] - base['gmacs']})
  return side


def format_side(rows: list[dict]) -> str:
  lines = [f'{"#":>2}  {"side branch":<18} {"on top of":<18} {"params":>12} {"GMACs":>7} '
           f'{"params vs base":>14} {"GMACs vs base":>13}  change']
  for r in rows:
    lines.append(f'{r["index"]:>2}  {r["step"]:<18} {r["base"]:<18} {r["params"]:>12,d} '
                 f'{r["gmacs"]:>7.3f} {r["params_vs_base"]:>+14,d} {r["gmacs_vs_base"]:>+13.3f}  '
                 f'{r["description"]}')
  return '\n'.join(lines)


def preset_rows() -> list[dict]:
  """The ConvNet presets, then the transformer references with their published GFLOPs."""
  rows = [{'step': name, **profile(fn()), 'published_gflops': None}
          for name, fn in presets.PRESETS.items()]
  rows += [{'step': name, **profile(fn()), 'published_gflops': presets.REFERENCE_GFLOPS[name]}
           for name, fn in presets.REFERENCES.items()]
  return rows


def format_presets(rows: list[dict]) -> str:
  lines = []
  for r in rows:
    line = f'{r["step"]:<16} {r["params"]:>12,d} params {r["gmacs"]:>8.3f} GMACs'
    if r['published_gflops'] is not None:
      delta = 100 * (r['gmacs'] / r['published_gflops'] - 1)
      line += f'  (published {r["published_gflops"]} GFLOPs, {delta:+.1f}%)'
    lines.append(line)
  return '\n'.join(lines)


def _paper_flops(row: dict, mark: str) -> str:
  """The paper's GFLOPs, marked where a note explains them; '' for a step outside the paper (its
  note says where it comes from; its description says the rest)."""
  if row['paper_gflops'] is None:
    return ''
  return f'{row["paper_gflops"]:.2f}' + (mark if row['note'] else '')


def format_steps(rows: list[dict]) -> str:
  lines = [f'{"#":>2}  {"step":<22} {"params":>12} {"GMACs":>7} {"paper GFLOPs":>12} '
           f'{"vs paper":>8} {"paper top-1":>12}  change']
  for r in rows:
    top1 = '' if r['paper_top1'] is None else f'{r["paper_top1"]:.2f}'
    if r.get('paper_top1_std') is not None:
      top1 += f'±{r["paper_top1_std"]:.2f}'
    paper, delta = _paper_flops(r, '*'), ''
    if r['flops_reference'] is not None:
      delta = f'{100 * (r["gmacs"] / r["flops_reference"] - 1):+.1f}%'
    side = '' if r['adopted'] else ' [side branch]'
    lines.append(f'{r["index"]:>2}  {r["step"]:<22} {r["params"]:>12,d} {r["gmacs"]:>7.3f} '
                 f'{paper:>12} {delta:>8} {top1:>12}  {r["description"]}{side}')
  notes = {r['note'] for r in rows if r['note'] and r['paper_gflops'] is not None}
  lines += [f'* {note}' for note in sorted(notes)]
  return '\n'.join(lines)


def markdown_steps(rows: list[dict]) -> str:
  lines = ['| # | step | params | GMACs | paper GFLOPs | paper top-1 | change |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    top1 = '' if r['paper_top1'] is None else f'{r["paper_top1"]:.2f}'
    if r.get('paper_top1_std') is not None:
      top1 += f' ± {r["paper_top1_std"]:.2f}'
    paper = _paper_flops(r, ' *')
    lines.append(f'| {r["index"]} | `{r["step"]}` | {r["params"]:,} | {r["gmacs"]:.3f} | {paper} '
                 f'| {top1} | {r["description"]} |')
  notes = sorted({r['note'] for r in rows if r['note'] and r['paper_gflops'] is not None})
  return '\n'.join(lines + [''] + [f'\\* {n}' for n in notes])
