"""A residual-MLP ε-prediction network for points in R^dim (the paper's 2-D toy problem).

Same interface and conditioning as the U-Net: λ and class embeddings, scale-shift
residual blocks with zero-initialised outputs, so a fresh model predicts ε = 0.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from cfg_guidance.models import layers


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """The MLP's fields: `config.model` with name="mlp". Defaults: the toy problem's."""
  num_classes: int = 3  # Real classes; label num_classes is the null token ∅.
  dim: int = 2  # Point dimension.
  hidden: int = 256  # Width of the residual stream and of the embeddings.
  num_blocks: int = 3  # Residual MLP blocks.
  dropout: float = 0.0  # Dropout rate inside the blocks.
  dtype: str = "float32"  # Compute dtype; parameters and norms stay float32.

  def example_shape(self) -> tuple[int]:
    """One example's shape (dim,): what `z` is per example."""
    return (self.dim,)

  def validate(self) -> None:
    """Raises ValueError naming the first bad field."""
    for name in ("num_classes", "dim", "hidden", "num_blocks"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.model.{name}={getattr(self, name)!r} must be >= 1.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"config.model.dropout={self.dropout!r} must lie in [0, 1).")
    layers.parse_dtype(self.dtype, "config.model.dtype")


class MLPBlock(nnx.Module):
  """h + Dense0(Drop(SiLU(LN(Dense(SiLU(LN(h))))·(1 + scale) + shift))).

  LN is a one-group GroupNorm (LayerNorm over features). h: [N, D], emb: [N, E].
  """

  def __init__(self, hidden, emb_dim, *, dropout=0.0, dtype=jnp.float32):
    self.norm1 = layers.GroupNorm(hidden, 1, dtype=dtype)
    self.dense1 = layers.Dense(hidden, hidden, dtype=dtype)
    self.emb_proj = layers.Dense(emb_dim, 2 * hidden, dtype=dtype)
    self.norm2 = layers.GroupNorm(hidden, 1, dtype=dtype)
    self.dense2 = layers.Dense(hidden, hidden, zero_init=True, dtype=dtype)
    self.dropout = dropout

  def __call__(self, h, emb, key=None):
    r = self.dense1(jax.nn.silu(self.norm1(h)))
    scale, shift = jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=-1)
    r = self.norm2(r) * (1 + scale) + shift
    r = layers.dropout(jax.nn.silu(r), self.dropout, key)
    return h + self.dense2(r)


class MLP(nnx.Module):
  """__call__(z, logsnr, labels) -> eps with z: [N, dim]; eps float32 [N, dim].

  The λ embedding is sinusoid(1000·t) of width `hidden` -> Dense -> SiLU -> Dense,
  all of width `hidden`; the class table has num_classes + 1 rows (last = ∅).
  """

  def __init__(self, config: MLPConfig, *, rngs: nnx.Rngs):
    config.validate()
    dtype = layers.parse_dtype(config.dtype)
    hidden, dropout = config.hidden, config.dropout
    self.dim, self.num_classes, self.dropout = config.dim, config.num_classes, dropout
    self.noise_embed = layers.NoiseEmbedding(hidden, hidden)
    self.class_embed = layers.ClassEmbedding(config.num_classes, hidden)
    self.dense_in = layers.Dense(config.dim, hidden, dtype=dtype)
    self.blocks = nnx.List([
        MLPBlock(hidden, hidden, dropout=dropout, dtype=dtype)
        for _ in range(config.num_blocks)])
    self.norm_out = layers.GroupNorm(hidden, 1, dtype=jnp.float32)
    self.dense_out = layers.Dense(hidden, config.dim, zero_init=True)
    layers.initialize(self, rngs)

  def __call__(self, z, logsnr, labels, *, train=False, rngs=None):
    """z: [N, dim], logsnr: [N] or scalar, labels: [N] int in [0, num_classes]."""
    if z.ndim != 2 or z.shape[1] != self.dim:
      raise ValueError(f"z must have shape [N, {self.dim}]; got {z.shape}.")
    logsnr, labels = layers.broadcast_inputs(z, logsnr, labels)
    key = layers.dropout_key(train, self.dropout, rngs)
    emb = self.noise_embed(logsnr) + self.class_embed(labels)
    h = self.dense_in(z)
    for i, block in enumerate(self.blocks):
      h = block(h, emb, None if key is None else jax.random.fold_in(key, i))
    h = jax.nn.silu(self.norm_out(h))
    return self.dense_out(h).astype(jnp.float32)
