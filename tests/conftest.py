"""Test setup: 8 host CPU devices for sharding tests, and a shared compilation cache.

XLA's CPU compile of a U-Net train step takes 10-30 s on 2 cores; the persistent cache
(shared by the in-process tests and the subprocesses they start) pays it once per program.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cfg_guidance_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

# Must happen before the first JAX operation; tests choose device subsets from these.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# Computations inline, XLA's scratch memory kept mapped between calls: what the CLI does.
from cfg_guidance.runtime import backend  # noqa: E402

backend.configure_cpu(backend="cpu")
