"""Sample grids of the EMA model: classes across, guidance weights down (Figs. 6–8)."""

from typing import Any, Callable, Sequence

from etils import epath
import jax
import ml_collections
import numpy as np

from cfg_guidance import images, sampling


def grid_layout(classes: Sequence[int], weights: Sequence[float], per_class: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(labels [n], weights [n]) for rows = weight × per_class, columns = classes."""
  classes = np.asarray(classes, np.int32)
  rows = len(weights) * per_class
  labels = np.tile(classes, rows)
  w = np.repeat(np.asarray(weights, np.float32), per_class * len(classes))
  return labels, w


def sampler_kwargs(config: ml_collections.ConfigDict, section: ml_collections.ConfigDict
                   ) -> dict:
  """Keyword arguments of `sampling.sample` from the config."""
  return dict(null_label=config.model.num_classes, sampler=section.sampler, v=section.v,
              logsnr_min=config.diffusion.logsnr_min,
              logsnr_max=config.diffusion.logsnr_max,
              clip_x=section.clip_x, **({"eta": section.eta} if section.sampler == "ddim"
                                         else {}))


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  return (config.model.image_size, config.model.image_size, config.model.channels)


def can_render(config: ml_collections.ConfigDict) -> bool:
  return config.model.name == "unet"


def render(samples: np.ndarray, num_cols: int) -> np.ndarray:
  """[-1, 1] samples → one uint8 grid, enlarged so that small images stay visible."""
  grid = images.make_grid(images.to_uint8(samples), num_cols)
  return images.upscale(grid, max(1, 32 // samples.shape[1]))


def write_training_grid(config: ml_collections.ConfigDict, workdir: epath.Path, writer,
                        eps_fn: Callable, ema_params: Any, step: int) -> None:
  """EMA samples for `config.grid` at a fixed seed → TensorBoard and workdir/grids/."""
  g = config.grid
  labels, w = grid_layout(g.classes, g.guidance_weights, g.samples_per_class)
  kwargs = sampler_kwargs(config, config.sample)
  x = sampling.sample(jax.tree_util.Partial(eps_fn, ema_params), jax.random.key(g.seed),
                      labels, shape=image_shape(config), guidance_weight=w,
                      num_steps=g.num_steps, **kwargs)
  grid = render(np.asarray(jax.device_get(x)), len(g.classes))
  writer.write_images(step, {"ema_samples": grid[None]})
  if jax.process_index() == 0:
    images.save_png(workdir / "grids" / f"step_{step:08d}.png", grid)
