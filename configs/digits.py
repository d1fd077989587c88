"""The embedded default: scikit-learn's 8×8 digits, trained on a laptop CPU in minutes.

  python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits

Classifier guidance's noisy classifier, into /tmp/cfg_digits/noisy_classifier (about two
minutes on 2 cores; longer with --config.classifier.train.num_steps=...):

  python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits \
      --mode=train_classifier
"""

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config():
  config = config_lib.get_config()
  config.data.name = "digits"
  config_lib.use_model(config, presets.digits())
  config.diffusion.p_uncond = 0.1
  t = config.train
  t.num_steps = 3000
  t.batch_size = 64
  t.learning_rate = 2e-3
  t.warmup_steps = 200
  t.ema_decay = 0.999
  t.ema_warmup = True
  t.log_every = 100
  t.checkpoint_every = 1000
  t.sample_every = 1000
  t.sample_at_end = True
  t.evaluate_at_end = True
  config.grid.num_steps = 128
  s = config.sample
  s.guidance_weights = (0.0, 0.5, 1.0, 2.0, 4.0)
  s.num_samples = 100
  s.num_steps = 128
  s.v = 0.3
  config.eval.extractor = "classifier"
  config.eval.guidance_weights = (0.0, 0.5, 1.0, 2.0, 4.0)
  config.eval.num_samples = 500
  config.eval.num_steps = 64
  config_lib.use_classifier(config, presets.digits_classifier())
  c = config.classifier.train
  c.num_steps = 1500
  c.batch_size = 64
  c.learning_rate = 2e-3
  c.warmup_steps = 100
  c.log_every = 100
  c.checkpoint_every = 500
  return config
