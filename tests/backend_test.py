"""Tests for runtime/backend.py, the one place that depends on the backend: the fast
paths each backend gets; the XLA options (which backend gets them, that XLA:CPU applies
them with the numbers of a float64 convolution, that decorated module-level functions
start no backend at import); the CPU process setup (scratch memory stays mapped between
calls, counted by the kernel)."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import kernels_test
from cfg_guidance.data import sources
from cfg_guidance.evaluation import inception
from cfg_guidance.runtime import backend, kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_fast_paths_per_backend():
  cpu, gpu, tpu = (backend.fast_paths(b) for b in ("cpu", "gpu", "tpu"))
  assert (cpu.matmul, cpu.conv2d, cpu.random_words, cpu.unroll_steps) == (
      kernels.rows_matmul, kernels.pointwise_as_matmul_conv2d, kernels.counter_hash_bits,
      True)
  assert gpu == backend.PLAIN._replace(random_words=kernels.counter_hash_bits)
  assert tpu == backend.PLAIN and not tpu.unroll_steps
  assert backend.fast_paths("metal") == backend.PLAIN  # Anything else: the plain forms.
  # The default is the default backend's, read when called.
  assert backend.fast_paths() == cpu


def test_options_per_backend_and_user_flags():
  assert backend.options_for("cpu") == backend.CPU_OPTIONS
  assert backend.options_for("gpu") is None
  assert backend.options_for("tpu") is None
  # The user's own XLA_FLAGS setting wins: a jit option would override it.
  flags = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type="
  assert backend.options_for("cpu", flags) is None
  assert backend.options_for("cpu", "--xla_force_host_platform_device_count=8") == (
      backend.CPU_OPTIONS)


def test_pinned_xla_accepts_the_cpu_options():
  assert jax.default_backend() == "cpu"
  assert backend.compiler_options() == backend.CPU_OPTIONS


def test_rejected_options_fall_back_to_xla_defaults(monkeypatch, caplog):
  monkeypatch.setattr(backend, "options_for",
                      lambda *_: {"xla_cpu_no_such_option_here": "1"})
  assert backend.compiler_options.__wrapped__() is None
  assert "xla_cpu_no_such_option_here" in caplog.text


def _entry(hlo: str) -> str:
  """The ENTRY computation of compiled HLO text (fusion bodies are separate)."""
  return re.search(r"^ENTRY .*?^\}", hlo, re.S | re.M).group(0)


def _conv_and_grads(x, k, g):
  y, vjp = jax.vjp(lambda x, k: backend.fast_paths().conv2d(x, k), x, k)
  return (y, *vjp(g))


def test_cpu_options_move_convolutions_out_of_ynnpack_with_the_same_numbers():
  x, k, g = kernels_test._inputs(4, 12, 24, 16, 3, 1)
  want = (kernels_test.np_conv(x, k, 1), *kernels_test.np_conv_grads(x, k, g, 1))
  default = jax.jit(_conv_and_grads).lower(x, k, g).compile()
  ours = jax.jit(_conv_and_grads, compiler_options=backend.CPU_OPTIONS).lower(
      x, k, g).compile()
  # XLA's default puts convolutions in YNNPACK fusions (here the forward and the input
  # gradient); with our options all three are convolutions of the entry computation.
  assert _entry(default.as_text()).count("convolution(") < 3
  assert _entry(ours.as_text()).count("convolution(") == 3
  for got_default, got, want_one in zip(default(x, k, g), ours(x, k, g), want):
    kernels_test._assert_close(got, want_one, 1e-5)
    kernels_test._assert_close(got, got_default, 1e-5)


def test_jit_decorator_applies_the_options_lazily():
  @backend.jit(static_argnames=("scale",))
  def f(x, k, *, scale):
    return scale * backend.fast_paths().conv2d(x, k)

  x, k, _ = kernels_test._inputs(2, 8, 8, 8, 3, 1)
  kernels_test._assert_close(f(x, k, scale=2.0), 2 * kernels_test.np_conv(x, k, 1), 1e-5)
  assert f.__name__ == "f"
  assert _entry(f.lower(x, k, scale=2.0).compile().as_text()).count("convolution(") == 1
  # Nested in an outer jit (which JAX refuses compiler options on) and under vmap.
  outer = jax.jit(lambda x, k: f(x, k, scale=2.0) + 1)
  kernels_test._assert_close(outer(x, k), 2 * kernels_test.np_conv(x, k, 1) + 1, 1e-5)
  batched = jax.vmap(lambda x: f(x, k, scale=2.0))(x[:, None])
  kernels_test._assert_close(batched[:, 0], 2 * kernels_test.np_conv(x, k, 1), 1e-5)


def test_importing_the_decorated_modules_starts_no_backend():
  # jax.distributed.initialize must run before the backend starts (it raises otherwise),
  # so the module-level `backend.jit` decorators must not query it at import.
  code = ("import socket\n"
          "import cfg_guidance.generate, cfg_guidance.evaluation.sweep, cfg_guidance.train\n"
          "import jax\n"
          "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
          "s.close()\n"
          "jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',\n"
          "                           num_processes=1, process_id=0)\n"
          "jax.distributed.shutdown()\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_train_step_is_compiled_with_the_options(monkeypatch):
  from bench import train_bench  # pylint: disable=g-import-not-at-top
  from cfg_guidance import train  # pylint: disable=g-import-not-at-top
  from cfg_guidance.runtime import sharding
  seen, real_jit = [], jax.jit

  def recording_jit(*args, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(*args, **kwargs)

  backend.compiler_options()  # Its first call compiles a check program; not this one.
  monkeypatch.setattr(jax, "jit", recording_jit)
  config = train_bench.preset_config("digits", 8)
  mesh = sharding.create_mesh(jax.devices()[:1])
  train.make_train_fn(config, None, train.make_optimizer(config.train), None, mesh)
  assert seen == [backend.CPU_OPTIONS]


def test_the_sampling_driver_is_decorated_with_the_options():
  from cfg_guidance import generate  # pylint: disable=g-import-not-at-top
  fn = generate._sample_rows
  # backend.jit's wrapper: the undecorated function behind it, our `lower`.
  assert fn.__wrapped__.__name__ == fn.__name__
  assert fn.lower.__qualname__.startswith("jit.<locals>")


# --- The CPU process: XLA's scratch memory kept mapped. ---

# One process per setting: the dispatch mode is fixed when JAX's CPU client starts. The
# program's temporary buffer (tanh(x), read by two matmuls) is 64 MiB, past the 32 MiB
# above which glibc maps blocks afresh and past a worker thread's 64 MiB arena.
PROBE = """
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from cfg_guidance.runtime import backend
tuned = backend.configure_cpu() if sys.argv[1] == "tuned" else False
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((4096, 4096)), jnp.float32)
w = jnp.asarray(rng.standard_normal((4096, 8)), jnp.float32)
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x) @ w) + jnp.sum(w.T @ jnp.tanh(x)))
compiled = f.lower(x, w).compile()
values = [float(compiled(x, w)) for _ in range(2)]
faults = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  values.append(float(compiled(x, w)))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults_per_call": sorted(faults)[3], "values": values,
                  "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch")}))
