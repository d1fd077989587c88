"""Variance-preserving diffusion in log-SNR (paper §2): schedule, forward process, posterior.

Pure `jax.numpy`. `logsnr` is a scalar or has the batch shape `[N]` and broadcasts
against `x: [N, ...]`. Everything is computed in log space so that λ ∈ [−20, 20] and
gaps λ' − λ down to 1e−3 keep float32 accuracy.
"""

import jax
import jax.numpy as jnp

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def expand_to(a, x):
  """Reshapes a per-example `a: [] or [N]` (e.g. logsnr) to broadcast against `x: [N, ...]`."""
  a = jnp.asarray(a)
  return jnp.reshape(a, a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _log1mexp(a):
  """log(1 − e^a) for a < 0, accurate at both ends (Mächler 2012)."""
  return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def log_alpha_sigma(logsnr):
  """(log α, log σ) with α² = sigmoid(λ) and σ² = sigmoid(−λ) (Eq. 1)."""
  return 0.5 * jax.nn.log_sigmoid(logsnr), 0.5 * jax.nn.log_sigmoid(-logsnr)


def alpha_sigma(logsnr):
  """(α, σ) of the variance-preserving process at `logsnr`; same shape as `logsnr`."""
  log_alpha, log_sigma = log_alpha_sigma(jnp.asarray(logsnr, jnp.float32))
  return jnp.exp(log_alpha), jnp.exp(log_sigma)


def _schedule_constants(logsnr_min, logsnr_max):
  # b = arctan(e^(−λmax/2)); the complementary angle c = π/2 − (a + b) = arctan(e^(λmin/2)).
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  c = jnp.arctan(jnp.exp(0.5 * logsnr_min))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min)) - b
  return a, b, c


def logsnr_schedule(u, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """λ = −2 log tan(a u + b) (§2): u = 0 gives λmax, u = 1 gives λmin. u: any shape."""
  u = jnp.asarray(u, jnp.float32)
  a, b, c = _schedule_constants(jnp.float32(logsnr_min), jnp.float32(logsnr_max))
  # Near u = 1 the angle approaches π/2, where float32 keeps no digits of the distance
  # to π/2; there use tan(θ) = 1 / tan(π/2 − θ) with π/2 − θ = c + a (1 − u), exact.
  theta = a * u + b
  theta_c = c + a * (1.0 - u)
  return jnp.where(theta < theta_c,
                   -2.0 * jnp.log(jnp.tan(theta)),
                   2.0 * jnp.log(jnp.tan(theta_c)))


def logsnr_schedule_inverse(logsnr, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """u such that `logsnr_schedule(u) == logsnr`; the inverse, for analysis and tests."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  a, b, _ = _schedule_constants(jnp.float32(logsnr_min), jnp.float32(logsnr_max))
  return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


def sampling_logsnrs(num_steps, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """The increasing grid λ_1 = λmin, ..., λ_T = λmax of Algorithm 2: [num_steps].

  u is uniformly spaced from 1 to 0; `num_steps` is a Python int.
  """
  u = jnp.linspace(1.0, 0.0, num_steps, dtype=jnp.float32)
  return logsnr_schedule(u, logsnr_min, logsnr_max)


def sample_logsnr(rng, shape, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """Training λ ~ p(λ): u ~ U[0, 1] through `logsnr_schedule`. Returns float32 `shape`."""
  u = jax.random.uniform(rng, shape, jnp.float32)
  return logsnr_schedule(u, logsnr_min, logsnr_max)


def diffuse(x, eps, logsnr):
  """z_λ = α x + σ ε (Eq. 1). x, eps: [N, ...]; returns z: [N, ...]."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, x))
  return alpha * x + sigma * eps


def predict_x_from_eps(z, eps, logsnr):
  """x̂ = (z − σ ε̂) / α: the ε-parameterization of §2."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, z))
  return (z - sigma * eps) / alpha


def predict_eps_from_x(z, x, logsnr):
  """ε̂ = (z − α x̂) / σ, the inverse of `predict_x_from_eps`."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, z))
  return (z - alpha * x) / sigma


def v_target(x, eps, logsnr):
  """The v-parameterization's target v = α ε − σ x (Salimans & Ho 2022)."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, x))
  return alpha * eps - sigma * x


def predict_x_from_v(z, v_pred, logsnr):
  """x̂ = α z − σ v̂, from a v-prediction."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, z))
  return alpha * z - sigma * v_pred


def predict_eps_from_v(z, v_pred, logsnr):
  """ε̂ = σ z + α v̂, from a v-prediction."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, z))
  return sigma * z + alpha * v_pred


def posterior(z, x, logsnr, logsnr_next):
  """q(z_λ' | z_λ, x) of Eq. 3 for λ' > λ: (mean [N, ...], var broadcastable to it).

  mean = r (α_λ'/α_λ) z + (1 − r) α_λ' x and var = (1 − r) σ²_λ', with r = e^(λ−λ').
  """
  logsnr = expand_to(logsnr, z)
  logsnr_next = expand_to(logsnr_next, z)
  log_alpha, _ = log_alpha_sigma(logsnr)
  log_alpha_next, log_sigma_next = log_alpha_sigma(logsnr_next)
  delta = logsnr - logsnr_next
  z_coef = jnp.exp(delta + log_alpha_next - log_alpha)
  x_coef = -jnp.expm1(delta) * jnp.exp(log_alpha_next)
  log_var = _log1mexp(delta) + 2.0 * log_sigma_next
  return z_coef * z + x_coef * x, jnp.exp(log_var)


def sampler_variance(logsnr, logsnr_next, v):
  """Eq. 4's variance (σ̃²_λ'|λ)^(1−v) (σ²_λ|λ')^v, interpolated in log space.

  σ̃²_λ'|λ = (1 − r) σ²_λ' (posterior) and σ²_λ|λ' = (1 − r) σ²_λ (forward), r = e^(λ−λ').
  Shape: the broadcast of `logsnr` and `logsnr_next`.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  logsnr_next = jnp.asarray(logsnr_next, jnp.float32)
  _, log_sigma = log_alpha_sigma(logsnr)
  _, log_sigma_next = log_alpha_sigma(logsnr_next)
  log_var = (_log1mexp(logsnr - logsnr_next)
             + 2.0 * (1.0 - v) * log_sigma_next + 2.0 * v * log_sigma)
  return jnp.exp(log_var)


def eps_loss(eps_pred, eps):
  """‖ε_θ − ε‖² of Eq. 5 as a per-example mean over all but the batch axis: [N]."""
  sq = jnp.square(eps_pred.astype(jnp.float32) - eps.astype(jnp.float32))
  return jnp.mean(sq, axis=tuple(range(1, sq.ndim)))
