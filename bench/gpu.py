"""Accelerator benchmark: the ImageNet 64×64 ADM train step in bfloat16, and guided sampling.

  python -m bench.gpu [--model=imagenet64] [--batch=64] [--remat] [--attention_impl=cudnn]
      [--sample_batch=64] [--num_steps=256] [--profile_steps=3] [--skip_check] [--out=DIR]

Reports images/s, model-FLOP utilisation (FLOPs from XLA's cost analysis of the
un-optimised step, against both the chip's spec bf16 peak and a matmul measured in the
same run), compile times and peak memory. The variants are the model's own config
options (--dtype, --remat, --attention_impl). With an --attention_impl other than einsum
it first checks that implementation against the einsum form on the same parameters
(unless --skip_check). With --profile_steps it traces that many train steps and reports
the device's time per step by kind of work and by kernel. Each result is appended to
DIR/gpu_bench.jsonl as soon as it exists, so a run cut short still reports what it
measured, and a stage that fails is recorded as an error without stopping the others.
"""

import argparse
import collections
import functools
import glob
import json
import os
import re
import shutil
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import config as config_lib
from cfg_guidance import generate, train
from cfg_guidance import state as state_lib
from cfg_guidance.models import eps, presets
from cfg_guidance.runtime import backend, sharding

# Dense bf16 peak of common chips, TFLOP/s (vendor specs; no sparsity).
SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5p": 459.0}


