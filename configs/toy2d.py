"""The paper's Fig. 2: three 2-D Gaussians, one per class, with the MLP denoiser.

  python -m cfg_guidance.main --config=configs/toy2d.py --workdir=/tmp/cfg_toy2d
"""

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config():
  config = config_lib.get_config()
  config.data.name = "toy2d"
  config.data.image_size = 0  # Points, not images.
  config_lib.use_model(config, presets.toy_mlp())
  config.diffusion.p_uncond = 0.1
  # x̃ = (z − σ ε̂)/α multiplies the network's error by 1/α: 22,026 at λ = −20, 148 at
  # −10. Images clip x̃ to [−1, 1]; points have no such range, so the toy keeps λ ≥ −10,
  # where z is already N(0, I) to within α = 0.007 of the data's unit scale.
  config.diffusion.logsnr_min = -10.0
  config.diffusion.logsnr_max = 10.0
  t = config.train
  t.num_steps = 3000
  t.batch_size = 512
  t.learning_rate = 1e-3
  t.warmup_steps = 100
  t.ema_decay = 0.995
  t.log_every = 250
  t.checkpoint_every = 1000
  t.sample_every = 0
  t.sample_at_end = True
  config.grid.classes = (0, 1, 2)
  s = config.sample
  s.clip_x = "none"  # Points, not images: nothing to clip to.
  s.guidance_weights = (0.0, 1.0, 3.0)
  s.num_samples = 3000
  s.num_steps = 256
  s.batch_size = 3000
  return config