"""


def _probe(setting):
  out = subprocess.run([sys.executable, "-c", PROBE, setting], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


def _thp_always():
  path = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
  return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(backend._glibc_mallopt() is None, reason="needs Linux with glibc")
def test_scratch_memory_is_not_faulted_in_again():
  tuned, default = _probe("tuned"), _probe("default")
  assert tuned["tuned"] and not tuned["async"]
  assert not default["tuned"] and default["async"]
  pages = tuned["temp_bytes"] / 4096
  assert tuned["temp_bytes"] >= 64 << 20, tuned
  # Tuned: the heap hands back the same, already faulted-in pages at each call. The
  # median of 7 calls: now and then (about one call in 40 here) a small allocation lands
  # in the freed block, the heap grows once and that one call faults in a fresh 64 MiB.
  assert tuned["faults_per_call"] < 0.02 * pages, (tuned, pages)
  # XLA's defaults: every call maps its scratch afresh and faults in each 4 KiB page
  # (unless the kernel backs every mapping with 2 MiB pages).
  if not _thp_always():
    assert default["faults_per_call"] > 0.9 * pages, (default, pages)
  # Same program, same numbers, either way.
  assert tuned["values"] == default["values"]
  assert len(set(tuned["values"])) == 1


def test_no_change_without_glibc(monkeypatch):
  monkeypatch.setattr(backend.platform, "libc_ver", lambda: ("musl", "1.2"))
  assert backend._glibc_mallopt() is None
  assert not backend.configure_cpu(backend="cpu")


def test_mallopt_only_for_the_cpu_backend(monkeypatch):
  calls = []

  def mallopt(param, value):
    calls.append((param, value))
    return 1

  monkeypatch.setattr(backend, "_glibc_mallopt", lambda: mallopt)
  assert not backend.configure_cpu(backend="gpu")
  assert not calls
  assert backend.configure_cpu(backend="cpu")
  assert calls == [(backend.M_MMAP_MAX, 0), (backend.M_TRIM_THRESHOLD, -1)]


def test_refused_mallopt_is_reported(monkeypatch, caplog):
  monkeypatch.setattr(backend, "_glibc_mallopt", lambda: lambda param, value: 0)
  assert not backend.configure_cpu(backend="cpu")
  assert "mallopt refused" in caplog.text


def test_tensorflow_and_tfds_missing_name_the_extra(monkeypatch):
  # As in a core install: `import tensorflow` raises ImportError.
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  backend.tensorflow.cache_clear()
  try:
    with pytest.raises(ImportError, match=r"^The Inception extractor \(config.eval.extractor="
                       r"'inception'\) needs TensorFlow.*pip install 'cfg_guidance\[tf\]'"):
      inception._load_graph_def("unused.pb")
    with pytest.raises(ImportError, match=r"^data.name='imagenet2012' \(a TFDS data set\) "
                       r"needs tensorflow-datasets.*pip install 'cfg_guidance\[tf\]'"):
      sources.open_tfds("imagenet2012", "train", None)
  finally:
    backend.tensorflow.cache_clear()
