"""Classifier-free guided sampling (Algorithm 2): guided ε, ancestral and DDIM steps, the loop.

`eps_fn(z, logsnr, labels) -> eps` with `z: [M, *shape]`, `logsnr: [M]`, `labels: [M]`.
Pass a `jax.tree_util.Partial` to bind arrays (e.g. model parameters): they cross the
jit boundary as leaves, so new parameters reuse the compiled sampler, e.g.
`Partial(apply, graphdef, state)` with a module-level `apply(graphdef, state, z, logsnr,
labels)`. A plain callable is keyed by identity: pass the same object to avoid retracing.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import diffusion

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class StepParams(NamedTuple):
  """Traced hyper-parameters of a step; changing them does not recompile."""
  v: jax.Array  # Eq. 4's log-space variance interpolation (ancestral).
  eta: jax.Array  # DDIM's noise scale: 0 deterministic, 1 the posterior variance.


class _Options(NamedTuple):
  """The `**options` of `sample`, with the paper's behaviour as defaults."""
  negative_labels: Any = None  # Label of the negative branch; None means ∅.
  guidance_interval: Any = None  # (λ_lo, λ_hi): guide only there; None means always.
  dynamic_percentile: float = 0.995  # Per-example |x̃| quantile for dynamic clipping.
  eta: float = 0.0  # DDIM noise scale.
  cond_uncond_batched: bool = True  # False: two eps_fn calls of N instead of one of 2N.
  z_init: Any = None  # Optional z_1: [N, *shape] in place of N(0, I) noise.


def guided_eps(eps_fn, z, logsnr, labels, negative_labels, w, *, batched=True):
  """ε̃ = (1 + w) ε(z, c) − w ε(z, c⁻) (Eq. 6), c⁻ = ∅ by default.

  z: [N, *shape]; logsnr, labels, negative_labels, w: [N]. `batched` evaluates both
  branches in ONE eps_fn call on 2N examples; otherwise two calls of N.
  """
  n = z.shape[0]
  logsnr = jnp.broadcast_to(logsnr, (n,))
  if batched:
    eps2 = eps_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                  jnp.concatenate([labels, negative_labels]))
    eps_cond, eps_neg = eps2[:n], eps2[n:]
  else:
    eps_cond = eps_fn(z, logsnr, labels)
    eps_neg = eps_fn(z, logsnr, negative_labels)
  w = diffusion.expand_to(w, z)
  return (1.0 + w) * eps_cond - w * eps_neg


def _dynamic_threshold(x, percentile):
  flat = jnp.abs(jnp.reshape(x, (x.shape[0], -1)))
  s = diffusion.expand_to(jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0), x)
  return jnp.clip(x, -s, s) / s


_THRESHOLDS = {
    "none": lambda x, percentile: x,
    "static": lambda x, percentile: jnp.clip(x, -1.0, 1.0),
    "dynamic": _dynamic_threshold,
}


def threshold_x(x, mode, percentile=0.995):
  """Clips x̃: [N, ...]. "none"; "static" to [−1, 1]; "dynamic" (Imagen's thresholding).

  Dynamic: s = max(1, quantile_p(|x̃|)) per example, then x̃ ← clip(x̃, −s, s) / s.
  """
  return _THRESHOLDS[mode](x, percentile)


def ancestral_step(z, x_pred, eps_pred, logsnr, logsnr_next, noise, params):
  """z_{t+1} ~ N(μ̃(z_t, x̃_t), Eq. 4 variance) (Algorithm 2, line 5). eps_pred unused."""
  del eps_pred
  mean, _ = diffusion.posterior(z, x_pred, logsnr, logsnr_next)
  var = diffusion.sampler_variance(logsnr, logsnr_next, params.v)
  return mean + jnp.sqrt(diffusion.expand_to(var, z)) * noise


def ddim_step(z, x_pred, eps_pred, logsnr, logsnr_next, noise, params):
  """DDIM (Song et al. 2021): z' = α' x̃ + σ' √(1 − η²(1 − r)) ε̂ + η σ̃ noise.

  η = 0 is deterministic; η = 1 reproduces the ancestral step with v = 0. eps_pred must
  be consistent with x_pred (recomputed after clipping).
  """
  del z
  expand = functools.partial(diffusion.expand_to, x=x_pred)
  alpha_next, sigma_next = diffusion.alpha_sigma(expand(logsnr_next))
  one_minus_r = -jnp.expm1(expand(logsnr) - expand(logsnr_next))
  eta2 = jnp.square(params.eta)
  eps_scale = sigma_next * jnp.sqrt(1.0 - eta2 * one_minus_r)
  noise_scale = jnp.sqrt(eta2 * one_minus_r) * sigma_next
  return alpha_next * x_pred + eps_scale * eps_pred + noise_scale * noise


