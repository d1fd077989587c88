"""Classifier-free guided sampling: the guided ε (Eq. 6, or another rule of
`cfg_guidance.guidance`), Algorithm 2 and the fast solvers, the loop.

`eps_fn(z, logsnr, labels) -> eps` with `z: [M, *shape]`, `logsnr: [M]`, `labels: [M]`.
Pass a `jax.tree_util.Partial` to bind arrays (e.g. model parameters): they cross the
jit boundary as leaves, so new parameters reuse the compiled sampler, e.g.
`Partial(apply, graphdef, state)` with a module-level `apply(graphdef, state, z, logsnr,
labels)`. A plain callable is keyed by identity: pass the same object to avoid retracing.
The same holds for the options `negative_eps_fn` and `classifier_fn`.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import diffusion, guidance

EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class StepParams(NamedTuple):
  """Traced hyper-parameters of a step; changing them does not recompile."""
  v: jax.Array  # Eq. 4's log-space variance interpolation (ancestral).
  eta: jax.Array  # DDIM's noise scale: 0 deterministic, 1 the posterior variance.
  s_churn: Any = 0.0  # EDM Heun's churn S_churn (0: the deterministic ODE solver).
  s_tmin: Any = 0.0  # Churn only for σ/α in [S_tmin, S_tmax].
  s_tmax: Any = float("inf")
  s_noise: Any = 1.0  # EDM's S_noise: the churn noise's scale.


class _Options(NamedTuple):
  """The `**options` of `sample`, with the paper's behaviour as defaults."""
  negative_labels: Any = None  # Label of the negative branch; None means ∅.
  guidance_interval: Any = None  # (λ_lo, λ_hi): guide only there; None means always.
  dynamic_percentile: float = 0.995  # Per-example |x̃| quantile for dynamic clipping.
  eta: float = 0.0  # DDIM noise scale.
  cond_uncond_batched: bool = True  # False: two eps_fn calls of N instead of one of 2N.
  z_init: Any = None  # Optional z_1: [N, *shape] in place of N(0, I) noise.
  grid: str = "u"  # The λ grid: "u" (the schedule's) or "logsnr" (uniform in λ).
  lower_order_final: bool = True  # Multistep solvers: first order on the last step if N < 15.
  s_churn: float = 0.0  # heun: EDM's S_churn (0: deterministic).
  s_tmin: float = 0.0  # heun: churn only for σ/α in [s_tmin, s_tmax].
  s_tmax: float = float("inf")
  s_noise: float = 1.0  # heun: EDM's S_noise.
  guidance: str = "cfg"  # The guidance rule: one of guidance.RULES.
  guidance_params: Any = None  # Its parameters by name, each a scalar or [N].
  negative_eps_fn: Any = None  # autoguidance: the bad model's eps_fn (run at c).
  classifier_fn: Any = None  # classifier: classifier_fn(z, logsnr) -> logits [N, K].


def guided_eps(eps_fn, z, logsnr, labels, negative_labels, w, *, batched=True,
               guidance_rule="cfg", guidance_params=None, state=(), negative_eps_fn=None,
               classifier_fn=None):
  """The guided ε̃ at one λ and the rule's next state: (eps [N, *shape], state).

  z: [N, *shape]; logsnr, labels, negative_labels, w: [N]. The default rule is Eq. 6,
  ε̃ = (1 + w) ε(z, c) − w ε(z, c⁻) with c⁻ = ∅ by default; `guidance_rule`,
  `guidance_params` and `state` select another of `guidance.RULES` (state: the rule's
  `init_state(z)` or what the previous call returned). For rules with both branches in
  one network, `batched` evaluates them in ONE eps_fn call on 2N examples, otherwise in
  two calls of N; autoguidance calls eps_fn and negative_eps_fn on N each, at c.
  """
  n = z.shape[0]
  rule, params = guidance.resolve(guidance_rule, guidance_params, n)
  logsnr = jnp.broadcast_to(logsnr, (n,))
  if rule.negative == "model":
    eps_cond = eps_fn(z, logsnr, labels)
    eps_neg = negative_eps_fn(z, logsnr, labels)
  elif batched:
    eps2 = eps_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                  jnp.concatenate([labels, negative_labels]))
    eps_cond, eps_neg = eps2[:n], eps2[n:]
  else:
    eps_cond = eps_fn(z, logsnr, labels)
    eps_neg = eps_fn(z, logsnr, negative_labels)
  grad = (guidance.classifier_grad(classifier_fn, z, logsnr, labels) if rule.classifier
          else None)
  pred = guidance.Predictions(z, logsnr, eps_cond, eps_neg, grad)
  return rule.combine(pred, w, params, state)


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


