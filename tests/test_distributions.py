"""The random augmentations by their distributions: for each random transform, many draws checked
against the marginals and joints its definition implies. The stateless RNG of
experiments/data/augment.py gives the parameters of any number of examples (`example_keys(seed,
positions)`); Mixup / CutMix (experiments.training.mixing) and DropPath are drawn under jit over
many keys. Bounds and single draws are tests/test_augment.py's, test_mixing.py's and
test_droppath.py's; here it is the shape of the distributions.

Tolerances: a rate or a mean is checked to 6 standard errors of its n draws; a histogram by
Pearson's chi-square against the exact cell probabilities (cells expected below 5 pooled into one),
failing at p < 1e-9 (about 6 sigma); a correlation that should be 0 to 6 / sqrt(n). The seeds are
fixed, so a test gives the same answer every run; the draws are enough that each deliberate bug of
tests/mutations.toml (a wrong rate, two draws made dependent, a range cut off) fails by far.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments.data import augment as A
from experiments.training.mixing import mix
from modernize.layers import DropPath

P_FAIL = 1e-9   # chi-square p-values below this fail (about 6 sigma)
SIGMAS = 6.0


# --- statistics -----------------------------------------------------------------------------------

def assert_counts_fit(observed, probabilities, what: str) -> None:
  """Pearson's chi-square of `observed` counts against cell `probabilities` (summing to 1); cells
  expected below 5 are pooled. An outcome of probability 0 that occurs fails at once."""
  observed = np.asarray(observed, np.float64).ravel()
  p = np.asarray(probabilities, np.float64).ravel()
  assert observed.shape == p.shape and abs(p.sum() - 1.0) < 1e-9, (what, p.sum())
  impossible = (p == 0) & (observed > 0)
  assert not impossible.any(), f'{what}: {int(observed[impossible].sum())} impossible outcomes'
  n = observed.sum()
  expected = n * p
  small = expected < 5
  if small.any():
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  keep = expected > 0
  observed, expected = observed[keep], expected[keep]
  stat = float(((observed - expected) ** 2 / expected).sum())
  df = len(observed) - 1
  p_value = float(stats.chi2.sf(stat, df))
  assert p_value > P_FAIL, f'{what}: chi-square {stat:.1f} on {df} df, p = {p_value:.2g}'


def assert_histogram(values, edges, cdf, what: str) -> None:
  """`values` binned at `edges` (the outer bins take what rounding puts past the ends) against
  the probabilities of a distribution with `cdf` (0 at edges[0], 1 at edges[-1])."""
  bins = np.clip(np.searchsorted(edges, values, side='right') - 1, 0, len(edges) - 2)
  counts = np.bincount(bins, minlength=len(edges) - 1)
  probabilities = np.diff([cdf(e) for e in edges])
  assert_counts_fit(counts, probabilities / probabilities.sum(), what)


def assert_rate(hits, p: float, what: str) -> None:
  hits = np.asarray(hits, bool)
  n = hits.size
  se = math.sqrt(p * (1 - p) / n)
  assert abs(hits.mean() - p) < SIGMAS * se, f'{what}: {hits.mean():.4f} vs {p:.4f} (se {se:.2g})'


def assert_mean(values, mean: float, sd: float, what: str) -> None:
  values = np.asarray(values, np.float64)
  se = sd / math.sqrt(values.size)
  assert abs(values.mean() - mean) < SIGMAS * se, f'{what}: {values.mean():.4f} vs {mean:.4f}'


def assert_uncorrelated(a, b, what: str) -> None:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  r = float(np.corrcoef(a, b)[0, 1])
  assert abs(r) < SIGMAS / math.sqrt(a.size), f'{what}: correlation {r:.4f} over {a.size} draws'


def assert_pairs_independent(a, b, pa, pb, what: str) -> None:
  """Discrete draws `a` (values 0..len(pa)-1) and `b`, each with its own law, jointly the product
  law: the joint histogram tests both marginals and their independence."""
  k = len(pb)
  counts = np.bincount(np.asarray(a) * k + np.asarray(b), minlength=len(pa) * k)
  assert_counts_fit(counts, np.outer(pa, pb), what)


def position_cdf_counts(positions, sizes, extent: int, bins: int = 10):
  """Observed and expected counts of box positions, normalised to [0, 1) as (top + 0.5) /
  (extent - size + 1), in `bins` equal bins; expected from a uniform integer top over
  0..extent - size, box by box (exact, however few positions a large box has)."""
  slots = extent - np.asarray(sizes, np.int64) + 1
  assert (slots >= 1).all()
  normalised = (np.asarray(positions) + 0.5) / slots
  observed = np.bincount(np.minimum((normalised * bins).astype(np.int64), bins - 1),
                         minlength=bins)
  edges = np.arange(bins + 1) / bins
  # integer tops k with (k + 0.5) / slots < e: k < e * slots - 0.5
  below = np.clip(np.ceil(edges[:, None] * slots[None, :] - 0.5), 0, slots[None, :])
  expected = (np.diff(below, axis=0) / slots[None, :]).sum(1)
  return observed, expected / expected.sum(), normalised


# --- random-resized crop --------------------------------------------------------------------------

RRC_SIDE = 4096   # large, so that rounding the box to whole pixels moves area and aspect by < 1e-3
RRC_LOG_RATIO = math.log(4 / 3)
RRC_SCALE = (0.08, 1.0)


def _rrc_area_cdf(x):
  """Area fraction s of the accepted draws: uniform (s, log aspect u) on s in (0.08, 1), |u| <=
  log(4/3), kept where the box fits (s * e^|u| <= 1, i.e. s <= e^-|u|); the density of s is the
  length of its u-interval, 2 min(log(4/3), -log s). Unnormalised CDF."""
  a, lo = RRC_LOG_RATIO, RRC_SCALE[0]
  knee = math.exp(-a)   # 3/4
  out = 2 * a * (min(x, knee) - lo)
  if x > knee:
    out += 2 * ((x - x * math.log(x)) - (knee - knee * math.log(knee)))
  return out


def _rrc_log_aspect_cdf(x):
  """log aspect u of the accepted draws: density e^-|u| - 0.08 on |u| <= log(4/3).
  Unnormalised CDF."""
  a, lo = RRC_LOG_RATIO, RRC_SCALE[0]
  if x <= 0:
    out = math.exp(x) - math.exp(-a)
  else:
    out = (1 - math.exp(-a)) + (1 - math.exp(-x))
  return out - lo * (x + a)


@pytest.fixture(scope='module')
def rrc_boxes():
  keys = A.example_keys(11, np.arange(40000))
  return A.random_resized_crop_boxes(keys, RRC_SIDE, RRC_SIDE)


def test_random_resized_crop_area_and_aspect(rrc_boxes):
  """The first accepted of (area, log aspect) draws, each uniform and independent: uniform on
  the accepted region, so each marginal is the region's exact one and, where every aspect fits
  (area <= 3/4), the two are uniform and independent."""
  top, left, h, w = rrc_boxes.T
  s = h * w / RRC_SIDE ** 2
  u = np.log(w / h)
  a = RRC_LOG_RATIO
  total = _rrc_area_cdf(1.0)
  assert abs(total - (_rrc_log_aspect_cdf(a) - _rrc_log_aspect_cdf(-a))) < 1e-12
  assert_histogram(s, np.linspace(0.08, 1.0, 21), lambda x: _rrc_area_cdf(x) / total, 'area')
  assert_histogram(u, np.linspace(-a, a, 21),
                   lambda x: (_rrc_log_aspect_cdf(x) - _rrc_log_aspect_cdf(-a)) / total,
                   'log aspect')
  inner = s <= 0.75
  assert_rate(inner, (0.75 - 0.08) * 2 * a / total, 'share of area <= 3/4')
  # Inside the rectangle every draw fits: a 10 x 10 grid of it is uniform.
  si = np.clip(((s[inner] - 0.08) / (0.75 - 0.08) * 10).astype(int), 0, 9)
  ui = np.clip(((u[inner] + a) / (2 * a) * 10).astype(int), 0, 9)
  assert_pairs_independent(si, ui, np.full(10, 0.1), np.full(10, 0.1), 'area x log aspect')
  assert_uncorrelated(s[inner], u[inner], 'area and log aspect')
  assert_uncorrelated(s[inner], np.abs(u[inner]), 'area and |log aspect|')


def test_random_resized_crop_position(rrc_boxes):
  """The box's top-left corner uniform over the positions that keep it inside, independently in
  each axis and of the box's size."""
  top, left, h, w = rrc_boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= RRC_SIDE).all() and (left + w <= RRC_SIDE).all()
  observed, p, ty = position_cdf_counts(top, h, RRC_SIDE)
  assert_counts_fit(observed, p, 'top')
  observed, p, tx = position_cdf_counts(left, w, RRC_SIDE)
  assert_counts_fit(observed, p, 'left')
  assert_uncorrelated(ty, tx, 'top and left')
  assert_uncorrelated(ty, h * w, 'top and area')
  assert_uncorrelated(tx, w / h, 'left and aspect')


