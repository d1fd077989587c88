"""All CPU benchmarks in one run: prints a table and writes bench/BENCHMARKS.md.

  python -m bench.run [--quick] [--out=bench/BENCHMARKS.md]

Measured in one process on the machine it runs on (train steps, sampler overhead, the
matmul peak, the PyTorch peer where torch is installed); accelerator results recorded
with `bench/gpu.py` are read from bench/results/*.jsonl and shown beside them.
"""

import argparse
import datetime
import glob
import json
import os
import platform

import jax

from bench import sampler_overhead, train_bench
from cfg_guidance.runtime import backend

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- bench.run: generated -->", "<!-- bench.run: end -->"


def _peer(quick: bool) -> dict | None:
  try:
    from bench import torch_peer  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch_peer.run(quick=quick)


def ours_guided_step(quick: bool = False, guidance_weight: float = 3.0) -> dict:
  """Our counterpart of the peer's guided step: ε̃ from one forward on 2N, N = 32.

  The CPU-sized U-Net (`torch_peer.OURS`), both halves in one batch, median of 5 calls.
  """
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench import torch_peer  # pylint: disable=g-import-not-at-top
  from cfg_guidance.models import eps  # pylint: disable=g-import-not-at-top
  config = dict(torch_peer.OURS)
  n = 2 if quick else torch_peer.BATCH
  if quick:
    config.update(image_size=8, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=())
  graphdef = eps.graphdef(config)
  params = jax.jit(functools.partial(eps.init_params, config))(jax.random.key(0))
  rng = np.random.default_rng(0)
  size = config["image_size"]
  z = jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-20, 20, n), jnp.float32)
  labels = jnp.asarray(rng.integers(0, torch_peer.NUM_CLASSES, n), jnp.int32)
  null = jnp.full_like(labels, torch_peer.NUM_CLASSES)

  @backend.jit
  def guided(params, z, logsnr, labels):
    both = eps.apply(graphdef, params, jnp.concatenate([z, z]),
                     jnp.concatenate([logsnr, logsnr]), jnp.concatenate([labels, null]))
    eps_c, eps_u = jnp.split(both, 2)
    return (1 + guidance_weight) * eps_c - guidance_weight * eps_u

  jax.block_until_ready(guided(params, z, logsnr, labels))
  times = []
  for _ in range(2 if quick else 5):
    start = time.perf_counter()
    jax.block_until_ready(guided(params, z, logsnr, labels))
    times.append(time.perf_counter() - start)
  return {"batch": n, "guided_step_s": statistics.median(times)}


def measure(quick: bool = False) -> dict:
  """Every CPU measurement; `quick` shrinks each to seconds (the test suite runs that)."""
  peak = train_bench.matmul_peak()
  results = {"matmul_peak_gflop_per_s": peak / 1e9}
  presets = ["digits"] if quick else ["digits", "cpu_unet"]
  results["train"] = [train_bench.run(quick=quick, preset=p, peak=peak) for p in presets]
  results["sampler"] = sampler_overhead.run(quick=quick)
  results["ours_guided"] = ours_guided_step(quick)
  results["peer"] = _peer(quick)
  return results


def _machine() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  return {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or
          platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__,
          "device": jax.devices()[0].device_kind}


