"""The ADM U-Net (Dhariwal & Nichol 2021) as an ε-prediction network ε_θ(z, λ, c).

Follows guided-diffusion's UNetModel with scale-shift norm, BigGAN up/down-sampling and
no learned variance; the class table has an extra null row ∅ for classifier-free guidance.
"""

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
    raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}.")


def _einsum_attention(q, k, v, dtype):
  """softmax(q kᵀ/√d) v; q, k, v: [N, tokens, heads, d] -> same, logits in float32."""
  head_dim = q.shape[-1]
  # Heads go first ([N, heads, tokens, d]) so each einsum is a plain batched matmul: on
  # XLA:CPU the forward took 2.5x longer with the heads between tokens and d
  # (bench/BENCHMARKS.md, change 7).
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  q = q * jnp.asarray(head_dim**-0.5, q.dtype)
  logits = jnp.einsum("nhqd,nhkd->nhqk", q, k, preferred_element_type=jnp.float32)
  # softmax(logits) v with the normalisation after the second matmul, as flash
  # attention does: one division per output element instead of one per logit. The
  # train step of the CPU-sized U-Net took 6% less (bench/BENCHMARKS.md, change 11).
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
      out = _einsum_attention(q, k, v, self.dtype)
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


def _check_positive_int(name, value):
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer.")


def check_config(*, image_size, channels, base_channels, channel_mult, num_res_blocks,
                 attention_resolutions, num_classes, num_heads=-1, num_head_channels=-1,
                 num_groups=32, dropout=0.0, resblock_updown=True, dtype="float32",
                 remat=False, attention_impl="einsum"):
  """Raises ValueError naming the first bad field; returns {width: attention heads}."""
  del resblock_updown, remat  # Any bool will do.
  layers.parse_dtype(dtype)
  _check_attention_impl(attention_impl)
  if attention_impl == "cudnn" and dtype != "bfloat16":
    raise ValueError(f"attention_impl='cudnn' needs dtype='bfloat16'; got {dtype!r}: "
                     "cuDNN's flash attention has no float32 kernels.")
  channel_mult = tuple(channel_mult)
  for name, value in [("image_size", image_size), ("channels", channels),
                      ("base_channels", base_channels),
                      ("num_res_blocks", num_res_blocks), ("num_classes", num_classes),
                      ("num_groups", num_groups)]:
    _check_positive_int(name, value)
  if not channel_mult or any(
      not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in channel_mult):
    raise ValueError(
        f"channel_mult={channel_mult!r} must be a non-empty tuple of positive ints.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout={dropout!r} must lie in [0, 1).")
  factor = 2 ** (len(channel_mult) - 1)
  if image_size % factor:
    raise ValueError(
        f"image_size={image_size} must be divisible by 2^(len(channel_mult) - 1) = "
        f"{factor} to down-sample {len(channel_mult) - 1} times.")
  pyramid = [image_size // 2**level for level in range(len(channel_mult))]
  bad = [r for r in attention_resolutions if r not in pyramid]
  if bad:
    raise ValueError(
        f"attention_resolutions={tuple(attention_resolutions)}: {bad} not in the "
        f"U-Net's resolutions {pyramid}.")
  widths = [base_channels * m for m in channel_mult]
  for width in widths:
    if width % num_groups:
      raise ValueError(
          f"num_groups={num_groups} must divide every level's width "
          f"base_channels * channel_mult = {widths}; it does not divide {width}.")
  if (num_heads == -1) == (num_head_channels == -1):
    raise ValueError(
        f"Set exactly one of num_heads={num_heads} and num_head_channels="
        f"{num_head_channels}; the other must be -1.")
  # Attention runs at the listed resolutions and always in the middle block.
  attn_widths = {widths[-1]} | {
      w for w, r in zip(widths, pyramid) if r in attention_resolutions}
  heads = {}
  for width in sorted(attn_widths):
    if num_head_channels != -1:
      _check_positive_int("num_head_channels", num_head_channels)
      if width % num_head_channels:
        raise ValueError(f"num_head_channels={num_head_channels} must divide the "
                         f"attention width {width}.")
      heads[width] = width // num_head_channels
    else:
      _check_positive_int("num_heads", num_heads)
      if width % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide the attention width "
                         f"{width}.")
      heads[width] = num_heads
  return heads


