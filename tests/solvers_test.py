"""Tests for the fast guided solvers (DPM-Solver++(2M), UniPC, EDM's Heun) on the toy
mixture's exact scores.

Two independent references, in float64 numpy:
- each method's update written out from its paper (DPM-Solver++: Lu et al. 2022, Alg. 2;
  UniPC: Zhao et al. 2023, Alg. for UniP-p/UniC-p with B(h) = e^h − 1 in the data
  prediction's sign convention; EDM: Karras et al. 2022, Alg. 2), compared step by step on
  a few steps, churn noise included;
- the probability-flow ODE dz/dℓ = α (x̂ − α z) (ℓ = λ/2) integrated by scipy's DOP853 at
  rtol 1e-12: every ODE solver's samples converge to it with the order its paper claims.
"""

import math

import jax
import numpy as np
import pytest
from scipy import integrate

from cfg_guidance import sampling
from cfg_guidance.data import toy2d
from sampling_test import np_alpha2, np_guided_x, per_class_labels

C = toy2d.NUM_CLASSES


def guided_x(z, lam, labels, w):
  return np_guided_x(z, lam, labels, np.full_like(labels, C), w)


def alpha_sigma(lam):
  return np.sqrt(np_alpha2(lam)), np.sqrt(np_alpha2(-lam))


def np_grid(grid, n, lo, hi):
  if grid == "logsnr":
    return np.linspace(lo, hi, n)
  b = np.arctan(np.exp(-hi / 2))
  a = np.arctan(np.exp(-lo / 2)) - b
  return -2 * np.log(np.tan(a * np.linspace(1, 0, n) + b))


def low_order(i, n, lower_order_final):
  return i == 0 or (lower_order_final and i == n - 2 and n < 15)


def np_dpmpp_2m(z, labels, w, lams, lower_order_final):
  """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, in λ_DPM = log(α/σ) = λ/2."""
  ell, n = lams / 2, len(lams)
  for i in range(n - 1):
    x = guided_x(z, lams[i], labels, w)
    h = ell[i + 1] - ell[i]
    if low_order(i, n, lower_order_final):
      d = x
    else:
      r = (ell[i] - ell[i - 1]) / h
      d = (1 + 1 / (2 * r)) * x - 1 / (2 * r) * x_prev
    (_, s), (a1, s1) = alpha_sigma(lams[i]), alpha_sigma(lams[i + 1])
    z = s1 / s * z - a1 * (np.exp(-h) - 1) * d
    x_prev = x
  return guided_x(z, lams[-1], labels, w)


def phi(k, x):
  """φ_k(x): φ_0 = e^x, φ_{k+1}(x) = (φ_k(x) − 1/k!) / x."""
  value = np.exp(x)
  for j in range(k):
    value = (value - 1 / math.factorial(j)) / x
  return value


def np_unipc(z, labels, w, lams, lower_order_final):
  """UniPC with the data prediction, B(h) = e^(−h) − 1, predictor order 2 (UniP-2, whose
  ρ = 1/2 as in the official code) and UniC of the predictor's order at each point."""
  ell, n = lams / 2, len(lams)
  xs, orders = [], []
  z_base = None
  for i in range(n):
    x = guided_x(z, lams[i], labels, w)
    if i == n - 1:
      return x
    if i > 0:  # UniC-p corrects z_i with x̂_i, from z_{i−1} (corrected) and x̂_{i−1}, ...
      p, h = orders[-1], ell[i] - ell[i - 1]
      rks = [(ell[i - 1 - j] - ell[i - 1]) / h for j in range(1, p)] + [1.0]
      d1s = [(xs[-1 - j] - xs[-1]) / rks[j - 1] for j in range(1, p)]
      hh = -h
      b_h = np.expm1(hh)
      if p == 1:
        rhos = np.array([0.5])
      else:
        big_r = np.array([[rk**k for rk in rks] for k in range(p)])
        b = np.array([hh * phi(k + 1, hh) * math.factorial(k) / b_h for k in range(1, p + 1)])
        rhos = np.linalg.solve(big_r, b)
      (_, s0), (a, s) = alpha_sigma(lams[i - 1]), alpha_sigma(lams[i])
      corr = sum(rho * d1 for rho, d1 in zip(rhos[:-1], d1s)) + rhos[-1] * (x - xs[-1])
      z = s / s0 * z_base - a * np.expm1(hh) * xs[-1] - a * b_h * corr
    q = 1 if low_order(i, n, lower_order_final) else 2
    h = ell[i + 1] - ell[i]
    (_, s0), (a1, s1) = alpha_sigma(lams[i]), alpha_sigma(lams[i + 1])
    z_base, z_next = z, s1 / s0 * z - a1 * np.expm1(-h) * x
    if q == 2:
      r1 = (ell[i - 1] - ell[i]) / h
      z_next = z_next - a1 * np.expm1(-h) * 0.5 * (xs[-1] - x) / r1
    xs.append(x)
    orders.append(q)
    z = z_next


