"""Algorithm 1: joint conditional/unconditional training, sharded with `jax.jit` on a mesh.

The train state is a plain pytree (parameters as nested dicts); the network's NNX graph
definition stays outside every jit boundary. Randomness for step s is
`fold_in(root, s)`, so a resumed run draws exactly what an uninterrupted one would.
"""

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cfg_guidance import checkpointing, diffusion, input_pipeline, models, sharding
from cfg_guidance import config_checks, grids, preemption, xla_options


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had a non-finite loss or gradient."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 [], optimizer steps taken (skipped ones included).
  params: Any  # Nested dict of float32 arrays.
  ema_params: Any  # Same structure: the exponential moving average used for sampling.
  opt_state: Any
  num_nonfinite: jax.Array  # int32 [], updates skipped for a non-finite loss/gradient.
  consecutive_nonfinite: jax.Array  # int32 [], skipped in a row up to this step.


def make_lr(train_config) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then constant (the paper's schedule)."""
  return optax.warmup_constant_schedule(0.0, train_config.learning_rate,
                                        max(1, train_config.warmup_steps))


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam/AdamW with linear warm-up to a constant rate, after global-norm clipping."""
  lr = make_lr(train_config)
  if train_config.optimizer == "adam":
    opt = optax.adam(lr, b1=train_config.b1, b2=train_config.b2)
  else:  # "adamw"; config_checks rejects anything else.
    opt = optax.adamw(lr, b1=train_config.b1, b2=train_config.b2,
                      weight_decay=train_config.weight_decay)
  clip = (optax.clip_by_global_norm(train_config.grad_clip_norm)
          if train_config.grad_clip_norm > 0 else optax.identity())
  return optax.chain(clip, opt)


def model_graphdef(model_config) -> nnx.GraphDef:
  """The network's static structure, built without allocating parameters."""
  abstract = nnx.eval_shape(lambda: models.create(model_config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return graphdef


def init_state(rng: jax.Array, *, model_config, tx: optax.GradientTransformation
               ) -> TrainState:
  model = models.create(model_config, rngs=nnx.Rngs(params=rng))
  params = nnx.state(model, nnx.Param).to_pure_dict()
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=params,
                    opt_state=tx.init(params), num_nonfinite=zero,
                    consecutive_nonfinite=zero)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation
                       ) -> tuple[nnx.GraphDef, TrainState, Any]:
  """Creates the state already sharded: shapes → shardings → jitted init."""
  graphdef = model_graphdef(config.model)
  init = functools.partial(init_state, model_config=config.model, tx=tx)
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.param_shardings(abstract, mesh, fsdp=config.sharding.fsdp,
                                       min_size=config.sharding.fsdp_min_size)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return graphdef, state, shardings


def apply_model(graphdef: nnx.GraphDef, params: Any, z: jax.Array, logsnr: jax.Array,
                labels: jax.Array, *, train: bool = False,
                dropout_rng: jax.Array | None = None) -> jax.Array:
  """The network's raw output (ε or v, per the config's parameterization)."""
  model = nnx.merge(graphdef, params)
  rngs = nnx.Rngs(dropout=dropout_rng) if dropout_rng is not None else None
  return model(z, logsnr, labels, train=train, rngs=rngs)


def eps_from_output(output, z, logsnr, parameterization: str):
  """ε from the network output: identity for ε-prediction, ε = σ z + α v for v."""
  if parameterization == "eps":
    return output
  return diffusion.predict_eps_from_v(z, output, logsnr)


def make_eps_fn(graphdef: nnx.GraphDef, parameterization: str) -> Callable:
  """`eps_fn(params, z, logsnr, labels)`; bind params with `jax.tree_util.Partial`.

  Create it once per run: the sampler's compilation cache is keyed on this function.
  """

  def eps_fn(params, z, logsnr, labels):
    out = apply_model(graphdef, params, z, logsnr, labels)
    return eps_from_output(out, z, logsnr, parameterization)

  return eps_fn


def loss_fn(params, graphdef, batch, rng, *, diffusion_config, null_label):
  """Eq. 5 with Algorithm 1's label dropout. batch: image [B, ...], label [B]."""
  x, labels = batch["image"], batch["label"]
  k_uncond, k_logsnr, k_eps, k_dropout = jax.random.split(rng, 4)
  drop = jax.random.bernoulli(k_uncond, diffusion_config["p_uncond"], labels.shape)
  labels = jnp.where(drop, null_label, labels)
  logsnr = diffusion.sample_logsnr(k_logsnr, labels.shape, diffusion_config["logsnr_min"],
                                   diffusion_config["logsnr_max"])
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z = diffusion.diffuse(x, eps, logsnr)
  output = apply_model(graphdef, params, z, logsnr, labels, train=True,
                       dropout_rng=k_dropout)
  if diffusion_config["parameterization"] == "v":
    target = diffusion.v_target(x, eps, logsnr)
  else:
    target = eps
  return jnp.mean(diffusion.eps_loss(output, target))


def train_step(state: TrainState, batch: dict, *, graphdef, tx, rng, diffusion_config,
               null_label, ema_decay, ema_warmup=False) -> tuple[TrainState, dict]:
  """One optimizer step. A non-finite loss or gradient leaves params and EMA unchanged."""
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads = jax.value_and_grad(loss_fn)(
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
             "skipped": skipped, "consecutive_nonfinite": new_state.consecutive_nonfinite}
  return new_state, metrics


def multi_step(state: TrainState, batches: dict, **kwargs) -> tuple[TrainState, dict]:
  """Several optimizer steps in one dispatch over batches stacked on axis 0.

  A `lax.scan` on accelerators; on CPU a Python loop (unrolled in the program), since
  XLA:CPU runs convolution gradients inside a while loop ~40x slower than outside one
  (measured: 52 s vs 1.3 s for the digits U-Net's gradient).
  """
  step_fn = functools.partial(train_step, **kwargs)
  num = jax.tree.leaves(batches)[0].shape[0]
  if num > 1 and jax.default_backend() != "cpu":
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
      ema_decay=config.train.ema_decay, ema_warmup=config.train.ema_warmup)
  batch_sharding = sharding.data_sharding(mesh, leading_axes=1)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0, compiler_options=xla_options.compiler_options())


