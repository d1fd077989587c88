"""ImageNet 128×128 as in the paper (Table 2): ADM model, batch 256, 2.7M steps, v = 0.2.

The ImageNet 64×64 settings (configs/imagenet64.py) with the 128×128 model, batch, learning
rate, length and sampler variance; random flips and the departures from ADM that its
docstring lists (warm-up, gradient clipping, T = 256, the final step) carry over.

  python -m cfg_guidance.main --config=configs/imagenet128.py --workdir=gs://BUCKET/in128
"""

import os

from cfg_guidance import config as config_lib
from cfg_guidance.models import presets


def get_config():
  config = config_lib.load_file(os.path.join(os.path.dirname(__file__), "imagenet64.py"))
  config_lib.use_model(config, presets.imagenet128())
  config.train.num_steps = 2_700_000
  config.train.batch_size = 256
  config.train.learning_rate = 1e-4
  config.sample.v = 0.2
  return config
