"""The ADM U-Net (Dhariwal & Nichol 2021) as an ε-prediction network ε_θ(z, λ, c).

Follows guided-diffusion's UNetModel with scale-shift norm, BigGAN up/down-sampling and
no learned variance; the class table has an extra null row ∅ for classifier-free guidance.
"""

import dataclasses
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from cfg_guidance.models import layers


def _upsample(x):
  """Nearest-neighbour 2x. x: [N, H, W, C] -> [N, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x):
  """2x2 average pooling. x: [N, H, W, C] -> [N, H/2, W/2, C]."""
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


_RESAMPLE = {None: lambda x: x, "up": _upsample, "down": _downsample}


class ResBlock(nnx.Module):
  """ADM residual block with scale-shift conditioning and optional BigGAN resampling.

  out = skip(x) + Conv0(Drop(SiLU(GN(h)·(1 + scale) + shift))),
  h = Conv(resample(SiLU(GN(x)))), (scale, shift) = Dense(SiLU(emb)); Conv0 starts at zero.
  x: [N, H, W, Cin], emb: [N, E] -> [N, H', W', Cout].
  """

  def __init__(self, in_channels, out_channels, emb_dim, *, dropout=0.0,
               num_groups=32, resample=None, dtype=jnp.float32):
    self.norm1 = layers.GroupNorm(in_channels, num_groups, dtype=dtype)
    self.conv1 = layers.Conv(in_channels, out_channels, 3, dtype=dtype)
    self.emb_proj = layers.Dense(emb_dim, 2 * out_channels, dtype=dtype)
    self.norm2 = layers.GroupNorm(out_channels, num_groups, dtype=dtype)
    self.conv2 = layers.Conv(out_channels, out_channels, 3, zero_init=True,
                             dtype=dtype)
    # ADM's 1x1 skip projection when the width changes; identity otherwise.
    self.skip = (layers.Conv(in_channels, out_channels, 1, dtype=dtype)
                 if in_channels != out_channels else None)
    self.resample = resample
    self.dropout = dropout

  def __call__(self, x, emb, key=None):
    resample = _RESAMPLE[self.resample]
    h = jax.nn.silu(self.norm1(x))
    h = self.conv1(resample(h))
    x = resample(x)
    scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=-1)
    h = self.norm2(h, scale, shift)
    h = layers.dropout(jax.nn.silu(h), self.dropout, key)
    h = self.conv2(h)
    return (x if self.skip is None else self.skip(x)) + h


# How AttentionBlock computes softmax(q kᵀ/√d) v: "einsum", written out below (every
# backend); "xla" or "cudnn", `jax.nn.dot_product_attention` with that implementation
# ("cudnn" is cuDNN's fused flash attention: CUDA GPUs, bfloat16, head width ≤ 128, or
# ≤ 256 on Hopper; it never materialises the [tokens, tokens] logits).
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def _check_attention_impl(impl):
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl={impl!r} must be one of "
                     f"{ATTENTION_IMPLS}.")


def einsum_attention(q, k, v, dtype):
  """softmax(q kᵀ/√d) v; q, k, v: [N, tokens, heads, d] -> same, logits in float32."""
  head_dim = q.shape[-1]
  # Heads go first ([N, heads, tokens, d]) so each einsum is a plain batched matmul; with
  # the heads between tokens and d, XLA:CPU runs the forward far slower.
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  logits = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32)
  # softmax(logits) v with the normalisation after the second matmul, as flash
  # attention does: one division per output element instead of one per logit.
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  out = jnp.einsum("nhqk,nhkd->nhqd", e.astype(dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / e.sum(axis=-1, keepdims=True)).astype(dtype).transpose(0, 2, 1, 3)


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over the H·W positions, residual, zero-initialised output.

  Logits and softmax in float32. x: [N, H, W, C] -> same shape. `emb` and `key` are
  accepted so every layer of a block has one signature; attention ignores them. `impl`
  is one of ATTENTION_IMPLS; it changes how, not what, the block computes.
  """

  def __init__(self, channels, num_heads, *, num_groups=32, impl="einsum",
               dtype=jnp.float32):
    _check_attention_impl(impl)
    self.norm = layers.GroupNorm(channels, num_groups, dtype=dtype)
    # ADM's 1x1 Conv1d projections of the flattened tokens, i.e. Dense layers.
    self.qkv = layers.Dense(channels, 3 * channels, dtype=dtype)
    self.proj_out = layers.Dense(channels, channels, zero_init=True, dtype=dtype)
    self.num_heads = num_heads
    self.impl = impl
    self.dtype = dtype

  def __call__(self, x, emb=None, key=None):
    del emb, key
    n, hgt, wid, c = x.shape
    qkv = self.qkv(self.norm(x).reshape(n, hgt * wid, c))
    # q, k, v split before the heads, as ADM's use_new_attention_order.
    q, k, v = (a.reshape(n, hgt * wid, self.num_heads, c // self.num_heads)
               for a in jnp.split(qkv, 3, axis=-1))
    if self.impl == "einsum":
      out = einsum_attention(q, k, v, self.dtype)
    else:
      if self.impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(
            "attention_impl='cudnn' runs on CUDA GPUs only; the default backend is "
            f"{jax.default_backend()!r}. Use 'einsum' there.")
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
    return x + self.proj_out(out.reshape(n, hgt * wid, c)).reshape(x.shape)


class Downsample(nnx.Module):
  """ADM's non-BigGAN down-sampling: a stride-2 3x3 convolution.

  SAME padding pads only bottom/right on even sizes where PyTorch's padding=1 pads
  both sides: a half-pixel shift that matters only when porting ADM weights.
  """

  def __init__(self, channels, *, dtype=jnp.float32):
    self.conv = layers.Conv(channels, channels, 3, stride=2, dtype=dtype)

  def __call__(self, x, emb=None, key=None):
    del emb, key
    return self.conv(x)


class Upsample(nnx.Module):
  """ADM's non-BigGAN up-sampling: nearest 2x then a 3x3 convolution."""

  def __init__(self, channels, *, dtype=jnp.float32):
    self.conv = layers.Conv(channels, channels, 3, dtype=dtype)

  def __call__(self, x, emb=None, key=None):
    del emb, key
    return self.conv(_upsample(x))


class Block(nnx.Module):
  """ADM's TimestepEmbedSequential: layers applied in turn, each with its own key.

  This is the unit of rematerialisation and of the skip connections.
  """

  def __init__(self, *block_layers):
    self.layers = nnx.List(block_layers)

  def __call__(self, x, emb, key=None):
    for i, layer in enumerate(self.layers):
      x = layer(x, emb, None if key is None else jax.random.fold_in(key, i))
    return x


def _call_block(block, x, emb, key):
  return block(x, emb, key)


def block_calls(model, train, rngs, num_blocks):
  """(apply, keys): `apply(block, h, emb, key)` (rematerialised if `model.remat`) and
  each of `num_blocks` blocks' dropout key (None when dropout is off)."""
  key = layers.dropout_key(train, model.dropout, rngs)
  keys = [None if key is None else jax.random.fold_in(key, i) for i in range(num_blocks)]
  return (nnx.remat(_call_block) if model.remat else _call_block), keys


def check_z(z, example_shape):
  """Raises ValueError unless z is [N, *example_shape]."""
  if z.ndim != 4 or z.shape[1:] != tuple(example_shape):
    raise ValueError(f"z must have shape [N, {', '.join(map(str, example_shape))}]; got "
                     f"{z.shape}.")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The U-Net's fields: `config.model` with name="unet". Defaults: ADM's ImageNet 64."""
  num_classes: int = 1000  # Real classes; label num_classes is the null token ∅.
  image_size: int = 64  # Input side H = W.
  channels: int = 3  # Input/output channels (3 RGB, 1 grey).
  base_channels: int = 192  # C: width of the first level; embeddings are 4C wide.
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # Width multiplier per level (2x apart).
  num_res_blocks: int = 3  # Residual blocks per level (the decoder has one more).
  attention_resolutions: tuple[int, ...] = (32, 16, 8)  # Resolutions with self-attention.
  num_heads: int = -1  # Attention heads (-1: use num_head_channels).
  num_head_channels: int = 64  # Channels per head (-1: use num_heads).
  num_groups: int = 32  # GroupNorm groups; must divide every level's width.
  dropout: float = 0.1  # Dropout rate inside residual blocks.
  resblock_updown: bool = True  # BigGAN residual up/down-sampling (else conv resample).
  dtype: str = "float32"  # Compute dtype (bfloat16 on TPU/GPU); params, norms stay f32.
  remat: bool = False  # Rematerialise each block in the backward pass.
  attention_impl: str = "einsum"  # One of ATTENTION_IMPLS ("cudnn": GPU, bfloat16).

  def example_shape(self) -> tuple[int, int, int]:
    """One example's shape (H, W, C): what `z` is per example."""
    return (self.image_size, self.image_size, self.channels)

  def validate(self) -> dict[int, int]:
    """Raises ValueError naming the first bad field; returns {width: attention heads}."""
    layers.parse_dtype(self.dtype, "config.model.dtype")
    _check_attention_impl(self.attention_impl)
    if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
      raise ValueError(f"config.model.attention_impl='cudnn' needs dtype='bfloat16'; got "
                       f"{self.dtype!r}: cuDNN's flash attention has no float32 kernels.")
    for name in ("image_size", "channels", "base_channels", "num_res_blocks",
                 "num_classes", "num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.model.{name}={getattr(self, name)!r} must be >= 1.")
    mult = self.channel_mult
    if not mult or min(mult) < 1:
      raise ValueError(f"config.model.channel_mult={mult!r} must be a non-empty tuple of "
                       "positive ints.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.model.dropout={self.dropout!r} must lie in [0, 1).")
    factor = 2 ** (len(mult) - 1)
    if self.image_size % factor:
      raise ValueError(
          f"config.model.image_size={self.image_size} must be divisible by "
          f"2^(len(channel_mult) - 1) = {factor} to down-sample {len(mult) - 1} times.")
    pyramid = [self.image_size // 2**level for level in range(len(mult))]
    bad = [r for r in self.attention_resolutions if r not in pyramid]
    if bad:
      raise ValueError(f"config.model.attention_resolutions={self.attention_resolutions}: "
                       f"{bad} not in the U-Net's resolutions {pyramid}.")
    widths = [self.base_channels * m for m in mult]
    for width in widths:
      if width % self.num_groups:
        raise ValueError(
            f"config.model.num_groups={self.num_groups} must divide every level's width "
            f"base_channels * channel_mult = {widths}; it does not divide {width}.")
    if (self.num_heads == -1) == (self.num_head_channels == -1):
      raise ValueError(
          f"Set exactly one of config.model.num_heads={self.num_heads} and "
          f"num_head_channels={self.num_head_channels}; the other must be -1.")
    # Attention runs at the listed resolutions and always in the middle block.
    attn_widths = {widths[-1]} | {
        w for w, r in zip(widths, pyramid) if r in self.attention_resolutions}
    by_width = self.num_head_channels != -1
    name, value = (("num_head_channels", self.num_head_channels) if by_width
                   else ("num_heads", self.num_heads))
    if value < 1:
      raise ValueError(f"config.model.{name}={value} must be >= 1 (or -1).")
    heads = {}
    for width in sorted(attn_widths):
      if width % value:
        raise ValueError(f"config.model.{name}={value} must divide the attention width "
                         f"{width}.")
      heads[width] = width // value if by_width else value
    return heads


class BlockMaker:
  """The configured blocks of an ADM network: ResBlocks, attention, down/up-sampling.

  Validates `config` (a UNetConfig or a subclass) once; embeddings are 4C wide.
  """

  def __init__(self, config: UNetConfig):
    self.config = config
    self.heads = config.validate()
    self.dtype = layers.parse_dtype(config.dtype)
    self.emb_dim = 4 * config.base_channels

  def res(self, cin, cout, resample=None):
    c = self.config
    return ResBlock(cin, cout, self.emb_dim, dropout=c.dropout, num_groups=c.num_groups,
                    resample=resample, dtype=self.dtype)

  def attn(self, ch):
    return AttentionBlock(ch, self.heads[ch], num_groups=self.config.num_groups,
                          impl=self.config.attention_impl, dtype=self.dtype)

  def down(self, ch):
    return (self.res(ch, ch, "down") if self.config.resblock_updown
            else Downsample(ch, dtype=self.dtype))

  def up(self, ch):
    return (self.res(ch, ch, "up") if self.config.resblock_updown
            else Upsample(ch, dtype=self.dtype))


class EncoderHalf(NamedTuple):
  """ADM's input half and middle block, with the widths the decoder needs."""
  conv_in: layers.Conv
  encoder: nnx.List  # Blocks, each ResBlock (+ attention) or a down-sampling block.
  middle: Block  # ResBlock, attention, ResBlock.
  skip_channels: tuple[int, ...]  # Width of conv_in's output, then of each block's.
  channels: int  # Width at the bottom.
  resolution: int  # Side length at the bottom.


def encoder_half(config: UNetConfig, make: BlockMaker) -> EncoderHalf:
  """conv, then per level num_res_blocks ResBlocks (+ attention at the listed
  resolutions) and a down-sampling block (none after the last); then the middle block."""
  base_channels, resolution = config.base_channels, config.image_size
  ch = base_channels * config.channel_mult[0]
  conv_in = layers.Conv(config.channels, ch, 3, dtype=make.dtype)
  skip_channels = [ch]
  encoder = []
  for level, mult in enumerate(config.channel_mult):
    for _ in range(config.num_res_blocks):
      block = [make.res(ch, base_channels * mult)]
      ch = base_channels * mult
      if resolution in config.attention_resolutions:
        block.append(make.attn(ch))
      encoder.append(Block(*block))
      skip_channels.append(ch)
    if level != len(config.channel_mult) - 1:
      encoder.append(Block(make.down(ch)))
      skip_channels.append(ch)
      resolution //= 2
  middle = Block(make.res(ch, ch), make.attn(ch), make.res(ch, ch))
  return EncoderHalf(conv_in, nnx.List(encoder), middle, tuple(skip_channels), ch,
                     resolution)


class UNet(nnx.Module):
  """ADM U-Net. __call__(z, logsnr, labels) -> eps, z: [N, H, W, C], eps float32 alike.

  `encoder_half`, then the decoder: per level num_res_blocks + 1 ResBlocks on [h, skip]
  concatenations (+ attention) and an up-sampling block; out: GN, SiLU, zero-initialised
  conv.
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    make = BlockMaker(config)
    self.image_size, self.channels = config.image_size, config.channels
    self.num_classes, self.dropout, self.remat = config.num_classes, config.dropout, config.remat
    self.dtype = make.dtype
    base_channels, channel_mult = config.base_channels, config.channel_mult
    num_res_blocks = config.num_res_blocks

    self.noise_embed = layers.NoiseEmbedding(base_channels, make.emb_dim)
    self.class_embed = layers.ClassEmbedding(config.num_classes, make.emb_dim)
    half = encoder_half(config, make)
    self.conv_in, self.encoder, self.middle = half.conv_in, half.encoder, half.middle
    skip_channels, ch, resolution = list(half.skip_channels), half.channels, half.resolution

    decoder = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        block = [make.res(ch + skip_channels.pop(), base_channels * mult)]
        ch = base_channels * mult
        if resolution in config.attention_resolutions:
          block.append(make.attn(ch))
        if level and i == num_res_blocks:
          block.append(make.up(ch))
          resolution *= 2
        decoder.append(Block(*block))
    self.decoder = nnx.List(decoder)
    # ADM runs the output head in float32 (its h.type(x.dtype) before self.out).
    self.norm_out = layers.GroupNorm(ch, config.num_groups, dtype=jnp.float32)
    self.conv_out = layers.Conv(ch, config.channels, 3, zero_init=True)
    layers.initialize(self, rngs)

  def __call__(self, z, logsnr, labels, *, train=False, rngs=None):
    """z: [N, H, W, C], logsnr: [N] or scalar, labels: [N] int in [0, num_classes].

    With train=True and dropout > 0, dropout keys come from `rngs.dropout()`.
    Returns eps: [N, H, W, C] float32.
    """
    check_z(z, (self.image_size, self.image_size, self.channels))
    logsnr, labels = layers.broadcast_inputs(z, logsnr, labels)
    emb = self.noise_embed(logsnr) + self.class_embed(labels)
    apply, keys = block_calls(self, train, rngs, len(self.encoder) + 1 + len(self.decoder))

    h = self.conv_in(z)
    skips = [h]
    for block, block_key in zip(self.encoder, keys):
      h = apply(block, h, emb, block_key)
      skips.append(h)
    h = apply(self.middle, h, emb, keys[len(self.encoder)])
    for block, block_key in zip(self.decoder, keys[len(self.encoder) + 1:]):
      h = apply(block, jnp.concatenate([h, skips.pop()], axis=-1), emb, block_key)
    h = jax.nn.silu(self.norm_out(h))
    return self.conv_out(h).astype(jnp.float32)

