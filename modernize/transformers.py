"""The paper's two transformer references, exact to timm: Swin-T and ViT-S/16 (DeiT-S).

  SwinTransformer(swin_t(), rngs=...)      timm's `swin_tiny_patch4_window7_224`, 28,288,354 params
  VisionTransformer(vit_s(), rngs=...)     timm's `vit_small_patch16_224`,        22,050,664 params

Both are built from the ConvNet's layers where they share them (`LayerNorm`, `DropPath`,
`LayerScale`, the exact GELU and the patchify `conv`) and from two written here: `Mlp` (Linear,
GELU, Linear) and `Attention` (multi-head self-attention over the second-last axis).
Input NHWC at the config's `img_size` (as timm's default `strict_img_size`); patch and window size
are configurable, so that they also run at the miniature's 28/32 pixels (timm builds the same
network from the same keyword arguments: `img_size`, `patch_size`, `window_size`).

Module and parameter names follow timm's (`patch_embed.proj`, `layers.i.blocks.j.attn.qkv`, ...)
so that `modernize.convert` maps them one to one. Mixed precision as `Network`: `dtype='bfloat16'`
computes in bfloat16 with float32 parameters, norms' statistics, softmax and logits.

Initialisation follows timm where it is timm's own: every Linear N(0, 0.02) with zero bias, the
relative position bias table and the position embedding N(0, 0.02), the class token N(0, 1e-6),
norms one and zero. The patch-embedding conv is N(0, 0.02) with a zero bias (timm leaves it at
PyTorch's default uniform init).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modernize import layers
from modernize.blocks import Stage, _maybe, compute_dtype
from modernize.config import ConfigError, FlagsConfig

_DTYPES = ('float32', 'bfloat16')


# --- configs --------------------------------------------------------------------------------------

class _Config(FlagsConfig):
  """The checks shared by the two configs (`from_dict`, `to_dict`, `replace`: `FlagsConfig`)."""

  def _fail(self, flag, message):
    raise ConfigError(f'{flag}={getattr(self, flag)!r}: {message}')

  def _check_common(self, positive):
    for flag in positive:
      value = getattr(self, flag)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        self._fail(flag, 'must be a positive integer')
    if self.dtype not in _DTYPES:
      self._fail('dtype', f'must be one of {list(_DTYPES)}')
    if not 0.0 <= self.drop_path_rate < 1.0:
      self._fail('drop_path_rate', 'must be in [0, 1)')
    if self.img_size % self.patch_size:
      self._fail('img_size', f'must be a multiple of patch_size={self.patch_size}')


@dataclasses.dataclass(frozen=True)
class SwinConfig(_Config):
  """Swin Transformer (Liu et al. 2021). Defaults give timm's `swin_tiny_patch4_window7_224`.

  Attributes:
    img_size: the (square) input side the network is built for; a stage whose feature map is no
      larger than the window attends over the whole map, unshifted (as timm).
    patch_size: side of the non-overlapping patches of the stem (4x4 conv, stride 4, then a norm).
    window_size: side of the attention windows; odd blocks shift them by window_size // 2.
    embed_dim: channels of the first stage; each later stage doubles them (patch merging).
    depths: blocks per stage.
    num_heads: attention heads per stage.
    mlp_ratio: hidden width of each block's MLP over its input width.
    drop_path_rate: stochastic depth of the last block, growing linearly from 0 (Swin-T: 0.2).
  """
  img_size: int = 224
  patch_size: int = 4
  window_size: int = 7
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.2
  num_classes: int = 1000
  in_channels: int = 3
  dtype: str = 'float32'

  def __post_init__(self):
    object.__setattr__(self, 'depths', tuple(self.depths))
    object.__setattr__(self, 'num_heads', tuple(self.num_heads))
    self._check_common(('img_size', 'patch_size', 'window_size', 'embed_dim', 'num_classes',
                        'in_channels'))
    if len(self.num_heads) != len(self.depths) or not self.depths:
      self._fail('num_heads', f'needs one entry per stage ({len(self.depths)})')
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2**i) % heads:
        self._fail('num_heads', f'stage {i}: {heads} heads do not divide {self.embed_dim * 2**i}')

  def stage_widths(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

  def stage_resolutions(self) -> tuple[int, ...]:
    """Side of each stage's feature map (patch merging pads an odd side, as timm's)."""
    sizes = [self.img_size // self.patch_size]
    for _ in self.depths[1:]:
      sizes.append((sizes[-1] + 1) // 2)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class ViTConfig(_Config):
  """Vision Transformer (Dosovitskiy et al. 2021) as DeiT trains it. Defaults: timm's
  `vit_small_patch16_224` (ViT-S/16 = DeiT-S).

  Attributes:
    img_size: the (square) input side; the learned position embedding has one entry per patch
      plus one for the class token.
    patch_size: side of the non-overlapping patches (a conv of that kernel and stride).
    embed_dim, depth, num_heads, mlp_ratio: width, blocks, heads and MLP ratio of the encoder.
    layer_scale_init: LayerScale on both branches of every block (timm's `init_values`; 0: none,
      as ViT-S/16).
    drop_path_rate: stochastic depth of the last block, growing linearly from 0 (DeiT-S: 0.1).
  """
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  layer_scale_init: float = 0.0
  drop_path_rate: float = 0.1
  num_classes: int = 1000
  in_channels: int = 3
  dtype: str = 'float32'

  def __post_init__(self):
    self._check_common(('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads',
                        'num_classes', 'in_channels'))
    if self.embed_dim % self.num_heads:
      self._fail('num_heads', f'must divide embed_dim={self.embed_dim}')
    if self.layer_scale_init < 0:
      self._fail('layer_scale_init', 'must be >= 0 (0 disables LayerScale)')

  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2


def swin_t(**overrides) -> SwinConfig:
  """Swin-T: timm's `swin_tiny_patch4_window7_224`, drop path 0.2 as the Swin paper trains it."""
  return SwinConfig.from_dict(overrides)


