"""2-D convolution used by every model layer (NHWC activations, HWIO kernels).

One function so the backend-specific fast path lives in one place.
"""

import jax


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1) -> jax.Array:
  """SAME-padded convolution. x: [N, H, W, Cin], kernel: [kh, kw, Cin, Cout]."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
