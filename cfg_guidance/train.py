"""Algorithm 1: joint conditional/unconditional training, sharded with `jax.jit` on a mesh.

Randomness for step s is `fold_in(root, s)`, so a resumed run draws exactly what an
uninterrupted one would. `run` trains (resuming from the workdir), logs metrics and
writes EMA sample grids; `main` sequences the sampling and evaluation after it. The same
loop trains classifier guidance's noisy classifier (`run_classifier`): only the loss
differs, chosen by the model.
"""

import functools
import logging
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cfg_guidance import config as config_lib
from cfg_guidance import diffusion, generate, images, models, state as state_lib
from cfg_guidance.data import pipeline
from cfg_guidance.models import eps
from cfg_guidance.runtime import backend, checkpointing, preemption, reporting, sharding

TrainState = state_lib.TrainState


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had a non-finite loss or gradient."""


def make_lr(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then constant (the paper's schedule)."""
  return optax.warmup_constant_schedule(0.0, train_config.learning_rate,
                                        max(1, train_config.warmup_steps))


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam/AdamW with linear warm-up to a constant rate, after global-norm clipping."""
  lr = make_lr(train_config)
  if train_config.optimizer == "adam":
    opt = optax.adam(lr, b1=train_config.b1, b2=train_config.b2)
  else:  # "adamw"; config.check_train rejects anything else.
    opt = optax.adamw(lr, b1=train_config.b1, b2=train_config.b2,
                      weight_decay=train_config.weight_decay)
  clip = (optax.clip_by_global_norm(train_config.grad_clip_norm)
          if train_config.grad_clip_norm > 0 else optax.identity())
  return optax.chain(clip, opt)


def _noisy(x, k_logsnr, k_eps, diffusion_config):
  """(z_λ, ε, λ) with λ from the training distribution p(λ) and z_λ = α x + σ ε."""
  logsnr = diffusion.sample_logsnr(k_logsnr, x.shape[:1], diffusion_config["logsnr_min"],
                                   diffusion_config["logsnr_max"])
  noise = jax.random.normal(k_eps, x.shape, x.dtype)
  return diffusion.diffuse(x, noise, logsnr), noise, logsnr


def diffusion_loss(params, graphdef, batch, rng, *, diffusion_config, null_label):
  """Eq. 5 with Algorithm 1's label dropout: (loss, {}). batch: image [B, ...], label [B]."""
  x, labels = batch["image"], batch["label"]
  k_uncond, k_logsnr, k_eps, k_dropout = jax.random.split(rng, 4)
  drop = jax.random.bernoulli(k_uncond, diffusion_config["p_uncond"], labels.shape)
  labels = jnp.where(drop, null_label, labels)
  z, noise, logsnr = _noisy(x, k_logsnr, k_eps, diffusion_config)
  output = eps.apply(graphdef, params, z, logsnr, labels, train=True,
                     dropout_rng=k_dropout)
  if diffusion_config["parameterization"] == "v":
    target = diffusion.v_target(x, noise, logsnr)
  else:
    target = noise
  return jnp.mean(diffusion.eps_loss(output, target)), {}


def classifier_loss(params, graphdef, batch, rng, *, diffusion_config, null_label):
  """ADM's noisy classifier: cross-entropy of p(c | z_λ) at the diffusion model's
  training λ, labels never dropped: (loss, {"accuracy": ...})."""
  del null_label
  x, labels = batch["image"], batch["label"]
  k_logsnr, k_eps, k_dropout = jax.random.split(rng, 3)
  z, _, logsnr = _noisy(x, k_logsnr, k_eps, diffusion_config)
  logits = eps.apply(graphdef, params, z, logsnr, train=True, dropout_rng=k_dropout)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return jnp.mean(loss), {"accuracy": accuracy}


