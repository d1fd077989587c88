"""Tests for cfg_guidance.guidance: each rule against its paper's equation in float64.

References, written here in float64 numpy from the papers: Eq. 6; Lin et al. 2023, Alg. 2
(CFG rescale); Sadat et al. 2024, Alg. 1 (APG, in its own scale s = 1 + w, momentum over
several steps); Karras et al. 2024 (autoguidance); the paper's §3.1 (classifier guidance)
with the toy mixture's exact class posterior, whose gradient turns it into Eq. 6 (§3.2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from cfg_guidance import config as config_lib
from cfg_guidance import generate, guidance, sampling
from cfg_guidance.data import toy2d
from sampling_test import np_alpha2, np_eps, np_schedule, per_class_labels

C = toy2d.NUM_CLASSES
SHAPE = (4, 4, 3)


def alpha_sigma(logsnr):
  return np.sqrt(np_alpha2(logsnr)), np.sqrt(np_alpha2(-logsnr))


def expand(a, x):
  return np.reshape(a, (-1,) + (1,) * (x.ndim - 1))


def random_predictions(seed, n=6, shape=SHAPE, logsnr=None):
  """float64 (z, logsnr, eps_cond, eps_neg, grad) and the float32 Predictions of them."""
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((n, *shape))
  logsnr = rng.uniform(-6, 6, n) if logsnr is None else np.full(n, logsnr, np.float64)
  eps_cond = rng.standard_normal((n, *shape))
  eps_neg = eps_cond + 0.5 * rng.standard_normal((n, *shape))
  grad = rng.standard_normal((n, *shape))
  ref = (z, logsnr, eps_cond, eps_neg, grad)
  pred = guidance.Predictions(*(jnp.asarray(a, jnp.float32) for a in ref))
  return ref, pred


def combine(name, pred, w, state=(), **params):
  rule, params = guidance.resolve(name, params, pred.z.shape[0])
  eps, state = rule.combine(pred, jnp.asarray(w, jnp.float32), params, state)
  return np.asarray(eps, np.float64), state


def assert_eps_close(got, want):
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


# ---- float64 write-outs of the papers ------------------------------------------------------

def np_x(z, eps, logsnr):
  a, s = alpha_sigma(expand(logsnr, z))
  return (z - s * eps) / a


def np_eps_of_x(z, x, logsnr):
  a, s = alpha_sigma(expand(logsnr, z))
  return (z - a * x) / s


def np_eps_rows(z, logsnr, labels):
  """sampling_test's float64 mixture ε*, at one λ per example."""
  return np.concatenate([np_eps(z[i:i + 1], logsnr[i], labels[i:i + 1])
                         for i in range(len(z))])


def np_cfg(eps_cond, eps_neg, w):
  w = expand(w, eps_cond)
  return (1 + w) * eps_cond - w * eps_neg


def np_cfg_rescale(z, logsnr, eps_cond, eps_neg, w, phi):
  """Lin et al. 2023, Alg. 2, on x̂: their guidance scale is 1 + w; torch's std (ddof=1)."""
  pos, neg = np_x(z, eps_cond, logsnr), np_x(z, eps_neg, logsnr)
  cfg = neg + expand(1 + w, z) * (pos - neg)
  axes = tuple(range(1, z.ndim))
  std_pos = pos.std(axis=axes, ddof=1, keepdims=True)
  std_cfg = cfg.std(axis=axes, ddof=1, keepdims=True)
  factor = expand(phi, z) * std_pos / std_cfg + (1 - expand(phi, z))
  return np_eps_of_x(z, cfg * factor, logsnr)


class NpMomentumBuffer:
  """Sadat et al. 2024, Alg. 1's MomentumBuffer."""

  def __init__(self, momentum):
    self.momentum, self.running_average = momentum, 0.0

  def update(self, value):
    self.running_average = value + self.momentum * self.running_average


def np_apg(z, logsnr, eps_cond, eps_neg, w, eta, threshold, buffer):
  """Sadat et al. 2024, Alg. 1, on x̂, with their guidance scale s = 1 + w."""
  pred_cond, pred_uncond = np_x(z, eps_cond, logsnr), np_x(z, eps_neg, logsnr)
  buffer.update(pred_cond - pred_uncond)
  diff = buffer.running_average
  axes = tuple(range(1, z.ndim))
  norm = np.sqrt(np.sum(diff**2, axis=axes, keepdims=True))
  diff = diff * np.minimum(1.0, expand(threshold, z) / norm)
  v1 = pred_cond / np.sqrt(np.sum(pred_cond**2, axis=axes, keepdims=True))
  parallel = np.sum(diff * v1, axis=axes, keepdims=True) * v1
  update = (diff - parallel) + expand(eta, z) * parallel
  guidance_scale = 1 + expand(w, z)
  return np_eps_of_x(z, pred_cond + (guidance_scale - 1) * update, logsnr)