def _emit(out_dir, record):
  """Prints a result and appends it to DIR/gpu_bench.jsonl."""
  print(json.dumps(record), flush=True)
  if out_dir:
    with open(os.path.join(out_dir, "gpu_bench.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def _spec_peak(device) -> float | None:
  return next((tflops * 1e12 for name, tflops in SPEC_BF16_TFLOPS.items()
               if name in device.device_kind), None)


def matmul_peak(n: int = 8192, iters: int = 20) -> float:
  """Measured bf16 matmul FLOP/s on this chip."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(iters):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n**3 * iters / (time.perf_counter() - start)


def _flops(step, *args) -> tuple[float, str]:
  """Model FLOPs of the un-optimised program, and where they were counted.

  Not the compiled one: after compilation on GPU, convolutions are cuDNN custom calls
  that XLA's cost analysis does not count (it reported 52 of the 632 GFLOP per image of
  the ImageNet 64 train step on an H100). A backend reached through a PJRT plugin
  (jax-cuda13 0.11.2 on an H200) analyses no un-optimised program; then the same step is
  lowered for the CPU, from the arguments' shapes, and counted there.
  """
  cost, source = step.lower(*args).cost_analysis(), "lowered"
  if cost is None:
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    with jax.default_device(jax.devices("cpu")[0]):
      cost, source = step.lower(*shapes).cost_analysis(), "lowered for cpu"
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), source


def _shape(model_config):
  return (model_config.image_size, model_config.image_size, model_config.channels)


def _with(model_config, **overrides):
  """A copy of the model config with `overrides` applied."""
  config = model_config.copy_and_resolve_references()
  config.update(overrides)
  return config


def _init_params(model_config):
  return jax.jit(functools.partial(eps.init_params, model_config))(jax.random.key(0))


def attention_check(name: str, model_config, n: int, out_dir: str | None):
  """The configured attention against the einsum form, same parameters and inputs.

  Reports ‖ε_impl − ε_einsum‖ / ‖ε_einsum‖ of the whole U-Net in its dtype, beside the
  same measure for the einsum form in float32, the size of the dtype's own rounding.
  Parameters get N(0, 0.02²) noise so the zero-initialised layers carry signal.
  """
  params = _init_params(model_config)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [
      p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])
  z = jax.random.normal(jax.random.key(2), (n, *_shape(model_config)), jnp.float32)
  logsnr = jnp.linspace(-5.0, 5.0, n)
  labels = jnp.arange(n, dtype=jnp.int32) % (model_config.num_classes + 1)

  def eps_of(**overrides):
    fn = eps.make_eps_fn(eps.graphdef(_with(model_config, **overrides)), "eps")
    return np.asarray(jax.jit(fn)(params, z, logsnr, labels), np.float64)

  want, got = eps_of(attention_impl="einsum"), eps_of()
  exact = eps_of(attention_impl="einsum", dtype="float32")
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  _emit(out_dir, {"bench": "attention_check", "model": name,
                  "attention_impl": model_config.attention_impl,
                  "dtype": model_config.dtype, "n": n,
                  "rel_diff_vs_einsum": rel(got, want),
                  "rel_diff_einsum_vs_float32": rel(want, exact),
                  "rel_diff_vs_float32": rel(got, exact)})


def _train_step(model_config, defaults, tx):
  """The library's train step (Adam, EMA, clipping, label dropout), state donated."""
  return backend.jit(functools.partial(
      train.train_step, graphdef=eps.graphdef(model_config), tx=tx, rng=jax.random.key(1),
      diffusion_config=dict(defaults.diffusion), null_label=model_config.num_classes,
      ema_decay=defaults.train.ema_decay), donate_argnums=0)


def train_step_bench(name: str, model_config, batch: int, peaks: dict,
                     out_dir: str | None):
  """Emits the train_step record; returns (compiled step, state, batch) for a profile."""
  defaults = config_lib.get_config()  # The default optimizer and diffusion settings.
  tx = train.make_optimizer(defaults.train)
  init = functools.partial(state_lib.init, model_config=model_config, tx=tx)
  state = jax.jit(init)(jax.random.key(0))
  step = _train_step(model_config, defaults, tx)
  data = {"image": jnp.zeros((batch, *_shape(model_config)), jnp.float32),
          "label": jnp.zeros((batch,), jnp.int32)}
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  # Model FLOPs are counted on the einsum form whatever runs: a fused attention kernel is
  # a custom call that cost analysis does not see.
  if model_config.attention_impl != "einsum":
    step = _train_step(_with(model_config, attention_impl="einsum"), defaults, tx)
  flops, flops_source = _flops(step, state, data)
  state, _ = compiled(state, data)
  jax.block_until_ready(state)
  iters = 10
  start = time.perf_counter()
  for _ in range(iters):
    state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / iters
  stats = jax.devices()[0].memory_stats() or {}
  record = {"bench": "train_step", "model": name,
            "dtype": model_config.dtype, "batch": batch, "remat": model_config.remat,
            "attention_impl": model_config.attention_impl,
            "compile_s": round(compile_s, 1), "step_s": seconds,
            "images_per_s": batch / seconds, "flops_per_step": flops,
            "tflops_per_s": flops / seconds / 1e12, "flops_counted": flops_source,
            "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30}
  for peak_name, peak in peaks.items():
    if peak:
      record[f"mfu_vs_{peak_name}"] = flops / seconds / peak
  _emit(out_dir, record)
  return compiled, state, data


def sampling_bench(name: str, model_config, n: int, num_steps: int, out_dir: str | None):
  """Guided ancestral sampling through the sampling driver, T steps, one 2N-batch
  network call per step; the first call compiles, the second is timed."""
  eps_fn = jax.tree_util.Partial(eps.make_eps_fn(eps.graphdef(model_config), "eps"),
                                 _init_params(model_config))
  labels = np.arange(n, dtype=np.int32) % model_config.num_classes
  settings = generate.Settings(shape=_shape(model_config),
                               null_label=model_config.num_classes, num_steps=num_steps,
                               batch_size=n, v=0.3)
  mesh = sharding.create_mesh(jax.devices()[:1])
  run = lambda seed: generate.draw(eps_fn, labels, 1.0, settings=settings, seed=seed,
                                   mesh=mesh)
  start = time.perf_counter()
  run(0)
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  run(1)
  seconds = time.perf_counter() - start
  _emit(out_dir, {"bench": "guided_sampling", "model": name,
                  "dtype": model_config.dtype,
                  "attention_impl": model_config.attention_impl,
                  "n": n, "num_steps": num_steps,
                  "compile_and_first_s": round(first_s, 1), "seconds": seconds,
                  "images_per_s": n / seconds,
                  "network_images_per_s": 2 * n * num_steps / seconds})


# Kinds of device work, matched in order against "<XLA op> <kernel name>", lower case.
# cuDNN's fused attention kernels say fmha/flash/sdpa (its backward's dO·O helper,
# dot_do_o); its convolutions fprop, dgrad and wgrad (XLA names the ops cudnn-conv*);
# cuBLAS and Triton matmuls gemm or nvjet; XLA:CPU's library calls ynn_fusion.
PROFILE_KINDS = (
    ("attention", r"fmha|flash|sdpa|dot_do_o"),
    ("convolution", r"cudnn-conv|convolution|fprop|dgrad|wgrad|implicit_gemm"),
    ("matmul", r"gemm|nvjet|cublas|matmul|\bdot\b|ynn_fusion"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("reduction", r"reduce|reduction|scatter"),
    ("elementwise", r"fusion|loop|convert|broadcast"),
)


def _kind(op: str, kernel: str) -> str:
  text = f"{op} {kernel}".lower()
  return next((kind for kind, pattern in PROFILE_KINDS if re.search(pattern, text)),
              "other")


def profile_events(profile):
  """(XLA op, kernel, start ns, duration ns) of each piece of work a device ran.

  GPU planes hold kernels on "Stream" lines, TPU planes their ops on "XLA Ops"; with
  neither (CPU), the host threads' events that name an XLA op.
  """
  devices = [p for p in profile.planes if p.name.startswith(("/device:GPU",
                                                                 "/device:TPU"))]
  events = []
  for plane in devices or [p for p in profile.planes if p.name == "/host:CPU"]:
    for line in plane.lines:
      if plane.name.startswith("/device:GPU") and not line.name.startswith("Stream"):
        continue
      if plane.name.startswith("/device:TPU") and line.name != "XLA Ops":
        continue
      for event in line.events:
        stats = dict(event.stats)
        if not devices and "hlo_op" not in stats:
          continue
        events.append((str(stats.get("hlo_op", event.name)), event.name,
                       event.start_ns, event.duration_ns))
  return events


def _ungrouped(name: str) -> str:
  """fusion.12, fusion.7 -> fusion; input_reduce_fusion_1479 -> input_reduce_fusion."""
  return re.sub(r"[._]\d+$", "", name)


def summarise_profile(events, steps: int, top: int = 25) -> dict:
  """Milliseconds per step of device work, by kind and by kernel.

  Kernels are grouped with their numeric suffix dropped, and listed with their count per
  step. busy_ms sums the work and span_ms runs from first start to last end: busy / span
  below 1 is time the device waited, above 1 work that overlapped (CPU threads, GPU
  streams).
  """
  per_step = lambda ns: ns / 1e6 / steps
  kinds, kernels, counts = (collections.Counter() for _ in range(3))
  for op, kernel, _, duration in events:
    kinds[_kind(op, kernel)] += duration
    kernel = _ungrouped(kernel)[:120]
    kernels[kernel] += duration
    counts[kernel] += 1
  start = min(e[2] for e in events)
  end = max(e[2] + e[3] for e in events)
  return {"steps": steps, "events_per_step": len(events) / steps,
          "busy_ms": per_step(sum(kinds.values())), "span_ms": per_step(end - start),
          "by_kind_ms": {k: per_step(v) for k, v in kinds.most_common()},
          "top_kernels": [[k, per_step(ns), counts[k] / steps]
                          for k, ns in kernels.most_common(top)]}


def trace_events(compiled, state, data, steps: int):
  """profile_events of `steps` train steps run under jax.profiler."""
  trace_dir = tempfile.mkdtemp(prefix="bench_gpu_trace_")
  try:
    jax.block_until_ready(state)
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(steps):
        state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    finally:
      jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    events = profile_events(profile)
    if not events:
      lines = {p.name: [line.name for line in p.lines] for p in profile.planes}
      raise ValueError(f"No device work in the trace; its planes and lines: {lines}")
    return events
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)


def kernel_profile(name: str, prepared, steps: int, out_dir: str | None):
  """Traces `steps` train steps; emits summarise_profile's record."""
  _emit(out_dir, {"bench": "kernel_profile", "model": name,
                  **summarise_profile(trace_events(*prepared, steps), steps)})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="imagenet64",
                      help="A cfg_guidance.models.presets function (digits or cpu_unet "
                      "for a quick CPU check).")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--attention_impl", default="einsum",
                      help="einsum | cudnn (cuDNN flash attention) | xla.")
  parser.add_argument("--sample_batch", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=256,
                      help="Sampler steps T; 0 skips the sampling benchmark.")
  parser.add_argument("--profile_steps", type=int, default=0,
                      help="Train steps to trace for a kernel_profile record (0: none).")
  parser.add_argument("--skip_check", action="store_true",
                      help="No attention check (an earlier run on this device made it).")
  parser.add_argument("--out", default=os.environ.get("OUT"))
  args = parser.parse_args()
  device = jax.devices()[0]
  measured = matmul_peak(8192 if device.platform != "cpu" else 1024)
  _emit(args.out, {"bench": "device", "kind": device.device_kind,
                   "platform": device.platform, "jax": jax.__version__,
                   "matmul_bf16_tflops": measured / 1e12,
                   "spec_bf16_tflops": (_spec_peak(device) or 0) / 1e12})
  peaks = {"spec": _spec_peak(device), "matmul": measured}
  model_config = getattr(presets, args.model)()
  model_config.update(dtype=args.dtype, remat=args.remat,
                      attention_impl=args.attention_impl)

  errors = []

  def stage(fn, *fn_args):
    """Runs one benchmark: its result, or None (and an error record) if it failed."""
    try:
      return fn(*fn_args) or True
    except Exception as e:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      errors.append(f"{type(e).__name__}: {str(e)[:2000]}")
      _emit(args.out, {"bench": "error", "stage": fn.__name__,
                       "attention_impl": model_config.attention_impl,
                       "error": errors[-1]})
      return None

  checked = (args.attention_impl == "einsum" or args.skip_check
             or stage(attention_check, args.model, model_config, 8, args.out))
  batch = args.batch
  step = stage(train_step_bench, args.model, model_config, batch, peaks, args.out)
  # Still worth the device time after a failure: half the batch if it ran out of
  # memory, the einsum form if the attention check failed too. Any other error would
  # only repeat.
  out_of_memory = errors and re.search(r"RESOURCE_EXHAUSTED|out of memory", errors[-1],
                                       re.IGNORECASE)
  if not step and (out_of_memory or not checked):
    if out_of_memory:
      batch //= 2
    else:
      model_config.attention_impl = "einsum"
    step = stage(train_step_bench, args.model, model_config, batch, peaks, args.out)
  if step and args.profile_steps:
    stage(kernel_profile, args.model, step, args.profile_steps, args.out)
  del step  # The train state's memory goes back before sampling.
  if args.num_steps:
    stage(sampling_bench, args.model, model_config, args.sample_batch, args.num_steps,
          args.out)


if __name__ == "__main__":
  main()