def train_step(state: TrainState, batch: dict, *, graphdef, tx, rng, diffusion_config,
               null_label, ema_decay, ema_warmup=False,
               loss_fn=diffusion_loss) -> tuple[TrainState, dict]:
  """One optimizer step. A non-finite loss or gradient leaves params and EMA unchanged.

  loss_fn: diffusion_loss or classifier_loss, `(loss, metrics)`; its metrics are logged.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, loss_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, graphdef, batch, step_rng, diffusion_config=diffusion_config,
      null_label=null_label)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if ema_warmup:  # Short runs: average over (nearly) every step so far, up to ema_decay.
    ema_decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                     state.ema_params, params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  skipped = (~finite).astype(jnp.int32)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      ema_params=keep(ema, state.ema_params),
      opt_state=keep(opt_state, state.opt_state),
      num_nonfinite=state.num_nonfinite + skipped,
      consecutive_nonfinite=(state.consecutive_nonfinite + 1) * skipped)
  metrics = {"loss": jnp.where(finite, loss, jnp.nan), "grad_norm": grad_norm,
             "skipped": skipped, "consecutive_nonfinite": new_state.consecutive_nonfinite,
             **loss_metrics}
  return new_state, metrics


def multi_step(state: TrainState, batches: dict, **kwargs) -> tuple[TrainState, dict]:
  """Several optimizer steps in one dispatch over batches stacked on axis 0: a
  `lax.scan`, or a loop unrolled in the program where the backend wants that."""
  step_fn = functools.partial(train_step, **kwargs)
  num = jax.tree.leaves(batches)[0].shape[0]
  if num > 1 and not backend.fast_paths().unroll_steps:
    return jax.lax.scan(step_fn, state, batches)
  metrics = []
  for i in range(num):
    state, m = step_fn(state, jax.tree.map(lambda b, i=i: b[i], batches))
    metrics.append(m)
  return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)


def make_train_fn(config, graphdef, tx, state_shardings, mesh):
  """The jitted, donating update over a [steps_per_dispatch, B, ...] stack of batches."""
  step_fn = functools.partial(
      multi_step, graphdef=graphdef, tx=tx,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      diffusion_config=dict(config.diffusion), null_label=config.model.num_classes,
      ema_decay=config.train.ema_decay, ema_warmup=config.train.ema_warmup,
      loss_fn=classifier_loss if models.is_classifier(config.model) else diffusion_loss)
  batch_sharding = sharding.data_sharding(mesh, leading_axes=1)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0, compiler_options=backend.compiler_options())


def next_stack(data_iter, num: int) -> dict:
  """`num` host batches stacked on a new leading axis."""
  batches = [next(data_iter) for _ in range(num)]
  return {k: np.stack([b[k] for b in batches]) for k in ("image", "label")}


def _crossed(prev: int, step: int, every: int) -> bool:
  return every > 0 and step // every > prev // every


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains to config.train.num_steps, resuming from `workdir` if it holds a checkpoint.

  Returns the final state, or the state saved at a preemption notice (then its step is
  below num_steps). `mesh` defaults to every device of every process on one `data` axis.
  """
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  mesh = mesh or sharding.create_mesh()
  config_lib.check_train(config, workdir, num_devices=mesh.size)
  workdir = epath.Path(workdir)
  with checkpointing.WorkdirLock(workdir):
    data_iter = pipeline.create_dataset(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed)
    config_lib.check_data(config, num_classes=data_iter.num_classes,
                          example_shape=data_iter.example_shape,
                          source=data_iter.description)
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    _check_resumable(config, ckpt)
    is_chief = jax.process_index() == 0
    writer = reporting.Writer(workdir, is_chief=is_chief, wandb_config=config.wandb,
                              job="train")
    tx = make_optimizer(config.train)
    state, state_shardings = state_lib.create(config.model, config.sharding,
                                              seed=config.seed, mesh=mesh, tx=tx)
    if ckpt.latest_step() is not None:
      restored_step, state, data_state = state_lib.restore(ckpt, state)
      data_iter.set_state(data_state)
      logging.info("Resumed from %s.", ckpt.step_path(restored_step))
      if ckpt.unreadable:  # Newer than the one restored: out of the way of new saves.
        ckpt.set_aside(ckpt.unreadable)
    else:
      parameter_overview.log_parameter_overview(state.params, msg="Model parameters")
    writer.write_hparams(reporting.flat_hparams(config.to_dict()))

    graphdef = eps.graphdef(config.model)
    train_fn = make_train_fn(config, graphdef, tx, state_shardings, mesh)
    grid = _grid_writer(config, workdir, writer, graphdef, mesh)
    watcher = preemption.PreemptionWatcher()
    try:
      state = _train_loop(config, mesh, writer, ckpt, data_iter, watcher, state, train_fn,
                          grid)
    finally:
      watcher.close()
      try:
        ckpt.wait_until_finished()
      finally:
        writer.close()
    ckpt.check_for_errors()
  return state


