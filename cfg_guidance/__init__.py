"""cfg_guidance: classifier-free diffusion guidance (Ho & Salimans) in JAX/Flax NNX.

`cfg_guidance.load(workdir)` restores a trained run for sampling (see `api.py`).
"""

__version__ = "0.1.0"


def load(path, step=None, **kwargs):
  """`api.load`: a run's EMA parameters and config, ready to `.sample()`."""
  from cfg_guidance import api  # pylint: disable=g-import-not-at-top
  return api.load(path, step, **kwargs)
