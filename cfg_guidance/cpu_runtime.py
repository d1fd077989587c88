"""XLA:CPU without re-faulting each program's scratch memory at every call.

XLA:CPU allocates an executable's temporary buffer afresh at each execution and frees it
afterwards: 1.4 GB for the CPU-sized U-Net's train step at batch 32, 58 MB for the
digits step. glibc's malloc serves a request that large with a new `mmap`, and the
kernel then faults in and zeroes every 4 KiB page at first touch: 348,000 page faults
and 0.55 s of system time in a 3.1 s one-core step. Two settings keep the memory mapped:

- `jax_cpu_enable_async_dispatch=False`: a computation on one CPU device runs inline on
  the thread that calls it, so its buffers come from that thread's malloc arena, for the
  main thread glibc's main heap. Dispatched asynchronously it runs on a worker thread,
  whose arena cannot hold blocks over 64 MiB and maps each one afresh whatever the
  settings.
- glibc's `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, -1)`: the heap serves
  large blocks itself and keeps freed memory instead of handing it back to the kernel.

The CPU-sized U-Net's train step then takes 2.45–2.51 instead of 3.12–3.15 s on one core
and 1.43 instead of 1.84 s on two; the digits step 40 instead of 67 ms, and the
Quickstart's training runs at 22–23 instead of 17–18 steps/s (bench/BENCHMARKS.md,
change 12). The price: the process keeps its peak heap mapped (it reached it at every
step anyway), and Python no longer runs ahead of a CPU computation, which on CPU
competes for the same cores.

Only for the CPU backend on Linux with glibc; elsewhere nothing changes.
"""

import ctypes
import logging
import platform

import jax

# glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def _glibc_mallopt():
  """glibc's `mallopt`, or None where the C library is not glibc."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    mallopt = ctypes.CDLL(None).mallopt  # The process's own C library.
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def configure(backend: str | None = None) -> bool:
  """Sets this process up for XLA:CPU as above; returns whether it did.

  Call it once, early: after `jax.distributed.initialize` and before the first JAX
  computation, because JAX's CPU client reads the dispatch setting when it is created.
  Called after that, computations stay asynchronous and their scratch memory is still
  mapped afresh at every call.

  Args:
    backend: the backend the programs run on; None asks `jax.default_backend()`, which
      starts JAX's backends.
  """
  mallopt = _glibc_mallopt()
  if mallopt is None:
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if (backend or jax.default_backend()) != "cpu":
    return False
  if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, -1) != 1:
    logging.warning("glibc's mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD; XLA:CPU's "
                    "scratch memory is mapped afresh at every call.")
    return False
  logging.info("XLA:CPU computations run inline; their scratch memory stays mapped.")
  return True
