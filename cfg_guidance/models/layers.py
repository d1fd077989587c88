"""Layers shared by the U-Net and the MLP: Dense, Conv, GroupNorm, and the noise-level
(log-SNR) and class embeddings. Layers declare parameters; `initialize` draws them."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cfg_guidance.runtime import backend

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The log-SNR range of the paper's schedule; clipping keeps t off 0 and 1 exactly.
LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0


def parse_dtype(dtype, field="dtype"):
  """Maps a config string (or a jnp dtype) to a jnp dtype; names the field if bad."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"{field}={dtype!r}: expected one of {sorted(DTYPES)}.")
    return DTYPES[dtype]
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES.values()]:
    raise ValueError(f"{field}={dtype!r}: expected one of {sorted(DTYPES)}.")
  return jnp.dtype(dtype).type


def param(shape, init, scale=1.0):
  """A float32 nnx.Param declared with its init rule; `initialize` draws its values.

  init: "uniform" (U(−scale, scale)), "normal" (N(0, scale²)), "zeros" or "ones".
  """
  fill = jnp.ones if init == "ones" else jnp.zeros
  return nnx.Param(fill(shape, jnp.float32), init_spec=(init, scale))


def initialize(module, rngs):
  """Draws every declared parameter of `module` from one uniform and one normal draw.

  On CPU, XLA compiles each threefry call (and each fusion it is copied into)
  separately, a large share of a small model's compile time; one draw per distribution,
  kept out of the per-parameter slices by an optimisation barrier, keeps creating a
  model of hundreds of tensors fast. Deterministic in `rngs`; parameters are visited in
  nnx.iter_graph order.
  """
  entries = {"uniform": [], "normal": []}
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and "init_spec" in node.get_metadata():
      init, scale = node.init_spec
      if init in entries:
        entries[init].append((node, scale))
  draws = {"uniform": lambda k, n: jax.random.uniform(k, (n,), jnp.float32, -1., 1.),
           "normal": lambda k, n: jax.random.normal(k, (n,), jnp.float32)}
  for init, params in entries.items():
    key = rngs.params()
    total = sum(node.get_value().size for node, _ in params)
    if not total:
      continue
    flat = jax.lax.optimization_barrier(draws[init](key, total))
    offset = 0
    for node, scale in params:
      shape = node.get_value().shape
      size = math.prod(shape)
      node.set_value(scale * flat[offset:offset + size].reshape(shape))
      offset += size


