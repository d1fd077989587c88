"""XLA compiler options for this project's hot jitted programs, per backend.

On CPU, XLA (jaxlib 0.10) hands convolutions, matmuls and reductions to YNNPACK fusions.
For our U-Nets its convolutions are the slower choice: with convolutions left to XLA's
Eigen path and YNNPACK kept for matmuls and reductions, the CPU-sized U-Net's train step
takes 3.21 instead of 3.71 s on one core and 1.74 instead of 2.26 s on two; the 3x3
kernel gradient at 32x32x128 alone takes 47 instead of 74 ms (bench/BENCHMARKS.md,
change 10). Reductions must stay with YNNPACK: as XLA's own loops, the gradients' sums
over N, H, W (GroupNorm's backward fused in) took 344 instead of 10 ms per step.

The options go to `jax.jit(..., compiler_options=...)` of the train step, the sampler,
the evaluation sampler and the stand-in classifier's step, not to XLA_FLAGS: they apply
to those programs only, leave a user's own jits alone, and an XLA that does not know
them (another jaxlib, a TPU runtime) is detected once and skipped with a warning instead
of failing the run. A `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS is the
user's choice: then none is set here.
"""

import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

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
