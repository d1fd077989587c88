"""Everything that depends on the backend, in one place: the layers' fast paths, the XLA
compiler options of the hot programs, and the CPU process setup.

The model's layers call `fast_paths()` for their matmuls, convolutions and dropout's
random words, so they read like ADM's network whatever the backend; what each backend
gets, and why, is decided in `_FAST_PATHS` below (the measurements behind each choice
are in bench/BENCHMARKS.md).
"""

import ctypes
import functools
import logging
import os
import platform
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from cfg_guidance.runtime import kernels


class FastPaths(NamedTuple):
  """The primitives the layers use, and how several train steps run in one dispatch."""
  matmul: Callable  # (x [..., K], w [K, N]) -> [..., N]
  conv2d: Callable  # (x [N, H, W, Cin], kernel [kh, kw, Cin, Cout], *, stride) -> SAME
  random_words: Callable  # (key, n) -> uint32 [n], dropout's mask bits
  unroll_steps: bool  # True: a Python loop over the steps; False: one lax.scan


def _xla_random_words(key, n):
  return jax.random.bits(key, (n,), jnp.uint32)


PLAIN = FastPaths(matmul=jnp.dot, conv2d=kernels.xla_conv2d,
                  random_words=_xla_random_words, unroll_steps=False)

_FAST_PATHS = {
    # XLA:CPU: autodiff's weight gradients of matmuls and 1x1 convolutions run far from
    # the core's matmul rate; `jax.random.bits` writes its words to memory and reads
    # them back; convolution gradients inside a while loop (lax.scan) run ~40x slower
    # than outside one.
    "cpu": FastPaths(matmul=kernels.rows_matmul,
                     conv2d=kernels.pointwise_as_matmul_conv2d,
                     random_words=kernels.counter_hash_bits, unroll_steps=True),
    # GPUs: hashed words fuse into the mask; XLA's Philox bits go through memory.
    "gpu": PLAIN._replace(random_words=kernels.counter_hash_bits),
    # TPUs: XLA's generator is the hardware's (with `rbg` keys); everything plain.
    "tpu": PLAIN,
}


def fast_paths(backend: str | None = None) -> FastPaths:
  """The primitives for `backend` (default: JAX's default backend, read at trace time)."""
  return _FAST_PATHS.get(backend or jax.default_backend(), PLAIN)


# --- XLA compiler options of the train step, the samplers and the classifier. ---

# On CPU, XLA hands convolutions, matmuls and reductions to YNNPACK fusions. For these
# U-Nets its convolutions are the slower choice, so convolutions stay on XLA's Eigen
# path while matmuls and reductions keep YNNPACK (reductions as XLA's own loops, the
# gradients' sums over N, H, W with GroupNorm's backward fused in, were ~30x slower).
# They go to `jax.jit(..., compiler_options=...)` of the hot programs, not to XLA_FLAGS:
# a user's own jits are left alone, and an XLA that does not know them is detected once
# and skipped with a warning. A fusion type in XLA_FLAGS is the user's choice: then
# none is set here.
YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {
    YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def options_for(backend: str, xla_flags: str = "") -> dict[str, Any] | None:
  """The options we would set for `backend`, before checking XLA accepts them."""
  if backend != "cpu" or YNN_FUSION_TYPE in xla_flags:
    return None
  return dict(CPU_OPTIONS)


@functools.cache
def compiler_options() -> dict[str, Any] | None:
  """`jax.jit` compiler options for the default backend, or None for XLA's defaults.

  Call it at run time, not at import: it starts JAX's backend, which must come after
  `jax.distributed.initialize`. The first call compiles a scalar program with the options
  to check this XLA accepts them.
  """
  options = options_for(jax.default_backend(), os.environ.get("XLA_FLAGS", ""))
  if options is None:
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(
        jnp.zeros((), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    logging.warning("XLA rejected the CPU compiler options %s (%s); using its defaults.",
                    options, str(e).splitlines()[0])
    return None
  return options


def jit(fun: Callable | None = None, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options()`, usable as a decorator.

  The options are read at the first call or `.lower`, so module-level functions can be
  decorated without starting the backend at import time. Called with traced arguments
  (from inside another jit) it is a plain `jax.jit`: the outer program's options apply.
  """
  if fun is None:
    return functools.partial(jit, **jit_kwargs)

  plain = jax.jit(fun, **jit_kwargs)

  @functools.cache
  def jitted():
    return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    # Inside another jit (traced arguments) only the outer program's options count,
    # and JAX refuses them on a nested jit.
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
      return plain(*args, **kwargs)
    return jitted()(*args, **kwargs)

  call.lower = lambda *args, **kwargs: jitted().lower(*args, **kwargs)
  return call


# --- The CPU process: XLA's per-call scratch memory kept mapped. ---

# XLA:CPU allocates an executable's temporary buffer afresh at each execution (1.4 GB
# for the CPU-sized U-Net's train step at batch 32) and frees it afterwards; glibc serves
# a request that large with a new `mmap`, and the kernel then faults in and zeroes every
# page at first touch, at every step. Two settings keep the memory mapped:
# - `jax_cpu_enable_async_dispatch=False`: a computation on one CPU device runs inline on
#   the calling thread, so its buffers come from that thread's malloc arena, for the main
#   thread glibc's main heap (a worker thread's arena maps every block over 64 MiB
#   afresh, whatever the settings);
# - glibc's `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, -1)`: the heap serves
#   large blocks itself and keeps freed memory instead of handing it back.
# The price: the process keeps its peak heap mapped (it reached it at every step anyway),
# and Python no longer runs ahead of a CPU computation, which competes for the same
# cores there.
M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>.
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


def configure_cpu(backend: str | None = None) -> bool:
  """Sets this process up for XLA:CPU as above; returns whether it did.

  Only for the CPU backend on Linux with glibc; elsewhere nothing changes. Call it once,
  early: after `jax.distributed.initialize` and before the first JAX computation,
  because JAX's CPU client reads the dispatch setting when it is created.

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


TF_EXTRA = "pip install 'cfg_guidance[tf]'"


@functools.cache
def tensorflow(purpose: str = "This"):
  """TensorFlow (the `[tf]` extra), kept off the GPUs: JAX owns their memory.

  Only TFDS data sets and the Inception extractor need it; everything else (digits, toy,
  training, sampling, `load()`, TensorBoard files) runs without it.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{purpose} needs TensorFlow, which is not installed: {TF_EXTRA}."
                      ) from e
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already ran on its devices: too late to hide them.
    logging.warning("TensorFlow's GPUs were initialised before cfg_guidance could hide "
                    "them from it; it may hold GPU memory JAX needs.")
  return tf


def tensorflow_datasets(purpose: str = "This"):
  """tensorflow_datasets (the `[tf]` extra), its TensorFlow kept off the GPUs."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{purpose} needs tensorflow-datasets, which is not installed: "
                      f"{TF_EXTRA}.") from e
  tensorflow(purpose)
  return tfds
