"""Tests for cfg_guidance.diffusion against float64 numpy written from the paper's equations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cfg_guidance import diffusion as eager_diffusion

LOGSNRS = (-20.0, -10.0, 0.0, 10.0, 20.0)
# Down to 1e-4, where a naive float32 1 − e^(λ−λ') is already off by ~6e-4.
GAPS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)
RTOL = 1e-4


class _Jitted:
  """The module's functions under jax.jit: one compilation per function, not per op."""

  def __getattr__(self, name):
    static = {"sampling_logsnrs": ("num_steps",), "sample_logsnr": ("shape",)}.get(name, ())
    return jax.jit(getattr(eager_diffusion, name), static_argnames=static)


diffusion = _Jitted()


# float64 references, from Eq. 1-4 and §2 as printed (no log-space tricks: float64 has
# the digits to spare at |λ| <= 30 and gaps >= 1e-3).
def ref_alpha_sigma(logsnr):
  logsnr = np.float64(logsnr)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def ref_schedule(u, logsnr_min=-20.0, logsnr_max=20.0):
  b = np.arctan(np.exp(-logsnr_max / 2))
  a = np.arctan(np.exp(-logsnr_min / 2)) - b
  return -2 * np.log(np.tan(a * np.float64(u) + b))


def ref_posterior(z, x, logsnr, logsnr_next):
  (alpha, _), (alpha_next, sigma_next) = ref_alpha_sigma(logsnr), ref_alpha_sigma(logsnr_next)
  r = np.exp(np.float64(logsnr) - np.float64(logsnr_next))
  z_term, x_term = r * alpha_next / alpha * z, (1 - r) * alpha_next * x
  return z_term + x_term, (1 - r) * sigma_next**2, np.abs(z_term) + np.abs(x_term)


def ref_sampler_variance(logsnr, logsnr_next, v):
  (_, sigma), (_, sigma_next) = ref_alpha_sigma(logsnr), ref_alpha_sigma(logsnr_next)
  r = np.exp(np.float64(logsnr) - np.float64(logsnr_next))
  return ((1 - r) * sigma_next**2)**(1 - v) * ((1 - r) * sigma**2)**v


def logsnr_pairs():
  """(λ, λ') float32 pairs with λ' − λ down to 1e−4, on both sides of each λ."""
  pairs = [(lam, lam + gap) for lam, gap in itertools.product(LOGSNRS, GAPS)]
  pairs += [(lam - gap, lam) for lam, gap in itertools.product(LOGSNRS, GAPS)]
  # The references see the float32-rounded inputs the functions see.
  return np.array(pairs, np.float32)


def rel_err(got, want, scale=None):
  """|got − want| / scale, scale = |want| unless the sum of the terms' magnitudes is given."""
  scale = np.abs(want) if scale is None else scale
  return np.max(np.abs(np.asarray(got, np.float64) - want) / scale)


def test_alpha_sigma():
  logsnr = np.array(LOGSNRS + (-30.0, 30.0), np.float32)
  alpha, sigma = diffusion.alpha_sigma(logsnr)
  ref_alpha, ref_sigma = ref_alpha_sigma(logsnr)
  assert alpha.dtype == jnp.float32
  assert rel_err(alpha, ref_alpha) < RTOL
  assert rel_err(sigma, ref_sigma) < RTOL


def test_logsnr_schedule_matches_equation():
  u = np.concatenate([np.linspace(0, 1, 101), [1e-6, 1e-4, 1 - 1e-4, 1 - 1e-6]])
  u = u.astype(np.float32)
  for lo, hi in [(-20.0, 20.0), (-10.0, 5.0)]:
    got = np.asarray(diffusion.logsnr_schedule(u, logsnr_min=lo, logsnr_max=hi))
    want = ref_schedule(u, lo, hi)
    # Near λ = 0 the relative error is ill-defined; measure it against max(|λ|, 1).
    assert rel_err(got, want, np.maximum(np.abs(want), 1)) < RTOL
    np.testing.assert_allclose(got[[0, 100]], [hi, lo], rtol=1e-5)
    assert np.all(np.diff(got[:101]) < 0)


def test_logsnr_schedule_inverse_round_trips():
  u = np.linspace(0.01, 0.99, 50, dtype=np.float32)
  got = diffusion.logsnr_schedule_inverse(diffusion.logsnr_schedule(u))
  np.testing.assert_allclose(got, u, atol=1e-5)


def test_sampling_logsnrs_is_the_uniform_u_grid():
  got = diffusion.sampling_logsnrs(num_steps=5)
  np.testing.assert_allclose(got, ref_schedule(np.array([1, .75, .5, .25, 0])),
                             rtol=RTOL, atol=1e-5)


def test_sample_logsnr_follows_the_analytic_cdf():
  logsnr = np.asarray(diffusion.sample_logsnr(jax.random.key(0), shape=(20000,)), np.float64)
  assert logsnr.min() >= -20.0 and logsnr.max() <= 20.0
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  # λ decreases in u, so P(Λ <= l) = P(U >= u(l)) = 1 − u(l).
  cdf = lambda l: 1 - (np.arctan(np.exp(-l / 2)) - b) / a
  assert stats.kstest(logsnr, cdf).pvalue > 0.01
  # The test has power: a uniform λ on the same support is rejected outright.
  assert stats.kstest(logsnr, stats.uniform(-20, 40).cdf).pvalue < 1e-6


