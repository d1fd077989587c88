"""ImageNet 64×64 as in the paper (Table 1): ADM model, batch 2048, 400k steps.

p_uncond variants: --config=configs/imagenet64.py:0.2 (or :0.5); default 0.1.

  python -m cfg_guidance.main --config=configs/imagenet64.py --workdir=gs://BUCKET/in64
"""

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config(p_uncond: str = "0.1"):
  config = config_lib.get_config()
  config.data.name = "imagenet2012"
  config.data.random_flip = False
  config_lib.use_model(config, presets.imagenet64())
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0
  config.diffusion.p_uncond = float(p_uncond)
  t = config.train
  t.num_steps = 400_000
  t.batch_size = 2048
  t.optimizer = "adam"
  t.learning_rate = 3e-4
  t.warmup_steps = 1000
  t.grad_clip_norm = 1.0
  t.ema_decay = 0.9999
  t.log_every = 100
  t.checkpoint_every = 5000
  t.sample_every = 10_000
  config.sharding.fsdp = True
  config.grid.classes = (1, 9, 130, 207, 249, 279, 291, 388, 417, 980)
  config.grid.num_steps = 256
  config.sample.num_steps = 256
  config.sample.v = 0.3
  config.sample.classes = None
  config.eval.num_steps = 256
  config.eval.num_samples = 50_000
  return config
