"""Looking inside trained networks: representation similarity, shape bias, error consistency.

Pure functions on arrays (JAX or numpy); the experiment suite's `experiments.analyze` applies them
to every trained step of the ladder.

* **Linear CKA** (centred kernel alignment; Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited"). For representations X (n x p) and Y (n x q) of the same n examples,
  with linear kernels K = X X^T and L = Y Y^T,

      CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

  The biased (plug-in) estimator is HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 with the centring matrix
  H = I - 11^T / n; for linear kernels
      CKA_0 = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F),
  X_c, Y_c column-centred. The unbiased estimator (Song et al. 2012, "Feature Selection via
  Dependence Maximization", used for CKA by Nguyen et al. 2021, "Do Wide and Deep Networks Learn the
  Same Things?") sets the diagonals of K and L to zero (K~, L~) and, for n >= 4,

      HSIC_1(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2))
                      - 2 / (n - 2) 1^T K~ L~ 1] / (n (n - 3)).

  Both are invariant to orthogonal transforms and isotropic scaling of either representation, and
  to translations of the features (so features are centred before the products, which helps
  float32 precision), but not to general invertible linear maps. HSIC_1 is unbiased, so CKA_1 may
  fall slightly outside [0, 1] on small samples.
* **Minibatch CKA** (Nguyen et al. 2021): average HSIC_1(K_b, L_b), HSIC_1(K_b, K_b) and
  HSIC_1(L_b, L_b) over minibatches b and take CKA of the averages. HSIC_1 being unbiased, the
  average is an unbiased estimate of HSIC whatever the batch size, so the result converges to the
  full-data CKA (which the biased estimator, averaged over batches, would not). Memory is one
  minibatch of features (or its Gram matrices) at a time. `MinibatchCKA` weights each batch by its
  number of examples (equal weights when all batches have the same size, as in the paper; a short
  last batch then counts for less).
* **Error consistency** (Geirhos et al. 2020, "Beyond accuracy: quantifying trial-by-trial behaviour
  of CNNs and humans by measuring error consistency"): Cohen's kappa on correct / incorrect.
* **Shape bias** (Geirhos et al. 2019, "ImageNet-trained CNNs are biased towards texture"): on
  cue-conflict images, shape decisions / (shape + texture decisions). `cue_conflict_set` builds such
  images from objects on a plain background (Fashion-MNIST): one image's silhouette filled with a
  texture tiled from another image of a different class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'CueConflictSet', 'MinibatchCKA', 'ShapeBias', 'cue_conflict_set', 'error_consistency',
    'error_consistency_matrix', 'foreground_mask', 'gram_linear', 'hsic', 'linear_cka',
    'pool_to_size', 'shape_bias',
]


# --- CKA ------------------------------------------------------------------------------------------

def _flatten(x) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'a representation needs shape (n, features...), got {x.shape}')
  x = x.reshape(x.shape[0], -1)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _centre(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Subtracts the (masked) column mean; masked-out rows become zero."""
  if mask is None:
    return x - x.mean(axis=0, keepdims=True)
  m = mask.astype(x.dtype)[:, None]
  mean = (x * m).sum(axis=0, keepdims=True) / jnp.maximum(m.sum(), 1)
  return (x - mean) * m


def gram_linear(x, mask=None) -> jax.Array:
  """The linear kernel K = X_c X_c^T (n x n) of a representation (n, ...), features centred first.

  mask: optional (n,) bool; rows and columns of excluded examples are zero (see `hsic`'s `n`).
  Centring does not change HSIC_1 (translation invariance) and makes HSIC_0 the plug-in estimator.
  """
  x = _centre(_flatten(x), None if mask is None else jnp.asarray(mask))
  return x @ x.T


def _hsic_from_stats(cross, sum_k, sum_l, dot_rows, n, debiased: bool):
  """HSIC from the sums of zero-diagonal (debiased) or centred (biased) Gram matrices."""
  if debiased:
    return (cross + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * dot_rows / (n - 2)) / (n * (n - 3))
  return cross / (n - 1) ** 2


def _gram_stats(k: jax.Array, mask: jax.Array | None, debiased: bool):
  """(Gram with zero diagonal if debiased, its sum, its row sums)."""
  if debiased:
    k = k * (1 - jnp.eye(k.shape[-1], dtype=k.dtype))
  if mask is not None:
    m = mask.astype(k.dtype)
    k = k * m[:, None] * m[None, :]
  return k, k.sum(axis=(-2, -1)), k.sum(axis=-1)