def test_sample_logsnr_range_and_shape():
  logsnr = diffusion.sample_logsnr(jax.random.key(1), shape=(4, 3), logsnr_min=-5.0,
                                    logsnr_max=3.0)
  assert logsnr.shape == (4, 3) and logsnr.dtype == jnp.float32
  assert -5.0 <= float(logsnr.min()) and float(logsnr.max()) <= 3.0


def test_posterior_matches_eq3():
  pairs = logsnr_pairs()
  rng = np.random.default_rng(0)
  z, x = rng.standard_normal((2, len(pairs), 3)).astype(np.float32)
  mean, var = diffusion.posterior(z, x, pairs[:, 0], pairs[:, 1])
  ref_mean, ref_var, scale = ref_posterior(z, x, pairs[:, :1], pairs[:, 1:])
  # Relative to the terms' magnitudes: z and x are independent, so the sum may cancel.
  assert rel_err(mean, ref_mean, scale) < RTOL
  assert rel_err(np.broadcast_to(var, mean.shape), ref_var * np.ones_like(z)) < RTOL


def test_posterior_scalar_logsnr_broadcasts():
  rng = np.random.default_rng(1)
  z, x = rng.standard_normal((2, 4, 5, 5, 3)).astype(np.float32)
  mean, var = diffusion.posterior(z, x, -3.0, -2.5)
  ref_mean, ref_var, scale = ref_posterior(z, x, np.float32(-3.0), np.float32(-2.5))
  assert rel_err(mean, ref_mean, scale) < RTOL
  assert rel_err(var, ref_var) < RTOL


@pytest.mark.parametrize("v", [0.0, 0.2, 0.3, 1.0])
def test_sampler_variance_matches_eq4(v):
  pairs = logsnr_pairs()
  got = diffusion.sampler_variance(pairs[:, 0], pairs[:, 1], v)
  assert rel_err(got, ref_sampler_variance(pairs[:, 0], pairs[:, 1], v)) < RTOL


def test_sampler_variance_endpoints_are_the_two_variances():
  pairs = logsnr_pairs()
  _, post_var = diffusion.posterior(np.zeros(len(pairs)), np.zeros(len(pairs)),
                                    pairs[:, 0], pairs[:, 1])
  np.testing.assert_allclose(diffusion.sampler_variance(pairs[:, 0], pairs[:, 1], 0.0),
                             post_var, rtol=1e-5)


def batch(seed):
  """x, eps: [N, 2, 2, 3] and per-example logsnr [N] covering LOGSNRS."""
  rng = np.random.default_rng(seed)
  logsnr = np.repeat(np.array(LOGSNRS, np.float32), 4)
  x, eps = rng.standard_normal((2, len(logsnr), 2, 2, 3)).astype(np.float32)
  return x, eps, logsnr, logsnr[:, None, None, None]


def test_diffuse_and_eps_conversions():
  x, eps, logsnr, lam = batch(2)
  alpha, sigma = ref_alpha_sigma(lam)
  z = np.asarray(diffusion.diffuse(x, eps, logsnr))
  assert rel_err(z, alpha * x + sigma * eps, np.abs(alpha * x) + np.abs(sigma * eps)) < RTOL
  # Evaluate the conversions at an independent z, so that nothing cancels by design.
  z = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
  got = diffusion.predict_x_from_eps(z, eps, logsnr)
  assert rel_err(got, (z - sigma * eps) / alpha, (np.abs(z) + np.abs(sigma * eps)) / alpha) < RTOL
  got = diffusion.predict_eps_from_x(z, x, logsnr)
  assert rel_err(got, (z - alpha * x) / sigma, (np.abs(z) + np.abs(alpha * x)) / sigma) < RTOL


def test_v_parameterization():
  x, eps, logsnr, lam = batch(4)
  alpha, sigma = ref_alpha_sigma(lam)
  v = np.asarray(diffusion.v_target(x, eps, logsnr))
  assert rel_err(v, alpha * eps - sigma * x, np.abs(alpha * eps) + np.abs(sigma * x)) < RTOL
  z = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
  got = diffusion.predict_x_from_v(z, v, logsnr)
  assert rel_err(got, alpha * z - sigma * v, np.abs(alpha * z) + np.abs(sigma * v)) < RTOL
  got = diffusion.predict_eps_from_v(z, v, logsnr)
  assert rel_err(got, sigma * z + alpha * v, np.abs(sigma * z) + np.abs(alpha * v)) < RTOL
  # On a real z_λ, the v-prediction of the true v recovers x and ε.
  z = diffusion.diffuse(x, eps, logsnr)
  np.testing.assert_allclose(diffusion.predict_x_from_v(z, v, logsnr), x, atol=1e-5)
  np.testing.assert_allclose(diffusion.predict_eps_from_v(z, v, logsnr), eps, atol=1e-5)


def test_eps_round_trip_at_moderate_logsnr():
  x, eps, _, _ = batch(6)
  logsnr = np.linspace(-5, 5, x.shape[0]).astype(np.float32)
  z = diffusion.diffuse(x, eps, logsnr)
  np.testing.assert_allclose(diffusion.predict_x_from_eps(z, eps, logsnr), x, atol=1e-4)
  np.testing.assert_allclose(diffusion.predict_eps_from_x(z, x, logsnr), eps, atol=1e-4)


def test_eps_loss_is_per_example_mse():
  rng = np.random.default_rng(7)
  pred, eps = rng.standard_normal((2, 6, 4, 4, 3)).astype(np.float32)
  want = np.mean((pred.astype(np.float64) - eps)**2, axis=(1, 2, 3))
  np.testing.assert_allclose(diffusion.eps_loss(pred, eps), want, rtol=1e-5)
  assert diffusion.eps_loss(pred, eps).shape == (6,)
