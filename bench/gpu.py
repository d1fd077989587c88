"""Accelerator benchmark: the ImageNet 64×64 ADM train step in bfloat16, and guided sampling.

  python -m bench.gpu [--batch=64] [--remat] [--attention_impl=cudnn] [--sample_batch=64]
      [--num_steps=256] [--out=DIR]

Reports images/s, model-FLOP utilisation (FLOPs from XLA's cost analysis of the
un-optimised step, against both the chip's spec bf16 peak and a matmul measured in the
same run), compile times and peak memory. With an --attention_impl other than einsum it
first checks that implementation against the einsum form on the same parameters. Each
result is appended to DIR/gpu_bench.jsonl as soon as it exists, so a run cut short still
reports what it measured.
"""

import argparse
import functools
import json
import os
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance import models, sampling, train
from configs import adm

# Dense bf16 peak of common chips, TFLOP/s (vendor specs; no sparsity).
SPEC_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5p": 459.0}


def _emit(out_dir, record):
  print(json.dumps(record), flush=True)
  if out_dir:
    with open(os.path.join(out_dir, "gpu_bench.jsonl"), "a") as f:
      f.write(json.dumps(record) + "\n")


def _spec_peak(device) -> float | None:
  kind = device.device_kind
  for name, tflops in SPEC_BF16_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None


def _time(fn, *args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters, out


def matmul_peak(n: int = 8192) -> float:
  """Measured bf16 matmul FLOP/s on this chip."""
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda a: a @ a)
  seconds, _ = _time(f, a, iters=20)
  return 2 * n**3 / seconds


