"""configs/ladder.py: the CPU miniature differs from the paper's recipes only where MINIATURE says,
and along the ladder every architecture step changes the architecture only."""

import pytest

from configs import ladder as ladder_config
from modernize import ConfigError
from modernize import ladder as ladders

OPTIONS = 'data=fashion_mnist,scale=cpu,image_size=32,batch=128'
# Where a recipe's value lives in the config.
PLACE = {'base_lr': 'optimizer', 'lr_batch': 'optimizer', 'momentum': 'optimizer',
         'weight_decay': 'optimizer', 'warmup_epochs': 'optimizer', 'min_lr': 'optimizer',
         'optimizer': 'optimizer', 'schedule': 'optimizer', 'decay_all': 'optimizer',
         'step_epochs': 'optimizer', 'label_smoothing': 'augment', 'mixup_alpha': 'augment',
         'cutmix_alpha': 'augment', 'mix_prob': 'augment', 'randaugment_n': 'augment',
         'randaugment_m': 'augment',
         'randaugment_mstd': 'augment', 'random_erasing': 'augment',
         'drop_path_rate': 'model', 'layer_scale_init': 'model'}


def _flat(config) -> dict:
  out = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        walk(f'{prefix}{k}.', v)
    else:
      out[prefix[:-1]] = value
  walk('', config.to_dict())
  return out


@pytest.mark.parametrize('step', ['resnet50', 'enhanced_recipe', 'fewer_norms', 'convnext_t'])
def test_the_miniature_changes_only_its_own_values(step):
  paper = _flat(ladder_config.get_config(f'{step},{OPTIONS}'))
  mini = _flat(ladder_config.get_config(f'{step},{OPTIONS},miniature'))
  recipe = ladders.get_ladder('resnet50').recipe(step)
  changed = {k for k in paper if paper[k] != mini[k]}
  allowed = {f'{PLACE[k]}.{k}' for k in ladder_config.MINIATURE[recipe] if k != 'epochs'}
  allowed |= {'miniature', 'epochs', 'length', 'data.validation'}
  assert changed <= allowed, changed - allowed
  for key, value in ladder_config.MINIATURE[recipe].items():
    if key == 'epochs':
      assert mini['epochs'] == value
    elif key == 'layer_scale_init' and not paper['model.layer_scale_init']:
      assert not mini['model.layer_scale_init']      # only where the step has LayerScale
    else:
      assert mini[f'{PLACE[key]}.{key}'] == value
  assert mini['data.validation'] == ladder_config.MINIATURE_VALIDATION > 0
  # The paper's values stay one option away, unchanged.
  assert ladder_config.RECIPES['enhanced']['base_lr'] == 4e-3
  assert ladder_config.RECIPES['enhanced']['lr_batch'] == 4096


def test_every_architecture_step_changes_the_architecture_only():
  ladder = ladders.get_ladder('resnet50')
  names = ladder.names(include_side=False)
  for before, after in zip(names[1:], names[2:]):     # every step after the recipe change
    a = _flat(ladder_config.get_config(f'{before},{OPTIONS},miniature'))
    b = _flat(ladder_config.get_config(f'{after},{OPTIONS},miniature'))
    changed = {k for k in a if a[k] != b[k]} - {'step', 'step_index'}
    assert changed and all(k.startswith('model.') for k in changed), (after, changed)


def test_length_options():
  base = ladder_config.get_config(f'convnext_t,{OPTIONS},miniature')
  longer = ladder_config.get_config(f'convnext_t,{OPTIONS},miniature,longer=2')
  assert longer.epochs == 2 * base.epochs and longer.length == pytest.approx(2 * base.length)
  assert ladder_config.get_config('resnet50,smoke,longer=2').epochs == 1.0
  # epochs=X: both recipes train X epochs, the paper's length fraction follows, longer= doubles it.
  for step, paper_epochs in (('resnet50', 90), ('convnext_t', 300)):
    six = ladder_config.get_config(f'{step},{OPTIONS},miniature,epochs=6')
    twelve = ladder_config.get_config(f'{step},{OPTIONS},miniature,epochs=6,longer=2')
    assert (six.epochs, twelve.epochs) == (6, 12)
    assert six.length == pytest.approx(6 / paper_epochs)
  assert ladder_config.get_config('resnet50,smoke,epochs=3').epochs == 3
  for bad in ('convnext_t,miniature,length=0.1', 'convnext_t,longer=0', 'convnext_t,longer=x',
              'convnext_t,epochs=0', 'convnext_t,epochs=x', 'convnext_t,epochs=2,length=0.1'):
    with pytest.raises(ConfigError):
      ladder_config.get_config(bad)


def test_layer_scale_init_option_reaches_only_the_steps_with_layer_scale():
  for step in ('enhanced_recipe', 'fewer_norms', 'convnext_t'):
    plain = ladder_config.get_config(f'{step},{OPTIONS},miniature')
    set_ = ladder_config.get_config(f'{step},{OPTIONS},miniature,layer_scale_init=0.1')
    if plain.model.layer_scale_init > 0:
      assert set_.model.layer_scale_init == 0.1
    else:
      assert set_.model.layer_scale_init == 0.0
    assert {k for k, v in _flat(plain).items() if _flat(set_)[k] != v} <= {'model.layer_scale_init'}
  for bad in ('convnext_t,layer_scale_init=0', 'convnext_t,layer_scale_init=x'):
    with pytest.raises(ConfigError):
      ladder_config.get_config(bad)
