"""Mixup, CutMix and label smoothing on device, inside the jitted train step.

As the official ConvNeXt code (timm's Mixup, mode 'batch'): one mixing coefficient per batch, each
image mixed with the image at the mirrored batch position, CutMix instead of Mixup with probability
`switch_prob`, label smoothing folded into the soft targets. Everything is drawn from `key`, so a
step's mixing is a pure function of (seed, step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix(key, images, labels, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
        switch_prob: float = 0.5, mix_prob: float = 1.0, label_smoothing: float = 0.0):
  """Returns (mixed images, soft targets). With both alphas 0, only label smoothing applies."""
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
  n, h, w = images.shape[:3]
  use_cutmix = (cutmix_alpha > 0) & ((mixup_alpha <= 0) | jax.random.bernoulli(k_switch,
                                                                              switch_prob))
  lam_mixup = jax.random.beta(k_mixup, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
  lam_cutmix = jax.random.beta(k_cutmix, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))

  # CutMix box with area (1 - lam), centred uniformly, clipped to the image; lam is then corrected
  # to the exact area kept.
  cut = jnp.sqrt(1.0 - lam_cutmix)
  ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
  cy = jax.random.randint(k_box, (), 0, h)
  cx = jax.random.randint(jax.random.fold_in(k_box, 1), (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (h * w)

  applied = jax.random.bernoulli(k_apply, mix_prob)
  lam = jnp.where(use_cutmix, lam_box, lam_mixup)
  lam = jnp.where(applied, lam, 1.0).astype(images.dtype)
  flipped = images[::-1]
  mixed_up = lam * images + (1.0 - lam) * flipped
  cut_mixed = jnp.where(box[None, :, :, None], flipped, images)
  images = jnp.where(applied & use_cutmix, cut_mixed, jnp.where(applied, mixed_up, images))
  return images, lam * targets + (1.0 - lam) * targets[::-1]
