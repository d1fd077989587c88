"""Forward and train-step throughput (images/s) of the CPU-sized ADM U-Net, float32.

  python -m bench.models_bench [--quick] [--preset=cpu_unet] [--batch_size=32]
      [--dtype=float32] [--remat]

The model is `cfg_guidance.models.presets.cpu_unet` (32x32x3, C = 64) at batch 32; the
train step is the gradient of the ε-MSE with dropout on (no optimizer update). --quick
shrinks the model and batch so a test can run it; --preset=imagenet64 --dtype=bfloat16
times the paper's model on an accelerator. Wall-clock rates on a shared machine are
noisy: report them with the core count and the per-CPU-second rate beside them.
"""

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance.models import eps, presets
from cfg_guidance.runtime import backend


def _config(quick: bool, preset: str, dtype: str, remat: bool):
  config = getattr(presets, preset)()
  config.update(dtype=dtype, remat=remat)
  if quick:
    # One level (no resampling), attention only in the middle: compiles in seconds.
    config.update(image_size=8, base_channels=32, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(), num_heads=-1, num_head_channels=32)
  return config


def _time(fn, args, iters: int) -> dict:
  """Compile seconds, XLA's flop count, then median wall and CPU seconds per call."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  jax.block_until_ready(compiled(*args))  # Warm-up.
  walls, cpus = [], []
  for _ in range(iters):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return {"compile_s": compile_s, "wall_s": statistics.median(walls),
          "cpu_s": statistics.median(cpus),
          "flops": float(cost["flops"]) if cost and "flops" in cost else None}


def run(quick: bool = False, preset: str = "cpu_unet", batch_size: int = 32,
        dtype: str = "float32", remat: bool = False, iters: int = 5) -> dict:
  """images/s of the forward pass and of a train step (loss + gradient).

  The defaults are the CPU benchmark; e.g. preset="imagenet64", dtype="bfloat16"
  measures the paper's model on an accelerator.
  """
  config = _config(quick, preset, dtype, remat)
  batch, iters = (4, 2) if quick else (batch_size, iters)
  graphdef = eps.graphdef(config)
  params = jax.jit(functools.partial(eps.init_params, config))(jax.random.key(0))
  rng = np.random.default_rng(0)
  shape = (batch, config.image_size, config.image_size, config.channels)
  z = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-20, 20, batch), jnp.float32)
  labels = jnp.asarray(rng.integers(0, config.num_classes + 1, batch), jnp.int32)
  key = jax.random.key(1)

  @backend.jit
  def forward(params, z, logsnr, labels):
    return eps.apply(graphdef, params, z, logsnr, labels)

  @backend.jit
  def train_step(params, z, noise, logsnr, labels, key):
    def loss(params):
      out = eps.apply(graphdef, params, z, logsnr, labels, train=True, dropout_rng=key)
      return jnp.mean(jnp.square(out - noise))
    return jax.value_and_grad(loss)(params)

  device = jax.devices()[0]
  results = {
      "device": device.device_kind, "cpu_count": os.cpu_count(),
      "preset": "quick" if quick else preset, "dtype": dtype, "remat": remat,
      "image_size": config.image_size, "batch_size": batch,
      "num_params": sum(x.size for x in jax.tree.leaves(params)),
  }
  for name, fn, args in [("forward", forward, (params, z, logsnr, labels)),
                         ("train_step", train_step,
                          (params, z, noise, logsnr, labels, key))]:
    timing = _time(fn, args, iters)
    flops = timing.pop("flops")
    results[name] = {
        **timing,
        "images_per_s": batch / timing["wall_s"],
        "images_per_cpu_s": batch / timing["cpu_s"],
        "gflop_per_image": None if flops is None else flops / batch / 1e9,
    }
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    results["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="A tiny model, as a smoke test.")
  parser.add_argument("--preset", default="cpu_unet",
                      help="A cfg_guidance.models.presets function.")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  backend.configure_cpu()
  print(json.dumps(run(**vars(args)), indent=2))