class UNet(nnx.Module):
  """ADM U-Net. __call__(z, logsnr, labels) -> eps, z: [N, H, W, C], eps float32 alike.

  Encoder: conv, then per level num_res_blocks ResBlocks (+ attention at the listed
  resolutions) and a down-sampling block; middle: ResBlock, attention, ResBlock;
  decoder: per level num_res_blocks + 1 ResBlocks on [h, skip] concatenations (+
  attention) and an up-sampling block; out: GN, SiLU, zero-initialised conv.
  """

  def __init__(self, *, image_size, channels, base_channels, channel_mult,
               num_res_blocks, attention_resolutions, num_classes, num_heads=-1,
               num_head_channels=-1, num_groups=32, dropout=0.0,
               resblock_updown=True, dtype="float32", remat=False,
               attention_impl="einsum", rngs):
    channel_mult = tuple(channel_mult)
    attention_resolutions = tuple(attention_resolutions)
    heads = check_config(
        image_size=image_size, channels=channels, base_channels=base_channels,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        attention_resolutions=attention_resolutions, num_classes=num_classes,
        num_heads=num_heads, num_head_channels=num_head_channels,
        num_groups=num_groups, dropout=dropout, dtype=dtype,
        attention_impl=attention_impl)
    dtype = layers.parse_dtype(dtype)
    self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
    self.dropout, self.remat, self.dtype = dropout, remat, dtype

    emb_dim = 4 * base_channels
    self.noise_embed = layers.NoiseEmbedding(base_channels, emb_dim)
    self.class_embed = layers.ClassEmbedding(num_classes, emb_dim)

    def res(cin, cout, resample=None):
      return ResBlock(cin, cout, emb_dim, dropout=dropout, num_groups=num_groups,
                      resample=resample, dtype=dtype)

    def attn(ch):
      return AttentionBlock(ch, heads[ch], num_groups=num_groups, impl=attention_impl,
                            dtype=dtype)

    def down(ch):
      return res(ch, ch, "down") if resblock_updown else Downsample(ch, dtype=dtype)

    def up(ch):
      return res(ch, ch, "up") if resblock_updown else Upsample(ch, dtype=dtype)

    ch = base_channels * channel_mult[0]
    self.conv_in = layers.Conv(channels, ch, 3, dtype=dtype)
    skip_channels = [ch]
    resolution = image_size
    encoder = []
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        block = [res(ch, base_channels * mult)]
        ch = base_channels * mult
        if resolution in attention_resolutions:
          block.append(attn(ch))
        encoder.append(Block(*block))
        skip_channels.append(ch)
      if level != len(channel_mult) - 1:
        encoder.append(Block(down(ch)))
        skip_channels.append(ch)
        resolution //= 2
    self.encoder = nnx.List(encoder)
    self.middle = Block(res(ch, ch), attn(ch), res(ch, ch))

    decoder = []
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        block = [res(ch + skip_channels.pop(), base_channels * mult)]
        ch = base_channels * mult
        if resolution in attention_resolutions:
          block.append(attn(ch))
        if level and i == num_res_blocks:
          block.append(up(ch))
          resolution *= 2
        decoder.append(Block(*block))
    self.decoder = nnx.List(decoder)
    # ADM runs the output head in float32 (its h.type(x.dtype) before self.out).
    self.norm_out = layers.GroupNorm(ch, num_groups, dtype=jnp.float32)
    self.conv_out = layers.Conv(ch, channels, 3, zero_init=True)
    layers.initialize(self, rngs)

  def __call__(self, z, logsnr, labels, *, train=False, rngs=None):
    """z: [N, H, W, C], logsnr: [N] or scalar, labels: [N] int in [0, num_classes].

    With train=True and dropout > 0, dropout keys come from `rngs.dropout()`.
    Returns eps: [N, H, W, C] float32.
    """
    expected = (self.image_size, self.image_size, self.channels)
    if z.ndim != 4 or z.shape[1:] != expected:
      raise ValueError(f"z must have shape [N, {', '.join(map(str, expected))}]; got "
                       f"{z.shape}.")
    logsnr, labels = layers.broadcast_inputs(z, logsnr, labels)
    key = layers.dropout_key(train, self.dropout, rngs)
    emb = self.noise_embed(logsnr) + self.class_embed(labels)
    apply = nnx.remat(_call_block) if self.remat else _call_block
    num_blocks = len(self.encoder) + 1 + len(self.decoder)
    keys = [None if key is None else jax.random.fold_in(key, i)
            for i in range(num_blocks)]

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