def vit_s(**overrides) -> ViTConfig:
  """ViT-S/16 = DeiT-S: timm's `vit_small_patch16_224`, drop path 0.1 as DeiT trains it."""
  return ViTConfig.from_dict(overrides)


# --- shared parts ---------------------------------------------------------------------------------

def _linear(in_dim, out_dim, *, use_bias=True, dtype, rngs):
  """timm's transformer Linear: N(0, 0.02) weight, zero bias."""
  return nnx.Linear(in_dim, out_dim, use_bias=use_bias, kernel_init=layers.trunc_normal_002,
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


class Mlp(nnx.Module):
  """timm's Mlp: fc1 (dim -> hidden), exact GELU, fc2 (hidden -> dim)."""

  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(layers.gelu(self.fc1(x)))


class Attention(nnx.Module):
  """Multi-head self-attention over the tokens of x [..., N, C]: one qkv Linear, softmax of
  q k^T / sqrt(head_dim) (plus `bias`, broadcast to [..., heads, N, N]), the heads' outputs
  concatenated, then the output projection `proj`. Softmax in float32 whatever the compute
  dtype."""

  def __init__(self, dim: int, num_heads: int, *, dtype=None, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, bias=None):
    *batch, n, c = x.shape
    qkv = self.qkv(x).reshape(*batch, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]   # [..., N, heads, hd]
    attn = jnp.einsum('...nhd,...mhd->...hnm', q * jnp.asarray(self.scale, q.dtype), k)
    if bias is not None:
      attn = attn + bias
    attn = jax.nn.softmax(layers.at_least_float32(attn), axis=-1).astype(v.dtype)
    out = jnp.einsum('...hnm,...mhd->...nhd', attn, v).reshape(*batch, n, c)
    return self.proj(out)


def _patch_embed_conv(cfg, dim, dtype, rngs):
  return layers.conv(cfg.in_channels, dim, cfg.patch_size, stride=cfg.patch_size, padding=0,
                     use_bias=True, init='trunc_normal', dtype=dtype, rngs=rngs)


def _check_input(x, cfg):
  if tuple(x.shape[1:3]) != (cfg.img_size, cfg.img_size):
    raise ValueError(f'{type(cfg).__name__} is built for {cfg.img_size}x{cfg.img_size} inputs '
                     f'(img_size), got {x.shape[1]}x{x.shape[2]}')


# --- Swin -----------------------------------------------------------------------------------------

def relative_position_index(wh: int, ww: int) -> np.ndarray:
  """[wh*ww, wh*ww]: the row of the relative position bias table for each (query, key) pair of a
  window (Swin's (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1))."""
  ys, xs = np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')
  coords = np.stack([ys.ravel(), xs.ravel()])               # [2, N]
  rel = coords[:, :, None] - coords[:, None, :]             # [2, N, N]
  return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def _partition(x, wh, ww):
  """[B, H, W, C] -> [B, windows, wh*ww, C], windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def _merge(windows, wh, ww, h, w):
  """The inverse of `_partition` for an [h, w] map."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(h: int, w: int, wh: int, ww: int, sh: int, sw: int) -> np.ndarray:
  """[windows, N, N]: 0 between tokens of the same region of the cyclically shifted (h, w) map,
  -100 across regions (timm's value), for the padded map of side h, w."""
  regions = np.zeros((h, w), np.float32)
  count = 0
  for ys in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
    for xs in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
      regions[ys, xs] = count
      count += 1
  windows = _partition(regions[None, :, :, None], wh, ww)[0, :, :, 0]   # [windows, N]
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class WindowAttention(Attention):
  """Attention within each window, plus a learned bias per head and relative position."""

  def __init__(self, dim: int, num_heads: int, window: tuple[int, int], *, dtype=None,
               rngs: nnx.Rngs):
    super().__init__(dim, num_heads, dtype=dtype, rngs=rngs)
    wh, ww = window
    self.relative_position_bias_table = nnx.Param(
        layers.trunc_normal_002(rngs.params(), ((2 * wh - 1) * (2 * ww - 1), num_heads)))

  def position_bias(self, wh, ww):
    """[heads, N, N]."""
    n = wh * ww
    table = self.relative_position_bias_table[...]
    return table[relative_position_index(wh, ww).reshape(-1)].reshape(n, n, -1).transpose(2, 0, 1)


class SwinBlock(nnx.Module):
  """Swin's block: LayerNorm, (shifted) window attention, DropPath, residual; LayerNorm, MLP,
  DropPath, residual. A map no larger than the window is one unshifted window (as timm)."""

  def __init__(self, dim: int, num_heads: int, *, resolution: int, window_size: int, shift: bool,
               mlp_ratio: float, drop_path: float, dtype=None, rngs: nnx.Rngs):
    # timm's _calc_window_shift: the window shrinks to the map, and then does not shift.
    self.window = min(resolution, window_size)
    self.shift = window_size // 2 if shift and resolution > window_size else 0
    self.norm1 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)   # nn.LayerNorm's eps
    self.attn = WindowAttention(dim, num_heads, (self.window, self.window), dtype=dtype, rngs=rngs)
    self.drop_path1 = layers.DropPath(drop_path, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=1e-5, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path2 = layers.DropPath(drop_path, rngs=rngs)

  def _window_attention(self, x):
    _, h, w, _ = x.shape
    ws, s = self.window, self.shift
    if s:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))                 # cyclic shift
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws         # pad to whole windows (zeros)
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    bias = self.attn.position_bias(ws, ws)                  # [heads, N, N]
    if s:
      mask = shifted_window_mask(hp, wp, ws, ws, s, s)      # [windows, N, N]
      bias = bias + jnp.asarray(mask)[:, None]              # [windows, heads, N, N]
    x = _merge(self.attn(_partition(x, ws, ws), bias.astype(x.dtype)), ws, ws, hp, wp)
    x = x[:, :h, :w]
    if s:
      x = jnp.roll(x, (s, s), axis=(1, 2))
    return x

  def __call__(self, x, *, key: jax.Array | None = None):
    keys = (None, None) if key is None else jax.random.split(key)
    x = x + self.drop_path1(self._window_attention(self.norm1(x)), key=keys[0])
    x = x + self.drop_path2(self.mlp(self.norm2(x)), key=keys[1])
    return x


