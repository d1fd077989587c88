"""Test setup: 8 host CPU devices so sharding tests can run on one machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Must happen before the first JAX operation; tests choose device subsets from these.
jax.config.update("jax_num_cpu_devices", 8)
