"""The benchmark command runs end to end at a tiny size and its numbers hang together."""

import math

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