# --- pad-and-crop ---------------------------------------------------------------------------------

def test_pad_crop_offsets_uniform_and_independent():
  """Offsets uniform over 0..2 * pad in each axis, the two independent (a joint 7 x 7 grid)."""
  pad, n, side = 3, 9800, 8
  x = (np.arange(side * side) + 1).astype(np.uint8).reshape(1, side, side, 1).repeat(n, 0)
  out = A.random_crop_pad(x, A.example_keys(3, np.arange(n)), pad)
  # The offset from the first original pixel in the output (values 1..64 are unique).
  flat = out.reshape(n, -1)
  first = np.argmax(flat > 0, axis=1)
  i, j = np.divmod(first, side)
  r, c = np.divmod(flat[np.arange(n), first].astype(np.int64) - 1, side)
  oy, ox = r + pad - i, c + pad - j
  padded = np.pad(x[0, :, :, 0], pad)
  windows = np.lib.stride_tricks.sliding_window_view(padded, (side, side))
  np.testing.assert_array_equal(out[..., 0], windows[oy, ox])   # every image is that window
  k = 2 * pad + 1
  assert oy.min() >= 0 and ox.min() >= 0 and oy.max() < k and ox.max() < k
  assert_pairs_independent(oy, ox, np.full(k, 1 / k), np.full(k, 1 / k), 'offsets (y, x)')


