"""Look inside the ladder: representations (linear CKA), shape bias and error consistency.

  python -m experiments.analyze cka  --out DIR [--steps a,b,...] [--reference swin_t,vit_s]
                                     [--seed N] [--baseline-seed M] [--batch-size B] [--examples E]
  python -m experiments.analyze bias --out DIR [--steps a,b,...] [--reference swin_t,vit_s]
                                     [--seed N] [--batch-size B]
  python -m experiments.analyze show --out DIR

`show` computes nothing: it prints, as one Markdown table, what `cka` and `bias` wrote to
DIR/analysis/ (cka.json, bias.json), one row per step and per transformer reference.

Both read the trained runs DIR/runs/STEP/seedN/ (workdirs of `experiments.train`, as laid out by
`experiments.ladder run`); by default every step present, in ladder order. Outputs go to
DIR/analysis/; both commands merge their headline number per step into DIR/analysis/summary.json,
{step: {"cka_prev": float | null, "shape_bias": float | null}}, which the ladder view reads.

`cka`: minibatch linear CKA with the unbiased HSIC estimator (Nguyen et al. 2021;
`modernize.analysis`) over the whole test split, between the four stage outputs and the logits of
every analysed step (same seed), from which come
  * adjacent pairs: every layer of a step against every layer of its reference step ->
    cka_<reference>__<step>.png. The reference ("previous step") is the step it is built on: the
    nearest preceding *adopted* step in the list. Side branches (kernel_5/9/11) are never a
    reference, so kernel_7 is compared with move_up_depthwise (its 3x3 predecessor) and gelu with
    kernel_7, not with the side branch kernel_11 printed just before it;
  * within one model, stage against stage -> cka_within_<step>.png;
  * the same layer across all steps (step x step) -> cka_steps.png, and CKA to the reference, to the
    first and to the last step, per stage along the ladder -> cka_along_ladder.png;
  * cka_prev = the mean over the four stages of CKA to the reference step (null for the first);
  * with --reference swin_t (and/or vit_s; their runs DIR/runs/swin_t/seedN come from
    `experiments.ladder run --references`): every step's layers against the transformer's, matched
    stage by stage for Swin (its four stages) and by depth fraction for ViT (the patch tokens of
    the blocks at a quarter, half, three quarters and all of its depth, `depth_fraction_blocks`,
    as h x w maps; the class token left out), logits against logits -> `to_reference`,
    `cka_reference` (mean over the four stages) in cka.json and cka_to_reference.png, CKA to each
    transformer along the ladder above every step's test top-1 (this seed) beside the
    transformer's;
  * with --baseline-seed M: each step's and reference's CKA to its own run of seed M, layer by
    layer (`seed_baseline` in cka.json; a dotted line per transformer in cka_to_reference.png):
    how alike two trainings of one network are, the scale against which the other values read.
Memory: one minibatch at a time. Each model's jitted forward pass turns its layer outputs into
centred n x n Gram matrices on the device; the features never leave it. Feature maps are flattened
whole (spatial layout included, as Kornblith et al. 2019) when H*W*C <= --max-dim (16,384; every map
of the CPU ladder), otherwise average-pooled over 2x2 windows until they fit. The last, padded test
batch counts with its true size. All models are held at once (fine for the CPU scales).

`bias`: a cue-conflict set built from the test split (`modernize.analysis.cue_conflict_set`: the
hole-filled silhouette of image A, class s, filled with a mirror-tiled 8x8 patch of the foreground
of image B, class t != s; shape classes balanced; --num images, default 2,000, seed --cue-seed),
preprocessed exactly as the test set. Reports per step the shape bias, accuracy on the shape and on
the texture labels and test accuracy, and the error consistency (Cohen's kappa, Geirhos et al. 2020)
of every pair of steps on the ordinary test set. With --reference, the transformers are
measured too, and every step's error consistency with each of them is listed
(`error_consistency_to_reference`). Writes bias.json, shape_bias.png, error_consistency.png and
cue_conflict_examples.png. Needs an in-memory data set (fashion_mnist, cifar); the silhouettes
assume objects on a plain background, as in Fashion-MNIST.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import sys
import time
from typing import Iterator

import numpy as np

from experiments import cli, outputs
from experiments.cli import ArgumentParser, UsageError, guarded, positive

LAYERS = ('stage1', 'stage2', 'stage3', 'stage4', 'logits')
NUM_STAGES = 4
SUMMARY_KEYS = ('cka_prev', 'shape_bias')


# --- finding runs ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Run:
  step: str
  seed: int
  workdir: str
  config: dict

  @property
  def data_key(self) -> tuple:
    d = self.config['data']
    return d['name'], d.get('dir') or '', int(d['image_size']), int(d['channels'])


def _is_run(workdir: str) -> bool:
  ckpt = os.path.join(workdir, 'checkpoints')
  return (os.path.isfile(os.path.join(workdir, 'config.json')) and os.path.isdir(ckpt)
          and any(d.isdigit() for d in os.listdir(ckpt)))


def _seeds(step_dir: str) -> list[int]:
  if not os.path.isdir(step_dir):
    return []
  return sorted(int(d[4:]) for d in os.listdir(step_dir)
                if d.startswith('seed') and d[4:].isdigit() and _is_run(os.path.join(step_dir, d)))


def _check_listed(names: list[str], known: list[str], flag: str, kind: str, where: str = ''):
  unknown = [n for n in names if n not in known]
  if unknown:
    raise UsageError(f'unknown {kind}(s) {unknown}{where}; {kind}s: {known}')
  if len(set(names)) != len(names):
    raise UsageError(f'{flag} names a {kind} twice: {names}')


def _load_runs(runs_dir: str, names: list[str], seed: int) -> list[Run]:
  runs = []
  for name in names:
    workdir = os.path.join(runs_dir, name, f'seed{seed}')
    with open(os.path.join(workdir, 'config.json')) as f:
      runs.append(Run(name, seed, workdir, json.load(f)))
  return runs


def find_runs(out: str, steps: list[str] | None = None, seed: int = 0) -> list[Run]:
  """The trained runs OUT/runs/STEP/seedSEED, in ladder order; UsageError when there are none."""
  from modernize import ladder as ladders

  runs_dir = os.path.join(out, 'runs')
  present = sorted(d for d in (os.listdir(runs_dir) if os.path.isdir(runs_dir) else [])
                   if _seeds(os.path.join(runs_dir, d)))
  if not present:
    raise UsageError(f'no trained runs in {runs_dir} (expected {runs_dir}/STEP/seedN with '
                     'config.json and checkpoints/)')
  first = os.path.join(runs_dir, present[0], f'seed{_seeds(os.path.join(runs_dir, present[0]))[0]}')
  with open(os.path.join(first, 'config.json')) as f:
    ladder = ladders.get_ladder(json.load(f).get('ladder', 'resnet50'))
  order = ladder.names()
  if steps:
    _check_listed(steps, order, '--steps', 'step', f' of ladder {ladder.name!r}')
    missing = [s for s in steps if seed not in _seeds(os.path.join(runs_dir, s))]
    if missing:
      found = {s: _seeds(os.path.join(runs_dir, s)) for s in missing}
      raise UsageError(f'no trained run of step(s) {missing} with seed {seed} in {runs_dir} '
                       f'(seeds found: {found})')
    chosen = sorted(steps, key=order.index)
  else:
    chosen = [s for s in order if seed in _seeds(os.path.join(runs_dir, s))]
    if not chosen:
      raise UsageError(f'no trained run with seed {seed} in {runs_dir} (steps present: {present})')
  return _load_runs(runs_dir, chosen, seed)


def _check_one_data_set(runs: list[Run], reference_runs: list[Run]) -> None:
  """UsageError unless the steps' runs share one data set and the references' runs use it too."""
  names = sorted({r.config['data']['name'] for r in runs})
  if len(names) > 1:
    raise UsageError(f'the runs use different data sets {names}; analyse them separately '
                     'with --steps')
  other = {r.step: r.config['data']['name'] for r in reference_runs
           if r.config['data']['name'] != names[0]}
  if other:
    raise UsageError(f'reference run(s) {other} use another data set than the ladder ({names[0]})')


def find_reference_runs(out: str, names: list[str], seed: int = 0) -> list[Run]:
  """The trained transformer references OUT/runs/NAME/seedSEED (`ladder run --references`), in the
  order given; UsageError for an unknown name or a missing run."""
  from modernize import presets

  runs_dir = os.path.join(out, 'runs')
  _check_listed(names, sorted(presets.REFERENCES), '--reference', 'reference')
  missing = [n for n in names if seed not in _seeds(os.path.join(runs_dir, n))]
  if missing:
    raise UsageError(f'no trained run of reference(s) {missing} with seed {seed} in {runs_dir} '
                     '(train them with `python -m experiments.ladder run --references` and the '
                     "ladder's options)")
  return _load_runs(runs_dir, names, seed)


def references(steps: list[str], ladder_name: str = 'resnet50') -> dict[str, str | None]:
  """Each step's reference for "CKA to the previous step": the nearest preceding adopted step.

  Side branches are never a reference (nothing is built on them), so after the kernel sizes the
  ladder continues from kernel_7, as the network does.
  """
  from modernize import ladder as ladders

  ladder = ladders.get_ladder(ladder_name)
  out, last = {}, None
  for step in steps:
    out[step] = last
    if ladder.step(step).adopted:
      last = step
  return out


# --- models and data ------------------------------------------------------------------------------

def _progress(iterable=None, **kwargs):
  from tqdm import tqdm
  return tqdm(iterable, disable=not sys.stderr.isatty(), dynamic_ncols=True, **kwargs)


def load_models(runs: list[Run]) -> list:
  """(graphdef, state) of every run's trained network, in eval mode."""
  from flax import nnx

  from experiments.training.checkpoint import load_trained_model

  models = []
  for run in _progress(runs, desc='load', unit='model'):
    model, _ = load_trained_model(run.workdir)
    models.append(nnx.split(model))
  return models


