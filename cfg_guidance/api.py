"""A trained run as a Python object: `load(path)`, then `model.sample(labels, ...)`.

  model = cfg_guidance.load("/tmp/cfg_digits")  # a workdir, or one of its checkpoints
  images = model.sample([0, 1, 2], guidance_weight=3.0, seed=0)  # uint8 [3, 8, 8, 1]

`load` restores only what sampling needs: the EMA parameters and the config the run
saved with them (no optimizer state, whatever optimizer trained it). `sample` gives the
same images as `--mode=sample` for the same labels, weight, steps and seed.
`load_classifier` restores classifier guidance's noisy classifier the same way
(`--mode=train_classifier`'s run, WORKDIR/noisy_classifier by default).
"""

import dataclasses
from typing import Any, Sequence

from etils import epath
from flax import nnx
import jax
import ml_collections
import numpy as np

from cfg_guidance import config as config_lib
from cfg_guidance import generate, images, models, state
from cfg_guidance.models import eps
from cfg_guidance.runtime import checkpointing, sharding


@dataclasses.dataclass
class Model:
  """A checkpoint's EMA parameters with the run's config, ready to sample."""
  config: ml_collections.ConfigDict  # The run's config, as saved with the checkpoint.
  step: int  # The checkpoint's training step.
  path: epath.Path  # The checkpoint's directory.
  graphdef: nnx.GraphDef
  params: Any  # The EMA parameters, sharded over `mesh`.
  mesh: jax.sharding.Mesh

  @property
  def eps_fn(self) -> jax.tree_util.Partial:
    """`eps_fn(z, logsnr, labels) -> eps` (ε whatever the network predicts), for
    `sampling.sample` or a custom loop; the parameters are bound as pytree leaves."""
    fn = eps.make_eps_fn(self.graphdef, self.config.diffusion.parameterization)
    return jax.tree_util.Partial(fn, self.params)

  def settings(self, num_steps: int | None = None, **sampler_options
               ) -> generate.Settings:
    """The sampler of the run's config.sample, with `num_steps` (default
    sample.num_steps) and any `generate.Settings` field overridden."""
    num_steps = self.config.sample.num_steps if num_steps is None else num_steps
    settings = generate.settings_from_config(self.config, num_steps=num_steps)
    unknown = sorted(set(sampler_options) - {f.name for f in dataclasses.fields(settings)})
    if unknown:
      raise TypeError(f"unknown sampler options {unknown}; known: "
                      f"{[f.name for f in dataclasses.fields(settings)]}.")
    return settings.replace(**sampler_options)

  def sample(self, labels: Sequence[int], *, guidance_weight, num_steps: int | None = None,
             seed: int = 0, negative_labels=None, negative_eps_fn=None,
             classifier_fn=None, **sampler_options) -> np.ndarray:
    """Samples with classifier-free guidance, example i from fold_in(key(seed), i).

    Args:
      labels: [N] class labels (num_classes = ∅, unconditional).
      guidance_weight: w, a scalar or [N]; ε̃ = (1 + w) ε(z, c) − w ε(z, ∅).
      num_steps: T (default: the run's sample.num_steps).
      seed: the sampling seed.
      negative_labels: the negative branch's labels, scalar or [N] (default ∅).
      negative_eps_fn: guidance="autoguidance"'s weak model (another `load(...).eps_fn`).
      classifier_fn: guidance="classifier"'s noisy classifier
        (`load_classifier(...).classifier_fn`).
      **sampler_options: `generate.Settings` fields, e.g. sampler="ddim", v=0.2,
        clip_x="dynamic", batch_size=256, guidance_interval=(-5.0, 5.0),
        guidance="apg", guidance_params={"eta": 0.0, "momentum": -0.5}.

    Returns:
      uint8 [N, H, W, C] images; for a point model (the toy MLP), float32 [N, dim].
    """
    settings = self.settings(num_steps, **sampler_options)
    x = generate.draw(self.eps_fn, labels, guidance_weight, settings=settings, seed=seed,
                      negative_labels=negative_labels, negative_eps_fn=negative_eps_fn,
                      classifier_fn=classifier_fn, mesh=self.mesh)
    return images.to_uint8(x) if len(settings.shape) == 3 else x


def _checkpoint_location(path) -> tuple[epath.Path, int | None]:
  """(workdir, step or None) of a workdir or of one checkpoint directory in it."""
  path = epath.Path(path)
  if (path / "checkpoints").is_dir():
    return path, None
  if path.name.isdigit() and path.parent.name == "checkpoints":
    return path.parent.parent, int(path.name)
  raise FileNotFoundError(f"{path} is neither a run's workdir (with checkpoints/) nor one "
                          "of its checkpoints (workdir/checkpoints/<step>).")


def _restore(path, step, mesh, *, classifier: bool) -> dict:
  """The fields of a Model or Classifier: a run's config and EMA parameters."""
  workdir, named = _checkpoint_location(path)
  if step is not None and named is not None and step != named:
    raise ValueError(f"step={step} but path names checkpoint {named}: {path}.")
  step = named if step is None else step
  mesh = mesh or sharding.create_mesh()
  ckpt = checkpointing.Checkpointer(workdir, create=False)
  config = config_lib.from_dict(ckpt.read_config(step))
  holds_classifier = models.is_classifier(config.model)
  if holds_classifier != classifier:
    kind, loader = (("a noisy classifier", "load_classifier") if holds_classifier
                    else ("a diffusion model", "load"))
    raise ValueError(f"{path} holds {kind} (config.model.name={config.model.name!r}): "
                     f"load it with cfg_guidance.api.{loader}.")
  step, params, saved = state.restore_ema(ckpt, config.model, config.sharding, mesh=mesh,
                                          step=step)
  config = config_lib.from_dict(saved)
  return dict(config=config, step=step, path=ckpt.step_path(step),
              graphdef=eps.graphdef(config.model), params=params, mesh=mesh)


def load(path, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None) -> Model:
  """Restores a run's EMA parameters and config for sampling.

  Args:
    path: a training run's workdir (local or gs://), or one of its checkpoints
      (workdir/checkpoints/<step>).
    step: the checkpoint to restore; None: the one `path` names, else the newest that
      can be read.
    mesh: where the parameters go (default: every device, one `data` axis); they are
      sharded as training shards them (config.sharding).
  """
  return Model(**_restore(path, step, mesh, classifier=False))


@dataclasses.dataclass
class Classifier:
  """A noisy classifier's parameters with its run's config (`classifier_run`'s)."""
  config: ml_collections.ConfigDict
  step: int
  path: epath.Path
  graphdef: nnx.GraphDef
  params: Any  # Sharded over `mesh` (the run's EMA: the parameters when ema_decay = 0).
  mesh: jax.sharding.Mesh

  @property
  def classifier_fn(self) -> jax.tree_util.Partial:
    """`classifier_fn(z, logsnr) -> logits [N, num_classes]` (z: [N, H, W, C], logsnr:
    [N] or scalar), for classifier guidance; the parameters are pytree leaves, so a
    jitted sampler does not recompile for another checkpoint."""
    return jax.tree_util.Partial(eps.make_logits_fn(self.graphdef), self.params)


def load_classifier(path, step: int | None = None, *,
                    mesh: jax.sharding.Mesh | None = None) -> Classifier:
  """Restores a noisy classifier trained by --mode=train_classifier.

  path: its run directory (config_lib.classifier_workdir: WORKDIR/noisy_classifier by
  default) or one of its checkpoints; step and mesh as for `load`.
  """
  return Classifier(**_restore(path, step, mesh, classifier=True))