# ---- each rule against its equation ---------------------------------------------------------

def test_cfg_is_eq6():
  (z, logsnr, ec, en, _), pred = random_predictions(0)
  w = np.linspace(-0.5, 4, len(z))
  got, state = combine("cfg", pred, w)
  assert_eps_close(got, np_cfg(ec, en, w))
  assert state == ()


@pytest.mark.parametrize("logsnr", [None, -15.0, 15.0])
def test_cfg_rescale_is_lin_et_al_algorithm2(logsnr):
  (z, lam, ec, en, _), pred = random_predictions(1, logsnr=logsnr)
  w = np.linspace(0, 6, len(z))
  phi = np.linspace(0, 1, len(z))
  got, _ = combine("cfg_rescale", pred, w, phi=phi)
  want = np_cfg_rescale(z, lam, ec, en, w, phi)
  # Compare in x̂ too: at λ = 15 ε carries x̂'s error times α/σ = e^7.5.
  np.testing.assert_allclose(np_x(z, got, lam), np_x(z, want, lam), rtol=1e-4, atol=1e-4)
  if logsnr is None:
    assert_eps_close(got, want)
  # The rescale really acts: φ = 1 matches the conditional x̂'s std.
  full, _ = combine("cfg_rescale", pred, w, phi=1.0)
  x_full, x_pos = np_x(z, full, lam), np_x(z, ec, lam)
  np.testing.assert_allclose(x_full.reshape(len(z), -1).std(1),
                             x_pos.reshape(len(z), -1).std(1), rtol=1e-4)


