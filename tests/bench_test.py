"""The benchmark command runs end to end at a tiny size and its numbers hang together."""

import importlib
import json
import math

import pytest

from bench import run as bench_run

SCRIPTS = ("gpu", "input_bench", "models_bench", "profile_step", "run",
           "sampler_overhead", "torch_peer", "train_bench")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_imports(name):
  """Each script's imports resolve (torch and TensorFlow are imported where used), and
  its docstring's first line is its --help description."""
  assert importlib.import_module(f"bench.{name}").__doc__.splitlines()[0]


def test_quick_benchmark_renders_consistent_numbers(tmp_path, monkeypatch):
  monkeypatch.setattr(bench_run, "_peer", lambda quick: None)  # The peer needs torch.
  results = bench_run.measure(quick=True)
  (train,) = results["train"]
  assert math.isclose(train["images_per_s"], train["batch"] / train["step_s"])
  assert math.isclose(train["gflop_per_s"],
                      train["gflop_per_image"] * train["images_per_s"], rel_tol=1e-9)
  # The digits train step does roughly 3x its forward FLOPs; the forward is ~30 MFLOP.
  assert 0.01 < train["gflop_per_image"] < 1.0
  assert 0 < train["fraction_of_matmul_peak"] < 5
  out = tmp_path / "BENCHMARKS.md"
  out.write_text("# Benchmarks\n\nHand-written notes stay.\n")
  bench_run.write(str(out), bench_run.render(results))
  bench_run.write(str(out), bench_run.render(results))  # Replaces, does not append.
  text = out.read_text()
  assert text.count(bench_run.BEGIN) == 1 and "Hand-written notes stay." in text
  assert "| digits | 8 |" in text


def test_profile_step_sorts_a_programs_thunks_by_kind():
  from bench import profile_step  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def program(x, kernel, w, key):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.tanh(y) @ w
    keep = jax.random.bernoulli(key, 0.9, y.shape)
    return jnp.where(keep, y, 0).sum(axis=(1, 2)), jnp.transpose(y, (3, 1, 2, 0)) * 2
  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((4, 4)),
          jax.random.key(0, impl="rbg"))
  kinds = profile_step._fusion_kinds(jax.jit(program).lower(*args).compile().as_text())
  # Every instruction the program is built from lands in one of the kinds.
  found = {kind for kind, _ in kinds.values()}
  assert {"conv", "dot", "reduce", "random bits"} <= found, kinds