# --- flip -----------------------------------------------------------------------------------------

def test_flip_rate_half_and_independent_across_images():
  n = 100000
  flip = A.flip_mask(A.example_keys(5, np.arange(n))).astype(np.int64)
  assert_rate(flip, 0.5, 'flip rate')
  half = np.array([0.5, 0.5])
  for lag in (1, 32, 1000):   # neighbours, a batch apart, far apart
    assert_pairs_independent(flip[:-lag], flip[lag:], half, half, f'flips {lag} apart')
  other_seed = A.flip_mask(A.example_keys(6, np.arange(n))).astype(np.int64)
  assert_pairs_independent(flip, other_seed, half, half, 'flips under two seeds')


# --- RandAugment ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def randaugment_draws():
  keys = A.example_keys(7, np.arange(20000))
  return A.randaugment_params(keys, 2, 5.0, 2.0, 0.3)


def test_randaugment_op_uniform_and_layers_independent(randaugment_draws):
  op, applied, _, negate = randaugment_draws
  k = len(A.RANDAUGMENT_OP_NAMES)
  uniform_op = np.full(k, 1 / k)
  for layer in range(2):
    counts = np.bincount(op[:, layer], minlength=k)
    assert counts.min() > 0, f'layer {layer}: op(s) never drawn: {np.flatnonzero(counts == 0)}'
    assert_counts_fit(counts, uniform_op, f'op of layer {layer}')
  # The two layers' draws, jointly: ops, applied flags, negations, magnitudes.
  assert_pairs_independent(op[:, 0], op[:, 1], uniform_op, uniform_op, 'ops of the two layers')
  p = np.array([0.7, 0.3])
  assert_pairs_independent(applied[:, 0], applied[:, 1], p, p, 'applied, two layers')
  half = np.array([0.5, 0.5])
  assert_pairs_independent(negate[:, 0], negate[:, 1], half, half, 'negate, two layers')
  # Within a layer: which op, whether applied, whether negated are independent.
  assert_pairs_independent(op[:, 0], applied[:, 0], uniform_op, p, 'op x applied')
  assert_pairs_independent(op[:, 0], negate[:, 0], uniform_op, half, 'op x negate')


