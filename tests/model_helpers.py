"""What the model tests share: a jitted forward and a created model's split."""

import functools

from flax import nnx
import jax

from cfg_guidance import models


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def forward(graphdef, params, z, logsnr, labels, key, train=False):
  model = nnx.merge(graphdef, params)
  return model(z, logsnr, labels, train=train, rngs=nnx.Rngs(dropout=key))


def split(config, seed=0):
  """(graphdef, params as a plain nested dict) of a created model."""
  graphdef, params = nnx.split(models.create(config, rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, params.to_pure_dict()
