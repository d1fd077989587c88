"""Tests for cfg_guidance.sampling: Algorithm 2 with the toy mixture's exact scores.

The reference is a second, independent float64 numpy Algorithm 2 (and DDIM) written here
from the paper's equations, with its own exact mixture scores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from cfg_guidance import sampling
from cfg_guidance.data import toy2d

C = toy2d.NUM_CLASSES


# ---- float64 numpy reference -------------------------------------------------------------

def np_alpha2(logsnr):
  return 1 / (1 + np.exp(-logsnr))


def np_schedule(num_steps, logsnr_min=-20.0, logsnr_max=20.0):
  b = np.arctan(np.exp(-logsnr_max / 2))
  a = np.arctan(np.exp(-logsnr_min / 2)) - b
  return -2 * np.log(np.tan(a * np.linspace(1, 0, num_steps) + b))


def np_eps(z, logsnr, labels):
  """ε* of the mixture: z | c ~ N(α μ_c, (α² s² + σ²) I); ∅ = C through p(c | z)."""
  alpha2, sigma2 = np_alpha2(logsnr), np_alpha2(-logsnr)
  tau2 = alpha2 * toy2d.STD**2 + sigma2
  diff = z[:, None, :] - np.sqrt(alpha2) * toy2d.MEANS.astype(np.float64)[None]
  eps_c = np.sqrt(sigma2) * diff / tau2
  resp = special.softmax(-0.5 * np.sum(diff**2, -1) / tau2, axis=1)
  eps_u = np.einsum("mc,mcd->md", resp, eps_c)
  cond = eps_c[np.arange(len(z)), np.minimum(labels, C - 1)]
  return np.where((labels == C)[:, None], eps_u, cond)


def np_guided_x(z, logsnr, labels, neg_labels, w, clip=None):
  """x̃ from Eq. 6's ε̃; clip=p applies dynamic thresholding at percentile p."""
  eps = (1 + w[:, None]) * np_eps(z, logsnr, labels) - w[:, None] * np_eps(z, logsnr, neg_labels)
  x = (z - np.sqrt(np_alpha2(-logsnr)) * eps) / np.sqrt(np_alpha2(logsnr))
  if clip is None:
    return x
  s = np.maximum(np.quantile(np.abs(x), clip, axis=1, keepdims=True), 1.0)
  return np.clip(x, -s, s) / s


def np_ancestral(rng, labels, w, num_steps, v=0.3):
  """Algorithm 2 verbatim, float64."""
  logsnrs = np_schedule(num_steps)
  z = rng.standard_normal((len(labels), 2))
  for t in range(num_steps):
    x = np_guided_x(z, logsnrs[t], labels, np.full_like(labels, C), w)
    if t == num_steps - 1:
      return x
    lam, lam_next = logsnrs[t], logsnrs[t + 1]
    r = np.exp(lam - lam_next)
    mean = (r * np.sqrt(np_alpha2(lam_next) / np_alpha2(lam)) * z
            + (1 - r) * np.sqrt(np_alpha2(lam_next)) * x)
    var = (((1 - r) * np_alpha2(-lam_next))**(1 - v) * ((1 - r) * np_alpha2(-lam))**v)
    z = mean + np.sqrt(var) * rng.standard_normal(z.shape)


def np_ddim(z, labels, neg_labels, w, num_steps, interval, clip, logsnr_min):
  """Deterministic DDIM (η = 0) with a guidance interval and optional thresholding."""
  logsnrs = np_schedule(num_steps, logsnr_min)
  for t, lam in enumerate(logsnrs):
    w_t = w if interval[0] <= lam <= interval[1] else np.zeros_like(w)
    x = np_guided_x(z, lam, labels, neg_labels, w_t, clip)
    if t == num_steps - 1:
      return x
    eps = (z - np.sqrt(np_alpha2(lam)) * x) / np.sqrt(np_alpha2(-lam))
    z = np.sqrt(np_alpha2(logsnrs[t + 1])) * x + np.sqrt(np_alpha2(-logsnrs[t + 1])) * eps


# ---- helpers -------------------------------------------------------------------------------

def per_class_labels(n):
  return np.repeat(np.arange(C), n).astype(np.int32)


def moments(x, n):
  """Per-class mean [C, 2] and std [C, 2] of x: [C * n, 2] grouped by class."""
  x = np.asarray(x, np.float64).reshape(C, n, 2)
  return x.mean(1), x.std(1)


def run(labels, w, num_steps, seed=0, **kwargs):
  kwargs.setdefault("null_label", C)
  return np.asarray(sampling.sample(toy2d.exact_eps, jax.random.key(seed), labels, shape=(2,),
                                    guidance_weight=w, num_steps=num_steps, **kwargs))


# ---- distributional tests ----------------------------------------------------------------