class Dense(nnx.Module):
  """y = x W + b over the last axis; float32 parameters, compute in `dtype`."""

  def __init__(self, in_features, out_features, *, zero_init=False,
               dtype=jnp.float32):
    # PyTorch's nn.Linear init, U(±1/sqrt(fan_in)) for kernel and bias, as in ADM.
    init = "zeros" if zero_init else "uniform"
    bound = 1.0 / math.sqrt(in_features)
    self.kernel = param((in_features, out_features), init, bound)
    self.bias = param((out_features,), init, bound)
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = backend.fast_paths().matmul(x, self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class Conv(nnx.Module):
  """SAME 2-D convolution. x: [N, H, W, Cin] -> [N, ceil(H/stride), ceil(W/stride), Cout].

  Kernel [k, k, Cin, Cout] and bias are PyTorch-initialised as ADM's nn.Conv2d:
  U(±1/sqrt(k·k·Cin)), i.e. variance_scaling(1/3, "fan_in", "uniform") for the kernel;
  or zero for ADM's zero_module convolutions.
  """

  def __init__(self, in_channels, out_channels, kernel_size=3, *, stride=1,
               zero_init=False, dtype=jnp.float32):
    init = "zeros" if zero_init else "uniform"
    bound = 1.0 / math.sqrt(kernel_size * kernel_size * in_channels)
    self.kernel = param((kernel_size, kernel_size, in_channels, out_channels), init,
                        bound)
    self.bias = param((out_channels,), init, bound)
    self.stride = stride
    self.dtype = dtype

  def __call__(self, x):
    y = backend.fast_paths().conv2d(x.astype(self.dtype),
                                    self.kernel[...].astype(self.dtype), stride=self.stride)
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over the channel (last) axis, computed in float32 (as ADM's GroupNorm32).

  x: [N, ..., C] -> same shape, cast back to `dtype`. epsilon 1e-5 is PyTorch's.
  `norm(x, scale, shift)` with [N, C] arrays also applies ADM's conditioning,
  GN(x)·(1 + scale) + shift, in the same pass.

  The statistics are sums over positions per channel (reductions along the contiguous
  channel axis), then per group; normalisation, affine and conditioning fold into one
  (x − mean)·a + b per (example, channel): fewer passes over x, forward and backward,
  than reducing a [N, HW, G, C/G] view (bench/BENCHMARKS.md). Two-pass variance.
  """

  def __init__(self, num_channels, num_groups=32, *, epsilon=1e-5,
               dtype=jnp.float32):
    if num_channels % num_groups:
      raise ValueError(
          f"num_groups={num_groups} must divide the channel count {num_channels}.")
    self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x, scale=None, shift=None):
    n, c = x.shape[0], x.shape[-1]
    per_group = c // self.num_groups
    flat = x.astype(jnp.float32).reshape(n, -1, c)
    count = flat.shape[1] * per_group

    def group_mean(channel_sums):  # [N, C] sums over positions -> [N, C] group means.
      means = channel_sums.reshape(n, self.num_groups, per_group).sum(-1) / count
      return jnp.repeat(means, per_group, axis=1)

    mean = group_mean(flat.sum(axis=1))
    var = group_mean(jnp.square(flat - mean[:, None]).sum(axis=1))
    a = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    b = jnp.broadcast_to(self.bias[...], (n, c))
    if scale is not None:
      a = a * (1 + scale.astype(jnp.float32))
      b = b * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    y = (flat - mean[:, None]) * a[:, None] + b[:, None]
    return y.reshape(x.shape).astype(self.dtype)


def dropout(x, rate, key):
  """Inverted dropout; identity when `key` is None (eval) or rate is 0.

  Each element is dropped when 16 random bits fall below round(rate·2^16), so the rate
  is exact to 2^−17 (0.1 → 0.100006), and kept elements are scaled by the inverse of the
  exact keep probability, so E[dropout(x)] = x. Two elements per 32-bit random word, half
  the bits of `jax.random.bernoulli`'s uniforms; the words come from the backend's
  `fast_paths().random_words`.
  """
  if key is None or rate == 0.0:
    return x
  threshold = min(round(rate * 2**16), 2**16 - 1)
  words = backend.fast_paths().random_words(key, (x.size + 1) // 2)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:x.size]
  keep = halves.reshape(x.shape) >= threshold
  scale = jnp.asarray(2**16 / (2**16 - threshold), x.dtype)
  return jnp.where(keep, x * scale, jnp.zeros_like(x))


def dropout_key(train, rate, rngs):
  """The call's dropout key, drawn from `rngs` (an nnx.Rngs); None when dropout is off.

  Returned as an "rbg" key (XLA's RngBitGenerator), the usual dropout generator on
  TPU; every dropout layer draws a mask, and threefry masks are much slower to compile.
  Masks are reproducible for a given key and device layout.
  """
  if not train or rate == 0.0:
    return None
  if rngs is None:
    raise ValueError(
        f"train=True with dropout={rate} needs rngs=nnx.Rngs(dropout=...).")
  try:
    key = rngs.dropout()
  except AttributeError as e:
    raise ValueError("rngs has no 'dropout' (or 'default') stream.") from e
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")


def logsnr_to_time(logsnr):
  """t = arctan(e^(−λ/2)) / (π/2) ∈ (0, 1), after clipping λ to [−20, 20].

  The inverse of the cosine schedule λ = −2 log tan(πt/2): t = 0 is clean, t = 1 noise.
  """
  logsnr = jnp.clip(jnp.asarray(logsnr, jnp.float32), LOGSNR_MIN, LOGSNR_MAX)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


def sinusoidal_embedding(x, dim, max_period=10_000.0):
  """ADM/Transformer embedding [cos(x f_i), sin(x f_i)], f_i = max_period^(−i/half).

  x: [N] float -> [N, dim] float32 (odd `dim` ends with a zero column).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class NoiseEmbedding(nnx.Module):
  """λ -> t -> sinusoid(1000·t) of width `dim` -> Dense(out) -> SiLU -> Dense(out).

  Kept in float32 (as ADM keeps its time embedding out of fp16). logsnr: [N] -> [N, out].
  """

  def __init__(self, dim, out_dim):
    self.dim = dim
    self.dense1 = Dense(dim, out_dim)
    self.dense2 = Dense(out_dim, out_dim)

  def __call__(self, logsnr):
    t = logsnr_to_time(logsnr)
    h = sinusoidal_embedding(1000.0 * t, self.dim)
    return self.dense2(jax.nn.silu(self.dense1(h)))


class ClassEmbedding(nnx.Module):
  """Table of num_classes + 1 rows; row `num_classes` is the learned null token ∅.

  N(0, 1) init (PyTorch nn.Embedding). labels: [N] int -> [N, dim] float32; a label
  outside [0, num_classes] gives NaN rows under jit and a ValueError eagerly.
  """

  def __init__(self, num_classes, dim):
    self.num_classes = num_classes
    self.embedding = param((num_classes + 1, dim), "normal", 1.0)

  def __call__(self, labels):
    try:
      concrete = np.asarray(labels)
    except jax.errors.TracerArrayConversionError:
      concrete = None  # Traced: checked by the NaN fill below instead.
    if concrete is not None and concrete.size and (
        concrete.min() < 0 or concrete.max() > self.num_classes):
      raise ValueError(
          f"labels must lie in [0, {self.num_classes}] ({self.num_classes} is the "
          f"null label); got min {concrete.min()}, max {concrete.max()}.")
    return jnp.take(self.embedding[...], labels, axis=0, mode="fill",
                    fill_value=jnp.nan)


def broadcast_logsnr(z, logsnr):
  """logsnr as float32 [N] for z: [N, ...]; a scalar broadcasts."""
  n = z.shape[0]
  logsnr = jnp.asarray(logsnr, jnp.float32)
  if logsnr.ndim == 0:
    logsnr = jnp.full((n,), logsnr)
  if logsnr.shape != (n,):
    raise ValueError(f"logsnr must be a scalar or have shape [{n}]; got {logsnr.shape}.")
  return logsnr


def broadcast_inputs(z, logsnr, labels):
  """Checks batch shapes; a scalar logsnr (or label) broadcasts to [N]."""
  n = z.shape[0]
  logsnr = broadcast_logsnr(z, logsnr)
  labels = jnp.asarray(labels)
  if labels.ndim == 0:
    labels = jnp.full((n,), labels)
  if labels.shape != (n,):
    raise ValueError(f"labels must have shape [{n}]; got {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
  return logsnr, labels