def test_gpu_script_runs_on_cpu_at_a_tiny_size(tmp_path, monkeypatch):
  """bench.gpu end to end on the digits U-Net, with the library attention checked
  against the einsum form: what a device session runs, at a size the CPU can afford."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from bench import gpu  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, "argv", [
      "gpu", "--model=digits", "--dtype=float32", "--batch=4", "--attention_impl=xla",
      "--sample_batch=2", "--num_steps=2", "--profile_steps=2", f"--out={tmp_path}"])
  gpu.main()
  records = {}
  for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines():
    record = json.loads(line)
    records[record["bench"]] = record
  assert set(records) == {"device", "attention_check", "train_step", "kernel_profile",
                          "guided_sampling"}
  check = records["attention_check"]
  # Same float32 network, two attention code paths: equal to float32 rounding.
  assert check["rel_diff_einsum_vs_float32"] == 0.0
  assert check["rel_diff_vs_einsum"] < 1e-5, check
  step = records["train_step"]
  assert step["attention_impl"] == "xla" and step["batch"] == 4
  assert math.isclose(step["images_per_s"], 4 / step["step_s"])
  # The digits U-Net's train step is ~0.1 GFLOP per image (bench.run's table).
  assert 0.01e9 < step["flops_per_step"] / 4 < 1e9, step
  assert step["flops_counted"] == "lowered"
  profile = records["kernel_profile"]
  assert profile["steps"] == 2 and profile["events_per_step"] > 10
  assert math.isclose(sum(profile["by_kind_ms"].values()), profile["busy_ms"])
  assert profile["by_kind_ms"]["matmul"] > 0  # YNNPACK's dots.
  assert profile["by_kind_ms"]["convolution"] > 0  # The 3×3 ones, on XLA's Eigen path.
  assert math.isclose(records["guided_sampling"]["network_images_per_s"],
                      2 * 2 * 2 / records["guided_sampling"]["seconds"])


@pytest.mark.parametrize("error, batches", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate", [64, 32]),
    ("TypeError: 'NoneType' object is not subscriptable", [64]),
])
def test_gpu_script_retries_a_train_step_at_half_batch_only_when_out_of_memory(
    tmp_path, monkeypatch, error, batches):
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from bench import gpu  # pylint: disable=g-import-not-at-top
  calls = []

  def train_step_bench(name, model_config, batch, peaks, out_dir):
    del name, model_config, peaks, out_dir
    calls.append(batch)
    if len(calls) == 1:
      raise RuntimeError(error)

  monkeypatch.setattr(gpu, "train_step_bench", train_step_bench)
  monkeypatch.setattr(gpu, "matmul_peak", lambda n: 1e12)
  monkeypatch.setattr(sys, "argv", ["gpu", "--model=digits", "--batch=64",
                                    "--num_steps=0", f"--out={tmp_path}"])
  gpu.main()
  assert calls == batches
  records = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").open()]
  assert [r["bench"] for r in records] == ["device", "error"]
  assert records[1]["stage"] == "train_step_bench" and error in records[1]["error"]


def test_profile_summary_adds_up_by_kind_and_kernel():
  from bench import gpu  # pylint: disable=g-import-not-at-top
  # (XLA op, kernel, start ns, duration ns): two steps' work, kernel names as an H200
  # trace of the ImageNet 64 step gave them.
  conv = "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc"
  events = [
      ("cudnn-conv-bw-filter.3", conv, 0, 4_000_000),
      ("command_buffer_12", "input_reduce_fusion_1479", 4_000_000, 1_000_000),
      ("command_buffer_12", "loop_convert_fusion_7", 6_000_000, 500_000),
      ("custom-call.9", "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16",
       7_000_000, 1_500_000),
      ("custom-call.9", "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>",
       8_500_000, 500_000),
      ("cudnn-conv-bw-filter.8", conv, 10_000_000, 6_000_000),
      ("command_buffer_40", "input_reduce_fusion_2", 16_000_000, 3_000_000),
      ("cublas-gemm.1", "nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NNT", 19_000_000,
       1_000_000),
  ]
  got = gpu.summarise_profile(events, steps=2, top=2)
  assert got["busy_ms"] == 17.5 / 2 and got["span_ms"] == 20 / 2
  assert got["events_per_step"] == 4
  # "convert" is no convolution; nvjet is cuBLAS's matmul kernel family.
  assert got["by_kind_ms"] == {"convolution": 5.0, "reduction": 2.0, "attention": 1.0,
                               "elementwise": 0.25, "matmul": 0.5}
  # Kernels grouped with their numeric suffixes dropped, with their count per step.
  assert got["top_kernels"] == [[conv, 5.0, 1.0], ["input_reduce_fusion", 2.0, 1.0]]


def test_flops_are_counted_on_cpu_where_the_backend_cannot(monkeypatch):
  """A PJRT plugin backend answers None to Lowered.cost_analysis (jax-cuda13 0.11.2);
  _flops then lowers the same step for the CPU and must count the same FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bench import gpu  # pylint: disable=g-import-not-at-top
  step = jax.jit(lambda a, b: jnp.tanh(a @ b["w"]).sum())
  args = (jnp.ones((16, 32)), {"w": jnp.ones((32, 8))})
  want = gpu._flops(step, *args)
  assert want[1] == "lowered" and want[0] >= 2 * 16 * 32 * 8
  analyse = jax.stages.Lowered.cost_analysis
  # Unavailable unless the lowering happens under jax.default_device(cpu), as on a GPU.
  monkeypatch.setattr(jax.stages.Lowered, "cost_analysis",
                      lambda self: analyse(self) if jax.config.jax_default_device
                      else None)
  assert gpu._flops(step, *args) == (want[0], "lowered for cpu")


