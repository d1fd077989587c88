"""The real training step (Adam, EMA, clipping, label dropout) of a config: throughput,
FLOP/s as a fraction of this machine's measured matmul peak, compile time, memory.

  python -m bench.train_bench [--preset=digits|cpu_unet] [--batch=32] [--quick]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import config as config_lib
from cfg_guidance import state as state_lib
from cfg_guidance import train
from cfg_guidance.models import eps, presets
from cfg_guidance.runtime import backend, sharding

DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs", "digits.py")


def matmul_peak(dtype=jnp.float32, n: int = 2048, iters: int = 10) -> float:
  """FLOP/s of an n×n matmul on the default device, measured now."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(iters):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n**3 * iters / (time.perf_counter() - start)


def preset_config(preset: str, batch: int):
  """configs/digits.py's training config, with a `cfg_guidance.models.presets` model."""
  config = config_lib.load_file(DIGITS_CONFIG)
  if preset != "digits":
    config_lib.use_model(config, getattr(presets, preset)())
  config.train.batch_size = batch
  return config


def run(quick: bool = False, preset: str = "digits", batch: int | None = None,
        iters: int = 10, peak: float | None = None) -> dict:
  """Times `train.make_train_fn`'s jitted step on one device, after one warm-up call."""
  if quick:
    preset, batch, iters = "digits", 8, 2
  batch = batch or (64 if preset == "digits" else 32)
  config = preset_config(preset, batch)
  mesh = sharding.create_mesh(jax.devices()[:1])
  tx = train.make_optimizer(config.train)
  state, shardings = state_lib.create(config.model, config.sharding, seed=config.seed,
                                      mesh=mesh, tx=tx)
  step = train.make_train_fn(config, eps.graphdef(config.model), tx, shardings, mesh)
  m = config.model
  rng = np.random.default_rng(0)
  data = {"image": rng.uniform(-1, 1, (1, batch, m.image_size, m.image_size, m.channels)
                               ).astype(np.float32),
          "label": rng.integers(0, m.num_classes, (1, batch)).astype(np.int32)}
  data = sharding.host_to_global(data, mesh, leading_axes=1)
  start = time.perf_counter()
  lowered = step.lower(state, data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  cost = lowered.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  memory = compiled.memory_analysis()
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  peak = peak or matmul_peak()
  result = {"preset": preset, "batch": batch, "compile_s": compile_s, "step_s": seconds,
            "images_per_s": batch / seconds, "gflop_per_image": flops / batch / 1e9,
            "gflop_per_s": flops / seconds / 1e9,
            "fraction_of_matmul_peak": flops / seconds / peak,
            "matmul_peak_gflop_per_s": peak / 1e9}
  if memory is not None:
    result["memory_mib"] = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                            + memory.output_size_in_bytes
                            - memory.alias_size_in_bytes) / 2**20
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="digits")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no_cpu_runtime", action="store_true",
                      help="Leave JAX's dispatch and glibc's malloc at their defaults.")
  args = parser.parse_args()
  if not args.no_cpu_runtime:
    backend.configure_cpu()
  print(json.dumps(run(args.quick, args.preset, args.batch), indent=1))


if __name__ == "__main__":
  main()