def test_apg_is_sadat_et_al_algorithm1_with_momentum_over_steps():
  n, steps = 6, 5
  w = np.linspace(0.5, 5, n)
  eta = np.array([0.0, 0.0, 0.3, 1.0, 0.0, 2.0])
  # Per example: caps that bind (small r), ones that never do (inf), momentum on and off.
  threshold = np.array([0.5, np.inf, 2.0, 0.5, 1e3, 1.0])
  momentum = np.array([-0.5, -0.5, 0.0, -0.75, 0.5, -0.25])
  rule, params = guidance.resolve(
      "apg", {"eta": eta, "threshold": threshold, "momentum": momentum}, n)
  buffer = NpMomentumBuffer(expand(momentum, np.zeros((n, *SHAPE))))
  state = rule.init_state(jnp.zeros((n, *SHAPE), jnp.float32))
  clipped = 0
  for step, lam in enumerate(np.linspace(-4, 4, steps)):
    (z, lams, ec, en, _), pred = random_predictions(10 + step, n, logsnr=lam)
    eps, state = rule.combine(pred, jnp.asarray(w, jnp.float32), params, state)
    want = np_apg(z, lams, ec, en, w, eta, threshold, buffer)
    np.testing.assert_allclose(np.asarray(state), buffer.running_average, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(np_x(z, np.asarray(eps, np.float64), lams),
                               np_x(z, want, lams), rtol=1e-4, atol=1e-4)
    norms = np.sqrt(np.sum(buffer.running_average**2, axis=(1, 2, 3)))
    clipped += np.sum(norms > threshold)
  assert clipped >= 5  # The threshold was exercised, not only the momentum.


def test_classifier_rule_is_section_3_1_on_top_of_eq6():
  (z, lam, ec, en, grad), pred = random_predictions(3)
  w = np.array([0.0, 0.0, 1.0, 2.0, 0.5, 3.0])
  s = np.array([1.0, 3.0, 0.0, 2.0, -1.0, 0.5])
  got, _ = combine("classifier", pred, w, scale=s)
  _, sigma = alpha_sigma(lam)
  want = np_cfg(ec, en, w) - expand(s * sigma, z) * grad
  assert_eps_close(got, want)


def test_autoguidance_is_karras_et_al_with_a_second_eps_fn_at_c():
  rng = np.random.default_rng(4)
  n = 8
  z = rng.standard_normal((n, 2)).astype(np.float32)
  lam = rng.uniform(-5, 5, n).astype(np.float32)
  labels = rng.integers(0, C + 1, n).astype(np.int32)
  w = np.linspace(0, 3, n).astype(np.float32)
  bad_means = toy2d.MEANS * 0.7  # A worse model of the same data: means pulled in.
  bad = functools.partial(toy2d.exact_eps, means=bad_means, std=0.8)
  seen = []

  def bad_eps_fn(z, logsnr, labels):
    seen.append(labels)
    return bad(z, logsnr, labels)

  got, _ = sampling.guided_eps(toy2d.exact_eps, jnp.asarray(z), jnp.asarray(lam), labels,
                               np.full(n, C, np.int32), w, guidance_rule="autoguidance",
                               negative_eps_fn=bad_eps_fn)
  good = np_eps_rows(z.astype(np.float64), lam.astype(np.float64), labels)
  eps_bad = np.asarray(bad(z, lam, labels), np.float64)
  want = good + w[:, None] * (good - eps_bad)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(seen[0], labels)  # The bad model sees c, not ∅.


# ---- reductions ---------------------------------------------------------------------------

def test_rules_reduce_to_cfg():
  (z, lam, ec, en, _), pred = random_predictions(5)
  w = np.linspace(0, 4, len(z))
  cfg, _ = combine("cfg", pred, w)
  rescale0, _ = combine("cfg_rescale", pred, w, phi=0.0)
  np.testing.assert_allclose(rescale0, cfg, rtol=1e-5, atol=1e-5)
  classifier0, _ = combine("classifier", pred, w, scale=0.0)
  np.testing.assert_array_equal(classifier0, cfg)
  # APG with η = 1, r = ∞, β = 0 is CFG at every step (the state then plays no part).
  rule, params = guidance.resolve("apg", {"eta": 1.0, "threshold": np.inf,
                                          "momentum": 0.0}, len(z))
  state = rule.init_state(pred.z)
  for step in range(3):
    (_, _, ec, en, _), pred = random_predictions(20 + step)
    eps, state = rule.combine(pred, jnp.asarray(w, jnp.float32), params, state)
    np.testing.assert_allclose(eps, np_cfg(ec, en, w), rtol=1e-5, atol=1e-5)


def sample_toy(labels, w, num_steps=12, sampler="ddim", seed=0, **options):
  z_init = np.random.default_rng(seed).standard_normal((len(labels), 2)).astype(np.float32)
  return np.asarray(sampling.sample(
      toy2d.exact_eps, jax.random.key(seed), labels, shape=(2,), guidance_weight=w,
      null_label=C, num_steps=num_steps, sampler=sampler, z_init=z_init, logsnr_min=-10.0,
      logsnr_max=10.0, **options), np.float64)


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_reductions_hold_through_the_sampler(sampler):
  labels = per_class_labels(4)
  w = np.linspace(0, 4, len(labels)).astype(np.float32)
  cfg = sample_toy(labels, w, sampler=sampler)
  apg = sample_toy(labels, w, sampler=sampler, guidance="apg",
                   guidance_params={"eta": 1.0, "threshold": np.inf, "momentum": 0.0})
  np.testing.assert_allclose(apg, cfg, atol=1e-4)
  rescale = sample_toy(labels, w, sampler=sampler, guidance="cfg_rescale",
                       guidance_params={"phi": 0.0})
  np.testing.assert_allclose(rescale, cfg, atol=1e-4)
  # Autoguidance by the good model itself: no guidance signal, whatever w.
  self_guided = functools.partial(sample_toy, labels, sampler=sampler,
                                  guidance="autoguidance", negative_eps_fn=toy2d.exact_eps)
  np.testing.assert_array_equal(self_guided(w), self_guided(0.0))
  # The plain sampler at w = 0 (its one call on 2N instead of two on N rounds apart).
  np.testing.assert_allclose(self_guided(w), sample_toy(labels, 0.0, sampler=sampler),
                             atol=1e-4)
  assert np.abs(cfg - sample_toy(labels, 0.0, sampler=sampler)).max() > 0.1


def np_ddim_apg(z, labels, w, eta, threshold, momentum, num_steps, interval):
  """Deterministic DDIM with APG (float64), the buffer advancing at each guided step."""
  buffer = NpMomentumBuffer(expand(momentum, z))
  for t, lam in enumerate(np_schedule(num_steps, -10.0, 10.0)):
    lams = np.full(len(z), lam)
    ec, en = np_eps(z, lam, labels), np_eps(z, lam, np.full_like(labels, C))
    if interval[0] <= lam <= interval[1]:
      eps = np_apg(z, lams, ec, en, w, eta, threshold, buffer)
    else:
      eps = ec
    x = np_x(z, eps, lams)
    if t == num_steps - 1:
      return x
    a, s = alpha_sigma(np_schedule(num_steps, -10.0, 10.0)[t + 1])
    z = a * x + s * eps


def test_apg_momentum_rides_the_sampler_carry():
  labels = per_class_labels(4)
  n = len(labels)
  w = np.linspace(1, 4, n)
  eta = np.tile([0.0, 0.5], n // 2)
  threshold = np.tile([np.inf, 1.0, 3.0], n // 3)
  momentum = np.full(n, -0.5)
  interval = (-6.0, 8.0)
  params = {"eta": eta, "threshold": threshold, "momentum": momentum}
  got = sample_toy(labels, w, num_steps=10, guidance="apg", guidance_params=params,
                   guidance_interval=interval)
  z_init = np.random.default_rng(0).standard_normal((n, 2))
  want = np_ddim_apg(z_init, labels, w, eta, threshold, momentum, 10, interval)
  np.testing.assert_allclose(got, want, atol=2e-3)
  no_momentum = sample_toy(labels, w, num_steps=10, guidance="apg",
                           guidance_params={**params, "momentum": 0.0},
                           guidance_interval=interval)
  assert np.abs(no_momentum - got).max() > 1e-2


# ---- classifier guidance with the exact posterior is CFG (§3.2) ------------------------------

def np_grad_log_posterior(z, logsnr, labels, prior=None):
  """∇_z log p(c | z_λ) of the noised mixture, closed form: z | c ~ N(α μ_c, τ² I) with
  τ² = α² s² + σ², so ∇ log p(c | z) = α (μ_c − Σ_k p(k | z) μ_k) / τ²."""
  alpha2, sigma2 = np_alpha2(logsnr), np_alpha2(-logsnr)
  tau2 = alpha2 * toy2d.STD**2 + sigma2
  means = np.sqrt(alpha2)[:, None, None] * toy2d.MEANS.astype(np.float64)[None]
  prior = np.full(C, 1 / C) if prior is None else prior
  logits = np.log(prior) - 0.5 * np.sum((z[:, None] - means)**2, -1) / tau2[:, None]
  resp = special.softmax(logits, axis=1)
  mean_c = means[np.arange(len(z)), labels]
  return (mean_c - np.einsum("mk,mkd->md", resp, means)) / tau2[:, None]


def exact_logits(z, logsnr):
  """classifier_fn: the exact log p(c | z_λ) (uniform prior) as logits."""
  return toy2d.log_class_posterior(z, logsnr)


@pytest.mark.parametrize("logsnr", [-12.0, -4.0, 0.0, 3.0, 8.0])
def test_classifier_guidance_with_the_exact_posterior_is_cfg(logsnr):
  rng = np.random.default_rng(6)
  n = 12
  z = (2 * rng.standard_normal((n, 2))).astype(np.float32)
  lam = np.full(n, logsnr, np.float32)
  labels = np.tile(np.arange(C), n // C).astype(np.int32)
  s = np.linspace(0, 5, n).astype(np.float32)
  null = np.full(n, C, np.int32)
  classifier, _ = sampling.guided_eps(
      toy2d.exact_eps, z, lam, labels, null, np.zeros(n, np.float32),
      guidance_rule="classifier", guidance_params={"scale": s}, classifier_fn=exact_logits)
  cfg, _ = sampling.guided_eps(toy2d.exact_eps, z, lam, labels, null, s)
  np.testing.assert_allclose(classifier, cfg, rtol=1e-4, atol=1e-5)
  # Independently, in float64: ε(z, c) − s σ ∇ log p(c | z) = (1 + s) ε(z, c) − s ε(z).
  z64, lam64, s64 = z.astype(np.float64), lam.astype(np.float64), s.astype(np.float64)
  _, sigma = alpha_sigma(lam64)
  classifier64 = (np_eps_rows(z64, lam64, labels)
                  - (s64 * sigma)[:, None] * np_grad_log_posterior(z64, lam64, labels))
  cfg64 = np_cfg(np_eps_rows(z64, lam64, labels), np_eps_rows(z64, lam64, null), s64)
  np.testing.assert_allclose(classifier64, cfg64, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(classifier, classifier64, rtol=1e-4, atol=1e-5)
  # The jax.grad inside the sampler is the closed-form gradient.
  grad = guidance.classifier_grad(exact_logits, z, lam, labels)
  np.testing.assert_allclose(grad, np_grad_log_posterior(z64, lam64, labels), rtol=1e-4,
                             atol=1e-6)


def test_classifier_guidance_samples_are_cfg_samples():
  labels = per_class_labels(4)
  s = np.linspace(0, 3, len(labels)).astype(np.float32)
  cfg = sample_toy(labels, s)
  classifier = sample_toy(labels, 0.0, guidance="classifier", guidance_params={"scale": s},
                          classifier_fn=exact_logits)
  np.testing.assert_allclose(classifier, cfg, atol=1e-4)
  # ∅'s examples get no classifier gradient: unconditional samples stay unguided.
  null = np.full(3, C, np.int32)
  np.testing.assert_allclose(
      sample_toy(null, 0.0, guidance="classifier", guidance_params={"scale": 4.0},
                 classifier_fn=exact_logits), sample_toy(null, 0.0), atol=1e-6)


def test_grad_with_a_prior_matches_finite_differences():
  # The closed form above, checked against central differences of log p(c | z).
  rng = np.random.default_rng(7)
  z, lam = rng.standard_normal((6, 2)), np.full(6, 1.5)
  labels = np.arange(6) % C
  prior = np.array([0.5, 0.3, 0.2])

  def log_post(z):
    alpha2, sigma2 = np_alpha2(lam), np_alpha2(-lam)
    tau2 = alpha2 * toy2d.STD**2 + sigma2
    means = np.sqrt(alpha2)[:, None, None] * toy2d.MEANS.astype(np.float64)[None]
    logits = np.log(prior) - 0.5 * np.sum((z[:, None] - means)**2, -1) / tau2[:, None]
    return special.log_softmax(logits, axis=1)[np.arange(len(z)), labels]

  h = 1e-6
  numeric = np.stack([(log_post(z + h * e) - log_post(z - h * e)) / (2 * h)
                      for e in np.eye(2)], -1)
  np.testing.assert_allclose(np_grad_log_posterior(z, lam, labels, prior), numeric,
                             rtol=1e-6, atol=1e-8)


def test_the_driver_passes_the_rule_its_parameters_and_networks_through():
  settings = generate.Settings(shape=(2,), null_label=C, num_steps=8, sampler="ddim",
                               clip_x="none", logsnr_min=-10.0, logsnr_max=10.0)
  labels = per_class_labels(4)
  s = 2.0
  cfg = generate.draw(toy2d.exact_eps, labels, s, settings=settings, seed=3)
  classifier = generate.draw(
      toy2d.exact_eps, labels, 0.0, seed=3, classifier_fn=exact_logits,
      settings=settings.replace(guidance="classifier", guidance_params={"scale": s}))
  np.testing.assert_allclose(classifier, cfg, atol=1e-4)
  self_guided = generate.draw(toy2d.exact_eps, labels, s, seed=3,
                              negative_eps_fn=toy2d.exact_eps,
                              settings=settings.replace(guidance="autoguidance"))
  plain = generate.draw(toy2d.exact_eps, labels, 0.0, settings=settings, seed=3)
  np.testing.assert_allclose(self_guided, plain, atol=1e-4)
  assert np.abs(cfg - plain).max() > 0.1


# ---- compilation ----------------------------------------------------------------------------

def scaled_eps(traces, scale, z, logsnr, labels):
  traces.append(1)
  return scale * toy2d.exact_eps(z, logsnr, labels)


def scaled_logits(scale, z, logsnr):
  return scale * toy2d.log_class_posterior(z, logsnr)


@pytest.mark.parametrize("rule, values", [
    ("cfg_rescale", [{"phi": 0.0}, {"phi": 0.7}, {"phi": np.linspace(0, 1, 12)}]),
    ("apg", [{"eta": 1.0}, {"eta": 0.0, "threshold": 2.0, "momentum": -0.5},
             {"eta": np.linspace(0, 1, 12), "momentum": np.linspace(-0.9, 0, 12)}]),
    ("autoguidance", [{}, {}, {}]),
    ("classifier", [{"scale": 0.0}, {"scale": 2.0}, {"scale": np.arange(12.0)}]),
])
def test_no_retrace_across_rule_parameters_and_second_networks(rule, values):
  traces = []
  eps_fn = jax.tree_util.Partial(functools.partial(scaled_eps, traces), jnp.float32(1.0))
  bad_fn = functools.partial(scaled_eps, [])  # One function object: Partial keys on it.
  n = 12
  labels = np.arange(n, dtype=np.int32) % C

  def extra(k):
    if rule == "autoguidance":  # Another checkpoint: new parameters, same function.
      return {"negative_eps_fn": jax.tree_util.Partial(bad_fn, jnp.float32(0.8 - 0.1 * k))}
    if rule == "classifier":
      return {"classifier_fn": jax.tree_util.Partial(scaled_logits, jnp.float32(1.0 + k))}
    return {}

  call = functools.partial(sampling.sample, eps_fn, jax.random.key(0), labels, shape=(2,),
                           null_label=C, num_steps=4, guidance=rule, logsnr_min=-6.0,
                           logsnr_max=6.0)
  outputs = [np.asarray(call(guidance_weight=1.0 + k, guidance_params=p, **extra(k)))
             for k, p in enumerate(values)]
  count = len(traces)
  for k, p in enumerate(values):
    call(guidance_weight=np.linspace(0, 3, n), guidance_params=p, **extra(k))
  assert len(traces) == count
  # The parameters reach the computation.
  assert np.abs(outputs[1] - outputs[0]).max() > 1e-3


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"guidance": "cfg++"}, "guidance must be one of .*'cfg_rescale'"),
    ({"guidance": "cfg_rescale", "guidance_params": {"phi": 1.5}}, r"\['phi'\].*\[0, 1\]"),
    ({"guidance": "cfg_rescale", "guidance_params": {"eta": 1.0}}, r"\['eta'\].*\['phi'\]"),
    ({"guidance": "cfg", "guidance_params": {"phi": 0.5}}, r"\['phi'\].*'cfg'"),
    ({"guidance": "apg", "guidance_params": {"threshold": 0.0}}, r"threshold.*\(0, inf\]"),
    ({"guidance": "apg", "guidance_params": {"momentum": -2.0}}, r"momentum.*\[-1, 1\]"),
    ({"guidance": "apg", "guidance_params": {"eta": np.nan}}, "eta"),
    ({"guidance": "apg", "guidance_params": {"eta": np.zeros(3)}}, r"eta.*shape \[2\]"),
    ({"guidance": "apg", "guidance_params": [0.0]}, "guidance_params must be a mapping"),
    ({"guidance": "autoguidance"}, "needs the negative_eps_fn"),
    ({"guidance": "classifier"}, "needs the classifier_fn"),
    ({"classifier_fn": exact_logits}, "takes no classifier_fn"),
    ({"negative_eps_fn": toy2d.exact_eps}, "takes no negative_eps_fn"),
    ({"guidance": "autoguidance", "negative_eps_fn": toy2d.exact_eps,
      "negative_labels": 1}, "negative_labels"),
])
def test_bad_rules_and_parameters_raise_naming_them(options, match):
  with pytest.raises(ValueError, match=match):
    sampling.sample(toy2d.exact_eps, jax.random.key(0), np.array([0, 1], np.int32),
                    shape=(2,), guidance_weight=1.0, null_label=C, num_steps=2, **options)


def test_config_fields_choose_the_rule_and_its_parameters():
  config = config_lib.get_config()
  # The config's defaults are the rules' own.
  for name in config_lib.GUIDANCE_RULES:
    for key, param in guidance.RULES[name].params.items():
      assert config.sample[f"{name}_{key}"] == param.default
  config.sample.guidance = "apg"
  config.sample.apg_momentum = -0.5
  settings = generate.settings_from_config(config, num_steps=4)
  assert settings.guidance == "apg"
  assert settings.guidance_params == {"eta": 0.0, "threshold": np.inf, "momentum": -0.5}
  config_lib.check_sampler(config, "sample.num_steps")
  config.sample.apg_threshold = -1.0
  with pytest.raises(ValueError, match=r"config.sample.apg_threshold=-1.0 must be"):
    config_lib.check_sampler(config, "sample.num_steps")
  config.sample.guidance = "autoguidance"  # Its second network is not a config field.
  with pytest.raises(ValueError, match="config.sample.guidance="):
    config_lib.check_sampler(config, "sample.num_steps")
