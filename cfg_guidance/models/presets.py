"""Model presets (`config.model = presets.imagenet64()` etc.): the paper's two ADM U-Nets
(Dhariwal & Nichol 2021, Table 11 hyper-parameters) and small ones for CPU runs.

Each is a `config.model` section built from the model's field declaration, so every
field is present, with the declaration's defaults where the preset says nothing.
"""

import ml_collections

from cfg_guidance import models
from cfg_guidance.models import encoder, mlp, unet


def _section(fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(models.to_config_dict(fields))


def imagenet64() -> ml_collections.ConfigDict:
  """ADM ImageNet 64×64: 295,900,035 parameters (ADM's 296M, ε-only, plus ∅)."""
  return _section(unet.UNetConfig(image_size=64, base_channels=192,
                                  channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                                  attention_resolutions=(32, 16, 8), num_heads=-1,
                                  num_head_channels=64, dropout=0.1, dtype="bfloat16"))


def imagenet128() -> ml_collections.ConfigDict:
  """ADM ImageNet 128×128: 421,523,715 parameters (ADM's 422M, ε-only, plus ∅)."""
  return _section(unet.UNetConfig(image_size=128, base_channels=256,
                                  channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
                                  attention_resolutions=(32, 16, 8), num_heads=4,
                                  num_head_channels=-1, dropout=0.0, dtype="bfloat16"))


def cpu_unet() -> ml_collections.ConfigDict:
  """A 32×32×3 ADM-style U-Net small enough to train and benchmark on a CPU."""
  return _section(unet.UNetConfig(num_classes=10, image_size=32, base_channels=64,
                                  channel_mult=(1, 2, 2), num_res_blocks=2,
                                  attention_resolutions=(16, 8), num_heads=-1,
                                  num_head_channels=32, dropout=0.1))


def cifar10() -> ml_collections.ConfigDict:
  """CIFAR-10 32×32: DDPM's CIFAR layout (C=128, attention at 16) with ADM's blocks."""
  return _section(unet.UNetConfig(num_classes=10, image_size=32, base_channels=128,
                                  channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                                  attention_resolutions=(16,), num_heads=-1,
                                  num_head_channels=64, dropout=0.1))


def digits() -> ml_collections.ConfigDict:
  """scikit-learn's 8×8 grey digits: two levels (8, 4), attention at 4, C = 32.

  Small enough to train in minutes on a 2-core CPU (3000 steps of batch 64).
  """
  return _section(unet.UNetConfig(num_classes=10, image_size=8, channels=1,
                                  base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(4,), num_heads=-1,
                                  num_head_channels=32, num_groups=8, dropout=0.1))


def imagenet64_classifier() -> ml_collections.ConfigDict:
  """ADM's ImageNet 64×64 noisy classifier, 65,438,568 parameters (guided-diffusion's
  README: classifier_width 128, classifier_depth 4, attention at 32, 16, 8, attention
  pooling, 64-channel heads, scale-shift norm, BigGAN down-sampling)."""
  return _section(encoder.EncoderUNetConfig(dtype="bfloat16"))


def digits_classifier() -> ml_collections.ConfigDict:
  """A noisy classifier for the 8×8 digits: the digits U-Net's encoder half (C = 32)."""
  return _section(encoder.EncoderUNetConfig(
      num_classes=10, image_size=8, channels=1, base_channels=32, channel_mult=(1, 2),
      num_res_blocks=1, attention_resolutions=(4,), num_heads=-1, num_head_channels=32,
      num_groups=8))


def toy_mlp() -> ml_collections.ConfigDict:
  """The residual MLP for the paper's 2-D toy problem (Fig. 2), three classes."""
  return _section(mlp.MLPConfig())
