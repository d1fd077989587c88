"""cpu_runtime: XLA:CPU's scratch memory stays mapped between calls, counted by the kernel."""

import json
import pathlib
import subprocess
import sys

import pytest

from cfg_guidance import cpu_runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One process per setting: the dispatch mode is fixed when JAX's CPU client starts. The
# program's temporary buffer (tanh(x), read by two matmuls) is 64 MiB, past the 32 MiB
# above which glibc maps blocks afresh and past a worker thread's 64 MiB arena.
PROBE = """
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from cfg_guidance import cpu_runtime
tuned = cpu_runtime.configure() if sys.argv[1] == "tuned" else False
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


@pytest.mark.skipif(cpu_runtime._glibc_mallopt() is None, reason="needs Linux with glibc")
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
  monkeypatch.setattr(cpu_runtime.platform, "libc_ver", lambda: ("musl", "1.2"))
  assert cpu_runtime._glibc_mallopt() is None
  assert not cpu_runtime.configure(backend="cpu")


def test_mallopt_only_for_the_cpu_backend(monkeypatch):
  calls = []

  def mallopt(param, value):
    calls.append((param, value))
    return 1

  monkeypatch.setattr(cpu_runtime, "_glibc_mallopt", lambda: mallopt)
  assert not cpu_runtime.configure(backend="gpu")
  assert not calls
  assert cpu_runtime.configure(backend="cpu")
  assert calls == [(cpu_runtime.M_MMAP_MAX, 0), (cpu_runtime.M_TRIM_THRESHOLD, -1)]


def test_refused_mallopt_is_reported(monkeypatch, caplog):
  monkeypatch.setattr(cpu_runtime, "_glibc_mallopt", lambda: lambda param, value: 0)
  assert not cpu_runtime.configure(backend="cpu")
  assert "mallopt refused" in caplog.text
