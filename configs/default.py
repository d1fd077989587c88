"""Every field at its default (declared, with its meaning, in cfg_guidance/config.py).

Not meant to be run as is: pick a data set config, e.g.
  python -m cfg_guidance.main --config=configs/digits.py --workdir=/tmp/cfg_digits
"""

from cfg_guidance import config as config_lib


def get_config():
  return config_lib.get_config()
