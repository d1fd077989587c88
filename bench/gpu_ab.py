"""Train-step variants timed against each other on one device, with a profile of each.

  python -m bench.gpu_ab [--model=imagenet64] [--batch=256] [--attention_impl=cudnn]
      [--variants=base,auto_layout,einsum_attention,conv_fusion] [--profile_steps=3]
      [--hlo=base] [--deadline_s=540] [--out=DIR]

A variant is the same train step with layers swapped at trace time (VARIANTS):
GroupNorm for one of bench.norm_bench's forms, dropout's random words for the fused
counter hash or XLA's generator, or a model field changed; or compiled with XLA
options: a VARIANTS entry's, or any given as `xla:NAME=VALUE[+NAME=VALUE...]` in
--variants (`xla:xla_gpu_enable_triton_gemm=false`). The variants run in the
order given, on one train state, and each reports its compile time, its step time (the
median of three timed runs) and its speed against the first; then a kernel profile (by
kind of work; the per-kernel table goes to DIR/kernels.jsonl), the bytes its fusions
move and how fast, the FLOP rates of its cuDNN and cuBLAS calls against the chip's
peak (bench.fusion_traffic) and, for those named in --hlo, the optimised
HLO (DIR/hlo_<variant>.txt.gz), whose fusion names are the kernel names of the
profile.

On a GPU the compiles share a JAX persistent cache, and with it XLA's autotuning cache,
so later variants reuse the algorithms the first chose for the same convolutions: on an
H200 the first ImageNet 64 step compiled in 162 s, the next ones in 52-76 s. A variant
is not started once the last compile time says it would end past --deadline_s; the
model FLOPs are counted last, if time is left. Every result is appended to
DIR/gpu_ab.jsonl as soon as it exists.
"""

import argparse
import collections
import contextlib
import functools
import gzip
import json
import os
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp

from bench import fusion_traffic, gpu, norm_bench
from cfg_guidance import train
from cfg_guidance.models import layers
from configs import adm

# bench.gpu's helpers, so that both scripts time the same step.
# pylint: disable=protected-access
_emit, _with, _train_step, _flops = gpu._emit, gpu._with, gpu._train_step, gpu._flops
# pylint: enable=protected-access

# name -> what it swaps: "norm" (a norm_bench form for every GroupNorm),
# "dropout_words" ("hash": layers.counter_hash_bits, "rbg": jax.random.bits),
# "model" (model config fields) or "layout" ("auto": the compiler picks the train
# state's layout; on an H200 row-major 3×3 kernels cost the optimizer a transpose of
# cuDNN's [O, H, W, I] weight gradients, ~10 ms a step). Since the H200 A/B
# (bench/BENCHMARKS.md) the library takes hashed dropout words on GPUs too, so there
# "hash_dropout" is "base". "xla": XLA compiler options for the step. conv_fusion
# has XLA hand cuDNN each convolution with the pointwise work around it as one graph
# (experimental in XLA; it fuses only pointwise ops on the conv's own tensor and scalar
# broadcasts, so GroupNorm's per-channel scale and the conv's bias stay out), and
# cudnn_gemm_fusion the matmuls likewise (level 3: XLA's widest). Experimental options
# may fail an XLA check, which ends the process: run them last (the records before
# are already written).
VARIANTS = {
    "base": {},
    "fast": {"norm": "one_pass", "dropout_words": "hash"},
    "one_pass": {"norm": "one_pass"},
    "hash_dropout": {"dropout_words": "hash"},
    "custom_vjp": {"norm": "custom_vjp", "dropout_words": "hash"},
    "groups": {"norm": "groups"},
    "rbg_dropout": {"dropout_words": "rbg"},
    "no_dropout": {"model": {"dropout": 0.0}},
    "auto_layout": {"layout": "auto"},
    "einsum_attention": {"model": {"attention_impl": "einsum"}},
    "conv_fusion": {"xla": {"xla_gpu_experimental_enable_conv_fusion": True,
                            "xla_gpu_use_runtime_fusion": True}},
    "cudnn_gemm_fusion": {"xla": {"xla_gpu_cudnn_gemm_fusion_level": 3}},
}


