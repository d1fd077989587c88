"""The train state, created already sharded, and the one way to restore it or its EMA.

The state is a plain pytree (parameters as nested dicts); the network's NNX graph
definition stays outside every jit boundary. Sampling needs only the EMA parameters:
`restore_ema` reads those alone, so neither the optimizer's moments nor its config
matter to it.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cfg_guidance.models import eps
from cfg_guidance.runtime import checkpointing, sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken (skipped ones included).
  params: Any  # Nested dict of float32 arrays.
  ema_params: Any  # Same structure: the exponential moving average used for sampling.
  opt_state: Any
  num_nonfinite: jax.Array  # int32 [], updates skipped for a non-finite loss/gradient.
  consecutive_nonfinite: jax.Array  # int32 [], skipped in a row up to this step.


def init(rng: jax.Array, *, model_config, tx: optax.GradientTransformation) -> TrainState:
  params = eps.init_params(model_config, rng)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=params,
                    opt_state=tx.init(params), num_nonfinite=zero,
                    consecutive_nonfinite=zero)


def _shardings(abstract: Any, mesh, sharding_config) -> Any:
  return sharding.param_shardings(abstract, mesh, fsdp=sharding_config.fsdp,
                                  min_size=sharding_config.fsdp_min_size)


def create(model_config, sharding_config, *, seed: int, mesh,
           tx: optax.GradientTransformation) -> tuple[TrainState, Any]:
  """(state, its shardings): shapes → shardings → a jitted init that creates it sharded.

  sharding_config: config.sharding (fsdp, fsdp_min_size).
  """
  fn = functools.partial(init, model_config=model_config, tx=tx)
  rng = jax.random.fold_in(jax.random.key(seed), 0)
  shardings = _shardings(jax.eval_shape(fn, rng), mesh, sharding_config)
  return jax.jit(fn, out_shardings=shardings)(rng), shardings


def restore(ckpt: checkpointing.Checkpointer, state: TrainState
            ) -> tuple[int, TrainState, dict]:
  """(step, state, data-iterator state) of the newest readable checkpoint, laid out
  (shapes, dtypes, shardings) as `state`."""
  return ckpt.restore(checkpointing.abstract_like(state))


def restore_ema(ckpt: checkpointing.Checkpointer, model_config, sharding_config, *,
                mesh, step: int | None = None) -> tuple[int, Any, dict]:
  """(step, EMA parameters, the run's saved config as a dict) of checkpoint `step`.

  None: the newest readable one. The parameters are sharded as training shards them.
  """
  abstract = eps.abstract_params(model_config)
  shardings = _shardings(abstract, mesh, sharding_config)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return ckpt.restore_subtree("ema_params", abstract, step=step)
