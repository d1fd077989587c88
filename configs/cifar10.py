"""CIFAR-10 32×32: a mid-sized U-Net between the digits demo and the ImageNet models.

  python -m cfg_guidance.main --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10
"""

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config():
  config = config_lib.get_config()
  config.data.name = "cifar10"
  config.data.random_flip = True
  config_lib.use_model(config, presets.cifar10())
  config.diffusion.p_uncond = 0.1
  t = config.train
  t.num_steps = 400_000
  t.batch_size = 512
  t.learning_rate = 2e-4
  t.warmup_steps = 5000
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 10_000
  t.sample_every = 10_000
  config.sample.num_steps = 256
  config.sample.v = 0.3
  config.eval.num_steps = 256
  return config
