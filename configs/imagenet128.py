"""ImageNet 128×128 as in the paper (Table 2): ADM model, batch 256, 2.7M steps, v = 0.2.

The ImageNet 64×64 settings (configs/imagenet64.py) with the 128×128 model, batch, learning
rate, length and sampler variance.

  python -m cfg_guidance.main --config=configs/imagenet128.py --workdir=gs://BUCKET/in128
"""

from configs import adm, imagenet64


def get_config():
  config = imagenet64.get_config("0.1")
  config.data.image_size = 128
  config.model = adm.imagenet128()
  config.train.num_steps = 2_700_000
  config.train.batch_size = 256
  config.train.learning_rate = 1e-4
  config.sample.v = 0.2
  return config
