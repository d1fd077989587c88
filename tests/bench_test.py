"""The benchmark command runs end to end at a tiny size and its numbers hang together."""

import gzip
import math
import re

import pytest

from bench import run as bench_run


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
  assert profile["by_kind_ms"]["matmul"] > 0  # YNNPACK's dots and convolutions.
  # The kept trace reads back with the same work in it.
  trace = gpu.jax.profiler.ProfileData.from_serialized_xspace(
      gzip.decompress((tmp_path / "train_step.xplane.pb.gz").read_bytes()))
  assert math.isclose(sum(e[3] for e in gpu.profile_events(trace)) / 2e6,
                      profile["busy_ms"])
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


def test_profile_summary_adds_up_by_kind_op_and_kernel():
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
  assert got["top_ops"] == [["cudnn-conv-bw-filter", 5.0, 1.0],
                            ["command_buffer", 2.25, 1.5]]
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


def test_group_norm_variants_equal_a_float64_reference():
  """bench.norm_bench's four forms of GroupNorm + scale-shift + SiLU, values and all
  five gradients, against the equations in float64 (autodiff of a numpy-style form)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bench import norm_bench  # pylint: disable=g-import-not-at-top
  shape = (3, 4, 5, 64)  # 32 groups of 2 channels, 20 positions.
  args = norm_bench.inputs(shape, jnp.float32, seed=1)
  # Variances ~0.03, so that ε = 1e-5 shows in the result.
  args = (0.1 * args[0], *args[1:])
  dh = args[-1]

  def reference(x, gamma, beta, scale, shift):
    n, c = x.shape[0], x.shape[-1]
    g = x.reshape(n, -1, 32, c // 32)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    xhat = ((g - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
    y = (xhat * gamma + beta) * (1 + scale[:, None, None]) + shift[:, None, None]
    return y * (1 / (1 + jnp.exp(-y)))

  with jax.enable_x64(True):
    wide = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    want_h, vjp = jax.vjp(reference, *wide[:5])
    want = [np.asarray(want_h), *map(np.asarray, vjp(wide[5]))]
  for variant in norm_bench.VARIANTS:
    h, grads = norm_bench.forward_backward(variant, jnp.float32)(*args[:5], dh)
    for name, got, ref in zip(("h", "x", "gamma", "beta", "scale", "shift"),
                              (h, *grads), want):
      err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
      assert err < 2e-5, (variant, name, err)


def test_norm_bench_times_every_variant_against_a_copy(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from bench import norm_bench  # pylint: disable=g-import-not-at-top
  records = norm_bench.run(2, "float32", shapes=((8, 8, 64), (4, 4, 64)), iters=2,
                           out_dir=str(tmp_path))
  kept = [json.loads(line) for line in (tmp_path / "norm_bench.jsonl").open()]
  assert kept == records and records[0]["bench"] == "copy"
  timed = records[1:]
  assert [r["variant"] for r in timed] == list(norm_bench.VARIANTS) * 2
  for r in timed:
    # 5 passes over x's bytes (2·8·8·64 or 2·4·4·64 float32 values) in r["ms"].
    nbytes = 5 * 4 * 2 * r["shape"][1] * r["shape"][2] * 64
    assert math.isclose(r["least_traffic_gb_per_s"], nbytes / r["ms"] / 1e6)
    assert math.isclose(r["of_copy"],
                        r["least_traffic_gb_per_s"] / records[0]["gb_per_s"])


_HLO = """\
%fused_add (p0: f32[4,8], p1: bf16[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
}

ENTRY %main (x.1: f32[4,8], y.1: bf16[4,8]) -> (f32[4], f32[4,8]) {
  %x.1 = f32[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %y.1 = bf16[4,8]{1,0} parameter(1), metadata={op_name="y"}
  %loop_add_fusion.3 = f32[4,8]{1,0} fusion(%x.1, %y.1), kind=kLoop, calls=%fused_add, \
metadata={op_name="jit(step)/transpose(jvp(jit(silu)))/add_any" \
deduplicated_name="loop_add_fusion.3"}
  %input_reduce_fusion.9 = (f32[4]{0}, pred[4,8]{1,0}) fusion(%loop_add_fusion.3), \
kind=kInput, calls=%fused_reduce, metadata={op_name="jit(step)/jvp()/reduce_sum" \
deduplicated_name="input_reduce_fusion.2"}
  %cudnn-conv.1 = (f32[4,8]{1,0}, u8[0]{0}) custom-call(%x.1), custom_call_target="conv"
  ROOT %tuple = (f32[4], f32[4,8]) tuple(%input_reduce_fusion.9, %loop_add_fusion.3)
}
"""


def test_fusion_traffic_charges_each_fusion_its_operands_and_results():
  """Bytes from the shapes by hand: the add reads 128 + 64 and writes 128 bytes; the
  reduction reads 128 and writes 16 + 32 (a tuple). A kernel is found by its own name,
  by the fusion whose kernel it reuses (deduplicated_name), or by its XLA op."""
  from bench import fusion_traffic  # pylint: disable=g-import-not-at-top
  assert fusion_traffic.type_bytes("(f32[4]{0}, pred[4,8]{1,0})") == 48
  kernels = [["loop_add_fusion_3", "command_buffer_1", 0.002, 2.0],
             ["input_reduce_fusion_2", "command_buffer_1", 0.001, 1.0],
             ["sm90_xmma_fprop", "input_reduce_fusion.9", 0.001, 1.0],
             ["sm90_xmma_fprop", "cudnn-conv.1", 0.5, 1.0]]
  got = fusion_traffic.traffic(_HLO, kernels, copy_gbps=1.0)
  want_bytes = 2 * (128 + 64 + 128) + 2 * (128 + 16 + 32)
  assert math.isclose(got["fused_gb"], want_bytes / 1e9)
  assert math.isclose(got["fused_ms"], 0.004) and math.isclose(got["other_ms"], 0.5)
  assert math.isclose(got["fused_gb_per_s"], want_bytes / 1e9 / 0.004e-3)
  assert math.isclose(got["fused_ms_at_copy_rate"], want_bytes / 1e9 * 1e3)
  ops = {key: gb for key, _, gb, _ in got["by_jax_op"]}
  assert ops == pytest.approx({"transpose(jvp(silu))/add_any": 640e-9,
                               "jvp()/reduce_sum": 352e-9})


def test_fusion_traffic_of_a_compiled_program_matches_its_shapes():
  """A profiled CPU program: its one fusion reads two f32[256,1024] arrays and writes
  one, 3 MiB a call; the copy XLA adds for the returned input is charged too."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bench import fusion_traffic, gpu, gpu_ab  # pylint: disable=g-import-not-at-top
  x = jnp.ones((256, 1024), jnp.float32)
  compiled = jax.jit(lambda x, y: (x, jnp.tanh(x) * y + 1)).lower(x, x).compile()
  events, _ = gpu.trace_events((compiled, x, x), 3)
  kernels = gpu_ab._kernel_table(events, 3)  # pylint: disable=protected-access
  got = fusion_traffic.traffic(compiled.as_text(), kernels)
  assert got["by_jax_op"], kernels
  assert math.isclose(got["fused_gb"], (3 + 2) * x.nbytes / 1e9), got
  assert math.isclose(got["fused_ms"] + got["other_ms"],
                      sum(ms for _, _, ms, _ in kernels))


_LIBRARY_HLO = """\
HloModule step

ENTRY %main (x: bf16[2,4,4,3], w: bf16[8,3,3,3], dy: bf16[2,4,4,8], a: bf16[16,32,64], \
b: bf16[16,32,48], q: bf16[2,4,16,8], k: bf16[2,4,12,8]) -> f32[16,64,48] {
  %x = bf16[2,4,4,3]{3,2,1,0} parameter(0)
  %w = bf16[8,3,3,3]{3,2,1,0} parameter(1)
  %dy = bf16[2,4,4,8]{3,2,1,0} parameter(2)
  %a = bf16[16,32,64]{2,1,0} parameter(3)
  %b = bf16[16,32,48]{2,1,0} parameter(4)
  %q = bf16[2,4,16,8]{3,2,1,0} parameter(5)
  %k = bf16[2,4,12,8]{3,2,1,0} parameter(6)
  %cudnn-conv-bias-activation.1 = (bf16[2,4,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, \
%w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, \
custom_call_target="__cudnn$convBiasActivationForward"
  %cudnn-conv-bw-input.2 = (bf16[2,4,4,3]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %w), \
window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, \
custom_call_target="__cudnn$convBackwardInput"
  %cudnn-conv-bw-filter.3 = (bf16[8,3,3,3]{3,2,1,0}, u8[64]{0}) custom-call(%x, %dy), \
window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, \
custom_call_target="__cudnn$convBackwardFilter"
  %custom-call.4 = (f32[16,64,48]{2,1,0}, s8[0]{0}) custom-call(%a, %b), \
custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":\
{"dot_dimension_numbers":{"lhs_batch_dimensions":["0"],"lhs_contracting_dimensions":\
["1"],"rhs_batch_dimensions":["0"],"rhs_contracting_dimensions":["1"]}}}
  %attention_fwd.5 = (bf16[2,4,16,8]{3,1,2,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) \
custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", \
operand_layout_constraints={bf16[2,16,4,8]{3,2,1,0}, bf16[2,12,4,8]{3,2,1,0}, \
bf16[2,12,4,8]{3,2,1,0}}, api_version=API_VERSION_STATUS_RETURNING
  %attention_bwd.6 = (bf16[2,4,16,8]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %k), \
custom_call_target="__cudnn$fmhaSoftmaxBackward", \
operand_layout_constraints={bf16[2,16,4,8]{3,2,1,0}, bf16[2,12,4,8]{3,2,1,0}, \
bf16[2,12,4,8]{3,2,1,0}}, api_version=API_VERSION_STATUS_RETURNING
  ROOT %gte = f32[16,64,48]{2,1,0} get-tuple-element(%custom-call.4), index=0
}
"""


def test_library_calls_count_each_calls_flops_from_its_shapes():
  """FLOPs by hand. Each convolution: 2 · |y| · 3·3·3 = 2 · 256 · 27; the batched
  matmul: 2 · 16·64·48 · 32; attention with q [2, 16, 4, 8] and k [2, 12, 4, 8] as the
  call constrains them (the parameters' own shapes would give k's S as 4):
  4 · 2·4·16·12·8 forward, twice that backward. A convolution's time is every kernel
  under its name; matmul and attention kernels in a command buffer count by their own
  names, and a fusion's not at all."""
  from bench import fusion_traffic  # pylint: disable=g-import-not-at-top
  kernels = [["sm90_xmma_fprop_implicit_gemm", "cudnn-conv-bias-activation.1", 0.010, 1],
             ["nhwcAddPaddingKernel", "cudnn-conv-bias-activation.1", 0.002, 1],
             ["sm90_xmma_dgrad_implicit_gemm", "cudnn-conv-bw-input.2", 0.006, 1],
             ["sm90_xmma_wgrad_implicit_gemm", "cudnn-conv-bw-filter.3", 0.024, 1],
             ["nvjet_sm90_tst_128x128_64x6", "command_buffer_7", 0.5, 1],
             ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "command_buffer_7",
              0.003, 1],
             ["cudnn_generated_fort_native_sdpa_sm90_flash_bprop", "command_buffer_7",
              0.004, 1],
             ["void cudnn::fusion::compute_dot_do_o_specialized<true, 64>",
              "command_buffer_7", 0.002, 1],
             ["loop_add_fusion_3", "command_buffer_7", 1.0, 1]]
  got = fusion_traffic.library_calls(_LIBRARY_HLO, kernels, peak_tflops=0.01)
  conv = 2 * (2 * 4 * 4 * 8) * 27
  attention = 4 * 2 * 4 * 16 * 12 * 8
  want = {"conv_forward": (conv, 0.012), "conv_input_grad": (conv, 0.006),
          "conv_weight_grad": (conv, 0.024), "matmul": (2 * 16 * 64 * 48 * 32, 0.5),
          "attention_forward": (attention, 0.003),
          "attention_backward": (2 * attention, 0.006)}
  by_kind = {kind: row for kind, *row in got["by_kind"]}
  assert set(by_kind) == set(want)
  for kind, (flops, ms) in want.items():
    n, tflop, got_ms, rate, share, ms_at_peak = by_kind[kind]
    assert n == 1 and math.isclose(tflop, flops / 1e12), kind
    assert math.isclose(got_ms, ms) and math.isclose(rate, flops / ms / 1e9), kind
    assert math.isclose(share, flops / ms / 1e9 / 0.01), kind
    assert math.isclose(ms_at_peak, flops / 0.01e12 * 1e3), kind
  total = sum(flops for flops, _ in want.values())
  assert math.isclose(got["library_tflop"], total / 1e12)
  assert math.isclose(got["library_ms"], sum(ms for _, ms in want.values()))
  # By shape, the one that loses most against the peak first: the weight gradient.
  assert [row[:3] for row in got["convs_by_shape"]] == [
      ["conv_weight_grad", "bf16", "4x4 8x3x3x3"], ["conv_forward", "bf16", "4x4 8x3x3x3"],
      ["conv_input_grad", "bf16", "4x4 8x3x3x3"]]


def test_fusion_traffic_cli_prints_both_reports(tmp_path, capsys):
  """The CLI on the kept H200 files: the numbers of both reports in their columns. On
  a written program, a call it cannot count is said to be left out, and an absent
  variant is named."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from bench import fusion_traffic  # pylint: disable=g-import-not-at-top
  results = os.path.join(os.path.dirname(bench_run.__file__), "results")
  hlo, kernels = (os.path.join(results, f"h200_2026-11-28_ab.{name}")
                  for name in ("hlo_base.txt.gz", "kernels_base.jsonl.gz"))
  fusion_traffic.main([hlo, kernels, "--copy_gbps=3133", "--peak_tflops=989"])
  out = capsys.readouterr().out
  with gzip.open(hlo, "rt") as f:
    hlo_text = f.read()
  with gzip.open(kernels, "rt") as f:
    table = json.loads(f.readline())["kernels"]
  traffic = fusion_traffic.traffic(hlo_text, table, 3133)
  calls = fusion_traffic.library_calls(hlo_text, table, 989)
  assert (f"fused work: {traffic['fused_ms']:.1f} ms, {traffic['fused_gb']:.1f} GB per "
          "step" in out)
  assert (f"library calls: {calls['library_tflop']:.1f} TFLOP in "
          f"{calls['library_ms']:.1f} ms per step" in out)
  assert "left out" not in out
  for title, width in (("by_kind", 1), ("convs_by_shape", 3)):
    for row in calls[title]:
      n, tflop, ms, rate, share = row[width:width + 5]
      assert (f"{n:4d} {tflop:7.2f} {ms:7.2f} {rate:6.0f} {share:5.1%}  "
              f"{' '.join(row[:width])}\n" in out), row

  (tmp_path / "step.txt").write_text(_HLO)  # Its "conv" call has no dim_labels.
  other = {"variant": "other", "kernels": [["sm90_xmma_fprop", "cudnn-conv.1", 0.5, 1]]}
  (tmp_path / "kernels.jsonl").write_text(json.dumps(other) + "\n")
  fusion_traffic.main([str(tmp_path / "step.txt"), str(tmp_path / "kernels.jsonl"),
                       "--variant=other"])
  out = capsys.readouterr().out  # The uncounted call's time is left out with it.
  assert ("library calls: 0.0 TFLOP in 0.0 ms per step (0 TFLOP/s); calls left out "
          "(their HLO gives no FLOP count): 1\n" in out)
  with pytest.raises(ValueError, match="--variant='absent'.*'other'"):
    fusion_traffic.main([str(tmp_path / "step.txt"), str(tmp_path / "kernels.jsonl"),
                         "--variant=absent"])


def test_library_calls_of_the_h200_step_match_its_jaxpr():
  """The kept H200 program (bench/results): the FLOPs of its 3×3 cuDNN convolutions,
  as XLA rewrote and split them, against the convolutions of the train step's jaxpr at
  the same size, traced from our model code (the 1×1 skip projections are dots in
  the jaxpr, convolutions for cuDNN, and so left out of both)."""
  import functools  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bench import fusion_traffic, gpu  # pylint: disable=g-import-not-at-top
  from cfg_guidance import train  # pylint: disable=g-import-not-at-top
  from configs import adm  # pylint: disable=g-import-not-at-top
  results = os.path.join(os.path.dirname(bench_run.__file__), "results")
  with gzip.open(os.path.join(results, "h200_2026-11-28_ab.hlo_base.txt.gz"), "rt") as f:
    hlo_text = f.read()
  with gzip.open(os.path.join(results, "h200_2026-11-28_ab.kernels_base.jsonl.gz"),
                 "rt") as f:
    kernels = json.loads(f.readline())["kernels"]
  got = fusion_traffic.library_calls(hlo_text, kernels, top=1000)
  hlo_flops = sum(row[4] for row in got["convs_by_shape"] if "x3x3x" in row[2]) * 1e12

  config = adm.imagenet64()
  # As in the run, but with einsum attention (cuDNN's traces on GPUs only), which
  # leaves the convolutions as they were.
  config.dtype = "bfloat16"
  tx = train.make_optimizer(gpu._train_config())  # pylint: disable=protected-access
  state = jax.eval_shape(functools.partial(train.init_state, model_config=config, tx=tx),
                         jax.random.key(0))
  data = {"image": jax.ShapeDtypeStruct((256, 64, 64, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((256,), jnp.int32)}
  step = gpu._train_step(config, tx)  # pylint: disable=protected-access
  jaxpr_flops = 0

  def walk(jaxpr):
    nonlocal jaxpr_flops
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
        taps = math.prod(rhs[d] for d in rhs_spec[2:]) * rhs[rhs_spec[1]]
        jaxpr_flops += 2 * math.prod(out) * taps
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(step)(state, data).jaxpr)
  assert jaxpr_flops > 1e14
  assert math.isclose(hlo_flops, jaxpr_flops, rel_tol=1e-12), (hlo_flops, jaxpr_flops)


def test_gpu_ab_times_variants_and_undoes_its_swaps(tmp_path, monkeypatch):
  """bench.gpu_ab end to end on the digits U-Net: the library's step and one with
  GroupNorm's written-out backward, XLA's dropout bits and compiler-chosen state
  layouts swapped in."""
  import json  # pylint: disable=g-import-not-at-top
  from bench import gpu_ab, norm_bench  # pylint: disable=g-import-not-at-top
  from cfg_guidance.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(norm_bench, "GROUPS", 8)  # The digits U-Net's groups.
  monkeypatch.setitem(gpu_ab.VARIANTS, "both", {"norm": "custom_vjp",
                                                "dropout_words": "rbg", "layout": "auto"})
  call, words = layers.GroupNorm.__call__, layers.dropout_words
  gpu_ab.main(["--model=digits", "--dtype=float32", "--batch=4",
               "--variants=base,both", "--steps=1",
               "--profile_steps=1", "--hlo=base", f"--out={tmp_path}"])
  # The swaps are undone.
  assert (layers.GroupNorm.__call__, layers.dropout_words) == (call, words)
  records = [json.loads(line) for line in (tmp_path / "gpu_ab.jsonl").open()]
  steps = [r for r in records if r["bench"] == "train_step_variant"]
  assert [r["variant"] for r in steps] == ["base", "both"]
  # XLA:CPU keeps row-major layouts when asked to choose (a GPU may not: cuDNN wants
  # its weight gradients in [O, H, W, I] order).
  assert [r["state_arrays_not_row_major"] for r in steps] == [0, 0]
  for r in steps:
    assert math.isclose(r["speedup_vs_first"], steps[0]["step_s"] / r["step_s"])
    assert math.isclose(r["images_per_s"], 4 / r["step_s"])
  traffic = [r for r in records if r["bench"] == "fusion_traffic"]
  assert len(traffic) == 2 and all(r["fused_gb"] > 0 for r in traffic)
  # XLA:CPU calls no cuDNN or cuBLAS: the report is there, and empty.
  calls = [r for r in records if r["bench"] == "library_calls"]
  assert [(r["variant"], r["library_tflop"]) for r in calls] == [("base", 0), ("both", 0)]
  assert records[-1]["bench"] == "flops" and records[-1]["flops_per_step"] > 0
  assert (tmp_path / "hlo_base.txt.gz").exists()
  kernels = [json.loads(line) for line in (tmp_path / "kernels.jsonl").open()]
  assert [k["variant"] for k in kernels] == ["base", "both"]


def test_gpu_ab_goes_on_after_a_variant_fails_with_its_state_donated(tmp_path,
                                                                      monkeypatch):
  """A failure after the step consumed the donated train state (an out-of-memory error
  in the timing, say) costs that variant only: the next one gets a fresh state. So does
  an XLA option the compiler does not know (which shows the options reach it)."""
  import json  # pylint: disable=g-import-not-at-top
  from bench import gpu_ab  # pylint: disable=g-import-not-at-top
  timed = gpu_ab._median_step_s  # pylint: disable=protected-access
  calls = []

  def fails_first(compiled, state, data, steps):
    calls.append(1)
    if len(calls) == 1:
      compiled(state, data)  # Donates, and so deletes, the state passed in.
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return timed(compiled, state, data, steps)

  monkeypatch.setattr(gpu_ab, "_median_step_s", fails_first)
  gpu_ab.main(["--model=digits", "--dtype=float32", "--batch=2",
               "--variants=xla:xla_no_such_option=true,rbg_dropout,base", "--steps=1",
               "--profile_steps=0", f"--out={tmp_path}"])
  records = [json.loads(line) for line in (tmp_path / "gpu_ab.jsonl").open()]
  assert [(r["bench"], r.get("variant")) for r in records] == [
      ("device", None), ("error", "xla:xla_no_such_option=true"),
      ("error", "rbg_dropout"), ("train_step_variant", "base"), ("flops", None)]
  assert "xla_no_such_option" in records[1]["error"]
  assert "out of memory" in records[2]["error"]


def test_gpu_ab_reads_xla_options_from_a_variants_name():
  from bench import gpu_ab  # pylint: disable=g-import-not-at-top
  assert gpu_ab.variant_spec("xla:a_flag=true+level=3+mode=fast+off=False") == {
      "xla": {"a_flag": True, "level": 3, "mode": "fast", "off": False}}
  assert gpu_ab.variant_spec("conv_fusion") is gpu_ab.VARIANTS["conv_fusion"]
  for bad in ("xla:level", "xla:=3", "convfusion"):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
      gpu_ab.variant_spec(bad)
