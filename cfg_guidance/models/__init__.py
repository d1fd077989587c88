"""The networks: `create(model_config, *, rngs)` builds the one the config names.

ε-prediction networks (the U-Net, the toy MLP) and the noisy classifier of classifier
guidance (`encoder.EncoderUNet`). Each model declares its fields once, as a dataclass
(`unet.UNetConfig`, `mlp.MLPConfig`, `encoder.EncoderUNetConfig`): the presets, the
validation and the constructor all read that declaration.
"""

import dataclasses
import functools
import typing

from flax import nnx

from cfg_guidance.models import encoder
from cfg_guidance.models import mlp
from cfg_guidance.models import unet

# Config `name` -> (module class, its field declaration).
MODELS = {"unet": (unet.UNet, unet.UNetConfig), "mlp": (mlp.MLP, mlp.MLPConfig),
          "encoder_unet": (encoder.EncoderUNet, encoder.EncoderUNetConfig)}
# Models of p(c | z_λ), called as model(z, logsnr) -> logits: trained with cross-entropy.
CLASSIFIERS = ("encoder_unet",)


def _check_type(name, value, annotation):
  """Raises ValueError unless `value` has the declared type (tuples: of that type)."""
  if typing.get_origin(annotation) is tuple:
    item = typing.get_args(annotation)[0]
    ok = isinstance(value, tuple) and all(_is(v, item) for v in value)
    expected = f"a tuple of {item.__name__}"
  else:
    ok, expected = _is(value, annotation), annotation.__name__
  if not ok:
    raise ValueError(f"config.model.{name}={value!r} must be {expected}.")


def _is(value, kind):
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def parse_config(model_config):
  """A validated field declaration from a ConfigDict or dict: (class, fields).

  Raises ValueError naming `config.model.<field>` for an unknown model, an unknown or
  missing field, a value of the wrong type, or one the model cannot build.
  """
  cfg = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} must be one of {sorted(MODELS)}.")
  cls, declaration = MODELS[name]
  hints = typing.get_type_hints(declaration)
  unknown = sorted(set(cfg) - set(hints))
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown} for {name!r}; known: "
                     f"{sorted(hints)}.")
  # Sequences arrive as lists from JSON (a saved run's config) and some config paths.
  cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  for field, value in cfg.items():
    _check_type(field, value, hints[field])
  fields = declaration(**cfg)
  fields.validate()  # Here rather than inside create's jit trace, for a clean traceback.
  return cls, fields


def to_config_dict(fields) -> dict:
  """A field declaration as `config.model`'s dict: {"name": ..., **fields}."""
  name, = [n for n, (_, d) in MODELS.items() if type(fields) is d]
  return {"name": name, **dataclasses.asdict(fields)}


def is_classifier(model_config) -> bool:
  """Whether config.model is a noisy classifier (CLASSIFIERS) rather than an ε-network."""
  return model_config["name"] in CLASSIFIERS


def create(model_config, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the configured model with parameters initialised inside one jit.

  model_config: ConfigDict or dict with `name` (a key of MODELS) and that model's
  fields. An ε-network is called as `model(z, logsnr, labels, *, train, rngs) -> eps`, a
  classifier (CLASSIFIERS) as `model(z, logsnr, *, train, rngs) -> logits`.
  """
  cls, fields = parse_config(model_config)
  return _jitted_init(cls, fields)(rngs)


@functools.cache
def _jitted_init(cls, fields):
  """One compiled initialiser per distinct (hashable, frozen) field declaration."""
  return nnx.jit(lambda rngs: cls(fields, rngs=rngs))
