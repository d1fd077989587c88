"""Guidance rules: the guided ε̃ from the branches' predictions at one λ, chosen by name.

A rule is a pure function `combine(pred, w, params, state) -> (eps, state)` of the
branches' predictions `pred` (ε(z, c), the negative branch, and for classifier guidance
∇_z log p(c | z_λ)), the guidance weight w: [N], its own parameters `params` (each [N],
traced, so a sweep over them compiles once) and a state carried across the sampler's
evaluations (APG's momentum; () for the others). `RULES` maps each name to its rule and
to what the sampler must evaluate for it.
"""

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import diffusion


class Predictions(NamedTuple):
  """What a rule combines at one λ. z, eps_*: [N, *shape]; logsnr: [N]."""
  z: jax.Array
  logsnr: jax.Array
  eps_cond: jax.Array  # ε(z, c).
  eps_neg: jax.Array  # ε(z, c⁻) of the same network (c⁻ = ∅), or a bad model's ε(z, c).
  grad_log_prob: Any = None  # ∇_z log p(c | z_λ) of a classifier ("classifier" only).


def _no_state(z):
  del z
  return ()


def _sum_sq(x):
  """Σ x² per example over all but the batch axis, shaped to broadcast against x."""
  return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True)


def cfg(pred, w, params, state):
  """ε̃ = (1 + w) ε(z, c) − w ε(z, c⁻) (Eq. 6)."""
  del params
  w = diffusion.expand_to(w, pred.z)
  return (1.0 + w) * pred.eps_cond - w * pred.eps_neg, state


def autoguidance(pred, w, params, state):
  """ε̃ = ε_good(z, c) + w (ε_good(z, c) − ε_bad(z, c)) (Karras et al. 2024: their
  w D_good + (1 − w) D_bad, with their w = 1 + ours): Eq. 6 with a worse model's ε at the
  same c as the negative branch, written so that bad = good gives ε_good exactly."""
  del params
  return pred.eps_cond + diffusion.expand_to(w, pred.z) * (pred.eps_cond - pred.eps_neg), state


def cfg_rescale(pred, w, params, state):
  """CFG with the std rescale of Lin et al. 2023 (Alg. 2), in the x̂ space.

  x_cfg = x̂ of Eq. 6's ε̃; x_rescaled = x_cfg std(x_pos)/std(x_cfg) with x_pos = x̂(ε(z, c))
  and std per example over all but the batch axis; x̃ = φ x_rescaled + (1 − φ) x_cfg,
  returned as its ε̃ = (z − α x̃)/σ. The paper rescales its model's (v-) prediction; x̂ is
  the prediction an ε-model's sampler steps with (and thresholding clips), so φ acts on
  the image's statistics as the paper intends. φ = 0 is CFG.
  """
  eps_cfg, state = cfg(pred, w, params, state)
  x_pos = diffusion.predict_x_from_eps(pred.z, pred.eps_cond, pred.logsnr)
  x_cfg = diffusion.predict_x_from_eps(pred.z, eps_cfg, pred.logsnr)
  axes = tuple(range(1, x_cfg.ndim))
  std_pos = jnp.std(x_pos, axis=axes, keepdims=True)
  std_cfg = jnp.std(x_cfg, axis=axes, keepdims=True)
  ratio = jnp.where(std_cfg > 0, std_pos / jnp.where(std_cfg > 0, std_cfg, 1.0), 1.0)
  phi = diffusion.expand_to(params["phi"], x_cfg)
  x_final = phi * (ratio * x_cfg) + (1.0 - phi) * x_cfg
  return diffusion.predict_eps_from_x(pred.z, x_final, pred.logsnr), state


def apg(pred, w, params, state):
  """Adaptive projected guidance (Sadat et al. 2024, Alg. 1), in the x̂ space.

  Δ = x̂(z, c) − x̂(z, c⁻); momentum D = Δ + β D_prev (the state; the paper's β < 0, e.g.
  −0.5); Δ = D min(1, r/‖D‖); Δ = Δ_∥ + Δ_⊥ with Δ_∥ its projection on x̂(z, c);
  x̃ = x̂(z, c) + w (Δ_⊥ + η Δ_∥). The paper writes (s − 1) for our w (its CFG scale is
  s = 1 + w), so η = 1, r = ∞, β = 0 is CFG. Norms and projections are per example over
  all but the batch axis. ε̃ = (z − α x̃)/σ = ε(z, c) − (α/σ) w (Δ_⊥ + η Δ_∥), with
  Δ = (σ/α)(ε(z, c⁻) − ε(z, c)), is computed without a round trip through x̃, which
  loses digits where α/σ = e^(λ/2) is far from 1. The sampler carries D from one guided
  evaluation to the next (Heun's steps make two).
  """
  z, eps_cond = pred.z, pred.eps_cond
  expand = lambda a: diffusion.expand_to(a, z)
  sigma_over_alpha = jnp.exp(-0.5 * expand(pred.logsnr))
  delta = sigma_over_alpha * (pred.eps_neg - eps_cond)
  running = delta + expand(params["momentum"]) * state
  norm = jnp.sqrt(_sum_sq(running))
  threshold = expand(params["threshold"])
  delta = running * jnp.where(norm > threshold, threshold / jnp.where(norm > 0, norm, 1.0),
                              1.0)
  x_cond = diffusion.predict_x_from_eps(z, eps_cond, pred.logsnr)
  x_sq = _sum_sq(x_cond)
  coef = jnp.sum(delta * x_cond, axis=tuple(range(1, z.ndim)), keepdims=True)
  parallel = jnp.where(x_sq > 0, coef / jnp.where(x_sq > 0, x_sq, 1.0), 0.0) * x_cond
  update = (delta - parallel) + expand(params["eta"]) * parallel
  return eps_cond - expand(w) / sigma_over_alpha * update, running


