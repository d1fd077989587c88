"""The paper's Figure 2 problem: three isotropic 2-D Gaussians, one per class.

Its training data, and the exact quantities every sampler and model is checked against:
the class posterior p(c | z_λ), the exact ε* of each class and of the mixture, and the
guided densities p(x | c) p(c | x)^w. `cfg_guidance.toy` draws the figure.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import diffusion

NUM_CLASSES = 3
NULL_LABEL = NUM_CLASSES  # ∅: the unconditional mixture.
# Means on the unit circle, 120° apart; with STD = 0.6 the classes overlap enough that
# p(c | x) varies smoothly across the plane, which is what guidance acts on.
MEANS = np.array([[0.0, 1.0],
                  [-0.5 * np.sqrt(3.0), -0.5],
                  [0.5 * np.sqrt(3.0), -0.5]], np.float32)
STD = 0.6
EXTENT = 3.0  # The figure shows [−EXTENT, EXTENT]².


def sample_data(seed_or_rng, num):
  """Draws `num` points with balanced classes (uniform prior; counts differ by <= 1).

  seed_or_rng: an int seed, a `np.random.Generator` or a JAX PRNG key.
  Returns (x: float32 [num, 2], labels: int32 [num]) as numpy arrays.
  """
  if num < 0:
    raise ValueError(f"num must be >= 0, got {num}.")
  if isinstance(seed_or_rng, np.random.Generator):
    gen = seed_or_rng
  elif isinstance(seed_or_rng, (int, np.integer)):
    gen = np.random.default_rng(int(seed_or_rng))
  else:
    seed = jax.random.randint(seed_or_rng, (), 0, np.iinfo(np.int32).max)
    gen = np.random.default_rng(int(seed))
  labels = gen.permutation(np.arange(num) % NUM_CLASSES).astype(np.int32)
  x = MEANS[labels] + STD * gen.standard_normal((num, 2))
  return x.astype(np.float32), labels


def _component_params(logsnr, means, std):
  """z_λ | c ~ N(α μ_c, τ² I) with τ² = α² s² + σ². logsnr: [M] -> ([M, C, 2], [M], [M])."""
  alpha, sigma = diffusion.alpha_sigma(logsnr)
  return alpha[:, None, None] * means[None], jnp.square(alpha * std) + jnp.square(sigma), sigma


@jax.jit
def log_class_posterior(z, logsnr, *, means=MEANS, std=STD):
  """log p(c | z_λ) under the uniform prior. z: [M, 2], logsnr: [M] -> [M, C]."""
  mu, tau2, _ = _component_params(jnp.broadcast_to(logsnr, z.shape[:1]), means, std)
  logits = -0.5 * jnp.sum(jnp.square(z[:, None] - mu), -1) / tau2[:, None]
  return jax.nn.log_softmax(logits, axis=-1)


@jax.jit
def exact_eps(z, logsnr, labels, *, means=MEANS, std=STD):
  """ε*(z, λ, c) = −σ ∇ log p(z_λ | c); label NUM_CLASSES gives the unconditional ε*(z, λ).

  z: [M, 2], logsnr: [M], labels: [M] in [0, NUM_CLASSES]. Usable as `sample`'s eps_fn.
  """
  logsnr = jnp.broadcast_to(logsnr, z.shape[:1])
  mu, tau2, sigma = _component_params(logsnr, means, std)
  eps_c = (sigma / tau2)[:, None, None] * (z[:, None] - mu)  # [M, C, 2]
  # The marginal's score is the responsibility-weighted sum of the components' scores.
  resp = jnp.exp(log_class_posterior(z, logsnr, means=means, std=std))
  eps_uncond = jnp.einsum("mc,mcd->md", resp, eps_c)
  cond = jnp.clip(labels, 0, means.shape[0] - 1)
  eps_cond = jnp.take_along_axis(eps_c, cond[:, None, None], axis=1)[:, 0]
  return jnp.where((labels == means.shape[0])[:, None], eps_uncond, eps_cond)


@jax.jit
def guided_log_density(x, w, *, means=MEANS, std=STD):
  """Unnormalized log p(x | c) + w log p(c | x) for every class. x: [G, 2] -> [C, G]."""
  x = jnp.asarray(x, jnp.float32)
  inf = jnp.full(x.shape[:1], jnp.inf)  # λ = ∞: the data distribution itself.
  log_cond = (-0.5 * jnp.sum(jnp.square(x[None] - means[:, None]), -1) / std**2
              - jnp.log(2 * jnp.pi * std**2))
  return log_cond + w * log_class_posterior(x, inf, means=means, std=std).T


def density_grid(grid_size=200, extent=EXTENT):
  """Cell-centre grid over [−extent, extent]²: (points [G², 2], axis [G], cell area)."""
  step = 2 * extent / grid_size
  axis = -extent + step * (np.arange(grid_size) + 0.5)
  xx, yy = np.meshgrid(axis, axis)
  return np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32), axis, step**2


def guided_density(w, *, grid_size=200, extent=EXTENT):
  """The exact guided conditionals p(x|c) p(c|x)^w, each normalized on the grid.

  Returns (densities [C, G, G] in (y, x) order, axis [G]); the mixture with the uniform
  prior is `densities.mean(0)`. w = 0 is the data mixture itself.
  """
  points, axis, area = density_grid(grid_size, extent)
  log_q = guided_log_density(points, w)
  log_q = log_q - jax.nn.logsumexp(log_q, axis=1, keepdims=True) - np.log(area)
  return np.asarray(jnp.exp(log_q)).reshape(-1, grid_size, grid_size), axis