def np_heun(z, labels, w, lams, noises, s_churn=0.0, s_tmin=0.0, s_tmax=np.inf,
            s_noise=1.0):
  """EDM's Algorithm 2, literally: x̃ = z/α, σ_E = σ/α, D the denoiser, churn then Heun."""
  n = len(lams)
  sig = np.exp(-lams / 2)
  alpha_of = lambda s: 1 / np.sqrt(1 + s**2)
  denoise = lambda xt, s: guided_x(alpha_of(s) * xt, -2 * np.log(s), labels, w)
  xt = z / alpha_of(sig[0])
  for i in range(n - 1):
    gamma = min(s_churn / n, np.sqrt(2) - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
    s_hat = sig[i] * (1 + gamma)
    x_hat = xt + np.sqrt(s_hat**2 - sig[i]**2) * s_noise * noises[i]
    d = (x_hat - denoise(x_hat, s_hat)) / s_hat
    x_next = x_hat + (sig[i + 1] - s_hat) * d
    d_next = (x_next - denoise(x_next, sig[i + 1])) / sig[i + 1]
    xt = x_hat + (sig[i + 1] - s_hat) * (0.5 * d + 0.5 * d_next)
  return denoise(xt, sig[-1])


def run(sampler, z0, labels, w, num_steps, **kwargs):
  return np.asarray(sampling.sample(
      toy2d.exact_eps, jax.random.key(kwargs.pop("seed", 0)), labels, shape=(2,),
      guidance_weight=w, null_label=C, num_steps=num_steps, sampler=sampler,
      z_init=z0, **kwargs), np.float64)


def problem(per_class=4, seed=0):
  labels = per_class_labels(per_class)
  w = np.linspace(0.0, 4.0, len(labels))
  z0 = np.random.default_rng(seed).standard_normal((len(labels), 2)).astype(np.float32)
  return labels, w, z0


# ---- each update against its paper's formula ---------------------------------------------

@pytest.mark.parametrize("grid", ["logsnr", "u"])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("sampler,reference", [("dpmpp_2m", np_dpmpp_2m),
                                               ("unipc", np_unipc)])
def test_multistep_solvers_match_their_papers_step_by_step(sampler, reference, grid,
                                                           lower_order_final):
  labels, w, z0 = problem()
  lo, hi = -8.0, 8.0
  for n in (2, 3, 5):  # The first step alone, then order 2 and UniC-2.
    got = run(sampler, z0, labels, w, n, grid=grid, logsnr_min=lo, logsnr_max=hi,
              lower_order_final=lower_order_final)
    want = reference(z0.astype(np.float64), labels, w, np_grid(grid, n, lo, hi),
                     lower_order_final)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4, err_msg=f"N = {n}")


def test_the_first_step_of_every_ode_solver_is_ddim():
  """With one step the multistep methods are first order, i.e. DDIM η = 0; Heun is not."""
  labels, w, z0 = problem()
  ddim = run("ddim", z0, labels, w, 2, logsnr_min=-6.0, logsnr_max=6.0)
  for sampler in ("dpmpp_2m", "unipc"):
    np.testing.assert_allclose(run(sampler, z0, labels, w, 2, logsnr_min=-6.0,
                                   logsnr_max=6.0), ddim, atol=1e-5)
  heun = run("heun", z0, labels, w, 2, logsnr_min=-6.0, logsnr_max=6.0)
  assert np.abs(heun - ddim).max() > 1e-2


