"""ImageNet 128×128 as in the paper (Table 2): ADM model, batch 256, 2.7M steps, v = 0.2.

  python -m cfg_guidance.main --config=configs/imagenet128.py --workdir=gs://BUCKET/in128
"""

from configs import adm, default


def get_config():
  config = default.get_config()
  config.data.name = "imagenet2012"
  config.data.image_size = 128
  config.model = adm.imagenet128()
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0
  config.diffusion.p_uncond = 0.1
  t = config.train
  t.num_steps = 2_700_000
  t.batch_size = 256
  t.optimizer = "adam"
  t.learning_rate = 1e-4
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
  config.sample.v = 0.2
  config.eval.num_steps = 256
  config.eval.num_samples = 50_000
  return config