STEPS = {"ancestral": ancestral_step, "ddim": ddim_step}


@functools.partial(
    jax.jit, static_argnames=("shape", "num_steps", "step_name", "clip_mode", "batched"))
def _sample_loop(eps_fn, rng, labels, negative_labels, w, logsnr_range, interval,
                 params, percentile, z_init, *, shape, num_steps, step_name, clip_mode,
                 batched):
  """The jitted Algorithm 2: a lax.scan over T steps, one eps_fn call per step."""
  step_fn = STEPS[step_name]
  n = labels.shape[0]
  logsnrs = diffusion.sampling_logsnrs(num_steps, logsnr_range[0], logsnr_range[1])
  # The last step's successor is never used (its z is discarded); repeat λ_T for shape.
  logsnrs_next = jnp.concatenate([logsnrs[1:], logsnrs[-1:]])
  if rng.ndim == 0:
    init_rng, loop_rng = jax.random.split(rng)
    draw = lambda key: jax.random.normal(key, (n, *shape), jnp.float32)
  else:  # One key per example: each example's noise is independent of the batch it is in.
    keys = jax.vmap(jax.random.split)(rng)
    init_rng, loop_rng = keys[:, 0], keys[:, 1]
    draw = jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))
  fold_in = (jax.vmap(jax.random.fold_in, in_axes=(0, None)) if rng.ndim
             else jax.random.fold_in)
  if z_init is None:
    z_init = draw(init_rng)

  def body(carry, xs):
    z, _ = carry
    t, logsnr, logsnr_next = xs
    in_interval = (logsnr >= interval[0]) & (logsnr <= interval[1])
    w_t = jnp.where(in_interval, w, 0.0)
    eps = guided_eps(eps_fn, z, jnp.full((n,), logsnr), labels, negative_labels, w_t,
                     batched=batched)
    x_pred = diffusion.predict_x_from_eps(z, eps, logsnr)
    if clip_mode != "none":
      x_pred = threshold_x(x_pred, clip_mode, percentile)
      eps = diffusion.predict_eps_from_x(z, x_pred, logsnr)
    noise = draw(fold_in(loop_rng, t))
    z_next = step_fn(z, x_pred, eps, logsnr, logsnr_next, noise, params)
    return (z_next, x_pred), None

  xs = (jnp.arange(num_steps), logsnrs, logsnrs_next)
  (_, x_pred), _ = jax.lax.scan(body, (z_init, jnp.zeros_like(z_init)), xs)
  return x_pred


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _check_labels(name, labels, n, null_label):
  """Checks `labels` (a scalar or [n] ints in [0, null_label]); returns int32 [n]."""
  if np.ndim(labels) > 1 or (np.ndim(labels) == 1 and np.shape(labels)[0] != n):
    raise ValueError(f"{name} must be a scalar or have shape [{n}], got {np.shape(labels)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(labels)}.")
  if _is_concrete(labels) and np.size(labels):
    values = np.asarray(labels)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > null_label:
      raise ValueError(f"{name} must lie in [0, null_label={null_label}], got values in "
                       f"[{lo}, {hi}].")
  return jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (n,))


def _float(name, value):
  """A Python float from a concrete scalar; None when traced (then unchecked)."""
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")
  return float(value) if _is_concrete(value) else None


def _check_range(name, value, lo, hi):
  value = _float(name, value)
  if value is not None and not lo <= value <= hi:
    raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}.")


def _clip_mode(clip_x):
  if clip_x is None:
    return "none"
  if isinstance(clip_x, (bool, np.bool_)):
    return "static" if clip_x else "none"
  if not isinstance(clip_x, str) or clip_x not in _THRESHOLDS:
    raise ValueError(f"clip_x must be False, True or one of {sorted(_THRESHOLDS)}, got "
                     f"{clip_x!r}.")
  return clip_x


