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
