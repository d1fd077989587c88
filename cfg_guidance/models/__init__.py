"""ε-prediction networks: `create(model_config, *, rngs)` builds the one the config names."""

import functools
import inspect

from flax import nnx

from cfg_guidance.models import mlp
from cfg_guidance.models import unet

MLP = mlp.MLP
UNet = unet.UNet

# Config `name` -> (module class, its config check); the other config fields are the
# class's keyword arguments.
MODELS = {"unet": (UNet, unet.check_config), "mlp": (MLP, mlp.check_config)}


def _fields(check):
  """(all, required) config fields: the keyword arguments of the model's check."""
  params = inspect.signature(check).parameters
  names = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
  required = {n for n in names if params[n].default is inspect.Parameter.empty}
  return names, required


def config_kwargs(model_config):
  """Checks a model config (ConfigDict or dict); returns (class, constructor kwargs)."""
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict")
             else model_config)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"model.name={name!r}: expected one of {sorted(MODELS)}.")
  cls, check = MODELS[name]
  names, required = _fields(check)
  unknown = sorted(set(cfg) - names)
  if unknown:
    raise ValueError(f"model config for {name!r} has unknown fields {unknown}; "
                     f"known: {sorted(names)}.")
  missing = sorted(required - set(cfg))
  if missing:
    raise ValueError(f"model config for {name!r} lacks required fields {missing}.")
  # Sequences arrive as lists from some config paths; modules keep them as tuples.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  check(**kwargs)  # Here rather than inside create's jit trace, for a clean traceback.
  return cls, kwargs


def create(model_config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the configured model with parameters initialised inside one jit.

  model_config: ConfigDict or dict with `name` ("unet" | "mlp") and that model's
  fields. The model is called as `model(z, logsnr, labels, *, train, rngs) -> eps`.
  """
  cls, kwargs = config_kwargs(model_config)
  return _jitted_init(cls, tuple(sorted(kwargs.items())))(rngs)


@functools.cache
def _jitted_init(cls, kwargs):
  """One compiled initialiser per distinct config (kwargs: sorted (name, value) pairs)."""
  return nnx.jit(lambda rngs: cls(**dict(kwargs), rngs=rngs))