def variant_spec(name: str) -> dict:
  """A VARIANTS entry, or the XLA options of an `xla:NAME=VALUE[+NAME=VALUE...]` name
  (true/false as booleans, integers as integers, the rest as strings)."""
  if name in VARIANTS:
    return VARIANTS[name]
  if not name.startswith("xla:"):
    raise ValueError(f"--variants: unknown {name!r}; expected one of "
                     f"{sorted(VARIANTS)} or xla:NAME=VALUE[+NAME=VALUE...].")
  options = {}
  for item in name[len("xla:"):].split("+"):
    key, sep, value = item.partition("=")
    if not (sep and key):
      raise ValueError(f"--variants: {name!r}: {item!r} is not NAME=VALUE.")
    lowered = value.lower()
    options[key] = (lowered == "true" if lowered in ("true", "false")
                    else int(value) if value.lstrip("-").isdigit() else value)
  return {"xla": options}

_WORDS = {"hash": layers.counter_hash_bits,
          "rbg": lambda key, n: jax.random.bits(key, (n,), jnp.uint32)}


def _norm_call(form):
  """A GroupNorm.__call__ that computes through a norm_bench form."""

  def call(self, x, scale=None, shift=None):
    if self.num_groups != norm_bench.GROUPS or self.epsilon != norm_bench.EPSILON:
      raise ValueError(
          f"norm_bench forms use {norm_bench.GROUPS} groups and epsilon "
          f"{norm_bench.EPSILON}; this GroupNorm has {self.num_groups} and "
          f"{self.epsilon}.")
    if scale is None:  # Zero conditioning; XLA folds the (1 + 0)·… + 0 away.
      scale = shift = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    return form(x, self.scale[...], self.bias[...], scale, shift, self.dtype)

  return call


@contextlib.contextmanager
def swapped(spec):
  """Applies a VARIANTS entry's layer swaps while the step is traced."""
  unknown = set(spec) - {"norm", "dropout_words", "model", "layout", "xla"}
  if unknown:
    raise ValueError(f"Unknown swap {sorted(unknown)}; expected norm, dropout_words, "
                     "model, layout or xla.")
  saved = layers.GroupNorm.__call__, layers.dropout_words
  try:
    if "norm" in spec:
      layers.GroupNorm.__call__ = _norm_call(norm_bench.VARIANTS[spec["norm"]])
    if "dropout_words" in spec:
      layers.dropout_words = _WORDS[spec["dropout_words"]]
    yield
  finally:
    layers.GroupNorm.__call__, layers.dropout_words = saved