def hsic(k, l, *, debiased: bool = True, mask=None) -> jax.Array:
  """HSIC_1 (debiased, Song et al. 2012) or HSIC_0 (biased) of two n x n Gram matrices.

  For HSIC_0 the Gram matrices must come from centred features (as `gram_linear` makes them).
  mask: optional (n,) bool selecting the examples (the others are ignored; n = mask.sum()).
  """
  k, l = jnp.asarray(k), jnp.asarray(l)
  mask = None if mask is None else jnp.asarray(mask)
  n = k.shape[0] if mask is None else mask.sum().astype(k.dtype)
  k, sum_k, rows_k = _gram_stats(k, mask, debiased)
  l, sum_l, rows_l = _gram_stats(l, mask, debiased)
  return _hsic_from_stats(jnp.sum(k * l), sum_k, sum_l, rows_k @ rows_l, n, debiased)


def _hsic_features(x: jax.Array, y: jax.Array, debiased: bool) -> jax.Array:
  """HSIC of the linear kernels of centred features without forming the n x n Grams.

  tr(K~ L~) = ||X^T Y||_F^2 - sum_i k_ii l_ii, 1^T K~ 1 = ||X^T 1||^2 - tr K (zero for centred X),
  K~ 1 = X (X^T 1) - diag(K) = -diag(K) for centred X.
  """
  n = x.shape[0]
  cross = jnp.sum((x.T @ y) ** 2)
  if not debiased:
    return cross / (n - 1) ** 2
  kd, ld = jnp.sum(x * x, axis=1), jnp.sum(y * y, axis=1)
  return _hsic_from_stats(cross - kd @ ld, -kd.sum(), -ld.sum(), kd @ ld, n, True)


def linear_cka(x, y, *, debiased: bool = True) -> jax.Array:
  """Linear CKA between two representations of the same n examples (any shape (n, ...)).

  debiased=True: the unbiased HSIC_1 estimator (Song et al. 2012; Nguyen et al. 2021), needs n >= 4;
  False: the biased HSIC_0 form of Kornblith et al. 2019. Computed through n x n Gram matrices or
  through feature-space products, whichever is cheaper; the two agree up to rounding.
  """
  x, y = _flatten(x), _flatten(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f'representations of different numbers of examples: {x.shape}, {y.shape}')
  n, p, q = x.shape[0], x.shape[1], y.shape[1]
  if debiased and n < 4:
    raise ValueError(f'the unbiased estimator needs at least 4 examples, got {n}')
  x, y = _centre(x), _centre(y)
  if n * n * (p + q) <= n * (p * q + p * p + q * q):
    k, l = x @ x.T, y @ y.T
    xy, xx, yy = (hsic(a, b, debiased=debiased) for a, b in ((k, l), (k, k), (l, l)))
  else:
    xy, xx, yy = (_hsic_features(a, b, debiased) for a, b in ((x, y), (x, x), (y, y)))
  return xy / jnp.sqrt(xx * yy)


@functools.partial(jax.jit, static_argnames=('debiased',))
def _hsic_block(kx: jax.Array, ky: jax.Array, mask: jax.Array, debiased: bool):
  """HSIC of every pair: kx (a, n, n), ky (b, n, n) -> (a, b); and the self terms (a,), (b,)."""
  n = mask.sum().astype(kx.dtype)
  kx, sx, rx = jax.vmap(lambda k: _gram_stats(k, mask, debiased))(kx)
  ky, sy, ry = jax.vmap(lambda k: _gram_stats(k, mask, debiased))(ky)
  def pairs(a, sa, ra, b, sb, rb):
    cross = jnp.einsum('inm,jnm->ij', a, b)
    return _hsic_from_stats(cross, sa[:, None], sb[None, :], ra @ rb.T, n, debiased)
  self_x = jax.vmap(lambda k, s, r: _hsic_from_stats(jnp.sum(k * k), s, s, r @ r, n, debiased))
  return pairs(kx, sx, rx, ky, sy, ry), self_x(kx, sx, rx), self_x(ky, sy, ry)


