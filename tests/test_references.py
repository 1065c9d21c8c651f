"""The transformer references in the ladder: their configs (configs/ladder.py:swin_t, vit_s), the
trainer's weight-decay exclusions, `ladder run --references` and their rows and lines in `show`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.ladder import get_config
from experiments import ladder_run, steptable, train
from modernize.config import ConfigError, NetConfig
from modernize.network import create_model
from modernize.transformers import SwinConfig, ViTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reference_configs_take_the_enhanced_recipe_and_the_ladders_scale():
  convnext = get_config('convnext_t,miniature')
  for name, kind in (('swin_t', SwinConfig), ('vit_s', ViTConfig)):
    config = get_config(f'{name},miniature,seed=2')
    cfg = train.net_config(config, num_classes=10, in_channels=1)
    assert type(cfg) is kind and cfg.img_size == 32 and config.step_index == -1
    assert config.recipe == 'enhanced' and config.seed == 2
    # The same recipe, data and duration as the ladder's last step.
    assert config.optimizer.to_dict() == convnext.optimizer.to_dict()
    assert config.augment.to_dict() == convnext.augment.to_dict()
    assert config.data.to_dict() == convnext.data.to_dict()
    assert (config.epochs, config.batch_size) == (convnext.epochs, convnext.batch_size)
    assert cfg.drop_path_rate == convnext.model.drop_path_rate == 0.1
  # Scale cpu (a third of the depth, a quarter of the width and heads); small-image patches.
  swin = train.net_config(get_config('swin_t,scale=cpu'), 10, 1)
  assert (swin.depths, swin.embed_dim, swin.num_heads) == ((1, 1, 2, 1), 24, (1, 1, 3, 6))
  assert (swin.patch_size, swin.window_size, swin.stage_resolutions()) == (2, 4, (16, 8, 4, 2))
  vit = train.net_config(get_config('vit_s,scale=small,image_size=28'), 10, 1)
  assert (vit.depth, vit.embed_dim, vit.num_heads, vit.patch_size) == (4, 192, 3, 4)
  # At 224 px and full scale: the paper's networks (but the recipe's drop path).
  full = train.net_config(get_config('swin_t,data=imagenette'), 1000, 3)
  assert full.replace(drop_path_rate=0.2) == SwinConfig()
  full = train.net_config(get_config('vit_s,data=imagenette'), 1000, 3)
  assert full == ViTConfig()
  with pytest.raises(ConfigError, match='img_size'):   # 30 px: no whole patches of 4
    train.validate(get_config('vit_s,image_size=30'))
  with pytest.raises(ConfigError, match='unknown step'):
    get_config('swin_b')


def _no_grad_step(params, no_decay):
  """Whether each parameter moves in one AdamW update with zero gradients (weight decay only)."""
  tx = train.optimizer(get_config('swin_t,smoke'), optax.constant_schedule(1.0), no_decay)
  updates = jax.jit(lambda p: jax.tree.map(
      jnp.any, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))(params)
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): bool(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}


def test_weight_decay_leaves_out_position_embeddings_class_token_and_bias_tables():
  swin = train.net_config(get_config('swin_t,smoke'), 10, 1)
  vit = train.net_config(get_config('vit_s,smoke'), 10, 1)
  assert train.no_weight_decay(swin) == {'relative_position_bias_table'}
  assert train.no_weight_decay(vit) == {'pos_embed', 'cls_token'}
  assert train.no_weight_decay(NetConfig()) == set()
  for cfg in (swin, vit):
    params = nnx.state(create_model(cfg, image_size=32), nnx.Param)
    decayed = _no_grad_step(params, train.no_weight_decay(cfg))
    names = {k for k, v in decayed.items() if v}
    for name in train.no_weight_decay(cfg):
      present = [k for k in decayed if name in k.split('/')]
      assert present and not any(decayed[k] for k in present), name
    # Every Linear and the patch embedding decay; biases and norms do not.
    assert all(k.endswith('kernel/value') for k in names)
    assert 'patch_embed/proj/kernel/value' in names and any('qkv/kernel' in k for k in names)
    assert not any(decayed[k] for k in decayed if 'norm' in k or k.endswith('bias/value'))
    # Without the exclusion (ndim > 1 alone) they would decay: the exclusion is what stops them.
    plain = _no_grad_step(params, frozenset())
    assert all(plain[k] for k in decayed if k.split('/')[-2] in train.no_weight_decay(cfg))


def test_plan_adds_the_references_after_the_steps():
  assert ladder_run.plan('resnet50', ['resnet50'], 2, False, references=True) == [
      ('resnet50', 0), ('resnet50', 1), ('swin_t', 0), ('swin_t', 1), ('vit_s', 0), ('vit_s', 1)]
  assert ladder_run.plan('resnet50', ['vit_s'], 1, False) == [('vit_s', 0)]
  assert [s for s, _ in ladder_run.plan('resnet50', None, 1, False, True)][-2:] == \
      ['swin_t', 'vit_s']


def test_ladder_run_references_on_smoke_trains_them_and_show_draws_them(tmp_path):
  """`ladder run --references --options smoke --steps resnet50 --show`, then a trained reference
  loads back for the analyses."""
  out = str(tmp_path / 'ladder')
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'run', '--out', out,
                        '--references', '--options', 'smoke', '--steps', 'resnet50', '--show'],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = {r['step']: r for r in steptable.read_rows(os.path.join(out, 'steps.csv'))}
  assert sorted(rows) == ['resnet50', 'swin_t', 'vit_s']
  for name in ('swin_t', 'vit_s'):
    config = get_config(f'{name},ladder=resnet50,seed=0,smoke')
    assert rows[name]['config_hash'] == train.config_hash(config)
    assert rows[name]['step_index'] == '-1' and rows[name]['scale'] == 'tiny'
    assert float(rows[name]['gmacs']) > 0 and int(rows[name]['params']) > 0
  md = open(os.path.join(out, 'ladder.md')).read()
  assert '| ref | Swin-T (`swin_t`, reference) |' in md and '| 81.30 | 4.50 |' in md
  assert '| ref | ViT-S/16 (`vit_s`, reference) |' in md and '| 79.80 | 4.60 |' in md
  (group,) = json.load(open(os.path.join(out, 'ladder.json')))['groups']
  assert [s['name'] for s in group['steps']] == ['resnet50']
  refs = {r['name']: r for r in group['references']}
  assert refs['swin_t']['paper_top1'] == 81.3 and refs['swin_t']['paper_gflops'] == 4.5
  assert refs['vit_s']['mean'] == pytest.approx(float(rows['vit_s']['top1']))
  assert os.path.getsize(os.path.join(out, 'ladder.png')) > 10_000
  # A rerun finds all three done.
  res = subprocess.run([sys.executable, '-m', 'experiments.ladder', 'run', '--out', out,
                        '--references', '--options', 'smoke', '--steps', 'resnet50'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and '0 to train' in res.stdout, res.stdout + res.stderr
  # load_trained_model rebuilds the trained Swin with the checkpoint's weights.
  from experiments.checkpoint import load_numpy, load_trained_model
  workdir = os.path.join(out, 'runs', 'swin_t', 'seed0')
  model, _ = load_trained_model(workdir)
  _, saved = load_numpy(os.path.join(workdir, 'checkpoints'))
  table = model.layers[2].blocks[0].attn.relative_position_bias_table[...]
  np.testing.assert_array_equal(
      table, saved['params']['layers']['2']['blocks']['0']['attn']
      ['relative_position_bias_table']['value'])
  assert model(np.zeros((2, 32, 32, 1), np.float32)).shape == (2, 10)