def _median_step_s(compiled, state, data, steps, repeats=3):
  """Median over `repeats` timed runs of `steps` steps, their spread, the new state."""
  times = []
  for _ in range(repeats):
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / steps)
  times.sort()
  return times[len(times) // 2], times[-1] - times[0], state


def _kernel_table(events, steps):
  """[[kernel, XLA op, ms per step, launches per step]], slowest first, names kept
  whole so they match the HLO's fusion names."""
  total, count = collections.Counter(), collections.Counter()
  for op, kernel, _, duration in events:
    total[kernel, op] += duration
    count[kernel, op] += 1
  return [[kernel, op, ns / 1e6 / steps, count[kernel, op] / steps]
          for (kernel, op), ns in total.most_common()]


def main(argv=None):
  start_time = time.monotonic()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="imagenet64")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--attention_impl", default="einsum")
  parser.add_argument("--variants",
                      default="base,auto_layout,einsum_attention,conv_fusion")
  parser.add_argument("--steps", type=int, default=4, help="Steps per timed run.")
  parser.add_argument("--profile_steps", type=int, default=3)
  parser.add_argument("--hlo", default="base", help="Variants whose HLO to keep.")
  parser.add_argument("--deadline_s", type=float, default=540.0)
  parser.add_argument("--out", default=os.environ.get("OUT"))
  args = parser.parse_args(argv)
  names = args.variants.split(",")
  specs = {name: variant_spec(name) for name in names}  # Fails before any compile.

  emit = functools.partial(_emit, args.out, filename="gpu_ab.jsonl")

  device = jax.devices()[0]
  if device.platform == "gpu":  # XLA's autotuning cache lives in JAX's persistent one.
    jax.config.update("jax_compilation_cache_dir",
                      tempfile.mkdtemp(prefix="bench_gpu_ab_cache_"))
  spec_tflops = (gpu._spec_peak(device) or 0) / 1e12  # pylint: disable=protected-access
  emit({"bench": "device", "kind": device.device_kind, "platform": device.platform,
        "jax": jax.__version__, "spec_bf16_tflops": spec_tflops})

  model_config = getattr(adm, args.model)()
  model_config.dtype, model_config.attention_impl = args.dtype, args.attention_impl
  tx = train.make_optimizer(gpu._train_config())  # pylint: disable=protected-access
  init = jax.jit(functools.partial(train.init_state, model_config=model_config, tx=tx))
  state = init(jax.random.key(0))
  shape = (args.batch, model_config.image_size, model_config.image_size,
           model_config.channels)
  data = {"image": jax.random.uniform(jax.random.key(1), shape, jnp.float32, -1, 1),
          "label": jnp.arange(args.batch, dtype=jnp.int32) % model_config.num_classes}
  base_step_s, last_compile_s = None, None
  for name in names:
    spec = specs[name]
    elapsed = time.monotonic() - start_time
    if last_compile_s and elapsed + 1.2 * last_compile_s + 30 > args.deadline_s:
      emit({"bench": "skipped", "variant": name, "elapsed_s": round(elapsed, 1),
            "why": f"would end past --deadline_s={args.deadline_s}"})
      continue
    try:
      config = _with(model_config, **spec.get("model", {}))
      with swapped(spec):
        step = _train_step(config, tx, auto_layout=spec.get("layout") == "auto")
        begin = time.perf_counter()
        compiled = step.lower(state, data).compile(spec.get("xla"))
        last_compile_s = time.perf_counter() - begin
      # The state in the layouts this step takes (a no-op where they are the last's).
      formats = compiled.input_formats[0][0]
      state = jax.device_put(state, formats)
      reordered = sum(list(f.layout.major_to_minor) != sorted(f.layout.major_to_minor)
                      for f in jax.tree.leaves(formats))
      # Warm-up. After one step, the H200's first timed run in a process was ~20 ms a
      # step slower than the next two.
      for _ in range(3):
        state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
      step_s, spread, state = _median_step_s(compiled, state, data, args.steps)
      base_step_s = base_step_s or step_s
      stats = device.memory_stats() or {}
      emit({"bench": "train_step_variant", "variant": name, "swaps": spec,
            "model": args.model, "batch": args.batch,
            "attention_impl": args.attention_impl, "dtype": args.dtype,
            "compile_s": round(last_compile_s, 1), "step_s": step_s,
            "step_s_spread": spread, "images_per_s": args.batch / step_s,
            "speedup_vs_first": base_step_s / step_s,
            "state_arrays_not_row_major": int(reordered),
            # The process's peak so far: the largest of the variants run until now.
            "peak_memory_gib_so_far": stats.get("peak_bytes_in_use", 0) / 2**30})
      hlo_text = compiled.as_text()
      if name in args.hlo.split(",") and args.out:
        with gzip.open(os.path.join(args.out, f"hlo_{name}.txt.gz"), "wt") as f:
          f.write(hlo_text)
      if args.profile_steps:
        events, state = gpu.trace_events((compiled, state, data), args.profile_steps)
        emit({"bench": "kernel_profile", "model": args.model, "variant": name,
              **gpu.summarise_profile(events, args.profile_steps, top=10)})
        kernels = _kernel_table(events, args.profile_steps)
        emit({"bench": "fusion_traffic", "model": args.model, "variant": name,
              **fusion_traffic.traffic(hlo_text, kernels, top=10)})
        emit({"bench": "library_calls", "model": args.model, "variant": name,
              **fusion_traffic.library_calls(hlo_text, kernels, spec_tflops or None)})
        if args.out:
          with open(os.path.join(args.out, "kernels.jsonl"), "a") as f:
            f.write(json.dumps({"variant": name, "kernels": kernels}) + "\n")
      del compiled
    except Exception as e:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      emit({"bench": "error", "variant": name, "error": f"{type(e).__name__}: "
            f"{str(e)[:2000]}"})
      if any(a.is_deleted() for a in jax.tree.leaves(state)):
        state = init(jax.random.key(0))  # A step took it (donated), then failed.
  if time.monotonic() - start_time + 60 < args.deadline_s:
    try:
      einsum = _train_step(_with(model_config, attention_impl="einsum"), tx)
      flops, source = _flops(einsum, state, data)
      emit({"bench": "flops", "flops_per_step": flops, "flops_counted": source,
            "batch": args.batch})
    except Exception as e:  # pylint: disable=broad-exception-caught
      traceback.print_exc()
      emit({"bench": "error", "stage": "flops", "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
  main()
