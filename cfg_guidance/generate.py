"""--mode=sample: EMA samples of a checkpoint for each configured guidance weight.

Writes `workdir/samples/step_<S>_w<w>.npz` with `images` (uint8 [N, H, W, C]), `labels`
([N]) and `guidance_weight` ([N]), and a PNG grid beside each.
"""

import logging

from etils import epath
import jax
import ml_collections
import numpy as np

from cfg_guidance import config_checks, grids, images, sampling, toy, train


def balanced_labels(num: int, num_classes: int, classes=None) -> np.ndarray:
  """Labels cycling through `classes` (default: every class), class-balanced."""
  classes = np.arange(num_classes) if classes is None else np.asarray(classes)
  bad = classes[(classes < 0) | (classes >= num_classes)]
  if bad.size:
    raise ValueError(f"config.sample.classes has {bad.tolist()}, outside "
                     f"[0, {num_classes - 1}].")
  return np.resize(classes, num).astype(np.int32)


def generate(config: ml_collections.ConfigDict, eps_fn, params, *, weight: float,
             labels: np.ndarray, seed: int) -> np.ndarray:
  """Samples in [-1, 1] for `labels` at guidance `weight`, in batches of sample.batch_size.

  Batch b uses `fold_in(key(seed), b)`, so results do not depend on which call made them.
  """
  s = config.sample
  kwargs = grids.sampler_kwargs(config, s)
  out = []
  for b, start in enumerate(range(0, len(labels), s.batch_size)):
    lab = labels[start:start + s.batch_size]
    n = len(lab)
    lab = np.resize(lab, min(s.batch_size, len(labels)))  # Pad: one compiled program.
    x = sampling.sample(jax.tree_util.Partial(eps_fn, params),
                        jax.random.fold_in(jax.random.key(seed), b), lab,
                        shape=grids.image_shape(config), guidance_weight=weight,
                        num_steps=s.num_steps, **kwargs)
    out.append(np.asarray(jax.device_get(x))[:n])
  return np.concatenate(out)


def toy_figure(config: ml_collections.ConfigDict, workdir: str, step: int, eps_fn
               ) -> epath.Path:
  """Fig. 2 with the learned model's samples under the exact model's (toy2d only)."""
  path = epath.Path(workdir) / "samples" / f"step_{step}_fig2.png"
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    toy.render_figure(path, weights=config.sample.guidance_weights,
                      eps_fns={"exact scores": toy.exact_eps, "learned": eps_fn},
                      num_per_class=config.sample.num_samples // toy.NUM_CLASSES,
                      num_steps=config.sample.num_steps, seed=config.sample.seed,
                      v=config.sample.v, logsnr_min=config.diffusion.logsnr_min,
                      logsnr_max=config.diffusion.logsnr_max)
    logging.info("Wrote %s.", path)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> list[epath.Path]:
  """Writes one npz (and PNG grid) per weight in config.sample.guidance_weights."""
  config_checks.check_common(config)
  config_checks.check_sampler(config.sample, "sample")
  step, graphdef, ema = train.restore_ema_params(config, workdir, config.sample.step)
  eps_fn = train.make_eps_fn(graphdef, config.diffusion.parameterization)
  if config.data.name == "toy2d":
    return [toy_figure(config, workdir, step, jax.tree_util.Partial(eps_fn, ema))]
  labels = balanced_labels(config.sample.num_samples, config.model.num_classes,
                           config.sample.classes)
  out_dir = epath.Path(workdir) / "samples"
  written = []
  for w in config.sample.guidance_weights:
    x = generate(config, eps_fn, ema, weight=w, labels=labels, seed=config.sample.seed)
    if jax.process_index() != 0:
      continue
    path = out_dir / f"step_{step}_w{w:g}.npz"
    images.save_npz(path, images=images.to_uint8(x), labels=labels,
                    guidance_weight=np.full(len(labels), w, np.float32))
    num_cols = min(len(labels), 10 if config.sample.classes is None
                   else len(config.sample.classes))
    images.save_png(path.with_suffix(".png"), grids.render(x[:100], num_cols))
    logging.info("Wrote %s (%d samples, w=%g).", path, len(labels), w)
    written.append(path)
  return written