class MinibatchCKA:
  """Linear CKA of many layer pairs, accumulated over minibatches (Nguyen et al. 2021).

  For each minibatch b the estimator takes HSIC(K_b^i, L_b^j) for every layer i of the first list
  and j of the second, and HSIC(K_b^i, K_b^i), HSIC(L_b^j, L_b^j); `result()` is

      CKA_ij = mean_b HSIC(K_b^i, L_b^j) / sqrt(mean_b HSIC(K_b^i, K_b^i) mean_b HSIC(L_b^j, L_b^j))

  with batches weighted by their size. Only one minibatch's Gram matrices are alive at a time; sums
  are kept in float64 on the host.

    cka = MinibatchCKA(num_x=4, num_y=4)          # num_y=None: every pair within one list
    for batch in batches:
      cka.update(features_a(batch), features_b(batch))
    cka.result()                                   # (4, 4) numpy array
  """

  def __init__(self, num_x: int, num_y: int | None = None, *, debiased: bool = True):
    self.num_x, self.num_y = num_x, num_y
    self.symmetric = num_y is None
    self.debiased = debiased
    ny = num_x if num_y is None else num_y
    self.cross = np.zeros((num_x, ny))
    self.self_x = np.zeros(num_x)
    self.self_y = np.zeros(ny)
    self.weight = 0.0
    self.batches = 0

  def update(self, xs: Sequence, ys: Sequence | None = None, *, mask=None) -> None:
    """Adds a minibatch: xs, ys lists of representations (n, ...) of the same n examples.

    mask: optional (n,) bool marking the real examples (e.g. padding at the end of a test split).
    """
    kx = jnp.stack([gram_linear(x, mask) for x in xs])
    ky = None if ys is None else jnp.stack([gram_linear(y, mask) for y in ys])
    self.update_grams(kx, ky, mask=mask)

  def update_grams(self, kx, ky=None, *, mask=None) -> None:
    """Adds a minibatch given its Gram matrices (from `gram_linear`): kx (num_x, n, n), ky likewise.

    Lets callers compute the Grams where the features are (e.g. inside a jitted forward pass).
    """
    kx = jnp.asarray(kx)
    if kx.ndim != 3 or kx.shape[0] != self.num_x:
      raise ValueError(f'expected {self.num_x} Gram matrices, got shape {kx.shape}')
    if (ky is None) != self.symmetric:
      raise ValueError('give ys exactly when the estimator was made with num_y')
    ky = kx if ky is None else jnp.asarray(ky)
    if ky.shape[0] != self.cross.shape[1] or ky.shape[1:] != kx.shape[1:]:
      raise ValueError(f'Gram matrices of shapes {kx.shape} and {ky.shape} do not match')
    n = kx.shape[1]
    mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)
    size = int(mask.sum())
    if size < (4 if self.debiased else 2):
      return  # too few examples for the estimator: the batch carries no information
    cross, sx, sy = jax.device_get(_hsic_block(kx, ky, mask, self.debiased))
    self.cross += size * np.asarray(cross, np.float64)
    self.self_x += size * np.asarray(sx, np.float64)
    self.self_y += size * np.asarray(sy, np.float64)
    self.weight += size
    self.batches += 1

  def result(self) -> np.ndarray:
    """The (num_x, num_y) CKA matrix (num_x x num_x when symmetric)."""
    if not self.batches:
      raise ValueError('no minibatch has been added')
    with np.errstate(divide='ignore', invalid='ignore'):
      return self.cross / np.sqrt(np.outer(self.self_x, self.self_y))


def pool_to_size(x, max_dim: int):
  """Average-pools an NHWC map over non-overlapping 2x2 windows until H * W * C <= max_dim.

  Keeps the CKA of large early feature maps affordable (the Gram matrix costs n^2 H W C) while
  retaining spatial layout; odd sizes drop their last row / column. Other shapes pass unchanged.
  """
  if x.ndim != 4:
    return x
  while x.shape[1] * x.shape[2] * x.shape[3] > max_dim and min(x.shape[1], x.shape[2]) >= 2:
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return x


# --- error consistency ----------------------------------------------------------------------------

def error_consistency(correct_a, correct_b) -> float:
  """Cohen's kappa of two classifiers' trial-by-trial correctness (Geirhos et al. 2020).

  c_obs = fraction of examples where both are right or both wrong; with accuracies p_a and p_b,
  independent classifiers would agree on c_exp = p_a p_b + (1 - p_a)(1 - p_b), and

      kappa = (c_obs - c_exp) / (1 - c_exp),

  0 for independent errors (in expectation), 1 for identical decisions, negative when errors avoid
  each other. Degenerate case: c_exp = 1 (both always right, or both always wrong) leaves kappa
  undefined (0 / 0); it is returned as NaN.
  """
  a = np.asarray(correct_a).astype(bool).reshape(-1)
  b = np.asarray(correct_b).astype(bool).reshape(-1)
  if a.shape != b.shape or not a.size:
    raise ValueError(f'need two equally long, non-empty decision vectors: {a.shape}, {b.shape}')
  p_a, p_b = a.mean(), b.mean()
  c_obs = float(np.mean(a == b))
  c_exp = float(p_a * p_b + (1 - p_a) * (1 - p_b))
  if c_exp >= 1.0:
    return float('nan')
  return (c_obs - c_exp) / (1.0 - c_exp)


