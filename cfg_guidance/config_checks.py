"""Config validation that runs before any compute, with errors naming the field."""

import os
import uuid

from etils import epath
import jax
import ml_collections

DATASETS = ("digits", "toy2d", "cifar10", "imagenet2012", "imagenet_resized", "image_folder")
SAMPLERS = ("ancestral", "ddim")
CLIP_MODES = ("none", "static", "dynamic")


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def check_common(config: ml_collections.ConfigDict) -> None:
  """Fields every mode reads: data, model, diffusion."""
  _require(config.data.name in DATASETS,
           f"config.data.name={config.data.name!r} is not a known data set; choose one of "
           f"{DATASETS}.")
  _require(config.model.num_classes >= 1,
           f"config.model.num_classes={config.model.num_classes} must be at least 1.")
  if config.model.name == "unet":
    _require(config.model.image_size == config.data.image_size,
             f"config.model.image_size={config.model.image_size} must equal "
             f"config.data.image_size={config.data.image_size}.")
  d = config.diffusion
  _require(0.0 <= d.p_uncond <= 1.0,
           f"config.diffusion.p_uncond={d.p_uncond} must lie in [0, 1].")
  _require(d.logsnr_min < d.logsnr_max,
           f"config.diffusion.logsnr_min={d.logsnr_min} must be below "
           f"config.diffusion.logsnr_max={d.logsnr_max}.")
  _require(d.parameterization in ("eps", "v"),
           f"config.diffusion.parameterization={d.parameterization!r} must be 'eps' or 'v'.")


def check_sampler(section: ml_collections.ConfigDict, name: str) -> None:
  _require(section.sampler in SAMPLERS,
           f"config.{name}.sampler={section.sampler!r} must be one of {SAMPLERS}.")
  _require(section.clip_x in CLIP_MODES,
           f"config.{name}.clip_x={section.clip_x!r} must be one of {CLIP_MODES}.")
  _require(0.0 <= section.v <= 1.0, f"config.{name}.v={section.v} must lie in [0, 1].")
  _require(section.num_steps >= 1,
           f"config.{name}.num_steps={section.num_steps} must be at least 1.")


def check_workdir(workdir: str) -> None:
  """The workdir exists or can be made, and a file can be written in it."""
  path = epath.Path(workdir)
  probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable: {e}") from e


def check_train_config(config: ml_collections.ConfigDict, workdir: str,
                       num_devices: int | None = None) -> None:
  """Everything `train.train_and_evaluate` needs, checked before any compute."""
  num_devices = num_devices or jax.device_count()
  check_common(config)
  t = config.train
  _require(t.optimizer in ("adam", "adamw"),
           f"config.train.optimizer={t.optimizer!r} must be 'adam' or 'adamw'.")
  _require(t.num_steps >= 0, f"config.train.num_steps={t.num_steps} must be >= 0.")
  _require(t.batch_size >= 1, f"config.train.batch_size={t.batch_size} must be >= 1.")
  _require(t.batch_size % num_devices == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by the number of "
           f"devices ({num_devices}).")
  _require(t.batch_size % jax.process_count() == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by the number of "
           f"processes ({jax.process_count()}).")
  _require(t.steps_per_dispatch >= 1,
           f"config.train.steps_per_dispatch={t.steps_per_dispatch} must be >= 1.")
  _require(0.0 <= t.ema_decay < 1.0,
           f"config.train.ema_decay={t.ema_decay} must lie in [0, 1).")
  _require(t.learning_rate > 0,
           f"config.train.learning_rate={t.learning_rate} must be positive.")
  _require(t.max_consecutive_nonfinite >= 1,
           f"config.train.max_consecutive_nonfinite={t.max_consecutive_nonfinite} must be "
           ">= 1.")
  check_sampler(config.sample, "sample")
  check_workdir(workdir)