def depth_fraction_blocks(depth: int, num: int = NUM_STAGES) -> list[int]:
  """The blocks of a ViT of `depth` blocks matched to a ConvNet's `num` stages by depth fraction:
  block ceil(k * depth / num) for stage k = 1..num, 0-based (12 blocks: 2, 5, 8, 11; 4: 0..3)."""
  return [math.ceil(k * depth / num) - 1 for k in range(1, num + 1)]


def analysis_layers(model, x) -> tuple[list, object]:
  """(the four representations CKA compares, logits) of `model` on `x`, in one forward pass: the
  four stage outputs of a ladder network or a Swin ([B, H, W, C]); for a ViT the patch tokens of
  the blocks `depth_fraction_blocks` picks, as [B, h, w, C] maps (class token left out)."""
  from modernize.transformers import VisionTransformer

  feats = model.features(x)
  logits = model.classify(feats)
  if isinstance(model, VisionTransformer):
    side = model.cfg.img_size // model.cfg.patch_size
    feats = [feats[i][:, 1:].reshape(feats[i].shape[0], side, side, feats[i].shape[-1])
             for i in depth_fraction_blocks(len(feats))]
  return feats, logits


@functools.lru_cache(maxsize=None)
def _cka_forward(graphdef, max_dim: int):
  """jit(state, x, labels, mask) -> (Gram matrices (len(LAYERS), n, n), number of correct
  predictions among the unpadded images) of one network; one per architecture (equal graphdefs:
  two seeds of a step share it, and its compiled program)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from modernize import analysis

  @jax.jit
  def forward(state, x, labels, mask):
    feats, logits = analysis_layers(nnx.merge(graphdef, state), x)
    layers = [analysis.pool_to_size(f, max_dim) for f in feats] + [logits]
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
    return jnp.stack([analysis.gram_linear(f, mask) for f in layers]), correct

  return forward


@functools.lru_cache(maxsize=None)
def _logits_forward(graphdef):
  import jax
  from flax import nnx

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  return forward


def _feature_dims(graphdef, state, shape, max_dim: int) -> dict[str, int]:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from modernize import analysis

  def dims(state, x):
    feats, logits = analysis_layers(nnx.merge(graphdef, state), x)
    return [analysis.pool_to_size(f, max_dim) for f in feats] + [logits]

  out = jax.eval_shape(dims, state, jax.ShapeDtypeStruct(shape, jnp.float32))
  return {name: int(np.prod(o.shape[1:])) for name, o in zip(LAYERS, out)}


def split_batches(runs: list[Run], batch_size: int,
                  num_examples: int | None = None) -> Iterator[tuple]:
  """(images per data key, labels, mask) over the test split (its first `num_examples`, or all),
  one pipeline per input key."""
  from experiments.data import pipeline

  keys = sorted({r.data_key for r in runs})
  iterators = [pipeline.eval_batches(name, data_dir=data_dir or None, batch_size=batch_size,
                                     image_size=size, channels=channels,
                                     num_examples=num_examples)
               for name, data_dir, size, channels in keys]
  specs = [pipeline.input_spec(name, data_dir or None, channels)
           for name, data_dir, _, channels in keys]
  for batches in zip(*iterators):
    yield ({k: np.asarray(pipeline.model_input(b, spec))
            for k, b, spec in zip(keys, batches, specs)}, batches[0]['label'], batches[0]['mask'])


def preprocess(images: np.ndarray, data_key: tuple) -> np.ndarray:
  """uint8 images of a small data set -> model inputs, as the test pipeline's eval transform does
  (resize to image_size, RGB -> luma for 1-channel models, normalise, replicate channels)."""
  from experiments.data import augment as aug
  from experiments.data import datasets

  name, data_dir, size, channels = data_key
  spec = datasets.info(name, data_dir or None)
  mean, std = np.array(spec.mean, np.float64), np.array(spec.std, np.float64)
  images = aug.resize(images, size, 1.0)
  if channels == 1 and images.shape[-1] == 3:
    images = aug.to_grayscale(images)
    weights = np.array([0.299, 0.587, 0.114])
    mean, std = np.array([mean @ weights]), np.array([std @ weights])
  out = images.astype(np.float32)
  out *= (1.0 / (255.0 * std)).astype(np.float32)
  out -= (mean / std).astype(np.float32)
  if channels == 3 and out.shape[-1] == 1:
    out = np.repeat(out, 3, axis=-1)
  return np.ascontiguousarray(out)


def _num_test(runs: list[Run], num_examples: int | None = None) -> int:
  from experiments.data import datasets

  name, data_dir, _, _ = runs[0].data_key
  num_test = datasets.info(name, data_dir or None).num_test
  return min(num_test, num_examples) if num_examples else num_test


# --- outputs --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: str):
  with open(path, 'a') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def merge_summary(analysis_dir: str, key: str, values: dict[str, float | None]) -> dict:
  """Sets `key` (cka_prev or shape_bias) of each step in summary.json, keeping everything else."""
  if key not in SUMMARY_KEYS:
    raise ValueError(f'summary keys are {SUMMARY_KEYS}, not {key!r}')
  path = os.path.join(analysis_dir, 'summary.json')
  with _locked(os.path.join(analysis_dir, '.summary.lock')):
    summary = {}
    if os.path.exists(path):
      try:
        with open(path) as f:
          summary = json.load(f)
      except (OSError, ValueError):
        summary = {}
    for step, value in values.items():
      entry = summary.get(step) if isinstance(summary.get(step), dict) else {}
      summary[step] = {k: entry.get(k) for k in SUMMARY_KEYS}
      summary[step][key] = value
    outputs.write_json(path, summary)
  return summary


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _heatmap(ax, matrix, rows, cols, vmin=0.0, vmax=1.0, cmap='magma', fmt='.2f',
             annotate: bool = True, ylabels: bool = True):
  m = np.asarray(matrix, np.float64)
  im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap)
  ax.set_xticks(range(len(cols)), cols, rotation=60, ha='right', fontsize=7)
  ax.set_yticks(range(len(rows)), rows if ylabels else [''] * len(rows), fontsize=7)
  if annotate:
    for (i, j), v in np.ndenumerate(m):
      if np.isfinite(v):
        bright = (v - vmin) / (vmax - vmin) > 0.6
        ax.text(j, i, format(v, fmt), ha='center', va='center', fontsize=6,
                color='black' if bright else 'white')
  return im


def _save_heatmap(path, matrix, rows, cols, title, xlabel, ylabel, **kwargs):
  plt = _pyplot()
  size = 2.5 + 0.4 * max(len(rows), len(cols))
  fig, ax = plt.subplots(figsize=(size + 1.5, size))
  im = _heatmap(ax, matrix, rows, cols, annotate=max(len(rows), len(cols)) <= 20, **kwargs)
  ax.set_title(title, fontsize=9)
  ax.set(xlabel=xlabel, ylabel=ylabel)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- cka ------------------------------------------------------------------------------------------

def run_cka(out: str, runs: list[Run], *, batch_size: int = 256, max_dim: int = 16384,
            reference_runs: list[Run] = (), baseline_runs: list[Run] = (),
            examples: int | None = None) -> dict:
  """Minibatch CKA of every layer of every run against every other (with the transformer
  references' runs, if given) on the test split's first `examples` images (None: all); writes
  cka.json and figures. `baseline_runs`: the same steps and references trained with another seed,
  in the order of `runs + reference_runs`, for the seed baseline (each one's CKA to its other
  seed)."""
  from modernize import analysis

  analysis_dir = os.path.join(out, 'analysis')
  os.makedirs(analysis_dir, exist_ok=True)
  steps = [r.step for r in runs]
  analysed = list(runs) + list(reference_runs)
  if baseline_runs and [r.step for r in baseline_runs] != [r.step for r in analysed]:
    raise ValueError('baseline_runs must be the analysed steps and references, in their order')
  everything = analysed + list(baseline_runs)
  num_layers = len(LAYERS)
  start = time.time()
  models = load_models(everything)
  forwards = [_cka_forward(g, max_dim) for g, _ in models]
  dims = {r.step: _feature_dims(g, s, (2, r.data_key[2], r.data_key[2], r.data_key[3]), max_dim)
          for r, (g, s) in zip(everything, models)}
  cka = analysis.MinibatchCKA(len(everything) * num_layers)
  num_examples, correct = 0, 0   # correct: per model, summed on the device (no per-batch sync)
  total = math.ceil(_num_test(runs, examples) / batch_size)
  import jax.numpy as jnp
  for images, labels, mask in _progress(split_batches(everything, batch_size, examples),
                                        total=total, desc='cka', unit='batch'):
    grams, counts = zip(*[fwd(state, images[r.data_key], labels, mask)
                          for fwd, (_, state), r in zip(forwards, models, everything)])
    cka.update_grams(jnp.concatenate(grams), mask=mask)
    correct = correct + jnp.stack(counts)
    num_examples += int(mask.sum())
  correct = np.asarray(correct)
  full = cka.result().reshape(len(everything), num_layers, len(everything), num_layers)
  accuracy = {r.step: float(c / num_examples) for r, c in zip(analysed, correct)}

  refs = references(steps, runs[0].config.get('ladder', 'resnet50'))
  index = {s: i for i, s in enumerate(steps)}
  first, last = 0, len(steps) - 1
  pairs, to_previous, cka_prev = [], {}, {}
  for step in steps:
    ref = refs[step]
    if ref is None:
      to_previous[step], cka_prev[step] = None, None
      continue
    matrix = full[index[ref], :, index[step], :]
    pairs.append({'a': ref, 'b': step, 'matrix': matrix})
    to_previous[step] = {layer: matrix[l, l] for l, layer in enumerate(LAYERS)}
    cka_prev[step] = float(np.mean(np.diag(matrix)[:NUM_STAGES]))
  within = {s: full[i, :, i, :] for s, i in index.items()}
  per_layer = {layer: full[:len(steps), l, :len(steps), l] for l, layer in enumerate(LAYERS)}
  result = {
      'estimator': 'minibatch linear CKA, unbiased HSIC (Nguyen et al. 2021)',
      'data': runs[0].config['data']['name'], 'seed': runs[0].seed, 'steps': steps,
      'layers': list(LAYERS), 'num_examples': num_examples, 'batch_size': batch_size,
      'num_batches': cka.batches, 'max_dim': max_dim, 'feature_dims': dims,
      'test_accuracy': accuracy,
      'reference': refs, 'pairs': pairs, 'within': within, 'per_layer': per_layer,
      'to_previous': to_previous, 'cka_prev': cka_prev,
      'to_first': {s: {layer: full[first, l, i, l] for l, layer in enumerate(LAYERS)}
                   for s, i in index.items()},
      'to_last': {s: {layer: full[last, l, i, l] for l, layer in enumerate(LAYERS)}
                  for s, i in index.items()},
  }
  if reference_runs:
    result.update(_against_references(full, steps, reference_runs, models[len(runs):]))
  if baseline_runs:
    n = len(analysed)
    per_layer = {r.step: {layer: full[k, l, n + k, l] for l, layer in enumerate(LAYERS)}
                 for k, r in enumerate(analysed)}
    result['seed_baseline'] = {
        'seed': baseline_runs[0].seed, 'per_layer': per_layer,
        'mean': {name: float(np.mean([v[layer] for layer in LAYERS[:NUM_STAGES]]))
                 for name, v in per_layer.items()},
        'test_accuracy': {r.step: float(c / num_examples)
                          for r, c in zip(baseline_runs, correct[n:])}}
  outputs.write_json(os.path.join(analysis_dir, 'cka.json'), result)
  _plot_cka(analysis_dir, result)
  merge_summary(analysis_dir, 'cka_prev', cka_prev)
  result['seconds'] = time.time() - start
  return result


def _against_references(full, steps: list[str], reference_runs: list[Run], models) -> dict:
  """The references' part of cka.json: each step's layers against each transformer's, matched
  layer by layer (`analysis_layers`)."""
  from flax import nnx

  from modernize.transformers import VisionTransformer

  names = [r.step for r in reference_runs]
  matched, pairs, to_reference, mean = {}, [], {}, {}
  for k, (name, (graphdef, state)) in enumerate(zip(names, models)):
    j = len(steps) + k
    model = nnx.merge(graphdef, state)
    if isinstance(model, VisionTransformer):
      blocks = depth_fraction_blocks(model.cfg.depth)
      matched[name] = [f'block {b + 1} of {model.cfg.depth}' for b in blocks] + ['logits']
    else:
      matched[name] = list(LAYERS)
    to_reference[name], mean[name] = {}, {}
    for i, step in enumerate(steps):
      matrix = full[j, :, i, :]   # rows: the reference's layers; columns: the step's
      pairs.append({'a': name, 'b': step, 'matrix': matrix})
      to_reference[name][step] = {layer: matrix[l, l] for l, layer in enumerate(LAYERS)}
      mean[name][step] = float(np.mean(np.diag(matrix)[:NUM_STAGES]))
  return {'references': names, 'reference_layers': matched, 'reference_pairs': pairs,
          'reference_within': {n: full[len(steps) + k, :, len(steps) + k, :]
                               for k, n in enumerate(names)},
          'to_reference': to_reference, 'cka_reference': mean}


def _plot_cka(analysis_dir: str, result: dict) -> None:
  layers, steps = result['layers'], result['steps']
  for pair in result['pairs']:
    _save_heatmap(os.path.join(analysis_dir, f'cka_{pair["a"]}__{pair["b"]}.png'), pair['matrix'],
                  layers, layers, f'linear CKA: {pair["a"]} vs {pair["b"]}', pair['b'], pair['a'])
  for step, matrix in result['within'].items():
    _save_heatmap(os.path.join(analysis_dir, f'cka_within_{step}.png'), matrix, layers, layers,
                  f'linear CKA within {step}', 'layer', 'layer')
  plt = _pyplot()
  # The same layer across every pair of steps.
  cols = 3
  rows = math.ceil(len(layers) / cols)
  side = max(3.0, 0.32 * len(steps) + 1.5)
  fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.5, (side + 1.2) * rows),
                           squeeze=False, layout='constrained')
  for k, ax in enumerate(axes.flat):
    if k >= len(layers):
      ax.axis('off')
      continue
    im = _heatmap(ax, result['per_layer'][layers[k]], steps, steps, fmt='.1f',
                  annotate=len(steps) <= 8, ylabels=k % cols == 0)
    ax.set_title(layers[k], fontsize=9)
  fig.colorbar(im, ax=axes, fraction=0.02)
  fig.suptitle('linear CKA between steps, layer by layer')
  fig.savefig(os.path.join(analysis_dir, 'cka_steps.png'), dpi=110, bbox_inches='tight')
  plt.close(fig)
  # Along the ladder, per stage.
  x = np.arange(len(steps))
  panels = (('to_previous', 'CKA to the previous (reference) step'),
            ('to_first', f'CKA to {steps[0]}'), ('to_last', f'CKA to {steps[-1]}'))
  fig, axes = plt.subplots(3, 1, figsize=(max(7, 0.45 * len(steps) + 3), 9), sharex=True,
                           sharey=True, layout='constrained')
  for ax, (key, title) in zip(axes, panels):
    for layer in layers:
      y = [np.nan if result[key][s] is None else result[key][s][layer] for s in steps]
      ax.plot(x, np.asarray(y, np.float64), marker='o', ms=3,
              ls='--' if layer == 'logits' else '-', label=layer)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel('linear CKA')
    ax.grid(alpha=0.3)
  axes[-1].set_xticks(x, steps, rotation=60, ha='right', fontsize=7)
  axes[0].legend(fontsize=7, ncol=len(layers))
  fig.savefig(os.path.join(analysis_dir, 'cka_along_ladder.png'), dpi=110)
  plt.close(fig)
  if result.get('references'):
    _plot_cka_to_reference(os.path.join(analysis_dir, 'cka_to_reference.png'), result)


def _plot_cka_to_reference(path: str, result: dict) -> None:
  """CKA to each transformer along the ladder (mean over the four stages, and per stage), above
  each step's test top-1 with the transformers' as horizontal lines."""
  plt = _pyplot()
  steps, names = result['steps'], result['references']
  x = np.arange(len(steps))
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 0.45 * len(steps) + 3), 7), sharex=True,
                                    height_ratios=(3, 2), layout='constrained')
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for k, name in enumerate(names):
    color = colors[k % len(colors)]
    top.plot(x, [result['cka_reference'][name][s] for s in steps], marker='o', color=color, lw=2,
             label=f'{name}: mean of the 4 stages')
    if 'seed_baseline' in result:   # how alike two seeds of the transformer itself are
      top.axhline(result['seed_baseline']['mean'][name], color=color, lw=1.5, ls=':',
                  label=f'{name} seed {result["seed"]} vs seed {result["seed_baseline"]["seed"]}')
    for l, layer in enumerate(LAYERS[:NUM_STAGES]):
      top.plot(x, [result['to_reference'][name][s][layer] for s in steps], color=color, lw=0.8,
               alpha=0.5, ls=(0, (1 + l, 2)), label=f'{layer} (thin)' if k == 0 else None)
  top.set(ylabel='linear CKA', title=f'CKA to the transformers along the ladder (seed '
          f'{result["seed"]}, {result["num_examples"]:,} test images)')
  top.grid(alpha=0.3)
  top.legend(fontsize=7, ncol=2)
  bottom.plot(x, [100 * result['test_accuracy'][s] for s in steps], marker='o', color='black',
              label='step')
  for k, name in enumerate(names):
    bottom.axhline(100 * result['test_accuracy'][name], color=colors[k % len(colors)], ls='--',
                   label=name)
  bottom.set(ylabel='test top-1 (%)')
  bottom.grid(alpha=0.3)
  bottom.legend(fontsize=7)
  bottom.set_xticks(x, steps, rotation=60, ha='right', fontsize=7)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- bias -----------------------------------------------------------------------------------------

def _padded_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    yield chunk, n


def run_bias(out: str, runs: list[Run], *, batch_size: int = 256, num: int = 2000,
             cue_seed: int = 0, reference_runs: list[Run] = ()) -> dict:
  """Shape bias on a cue-conflict set and pairwise error consistency on the test set, of the
  ladder's runs and the transformer references' runs, if given."""
  from experiments.data import datasets
  from modernize import analysis

  analysis_dir = os.path.join(out, 'analysis')
  os.makedirs(analysis_dir, exist_ok=True)
  steps = [r.step for r in runs]
  names = [r.step for r in reference_runs]
  runs = list(runs) + list(reference_runs)   # from here on: steps, then references
  start = time.time()
  name, data_dir, _, _ = runs[0].data_key
  if datasets.info(name, data_dir or None).large:
    raise UsageError(f'bias needs a data set held in memory (fashion_mnist, cifar10, cifar100), '
                     f'not {name}')
  raw, raw_labels = datasets.load_arrays(name, 'test', data_dir or None)
  cue = analysis.cue_conflict_set(raw, raw_labels, num=num, seed=cue_seed)
  _plot_examples(os.path.join(analysis_dir, 'cue_conflict_examples.png'), cue)

  models = load_models(runs)
  forwards = [_logits_forward(g) for g, _ in models]
  # The ordinary test set: every model on each batch.
  correct = [[] for _ in runs]
  total = math.ceil(_num_test(runs) / batch_size)
  for images, labels, mask in _progress(split_batches(runs, batch_size), total=total,
                                        desc='test', unit='batch'):
    for i, (fwd, (_, state), r) in enumerate(zip(forwards, models, runs)):
      pred = np.asarray(fwd(state, images[r.data_key])).argmax(-1)
      correct[i].append((pred == labels)[mask])
  correct = [np.concatenate(c) for c in correct]
  # The cue-conflict set.
  inputs = {k: preprocess(cue.image, k) for k in sorted({r.data_key for r in runs})}
  preds = [[] for _ in runs]
  for key, x in inputs.items():
    for chunk, n in _progress(_padded_batches(x, batch_size), total=math.ceil(num / batch_size),
                              desc='cue-conflict', unit='batch'):
      for i, (fwd, (_, state), r) in enumerate(zip(forwards, models, runs)):
        if r.data_key == key:
          preds[i].append(np.asarray(fwd(state, chunk)).argmax(-1)[:n])
  results = {r.step: analysis.shape_bias(np.concatenate(p), cue.shape_label, cue.texture_label)
             for r, p in zip(runs, preds)}
  kappa = analysis.error_consistency_matrix(correct)
  models = steps + names
  result = {
      'data': name, 'seed': runs[0].seed, 'steps': steps, 'references': names,
      'num_test': int(len(correct[0])),
      'test_accuracy': {s: float(c.mean()) for s, c in zip(models, correct)},
      'cue_conflict': {
          'num': num, 'seed': cue_seed, 'patch_size': cue.patch_size,
          'method': 'silhouette of test image A (class s, hole-filled foreground) filled with a '
                    'mirror-tiled patch of the foreground of test image B (class t != s); '
                    'shape label s, texture label t; shape classes balanced',
          'shape_label_counts': np.bincount(cue.shape_label).tolist(),
          'texture_label_counts': np.bincount(cue.texture_label).tolist()},
      'shape_bias': {s: b.to_dict() for s, b in results.items()},
      'error_consistency': {'models': models, 'kappa': kappa},
      'error_consistency_to_reference': {
          ref: {s: kappa[len(steps) + k][i] for i, s in enumerate(steps)}
          for k, ref in enumerate(names)},
  }
  outputs.write_json(os.path.join(analysis_dir, 'bias.json'), result)
  _save_heatmap(os.path.join(analysis_dir, 'error_consistency.png'), kappa, models, models,
                'error consistency (kappa), test set', 'step', 'step',
                vmin=-0.2, vmax=1.0, cmap='viridis')
  _plot_shape_bias(os.path.join(analysis_dir, 'shape_bias.png'), result)
  merge_summary(analysis_dir, 'shape_bias', {s: results[s].shape_bias for s in steps})
  result['seconds'] = time.time() - start
  return result


def _plot_examples(path: str, cue, count: int = 24) -> None:
  plt = _pyplot()
  cols = 8
  rows = math.ceil(min(count, len(cue.image)) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.6 * rows))
  for i, ax in enumerate(np.atleast_1d(axes).flat):
    ax.axis('off')
    if i < len(cue.image):
      image = cue.image[i]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=255)
      ax.set_title(f'shape {cue.shape_label[i]} / tex {cue.texture_label[i]}', fontsize=7)
  fig.suptitle('cue-conflict images (labels: shape class / texture class)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_shape_bias(path: str, result: dict) -> None:
  plt = _pyplot()
  steps = result['steps'] + result['references']   # the references last
  x = np.arange(len(steps))
  sb = [result['shape_bias'][s] for s in steps]
  fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(steps) + 2), 4))
  ax.bar(x, [np.nan if b['shape_bias'] is None else b['shape_bias'] for b in sb],
         color=['tab:blue'] * len(result['steps']) + ['tab:purple'] * len(result['references']),
         label='shape bias' + (' (purple: transformer references)' if result['references'] else ''))
  ax.plot(x, [b['shape_accuracy'] for b in sb], 'o', color='tab:orange', label='shape accuracy')
  ax.plot(x, [b['texture_accuracy'] for b in sb], 's', color='tab:green', label='texture accuracy')
  ax.axhline(0.5, color='gray', lw=0.8, ls=':')
  ax.set_xticks(x, steps, rotation=60, ha='right', fontsize=7)
  ax.set(ylim=(0, 1), ylabel='fraction', title='shape bias on cue-conflict images')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- the table of both analyses -------------------------------------------------------------------

def _read_analysis(analysis_dir: str, name: str, command: str) -> dict:
  path = os.path.join(analysis_dir, name)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise UsageError(f'no {path}: run `python -m experiments.analyze {command} --out ...` first')
  except (OSError, ValueError) as e:
    raise UsageError(f'cannot read {path}: {e}')


def show(out: str) -> str:
  """Markdown: per step (and transformer reference) test top-1, CKA to the previous step, to its
  own other seed and to each transformer (means over the four stages; also Swin-T's last stage),
  shape bias and error consistency (kappa) to the previous step and to each transformer, from
  OUT/analysis/{cka,bias}.json. The two files must describe the same seed and steps."""
  analysis_dir = os.path.join(out, 'analysis')
  cka = _read_analysis(analysis_dir, 'cka.json', 'cka')
  bias = _read_analysis(analysis_dir, 'bias.json', 'bias')
  if cka['seed'] != bias['seed'] or cka['steps'] != bias['steps']:
    raise UsageError(f'{analysis_dir}: cka.json (seed {cka["seed"]}, {len(cka["steps"])} steps) '
                     f'and bias.json (seed {bias["seed"]}, {len(bias["steps"])} steps) describe '
                     'different runs; run both again with the same --seed and --steps')
  steps, refs = cka['steps'], cka.get('references') or []
  baseline = cka.get('seed_baseline') or {}
  kappa = bias['error_consistency']
  index = {m: i for i, m in enumerate(kappa['models'])}

  def num(value, digits=3):
    return '' if value is None else f'{value:.{digits}f}'

  def k(a, b):
    return None if a is None or b is None or a not in index or b not in index else \
        kappa['kappa'][index[a]][index[b]]

  head = ['step', f'top-1 (seed {cka["seed"]})', 'CKA to prev']
  if baseline:
    head.append(f'CKA to its seed {baseline["seed"]}')
  for r in refs:
    head.append(f'CKA to {r}')
    if 'stage4' in cka['reference_layers'][r]:
      head.append(f'{r} stage 4')
  head += ['shape bias', 'κ to prev'] + [f'κ to {r}' for r in refs]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name in steps + refs:
    is_ref = name in refs
    prev = None if is_ref else cka['reference'][name]
    row = [f'{name} (reference)' if is_ref else name,
           f'{100 * cka["test_accuracy"][name]:.2f}',
           num(None if is_ref else cka['cka_prev'][name])]
    if baseline:
      row.append(num(baseline['mean'].get(name)))
    for r in refs:
      row.append('' if is_ref else num(cka['cka_reference'][r][name]))
      if 'stage4' in cka['reference_layers'][r]:
        row.append('' if is_ref else num(cka['to_reference'][r][name]['stage4']))
    shape = bias['shape_bias'].get(name, {}).get('shape_bias')
    row += [num(shape), num(k(name, prev), 2)]
    row += [num(k(name, r) if r != name else None, 2) for r in refs]
    lines.append('| ' + ' | '.join(row) + ' |')
  cue = bias['cue_conflict']
  lines += ['', f'Seed {cka["seed"]} of each run; CKA over {cka["num_examples"]:,} test images, '
            'the mean over the four stages (prev: the step it is built on'
            + (f'; its seed {baseline["seed"]}: the same network trained with seed '
               f'{baseline["seed"]}' if baseline else '')
            + ('; the transformers matched stage by stage (Swin) or by depth fraction (ViT)'
               if refs else '')
            + f'); shape bias on {cue["num"]:,} cue-conflict images (seed {cue["seed"]}); κ: '
            f'error consistency (Cohen\'s kappa) on the {bias["num_test"]:,} test images.']
  if len(steps) >= 3:
    top1 = [cka['test_accuracy'][n] for n in steps]

    def corr(values):
      return f'{float(np.corrcoef(top1, values)[0, 1]):+.2f}'

    parts = [f'κ to {r} {corr([k(n, r) for n in steps])}' for r in refs]
    parts += [f'CKA to {r} {corr([cka["cka_reference"][r][n] for n in steps])}' for r in refs]
    parts.append('shape bias ' + corr([bias['shape_bias'][n]['shape_bias'] for n in steps]))
    lines += ['', f'Correlation with top-1 across the {len(steps)} steps (Pearson): '
              + ', '.join(parts) + '.']
  return '\n'.join(lines) + '\n'


# --- command line ---------------------------------------------------------------------------------

@guarded
def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog='python -m experiments.analyze', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  shown = sub.add_parser('show', help='print the table of what cka and bias wrote (Markdown)')
  shown.add_argument('--out', required=True, help='the ladder directory (with analysis/)')
  for command, help_text in (('cka', 'linear CKA between steps and stages'),
                             ('bias', 'shape bias and error consistency')):
    p = sub.add_parser(command, help=help_text)
    p.add_argument('--out', required=True, help='the ladder directory (with runs/)')
    p.add_argument('--steps', default='', help='comma-separated steps (default: every one present)')
    p.add_argument('--reference', default='',
                   help='transformer references to compare with, comma-separated: swin_t, vit_s '
                        '(their runs from `ladder run --references`)')
    p.add_argument('--seed', type=int, default=0, help='which seed\'s runs (default 0)')
    p.add_argument('--batch-size', type=positive(), default=256)
    if command == 'cka':
      p.add_argument('--max-dim', type=positive(), default=16384,
                     help='feature maps larger than this are 2x2-average-pooled until they fit')
      p.add_argument('--examples', type=positive(), default=None,
                     help='the first N test images only (default: the whole test split)')
      p.add_argument('--baseline-seed', type=int, default=None,
                     help='also compare each step and reference with its own run of this seed '
                          '(the seed baseline: how alike two trainings of one network are)')
    else:
      p.add_argument('--num', type=positive(), default=2000, help='cue-conflict images')
      p.add_argument('--cue-seed', type=int, default=0, help='seed of the cue-conflict set')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.out):
    raise UsageError(f'--out {args.out!r} is not a directory')
  if args.command == 'show':
    sys.stdout.write(show(args.out))
    return 0
  from modernize import ladder as ladders
  from modernize import presets
  steps = cli.names(args.steps, sorted({n for ladder in ladders.LADDERS.values()
                                        for n in ladder.names()}), 'step', '--steps')
  runs = find_runs(args.out, steps or None, args.seed)
  names = cli.names(args.reference, list(presets.REFERENCES), 'reference', '--reference')
  reference_runs = find_reference_runs(args.out, names, args.seed)
  baseline_steps, baseline_references = [], []
  if args.command == 'cka' and args.baseline_seed is not None:
    baseline_steps = find_runs(args.out, [r.step for r in runs], args.baseline_seed)
    baseline_references = find_reference_runs(args.out, names, args.baseline_seed)
  _check_one_data_set(runs + baseline_steps, reference_runs + baseline_references)
  from experiments.runtime import enable_compilation_cache, quiet_libraries
  quiet_libraries()   # orbax's notes on restoring checkpoints are noise here
  enable_compilation_cache()   # each model's forward, across analyses and runs
  if args.command == 'cka':
    if args.batch_size < 4:
      raise UsageError('--batch-size must be at least 4 for the unbiased CKA estimator')
    baseline_runs = baseline_steps + baseline_references
    result = run_cka(args.out, runs, batch_size=args.batch_size, max_dim=args.max_dim,
                     reference_runs=reference_runs, baseline_runs=baseline_runs,
                     examples=args.examples)
    for step in result['steps']:
      value = result['cka_prev'][step]
      ref = result['reference'][step]
      print(f'{step:<22} ' + (f'CKA to {ref}: {value:.3f}' if value is not None else '-')
            + ''.join(f'  to {n}: {result["cka_reference"][n][step]:.3f}' for n in names)
            + (f'  to its seed {args.baseline_seed}: {result["seed_baseline"]["mean"][step]:.3f}'
               if baseline_runs else ''))
    if baseline_runs:
      for n in names:
        print(f'{n:<22} to its seed {args.baseline_seed}: '
              f'{result["seed_baseline"]["mean"][n]:.3f}')
  else:
    result = run_bias(args.out, runs, batch_size=args.batch_size, num=args.num,
                      cue_seed=args.cue_seed, reference_runs=reference_runs)
    for step in result['steps'] + result['references']:
      b = result['shape_bias'][step]
      bias = '  nan' if b['shape_bias'] is None or not math.isfinite(b['shape_bias']) else \
          f'{b["shape_bias"]:.3f}'
      print(f'{step:<22} test top-1 {100 * result["test_accuracy"][step]:5.1f}%  shape bias '
            f'{bias}  (shape {100 * b["shape_accuracy"]:.1f}%, texture '
            f'{100 * b["texture_accuracy"]:.1f}%)'
            + ''.join(f'  kappa to {n} {result["error_consistency_to_reference"][n][step]:.2f}'
                      for n in names if step in result['steps']))
  what = f'{len(runs)} step(s)' + (f' and {len(names)} reference(s)' if names else '')
  print(f'{args.command}: {what} in {result["seconds"]:.0f} s -> '
        f'{os.path.join(args.out, "analysis")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