def test_randaugment_applied_and_negate_rates(randaugment_draws):
  _, applied, _, negate = randaugment_draws
  assert_rate(applied, 0.3, 'applied rate (prob 0.3)')
  assert_rate(negate, 0.5, 'negate rate')


@pytest.mark.parametrize('m, mstd', [(5.0, 2.0), (9.0, 0.5)])
def test_randaugment_magnitude_is_a_clipped_normal(m, mstd):
  """N(m, mstd) clipped to [0, 10]: atoms at 0 and 10 of the normal's tail mass, and between them
  the normal itself (20 bins of equal normal probability); the two layers' magnitudes
  uncorrelated."""
  keys = A.example_keys(8, np.arange(20000))
  _, _, mag, _ = A.randaugment_params(keys, 2, m, mstd, 0.5)
  assert mag.min() >= 0 and mag.max() <= A.MAX_LEVEL
  lo, hi = stats.norm.cdf((0 - m) / mstd), stats.norm.cdf((A.MAX_LEVEL - m) / mstd)
  for layer in range(2):
    v = mag[:, layer]
    q = stats.norm.cdf((v - m) / mstd)
    inner = (v > 0) & (v < A.MAX_LEVEL)
    bins = np.clip(((q[inner] - lo) / (hi - lo) * 20).astype(int), 0, 19)
    counts = np.concatenate([[(v == 0).sum()], np.bincount(bins, minlength=20),
                             [(v == A.MAX_LEVEL).sum()]])
    assert_counts_fit(counts, np.concatenate([[lo], np.full(20, (hi - lo) / 20), [1 - hi]]),
                      f'magnitude of layer {layer} (m={m}, mstd={mstd})')
  assert_uncorrelated(mag[:, 0], mag[:, 1], 'magnitudes of the two layers')


# --- Random Erasing -------------------------------------------------------------------------------

ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG = math.log(1 / 0.3)


def _erase_area_density_cdf(x):
  """Area fraction s of the accepted draws: uniform (s, log aspect u) on s in (0.02, 1/3),
  |u| <= log(1/0.3), kept where the box fits (s * e^|u| < 1); the density of s is
  2 min(log(1/0.3), -log s). Unnormalised CDF."""
  b, lo = ERASE_LOG, ERASE_AREA[0]
  knee = math.exp(-b)   # 0.3
  out = 2 * b * (min(x, knee) - lo)
  if x > knee:
    out += 2 * ((x - x * math.log(x)) - (knee - knee * math.log(knee)))
  return out


def _erase_log_aspect_cdf(x):
  """log aspect u of the accepted draws: density min(1/3, e^-|u|) - 0.02 on |u| <= log(1/0.3).
  Unnormalised CDF, by quadrature (the density is piecewise smooth)."""
  b, (lo, hi) = ERASE_LOG, ERASE_AREA
  grid = np.linspace(-b, x, 20001)
  density = np.minimum(hi, np.exp(-np.abs(grid))) - lo
  return float(np.trapezoid(density, grid)) if x > -b else 0.0


