"""Model presets (`config.model = adm.imagenet64()` etc.): the paper's two ADM U-Nets
(Dhariwal & Nichol 2021, Table 11 hyper-parameters) and small ones for CPU runs."""

import ml_collections


def _unet(**fields) -> ml_collections.ConfigDict:
  """Every U-Net field, ADM's defaults overridden by `fields`."""
  model = ml_collections.ConfigDict()
  model.name = "unet"  # unet | mlp
  model.num_classes = 1000  # Real classes; label num_classes is the null token ∅.
  model.image_size = 64  # Input side H = W.
  model.channels = 3  # Input/output channels (3 RGB, 1 grey).
  model.base_channels = 192  # C: width of the first level; embeddings are 4C wide.
  model.channel_mult = (1, 2, 3, 4)  # Width multiplier per level (one level per 2x).
  model.num_res_blocks = 3  # Residual blocks per level (the decoder has one more).
  model.attention_resolutions = (32, 16, 8)  # Resolutions with self-attention.
  model.num_heads = -1  # Attention heads (-1: use num_head_channels).
  model.num_head_channels = 64  # Channels per head (-1: use num_heads).
  model.num_groups = 32  # GroupNorm groups; must divide every level's width.
  model.dropout = 0.1  # Dropout rate inside residual blocks.
  model.resblock_updown = True  # BigGAN residual up/down-sampling (else conv resample).
  model.dtype = "float32"  # Compute dtype; parameters, norms, softmax stay float32.
  model.remat = False  # Rematerialise each block in the backward pass.
  # einsum (any device) | cudnn (cuDNN flash attention: CUDA GPU, bfloat16) | xla.
  model.attention_impl = "einsum"
  for name, value in fields.items():
    if name not in model:
      raise ValueError(f"Unknown U-Net field {name!r}.")
    model[name] = value
  return model


def imagenet64() -> ml_collections.ConfigDict:
  """ADM ImageNet 64×64: 295,900,035 parameters (ADM's 296M, ε-only, plus ∅)."""
  return _unet(image_size=64, base_channels=192, channel_mult=(1, 2, 3, 4),
               num_res_blocks=3, attention_resolutions=(32, 16, 8),
               num_heads=-1, num_head_channels=64, dropout=0.1, dtype="bfloat16")


def imagenet128() -> ml_collections.ConfigDict:
  """ADM ImageNet 128×128: 421,523,715 parameters (ADM's 422M, ε-only, plus ∅)."""
  return _unet(image_size=128, base_channels=256, channel_mult=(1, 1, 2, 3, 4),
               num_res_blocks=2, attention_resolutions=(32, 16, 8),
               num_heads=4, num_head_channels=-1, dropout=0.0, dtype="bfloat16")


def cpu_unet() -> ml_collections.ConfigDict:
  """A 32×32×3 ADM-style U-Net small enough to train and benchmark on a CPU."""
  return _unet(num_classes=10, image_size=32, base_channels=64, channel_mult=(1, 2, 2),
               num_res_blocks=2, attention_resolutions=(16, 8), num_heads=-1,
               num_head_channels=32, dropout=0.1)


def cifar10() -> ml_collections.ConfigDict:
  """CIFAR-10 32×32: DDPM's CIFAR layout (C=128, attention at 16) with ADM's blocks."""
  return _unet(num_classes=10, image_size=32, base_channels=128,
               channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
               num_heads=-1, num_head_channels=64, dropout=0.1)


def digits() -> ml_collections.ConfigDict:
  """scikit-learn's 8×8 grey digits: two levels (8, 4), attention at 4, C = 32.

  Small enough to train in minutes on a 2-core CPU (3000 steps of batch 64).
  """
  return _unet(num_classes=10, image_size=8, channels=1, base_channels=32,
               channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               num_heads=-1, num_head_channels=32, num_groups=8, dropout=0.1)


def toy_mlp() -> ml_collections.ConfigDict:
  """The residual MLP for the paper's 2-D toy problem (Fig. 2), three classes."""
  model = ml_collections.ConfigDict()
  model.name = "mlp"  # unet | mlp
  model.num_classes = 3  # Real classes; label num_classes is the null token ∅.
  model.dim = 2  # Point dimension.
  model.hidden = 256  # Width of the residual stream and of the embeddings.
  model.num_blocks = 3  # Residual MLP blocks.
  model.dropout = 0.0  # Dropout rate inside the blocks.
  model.dtype = "float32"  # Compute dtype; parameters and norms stay float32.
  return model