def sample(eps_fn: EpsFn, rng, labels, *, shape, guidance_weight, null_label,
           num_steps=256, sampler="ancestral", v=0.3, logsnr_min=-20., logsnr_max=20.,
           clip_x=False, **options):
  """Draws x ~ p̃(x | c) with classifier-free guidance (Algorithm 2). Returns [N, *shape].

  Args:
    eps_fn: `eps_fn(z, logsnr, labels) -> eps`, a callable or `jax.tree_util.Partial`.
    rng: a PRNG key, or one key per example ([N] typed keys): then example i's noise
      comes from its own key alone, so it does not depend on the batch, device count
      or process count it is sampled with.
    labels: [N] ints in [0, null_label] (null_label samples unconditionally).
    shape: the per-example shape, e.g. (64, 64, 3).
    guidance_weight: w, a scalar or [N]; w = 0 is the plain conditional sampler.
    null_label: the index of ∅ (the number of classes).
    num_steps: T, static.
    sampler: "ancestral" (Algorithm 2) or "ddim".
    v: Eq. 4's variance interpolation in [0, 1] (ancestral only).
    logsnr_min, logsnr_max: the grid's end points λ_1 and λ_T.
    clip_x: False/"none", True/"static" (to [−1, 1]) or "dynamic" (thresholding).
    **options: `negative_labels` (scalar or [N], default ∅), `guidance_interval`
      ((λ_lo, λ_hi): guide only for λ inside, plain conditional outside),
      `dynamic_percentile` (0.995), `eta` (DDIM noise, 0.), `cond_uncond_batched`
      (True: one eps_fn call on 2N; False: two calls on N, same result, less memory),
      `z_init` ([N, *shape] replacing the initial N(0, I) draw).
  """
  unknown = set(options) - set(_Options._fields)
  if unknown:
    raise TypeError(f"sample() got unknown options {sorted(unknown)}; "
                    f"known: {list(_Options._fields)}.")
  opts = _Options(**options)
  if sampler not in STEPS:
    raise ValueError(f"sampler must be one of {sorted(STEPS)}, got {sampler!r}.")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
  if not isinstance(null_label, (int, np.integer)) or null_label < 0:
    raise ValueError(f"null_label must be an int >= 0, got {null_label!r}.")
  shape = tuple(int(d) for d in shape)
  if np.ndim(labels) != 1:
    raise ValueError(f"labels must have shape [N], got {np.shape(labels)}.")
  n = np.shape(labels)[0]
  labels = _check_labels("labels", labels, n, null_label)
  negative_labels = null_label if opts.negative_labels is None else opts.negative_labels
  negative_labels = _check_labels("negative_labels", negative_labels, n, null_label)

  if np.ndim(guidance_weight) > 1 or (np.ndim(guidance_weight) == 1
                                      and np.shape(guidance_weight)[0] != n):
    raise ValueError(f"guidance_weight must be a scalar or have shape [{n}] (one per "
                     f"label), got shape {np.shape(guidance_weight)}.")
  w = jnp.broadcast_to(jnp.asarray(guidance_weight, jnp.float32), (n,))

  _check_range("v", v, 0.0, 1.0)
  _check_range("eta", opts.eta, 0.0, 1.0)
  _check_range("dynamic_percentile", opts.dynamic_percentile, 0.0, 1.0)
  lo, hi = _float("logsnr_min", logsnr_min), _float("logsnr_max", logsnr_max)
  if lo is not None and hi is not None and not lo < hi:
    raise ValueError(f"logsnr_min must be < logsnr_max, got {lo} >= {hi}.")
  interval = opts.guidance_interval
  if interval is None:
    interval = (-np.inf, np.inf)
  elif len(interval) != 2:
    raise ValueError(f"guidance_interval must be (logsnr_lo, logsnr_hi), got {interval!r}.")
  lo, hi = _float("guidance_interval[0]", interval[0]), _float("guidance_interval[1]",
                                                               interval[1])
  if lo is not None and hi is not None and lo > hi:
    raise ValueError(f"guidance_interval must have lo <= hi, got {interval!r}.")

  if not jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))  # A raw uint32 key.
  if np.shape(rng) not in ((), (n,)):
    raise ValueError(f"rng must be one key or [{n}] keys (one per label), got shape "
                     f"{np.shape(rng)}.")
  z_init = opts.z_init
  if z_init is not None and tuple(np.shape(z_init)) != (n, *shape):
    raise ValueError(f"z_init must have shape {(n, *shape)}, got {np.shape(z_init)}.")
  if not isinstance(eps_fn, jax.tree_util.Partial):
    eps_fn = jax.tree_util.Partial(eps_fn)

  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return _sample_loop(
      eps_fn, rng, labels, negative_labels, w,
      f32(jnp.stack([f32(logsnr_min), f32(logsnr_max)])),
      f32(jnp.stack([f32(interval[0]), f32(interval[1])])),
      StepParams(v=f32(v), eta=f32(opts.eta)), f32(opts.dynamic_percentile),
      None if z_init is None else f32(z_init),
      shape=shape, num_steps=int(num_steps), step_name=sampler,
      clip_mode=_clip_mode(clip_x), batched=bool(opts.cond_uncond_batched))
