"""The configurable network: stem, four stages of residual blocks (`LadderBlock` unless a stage is
given its own), head."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modernize.blocks import Downsample, Head, LadderBlock, Stage, Stem
from modernize.config import ConfigError, NetConfig, feature_size
from modernize.transformers import MODELS

# A stage's block: (in_dim, out_dim, *, stride, drop_path, rngs) -> module; the first block of a
# stage gets the stage's stride (in-block downsampling), `__call__(x, *, key=None)`.
BlockFn = Callable[..., nnx.Module]


def last_feature_map(cfg: NetConfig, image_size: int | tuple[int, int]) -> tuple[int, int]:
  """(H, W) of the last stage's feature map for an input of `image_size` (side or (H, W))."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  size = feature_size(cfg, h), feature_size(cfg, w)
  if not all(size):
    raise ConfigError(f'image_size={image_size!r} leaves the last stage an empty feature map')
  return size


def stage_blocks(cfg: NetConfig, image_size: int | tuple[int, int] = 224) -> list[BlockFn]:
  """The block of each stage: `LadderBlock` for `cfg` everywhere; with `cfg.mhsa_last_stage`, the
  last stage's blocks have BoTNet's global self-attention, built for that stage's feature map at
  `image_size`, in place of the depthwise conv."""
  blocks = [functools.partial(LadderBlock, cfg=cfg)] * len(cfg.depths)
  if cfg.mhsa_last_stage:
    blocks[-1] = functools.partial(LadderBlock, cfg=cfg,
                                   attention_size=last_feature_map(cfg, image_size))
  return blocks


class Network(nnx.Module):
  """ResNet-50 with `NetConfig()`, ConvNeXt-T with `modernize.presets.convnext_tiny()`, and every
  step of the ladder in between. Input NHWC; output float32 logits (float64 with float64
  parameters). With `cfg.dtype='bfloat16'` the input is cast to bfloat16 and activations, convs
  and matmuls run in it; parameters, the norms' statistics and the logits stay float32 (mixed
  precision).

  Train/eval mode: `model.train()` / `model.eval()` (BatchNorm statistics and DropPath).

  `image_size` (a side, or (H, W)): the input the network is built for; only size-aware layers use
  it (`mhsa_last_stage`'s relative position embeddings), any size fits the others. `blocks`: one
  block constructor per stage (`BlockFn`), default `stage_blocks(cfg, image_size)`; a new kind of
  block can be tried in a stage without editing this class.
  """

  def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs,
               image_size: int | tuple[int, int] = 224, blocks: Sequence[BlockFn] | None = None):
    self.cfg = cfg
    blocks = stage_blocks(cfg, image_size) if blocks is None else list(blocks)
    if len(blocks) != len(cfg.depths):
      raise ConfigError(f'blocks: {len(blocks)} given for {len(cfg.depths)} stages')
    self.stem = Stem(cfg, rngs=rngs)
    # Stochastic depth grows linearly over all blocks, as in the official code.
    rates = np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
    in_dim, stages = cfg.width, []
    for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.stage_widths())):
      stride = 1 if i == 0 else 2
      downsample = None
      if cfg.downsampling == 'separate' and i > 0:
        downsample, stride = Downsample(in_dim, dim, cfg, rngs=rngs), 1
        in_dim = dim
      stage = []
      for j in range(depth):
        stage.append(blocks[i](in_dim, dim, stride=stride if j == 0 else 1,
                               drop_path=rates.pop(0), rngs=rngs))
        in_dim = dim
      stages.append(Stage(downsample, stage))
    self.stages = nnx.List(stages)
    self.head = Head(in_dim, cfg, rngs=rngs)

  def features(self, x, *, key: jax.Array | None = None) -> list[jax.Array]:
    """The output of each stage (for analysis of representations), in the compute dtype."""
    if self.cfg.dtype != 'float32':   # mixed precision; float32 keeps the promotion rules
      x = jnp.asarray(x, self.cfg.dtype)
    x = self.stem(x)
    outputs = []
    for i, stage in enumerate(self.stages):
      x = stage(x, key=None if key is None else jax.random.fold_in(key, i))
      outputs.append(x)
    return outputs

  def classify(self, features: list[jax.Array]) -> jax.Array:
    """Logits from `features(x)`'s output (the stage outputs and the logits in one pass)."""
    return self.head(features[-1])

  def __call__(self, x, *, key: jax.Array | None = None):
    """Logits. `key` drives stochastic depth in train mode (a pure function of the key); without
    it, each DropPath draws from its own RNG stream."""
    return self.classify(self.features(x, key=key))


def model_class(cfg) -> type[nnx.Module]:
  """The module a config builds: `Network` for a `NetConfig`, `SwinTransformer` for a
  `SwinConfig`, `VisionTransformer` for a `ViTConfig`."""
  if isinstance(cfg, NetConfig):
    return Network
  if type(cfg) in MODELS:
    return MODELS[type(cfg)]
  raise TypeError(f'not a network config: {type(cfg).__name__}')


def build(cfg, *, rngs: nnx.Rngs, image_size: int | tuple[int, int] = 224) -> nnx.Module:
  """The module `cfg` describes: a `Network` built for `image_size`, or the transformer a
  `SwinConfig` / `ViTConfig` describes (its input size is its config's `img_size`)."""
  cls = model_class(cfg)
  if cls is Network:
    return Network(cfg, rngs=rngs, image_size=image_size)
  return cls(cfg, rngs=rngs)


def create_model(cfg, seed: int = 0, image_size: int | tuple[int, int] = 224) -> nnx.Module:
  """`build(cfg, rngs=nnx.Rngs(seed), image_size=image_size)` (a `Network`, or the transformer a
  `SwinConfig` / `ViTConfig` builds), initialised by one compiled function.

  Eager NNX init compiles a small XLA program per parameter shape (10-20 s for a ladder network on
  a small CPU); one jitted init at XLA's lowest backend optimisation level takes about a second.
  """
  def make():
    return build(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1), image_size=image_size)

  graphdef = nnx.graphdef(nnx.eval_shape(make))
  init = jax.jit(lambda: nnx.state(make())).lower().compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return nnx.merge(graphdef, init())


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are not parameters)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
