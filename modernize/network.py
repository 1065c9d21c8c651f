"""The configurable network: stem, four stages of `LadderBlock`s, head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from modernize.blocks import Downsample, Head, LadderBlock, Stem
from modernize.config import NetConfig
from modernize.transformers import MODELS


class Stage(nnx.Module):
  """An optional separate downsampling layer followed by residual blocks."""

  def __init__(self, downsample: Downsample | None, blocks: list[LadderBlock]):
    self.downsample = downsample if downsample is not None else nnx.data(None)
    self.blocks = nnx.List(blocks)

  def __call__(self, x, *, key: jax.Array | None = None):
    if self.downsample is not None:
      x = self.downsample(x)
    for j, block in enumerate(self.blocks):
      x = block(x, key=None if key is None else jax.random.fold_in(key, j))
    return x


class Network(nnx.Module):
  """ResNet-50 with `NetConfig()`, ConvNeXt-T with `modernize.presets.convnext_tiny()`, and every
  step of the ladder in between. Input NHWC; output float32 logits (float64 with float64
  parameters). With `cfg.dtype='bfloat16'` the input is cast to bfloat16 and activations, convs
  and matmuls run in it; parameters, the norms' statistics and the logits stay float32 (mixed
  precision).

  Train/eval mode: `model.train()` / `model.eval()` (BatchNorm statistics and DropPath).
  """

  def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
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
      blocks = []
      for j in range(depth):
        blocks.append(LadderBlock(in_dim, dim, stride=stride if j == 0 else 1, cfg=cfg,
                                  drop_path=rates.pop(0), rngs=rngs))
        in_dim = dim
      stages.append(Stage(downsample, blocks))
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

  def __call__(self, x, *, key: jax.Array | None = None):
    """Logits. `key` drives stochastic depth in train mode (a pure function of the key); without
    it, each DropPath draws from its own RNG stream."""
    return self.head(self.features(x, key=key)[-1])


def model_class(cfg) -> type[nnx.Module]:
  """The module a config builds: `Network` for a `NetConfig`, `SwinTransformer` for a
  `SwinConfig`, `VisionTransformer` for a `ViTConfig`."""
  if isinstance(cfg, NetConfig):
    return Network
  if type(cfg) in MODELS:
    return MODELS[type(cfg)]
  raise TypeError(f'not a network config: {type(cfg).__name__}')


def create_model(cfg: NetConfig, seed: int = 0) -> nnx.Module:
  """`Network(cfg, rngs=nnx.Rngs(seed))` (or the transformer a `SwinConfig` / `ViTConfig`
  builds), initialised by one compiled function.

  Eager NNX init compiles a small XLA program per parameter shape (10-20 s for a ladder network on
  a small CPU); one jitted init at XLA's lowest backend optimisation level takes about a second.
  """
  cls = model_class(cfg)

  def build():
    return cls(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

  graphdef = nnx.graphdef(nnx.eval_shape(build))
  init = jax.jit(lambda: nnx.state(build())).lower().compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return nnx.merge(graphdef, init())


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are not parameters)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