def error_consistency_matrix(corrects: Sequence) -> np.ndarray:
  """kappa of every pair of correctness vectors: (k, k), diagonal 1 (NaN if degenerate)."""
  k = len(corrects)
  out = np.eye(k)
  for i in range(k):
    for j in range(i + 1, k):
      out[i, j] = out[j, i] = error_consistency(corrects[i], corrects[j])
    if np.all(np.asarray(corrects[i])) or not np.any(np.asarray(corrects[i])):
      out[i, i] = np.nan
  return out


# --- shape bias -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShapeBias:
  """Decisions on cue-conflict images. shape_bias is NaN when no decision is shape or texture."""
  shape_bias: float
  shape_decisions: int      # predictions equal to the shape label
  texture_decisions: int    # predictions equal to the texture label
  total: int                # all images

  @property
  def shape_accuracy(self) -> float:
    return self.shape_decisions / self.total

  @property
  def texture_accuracy(self) -> float:
    return self.texture_decisions / self.total

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(shape_accuracy=self.shape_accuracy, texture_accuracy=self.texture_accuracy)
    return d


def shape_bias(pred, shape_label, texture_label) -> ShapeBias:
  """Shape bias (Geirhos et al. 2019): shape decisions / (shape decisions + texture decisions).

  pred: predicted classes; shape_label / texture_label: the class of each image's shape and of its
  texture (must differ). Decisions that are neither count only in `total`.
  """
  pred, s, t = (np.asarray(v).reshape(-1) for v in (pred, shape_label, texture_label))
  if not pred.shape == s.shape == t.shape:
    raise ValueError(f'shapes differ: {pred.shape}, {s.shape}, {t.shape}')
  if np.any(s == t):
    raise ValueError('cue-conflict images need different shape and texture labels')
  shape_hits, texture_hits = int(np.sum(pred == s)), int(np.sum(pred == t))
  decided = shape_hits + texture_hits
  return ShapeBias(shape_hits / decided if decided else float('nan'), shape_hits, texture_hits,
                   int(pred.size))


# --- cue-conflict images --------------------------------------------------------------------------

def _luma(images: np.ndarray) -> np.ndarray:
  x = images.astype(np.float32)
  return x[..., 0] if x.shape[-1] == 1 else x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def _dilate(m: np.ndarray) -> np.ndarray:
  """4-neighbour binary dilation of (B, H, W) masks."""
  out = m.copy()
  out[:, 1:] |= m[:, :-1]
  out[:, :-1] |= m[:, 1:]
  out[:, :, 1:] |= m[:, :, :-1]
  out[:, :, :-1] |= m[:, :, 1:]
  return out


def foreground_mask(images: np.ndarray, threshold: float = 16.0, fill_holes: bool = True
                    ) -> np.ndarray:
  """(B, H, W) bool: pixels whose luma differs from the background by more than `threshold`.

  The background is the median of each image's border pixels (0 on Fashion-MNIST). fill_holes:
  also mark background-like pixels not connected to the border (dark parts inside an object), so
  the mask is the object's silhouette.
  """
  luma = _luma(images)
  border = np.concatenate([luma[:, 0], luma[:, -1], luma[:, :, 0], luma[:, :, -1]], axis=1)
  fg = np.abs(luma - np.median(border, axis=1)[:, None, None]) > threshold
  if not fill_holes:
    return fg
  outside = np.zeros_like(fg)
  outside[:, [0, -1]] = ~fg[:, [0, -1]]
  outside[:, :, [0, -1]] |= ~fg[:, :, [0, -1]]
  while True:  # flood fill of the background from the border
    grown = _dilate(outside) & ~fg
    if np.array_equal(grown, outside):
      return ~outside
    outside = grown


