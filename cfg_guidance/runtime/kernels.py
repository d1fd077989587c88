"""Hand-written forms of the layers' primitives, for backends where XLA's are slower.

Each has the same values (and gradients) as its plain form in `backend.PLAIN`;
`backend.fast_paths()` decides which backend uses which. NHWC activations, HWIO kernels.
"""

import jax
import jax.numpy as jnp

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def check_conv_inputs(x, kernel, stride) -> None:
  """Raises ValueError unless x [N, H, W, Cin] and kernel [kh, kw, Cin, Cout] fit."""
  if x.ndim != 4:
    raise ValueError(f"x must be [N, H, W, Cin]; got shape {x.shape}.")
  if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
    raise ValueError(f"kernel must be [kh, kw, Cin={x.shape[3]}, Cout]; got shape "
                     f"{kernel.shape}.")
  if x.dtype != kernel.dtype:
    raise ValueError(f"x and kernel dtypes differ: {x.dtype} vs {kernel.dtype}.")
  if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
    raise ValueError(f"stride={stride!r} must be a positive integer.")


def xla_conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1) -> jax.Array:
  """XLA's SAME convolution: the plain form every other `conv2d` must match.

  x: [N, H, W, Cin], kernel: [kh, kw, Cin, Cout] -> [N, ceil(H/s), ceil(W/s), Cout].
  """
  check_conv_inputs(x, kernel, stride)
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
  # computes (gᵀ x)ᵀ instead, which XLA:CPU runs outside YNNPACK at a third of the
  # core's matmul rate. With rows sharded over an explicit mesh axis, dw takes w's
  # sharding, as autodiff's would.
  dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                           out_sharding=jax.typeof(w).sharding)
  return jnp.dot(g, w.T), dw


_rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N] -> [..., N], the same values and gradients as `jnp.dot`.

  The leading axes are flattened into rows and the weight gradient is written out as
  xᵀ g over the rows (bench/BENCHMARKS.md has what that buys on XLA:CPU).
  """
  rows = _rows_matmul(x.reshape(-1, x.shape[-1]), w)
  return rows.reshape(*x.shape[:-1], w.shape[-1])


def pointwise_as_matmul_conv2d(x: jax.Array, kernel: jax.Array, *,
                               stride: int = 1) -> jax.Array:
  """SAME convolution whose 1x1 kernels run as `rows_matmul` over the channels.

  XLA:CPU takes a convolution's kernel gradient as a second convolution with an H x W
  window, several times slower there than a matmul's. 3x3 kernels keep XLA's
  convolution and gradients, which beat im2col and per-tap matmuls on CPU.
  """
  check_conv_inputs(x, kernel, stride)
  if kernel.shape[:2] == (1, 1):
    return rows_matmul(x[:, ::stride, ::stride], kernel[0, 0])
  return xla_conv2d(x, kernel, stride=stride)


def _hash32(v):
  """lowbias32 (C. Wellons' hash prospector): a bijection of uint32 with full avalanche;
  flipping one input bit flips each output bit with probability 0.5 ± 0.0017."""
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x7FEB352D)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x846CA68B)
  return v ^ (v >> 16)


def counter_hash_bits(key: jax.Array, n: int) -> jax.Array:
  """n random uint32 words: word i = H(H(i + s) ⊕ H(s ⊕ c)), H = `_hash32`.

  s is the key's words folded through H (s ← H(s ⊕ kⱼ), from the golden ratio), so a
  change in any key word changes both stages' keys; c = 0x85EBCA6B. For one key the
  words are a permutation of distinct values. Two keys whose first stages overlap
  (s' = s + δ) are separated by the second stage. Each word is a few integer operations
  that XLA fuses into its consumer, so no random bits are written to memory, unlike
  `jax.random.bits` off TPU.
  """
  if n >= 2**32:
    raise ValueError(f"counter_hash_bits draws at most 2^32 - 1 words; asked for {n}.")
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  seed = jnp.uint32(0x9E3779B9)
  for j in range(words.shape[0]):
    seed = _hash32(seed ^ words[j])
  i = jax.lax.iota(jnp.uint32, n)
  return _hash32(_hash32(i + seed) ^ _hash32(seed ^ jnp.uint32(0x85EBCA6B)))