def test_unguided_samples_match_the_components_and_improve_with_steps():
  n = 8000
  labels = per_class_labels(n)
  std_bias = []
  for num_steps in (8, 64, 512):
    mean, std = moments(run(labels, 0.0, num_steps, seed=num_steps), n)
    # Averaged over classes and axes; its Monte-Carlo error is s / sqrt(12 n) ≈ 0.002.
    std_bias.append(abs(np.mean(std - toy2d.STD)))
  se_mean, se_std = toy2d.STD / np.sqrt(n), toy2d.STD / np.sqrt(2 * n)
  assert np.all(np.abs(mean - toy2d.MEANS) < 5 * se_mean), mean
  assert np.all(np.abs(std - toy2d.STD) < 5 * se_std), std
  # The discretization error (≈ 0.12, 0.02, 0.003) falls with T.
  assert std_bias[0] > 2 * std_bias[1] and std_bias[1] > 2 * std_bias[2], std_bias


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_guided_moments_match_float64_algorithm2(sampler):
  # Few steps, where v and w shape the result most: a wrong variance or guidance shows.
  n, num_steps, weights = 4000, 8, np.array([0.0, 1.0, 3.0])
  labels = np.tile(per_class_labels(n), len(weights))
  w = np.repeat(weights, C * n)
  # DDIM with η = 1 takes the ancestral step with v = 0: the same distribution.
  options = {"v": 0.3} if sampler == "ancestral" else {"eta": 1.0}
  got = run(labels, w, num_steps, sampler=sampler, **options).reshape(len(weights), C * n, 2)
  ref_v = 0.3 if sampler == "ancestral" else 0.0
  ref = np_ancestral(np.random.default_rng(1), labels, w, num_steps, v=ref_v)
  ref = ref.reshape(len(weights), C * n, 2)
  separation = []
  for i in range(len(weights)):
    (mean, std), (ref_mean, ref_std) = moments(got[i], n), moments(ref[i], n)
    se_mean = np.sqrt(2 / n) * np.maximum(std, ref_std)
    se_std = np.sqrt(1 / n) * np.maximum(std, ref_std)
    assert np.all(np.abs(mean - ref_mean) < 5 * se_mean), (weights[i], mean, ref_mean)
    assert np.all(np.abs(std - ref_std) < 5 * se_std), (weights[i], std, ref_std)
    separation.append(np.mean(np.linalg.norm(mean - mean.mean(0), axis=1)))
  # Guidance pushes the classes apart: the class means spread out as w grows.
  assert separation[0] + 0.05 < separation[1] and separation[1] + 0.05 < separation[2]


# ---- exact identities between code paths -------------------------------------------------

def poisoned_uncond_eps(z, logsnr, labels):
  """exact_eps with a wrong unconditional branch: at w = 0 it must not matter."""
  return toy2d.exact_eps(z, logsnr, labels) + 100.0 * (labels == C)[:, None]


def test_w0_is_the_conditional_sampler():
  labels = per_class_labels(20)
  plain = run(labels, 0.0, 16, seed=3)
  poisoned = np.asarray(sampling.sample(
      poisoned_uncond_eps, jax.random.key(3), labels, shape=(2,), guidance_weight=0.0,
      null_label=C, num_steps=16))
  np.testing.assert_allclose(poisoned, plain, rtol=1e-6, atol=1e-6)
  # Guidance switched off everywhere by an empty interval is the same sampler.
  outside = run(labels, 3.0, 16, seed=3, guidance_interval=(30.0, 40.0))
  np.testing.assert_array_equal(outside, plain)
  assert np.abs(run(labels, 3.0, 16, seed=3) - plain).max() > 0.1


def test_batched_and_two_call_forms_agree():
  labels = per_class_labels(20)
  w = np.linspace(0, 4, len(labels))
  one = run(labels, w, 16, seed=4)
  two = run(labels, w, 16, seed=4, cond_uncond_batched=False)
  np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)


def test_ddim_eta1_is_ancestral_v0_step_for_step():
  labels = per_class_labels(20)
  ancestral = run(labels, 2.0, 16, seed=5, v=0.0)
  ddim = run(labels, 2.0, 16, seed=5, sampler="ddim", eta=1.0)
  np.testing.assert_allclose(ddim, ancestral, atol=1e-4)


@pytest.mark.parametrize("clip", [None, 0.6])
def test_deterministic_ddim_matches_float64_with_interval_and_negative_labels(clip):
  labels = per_class_labels(20)
  neg = (labels + 1) % C  # Guide away from the next class instead of from ∅.
  w = np.linspace(0, 3, len(labels))
  z_init = np.random.default_rng(6).standard_normal((len(labels), 2)).astype(np.float32)
  interval, num_steps = (-5.0, 5.0), 16
  got = run(labels, w, num_steps, sampler="ddim", z_init=z_init, guidance_interval=interval,
            negative_labels=neg, clip_x="none" if clip is None else "dynamic",
            dynamic_percentile=0.6 if clip is None else clip, logsnr_min=-10.0)
  want = np_ddim(z_init.astype(np.float64), labels, neg, w, num_steps, interval, clip, -10.0)
  np.testing.assert_allclose(got, want, atol=2e-3)
  if clip is not None:
    assert np.abs(got).max() <= 1.0 + 1e-6