def test_erasing_area_aspect_and_rate():
  """timm's RandomErasing draw: the first of 10 (area, log aspect) draws that fits, erased with
  probability `prob`; area and log aspect have the accepted region's exact marginals, the log
  aspect is symmetric (eh / ew and ew / eh alike), and the box lies inside the image."""
  side, n, prob = 1024, 40000, 0.3
  keys = A.example_keys(9, np.arange(n))
  boxes, erase = A.erasing_boxes(keys, side, side, prob)
  top, left, eh, ew = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + eh <= side).all() and (left + ew <= side).all()
  s = eh * ew / side ** 2
  u = np.log(eh / ew)
  b = ERASE_LOG
  total = _erase_area_density_cdf(ERASE_AREA[1])
  assert abs(total - _erase_log_aspect_cdf(b)) < 1e-6
  assert_histogram(s, np.linspace(*ERASE_AREA, 21), lambda x: _erase_area_density_cdf(x) / total,
                   'erased area')
  assert_histogram(u, np.linspace(-b, b, 21), lambda x: _erase_log_aspect_cdf(x) / total,
                   'erased log aspect')
  # Symmetric: log aspect has mean 0 (its sd is at most log(1/0.3)).
  assert_mean(u, 0.0, b, 'mean log aspect')
  inner = s <= 0.3   # every aspect fits: uniform and independent there
  si = np.clip(((s[inner] - 0.02) / (0.3 - 0.02) * 8).astype(int), 0, 7)
  ui = np.clip(((u[inner] + b) / (2 * b) * 8).astype(int), 0, 7)
  assert_pairs_independent(si, ui, np.full(8, 1 / 8), np.full(8, 1 / 8), 'area x log aspect')
  observed, p, _ = position_cdf_counts(top, eh, side)
  assert_counts_fit(observed, p, 'erased top')
  observed, p, _ = position_cdf_counts(left, ew, side)
  assert_counts_fit(observed, p, 'erased left')
  # The rate: prob times the chance that one of 10 draws fits.
  fits = total / ((ERASE_AREA[1] - ERASE_AREA[0]) * 2 * b)
  assert_rate(erase, prob * (1 - (1 - fits) ** 10), 'erase rate')


def test_erasing_boxes_at_32_pixels_within_their_ranges_up_to_rounding():
  """At the trainer's 32x32: some real area in (0.02, 1/3) and aspect eh / ew in (0.3, 1/0.3)
  rounds to every box drawn (eh = round(sqrt(area * aspect)), ew = round(sqrt(area / aspect)))."""
  side = 32
  boxes, erase = A.erasing_boxes(A.example_keys(10, np.arange(20000)), side, side, 1.0)
  top, left, eh, ew = boxes.T.astype(np.float64)
  assert erase.all() and (eh > 0).all() and (ew > 0).all()
  assert (top + eh <= side).all() and (left + ew <= side).all()
  # area in [(eh - .5)(ew - .5), (eh + .5)(ew + .5)], aspect in [(eh - .5)/(ew + .5), ...]
  total = side * side
  assert ((eh + 0.5) * (ew + 0.5) >= ERASE_AREA[0] * total).all()
  assert ((eh - 0.5) * (ew - 0.5) <= ERASE_AREA[1] * total).all()
  assert ((eh + 0.5) / (ew - 0.5) >= 0.3).all() and ((eh - 0.5) / (ew + 0.5) <= 1 / 0.3).all()
  # Both orientations occur.
  assert (eh > ew).mean() > 0.3 and (eh < ew).mean() > 0.3


# --- cross-stream independence --------------------------------------------------------------------

def test_each_augmentation_draws_from_its_own_stream():
  """Crop, flip, RandAugment and erasing of one example are independent of each other."""
  n = 20000
  keys = A.example_keys(12, np.arange(n))
  top, left, h, w = A.random_resized_crop_boxes(keys, 64, 64).T
  flip = A.flip_mask(keys)
  op, applied, mag, negate = A.randaugment_params(keys, 1, 5.0, 2.0, 0.5)
  boxes, erase = A.erasing_boxes(keys, 64, 64, 0.5)
  draws = {'crop area': h * w, 'crop aspect': np.log(w / h), 'crop top': top, 'flip': flip,
           'op': op[:, 0], 'applied': applied[:, 0], 'magnitude': mag[:, 0],
           'negate': negate[:, 0], 'erase': erase, 'erase area': boxes[:, 2] * boxes[:, 3],
           'erase top': boxes[:, 0]}
  stream = {'crop': 'crop', 'flip': 'flip', 'op': 'ra', 'applied': 'ra', 'magnitude': 'ra',
            'negate': 'ra', 'erase': 'erase'}
  names = list(draws)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      if stream.get(a.split()[0]) != stream.get(b.split()[0]):
        assert_uncorrelated(draws[a], draws[b], f'{a} and {b}')


# --- Mixup and CutMix -----------------------------------------------------------------------------

