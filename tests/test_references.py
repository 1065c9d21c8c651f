"""The transformer references in the ladder: their configs (configs/ladder.py:swin_t, vit_s), the
trainer's weight-decay exclusions, the plan of `ladder run --references`. Trained on smoke, their
rows, their view and the analyses against them: tests/test_analyze_cli.py."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from configs import ladder as ladder_config
from configs.ladder import get_config
from experiments.ladder import run as ladder_run
from experiments.training import recipe, runconfig
from modernize.config import ConfigError, NetConfig
from modernize.network import create_model
from modernize.transformers import SwinConfig, ViTConfig


def test_reference_configs_take_the_enhanced_recipe_and_the_ladders_scale():
  convnext = get_config('convnext_t,miniature')
  for name, kind in (('swin_t', SwinConfig), ('vit_s', ViTConfig)):
    config = get_config(f'{name},miniature,seed=2')
    cfg = runconfig.net_config(config, num_classes=10, in_channels=1)
    assert type(cfg) is kind and cfg.img_size == 32 and config.step_index == -1
    assert config.recipe == 'enhanced' and config.seed == 2
    # The same recipe, data and duration as the ladder's last step, but for the learning rate
    # calibrated for the reference.
    assert config.optimizer.base_lr == ladder_config.MINIATURE_REFERENCES[name]['base_lr']
    assert config.optimizer.base_lr != convnext.optimizer.base_lr
    assert {**config.optimizer.to_dict(), 'base_lr': None} == \
        {**convnext.optimizer.to_dict(), 'base_lr': None}
    # Without the miniature: the paper's enhanced recipe, as the ConvNets'.
    assert get_config(name).optimizer.to_dict() == get_config('convnext_t').optimizer.to_dict()
    assert config.augment.to_dict() == convnext.augment.to_dict()
    assert config.data.to_dict() == convnext.data.to_dict()
    assert (config.epochs, config.batch_size) == (convnext.epochs, convnext.batch_size)
    assert cfg.drop_path_rate == convnext.model.drop_path_rate == 0.1
  # Scale cpu (a third of the depth, a quarter of the width and heads); small-image patches.
  swin = runconfig.net_config(get_config('swin_t,scale=cpu'), 10, 1)
  assert (swin.depths, swin.embed_dim, swin.num_heads) == ((1, 1, 2, 1), 24, (1, 1, 3, 6))
  assert (swin.patch_size, swin.window_size, swin.stage_resolutions()) == (2, 4, (16, 8, 4, 2))
  vit = runconfig.net_config(get_config('vit_s,scale=small,image_size=28'), 10, 1)
  assert (vit.depth, vit.embed_dim, vit.num_heads, vit.patch_size) == (4, 192, 3, 4)
  # At 224 px and full scale: the paper's networks (but the recipe's drop path).
  full = runconfig.net_config(get_config('swin_t,data=imagenette'), 1000, 3)
  assert full.replace(drop_path_rate=0.2) == SwinConfig()
  full = runconfig.net_config(get_config('vit_s,data=imagenette'), 1000, 3)
  assert full == ViTConfig()
  with pytest.raises(ConfigError, match='img_size'):   # 30 px: no whole patches of 4
    runconfig.validate(get_config('vit_s,image_size=30'))
  with pytest.raises(ConfigError, match='unknown step'):
    get_config('swin_b')


def _no_grad_step(params, no_decay):
  """Whether each parameter moves in one AdamW update with zero gradients (weight decay only)."""
  tx = recipe.optimizer(get_config('swin_t,smoke'), optax.constant_schedule(1.0), no_decay)
  updates = jax.jit(lambda p: jax.tree.map(
      jnp.any, tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0]))(params)
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): bool(u)
          for path, u in jax.tree_util.tree_leaves_with_path(updates)}


def test_weight_decay_leaves_out_position_embeddings_class_token_and_bias_tables():
  swin = runconfig.net_config(get_config('swin_t,smoke'), 10, 1)
  vit = runconfig.net_config(get_config('vit_s,smoke'), 10, 1)
  assert recipe.no_weight_decay(swin) == {'relative_position_bias_table'}
  assert recipe.no_weight_decay(vit) == {'pos_embed', 'cls_token'}
  assert recipe.no_weight_decay(NetConfig()) == set()
  for cfg in (swin, vit):
    params = nnx.state(create_model(cfg, image_size=32), nnx.Param)
    decayed = _no_grad_step(params, recipe.no_weight_decay(cfg))
    names = {k for k, v in decayed.items() if v}
    for name in recipe.no_weight_decay(cfg):
      present = [k for k in decayed if name in k.split('/')]
      assert present and not any(decayed[k] for k in present), name
    # Every Linear and the patch embedding decay; biases and norms do not.
    assert all(k.endswith('kernel/value') for k in names)
    assert 'patch_embed/proj/kernel/value' in names and any('qkv/kernel' in k for k in names)
    assert not any(decayed[k] for k in decayed if 'norm' in k or k.endswith('bias/value'))
    # Without the exclusion (ndim > 1 alone) they would decay: the exclusion is what stops them.
    plain = _no_grad_step(params, frozenset())
    assert all(plain[k] for k in decayed if k.split('/')[-2] in recipe.no_weight_decay(cfg))


def test_plan_adds_the_references_after_the_steps():
  assert ladder_run.plan('resnet50', ['resnet50'], 2, False, references=True) == [
      ('resnet50', 0), ('resnet50', 1), ('swin_t', 0), ('swin_t', 1), ('vit_s', 0), ('vit_s', 1)]
  assert ladder_run.plan('resnet50', ['vit_s'], 1, False) == [('vit_s', 0)]
  assert [s for s, _ in ladder_run.plan('resnet50', None, 1, False, True)][-2:] == \
      ['swin_t', 'vit_s']
