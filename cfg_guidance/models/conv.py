"""2-D convolution and matmul used by every model layer (NHWC activations, HWIO kernels).

Two functions, so the backend-specific fast paths live in one place.
"""

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def xla_conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1) -> jax.Array:
  """XLA's SAME convolution, on every backend; the reference `conv2d` must match."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding="SAME",
      dimension_numbers=_DIMENSION_NUMBERS)


@jax.custom_vjp
def _rows_matmul(x, w):
  """x [M, K] @ w [K, N], with the gradients `_rows_matmul_bwd` writes out."""
  return jnp.dot(x, w)


def _rows_matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _rows_matmul_bwd(residuals, g):
  x, w = residuals
  # dw = xᵀ g as one dot contracting the rows of both: [K, N] as it is laid out. Autodiff
  # computes (gᵀ x)ᵀ instead, which XLA:CPU runs outside YNNPACK at ~70 GFLOP/s. With rows
  # sharded over an explicit mesh axis, dw takes w's sharding, as autodiff's would.
  dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                           out_sharding=jax.typeof(w).sharding)
  return jnp.dot(g, w.T), dw


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N], the same values and gradients as `jnp.dot`.

  On CPU the leading axes are flattened into rows and the weight gradient is written
  out as xᵀ g over the rows. Autodiff's form, the transpose of gᵀ x, ran at 50–73
  GFLOP/s on one core; this one at ~200, the core's matmul rate: 11.2 → 4.0 ms for a
  qkv projection's weight gradient (bench/BENCHMARKS.md, change 14).
  """
  if jax.default_backend() != "cpu":
    return jnp.dot(x, w)
  rows = _rows_matmul(x.reshape(-1, x.shape[-1]), w)
  return rows.reshape(*x.shape[:-1], w.shape[-1])


def _pointwise_conv2d(x, kernel, stride):
  """A 1x1 SAME convolution is a matmul over channels of every stride-th pixel."""
  return matmul(x[:, ::stride, ::stride], kernel[0, 0])


def _check(x, kernel, stride):
  if x.ndim != 4:
    raise ValueError(f"x must be [N, H, W, Cin]; got shape {x.shape}.")
  if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"kernel must be [kh, kw, Cin={x.shape[3]}, Cout]; got shape "
                     f"{kernel.shape}.")
  if x.dtype != kernel.dtype:
    raise ValueError(f"x and kernel dtypes differ: {x.dtype} vs {kernel.dtype}.")
  if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
    raise ValueError(f"stride={stride!r} must be a positive integer.")


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1) -> jax.Array:
  """SAME-padded convolution. x: [N, H, W, Cin], kernel: [kh, kw, Cin, Cout].

  Returns [N, ceil(H / stride), ceil(W / stride), Cout] in x's dtype. On CPU (decided
  at trace time) a 1x1 kernel runs as a matmul, whose autodiff gradients are matmuls:
  XLA:CPU takes a convolution's kernel gradient as a second convolution with an
  H x W window, 2-4x slower there. 3x3 kernels keep XLA's convolution and gradients,
  which beat im2col and per-tap matmuls on CPU (bench/conv_bench.py has the numbers);
  the jitted train step and samplers run them on XLA's Eigen path, not YNNPACK
  (xla_options.py).
  """
  _check(x, kernel, stride)
  if jax.default_backend() == "cpu" and kernel.shape[:2] == (1, 1):
    return _pointwise_conv2d(x, kernel, stride)
  return xla_conv2d(x, kernel, stride=stride)
