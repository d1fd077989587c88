"""Where a train step's time goes: the CPU-sized U-Net's gradient, traced, summed by kind.

  taskset -c 1 python -m bench.profile_step [--preset=cpu_unet] [--batch=32] [--top=15]

Runs `jax.profiler` around a few steps, reads the Perfetto trace (plain JSON, no
TensorBoard plugin needed), joins each executed thunk with its fusion in the compiled HLO
and prints milliseconds per step by kind (convolution, dot, elementwise, transpose,
concatenate, reduction, random bits) and the costliest elementwise sources. Pin it to one core: the
trace's per-thunk times then add up to the step.
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance.models import eps, presets
from cfg_guidance.runtime import backend

_KINDS = (("convolution", "conv"), ("dot", "dot"), ("reduce", "reduce"),
          ("transpose", "transpose"), ("concatenate", "concatenate"), ("copy", "copy"))


def _train_step(preset, batch):
  config = getattr(presets, preset)()
  graphdef = eps.graphdef(config)
  params = jax.jit(functools.partial(eps.init_params, config))(jax.random.key(0))
  rng = np.random.default_rng(0)
  shape = (batch, config.image_size, config.image_size, config.channels)
  z, noise = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  logsnr = jnp.asarray(rng.uniform(-20, 20, batch), jnp.float32)
  labels = jnp.asarray(rng.integers(0, config.num_classes + 1, batch), jnp.int32)

  @backend.jit
  def step(params, key):
    def loss(params):
      out = eps.apply(graphdef, params, z, logsnr, labels, train=True, dropout_rng=key)
      return jnp.mean(jnp.square(out - noise))
    return jax.value_and_grad(loss)(params)

  return step, (params, jax.random.key(1))


def _fusion_kinds(hlo):
  """{instruction name: (kind, op_name)} for every fusion/thunk of the compiled HLO."""
  bodies = {m.group(1).lstrip("%"): m.group(2) for m in re.finditer(
      r"^(%?[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M)}
  kinds = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = \S+ (\w[\w-]*)\((.*)$", hlo, re.M):
    name, opcode, rest = m.groups()
    called = re.search(r"calls=%([\w.\-]+)", rest)
    body = bodies.get(called.group(1), "") if called else f"= x {opcode}("
    kind = next((k for op, k in _KINDS if f" {op}(" in body), "elementwise")
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ""
    if "rng_bit_generator" in op_name:  # Dropout masks' random bits.
      kind = "random bits"
    kinds[name] = (kind, op_name)
  return kinds


def run(preset="cpu_unet", batch=32, steps=3, top=15):
  step, args = _train_step(preset, batch)
  hlo = step.lower(*args).compile().as_text()
  for _ in range(2):
    jax.block_until_ready(step(*args))
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(steps):
        jax.block_until_ready(step(*args))
    (path,) = glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  kinds = _fusion_kinds(hlo)
  by_kind, by_source = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in kinds:
      kind, op_name = kinds[e["name"]]
      ms = e["dur"] / 1e3 / steps
      by_kind[kind] += ms
      if kind == "elementwise":
        by_source[re.sub(r"\d+", "", op_name.split("/", 1)[-1])[-70:]] += ms
  return {"preset": preset, "batch": batch, "ms_per_step": sum(by_kind.values()),
          "by_kind_ms": dict(by_kind.most_common()),
          "elementwise_sources_ms": dict(by_source.most_common(top))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu_unet",
                      help="A cfg_guidance.models.presets function.")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  backend.configure_cpu()
  result = run(args.preset, args.batch, top=args.top)
  total = result["ms_per_step"]
  print(f"{result['preset']}, batch {result['batch']}: {total:.0f} ms per step in thunks")
  for kind, ms in result["by_kind_ms"].items():
    print(f"  {kind:12s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
  print("costliest elementwise sources:")
  for source, ms in result["elementwise_sources_ms"].items():
    print(f"  {ms:8.1f} ms  {source}")


if __name__ == "__main__":
  main()