class PatchMerging(nnx.Module):
  """Swin's downsampling: each 2x2 neighbourhood concatenated (4C, timm's order), LayerNorm, a
  bias-free Linear to 2C. An odd side is padded with zeros first."""

  def __init__(self, dim: int, out_dim: int, *, dtype=None, rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(4 * dim, eps=1e-5, dtype=dtype)
    self.reduction = _linear(4 * dim, out_dim, use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = h + h % 2, w + w % 2
    # [B, H/2, dy, W/2, dx, C] -> channels ordered (dx, dy, C): x0, x1, x2, x3 of the paper's code.
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class PatchEmbed(nnx.Module):
  """Non-overlapping patches: a conv of kernel and stride `patch_size`, then (Swin) a LayerNorm."""

  def __init__(self, cfg, dim: int, *, norm: bool, dtype=None, rngs: nnx.Rngs):
    self.proj = _patch_embed_conv(cfg, dim, dtype, rngs)
    self.norm = _maybe(layers.LayerNorm(dim, eps=1e-5, dtype=dtype) if norm else None)

  def __call__(self, x):
    x = self.proj(x)
    return self.norm(x) if self.norm is not None else x


class PooledClassifier(nnx.Module):
  """timm's ClassifierHead with average pooling: mean over H and W, then `fc`."""

  def __init__(self, dim: int, num_classes: int, *, dtype=None, rngs: nnx.Rngs):
    self.fc = _linear(dim, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc(x.mean(axis=(1, 2)))


class SwinTransformer(nnx.Module):
  """Swin: patch embedding (conv + LayerNorm), four stages of Swin blocks with patch merging
  between them, a final LayerNorm, global average pooling and the classifier. Input NHWC at
  `cfg.img_size`; output float32 logits."""

  # Parameters the trainer never decays (by leaf name), beside biases and norms: timm's
  # `no_weight_decay_keywords`.
  NO_WEIGHT_DECAY = frozenset({'relative_position_bias_table'})

  def __init__(self, cfg: SwinConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = compute_dtype(cfg)
    widths, resolutions = cfg.stage_widths(), cfg.stage_resolutions()
    self.patch_embed = PatchEmbed(cfg, widths[0], norm=True, dtype=dtype, rngs=rngs)
    rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
    stages, in_dim = [], widths[0]
    for i, (depth, dim, heads) in enumerate(zip(cfg.depths, widths, cfg.num_heads)):
      downsample = PatchMerging(in_dim, dim, dtype=dtype, rngs=rngs) if i > 0 else None
      blocks = [SwinBlock(dim, heads, resolution=resolutions[i], window_size=cfg.window_size,
                          shift=j % 2 == 1, mlp_ratio=cfg.mlp_ratio, drop_path=rates.pop(0),
                          dtype=dtype, rngs=rngs)
                for j in range(depth)]
      stages.append(Stage(downsample, blocks))
      in_dim = dim
    self.layers = nnx.List(stages)
    self.norm = layers.LayerNorm(in_dim, eps=1e-5, dtype=dtype)
    self.head = PooledClassifier(in_dim, cfg.num_classes, dtype=dtype, rngs=rngs)

  def features(self, x, *, key: jax.Array | None = None) -> list[jax.Array]:
    """The output of each stage, NHWC, in the compute dtype."""
    _check_input(x, self.cfg)
    if self.cfg.dtype != 'float32':
      x = jnp.asarray(x, self.cfg.dtype)
    x = self.patch_embed(x)
    outputs = []
    for i, stage in enumerate(self.layers):
      x = stage(x, key=None if key is None else jax.random.fold_in(key, i))
      outputs.append(x)
    return outputs

  def classify(self, features: list[jax.Array]) -> jax.Array:
    """Logits from `features(x)`'s output: the final LayerNorm, pooling and the classifier."""
    return layers.at_least_float32(self.head(self.norm(features[-1])))

  def __call__(self, x, *, key: jax.Array | None = None):
    """Logits; `key` drives stochastic depth in train mode (else each DropPath's own stream)."""
    return self.classify(self.features(x, key=key))


# --- ViT ------------------------------------------------------------------------------------------

class ViTBlock(nnx.Module):
  """The pre-norm transformer block: LayerNorm, attention, LayerScale, DropPath, residual;
  LayerNorm, MLP, LayerScale, DropPath, residual (LayerScale only with `layer_scale_init`)."""

  def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, layer_scale_init: float,
               drop_path: float, dtype=None, rngs: nnx.Rngs):
    def layer_scale():
      return _maybe(layers.LayerScale(dim, layer_scale_init, dtype=dtype)
                    if layer_scale_init > 0 else None)

    self.norm1 = layers.LayerNorm(dim, eps=1e-6, dtype=dtype)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.ls1 = layer_scale()
    self.drop_path1 = layers.DropPath(drop_path, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=1e-6, dtype=dtype)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.ls2 = layer_scale()
    self.drop_path2 = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x, *, key: jax.Array | None = None):
    keys = (None, None) if key is None else jax.random.split(key)
    y = self.attn(self.norm1(x))
    if self.ls1 is not None:
      y = self.ls1(y)
    x = x + self.drop_path1(y, key=keys[0])
    y = self.mlp(self.norm2(x))
    if self.ls2 is not None:
      y = self.ls2(y)
    return x + self.drop_path2(y, key=keys[1])


class VisionTransformer(nnx.Module):
  """ViT as timm's `VisionTransformer` with its defaults: patch embedding (conv, no norm), a class
  token prepended, a learned position embedding added (class token included), pre-norm blocks, a
  final LayerNorm, the class token's features to the classifier. Input NHWC at `cfg.img_size`;
  output float32 logits."""

  # Parameters the trainer never decays (by leaf name), beside biases and norms: timm's
  # `no_weight_decay()` (its 'dist_token' does not exist here).
  NO_WEIGHT_DECAY = frozenset({'pos_embed', 'cls_token'})

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = compute_dtype(cfg)
    dim = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg, dim, norm=False, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(
        layers.trunc_normal_002(rngs.params(), (1, cfg.num_patches() + 1, dim)))
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth).tolist()
    self.blocks = nnx.List([
        ViTBlock(dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                 layer_scale_init=cfg.layer_scale_init, drop_path=rate, dtype=dtype, rngs=rngs)
        for rate in rates])
    self.norm = layers.LayerNorm(dim, eps=1e-6, dtype=dtype)
    self.head = _linear(dim, cfg.num_classes, dtype=dtype, rngs=rngs)

  def features(self, x, *, key: jax.Array | None = None) -> list[jax.Array]:
    """The output of each block, [B, 1 + patches, C] (class token first, then the patches in
    row-major order), in the compute dtype."""
    _check_input(x, self.cfg)
    if self.cfg.dtype != 'float32':
      x = jnp.asarray(x, self.cfg.dtype)
    x = self.patch_embed(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)                               # row-major, as timm's flatten
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    outputs = []
    for j, block in enumerate(self.blocks):
      x = block(x, key=None if key is None else jax.random.fold_in(key, j))
      outputs.append(x)
    return outputs

  def tokens(self, x, *, key: jax.Array | None = None) -> jax.Array:
    """[B, 1 + patches, C]: the final LayerNorm's output, in the compute dtype."""
    return self.norm(self.features(x, key=key)[-1])

  def classify(self, features: list[jax.Array]) -> jax.Array:
    """Logits from `features(x)`'s output: the final LayerNorm, the class token, the classifier."""
    return layers.at_least_float32(self.head(self.norm(features[-1])[:, 0]))

  def __call__(self, x, *, key: jax.Array | None = None):
    """Logits; `key` drives stochastic depth in train mode (else each DropPath's own stream)."""
    return self.classify(self.features(x, key=key))


MODELS = {SwinConfig: SwinTransformer, ViTConfig: VisionTransformer}