def test_accelerator_rows_name_the_variant(tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  (tmp_path / "results").mkdir()
  records = [
      {"bench": "device", "kind": "NVIDIA H100"},
      {"bench": "attention_check", "model": "imagenet64", "attention_impl": "cudnn",
       "dtype": "bfloat16", "n": 8, "rel_diff_vs_einsum": 3.1e-3,
       "rel_diff_einsum_vs_float32": 4.2e-3, "rel_diff_vs_float32": 5e-3},
      {"bench": "train_step", "model": "imagenet64", "dtype": "bfloat16", "batch": 128,
       "remat": True, "attention_impl": "cudnn", "images_per_s": 700.0,
       "mfu_vs_spec": 0.45, "compile_s": 100.0, "peak_memory_gib": 40.0},
      {"bench": "train_step", "model": "imagenet64", "dtype": "bfloat16", "batch": 64,
       "remat": False, "images_per_s": 350.0, "mfu_vs_spec": 0.223, "compile_s": 156.0,
       "peak_memory_gib": 35.2},  # A record from before attention_impl existed.
      {"bench": "kernel_profile", "model": "imagenet64", "steps": 3, "busy_ms": 400.0,
       "span_ms": 410.0, "by_kind_ms": {"convolution": 300.0, "reduction": 100.0}},
      {"bench": "error", "stage": "sampling_bench", "error": "OOM"},
      {"bench": "train_step_variant", "model": "imagenet64", "dtype": "bfloat16",
       "batch": 256, "attention_impl": "cudnn", "variant": "fast",
       "swaps": {"norm": "one_pass"}, "images_per_s": 620.0, "mfu_vs_spec": 0.397,
       "speedup_vs_first": 1.0, "speedup_vs_base": 1.012, "compile_s": 65.0},
      {"bench": "kernel_profile", "model": "imagenet64", "variant": "fast", "steps": 3,
       "busy_ms": 1.0, "span_ms": 1.0, "by_kind_ms": {"reduction": 1.0}},
      {"bench": "fusion_traffic", "model": "imagenet64", "variant": "base",
       "fused_gb": 368.0, "fused_ms": 131.0, "fused_gb_per_s": 2812.0},
      {"bench": "library_calls", "model": "imagenet64", "variant": "base",
       "library_tflop": 168.4, "library_ms": 284.4, "library_tflops_per_s": 592.2,
       "peak_tflops": 989.0, "by_kind": [["conv_weight_grad", 93, 48.9, 88.1, 555.8],
                                         ["matmul", 134, 12.0, 17.9, 670.2]]}]
  (tmp_path / "results" / "h100.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  monkeypatch.setattr(bench_run, "HERE", str(tmp_path))
  # A variant's kernel profile is left out: only the base's is shown.
  check, cudnn, plain, profile, variant, traffic, calls = bench_run._accelerator_rows()
  assert "cudnn attention against einsum" in check and "3.10e-03" in check
  assert "batch 128, remat, cudnn attention | 700 img/s | 45.0% of spec" in cudnn
  assert "batch 64 | 350 img/s | 22.3% of spec" in plain
  assert "400 ms/step busy in 410 | convolution 75%, reduction 25% |" in profile
  assert ("cudnn attention: `fast` (norm=one_pass) | 620 img/s | 39.7% of spec bf16 "
          "peak | ×1.012 against `base`" in variant)
  assert "(`base`) | 368 GB/step in 131 ms | 2812 GB/s |" in traffic
  assert ("calls (`base`) | 168 TFLOP/step in 284 ms | 592 TFLOP/s, 60% of spec bf16 "
          "peak | TFLOP/s by kind: conv_weight_grad 556, matmul 670 |" in calls)


def test_models_bench_counts_a_train_step_as_about_three_forwards():
  """XLA's FLOP counts of the forward and the gradient step: the backward of every
  convolution and matmul is two products the size of the forward's, so the step is
  about 3× the forward."""
  from bench import models_bench  # pylint: disable=g-import-not-at-top
  got = models_bench.run(quick=True)
  forward, step = got["forward"], got["train_step"]
  assert 2.5 < step["gflop_per_image"] / forward["gflop_per_image"] < 3.5, got
  assert math.isclose(step["images_per_s"], got["batch_size"] / step["wall_s"])


def test_solver_bench_rows_rank_by_the_worst_weights_ratio_to_ancestral(tmp_path):
  from bench import solvers  # pylint: disable=g-import-not-at-top

  def rec(sampler, grid, num_steps, w, fid, logsnr_range=None):
    per = 2 if sampler == "heun" else 1
    return dict(sampler=sampler, grid=grid, num_steps=num_steps, w=w, fid=fid,
                nfe=per * num_steps - (per - 1), logsnr_range=logsnr_range)

  records = [rec("ancestral", "u", 256, 0.0, 2.0), rec("ancestral", "u", 256, 4.0, 10.0),
             # ratios 1.1 and 1.02: worst 1.1
             rec("unipc", "logsnr", 16, 0.0, 2.2), rec("unipc", "logsnr", 16, 4.0, 10.2),
             # ratios 1.05 and 1.05: worst 1.05, the best at <= 25
             rec("dpmpp_2m", "u", 25, 0.0, 2.1), rec("dpmpp_2m", "u", 25, 4.0, 10.5),
             # better still, but 50 evaluations
             rec("ddim", "u", 50, 0.0, 2.0), rec("ddim", "u", 50, 4.0, 10.0),
             rec("heun", "logsnr", 8, 0.0, 3.0, [-8.76, 12.43]),
             rec("heun", "logsnr", 8, 4.0, 30.0, [-8.76, 12.43])]
  rows = {(r["sampler"], r["nfe"]): r["worst"] for r in solvers.rows(records)}
  assert rows[("unipc", 16)] == pytest.approx(1.1)
  assert rows[("dpmpp_2m", 25)] == pytest.approx(1.05)
  assert rows[("heun (EDM's λ range)", 15)] == pytest.approx(3.0)
  best = solvers.best_within(records, 25)
  assert (best["sampler"], best["grid"], best["nfe"]) == ("dpmpp_2m", "u", 25)
  assert solvers.best_within(records, 50)["sampler"] == "ddim"
  assert solvers.best_within(records, 4) is None
  lines = solvers.table(records).splitlines()
  assert lines[0].count("FID w=") == 2 and len(lines) == 2 + 5
  assert lines[3] == "| unipc | logsnr | 16 | 2.200 | 10.200 | 1.100 |"

  # The budgets map to grid points by each solver's evaluations per step.
  assert [solvers.steps_for("heun", b) for b in (8, 16, 25, 50)] == [4, 8, 13, 25]
  assert [solvers.steps_for("unipc", b) for b in (8, 16, 25, 50)] == [8, 16, 25, 50]
  solvers.write(tmp_path, records, step=1)
  assert json.loads((tmp_path / "results.json").read_text())["records"] == records
  assert (tmp_path / "fid_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"