def next_stack(data_iter, num: int) -> dict:
  """`num` host batches stacked on a new leading axis."""
  batches = [next(data_iter) for _ in range(num)]
  return {k: np.stack([b[k] for b in batches]) for k in ("image", "label")}


def _crossed(prev: int, step: int, every: int) -> bool:
  return every > 0 and step // every > prev // every


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint) and writes grids/metrics.

  `mesh` defaults to every device of every process on one `data` axis.
  """
  # clu imports TensorFlow (~5 s): only the training loop needs it.
  from clu import metric_writers, parameter_overview  # pylint: disable=g-import-not-at-top
  mesh = mesh or sharding.create_mesh()
  config_checks.check_train_config(config, workdir, num_devices=mesh.size)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  tx = make_optimizer(config.train)
  graphdef, state, state_shardings = create_train_state(config, mesh, tx)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  data_iter = input_pipeline.create_dataset(
      config.data, global_batch_size=config.train.batch_size, seed=config.seed)
  if ckpt.latest_step() is not None:
    restored_step, state, data_state = ckpt.restore(checkpointing.abstract_like(state))
    data_iter.set_state(data_state)
    logging.info("Resumed from %s.", ckpt.step_path(restored_step))
  else:
    parameter_overview.log_parameter_overview(state.params, msg="Model parameters")
  writer.write_hparams(_flat_hparams(config.to_dict()))

  train_fn = make_train_fn(config, graphdef, tx, state_shardings, mesh)
  eps_fn = make_eps_fn(graphdef, config.diffusion.parameterization)
  watcher = preemption.PreemptionWatcher()
  try:
    state, finished = _train_loop(config, workdir, mesh, writer, ckpt, data_iter, watcher,
                                  state, train_fn, eps_fn)
  finally:
    watcher.close()
    ckpt.wait_until_finished()
    writer.flush()
  if finished and config.train.sample_at_end:
    from cfg_guidance import generate  # pylint: disable=g-import-not-at-top
    generate.run(config, str(workdir))
  if finished and config.train.evaluate_at_end:
    from cfg_guidance import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.run(config, str(workdir))
  return state


def _train_loop(config, workdir, mesh, writer, ckpt, data_iter, watcher, state, train_fn,
                eps_fn) -> tuple[TrainState, bool]:
  """Steps until `train.num_steps` (→ finished) or a preemption notice (→ saved, not)."""
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  k, num_steps = config.train.steps_per_dispatch, config.train.num_steps
  step = int(state.step)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every)
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
    report(step)
    if _crossed(prev, step, config.train.log_every) or step >= num_steps:
      scalars = _summarize(jax.device_get(history))
      history = []
      scalars["steps_per_sec"] = (step - step_log) / (time.time() - t_log)
      scalars["examples_per_sec"] = scalars["steps_per_sec"] * config.train.batch_size
      scalars["learning_rate"] = float(make_lr(config.train)(step))
      scalars["num_nonfinite"] = int(state.num_nonfinite)
      writer.write_scalars(step, scalars)
      t_log, step_log = time.time(), step
    if _crossed(prev, step, config.train.sample_every) and grids.can_render(config):
      grids.write_training_grid(config, workdir, writer, eps_fn, state.ema_params, step)
    preempted = watcher.reached(step)
    if (_crossed(prev, step, config.train.checkpoint_every) or step >= num_steps
        or preempted):
      ckpt.save(step, state, data_state=data_iter.get_state(), config=config.to_dict(),
                force=preempted)
    if preempted:
      logging.warning("Preempted: saved step %d to %s; exiting.", step, ckpt.step_path(step))
      return state, False
  _check_finite(history[-1] if history else None, step,
                config.train.max_consecutive_nonfinite, ckpt)
  return state, True


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


def _flat_hparams(d: dict, prefix: str = "") -> dict:
  """Config → {"train.batch_size": 128, ...} with scalar values, for TensorBoard."""
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(_flat_hparams(v, f"{prefix}{k}."))
    else:
      flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return flat


def _summarize(history: list[dict]) -> dict:
  """Means over the logging window of per-step metrics ([k] arrays each dispatch)."""
  loss = np.concatenate([np.atleast_1d(h["loss"]) for h in history])
  grad_norm = np.concatenate([np.atleast_1d(h["grad_norm"]) for h in history])
  skipped = np.concatenate([np.atleast_1d(h["skipped"]) for h in history])
  finite = np.isfinite(loss)
  return {"loss": float(loss[finite].mean()) if finite.any() else float("nan"),
          "grad_norm": float(grad_norm[finite].mean()) if finite.any() else float("nan"),
          "skipped_updates": int(skipped.sum())}


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str,
                       step: int | None = None, mesh=None) -> tuple[int, nnx.GraphDef, Any]:
  """(step, graphdef, EMA params) of a checkpoint: the latest, or `step`."""
  mesh = mesh or sharding.create_mesh()
  tx = make_optimizer(config.train)
  graphdef = model_graphdef(config.model)
  init = functools.partial(init_state, model_config=config.model, tx=tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.param_shardings(abstract, mesh, fsdp=config.sharding.fsdp,
                                       min_size=config.sharding.fsdp_min_size)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  ckpt = checkpointing.Checkpointer(workdir, create=False)
  restored_step, state, _ = ckpt.restore(abstract, step=step)
  return restored_step, graphdef, state.ema_params