@pytest.mark.parametrize("churn", [
    {},
    {"s_churn": 3.0, "s_noise": 1.003},
    {"s_churn": 40.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.0},  # γ capped at √2 − 1.
])
def test_heun_matches_edm_algorithm_2_with_churn(churn):
  labels, w, z0 = problem()
  n, lo, hi, seed = 5, -6.0, 6.0, 3
  got = run("heun", z0, labels, w, n, grid="logsnr", logsnr_min=lo, logsnr_max=hi,
            seed=seed, **churn)
  # The sampler's noise for step k: normal(fold_in(loop key, k)), loop key = split(key)[1].
  loop = jax.random.split(jax.random.key(seed))[1]
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(loop, k), z0.shape), np.float64)
            for k in range(n - 1)]
  want = np_heun(z0.astype(np.float64), labels, w, np_grid("logsnr", n, lo, hi), noises,
                 **churn)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  if churn:
    no_churn = run("heun", z0, labels, w, n, grid="logsnr", logsnr_min=lo, logsnr_max=hi)
    assert np.abs(no_churn - got).max() > 1e-2


def test_num_evaluations_counts_the_network_calls():
  calls = []

  def eps_fn(z, logsnr, labels):
    calls.append(z.shape[0])
    return toy2d.exact_eps(z, logsnr, labels)

  labels, w, z0 = problem()
  for sampler in sampling.SOLVERS:
    calls.clear()
    with jax.disable_jit():  # Every call of the loop body runs, and is counted.
      run_eager = sampling.sample(eps_fn, jax.random.key(0), labels, shape=(2,),
                                  guidance_weight=w, null_label=C, num_steps=4,
                                  sampler=sampler, z_init=z0)
    assert np.isfinite(np.asarray(run_eager)).all()
    assert len(calls) == sampling.num_evaluations(sampler, 4), sampler
    assert set(calls) == {2 * len(labels)}  # Each on the batched 2N (cond, ∅) batch.


# ---- convergence order against the float64 ODE ---------------------------------------------

LO, HI = -20.0, 20.0


@pytest.fixture(scope="module")
def ode_solution():
  labels, w, z0 = problem(per_class=10, seed=1)
  n = len(labels)

  def rhs(ell, flat):
    z = flat.reshape(n, 2)
    a = np.sqrt(np_alpha2(2 * ell))
    return (a * guided_x(z, 2 * ell, labels, w) - a * a * z).ravel()

  sol = integrate.solve_ivp(rhs, (LO / 2, HI / 2), z0.astype(np.float64).ravel(),
                            method="DOP853", rtol=1e-12, atol=1e-12)
  assert sol.success
  return labels, w, z0, guided_x(sol.y[:, -1].reshape(n, 2), HI, labels, w)


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("dpmpp_2m", 2), ("unipc", 3),
                                           ("heun", 2)])
def test_ode_solvers_converge_with_their_order(ode_solution, sampler, order):
  """Error ratio when the steps halve (uniform in λ over [−20, 20]) is 2^order."""
  labels, w, z0, exact = ode_solution
  errors = [np.abs(run(sampler, z0, labels, w, n, grid="logsnr", logsnr_min=LO,
                       logsnr_max=HI) - exact).max() for n in (65, 129, 257)]
  observed = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
  # At least the claimed order, and not the next one (UniPC nears 3 from above: its
  # leading error term is still settling at these step sizes).
  assert order - 0.25 < observed[-1] < order + 0.6, (errors, observed)
  assert order - 0.4 < observed[0] < order + 0.8, (errors, observed)
  # A wrong limit would show ratios going to 1, so the order also checks the limit.
  assert errors[-1] < 0.05


def test_bad_solver_options_raise_naming_them():
  labels, w, z0 = problem()
  with pytest.raises(ValueError, match="grid must be one of"):
    run("dpmpp_2m", z0, labels, w, 4, grid="karras")
  with pytest.raises(ValueError, match="s_churn must lie in"):
    run("heun", z0, labels, w, 4, s_churn=-1.0)
  with pytest.raises(ValueError, match="sampler must be one of"):
    run("dpm++", z0, labels, w, 4)
