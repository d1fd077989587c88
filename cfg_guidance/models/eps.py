"""From network to ε: the graph definition, applying parameters, the output's meaning.

The network predicts ε (the paper) or v (Salimans & Ho 2022, `diffusion.parameterization`);
samplers always receive ε. A noisy classifier's output is its logits (`make_logits_fn`).
Parameters are plain nested dicts outside every jit boundary, so Orbax and shardings see
arrays and the graph definition stays static.
"""

import functools
from typing import Any, Callable

from flax import nnx
import jax

from cfg_guidance import diffusion
from cfg_guidance import models

PARAMETERIZATIONS = ("eps", "v")


def graphdef(model_config) -> nnx.GraphDef:
  """The network's static structure, built without allocating parameters."""
  abstract = nnx.eval_shape(lambda: models.create(model_config, rngs=nnx.Rngs(0)))
  return nnx.split(abstract, nnx.Param)[0]


def abstract_params(model_config) -> Any:
  """ShapeDtypeStructs of the parameters, as a nested dict."""
  abstract = nnx.eval_shape(lambda: models.create(model_config, rngs=nnx.Rngs(0)))
  return nnx.state(abstract, nnx.Param).to_pure_dict()


def init_params(model_config, rng: jax.Array) -> Any:
  """Freshly initialised parameters (nested dict of float32 arrays); jit it."""
  model = models.create(model_config, rngs=nnx.Rngs(params=rng))
  return nnx.state(model, nnx.Param).to_pure_dict()


def apply(graphdef: nnx.GraphDef, params: Any, *inputs: jax.Array, train: bool = False,
          dropout_rng: jax.Array | None = None) -> jax.Array:
  """The network's raw output on `inputs`: (z, logsnr, labels) -> ε or v (per the
  parameterization); for a classifier, (z, logsnr) -> logits."""
  model = nnx.merge(graphdef, params)
  rngs = nnx.Rngs(dropout=dropout_rng) if dropout_rng is not None else None
  return model(*inputs, train=train, rngs=rngs)


def output_to_eps(output, z, logsnr, parameterization: str):
  """ε from the network output: itself for ε-prediction, ε = σ z + α v for v."""
  if parameterization == "eps":
    return output
  return diffusion.predict_eps_from_v(z, output, logsnr)


@functools.cache
def make_eps_fn(graphdef: nnx.GraphDef, parameterization: str) -> Callable:
  """`eps_fn(params, z, logsnr, labels) -> eps`; bind params with `jax.tree_util.Partial`.

  One function per (graphdef, parameterization): the samplers' compilation caches are
  keyed on it, so new parameters (another checkpoint) reuse the compiled programs.
  """
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"config.diffusion.parameterization={parameterization!r} must be "
                     f"one of {PARAMETERIZATIONS}.")

  def eps_fn(params, z, logsnr, labels):
    return output_to_eps(apply(graphdef, params, z, logsnr, labels), z, logsnr,
                         parameterization)

  return eps_fn


@functools.cache
def make_logits_fn(graphdef: nnx.GraphDef) -> Callable:
  """A classifier's `logits_fn(params, z, logsnr) -> logits [N, num_classes]`; bind
  params with `jax.tree_util.Partial` (one function per graphdef, as make_eps_fn)."""

  def logits_fn(params, z, logsnr):
    return apply(graphdef, params, z, logsnr)

  return logits_fn
