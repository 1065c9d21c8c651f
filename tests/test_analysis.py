"""modernize.analysis: CKA estimators, error consistency, shape bias, cue-conflict images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modernize import analysis


def low_rank(n, dims=(64, 48), rank=8, noise=0.5, seed=0):
  """Two representations sharing a rank-`rank` signal, plus independent noise."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, rank))
  return [(z @ rng.normal(size=(rank, d)) + noise * rng.normal(size=(n, d))).astype(np.float32)
          for d in dims]


def orthogonal(d, seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return (q * np.sign(np.diag(r))).astype(np.float32)


@pytest.mark.parametrize('debiased', [True, False])
def test_cka_with_itself_is_one(debiased):
  x, _ = low_rank(200)
  assert float(analysis.linear_cka(x, x, debiased=debiased)) == pytest.approx(1.0, abs=1e-5)
  conv = np.random.default_rng(1).normal(size=(50, 4, 4, 3))  # flattened beyond the first axis
  assert float(analysis.linear_cka(conv, conv, debiased=debiased)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize('debiased', [True, False])
def test_cka_invariances(debiased):
  x, y = low_rank(300)
  base = float(analysis.linear_cka(x, y, debiased=debiased))
  assert 0.2 < base < 0.99
  rotated = x @ orthogonal(x.shape[1], 3)
  assert float(analysis.linear_cka(rotated, y, debiased=debiased)) == pytest.approx(base, abs=1e-5)
  assert float(analysis.linear_cka(7.5 * x, 0.01 * y, debiased=debiased)) == pytest.approx(
      base, abs=1e-5)
  shifted = x + np.random.default_rng(4).normal(size=(1, x.shape[1])).astype(np.float32) * 3
  assert float(analysis.linear_cka(shifted, y, debiased=debiased)) == pytest.approx(base, abs=1e-4)


def test_cka_is_not_invariant_to_invertible_linear_maps():
  x, y = low_rank(300)
  base = float(analysis.linear_cka(x, y))
  # An invertible, badly conditioned map: stretches the directions a random subspace spans.
  a = np.diag(np.geomspace(1e-2, 1e2, x.shape[1])).astype(np.float32) @ orthogonal(x.shape[1], 5)
  assert np.linalg.matrix_rank(a) == x.shape[1]
  changed = float(analysis.linear_cka(x @ a, y))
  assert abs(changed - base) > 0.1, (base, changed)
  # Whitening X makes every invertible map of it look the same to linear CKA: a (non-)invariance
  # that is the reason CKA, unlike CCA, still tells representations apart when p is large.


@pytest.mark.parametrize('debiased', [True, False])
def test_gram_and_feature_forms_agree(debiased):
  x, y = low_rank(64, dims=(300, 200))      # p > n: the Gram form is used
  k, l = analysis.gram_linear(x), analysis.gram_linear(y)
  via_gram = analysis.hsic(k, l, debiased=debiased) / jnp.sqrt(
      analysis.hsic(k, k, debiased=debiased) * analysis.hsic(l, l, debiased=debiased))
  via_features = analysis._hsic_features(analysis._centre(jnp.asarray(x)),
                                         analysis._centre(jnp.asarray(y)), debiased)
  selfx = analysis._hsic_features(*[analysis._centre(jnp.asarray(x))] * 2, debiased)
  selfy = analysis._hsic_features(*[analysis._centre(jnp.asarray(y))] * 2, debiased)
  assert float(via_features / jnp.sqrt(selfx * selfy)) == pytest.approx(float(via_gram), abs=1e-5)
  assert float(analysis.linear_cka(x, y, debiased=debiased)) == pytest.approx(float(via_gram),
                                                                              abs=1e-5)


def test_biased_form_is_kornblith():
  x, y = low_rank(100)
  xc, yc = x - x.mean(0), y - y.mean(0)
  norm = np.linalg.norm
  expected = norm(yc.T @ xc) ** 2 / (norm(xc.T @ xc) * norm(yc.T @ yc))
  assert float(analysis.linear_cka(x, y, debiased=False)) == pytest.approx(expected, rel=1e-4)


def test_unbiased_hsic_matches_song_et_al_in_float64():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
  k, l = x @ x.T, y @ y.T
  n = 12
  kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
  one = np.ones(n)
  expected = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
              - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))
  # The raw (uncentred) Grams: HSIC_1 is translation invariant, so centring is not needed.
  assert float(analysis.hsic(jnp.asarray(k, jnp.float32), jnp.asarray(l, jnp.float32))) == \
      pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_minibatch_equals_full_batch_with_one_batch():
  x, y = low_rank(256)
  full = float(analysis.linear_cka(x, y))
  cka = analysis.MinibatchCKA(2, 1)
  cka.update([x, y], [y])
  result = cka.result()
  assert result.shape == (2, 1)
  assert result[0, 0] == pytest.approx(full, abs=1e-5)
  assert result[1, 0] == pytest.approx(1.0, abs=1e-5)
  within = analysis.MinibatchCKA(2)
  within.update([x, y])
  assert np.allclose(within.result(), [[1, full], [full, 1]], atol=1e-5)


