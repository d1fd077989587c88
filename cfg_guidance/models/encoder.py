"""ADM's noisy classifier p(c | z_λ) (Dhariwal & Nichol 2021): the U-Net's encoder half,
conditioned on λ, with attention pooling to class logits (guided-diffusion's
EncoderUNetModel with pool="attention"). Classifier guidance takes ∇_z log p(c | z_λ).
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from cfg_guidance.models import layers
from cfg_guidance.models import unet


@dataclasses.dataclass(frozen=True)
class EncoderUNetConfig(unet.UNetConfig):
  """The classifier's fields: `config.model` with name="encoder_unet".

  The U-Net's fields, meaning the same for its encoder half and middle block, except
  num_classes: the number of logits (there is no ∅). Defaults: ADM's ImageNet 64×64
  classifier (classifier_width 128, depth 4, attention at 32, 16, 8, 64-channel heads,
  scale-shift norm, BigGAN down-sampling, no dropout).
  """
  base_channels: int = 128
  num_res_blocks: int = 4
  dropout: float = 0.0


class AttentionPool2d(nnx.Module):
  """CLIP's attention pooling as ADM's classifier head: one query, the mean token.

  tokens = [mean over positions, positions] + a learned positional embedding; multi-head
  attention of all tokens (q, k, v split before the heads); the output is the first
  token's, projected to `out_dim`. Computed in float32. x: [N, S, S, C] -> [N, out_dim].
  """

  def __init__(self, spatial, channels, num_heads, out_dim):
    # ADM draws the embedding from N(0, 1/C), [S² + 1, C]; the projections are its 1x1
    # Conv1d layers (PyTorch init), i.e. Dense layers; neither starts at zero.
    self.positional_embedding = layers.param((spatial * spatial + 1, channels), "normal",
                                             channels**-0.5)
    self.qkv = layers.Dense(channels, 3 * channels)
    self.proj_out = layers.Dense(channels, out_dim)
    self.num_heads = num_heads

  def __call__(self, x):
    n, _, _, c = x.shape
    x = x.astype(jnp.float32).reshape(n, -1, c)
    tokens = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    tokens = tokens + self.positional_embedding[...]
    q, k, v = (a.reshape(n, tokens.shape[1], self.num_heads, c // self.num_heads)
               for a in jnp.split(self.qkv(tokens), 3, axis=-1))
    # Only the first token's output is kept, so only its query is attended.
    out = unet.einsum_attention(q[:, :1], k, v, jnp.float32)
    return self.proj_out(out.reshape(n, c))


class EncoderUNet(nnx.Module):
  """__call__(z, logsnr) -> logits [N, num_classes] float32; z: [N, H, W, C].

  λ embedding as the U-Net's (no class embedding: the classifier is p(c | z_λ));
  `unet.encoder_half` (conv, encoder levels, middle block); out: GN, SiLU (float32, as
  the U-Net's head) and AttentionPool2d over the bottom grid.
  """

  def __init__(self, config: EncoderUNetConfig, *, rngs: nnx.Rngs):
    make = unet.BlockMaker(config)
    self.image_size, self.channels = config.image_size, config.channels
    self.dropout, self.remat = config.dropout, config.remat
    self.noise_embed = layers.NoiseEmbedding(config.base_channels, make.emb_dim)
    half = unet.encoder_half(config, make)
    self.conv_in, self.encoder, self.middle = half.conv_in, half.encoder, half.middle
    ch = half.channels
    self.norm_out = layers.GroupNorm(ch, config.num_groups, dtype=jnp.float32)
    self.pool = AttentionPool2d(half.resolution, ch, make.heads[ch], config.num_classes)
    layers.initialize(self, rngs)

  def __call__(self, z, logsnr, *, train=False, rngs=None):
    """z: [N, H, W, C], logsnr: [N] or scalar. With train=True and dropout > 0, dropout
    keys come from `rngs.dropout()`. Returns logits: [N, num_classes] float32."""
    unet.check_z(z, (self.image_size, self.image_size, self.channels))
    emb = self.noise_embed(layers.broadcast_logsnr(z, logsnr))
    apply, keys = unet.block_calls(self, train, rngs, len(self.encoder) + 1)
    h = self.conv_in(z)
    for block, block_key in zip(self.encoder, keys):
      h = apply(block, h, emb, block_key)
    h = apply(self.middle, h, emb, keys[-1])
    return self.pool(jax.nn.silu(self.norm_out(h)))
