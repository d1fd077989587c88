"""Sampler overhead: wall time of guided sampling over T network calls on 2N examples.

overhead = t(sample) / (T * t(eps_fn on 2N)) (two-call form: / (2T * t(eps_fn on N)));
the goal is <= 1.05. The samples come from the sampling driver every job uses
(`generate.draw`, per-example keys, compiled with the same options as the network),
on one device. Run: `python -m bench.sampler_overhead [--quick]`.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import generate
from cfg_guidance.runtime import backend, sharding

NUM_CLASSES = 10


def init_params(rng, channels, image_channels=3):
  """A small conv net's parameters: three 3x3 convs with class and log-SNR conditioning."""
  k = jax.random.split(rng, 5)
  conv = lambda key, cin, cout: jax.random.normal(key, (3, 3, cin, cout)) / np.sqrt(9 * cin)
  return {
      "conv_in": conv(k[0], image_channels, channels),
      "conv_mid": conv(k[1], channels, channels),
      "conv_out": conv(k[2], channels, image_channels),
      "label_embed": jax.random.normal(k[3], (NUM_CLASSES + 1, channels)),
      "logsnr_proj": jax.random.normal(k[4], (2, channels)),
  }


def conv_eps_fn(params, z, logsnr, labels):
  """eps: [M, H, W, C] from z: [M, H, W, C], logsnr: [M], labels: [M]; network-sized."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=dn)
  feats = jnp.stack([jnp.sin(logsnr / 20), jnp.cos(logsnr / 20)], -1)
  cond = params["label_embed"][labels] + feats @ params["logsnr_proj"]
  h = jax.nn.silu(conv(z, params["conv_in"]) + cond[:, None, None])
  h = jax.nn.silu(conv(h, params["conv_mid"]) + cond[:, None, None])
  return conv(h, params["conv_out"])


def _time(fn, calls=1):
  """(wall, process CPU) seconds per call of `fn`, blocking on its result."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(calls):
    jax.block_until_ready(fn())
  return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def run(quick: bool = False) -> dict:
  """Measures the overhead of both guided-ε forms; returns the numbers as a dict.

  Timings of the sampler and of its baseline (the bare network, jitted) alternate, and
  the medians over rounds are reported, so that load drifting on a shared machine
  affects both alike.
  """
  n, num_steps, size, channels, rounds = (8, 16, 16, 32, 3) if quick else (64, 64, 16, 64, 5)
  shape = (size, size, 3)
  params = init_params(jax.random.key(0), channels)
  eps_fn = jax.tree_util.Partial(conv_eps_fn, params)
  labels = np.arange(n, dtype=np.int32) % NUM_CLASSES
  weights = np.linspace(0.0, 4.0, n, dtype=np.float32)
  net = backend.jit(conv_eps_fn)

  def net_call(m):
    z = jax.random.normal(jax.random.key(1), (m, *shape))
    args = (params, z, jnp.zeros((m,)), jnp.asarray(np.arange(m) % (NUM_CLASSES + 1)))
    return lambda: net(*args)

  mesh = sharding.create_mesh(jax.devices()[:1])  # The network's baseline runs on one.

  def sample_call(batched):
    settings = generate.Settings(shape=shape, null_label=NUM_CLASSES, num_steps=num_steps,
                                 clip_x="none", batch_size=n, cond_uncond_batched=batched)
    return lambda: generate.draw(eps_fn, labels, weights, settings=settings, seed=0,
                                 mesh=mesh)

  # Batched: T calls on 2N. Two calls: 2T calls on N.
  modes = {"batched_2n": (sample_call(True), net_call(2 * n), num_steps),
           "two_calls": (sample_call(False), net_call(n), 2 * num_steps)}
  for sample_fn, net_fn, _ in modes.values():
    _time(sample_fn)  # Compile.
    _time(net_fn)
  times = {name: ([], []) for name in modes}
  for _ in range(rounds):
    for name, (sample_fn, net_fn, calls) in modes.items():
      times[name][0].append(np.array(_time(sample_fn)))
      times[name][1].append(np.array(_time(net_fn, calls)) * calls)
  results = {"device": jax.devices()[0].device_kind, "n": n, "num_steps": num_steps,
             "shape": shape, "channels": channels}
  for name, (sample_times, net_times) in times.items():
    sample_times, net_times = np.stack(sample_times), np.stack(net_times)
    results[f"sample_s_{name}"] = float(np.median(sample_times[:, 0]))
    results[f"network_s_{name}"] = float(np.median(net_times[:, 0]))
    results[f"overhead_{name}"] = float(np.median(sample_times[:, 0] / net_times[:, 0]))
    # CPU time of this process: less sensitive to other jobs on a shared machine.
    results[f"overhead_{name}_cpu_time"] = float(
        np.median(sample_times[:, 1] / net_times[:, 1]))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="Small sizes for a smoke run.")
  args = parser.parse_args()
  backend.configure_cpu()
  print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
  main()
