"""GroupNorm with ADM's scale-shift, then SiLU, forward and backward: four forms of it.

  python -m bench.norm_bench [--batch=256] [--dtype=bfloat16] [--out=DIR]

The H200 profile of the ImageNet 64 train step spends 18% of the step in reduction
fusions and 11% in elementwise ones (bench/BENCHMARKS.md), most of them GroupNorm's.
This times the candidates on the step's shapes, each against the least memory traffic
the work needs (read x, write y; read x and dy, write dx) and a copy timed in the same
run, so one short device call says which form to use:

  channels    layers.GroupNorm as the U-Net has it: per-channel sums over positions,
              then per group; two-pass variance; autodiff's backward.
  groups      the textbook form: mean and variance over a [N, P, G, C/G] view.
  one_pass    per-channel Σx and Σx² in one reduction; var = E[x²] − mean².
  custom_vjp  `channels`' forward; a backward written out: one pass for the per-channel
              Σdy and Σdy·x̂, one for dx.

Each record is appended to DIR/norm_bench.jsonl as it is measured.
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance.models import layers

GROUPS = 32
EPSILON = 1e-5
# [H, W, C] of the ImageNet 64 U-Net's GroupNorms, one per level, and the widest
# decoder input at 64×64 (skip concatenation).
SHAPES = ((64, 64, 192), (64, 64, 384), (32, 32, 384), (16, 16, 576), (8, 8, 768))


def _group_sums(v, per_group):
  """[N, C] per-channel values -> [N, C], each the sum over its channel's group."""
  n, c = v.shape
  return jnp.repeat(v.reshape(n, c // per_group, per_group).sum(-1), per_group, axis=1)


def _flat_mean(x):
  """x as float32 [N, P, C], the count of values per group, and [N, C] group means."""
  n, c = x.shape[0], x.shape[-1]
  flat = x.astype(jnp.float32).reshape(n, -1, c)
  count = flat.shape[1] * (c // GROUPS)
  return flat, count, _group_sums(flat.sum(axis=1), c // GROUPS) / count


def channels(x, gamma, beta, scale, shift, dtype):
  norm = layers.GroupNorm(x.shape[-1], GROUPS, epsilon=EPSILON, dtype=dtype)
  norm.scale[...], norm.bias[...] = gamma, beta
  return norm(x, scale, shift)


def _affine(xhat, gamma, beta, scale, shift):
  """(x̂·γ + β)·(1 + scale) + shift; x̂: [N, P, C], the rest [C] or [N, C]."""
  return (xhat * gamma + beta) * (1 + scale[:, None]) + shift[:, None]


def groups(x, gamma, beta, scale, shift, dtype):
  n, c = x.shape[0], x.shape[-1]
  grouped = x.astype(jnp.float32).reshape(n, -1, GROUPS, c // GROUPS)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
  xhat = ((grouped - mean) * jax.lax.rsqrt(var + EPSILON)).reshape(n, -1, c)
  return _affine(xhat, gamma, beta, scale, shift).reshape(x.shape).astype(dtype)


def one_pass(x, gamma, beta, scale, shift, dtype):
  c = x.shape[-1]
  flat, count, mean = _flat_mean(x)
  mean_sq = _group_sums(jnp.square(flat).sum(axis=1), c // GROUPS) / count
  rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + EPSILON)
  xhat = (flat - mean[:, None]) * rstd[:, None]
  return _affine(xhat, gamma, beta, scale, shift).reshape(x.shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def custom_vjp(x, gamma, beta, scale, shift, dtype):
  return _custom_fwd(x, gamma, beta, scale, shift, dtype)[0]


def _custom_fwd(x, gamma, beta, scale, shift, dtype):
  c = x.shape[-1]
  flat, count, mean = _flat_mean(x)
  var = _group_sums(jnp.square(flat - mean[:, None]).sum(axis=1), c // GROUPS) / count
  rstd = jax.lax.rsqrt(var + EPSILON)
  a = rstd * gamma * (1 + scale)
  b = beta * (1 + scale) + shift
  y = (flat - mean[:, None]) * a[:, None] + b[:, None]
  return y.reshape(x.shape).astype(dtype), (x, gamma, beta, scale, mean, rstd)


def _custom_bwd(dtype, residuals, dy):
  del dtype
  x, gamma, beta, scale, mean, rstd = residuals
  n, c = x.shape[0], x.shape[-1]
  flat = x.astype(jnp.float32).reshape(n, -1, c)
  dy = dy.astype(jnp.float32).reshape(n, -1, c)
  xhat = (flat - mean[:, None]) * rstd[:, None]
  dshift = dy.sum(axis=1)  # [N, C]: Σ_p dy
  dgain = (dy * xhat).sum(axis=1)  # [N, C]: Σ_p dy·x̂, the gradient of γ·(1 + scale)
  gain = gamma * (1 + scale)
  count = flat.shape[1] * (c // GROUPS)
  # dx = rstd·(gain·dy − (Σ_g gain·dy + x̂·Σ_g gain·dy·x̂) / count), Σ_g over the group.
  sum_dy = _group_sums(gain * dshift, c // GROUPS) / count
  sum_dy_xhat = _group_sums(gain * dgain, c // GROUPS) / count
  dx = (rstd * gain)[:, None] * dy - rstd[:, None] * (sum_dy[:, None]
                                                       + xhat * sum_dy_xhat[:, None])
  return (dx.reshape(x.shape).astype(x.dtype), (dgain * (1 + scale)).sum(0),
          (dshift * (1 + scale)).sum(0), dgain * gamma + dshift * beta, dshift)


custom_vjp.defvjp(_custom_fwd, _custom_bwd)

VARIANTS = {"channels": channels, "groups": groups, "one_pass": one_pass,
            "custom_vjp": custom_vjp}


def forward_backward(variant, dtype):
  """jit(x, γ, β, scale, shift, dh) -> (silu(norm(x)), gradients of ⟨dh, ·⟩ wrt the
  first five)."""
  fn = VARIANTS[variant]

  def run(x, gamma, beta, scale, shift, dh):
    h, vjp = jax.vjp(lambda *a: jax.nn.silu(fn(*a, dtype)), x, gamma, beta, scale,
                     shift)
    return h, vjp(dh)
  return jax.jit(run)


def inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  n, c = shape[0], shape[-1]
  x = 1.5 * rng.standard_normal(shape) + rng.standard_normal(c)  # Channel offsets.
  return (jnp.asarray(x, dtype),
          jnp.asarray(1 + 0.1 * rng.standard_normal(c), jnp.float32),
          jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32),
          jnp.asarray(0.2 * rng.standard_normal((n, c)), jnp.float32),
          jnp.asarray(0.2 * rng.standard_normal((n, c)), jnp.float32),
          jnp.asarray(rng.standard_normal(shape), dtype))


def _seconds(fn, args, iters):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / iters)
  return best


def run(batch: int, dtype: str, shapes=SHAPES, iters: int = 20, out_dir=None):
  records = []

  def emit(record):
    records.append(record)
    print(json.dumps(record), flush=True)
    if out_dir:
      with open(os.path.join(out_dir, "norm_bench.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")

  dtype = jnp.dtype(dtype)
  big = jnp.ones((batch, *shapes[0]), dtype)
  copy = _seconds(jax.jit(lambda a: a + 1), (big,), iters)
  copy_gbps = 2 * big.nbytes / copy / 1e9
  emit({"bench": "copy", "device": jax.devices()[0].device_kind,
        "shape": list(big.shape), "dtype": dtype.name, "gb_per_s": copy_gbps})
  del big
  for hwc in shapes:
    args = inputs((batch, *hwc), dtype)
    # Read x, write h; read x and dh, write dx.
    least_bytes = 5 * args[0].nbytes
    for variant in VARIANTS:
      seconds = _seconds(forward_backward(variant, dtype), args, iters)
      emit({"bench": "group_norm_silu", "variant": variant, "shape": [batch, *hwc],
            "dtype": dtype.name, "ms": seconds * 1e3,
            "least_traffic_gb_per_s": least_bytes / seconds / 1e9,
            "of_copy": least_bytes / seconds / 1e9 / copy_gbps})
  return records


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=os.environ.get("OUT"))
  args = parser.parse_args()
  run(args.batch, args.dtype, iters=args.iters, out_dir=args.out)


if __name__ == "__main__":
  main()
