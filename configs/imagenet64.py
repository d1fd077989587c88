"""ImageNet 64×64 as in the paper (Table 1): ADM model, batch 2048, 400k steps.

p_uncond variants: --config=configs/imagenet64.py:0.2 (or :0.5); default 0.1.

  python -m cfg_guidance.main --config=configs/imagenet64.py --workdir=gs://BUCKET/in64

The paper defers to ADM (Dhariwal & Nichol 2021) for what it does not state; these
settings depart from ADM or the paper:
  - train.warmup_steps = 1000 (ADM: none; the paper is silent): a linear ramp to the
    peak learning rate, so that Adam's first, poorly estimated steps at 3e-4 cannot
    upset a fresh 296M-parameter bfloat16 network; 0.25% of the run.
  - train.grad_clip_norm = 1.0 (ADM: no clipping; the paper is silent): a guard against
    rare loss spikes in bfloat16 without ADM's fp16 loss scaling; 0 turns it off.
  - T = 256 sampler steps (the paper's Tables 1-2; ADM samples 250 respaced steps of a
    1000-step discrete chain): the paper's continuous-time sampler at λ from u = 1 to 0.
  - The final step: the sample is x̃ = x_θ(z_λmax) at λmax = 20 (the paper, §2), clipped
    to [-1, 1] (sample.clip_x = "static", as ADM's clip_denoised); ADM returns its last
    posterior mean instead.
data.random_flip = True is ADM's (load_data(random_flip=True)); the paper is silent.

Classifier guidance's noisy classifier (--mode=train_classifier, into
WORKDIR/noisy_classifier) is ADM's 64×64 one (classifier_width 128, depth 4, attention at
32, 16, 8, attention pooling), trained with the classifier flags ADM publishes (for its
128×128 classifier: batch 256, AdamW 3e-4, weight decay 0.05, 300k steps, no EMA). ADM
anneals that rate linearly to 0 (anneal_lr) and crops at random; here the rate is
constant after the diffusion model's warm-up, and images are flipped, not cropped.
"""

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config(p_uncond: str = "0.1"):
  config = config_lib.get_config()
  config.data.name = "imagenet2012"
  config.data.random_flip = True
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
  config_lib.use_classifier(config, presets.imagenet64_classifier())
  c = config.classifier.train
  c.num_steps = 300_000
  c.batch_size = 256  # AdamW, weight decay 0.05, no EMA: config.classifier's defaults.
  c.learning_rate = 3e-4
  c.warmup_steps = 1000
  c.log_every = 100
  c.checkpoint_every = 10_000
  return config