def _window_fraction(mask: np.ndarray, p: int) -> np.ndarray:
  """Fraction of True in every p x p window: (B, H - p + 1, W - p + 1), by integral images."""
  s = np.pad(mask.astype(np.int32).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
  return (s[:, p:, p:] - s[:, :-p, p:] - s[:, p:, :-p] + s[:, :-p, :-p]) / (p * p)


@dataclasses.dataclass(frozen=True)
class CueConflictSet:
  image: np.ndarray          # (N, H, W, C) uint8
  shape_label: np.ndarray    # (N,) int32: class of the silhouette's source
  texture_label: np.ndarray  # (N,) int32: class of the texture's source
  shape_index: np.ndarray    # (N,) index of the silhouette's source image
  texture_index: np.ndarray  # (N,) index of the texture's source image
  patch: np.ndarray          # (N, 2) top-left corner of each texture patch in its source
  patch_size: int            # side of the texture patches


def cue_conflict_set(images: np.ndarray, labels: np.ndarray, *, num: int = 2000, seed: int = 0,
                     patch_size: int | None = None, threshold: float = 16.0,
                     min_coverage: float = 1.0) -> CueConflictSet:
  """Cue-conflict images: one image's silhouette filled with another class's texture.

  For i = 0..num-1: shape class s = i mod C (balanced over the C classes), texture class t drawn
  uniformly from the other classes; a shape image A of class s and a texture image B of class t
  drawn uniformly. The silhouette is A's hole-filled foreground (`foreground_mask`). The texture is
  a patch_size x patch_size crop of B (default 2/7 of the image side: 8 px on 28) lying inside B's
  foreground for at least `min_coverage` of its pixels (B is redrawn from class t until one does),
  chosen uniformly among B's such windows, tiled by mirroring (patch, its left-right flip, ...; no
  seams) from a random offset. The result is the texture inside the silhouette and A's background
  outside. All draws come from numpy's PCG64 seeded with `seed`: the set is a pure function of
  (images, labels, num, seed, patch_size, threshold, min_coverage).

  images: (M, H, W, C) uint8 objects on a plain background (Fashion-MNIST's black); labels (M,).
  """
  images = np.asarray(images)
  labels = np.asarray(labels).reshape(-1)
  if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
    raise ValueError('images must be (M, H, W, C) uint8 with one label each')
  m, h, w, _ = images.shape
  p = patch_size or max(2, round(min(h, w) * 2 / 7))
  classes = np.unique(labels)
  if len(classes) < 2:
    raise ValueError('need at least two classes')
  rng = np.random.default_rng(seed)
  silhouettes = foreground_mask(images, threshold, fill_holes=True)
  windows = _window_fraction(foreground_mask(images, threshold, fill_holes=False), p)
  good = windows >= min_coverage - 1e-9                     # (M, H - p + 1, W - p + 1)
  usable = good.any(axis=(1, 2))
  members = {c: np.flatnonzero(labels == c) for c in classes}
  texture_members = {c: np.flatnonzero((labels == c) & usable) for c in classes}
  texture_classes = np.array([c for c in classes if len(texture_members[c])])
  if not len(texture_classes):
    raise ValueError(f'no image has a {p}x{p} window inside its foreground')

  out = np.empty((num,) + images.shape[1:], np.uint8)
  s_lab, t_lab = np.empty(num, np.int32), np.empty(num, np.int32)
  s_idx, t_idx = np.empty(num, np.int64), np.empty(num, np.int64)
  corners = np.empty((num, 2), np.int64)
  for c in classes:
    if not np.any(texture_classes != c):
      raise ValueError(f'no class other than {c} has an image with a {p}x{p} foreground window')
  for i in range(num):
    s = classes[i % len(classes)]
    others = texture_classes[texture_classes != s]
    t = others[rng.integers(len(others))]
    a = members[s][rng.integers(len(members[s]))]
    b = texture_members[t][rng.integers(len(texture_members[t]))]
    ys, xs = np.nonzero(good[b])
    k = rng.integers(len(ys))
    y0, x0 = int(ys[k]), int(xs[k])
    piece = images[b, y0:y0 + p, x0:x0 + p]
    tile = np.concatenate([piece, piece[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)       # (2p, 2p, C), seamless when repeated
    oy, ox = rng.integers(2 * p, size=2)
    reps = (math.ceil((h + oy) / (2 * p)), math.ceil((w + ox) / (2 * p)), 1)
    texture = np.tile(tile, reps)[oy:oy + h, ox:ox + w]
    out[i] = np.where(silhouettes[a][..., None], texture, _background(images[a]))
    s_lab[i], t_lab[i], s_idx[i], t_idx[i] = s, t, a, b
    corners[i] = (y0, x0)
  return CueConflictSet(out, s_lab, t_lab, s_idx, t_idx, corners, p)


def _background(image: np.ndarray) -> np.ndarray:
  """The per-channel median of an image's border (H, W, C) -> (C,) uint8."""
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
  return np.median(border, axis=0).astype(np.uint8)
