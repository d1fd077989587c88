"""Tests for the toy problem (data/toy2d.py: exact scores, guided densities, data) and its
Figure 2 PNG (toy.py)."""

import jax
import numpy as np
import pytest
from matplotlib import image
from scipy import special
from scipy import stats

from cfg_guidance import toy
from cfg_guidance.data import toy2d

C = toy2d.NUM_CLASSES


def scipy_log_p(z, logsnr, c):
  """log p(z_λ | c) (c < C) or log p(z_λ) (c = C) in float64 from scipy's densities."""
  alpha2 = 1 / (1 + np.exp(-logsnr))
  cov = alpha2 * toy2d.STD**2 + (1 - alpha2)
  logs = [stats.multivariate_normal(np.sqrt(alpha2) * m, cov).logpdf(z) for m in toy2d.MEANS]
  return logs[c] if c < C else special.logsumexp(logs, axis=0) - np.log(C)


@pytest.mark.parametrize("logsnr", [-6.0, 0.0, 4.0])
def test_exact_eps_is_minus_sigma_times_the_score(logsnr):
  z = np.random.default_rng(0).standard_normal((4, 2)) * 1.5
  sigma = np.sqrt(1 / (1 + np.exp(logsnr)))
  h = 1e-4
  for c in range(C + 1):
    # Central finite differences of scipy's log-density: an independent gradient.
    grad = np.stack([(scipy_log_p(z + h * e, logsnr, c) - scipy_log_p(z - h * e, logsnr, c))
                     / (2 * h) for e in np.eye(2)], -1)
    got = toy2d.exact_eps(z.astype(np.float32), np.full(4, logsnr, np.float32),
                        np.full(4, c, np.int32))
    np.testing.assert_allclose(got, -sigma * grad, rtol=1e-3, atol=1e-4)


def test_log_class_posterior_is_bayes_rule():
  z = np.random.default_rng(1).standard_normal((6, 2))
  logp = np.stack([scipy_log_p(z, 1.0, c) for c in range(C)], -1)
  want = logp - special.logsumexp(logp, axis=1, keepdims=True)
  got = toy2d.log_class_posterior(z.astype(np.float32), np.full(6, 1.0, np.float32))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_unguided_density_is_the_mixture_and_integrates_to_one():
  points, _, area = toy2d.density_grid(grid_size=200, extent=5.0)
  # w = 0, unnormalized: each class must already be a density (mass outside < 1e-9).
  log_q = np.asarray(toy2d.guided_log_density(points, 0.0), np.float64)
  np.testing.assert_allclose(np.exp(log_q).sum(1) * area, 1.0, rtol=1e-4)
  want = np.stack([stats.multivariate_normal(m, toy2d.STD**2).pdf(points) for m in toy2d.MEANS])
  np.testing.assert_allclose(np.exp(log_q), want, rtol=1e-4, atol=1e-9)
  densities, axis = toy2d.guided_density(0.0, grid_size=200, extent=5.0)
  assert densities.shape == (C, 200, 200) and axis.shape == (200,)
  np.testing.assert_allclose(densities.mean(0).sum() * area, 1.0, rtol=1e-4)
  np.testing.assert_allclose(densities.reshape(C, -1), want, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_guided_density_normalizer_matches_monte_carlo(w):
  grid_size, extent = 200, 5.0
  densities, _ = toy2d.guided_density(w, grid_size=grid_size, extent=extent)
  points, _, _ = toy2d.density_grid(grid_size, extent)
  rng = np.random.default_rng(2)
  for c in range(C):
    # Z_c = E_{x ~ p(x|c)}[p(c|x)^w], estimated with plain Monte Carlo.
    x = toy2d.MEANS[c] + toy2d.STD * rng.standard_normal((200000, 2))
    logits = -0.5 * np.sum((x[:, None] - toy2d.MEANS[None])**2, -1) / toy2d.STD**2
    z_c = np.mean(special.softmax(logits, axis=1)[:, c]**w)
    logits = -0.5 * np.sum((points[:, None] - toy2d.MEANS[None])**2, -1) / toy2d.STD**2
    want = (stats.multivariate_normal(toy2d.MEANS[c], toy2d.STD**2).pdf(points)
            * special.softmax(logits, axis=1)[:, c]**w / z_c)
    peak = np.argmax(want)
    np.testing.assert_allclose(densities[c].ravel()[peak], want[peak], rtol=1e-2)
    np.testing.assert_allclose(densities[c].ravel(), want, atol=1e-2 * want.max())


def test_guidance_concentrates_the_density_away_from_other_classes():
  densities = [toy2d.guided_density(w)[0] for w in (0.0, 4.0)]
  points, _, area = toy2d.density_grid()
  # Mass of class 0 (top) below y = 0, towards the other two classes, shrinks with w.
  below = points[:, 1] < 0
  mass = [d[0].ravel()[below].sum() * area for d in densities]
  assert mass[1] < 0.5 * mass[0]


def test_sample_data_is_balanced_and_follows_the_mixture():
  x, labels = toy2d.sample_data(0, 30001)
  assert x.shape == (30001, 2) and x.dtype == np.float32 and labels.dtype == np.int32
  counts = np.bincount(labels, minlength=C)
  assert counts.max() - counts.min() <= 1
  for c in range(C):
    xc = x[labels == c].astype(np.float64)
    se = toy2d.STD / np.sqrt(len(xc))
    np.testing.assert_array_less(np.abs(xc.mean(0) - toy2d.MEANS[c]), 5 * se)
    np.testing.assert_array_less(np.abs(xc.std(0) - toy2d.STD), 5 * se / np.sqrt(2))
    assert stats.kstest((xc[:, 0] - toy2d.MEANS[c, 0]) / toy2d.STD, "norm").pvalue > 0.01


def test_sample_data_seeds():
  a, la = toy2d.sample_data(3, 10)
  b, lb = toy2d.sample_data(np.random.default_rng(3), 10)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, toy2d.sample_data(4, 10)[0])
  c, lc = toy2d.sample_data(jax.random.key(0), 10)
  d, _ = toy2d.sample_data(jax.random.key(0), 10)
  assert c.shape == (10, 2) and lc.shape == (10,)
  np.testing.assert_array_equal(c, d)
  with pytest.raises(ValueError, match="num"):
    toy2d.sample_data(0, -1)