MIX_H, MIX_W = 8, 12
LABELS = jnp.arange(4, dtype=jnp.int32)
# Image i is the constant i + 1: every pixel differs from its mirror's (4 - i).
MIX_IMAGES = jnp.broadcast_to(jnp.arange(1.0, 5.0)[:, None, None, None], (4, MIX_H, MIX_W, 1))


def mix_draws(n, seed=0, **kwargs):
  """(images (n, 4, H, W, 1), targets (n, 4, 10)) of `n` keys, under jit (as in the train step)."""
  run = jax.jit(jax.vmap(lambda k: mix(k, MIX_IMAGES, LABELS, num_classes=10, **kwargs)))
  images, targets = run(jax.random.split(jax.random.key(seed), n))
  return np.asarray(images), np.asarray(targets)


def test_mixup_lambda_is_beta():
  """Mixup's lam ~ Beta(alpha, alpha): 20 bins of equal probability, mean 1/2, variance
  1 / (4 (2 alpha + 1)); the image is lam x + (1 - lam) mirror. CutMix's alpha set as well (and
  never switched to), so that the two alphas cannot stand in for each other."""
  alpha, n = 0.8, 8000
  images, targets = mix_draws(n, mixup_alpha=alpha, cutmix_alpha=1.0, switch_prob=0.0)
  lam = targets[:, 0, 0].astype(np.float64)    # image 0's own label; its mirror's is label 3
  np.testing.assert_allclose(targets[:, 0, 3], 1 - lam, atol=1e-6)
  np.testing.assert_allclose(images[:, 0, 0, 0, 0], lam * 1 + (1 - lam) * 4, rtol=1e-5)
  beta = stats.beta(alpha, alpha)
  assert_histogram(lam, beta.ppf(np.linspace(0, 1, 21)), beta.cdf, 'Mixup lam')
  sd = math.sqrt(beta.var())
  assert_mean(lam, 0.5, sd, 'Mixup lam mean')
  # The sample variance: its standard error is sqrt((mu4 - sigma^4) / n).
  mu4 = (beta.stats(moments='k') + 3) * beta.var() ** 2
  se = math.sqrt((mu4 - beta.var() ** 2) / n)
  expected = 1 / (4 * (2 * alpha + 1))
  assert abs(lam.var() - expected) < SIGMAS * se, (lam.var(), expected)