# ---- The solvers ------------------------------------------------------------------------
#
# A solver moves z from grid point k to k + 1: `step(denoise, z, history, k, logsnr,
# logsnr_next, noise, ctx) -> (z_next, history)`, where `denoise(z, logsnr) -> (x̂, ε̂)`
# is the guided, thresholded prediction (one network evaluation on the 2N batch) and
# `history` is the solver's carry (`init_history(z)`). After the last step the sampler
# returns x̂ at the last grid point λ_max, one more evaluation; so a solver that
# evaluates once per step spends num_steps evaluations in all, as Algorithm 2 does.
# A guidance rule's state (APG's momentum) rides in the scan's carry beside z and
# `history`, threaded through `denoise`'s calls in the order a step makes them: it
# advances once per guided evaluation, so twice per Heun step (at σ̂ and at the Euler
# point), and solvers call `denoise` in straight-line code (never under lax.cond).
#
# The ODE solvers work in the half-log-SNR h-variable of DPM-Solver, ℓ = λ/2 = log(α/σ),
# on the data prediction x̂ (which is what thresholding clips): from ℓ to ℓ' = ℓ + h,
#   z' = (σ'/σ) z + σ' ∫ e^ℓ x̂ dℓ  ≈  (σ'/σ) z − α' (e^(−h) − 1) D,
# with D = x̂ for the first-order step (DDIM with η = 0) and a multistep estimate for
# higher orders.


class _Ctx(NamedTuple):
  """What every step may read, besides its own arguments."""
  params: StepParams
  num_steps: Any  # Grid points N (a Python int).
  lower_order_final: bool  # First order on the last step when N < 15 (DPM-Solver++).


def _first_order(z, x_pred, logsnr, logsnr_next):
  """(σ'/σ) z − α' (e^(−h) − 1) x̂, h = (λ' − λ)/2: DPM-Solver++(1), i.e. DDIM η = 0."""
  log_alpha, log_sigma = diffusion.log_alpha_sigma(logsnr)
  log_alpha_next, log_sigma_next = diffusion.log_alpha_sigma(logsnr_next)
  h = 0.5 * (logsnr_next - logsnr)
  return (jnp.exp(log_sigma_next - log_sigma) * z
          - jnp.exp(log_alpha_next) * jnp.expm1(-h) * x_pred)


def _use_first_order(k, ctx):
  """Multistep methods start at first order; DPM-Solver++ ends there for few steps."""
  final = (k == ctx.num_steps - 2) & (ctx.lower_order_final and ctx.num_steps < 15)
  return (k == 0) | final


def _no_history(z):
  del z
  return ()


def _noise_step(step_fn):
  """Wraps an (ancestral, DDIM) one-evaluation step into the solver interface."""
  def step(denoise, z, history, k, logsnr, logsnr_next, noise, ctx):
    del k
    x_pred, eps_pred = denoise(z, logsnr)
    return step_fn(z, x_pred, eps_pred, logsnr, logsnr_next, noise, ctx.params), history
  return step


class _Multistep(NamedTuple):
  x_prev: jax.Array  # x̂ at the previous grid point: [N, *shape].
  logsnr_prev: jax.Array  # Its λ: [].
  z_prev: jax.Array  # z there (after correction, for UniPC): [N, *shape].
  x_prev2: jax.Array  # x̂ two grid points back (UniPC's order-2 corrector).
  logsnr_prev2: jax.Array


def _multistep_history(z):
  zero = jnp.zeros((), jnp.float32)
  return _Multistep(jnp.zeros_like(z), zero, jnp.zeros_like(z), jnp.zeros_like(z), zero)