# The sampler runs below share one shape (3 weights x 3 classes x 20, 8 steps) and so
# at most two compilations: exact_eps and the Partial-wrapped stand-in.
WEIGHTS = (0.0, 2.0, 5.0)


def scaled_exact_eps(scale, z, logsnr, labels):
  return scale * toy2d.exact_eps(z, logsnr, labels)


def test_guided_samples_sweep_in_one_call():
  x = toy.guided_samples(toy2d.exact_eps, WEIGHTS, 20, settings=toy.sampler_settings(8))
  assert x.shape == (3, C, 20, 2)
  # Layout [w, class]: each class sits on its own mean, and moves out as w grows.
  assert np.all(np.linalg.norm(x[0].mean(1) - toy2d.MEANS, axis=-1) < 0.4)
  spread = np.linalg.norm(x.mean(2), axis=-1).mean(1)
  assert spread[2] > spread[0] + 0.3, spread


def test_render_figure_writes_png_of_expected_size(tmp_path):
  path = tmp_path / "fig2.png"
  # The hook a trainer uses: a "learned" model (here a slightly-off stand-in) next to
  # the exact scores.
  eps_fns = {"exact": toy2d.exact_eps, "learned": jax.tree_util.Partial(scaled_exact_eps, 0.9)}
  toy.render_figure(path, weights=WEIGHTS, eps_fns=eps_fns, num_per_class=20,
                    settings=toy.sampler_settings(8), dpi=40, panel_inches=2.0)
  img = image.imread(path)
  assert img.shape[:2] == (3 * 80, 3 * 80)
  assert img[..., :3].std() > 0.05  # Not blank.


def test_command_line_writes_png(tmp_path):
  path = tmp_path / "cli.png"
  toy.main(["--out", str(path), "--weights", "0", "2", "5", "--num_per_class", "20",
            "--num_steps", "8"])
  img = image.imread(path)
  assert img.shape[:2] == (2 * 240, 3 * 240)