def _cutmix_axis_law(extent: int, alpha: float, nonempty_from: float):
  """Exact law of a CutMix box's rows (or columns) [start, stop) on an axis of `extent` pixels:
  side = floor(sqrt(1 - lam) * extent), lam ~ Beta(alpha, alpha); centre uniform over the pixels;
  half-extent side // 2 each way, clipped to the image. Only draws with
  sqrt(1 - lam) >= `nonempty_from` (the box is empty below it) count. Returns {(start, stop): p}."""
  beta = stats.beta(alpha, alpha)   # the law of 1 - lam too (symmetric)
  law = {}
  for side in range(extent + 1):
    lo = max(side / extent, nonempty_from)
    hi = min((side + 1) / extent, 1.0)
    if hi <= lo:
      continue
    p_side = beta.cdf(hi ** 2) - beta.cdf(lo ** 2)
    for centre in range(extent):
      start = min(max(centre - side // 2, 0), extent)
      stop = min(max(centre + side // 2, 0), extent)
      law[start, stop] = law.get((start, stop), 0.0) + p_side / extent
  return law


def test_cutmix_box_law_edges_and_exact_lambda():
  """CutMix's box: lam is exactly 1 - the pasted fraction; the pasted pixels are one rectangle
  whose rows and columns follow the exact law of a box of side sqrt(1 - lam) centred uniformly and
  clipped: boxes at every edge of the image, clipped there, as often as that law says."""
  alpha, n = 1.0, 8000
  images, targets = mix_draws(n, seed=1, mixup_alpha=0.0, cutmix_alpha=alpha)
  pasted = images[:, 0, :, :, 0] == 4.0           # image 0 (ones) took its mirror's pixels (4s)
  assert np.all(pasted | (images[:, 0, :, :, 0] == 1.0))
  lam = targets[:, 0, 0]
  np.testing.assert_allclose(lam, 1.0 - pasted.mean(axis=(1, 2)), atol=1e-6)
  rows, cols = pasted.any(2), pasted.any(1)
  nonempty = rows.any(1)
  y0, y1 = np.argmax(rows, 1), MIX_H - np.argmax(rows[:, ::-1], 1)
  x0, x1 = np.argmax(cols, 1), MIX_W - np.argmax(cols[:, ::-1], 1)
  # A rectangle: every pixel of its bounding box pasted.
  area = (y1 - y0) * (x1 - x0)
  np.testing.assert_array_equal(pasted.sum((1, 2))[nonempty], area[nonempty])
  threshold = 2 / min(MIX_H, MIX_W)   # both half-sides >= 1 from sqrt(1 - lam) >= 2 / min side
  p_empty = stats.beta(alpha, alpha).cdf(threshold ** 2)
  for name, (start, stop, extent) in {'rows': (y0, y1, MIX_H), 'columns': (x0, x1, MIX_W)}.items():
    law = _cutmix_axis_law(extent, alpha, threshold)
    cells = sorted(law)
    index = {c: i for i, c in enumerate(cells)}
    observed = np.zeros(len(cells) + 1)
    observed[-1] = (~nonempty).sum()
    for a, b in zip(start[nonempty], stop[nonempty]):
      assert (int(a), int(b)) in index, f'{name}: box {a}..{b} impossible'
      observed[index[int(a), int(b)]] += 1
    probabilities = np.append([law[c] for c in cells], p_empty)
    assert_counts_fit(observed, probabilities, f'CutMix box {name}')
    # Each edge: boxes reaching it (clipped there, mostly) occur, at the law's rate.
    for edge, hits in (('first', start == 0), ('last', stop == extent)):
      p_edge = sum(p for (a, b), p in law.items() if (a == 0 if edge == 'first' else b == extent))
      assert (hits & nonempty).any(), f'no box reaches the {edge} of the {name}'
      assert_rate(hits & nonempty, p_edge, f'boxes at the {edge} of the {name}')
  assert_rate(~nonempty, p_empty, 'empty boxes')


def test_switch_and_mix_probabilities():
  """CutMix is chosen at rate switch_prob (images copied, never blended), mixing applied at rate
  mix_prob (otherwise the batch and its one-hot targets are left as they are)."""
  n = 4000
  images, _ = mix_draws(n, seed=2, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.3)
  first = images[:, 0, :, :, 0]
  blended = ~np.all((first == 1.0) | (first == 4.0), axis=(1, 2))
  assert_rate(~blended, 0.3, 'CutMix rate (switch_prob 0.3)')
  images, targets = mix_draws(n, seed=3, mixup_alpha=0.8, cutmix_alpha=0.0, mix_prob=0.7)
  untouched = np.all(images == np.asarray(MIX_IMAGES)[None], axis=(1, 2, 3, 4))
  one_hot = targets[:, 0, 0] == 1.0
  np.testing.assert_array_equal(untouched, one_hot)
  assert_rate(~untouched, 0.7, 'mixing rate (mix_prob 0.7)')


# --- stochastic depth -----------------------------------------------------------------------------

def test_drop_path_drops_samples_independently_at_its_rate():
  rate, n = 0.3, 100000
  keep = 1.0 - rate
  layer = DropPath(rate)
  x = jnp.ones((n, 2, 2, 1), jnp.float32)
  outs = [np.asarray(layer(x, key=jax.random.key(k))) for k in (0, 1)]
  dropped = []
  for out in outs:
    values = np.unique(out.reshape(n, -1), axis=1)
    assert values.shape[1] == 1       # one draw per sample: all of a sample dropped, or none
    values = values[:, 0]
    kept = values != 0
    np.testing.assert_array_equal(values[kept], np.float32(1.0) / np.float32(keep))
    assert_rate(~kept, rate, 'drop rate')
    dropped.append((~kept).astype(np.int64))
  p = np.array([keep, rate])
  for lag in (1, 7):
    assert_pairs_independent(dropped[0][:-lag], dropped[0][lag:], p, p, f'samples {lag} apart')
  assert_pairs_independent(dropped[0], dropped[1], p, p, 'the same sample under two keys')
