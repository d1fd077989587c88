"""What the model tests share: a jitted forward, a created model's split, seeded init."""

import functools

from flax import nnx
import jax
import numpy as np

from cfg_guidance import models


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def forward(graphdef, params, z, logsnr, labels, key, train=False):
  model = nnx.merge(graphdef, params)
  return model(z, logsnr, labels, train=train, rngs=nnx.Rngs(dropout=key))


def split(config, seed=0):
  """(graphdef, params as a plain nested dict) of a created model."""
  graphdef, params = nnx.split(models.create(config, rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, params.to_pure_dict()


def assert_seeded_init(config, params):
  """`params` (seed 0) are rebuilt by seed 0, and every random leaf differs for seed 1."""
  again, other = split(config, seed=0)[1], split(config, seed=1)[1]
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(again),
                     jax.tree.leaves(other)):
    np.testing.assert_array_equal(a, b)
    if np.asarray(a).std() > 0:
      assert not np.array_equal(a, c)