def _accelerator_rows() -> list[str]:
  rows = []
  for path in sorted(glob.glob(os.path.join(HERE, "results", "*.jsonl"))):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    device = next((r for r in records if r.get("bench") == "device"), {})
    for r in records:
      variant = "".join([", remat" if r.get("remat") else "",
                         f", {r['attention_impl']} attention"
                         if r.get("attention_impl", "einsum") != "einsum" else ""])
      if r.get("bench") == "attention_check":
        rows.append(f"| {device.get('kind')} | {r['attention_impl']} attention against "
                    f"einsum, {r['model']}, {r['dtype']}, N = {r['n']} | "
                    f"relative difference {r['rel_diff_vs_einsum']:.2e} | einsum against "
                    f"float32: {r['rel_diff_einsum_vs_float32']:.2e} | | "
                    f"`{os.path.basename(path)}` |")
      elif r.get("bench") == "train_step":
        rows.append(f"| {device.get('kind')} | {r['model']} train step, {r['dtype']}, batch "
                    f"{r['batch']}{variant} | {r['images_per_s']:.0f} img/s | "
                    f"{r.get('mfu_vs_spec', float('nan')):.1%} of spec bf16 peak | "
                    f"compile {r['compile_s']:.0f} s, peak memory "
                    f"{r['peak_memory_gib']:.1f} GiB | `{os.path.basename(path)}` |")
      elif r.get("bench") == "train_step_variant":
        swaps = ", ".join(f"{k}={v}" for k, v in r["swaps"].items()) or "the library's then"
        speedup = r.get("speedup_vs_base", r["speedup_vs_first"])
        rows.append(f"| {device.get('kind')} | {r['model']} train step, {r['dtype']}, batch "
                    f"{r['batch']}{variant}: `{r['variant']}` ({swaps}) | "
                    f"{r['images_per_s']:.0f} img/s | "
                    f"{r.get('mfu_vs_spec', float('nan')):.1%} of spec bf16 peak | "
                    f"×{speedup:.3f} against `base`; compile {r['compile_s']:.0f} s | "
                    f"`{os.path.basename(path)}` |")
      elif r.get("bench") == "fusion_traffic":
        at_copy = (f"; {r['fused_ms_at_copy_rate']:.0f} ms at a copy's rate"
                   if "fused_ms_at_copy_rate" in r else "")
        rows.append(f"| {device.get('kind')} | {r['model']} train step, bytes moved by the "
                    f"fusions (`{r['variant']}`) | {r['fused_gb']:.0f} GB/step in "
                    f"{r['fused_ms']:.0f} ms | {r['fused_gb_per_s']:.0f} GB/s{at_copy} | | "
                    f"`{os.path.basename(path)}` |")
      elif r.get("bench") == "library_calls":
        of_peak = (f", {r['library_tflops_per_s'] / r['peak_tflops']:.0%} of spec bf16 "
                   "peak" if r.get("peak_tflops") else "")
        kinds = ", ".join(f"{kind} {rate:.0f}" for kind, _, _, _, rate, *_ in r["by_kind"])
        rows.append(f"| {device.get('kind')} | {r['model']} train step, cuDNN and cuBLAS "
                    f"calls (`{r['variant']}`) | {r['library_tflop']:.0f} TFLOP/step in "
                    f"{r['library_ms']:.0f} ms | {r['library_tflops_per_s']:.0f} "
                    f"TFLOP/s{of_peak} | TFLOP/s by kind: {kinds} | "
                    f"`{os.path.basename(path)}` |")
      elif r.get("bench") == "kernel_profile" and r.get("variant", "base") == "base":
        shares = ", ".join(f"{kind} {ms / r['busy_ms']:.0%}"
                           for kind, ms in r["by_kind_ms"].items())
        rows.append(f"| {device.get('kind')} | {r['model']} train step, device time by "
                    f"kind ({r['steps']} steps traced) | {r['busy_ms']:.0f} ms/step "
                    f"busy in {r['span_ms']:.0f} | {shares} | | "
                    f"`{os.path.basename(path)}` |")
      elif r.get("bench") == "guided_sampling":
        rows.append(f"| {device.get('kind')} | guided sampling, T = {r['num_steps']}, "
                    f"N = {r['n']}{variant} | {r['images_per_s']:.2f} img/s | "
                    f"{r['network_images_per_s']:.0f} network img/s | compile+first "
                    f"{r['compile_and_first_s']:.0f} s | `{os.path.basename(path)}` |")
  return rows