def run_classifier(config: ml_collections.ConfigDict, workdir: str,
                   mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """--mode=train_classifier: trains config.classifier's noisy classifier with `run`.

  Its run (config_lib.classifier_run) lives in config_lib.classifier_workdir(config,
  workdir), WORKDIR/noisy_classifier by default, and resumes from there.
  """
  mesh = mesh or sharding.create_mesh()
  where = config_lib.classifier_workdir(config, workdir)
  config_lib.check_classifier(config, where, num_devices=mesh.size)
  return run(config_lib.classifier_run(config), where, mesh)


def _check_resumable(config, ckpt: checkpointing.Checkpointer) -> None:
  """The run in ckpt's directory trained this model with this optimizer (else resuming
  would fail inside Orbax with a shape or structure error)."""
  step = ckpt.latest_step()
  if step is None:
    return
  try:
    saved = config_lib.from_dict(ckpt.read_config(step))
  except checkpointing.CheckpointError:
    return  # Unreadable: the restore falls back past it and says so.
  where = str(ckpt.step_path(step))
  config_lib.check_same_model(config, saved, where)
  if saved.train.optimizer != config.train.optimizer:
    raise ValueError(f"config.train.optimizer={config.train.optimizer!r} but the run at "
                     f"{where} was trained with {saved.train.optimizer!r}: resuming needs "
                     "the same optimizer state.")


def _grid_writer(config, workdir, writer, graphdef, mesh):
  """`grid(ema_params, step)`: EMA samples for config.grid at a fixed seed → TensorBoard
  and workdir/grids/ (classes across, guidance weights down, Figs. 6–8). None for
  models that make no images."""
  if config.model.name != "unet":
    return None
  g = config.grid
  labels, w = generate.grid_layout(g.classes, g.guidance_weights, g.samples_per_class)
  settings = generate.settings_from_config(config, num_steps=g.num_steps,
                                           batch_size=len(labels))
  eps_fn = eps.make_eps_fn(graphdef, config.diffusion.parameterization)

  def grid(ema_params, step):
    x = generate.draw(jax.tree_util.Partial(eps_fn, ema_params), labels, w,
                      settings=settings, seed=g.seed, mesh=mesh)
    picture = images.render(x, len(g.classes))
    writer.write_images(step, {"ema_samples": picture[None]})
    if jax.process_index() == 0:
      images.save_png(workdir / "grids" / f"step_{step:08d}.png", picture)

  return grid


def _train_loop(config, mesh, writer, ckpt, data_iter, watcher, state, train_fn,
                grid) -> TrainState:
  """Steps until `train.num_steps`, or a preemption notice (then saves and returns)."""
  k, num_steps = config.train.steps_per_dispatch, config.train.num_steps
  step = int(state.step)
  progress = reporting.Progress("training", num_steps, unit="steps", start=step)
  history = []
  t_log, step_log = time.time(), step
  while step < num_steps:
    batch = sharding.host_to_global(next_stack(data_iter, k), mesh, leading_axes=1)
    state, metrics = train_fn(state, batch)
    prev, step = step, step + k
    # Checked one dispatch late, so the host never waits on the step just launched.
    if history:
      _check_finite(history[-1], prev, config.train.max_consecutive_nonfinite, ckpt)
    history.append(metrics)
    ckpt.check_for_errors()  # An asynchronous save that failed stops training now.
    if _crossed(prev, step, config.train.log_every) or step >= num_steps:
      scalars = _summarize(jax.device_get(history))
      history = []
      scalars["steps_per_sec"] = (step - step_log) / (time.time() - t_log)
      scalars["examples_per_sec"] = scalars["steps_per_sec"] * config.train.batch_size
      scalars["learning_rate"] = float(make_lr(config.train)(step))
      scalars["num_nonfinite"] = int(state.num_nonfinite)
      writer.write_scalars(step, scalars)
      progress(step)
      t_log, step_log = time.time(), step
    if grid is not None and _crossed(prev, step, config.train.sample_every):
      grid(state.ema_params, step)
    preempted = watcher.reached(step)
    if (_crossed(prev, step, config.train.checkpoint_every) or step >= num_steps
        or preempted):
      ckpt.save(step, state, data_state=data_iter.get_state(), config=config.to_dict(),
                force=preempted)
    if preempted:
      logging.warning("Preempted: saved step %d to %s; exiting.", step, ckpt.step_path(step))
      return state
  _check_finite(history[-1] if history else None, step,
                config.train.max_consecutive_nonfinite, ckpt)
  return state


def _check_finite(metrics: dict | None, step: int, limit: int, ckpt) -> None:
  """Raises NonFiniteError when the last `limit` updates up to `step` were all skipped."""
  if metrics is None:
    return
  consecutive = int(np.max(jax.device_get(metrics["consecutive_nonfinite"])))
  if consecutive >= limit:
    ckpt.wait_until_finished()
    raise NonFiniteError(
        f"{consecutive} consecutive updates had a non-finite loss or gradient (up to step "
        f"{step}); training stopped. The last checkpoint, step {ckpt.latest_step()}, is "
        "untouched.")


def _summarize(history: list[dict]) -> dict:
  """Means over the logging window of per-step metrics ([k] arrays each dispatch): of
  the steps with a finite loss for loss, grad_norm and the loss's own metrics."""
  stacked = {k: np.concatenate([np.atleast_1d(h[k]) for h in history]) for k in history[0]}
  skipped, _ = stacked.pop("skipped"), stacked.pop("consecutive_nonfinite")
  finite = np.isfinite(stacked["loss"])
  scalars = {k: float(v[finite].mean()) if finite.any() else float("nan")
             for k, v in stacked.items()}
  return {**scalars, "skipped_updates": int(skipped.sum())}