def _flops(lowered) -> float:
  """Model FLOPs of the un-optimised program: after compilation on GPU, convolutions are
  cuDNN custom calls that XLA's cost analysis does not count (it reported 52 of the 632
  GFLOP per image of the ImageNet 64 train step on an H100)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _shape(model_config):
  return (model_config.image_size, model_config.image_size, model_config.channels)


def _with(model_config, **overrides):
  """A copy of the model config with `overrides` applied."""
  config = model_config.copy_and_resolve_references()
  config.update(overrides)
  return config


def _init_params(model_config):
  create = lambda k: nnx.state(models.create(model_config, rngs=nnx.Rngs(params=k)),
                               nnx.Param).to_pure_dict()
  return jax.jit(create)(jax.random.key(0))


def attention_check(name: str, model_config, n: int, out_dir: str | None):
  """The configured attention against the einsum form, same parameters and inputs.

  Reports ‖ε_impl − ε_einsum‖ / ‖ε_einsum‖ of the whole U-Net in its dtype, beside the
  same measure for the einsum form in float32, the size of the dtype's own rounding.
  Parameters get N(0, 0.02²) noise so the zero-initialised layers carry signal.
  """
  noise = lambda k, p: p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
  params = _init_params(model_config)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [noise(k, p) for k, p in zip(keys, leaves)])
  z = jax.random.normal(jax.random.key(2), (n, *_shape(model_config)), jnp.float32)
  logsnr = jnp.linspace(-5.0, 5.0, n)
  labels = jnp.arange(n, dtype=jnp.int32) % (model_config.num_classes + 1)

  def eps(**overrides):
    fn = train.make_eps_fn(train.model_graphdef(_with(model_config, **overrides)), "eps")
    return np.asarray(jax.jit(fn)(params, z, logsnr, labels), np.float64)

  want = eps(attention_impl="einsum")
  got = eps()
  exact = eps(attention_impl="einsum", dtype="float32")
  rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
  _emit(out_dir, {"bench": "attention_check", "model": name,
                  "attention_impl": model_config.attention_impl,
                  "dtype": model_config.dtype, "n": n,
                  "rel_diff_vs_einsum": rel(got, want),
                  "rel_diff_einsum_vs_float32": rel(want, exact),
                  "rel_diff_vs_float32": rel(got, exact)})


def _train_step(model_config, tx):
  return jax.jit(functools.partial(
      train.train_step, graphdef=train.model_graphdef(model_config), tx=tx,
      rng=jax.random.key(1),
      diffusion_config=dict(logsnr_min=-20., logsnr_max=20., p_uncond=0.1,
                            parameterization="eps"),
      null_label=model_config.num_classes, ema_decay=0.9999), donate_argnums=0)


def train_step_bench(name: str, model_config, batch: int, peaks: dict,
                     out_dir: str | None):
  tx = train.make_optimizer(_train_config())
  init = functools.partial(train.init_state, model_config=model_config, tx=tx)
  state = jax.jit(init)(jax.random.key(0))
  step = _train_step(model_config, tx)
  data = {"image": jnp.zeros((batch, *_shape(model_config)), jnp.float32),
          "label": jnp.zeros((batch,), jnp.int32)}
  start = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  # Model FLOPs are counted on the einsum form whatever runs: a fused attention kernel is
  # a custom call that cost analysis does not see.
  einsum_step = _train_step(_with(model_config, attention_impl="einsum"), tx)
  flops = _flops(einsum_step.lower(state, data))
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
            "tflops_per_s": flops / seconds / 1e12,
            "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30}
  for name, peak in peaks.items():
    if peak:
      record[f"mfu_vs_{name}"] = flops / seconds / peak
  _emit(out_dir, record)


def _train_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      learning_rate=3e-4, warmup_steps=1000, optimizer="adam", b1=0.9, b2=0.999,
      weight_decay=0.0, grad_clip_norm=1.0))


def sampling_bench(name: str, model_config, n: int, num_steps: int, out_dir: str | None):
  """Guided ancestral sampling, T steps, one 2N-batch network call per step."""
  graphdef = train.model_graphdef(model_config)
  params = _init_params(model_config)
  eps_fn = jax.tree_util.Partial(train.make_eps_fn(graphdef, "eps"), params)
  labels = np.arange(n, dtype=np.int32) % model_config.num_classes
  run = lambda seed: sampling.sample(eps_fn, jax.random.key(seed), labels,
                                     shape=_shape(model_config), guidance_weight=1.0,
                                     null_label=model_config.num_classes,
                                     num_steps=num_steps, v=0.3)
  start = time.perf_counter()
  jax.block_until_ready(run(0))
  first_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(run(1))
  seconds = time.perf_counter() - start
  _emit(out_dir, {"bench": "guided_sampling", "model": name,
                  "dtype": model_config.dtype,
                  "attention_impl": model_config.attention_impl,
                  "n": n, "num_steps": num_steps,
                  "compile_and_first_s": round(first_s, 1), "seconds": seconds,
                  "images_per_s": n / seconds,
                  "network_images_per_s": 2 * n * num_steps / seconds})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="imagenet64",
                      help="A configs/adm.py preset (cpu_unet for a quick CPU check).")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--attention_impl", default="einsum",
                      help="einsum | cudnn (cuDNN flash attention) | xla.")
  parser.add_argument("--sample_batch", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=256,
                      help="Sampler steps T; 0 skips the sampling benchmark.")
  parser.add_argument("--out", default=os.environ.get("OUT"))
  args = parser.parse_args()
  device = jax.devices()[0]
  measured = matmul_peak(8192 if device.platform != "cpu" else 1024)
  _emit(args.out, {"bench": "device", "kind": device.device_kind,
                   "platform": device.platform, "jax": jax.__version__,
                   "matmul_bf16_tflops": measured / 1e12,
                   "spec_bf16_tflops": (_spec_peak(device) or 0) / 1e12})
  peaks = {"spec": _spec_peak(device), "matmul": measured}
  model_config = getattr(adm, args.model)()
  model_config.dtype, model_config.remat = args.dtype, args.remat
  model_config.attention_impl = args.attention_impl
  if args.attention_impl != "einsum":
    attention_check(args.model, model_config, 8, args.out)
  train_step_bench(args.model, model_config, args.batch, peaks, args.out)
  if args.num_steps:
    sampling_bench(args.model, model_config, args.sample_batch, args.num_steps, args.out)


if __name__ == "__main__":
  main()