def _apg_state(z):
  return jnp.zeros_like(z)  # The paper's running average starts at 0.


def classifier(pred, w, params, state):
  """Classifier guidance (Dhariwal & Nichol 2021; the paper's §3.1) on top of Eq. 6:

  ε̃ = (1 + w) ε(z, c) − w ε(z, c⁻) − s σ_λ ∇_z log p(c | z_λ); w = 0 is the paper's
  ε(z, c) − s σ ∇ log p(c | z_λ). Both branches are evaluated whatever w, so that one
  program serves every (w, s).
  """
  eps, state = cfg(pred, w, params, state)
  _, sigma = diffusion.alpha_sigma(pred.logsnr)
  scale = diffusion.expand_to(params["scale"] * sigma, pred.z)
  return eps - scale * pred.grad_log_prob, state


def classifier_grad(classifier_fn, z, logsnr, labels):
  """∇_z log p(c | z_λ) of `classifier_fn(z, logsnr) -> logits [N, K]`: [N, *shape].

  The gradient of Σ_i log_softmax(logits)[i, c_i]: example i's own, for a classifier
  that treats examples independently. Labels ≥ K (∅) get a zero gradient.
  """
  def log_prob(z):
    logits = classifier_fn(z, logsnr)
    num_classes = logits.shape[-1]
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                 jnp.minimum(labels, num_classes - 1)[:, None], axis=-1)
    return jnp.sum(jnp.where(labels < num_classes, picked[:, 0], 0.0))
  return jax.grad(log_prob)(z)


class Param(NamedTuple):
  """A rule's parameter: its default and its allowed range [lo, hi] (lo excluded when
  `lo_open`); infinite bounds admit infinite values only if `infinite`."""
  default: float
  lo: float = -math.inf
  hi: float = math.inf
  lo_open: bool = False
  infinite: bool = False

  def describe(self):
    left = "[" if math.isfinite(self.lo) and not self.lo_open else "("
    right = "]" if math.isfinite(self.hi) or self.infinite else ")"
    return f"a number in {left}{self.lo:g}, {self.hi:g}{right}"

  def ok(self, values):
    if not np.issubdtype(np.asarray(values).dtype, np.number):
      return False
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values) | (self.infinite & (values == np.inf))
    above = values > self.lo if self.lo_open else values >= self.lo
    return bool(np.all(finite & above & (values <= self.hi)))


class Rule(NamedTuple):
  """A guidance rule, and what the sampler evaluates for it."""
  combine: Callable  # (pred, w, params, state) -> (eps, state).
  params: Mapping[str, Param]
  negative: str  # The negative branch: "labels" (eps_fn at c⁻) or "model" (a second eps_fn at c).
  classifier: bool = False  # Needs ∇_z log p(c | z_λ) from a classifier_fn.
  init_state: Callable = _no_state  # z_1 -> the state before the first evaluation.
  strengths: tuple[str, ...] = ()  # Parameters that, like w, are 0 where guidance is off.


RULES = {
    "cfg": Rule(cfg, {}, "labels"),
    "cfg_rescale": Rule(cfg_rescale, {"phi": Param(0.7, 0.0, 1.0)}, "labels"),
    "apg": Rule(apg, {"eta": Param(0.0),
                      "threshold": Param(math.inf, 0.0, lo_open=True, infinite=True),
                      "momentum": Param(0.0, -1.0, 1.0)}, "labels", init_state=_apg_state),
    "autoguidance": Rule(autoguidance, {}, "model"),
    "classifier": Rule(classifier, {"scale": Param(1.0)}, "labels", classifier=True,
                       strengths=("scale",)),
}


def resolve(name, params, n):
  """(the rule, its parameters as float32 [n] each, defaults filled in).

  Raises ValueError naming the option (`guidance`, `guidance_params[...]`) and what is
  allowed; values that are traced are not range-checked.
  """
  if not isinstance(name, str) or name not in RULES:
    raise ValueError(f"guidance must be one of {list(RULES)}, got {name!r}.")
  rule = RULES[name]
  params = {} if params is None else params
  if not isinstance(params, Mapping):
    raise ValueError(f"guidance_params must be a mapping of {name!r}'s parameters "
                     f"{list(rule.params)}, got {type(params).__name__}.")
  unknown = sorted(set(params) - set(rule.params))
  if unknown:
    raise ValueError(f"guidance_params {unknown} are not parameters of guidance={name!r}; "
                     f"it takes {list(rule.params) or 'none'}.")
  resolved = {}
  for key, spec in rule.params.items():
    value = params.get(key, spec.default)
    field = f"guidance_params[{key!r}]"
    if np.ndim(value) > 1 or (np.ndim(value) == 1 and np.shape(value)[0] != n):
      raise ValueError(f"{field} must be a scalar or have shape [{n}] (one per label), "
                       f"got shape {np.shape(value)}.")
    if not isinstance(value, jax.core.Tracer) and not spec.ok(value):
      raise ValueError(f"{field} of guidance={name!r} must be {spec.describe()}, got "
                       f"{np.unique(np.asarray(value)).tolist()}.")
    resolved[key] = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (n,))
  return rule, resolved