def _two_step_estimate(x_pred, history, k, logsnr, logsnr_next, ctx):
  """DPM-Solver++(2M)'s D = (1 + 1/(2r)) x̂_k − 1/(2r) x̂_{k−1}, r = h_{k−1}/h_k
  (x̂_k itself at first order); UniPC's UniP-2 predictor is the same."""
  r = (logsnr - history.logsnr_prev) / (logsnr_next - logsnr)
  d = x_pred + (x_pred - history.x_prev) / (2.0 * jnp.where(k == 0, 1.0, r))
  return jnp.where(_use_first_order(k, ctx), x_pred, d)


def dpmpp_2m_step(denoise, z, history, k, logsnr, logsnr_next, noise, ctx):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): data prediction, multistep.

  D = (1 + 1/(2r)) x̂_k − 1/(2r) x̂_{k−1}, r = h_{k−1}/h_k, in z' = (σ'/σ) z − α'(e^(−h) − 1) D.
  """
  del noise
  x_pred, _ = denoise(z, logsnr)
  d = _two_step_estimate(x_pred, history, k, logsnr, logsnr_next, ctx)
  z_next = _first_order(z, d, logsnr, logsnr_next)
  return z_next, history._replace(x_prev=x_pred, logsnr_prev=logsnr)


def _phi_ratios(x):
  """UniPC's B(h)-normalised φ terms for bh2, B(h) = e^x − 1 with x = −h:
  (g1, g2) = ((e^x − 1 − x)/x, 2 (e^x − 1 − x − x²/2)/x²) / (e^x − 1), by series near 0."""
  big = jnp.abs(x) > 0.25
  xs = jnp.where(big, x, 1.0)  # A safe argument for the closed forms.
  em1 = jnp.expm1(xs)
  g1 = (em1 - xs) / xs
  g2 = 2.0 * (em1 - xs - 0.5 * xs * xs) / (xs * xs)
  g1s = x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
  g2s = 2.0 * x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x / 5040))))
  b = jnp.where(big, em1, x * (1 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x / 120)))))
  return jnp.where(big, g1, g1s) / b, jnp.where(big, g2, g2s) / b


def unipc_step(denoise, z, history, k, logsnr, logsnr_next, noise, ctx):
  """UniPC (Zhao et al. 2023), B(h) = e^(−h) − 1 ("bh2"), data prediction, order 2.

  The new evaluation x̂_k first corrects z_k (UniC, order 1 after the first step and 2
  after that: no extra evaluation), then the predictor UniP-2 — DPM-Solver++(2M) from
  the corrected z_k — moves it to the next grid point. Predictor plus corrector are
  third order.
  """
  del noise
  x_pred, _ = denoise(z, logsnr)
  # Corrector: redo the step λ_{k−1} → λ_k with x̂_k known (k ≥ 1).
  h = 0.5 * (logsnr - history.logsnr_prev)
  h = jnp.where(k == 0, 1.0, h)
  alpha = jnp.exp(diffusion.log_alpha_sigma(logsnr)[0])
  b_h = jnp.expm1(-h)
  g1, g2 = _phi_ratios(-h)
  r1 = 0.5 * (history.logsnr_prev2 - history.logsnr_prev) / h  # < 0.
  r1 = jnp.where(k <= 1, -1.0, r1)
  rho0 = (g1 - g2) / (1.0 - r1)  # Solves [[1, 1], [r1, 1]] ρ = (g1, g2).
  rho1 = g1 - rho0
  d1 = (history.x_prev2 - history.x_prev) / r1
  d_t = x_pred - history.x_prev
  correction_2 = rho0 * d1 + rho1 * d_t
  correction_1 = 0.5 * d_t
  correction = jnp.where(k == 1, correction_1, correction_2)
  z_corrected = (_first_order(history.z_prev, history.x_prev, history.logsnr_prev, logsnr)
                 - alpha * b_h * correction)
  z = jnp.where(k == 0, z, z_corrected)
  # Predictor: UniP-2 with ρ = 1/2, i.e. DPM-Solver++(2M).
  d = _two_step_estimate(x_pred, history, k, logsnr, logsnr_next, ctx)
  z_next = _first_order(z, d, logsnr, logsnr_next)
  return z_next, _Multistep(x_prev=x_pred, logsnr_prev=logsnr, z_prev=z,
                            x_prev2=history.x_prev, logsnr_prev2=history.logsnr_prev)


def heun_step(denoise, z, history, k, logsnr, logsnr_next, noise, ctx):
  """EDM's Algorithm 2 (Karras et al. 2022): Heun's method in σ_E = σ/α on x̃ = z/α,
  with optional churn: γ = min(S_churn/N, √2 − 1) for σ_E in [S_tmin, S_tmax] first
  raises σ_E to σ̂ = (1 + γ) σ_E with fresh noise of std √(σ̂² − σ_E²) S_noise.

  Two evaluations per step. Written in z: the Euler step is DDIM's z' = α' x̂ + σ' ε̂ and
  Heun's correction adds (σ' − α' σ̂)(ε̂' − ε̂)/2, which keeps float32 accuracy at σ_E ~ e^10.
  """
  del k
  p = ctx.params
  sigma_e = jnp.exp(-0.5 * logsnr)
  gamma = jnp.where((sigma_e >= p.s_tmin) & (sigma_e <= p.s_tmax),
                    jnp.minimum(p.s_churn / ctx.num_steps, np.sqrt(2.0) - 1.0), 0.0)
  logsnr_hat = logsnr - 2.0 * jnp.log1p(gamma)  # σ̂_E = (1 + γ) σ_E.
  log_alpha = diffusion.log_alpha_sigma(logsnr)[0]
  log_alpha_hat = diffusion.log_alpha_sigma(logsnr_hat)[0]
  # ẑ = α̂ (z/α + σ_E √((1 + γ)² − 1) S_noise n).
  extra = sigma_e * jnp.sqrt(gamma * (2.0 + gamma)) * p.s_noise
  z_hat = jnp.exp(log_alpha_hat - log_alpha) * z + jnp.exp(log_alpha_hat) * extra * noise
  x_pred, eps_pred = denoise(z_hat, logsnr_hat)
  alpha_next, sigma_next = diffusion.alpha_sigma(logsnr_next)
  z_euler = alpha_next * x_pred + sigma_next * eps_pred
  _, eps_next = denoise(z_euler, logsnr_next)
  coef = sigma_next - alpha_next * jnp.exp(-0.5 * logsnr_hat)
  return z_euler + 0.5 * coef * (eps_next - eps_pred), history


class Solver(NamedTuple):
  step: Callable
  init_history: Callable
  evaluations_per_step: int
  stochastic: bool  # Draws noise (ancestral, DDIM with η > 0, Heun with churn).


SOLVERS = {
    "ancestral": Solver(_noise_step(ancestral_step), _no_history, 1, True),
    "ddim": Solver(_noise_step(ddim_step), _no_history, 1, True),
    "dpmpp_2m": Solver(dpmpp_2m_step, _multistep_history, 1, False),
    "unipc": Solver(unipc_step, _multistep_history, 1, False),
    "heun": Solver(heun_step, _no_history, 2, True),
}
GRIDS = ("u", "logsnr")


def num_evaluations(sampler: str, num_steps: int) -> int:
  """Network evaluations (calls on the 2N batch) of `sample` with N grid points."""
  return SOLVERS[sampler].evaluations_per_step * (num_steps - 1) + 1


def logsnr_grid(grid: str, num_steps: int, logsnr_min, logsnr_max):
  """The increasing grid λ_1 = λ_min, ..., λ_N = λ_max: [num_steps] float32.

  "u": the schedule's own, u uniform from 1 to 0 (Algorithm 2's, the default);
  "logsnr": uniform in λ (DPM-Solver's "logSNR" spacing).
  """
  if grid == "u":
    return diffusion.sampling_logsnrs(num_steps, logsnr_min, logsnr_max)
  if grid == "logsnr":
    return jnp.linspace(jnp.float32(logsnr_min), jnp.float32(logsnr_max), num_steps,
                        dtype=jnp.float32)
  raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")


@functools.partial(
    jax.jit, static_argnames=("shape", "num_steps", "step_name", "clip_mode", "batched",
                              "grid", "lower_order_final", "guidance_rule"))
def _sample_loop(eps_fn, rng, labels, negative_labels, w, logsnr_range, interval,
                 params, percentile, z_init, guidance_params, negative_eps_fn,
                 classifier_fn, *, shape, num_steps, step_name, clip_mode, batched,
                 grid="u", lower_order_final=True, guidance_rule="cfg"):
  """The jitted sampler: a lax.scan over the N − 1 steps, then x̂ at λ_max."""
  solver = SOLVERS[step_name]
  n = labels.shape[0]
  logsnrs = logsnr_grid(grid, num_steps, logsnr_range[0], logsnr_range[1])
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

  rule = guidance.RULES[guidance_rule]

  def denoise(z, logsnr, state):
    """Guided and thresholded (x̂, ε̂) at one λ, and the rule's next state: one
    evaluation of eps_fn. Outside the guidance interval w and the rule's other strengths
    are 0 (the conditional prediction) and the state stands still."""
    in_interval = (logsnr >= interval[0]) & (logsnr <= interval[1])
    off = lambda a: jnp.where(in_interval, a, 0.0)
    params_t = {k: off(v) if k in rule.strengths else v for k, v in guidance_params.items()}
    eps, new_state = guided_eps(
        eps_fn, z, jnp.full((n,), logsnr), labels, negative_labels, off(w),
        batched=batched, guidance_rule=guidance_rule, guidance_params=params_t,
        state=state, negative_eps_fn=negative_eps_fn, classifier_fn=classifier_fn)
    state = jax.tree.map(lambda new, old: jnp.where(in_interval, new, old), new_state, state)
    x_pred = diffusion.predict_x_from_eps(z, eps, logsnr)
    if clip_mode != "none":
      x_pred = threshold_x(x_pred, clip_mode, percentile)
      eps = diffusion.predict_eps_from_x(z, x_pred, logsnr)
    return x_pred, eps, state

  ctx = _Ctx(params=params, num_steps=num_steps, lower_order_final=lower_order_final)

  def body(carry, xs):
    z, history, state = carry
    k, logsnr, logsnr_next = xs
    noise = draw(fold_in(loop_rng, k)) if solver.stochastic else None
    threaded = [state]  # The rule's state, passed from one denoise call to the next.

    def step_denoise(z, logsnr):
      x_pred, eps, threaded[0] = denoise(z, logsnr, threaded[0])
      return x_pred, eps

    z, history = solver.step(step_denoise, z, history, k, logsnr, logsnr_next, noise, ctx)
    return (z, history, threaded[0]), None

  xs = (jnp.arange(num_steps - 1), logsnrs[:-1], logsnrs[1:])
  carry = (z_init, solver.init_history(z_init), rule.init_state(z_init))
  (z, _, state), _ = jax.lax.scan(body, carry, xs)
  x_pred, _, _ = denoise(z, logsnrs[-1], state)
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
    num_steps: N, the grid's points, static. The sampler evaluates the network
      `num_evaluations(sampler, N)` times: N for all but "heun" (2N − 1).
    sampler: "ancestral" (Algorithm 2), "ddim", "dpmpp_2m" (DPM-Solver++(2M)), "unipc"
      (UniPC-bh2, order 2 + corrector) or "heun" (EDM's Heun, optional churn).
    v: Eq. 4's variance interpolation in [0, 1] (ancestral only).
    logsnr_min, logsnr_max: the grid's end points λ_1 and λ_T.
    clip_x: False/"none", True/"static" (to [−1, 1]) or "dynamic" (thresholding).
    **options: `negative_labels` (scalar or [N], default ∅), `guidance_interval`
      ((λ_lo, λ_hi): guide only for λ inside, plain conditional outside),
      `dynamic_percentile` (0.995), `eta` (DDIM noise, 0.), `cond_uncond_batched`
      (True: one eps_fn call on 2N; False: two calls on N, same result, less memory),
      `z_init` ([N, *shape] replacing the initial N(0, I) draw), `grid` ("u": the
      schedule's, or "logsnr": uniform in λ), `lower_order_final` (True), for
      "heun" EDM's `s_churn` (0.), `s_tmin` (0.), `s_tmax` (inf), `s_noise` (1.), and
      the guidance rule (`cfg_guidance.guidance`): `guidance` ("cfg", Eq. 6;
      "cfg_rescale", "apg", "autoguidance" or "classifier"), `guidance_params` (its
      parameters by name, each a scalar or [N], traced: "cfg_rescale" {"phi": 0.7};
      "apg" {"eta": 0., "threshold": inf, "momentum": 0.}; "classifier" {"scale": 1.}),
      `negative_eps_fn` (autoguidance's bad model, an eps_fn evaluated at `labels`)
      and `classifier_fn` (classifier guidance's `classifier_fn(z, logsnr) -> logits
      [N, K]`, differentiated in the sampler). w scales every rule's guidance.
  """
  unknown = set(options) - set(_Options._fields)
  if unknown:
    raise TypeError(f"sample() got unknown options {sorted(unknown)}; "
                    f"known: {list(_Options._fields)}.")
  opts = _Options(**options)
  if sampler not in SOLVERS:
    raise ValueError(f"sampler must be one of {list(SOLVERS)}, got {sampler!r}.")
  if opts.grid not in GRIDS:
    raise ValueError(f"grid must be one of {GRIDS}, got {opts.grid!r}.")
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
  rule, guidance_params = guidance.resolve(opts.guidance, opts.guidance_params, n)
  for name, needed in (("negative_eps_fn", rule.negative == "model"),
                       ("classifier_fn", rule.classifier)):
    if needed != (getattr(opts, name) is not None):
      raise ValueError(f"guidance={opts.guidance!r} {'needs the' if needed else 'takes no'} "
                       f"{name} option.")
  if rule.negative == "model" and opts.negative_labels is not None:
    raise ValueError(f"negative_labels has no effect with guidance={opts.guidance!r}: "
                     "negative_eps_fn is evaluated at labels.")

  if np.ndim(guidance_weight) > 1 or (np.ndim(guidance_weight) == 1
                                      and np.shape(guidance_weight)[0] != n):
    raise ValueError(f"guidance_weight must be a scalar or have shape [{n}] (one per "
                     f"label), got shape {np.shape(guidance_weight)}.")
  w = jnp.broadcast_to(jnp.asarray(guidance_weight, jnp.float32), (n,))

  _check_range("v", v, 0.0, 1.0)
  _check_range("eta", opts.eta, 0.0, 1.0)
  _check_range("dynamic_percentile", opts.dynamic_percentile, 0.0, 1.0)
  _check_range("s_churn", opts.s_churn, 0.0, np.inf)
  _check_range("s_noise", opts.s_noise, 0.0, np.inf)
  _check_range("s_tmin", opts.s_tmin, 0.0, np.inf)
  _check_range("s_tmax", opts.s_tmax, 0.0, np.inf)
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
  as_partial = lambda fn: (fn if fn is None or isinstance(fn, jax.tree_util.Partial)
                          else jax.tree_util.Partial(fn))

  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  return _sample_loop(
      as_partial(eps_fn), rng, labels, negative_labels, w,
      f32(jnp.stack([f32(logsnr_min), f32(logsnr_max)])),
      f32(jnp.stack([f32(interval[0]), f32(interval[1])])),
      StepParams(v=f32(v), eta=f32(opts.eta), s_churn=f32(opts.s_churn),
                 s_tmin=f32(opts.s_tmin), s_tmax=f32(opts.s_tmax),
                 s_noise=f32(opts.s_noise)),
      f32(opts.dynamic_percentile), None if z_init is None else f32(z_init),
      guidance_params, as_partial(opts.negative_eps_fn), as_partial(opts.classifier_fn),
      shape=shape, num_steps=int(num_steps), step_name=sampler,
      clip_mode=_clip_mode(clip_x), batched=bool(opts.cond_uncond_batched),
      grid=opts.grid, lower_order_final=bool(opts.lower_order_final),
      guidance_rule=opts.guidance)
