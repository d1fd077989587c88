"""--mode=sample: a checkpoint's EMA samples for each guidance weight of config.sample.

Writes `workdir/samples/step_<S>_w<w>.npz` with `images` (uint8 [N, H, W, C]), `labels`
([N]) and `guidance_weight` ([N]), and a PNG grid beside each; for the 2-D toy problem,
Fig. 2 with the learned model's samples under the exact model's.
"""

import logging

from etils import epath
import jax
import ml_collections
import numpy as np

from cfg_guidance import api, files, generate, images, toy
from cfg_guidance import config as config_lib
from cfg_guidance.data import toy2d


def run(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[epath.Path]:
  """Writes one npz (and PNG grid) per weight in config.sample.guidance_weights."""
  config_lib.check_sample(config)
  s = config.sample
  model = api.load(workdir, s.step, mesh=mesh)
  config_lib.check_same_model(config, model.config, str(model.path))
  settings = generate.settings_from_config(config, num_steps=s.num_steps)
  out_dir = epath.Path(workdir) / "samples"
  if config.data.name == "toy2d":
    path = out_dir / f"step_{model.step}_fig2.png"
    toy.render_figure(path, weights=s.guidance_weights,
                      eps_fns={"exact scores": toy2d.exact_eps, "learned": model.eps_fn},
                      num_per_class=s.num_samples // toy2d.NUM_CLASSES,
                      settings=settings, seed=s.seed)
    logging.info("Wrote %s.", path)
    return [path]
  labels = generate.balanced_labels(s.num_samples, config.model.num_classes, s.classes)
  num_cols = min(len(labels), 10 if s.classes is None else len(s.classes))
  written = []
  for w in s.guidance_weights:
    x = generate.draw(model.eps_fn, labels, w, settings=settings, seed=s.seed,
                      mesh=model.mesh, progress=f"sampling w={w:g}")
    if jax.process_index() != 0:
      continue
    path = out_dir / f"step_{model.step}_w{w:g}.npz"
    pixels = images.to_uint8(x)
    files.save_npz(path, images=pixels, labels=labels,
                   guidance_weight=np.full(len(labels), w, np.float32))
    # ADM's evaluator (guided-diffusion/evaluations) reads np.load(f)["arr_0"], uint8 NHWC.
    files.save_npz(out_dir / "adm" / path.name, arr_0=pixels, arr_1=labels)
    images.save_png(path.with_suffix(".png"), images.render(x[:100], num_cols))
    logging.info("Wrote %s (%d samples, w=%g).", path, len(labels), w)
    written.append(path)
  return written