def render(results: dict) -> str:
  m = _machine()
  lines = [f"Generated by `python -m bench.run` on {m['date']}: {m['cpu_count']} × "
           f"{m['cpu']} ({m['device']}), Python {m['python']}, jax {m['jax']}, "
           f"flax {m['flax']}. Matmul peak measured in the same run: "
           f"{results['matmul_peak_gflop_per_s']:.1f} GFLOP/s (float32, 2048²).", "",
           "## Train step (CPU, float32, one device)", "",
           "| config | batch | img/s | GFLOP/img | GFLOP/s | of matmul peak | compile s |"
           " memory MiB |", "|---|---|---|---|---|---|---|---|"]
  for r in results["train"]:
    lines.append(f"| {r['preset']} | {r['batch']} | {r['images_per_s']:.1f} | "
                 f"{r['gflop_per_image']:.3f} | {r['gflop_per_s']:.1f} | "
                 f"{r['fraction_of_matmul_peak']:.0%} | {r['compile_s']:.1f} | "
                 f"{r.get('memory_mib', float('nan')):.0f} |")
  s = results["sampler"]
  lines += ["", "## Guided sampler overhead (CPU)", "",
            "Wall time of guided sampling (`generate.draw`) / (T × one `eps_fn` call), "
            f"N = {s['n']}, T = {s['num_steps']}, {'×'.join(map(str, s['shape']))}; "
            "goal ≤ 1.05.", "",
            "| form | wall-time ratio | CPU-time ratio |", "|---|---|---|",
            f"| one call on 2N | {s['overhead_batched_2n']:.3f} | "
            f"{s['overhead_batched_2n_cpu_time']:.3f} |",
            f"| two calls on N | {s['overhead_two_calls']:.3f} | "
            f"{s['overhead_two_calls_cpu_time']:.3f} |"]
  lines += ["", "## Against the PyTorch peer (diffusers UNet2DModel, CPU)", ""]
  peer, ours = results.get("peer"), _cpu_unet(results)
  if peer and ours:
    guided = results["ours_guided"]["guided_step_s"]
    lines += [f"torch {peer['torch']} with {peer['threads']} threads, batch {peer['batch']}; "
              "seconds per step, and our time / the peer's (below 1: we are faster).", "",
              "| model | params | train step s | ours / peer | guided step (2N) s | "
              "ours / peer |", "|---|---|---|---|---|---|",
              f"| ours (cpu_unet) | {peer['ours_params']:,} | {ours['step_s']:.3f} | | "
              f"{guided:.3f} | |"]
    for name in ("spec", "adm"):
      if name in peer:
        p = peer[name]
        lines.append(f"| diffusers `{name}` | {p['params']:,} | {p['train_step_s']:.3f} | "
                     f"{ours['step_s'] / p['train_step_s']:.2f} | {p['guided_step_s']:.3f} "
                     f"| {guided / p['guided_step_s']:.2f} |")
  else:
    lines.append("torch/diffusers not installed (`pip install -e \".[bench]\"`), or "
                 "`--quick`: no comparison.")
  acc = _accelerator_rows()
  if acc:
    lines += ["", "## Accelerators (`bench/gpu.py`)", "",
              "| device | what | throughput | utilisation | compile / memory | record |",
              "|---|---|---|---|---|---|", *acc]
  return "\n".join(lines) + "\n"


def _cpu_unet(results: dict) -> dict | None:
  return next((r for r in results["train"] if r["preset"] == "cpu_unet"), None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join(HERE, "BENCHMARKS.md"))
  args = parser.parse_args()
  backend.configure_cpu()  # As the CLI does; the peer, in this process, gets it too.
  text = render(measure(args.quick))
  print(text)
  if args.out:
    write(args.out, text)


def write(path: str, generated: str) -> None:
  """Replaces the generated block of `path`, keeping the hand-written notes around it."""
  old = open(path).read() if os.path.exists(path) else ""
  block = f"{BEGIN}\n{generated}{END}\n"
  if BEGIN in old and END in old:
    head, rest = old.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1].lstrip("\n")
  else:
    text = block + old
  with open(path, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