def test_threshold_x_matches_numpy():
  x = np.random.default_rng(7).standard_normal((5, 4, 4, 3)).astype(np.float32) * 2
  x[0] *= 0.1  # All |x| < 1: dynamic thresholding leaves it as is.
  s = np.maximum(np.quantile(np.abs(x).reshape(5, -1), 0.9, axis=1), 1)[:, None, None, None]
  np.testing.assert_allclose(sampling.threshold_x(x, "dynamic", 0.9), np.clip(x, -s, s) / s,
                             rtol=1e-5)
  np.testing.assert_array_equal(sampling.threshold_x(x, "static"), np.clip(x, -1, 1))
  np.testing.assert_array_equal(sampling.threshold_x(x, "none"), x)


# ---- compilation ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", list(sampling.SOLVERS))
def test_no_retrace_across_weights_labels_seeds_and_params(sampler):
  traces = []

  def eps_fn(scale, z, logsnr, labels):
    traces.append(1)
    return scale * toy2d.exact_eps(z, logsnr, labels)

  n = 12
  # λ in [−6, 6]: four Heun steps over [−20, 20] diverge once eps_fn is rescaled below.
  call = functools.partial(sampling.sample, shape=(2,), null_label=C, num_steps=4,
                           sampler=sampler, logsnr_min=-6.0, logsnr_max=6.0)
  first = call(jax.tree_util.Partial(eps_fn, jnp.float32(1.0)), jax.random.key(0),
               per_class_labels(4), guidance_weight=1.0)
  count = len(traces)
  assert count >= 1
  rng = np.random.default_rng(0)
  for seed in range(3):
    labels = rng.integers(0, C + 1, n).astype(np.int32)
    for w in (0.0, 2.5, rng.uniform(0, 4, n).astype(np.float32), list(range(n))):
      call(jax.tree_util.Partial(eps_fn, jnp.float32(0.9 + seed)), jax.random.key(seed),
           labels, guidance_weight=w, s_churn=float(seed))  # Traced, as v and eta.
  assert len(traces) == count
  # The bound parameter really reaches the computation.
  again = call(jax.tree_util.Partial(eps_fn, jnp.float32(0.5)), jax.random.key(0),
               per_class_labels(4), guidance_weight=1.0)
  assert np.abs(np.asarray(again) - np.asarray(first)).max() > 0.1


def test_sample_inside_jit_matches_eager():
  labels = per_class_labels(20)
  w = np.linspace(0, 2, len(labels)).astype(np.float32)

  @jax.jit
  def sample_in_jit(rng, labels, w):
    return sampling.sample(toy2d.exact_eps, rng, labels, shape=(2,), guidance_weight=w,
                           null_label=C, num_steps=16)

  np.testing.assert_allclose(sample_in_jit(jax.random.key(2), labels, w),
                             run(labels, w, 16, seed=2), rtol=1e-5, atol=1e-5)


# ---- input validation ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"labels": np.array([0, 4], np.int32)}, "labels"),
    ({"labels": np.array([-1, 0], np.int32)}, "labels"),
    ({"labels": np.array([0.0, 1.0])}, "labels"),
    ({"num_steps": 0}, "num_steps"),
    ({"v": 1.5}, "v"),
    ({"v": -0.1}, "v"),
    ({"logsnr_min": 5.0, "logsnr_max": 5.0}, "logsnr_min"),
    ({"guidance_weight": np.ones(3)}, "guidance_weight"),
    ({"sampler": "euler"}, "sampler"),
    ({"clip_x": "sometimes"}, "clip_x"),
    ({"negative_labels": np.array([0, 7], np.int32)}, "negative_labels"),
    ({"guidance_interval": (3.0, -3.0)}, "guidance_interval"),
    ({"z_init": np.zeros((2, 3), np.float32)}, "z_init"),
])
def test_bad_input_raises_naming_the_argument(kwargs, name):
  args = {"labels": np.array([0, 3], np.int32), "guidance_weight": 1.0, "num_steps": 2}
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    sampling.sample(toy2d.exact_eps, jax.random.key(0), args.pop("labels"), shape=(2,),
                    null_label=C, **args)


def test_unknown_option_raises():
  with pytest.raises(TypeError, match="guidance_scale"):
    sampling.sample(toy2d.exact_eps, jax.random.key(0), np.zeros(2, np.int32), shape=(2,),
                    guidance_weight=1.0, null_label=C, guidance_scale=2.0)


def test_per_example_keys_make_samples_independent_of_the_batch():
  """With one key per example, a sample is the same whether drawn alone or in a batch."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(5), jnp.arange(6))
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  kwargs = dict(shape=(2,), guidance_weight=1.5, null_label=toy2d.NULL_LABEL, num_steps=16)
  full = sampling.sample(toy2d.exact_eps, keys, labels, **kwargs)
  part = sampling.sample(toy2d.exact_eps, keys[2:5], labels[2:5], **kwargs)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full[2:5]), rtol=1e-6, atol=1e-6)
  other = sampling.sample(toy2d.exact_eps, keys[::-1], labels, **kwargs)
  assert not np.allclose(np.asarray(other), np.asarray(full))
  with pytest.raises(ValueError, match="rng"):
    sampling.sample(toy2d.exact_eps, keys[:4], labels, **kwargs)