def test_minibatch_close_to_full_batch_on_structured_data():
  x, y = low_rank(4096, rank=6, noise=1.0, seed=2)
  full = float(analysis.linear_cka(x, y))
  cka = analysis.MinibatchCKA(1, 1)
  for start in range(0, len(x), 256):
    cka.update([x[start:start + 256]], [y[start:start + 256]])
  assert cka.batches == 16
  assert abs(cka.result()[0, 0] - full) < 0.02, (cka.result(), full)
  # The biased estimator averaged over batches of 256 is off by more: the reason for HSIC_1.
  biased_full = float(analysis.linear_cka(x, y, debiased=False))
  biased = analysis.MinibatchCKA(1, 1, debiased=False)
  for start in range(0, len(x), 64):
    biased.update([x[start:start + 64]], [y[start:start + 64]])
  assert abs(biased.result()[0, 0] - biased_full) > abs(cka.result()[0, 0] - full)


def test_minibatch_on_conv_features():
  """Features of a small random conv net: minibatches of 128 against the full set."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(1024, 8, 8, 3)).astype(np.float32)
  images += np.linspace(0, 2, 8)[None, :, None, None] * rng.normal(size=(1024, 1, 1, 1))
  w1 = jnp.asarray(rng.normal(size=(3, 3, 3, 16)) / 5, jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(3, 3, 16, 16)) / 12, jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h1 = jax.nn.relu(conv(images, w1))
  h2 = jax.nn.relu(conv(h1, w2))
  full = float(analysis.linear_cka(h1, h2))
  cka = analysis.MinibatchCKA(1, 1)
  for start in range(0, 1024, 128):
    cka.update([h1[start:start + 128]], [h2[start:start + 128]])
  assert abs(cka.result()[0, 0] - full) < 0.02, (cka.result(), full)


def test_minibatch_mask_ignores_padding():
  x, y = low_rank(100)
  pad = lambda a: np.concatenate([a, np.random.default_rng(9).normal(size=(28, a.shape[1]))])
  mask = np.arange(128) < 100
  masked = analysis.MinibatchCKA(1, 1)
  masked.update([pad(x)], [pad(y)], mask=mask)
  plain = analysis.MinibatchCKA(1, 1)
  plain.update([x], [y])
  assert masked.result()[0, 0] == pytest.approx(plain.result()[0, 0], abs=1e-5)
  assert masked.weight == 100


def test_minibatch_errors():
  cka = analysis.MinibatchCKA(2, 1)
  with pytest.raises(ValueError):
    cka.result()
  with pytest.raises(ValueError):
    cka.update([np.zeros((8, 3))], [np.zeros((8, 3))])   # one layer where two were declared
  with pytest.raises(ValueError):
    cka.update([np.ones((8, 3))] * 2)                      # ys missing


def test_pool_to_size():
  x = jnp.ones((2, 16, 16, 8))
  assert analysis.pool_to_size(x, 16 * 16 * 8).shape == x.shape
  assert analysis.pool_to_size(x, 1000).shape == (2, 8, 8, 8)
  assert float(analysis.pool_to_size(jnp.arange(16.0).reshape(1, 4, 4, 1), 4)[0, 0, 0, 0]) == 2.5
  assert analysis.pool_to_size(x, 512).shape == (2, 8, 8, 8)
  assert analysis.pool_to_size(x, 100).shape == (2, 2, 2, 8)
  assert analysis.pool_to_size(jnp.ones((2, 5)), 1).shape == (2, 5)


# --- error consistency ----------------------------------------------------------------------------

def test_kappa_is_zero_for_independent_classifiers():
  rng = np.random.default_rng(0)
  trials, n = 2000, 500
  a = rng.random((trials, n)) < 0.7
  b = rng.random((trials, n)) < 0.85
  kappas = np.array([analysis.error_consistency(a[i], b[i]) for i in range(trials)])
  # Each kappa has a standard deviation of about 1 / sqrt(n) = 0.045; the mean of 2,000 of them
  # about 0.001, plus an O(1/n) bias from the estimated accuracies.
  assert abs(kappas.mean()) < 0.005, kappas.mean()
  assert 0.02 < kappas.std() < 0.08


def test_kappa_identical_opposite_and_degenerate():
  rng = np.random.default_rng(1)
  a = rng.random(1000) < 0.6
  assert analysis.error_consistency(a, a) == pytest.approx(1.0)
  half = np.arange(100) < 50
  assert analysis.error_consistency(half, ~half) == pytest.approx(-1.0)
  # Both always right (or always wrong): c_exp = 1, kappa undefined.
  assert np.isnan(analysis.error_consistency(np.ones(10, bool), np.ones(10, bool)))
  assert np.isnan(analysis.error_consistency(np.zeros(10, bool), np.zeros(10, bool)))
  # One always right, the other always wrong: c_exp = 0, c_obs = 0 -> 0.
  assert analysis.error_consistency(np.ones(10, bool), np.zeros(10, bool)) == 0.0
  # Hand-computed: p_a = 0.5, p_b = 0.75, c_obs = 0.75, c_exp = 0.5 -> kappa = 0.5.
  assert analysis.error_consistency([1, 1, 0, 0], [1, 1, 1, 0]) == pytest.approx(0.5)
  m = analysis.error_consistency_matrix([half, half, ~half])
  assert np.allclose(m, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
  with pytest.raises(ValueError):
    analysis.error_consistency([1, 0], [1])


# --- shape bias -----------------------------------------------------------------------------------

def test_shape_bias_hand_made():
  shape = np.array([0, 1, 2, 3, 4, 5])
  texture = np.array([1, 2, 3, 4, 5, 0])
  pred = np.array([0, 1, 3, 4, 9, 9])     # 2 shape, 2 texture, 2 neither
  r = analysis.shape_bias(pred, shape, texture)
  assert (r.shape_decisions, r.texture_decisions, r.total) == (2, 2, 6)
  assert r.shape_bias == 0.5
  assert r.shape_accuracy == pytest.approx(1 / 3) and r.texture_accuracy == pytest.approx(1 / 3)
  assert analysis.shape_bias([0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]).shape_bias == 0.75
  assert np.isnan(analysis.shape_bias([7], [0], [1]).shape_bias)
  assert set(r.to_dict()) >= {'shape_bias', 'shape_accuracy', 'texture_accuracy', 'total'}
  with pytest.raises(ValueError):
    analysis.shape_bias([0], [1], [1])


# --- cue-conflict images --------------------------------------------------------------------------

def synthetic_objects(m=60, size=28, classes=4, seed=0):
  """Objects on a black background: class k has its own shape and its own stripe texture."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  images = np.zeros((m, size, size, 1), np.uint8)
  labels = np.arange(m) % classes
  for i, k in enumerate(labels):
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    r = size * (0.25 + 0.05 * k)
    inside = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * (0.6 + 0.2 * k))) ** 2 < 1
    texture = 120 + 100 * (((xx + k * yy) // (k + 2)) % 2)
    images[i, ..., 0] = np.where(inside, texture, 0)
  images[0, 12:15, 12:15] = 0   # a dark hole inside an object: part of its silhouette
  return images, labels


def test_foreground_mask_fills_holes():
  images, _ = synthetic_objects()
  raw = analysis.foreground_mask(images[:1], fill_holes=False)[0]
  filled = analysis.foreground_mask(images[:1])[0]
  assert not raw[13, 13] and filled[13, 13]
  assert not filled[0, 0] and filled.sum() > raw.sum()


def test_cue_conflict_set_is_deterministic_and_well_formed():
  images, labels = synthetic_objects()
  a = analysis.cue_conflict_set(images, labels, num=40, seed=3)
  b = analysis.cue_conflict_set(images, labels, num=40, seed=3)
  c = analysis.cue_conflict_set(images, labels, num=40, seed=4)
  for field in ('image', 'shape_label', 'texture_label', 'shape_index', 'texture_index', 'patch'):
    assert np.array_equal(getattr(a, field), getattr(b, field))
  assert not np.array_equal(a.image, c.image)
  assert a.image.shape == (40, 28, 28, 1) and a.image.dtype == np.uint8
  assert np.all(a.shape_label != a.texture_label)
  assert np.array_equal(a.shape_label, labels[a.shape_index])
  assert np.array_equal(a.texture_label, labels[a.texture_index])
  assert np.array_equal(np.bincount(a.shape_label), [10, 10, 10, 10])   # balanced shapes
  for i in range(40):
    silhouette = analysis.foreground_mask(images[a.shape_index[i]][None])[0]
    assert np.all(a.image[i][~silhouette] == 0)                     # background kept
    source = images[a.texture_index[i], ..., 0]
    y0, x0 = a.patch[i]
    patch_values = set(np.unique(source[y0:y0 + 8, x0:x0 + 8]))
    assert a.patch_size == 8
    assert set(np.unique(a.image[i][silhouette])) <= patch_values   # texture from B's patch
    assert 0 not in patch_values                                     # a foreground patch


def test_cue_conflict_set_on_rgb_and_bad_input():
  images, labels = synthetic_objects(m=20, size=32, classes=4)
  rgb = np.repeat(images, 3, axis=-1)
  out = analysis.cue_conflict_set(rgb, labels, num=6, seed=0)
  assert out.image.shape == (6, 32, 32, 3)
  small, two = synthetic_objects(m=20, size=32, classes=2)   # class 0 too thin for a 9x9 patch
  with pytest.raises(ValueError, match='foreground window'):
    analysis.cue_conflict_set(small, two, num=2)
  with pytest.raises(ValueError):
    analysis.cue_conflict_set(images.astype(np.float32), labels, num=2)
  with pytest.raises(ValueError):
    analysis.cue_conflict_set(images, np.zeros(20), num=2)
