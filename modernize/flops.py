"""Counting multiply-accumulates the paper's way.

The paper's "FLOPs" are multiply-accumulates of convolutions and linear layers (ResNet-50: 4.09 G).
We count them from the traced program rather than from a formula: the forward pass is traced to a
jaxpr (no arrays are allocated) and every `conv_general_dilated` and `dot_general` contributes
  conv: output elements x kernel height x kernel width x input channels per group
  dot:  output elements x contracted size
Norms, activations, pooling, additions and LayerScale are not counted (as in the paper); softmax is
not, but attention's products are dots (q.k, q.r, weights.v) and count as such, as fvcore counts
Swin's and DeiT's for their published FLOPs.
Depthwise convs are traced with the plain XLA grouped conv so that they count as convs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import jaxprs_in_params

from modernize.config import NetConfig


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      lhs, rhs = (v.aval for v in eqn.invars)
      out = eqn.outvars[0].aval
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      per_output = math.prod(rhs.shape) // rhs.shape[rhs_spec[0]]
      total += math.prod(out.shape) * per_output
    elif name == 'dot_general':
      lhs = eqn.invars[0].aval
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      contracted = math.prod(lhs.shape[d] for d in lhs_contract)
      total += math.prod(eqn.outvars[0].aval.shape) * contracted
    for sub in jaxprs_in_params(eqn.params):
      total += _jaxpr_macs(sub)
  return total


def count_macs(cfg, image_size: int | tuple[int, int] = 224) -> int:
  """Multiply-accumulates of one forward pass of one image at `image_size`.

  A `SwinConfig` or `ViTConfig` is built for a square `image_size` (`img_size`: their window
  clipping and position embedding depend on it)."""
  from modernize.network import build  # local: network imports the layers this module counts
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  if isinstance(cfg, NetConfig):
    cfg = cfg.replace(depthwise_impl='xla')
  else:
    if h != w:
      raise ValueError(f'{type(cfg).__name__} takes square inputs, got {h}x{w}')
    cfg = cfg.replace(img_size=h)
  model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0), image_size=(h, w)))
  graphdef, state = nnx.split(model)

  def forward(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  x = jax.ShapeDtypeStruct((1, h, w, cfg.in_channels), jnp.float32)
  return _jaxpr_macs(jax.make_jaxpr(forward)(state, x).jaxpr)
