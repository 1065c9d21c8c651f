"""PyTorch state dicts <-> `modernize.Network`: timm, torchvision and the official FB ConvNeXt;
timm's Swin-T and ViT-S/16 <-> `modernize.transformers`.

    model = from_torch_state_dict(torch_model.state_dict(), 'convnext_tiny')   # eval mode
    logits = model(images_nhwc)

Supported key formats (detected from the keys):
  'torchvision'  ResNet: conv1, bn1, layer{1..4}.{b}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}, fc.
                 timm's ResNets use the same names, so they load the same way.
  'timm'         ConvNeXt: stem.{0,1}, stages.{i}.downsample.{0,1}, stages.{i}.blocks.{j}.
                 {conv_dw,norm,mlp.fc1,mlp.fc2,gamma}, head.{norm,fc}. `mlp.fc1/fc2` may be
                 Linear weights [out, in] or 1x1 conv weights [out, in, 1, 1] (conv_mlp=True).
                 ConvNeXt V2 (`convnextv2_tiny`): mlp.grn.{weight,bias} [C] and no gamma.
  'fb'           the official ConvNeXt repo: downsample_layers.{i}.{0,1}, stages.{i}.{j}.{dwconv,
                 norm,pwconv1,pwconv2,gamma}, norm, head; the checkpoint's outer {"model": ...}
                 is accepted too. ConvNeXt V2's official repo: grn.{gamma,beta} [1, 1, 1, C].
  'timm' (Swin)  patch_embed.{proj,norm}, layers.{i}.downsample.{norm,reduction},
                 layers.{i}.blocks.{j}.{norm1,attn.{relative_position_bias_table,qkv,proj},norm2,
                 mlp.{fc1,fc2}}, norm, head.fc (arch 'swin_t'; our module names are timm's).
  'timm' (ViT)   cls_token, pos_embed, patch_embed.proj, blocks.{j}.{norm1,attn.{qkv,proj},
                 ls1.gamma,norm2,mlp.{fc1,fc2},ls2.gamma}, norm, head (arch 'vit_s').

The number of classes is read from the classifier's weight, so fine-tuned checkpoints convert.
Every parameter and BatchNorm statistic of the network is assigned from exactly one key; missing
keys, unexpected keys and shape mismatches raise one `ValueError` naming them all.
`num_batches_tracked` buffers are ignored.

This module does not import torch: torch tensors are converted with `.detach().cpu().numpy()`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modernize import presets
from modernize.network import model_class

__all__ = ['FORMATS', 'detect_format', 'from_torch_state_dict', 'to_torch_state_dict']

FORMATS = ('torchvision', 'timm', 'fb')
_STATE = (nnx.Param, nnx.BatchStat)
_MAX_LISTED = 60  # names per list in error messages

# Our leaf names -> PyTorch's.
_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
         'var': 'running_var'}


_ARCHS = {**presets.PRESETS, **presets.REFERENCES}


def _family(arch: str) -> str:
  if arch not in _ARCHS:
    raise ValueError(f'unknown arch {arch!r}; known: {sorted(_ARCHS)}')
  if arch in presets.REFERENCES:
    return arch.split('_')[0]   # 'swin', 'vit'
  return 'resnet' if arch.startswith('resnet') else 'convnext'


# --- our parameter path -> PyTorch key and layout -------------------------------------------------
# A "kind" says how the tensor's layout differs:
#   'conv'    torch [O, I/g, kh, kw]      <-> ours [kh, kw, I/g, O]
#   'linear'  torch [out, in]             <-> ours [in, out]
#   'pw'      torch [out, in] (a Linear acting as a 1x1 conv; [out, in, 1, 1] accepted too)
#                                         <-> ours [1, 1, in, out]
#   'vector'  same shape
#   'grn_fb'  torch [1, 1, 1, C] (the official ConvNeXt V2's GRN) <-> ours [C]

def _resnet_key(path: tuple) -> tuple[str, str]:
  leaf = _LEAF[path[-1]]
  if path[:2] == ('stem', 'conv'):
    return 'conv1.weight', 'conv'
  if path[:2] == ('stem', 'norm'):
    return f'bn1.{leaf}', 'vector'
  if path[:2] == ('head', 'fc'):
    return f'fc.{leaf}', 'linear' if path[-1] == 'kernel' else 'vector'
  if path[0] == 'stages' and path[2] == 'blocks' and len(path) == 6:
    prefix = f'layer{path[1] + 1}.{path[3]}'
    module = path[4]
    if module in ('conv1', 'conv2', 'conv3'):
      return f'{prefix}.{module}.{leaf}', 'conv' if path[-1] == 'kernel' else 'vector'
    if module in ('norm1', 'norm2', 'norm3'):
      return f'{prefix}.bn{module[-1]}.{leaf}', 'vector'
    if module == 'shortcut_conv':
      return f'{prefix}.downsample.0.{leaf}', 'conv' if path[-1] == 'kernel' else 'vector'
    if module == 'shortcut_norm':
      return f'{prefix}.downsample.1.{leaf}', 'vector'
  raise KeyError(path)


_CONVNEXT_BLOCK = {'conv1': 'conv_dw', 'norm1': 'norm', 'conv2': 'mlp.fc1', 'grn': 'mlp.grn',
                   'conv3': 'mlp.fc2'}


def _convnext_key(path: tuple) -> tuple[str, str]:
  """timm names."""
  leaf = _LEAF[path[-1]]
  kind = 'vector'
  if path[:2] == ('stem', 'conv'):
    return f'stem.0.{leaf}', 'conv' if path[-1] == 'kernel' else kind
  if path[:2] == ('stem', 'norm'):
    return f'stem.1.{leaf}', kind
  if path[:2] == ('head', 'norm'):
    return f'head.norm.{leaf}', kind
  if path[:2] == ('head', 'fc'):
    return f'head.fc.{leaf}', 'linear' if path[-1] == 'kernel' else kind
  if path[0] == 'stages' and path[2] == 'downsample' and len(path) == 5:
    index = {'norm': 0, 'conv': 1}[path[3]]
    kind = 'conv' if path[-1] == 'kernel' else kind
    return f'stages.{path[1]}.downsample.{index}.{leaf}', kind
  if path[0] == 'stages' and path[2] == 'blocks' and len(path) == 6:
    prefix = f'stages.{path[1]}.blocks.{path[3]}'
    if path[4:] == ('layer_scale', 'scale'):
      return f'{prefix}.gamma', kind
    module = _CONVNEXT_BLOCK[path[4]]
    if path[-1] == 'kernel':
      kind = 'conv' if path[4] == 'conv1' else 'pw'
    return f'{prefix}.{module}.{leaf}', kind
  raise KeyError(path)


def _timm_to_fb(key: str) -> str:
  """The official repo's name for a timm ConvNeXt key (timm's `checkpoint_filter_fn`, reversed)."""
  if key.startswith('stem.'):
    return 'downsample_layers.0.' + key[len('stem.'):]
  if key.startswith('head.norm.'):
    return 'norm.' + key[len('head.norm.'):]
  if key.startswith('head.fc.'):
    return 'head.' + key[len('head.fc.'):]
  m = re.fullmatch(r'stages\.(\d+)\.downsample\.(.*)', key)
  if m:
    return f'downsample_layers.{m[1]}.{m[2]}'
  m = re.fullmatch(r'stages\.(\d+)\.blocks\.(\d+)\.(.*)', key)
  if m:
    rest = m[3].replace('conv_dw.', 'dwconv.').replace('mlp.fc', 'pwconv')
    rest = {'mlp.grn.weight': 'grn.gamma', 'mlp.grn.bias': 'grn.beta'}.get(rest, rest)
    return f'stages.{m[1]}.{m[2]}.{rest}'
  raise KeyError(key)


def _fb_key(path: tuple) -> tuple[str, str]:
  key, kind = _convnext_key(path)
  return _timm_to_fb(key), 'grn_fb' if 'grn' in path else kind


def _transformer_key(path: tuple) -> tuple[str, str]:
  """timm's Swin and ViT names: ours are the same module names, with flax's leaf names."""
  *modules, leaf = (str(p) for p in path)
  if leaf == 'scale' and modules[-1] in ('ls1', 'ls2'):   # our LayerScale, timm's gamma
    name = 'gamma'
  else:
    name = _LEAF.get(leaf, leaf)   # relative_position_bias_table, cls_token, pos_embed: as is
  kind = 'vector'
  if leaf == 'kernel':
    kind = 'conv' if modules[-2:] == ['patch_embed', 'proj'] else 'linear'
  return '.'.join(modules + [name]), kind


def _key_fn(fmt: str, family: str = ''):
  if family in ('swin', 'vit'):
    return _transformer_key
  if fmt == 'torchvision':
    return _resnet_key
  if fmt == 'timm':
    return _convnext_key
  return _fb_key


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv' or (kind == 'pw' and value.ndim == 4):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
  if kind == 'linear':
    return value.T if value.ndim == 2 else value
  if kind == 'pw':
    return value.T[None, None] if value.ndim == 2 else value
  if kind == 'grn_fb':   # [1, 1, 1, C] -> [C]; other shapes are left to the shape check
    return value.reshape(-1) if value.ndim and value.size == value.shape[-1] else value
  return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == 'conv':
    return value.transpose(3, 2, 0, 1)
  if kind == 'linear':
    return value.T
  if kind == 'pw':
    return value[0, 0].T
  if kind == 'grn_fb':
    return value.reshape(1, 1, 1, -1)
  return value


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return tuple(_to_torch(np.empty(shape, np.bool_), kind).shape)


# --- reading the state dict -----------------------------------------------------------------------

def _as_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is never imported here
    value = value.detach().cpu()
    if str(value.dtype) in ('torch.bfloat16', 'torch.float16'):
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(state_dict, Mapping):
    raise TypeError(f'expected a state dict (a mapping of names to tensors), got '
                    f'{type(state_dict).__name__}')
  for outer in ('model', 'state_dict'):  # FB checkpoints: {"model": ..., "optimizer": ...}
    if isinstance(state_dict.get(outer), Mapping):
      state_dict = state_dict[outer]
      break
  sd = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  if sd and all(k.startswith('module.') for k in sd):  # saved from DistributedDataParallel
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return sd


def detect_family(keys) -> str | None:
  """'swin' or 'vit' for timm's transformer keys, else None (a ConvNet's)."""
  keys = list(keys)
  if any(k.startswith('patch_embed.') for k in keys):
    return 'swin' if any(k.startswith('layers.') for k in keys) else 'vit'
  return None


def detect_format(keys) -> str:
  """'torchvision' (ResNet, timm's too), 'timm' (ConvNeXt, Swin, ViT) or 'fb' (official
  ConvNeXt)."""
  keys = list(keys)
  if detect_family(keys):
    return 'timm'
  if any(k.startswith('downsample_layers.') for k in keys):
    return 'fb'
  if any(k.startswith(('stem.', 'stages.')) for k in keys):
    return 'timm'
  if any(k.startswith(('layer1.', 'conv1.', 'bn1.')) for k in keys):
    return 'torchvision'
  raise ValueError('unrecognised state dict: expected torchvision/timm ResNet keys (conv1.*, '
                   'layer1.*), timm ConvNeXt keys (stem.*, stages.*) or official ConvNeXt keys '
                   f'(downsample_layers.*); got e.g. {sorted(keys)[:8]}')


_HEAD = {'torchvision': 'fc.weight', 'timm': 'head.fc.weight', 'fb': 'head.weight'}
_NAMES = {'resnet': 'a ResNet', 'convnext': 'a ConvNeXt', 'swin': 'a Swin Transformer',
          'vit': 'a ViT'}


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def _listing(names) -> str:
  names = sorted(names, key=_natural)
  shown = ', '.join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f', ... and {more} more' if more > 0 else '')


def _make(cfg, seed: int):
  cls = model_class(cfg)
  return lambda: cls(cfg, rngs=nnx.Rngs(seed))


def _fill_rng_state(model: nnx.Module, cfg, seed: int) -> None:
  """Makes the abstract model's non-parameter state (DropPath's RNG streams) concrete."""
  if jax.tree.leaves(nnx.state(model, nnx.Not(_STATE))):
    # Built under jit, where XLA drops the unused parameter inits: no random init is paid for.
    nnx.update(model, jax.jit(lambda: nnx.state(_make(cfg, seed)(), nnx.Not(_STATE)))())


# --- public API -----------------------------------------------------------------------------------

def from_torch_state_dict(state_dict: Mapping[str, Any], arch: str, *, seed: int = 0,
                          **overrides) -> nnx.Module:
  """Builds `arch` ('resnet50', 'convnext_tiny', ... 'convnextv2_tiny'; 'swin_t', 'vit_s') from a
  PyTorch state dict.

  Args:
    state_dict: a timm, torchvision or official-FB state dict (torch tensors or numpy arrays),
      or a checkpoint holding one under "model".
    arch: a `modernize.presets` name (`PRESETS` or `REFERENCES`).
    seed: seeds the RNG streams of DropPath (only used when training the converted model).
    **overrides: config flags passed to the preset, e.g. `drop_path_rate=0.0` or
      `depthwise_impl='xla'`; for timm's Swin / ViT built with other `img_size`, `patch_size`
      or `window_size`, the same values. `num_classes` is inferred from the classifier weight.

  Returns:
    The network in eval mode.

  Raises:
    ValueError: unknown arch, unrecognised key format, or keys that do not fit the network (the
      message lists missing keys, unexpected keys and shape mismatches).
  """
  family = _family(arch)
  sd = _unwrap(state_dict)
  fmt = detect_format(sd)
  held = detect_family(sd) or ('resnet' if fmt == 'torchvision' else 'convnext')
  if held != family:
    raise ValueError(f'the state dict holds {_NAMES[held]} ({fmt} keys) but arch={arch!r}')
  head_key = 'head.weight' if family == 'vit' else _HEAD[fmt]
  if 'num_classes' not in overrides and head_key in sd:
    head = _as_numpy(sd[head_key])
    if head.ndim == 2:
      overrides['num_classes'] = int(head.shape[0])
  # preset(arch).replace(...) rather than preset(arch, **overrides): the ConvNeXt presets pass
  # drop_path_rate themselves, so preset('convnext_tiny', drop_path_rate=0.0) is a TypeError.
  cfg = presets.preset(arch).replace(**overrides)
  model = nnx.eval_shape(_make(cfg, seed))  # shapes only: the weights come from sd

  key_fn = _key_fn(fmt, family)
  remaining = dict(sd)
  missing, mismatched, unnamed, assigned = [], [], [], {}
  for path, var in nnx.to_flat_state(nnx.state(model, _STATE)):
    try:
      key, kind = key_fn(path)
    except KeyError:  # e.g. overrides that add layers PyTorch's model does not have
      unnamed.append('.'.join(map(str, path)))
      continue
    if key not in remaining:
      missing.append(key)
      continue
    value = _as_numpy(remaining.pop(key))
    ours = _to_ours(value, kind)
    if tuple(ours.shape) != tuple(var.shape):
      expected = _torch_shape(var.shape, kind)
      mismatched.append(f'{key}: expected shape {expected}, got {tuple(value.shape)}')
      continue
    assigned[path] = var.replace(jnp.asarray(ours, dtype=var.dtype))
  if missing or remaining or mismatched or unnamed:
    problems = [f'cannot load the {fmt} state dict into {arch} '
                f'(num_classes={cfg.num_classes}):']
    if unnamed:
      problems.append(f'  network parameters with no {fmt} counterpart ({len(unnamed)}): '
                      f'{_listing(unnamed)}')
    if missing:
      problems.append(f'  missing keys ({len(missing)}): {_listing(missing)}')
    if remaining:
      problems.append(f'  unexpected keys ({len(remaining)}): {_listing(remaining)}')
    if mismatched:
      problems.append(f'  shape mismatches ({len(mismatched)}): ' + '; '.join(mismatched))
    raise ValueError('\n'.join(problems))
  nnx.update(model, nnx.from_flat_state(assigned))
  _fill_rng_state(model, cfg, seed)
  model.eval()
  return model


def to_torch_state_dict(model: nnx.Module, arch: str, format: str = 'timm', *,
                        tensors: str = 'torch') -> dict[str, Any]:
  """The inverse of `from_torch_state_dict`: a state dict PyTorch's model `arch` loads.

  Args:
    model: a `Network` (or Swin / ViT) built for `arch`.
    arch: a `modernize.presets` name.
    format: 'timm', 'torchvision' (ResNet key names are shared by the two) or 'fb' (ConvNeXt);
      Swin and ViT: 'timm' only.
    tensors: 'torch' (float32 CPU tensors; imports torch) or 'numpy'.

  BatchNorm `num_batches_tracked` buffers are not written; `load_state_dict` fills them in.
  """
  family = _family(arch)
  if format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
  if family == 'resnet':
    if format == 'fb':
      raise ValueError("format='fb' is for ConvNeXt; ResNets use 'timm' or 'torchvision'")
    format = 'torchvision'
  elif family in ('swin', 'vit'):
    if format != 'timm':
      raise ValueError(f"{arch} is written in timm's format only (format='timm')")
  elif format == 'torchvision':
    raise ValueError("format='torchvision' is for ResNets; ConvNeXt uses 'timm' or 'fb'")
  if tensors not in ('torch', 'numpy'):
    raise ValueError(f"tensors must be 'torch' or 'numpy', got {tensors!r}")
  key_fn = _key_fn(format, family)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, _STATE)):
    key, kind = key_fn(path)
    out[key] = np.ascontiguousarray(_to_torch(np.asarray(var.get_value()), kind))
  out = dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))
  if tensors == 'torch':
    import torch  # only here: the module itself must import without torch
    out = {k: torch.from_numpy(v.copy()) for k, v in out.items()}
  return out
