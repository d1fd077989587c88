"""--mode=evaluate: FID, IS and more of a checkpoint's EMA samples for each guidance weight.

Example i is sampled with noise from fold_in(key(eval.seed), i) and label i mod
num_classes, on every device of every process, so the images do not depend on batch
size, device count or process count. Features stream into float64 statistics on
process 0, which writes WORKDIR/eval/<step>/ (the files are made in eval_report.py).
"""

import logging
import time

from etils import epath
import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from cfg_guidance import checkpointing, classifier, config_checks, eval_reference, eval_report
from cfg_guidance import grids, images, inception, metrics, sampling, sharding, train
from cfg_guidance import xla_options

EXTRACTORS = ("inception", "classifier")
# The grids' keys hang off fold_in(key(seed), GRID_STREAM), an index no sweep reaches.
GRID_STREAM = 2**32 - 1
_WAIT, _STOP = -1, -2  # Watch-mode actions besides "evaluate step s >= 0".


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every field the evaluation reads, checked before any compute."""
  config_checks.check_common(config)
  config_checks.check_sampler(config.sample, "sample")
  ev, num_classes = config.eval, config.model.num_classes
  _require(config.model.name == "unet",
           f"config.model.name={config.model.name!r}: --mode=evaluate measures image "
           "samples, so it needs an image model ('unet').")
  _require(len(ev.guidance_weights) > 0
           and all(np.isfinite(float(w)) for w in ev.guidance_weights),
           f"config.eval.guidance_weights={ev.guidance_weights} must be finite numbers.")
  _require(ev.num_samples >= metrics.DEFAULT_SPLITS,
           f"config.eval.num_samples={ev.num_samples} must be at least "
           f"{metrics.DEFAULT_SPLITS} (the Inception Score's splits).")
  _require(ev.batch_size >= 1, f"config.eval.batch_size={ev.batch_size} must be >= 1.")
  _require(ev.num_steps >= 1, f"config.eval.num_steps={ev.num_steps} must be >= 1.")
  _require(ev.extractor in EXTRACTORS,
           f"config.eval.extractor={ev.extractor!r} must be one of {EXTRACTORS}.")
  if ev.extractor == "inception":
    inception.resolve_graph_path(ev.inception_path)  # Names eval.inception_path.
  _require(ev.classifier_steps >= 1,
           f"config.eval.classifier_steps={ev.classifier_steps} must be >= 1.")
  _require(0 <= ev.grid_class < num_classes,
           f"config.eval.grid_class={ev.grid_class} must lie in [0, {num_classes}).")
  _require(ev.grid_size >= 1, f"config.eval.grid_size={ev.grid_size} must be >= 1.")
  _require(not ev.precision_recall or ev.pr_num_samples > eval_report.PR_K,
           f"config.eval.pr_num_samples={ev.pr_num_samples} must exceed k={eval_report.PR_K}.")
  _require(ev.watch_interval > 0,
           f"config.eval.watch_interval={ev.watch_interval} must be positive.")
  _require(ev.watch_timeout >= 0,
           f"config.eval.watch_timeout={ev.watch_timeout} must be >= 0 (0 = never).")


# --- Sampling, sharded over every device of every process. ---

@xla_options.jit(static_argnames=("shape", "num_steps", "sampler_kwargs", "out_sharding"))
def _sample_rows(eps_fn, root, indices, labels, weight, *, shape, num_steps,
                 sampler_kwargs, out_sharding):
  """[B, *shape] samples; example `indices[b]` draws its noise from fold_in(root, i)."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.wrap_key_data(root),
                                                        indices)
  x = sampling.sample(eps_fn, keys, labels, shape=shape, guidance_weight=weight,
                      num_steps=num_steps, **dict(sampler_kwargs))
  return jax.lax.with_sharding_constraint(x, out_sharding)


def _root(seed: int, stream: int | None = None) -> np.ndarray:
  """The raw data of key(seed), or of fold_in(key(seed), stream): uint32 [2]."""
  key = jax.random.key(seed)
  if stream is not None:
    key = jax.random.fold_in(key, stream)
  return np.asarray(jax.random.key_data(key))


def _process_rows(batch_size: int) -> slice:
  """This process's rows of a global batch (host_to_global's process order)."""
  per_process = batch_size // jax.process_count()
  return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def _dispatch(config, eps_fn, params, indices, labels, weight, mesh, root) -> jax.Array:
  """Starts sampling one global batch; returns the [B, H, W, C] array, sharded on `data`."""
  rows = _process_rows(len(indices))
  batch = sharding.host_to_global({"indices": np.asarray(indices[rows], np.int32),
                                   "labels": np.asarray(labels[rows], np.int32)}, mesh)
  kwargs = grids.sampler_kwargs(config, config.sample)
  return _sample_rows(jax.tree_util.Partial(eps_fn, params), root, batch["indices"],
                      batch["labels"], np.float32(weight), shape=grids.image_shape(config),
                      num_steps=config.eval.num_steps,
                      sampler_kwargs=tuple(sorted(kwargs.items())),
                      out_sharding=sharding.data_sharding(mesh))


def _local(x: jax.Array, mesh) -> np.ndarray:
  """This process's rows of a global batch, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, P(sharding.DATA_AXIS)))


def generate_batch(config, eps_fn, params, indices: np.ndarray, weight: float,
                   mesh) -> np.ndarray:
  """Samples of the examples `indices` ([B] global indices, the same on every process).

  Example i has label i mod num_classes and noise from fold_in(key(eval.seed), i). B must
  divide over the mesh's devices. Returns this process's rows, float32
  [B / process_count, H, W, C] in [-1, 1].
  """
  indices = np.asarray(indices)
  x = _dispatch(config, eps_fn, params, indices, indices % config.model.num_classes,
                weight, mesh, _root(config.eval.seed))
  return _local(x, mesh)


# --- Extractors and the real data's reference statistics. ---

# --- The sweep over guidance weights, for one checkpoint or each as it appears. ---

class Evaluation:
  """What every checkpoint's sweep shares: mesh, extractor, reference, sampler, writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.mesh = mesh or sharding.create_mesh()
    check_config(config)
    # Rounded up so every device gets rows; the samples do not depend on it.
    self.batch_size = -(-config.eval.batch_size // self.mesh.size) * self.mesh.size
    self.config, self.workdir = config, epath.Path(workdir)
    self.is_chief = jax.process_index() == 0
    # Made by every process (Orbax synchronises them); listing steps later is local.
    self.checkpoints = checkpointing.Checkpointer(self.workdir, create=False)
    self.extractor = eval_reference.make_extractor(config, workdir)
    self.reference, self.reference_path, self.real_features = eval_reference.reference_statistics(
        config, workdir, self.extractor)
    # clu imports TensorFlow (~5 s): only a running evaluation needs it.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        self.workdir / "eval", just_logging=not self.is_chief)
    self.eps_fn = None  # Made once, so every checkpoint reuses the compiled sampler.

  def evaluate(self, step: int | None = None) -> tuple[int, list[dict]]:
    """Sweeps eval.guidance_weights on checkpoint `step` (None: the latest).

    Returns (step, records); the records are process 0's, [] on other processes.
    """
    config, ev = self.config, self.config.eval
    step, graphdef, params = train.restore_ema_params(config, str(self.workdir), step,
                                                      self.mesh)
    if self.eps_fn is None:
      self.eps_fn = train.make_eps_fn(graphdef, config.diffusion.parameterization)
    out_dir = self.workdir / "eval" / str(step)
    records = []
    for w in ev.guidance_weights:
      start = time.time()
      record = self._sweep(params, float(w))
      grid = self._grid(params, float(w))
      if self.is_chief:
        record["seconds"] = time.time() - start
        images.save_png(out_dir / f"samples_w{float(w):g}.png", grid)
        self.writer.write_images(step, {f"samples/w={float(w):g}": grid[None]})
        logging.info("Step %d, w=%g: %s", step, w, record)
        records.append(record)
    if self.is_chief:
      self._write(step, out_dir, records)
    if jax.process_count() > 1:  # The others wait until process 0 has written.
      multihost_utils.sync_global_devices(f"evaluate step {step}")
    return step, records

  def _sweep(self, params, w: float) -> dict | None:
    """eval.num_samples samples at weight w, streamed through the extractor."""
    ev, num_classes = self.config.eval, self.config.model.num_classes
    stats = eval_report.SweepStats(
        num_samples=ev.num_samples, num_classes=num_classes,
        keep=ev.pr_num_samples if ev.precision_recall else 0,
        with_accuracy=isinstance(self.extractor, classifier.ClassifierExtractor))
    root = _root(ev.seed)

    def launch(start):
      indices = np.arange(start, start + self.batch_size)
      return indices, _dispatch(self.config, self.eps_fn, params, indices,
                                indices % num_classes, w, self.mesh, root)

    starts = list(range(0, ev.num_samples, self.batch_size))
    pending = launch(starts[0])
    for following in starts[1:] + [None]:
      indices, x = pending
      if following is not None:  # Queue the next batch while this one is measured.
        pending = launch(following)
      features, logits = self.extractor(images.to_uint8(_local(x, self.mesh)))
      indices, features, logits = eval_reference.gather(indices[_process_rows(len(indices))],
                                          features, logits)
      if self.is_chief:
        stats.add(indices, features, logits, indices % num_classes)
    if not self.is_chief:
      return None
    return {"w": w, **stats.results(self.reference, self.real_features)}

  def _grid(self, params, w: float) -> np.ndarray | None:
    """Figs. 6/7 at a fixed seed: random classes left, eval.grid_class right."""
    ev, batch = self.config.eval, self.batch_size
    n = ev.grid_size**2
    rng = np.random.default_rng(ev.seed)
    labels = np.concatenate([rng.integers(0, self.config.model.num_classes, n),
                             np.full(n, ev.grid_class)])
    root, rows = _root(ev.seed, GRID_STREAM), []
    for start in range(0, 2 * n, batch):  # Whole eval batches: no second compilation.
      indices = np.arange(start, start + batch)
      x = _dispatch(self.config, self.eps_fn, params, indices,
                    np.resize(labels[start:], batch), w, self.mesh, root)
      rows.append(eval_reference.gather(_local(x, self.mesh))[0])
    if not self.is_chief:
      return None
    x = np.concatenate(rows)[:2 * n]
    return eval_report.sample_grid(x[:n], x[n:], ev.grid_size)

  def _write(self, step: int, out_dir: epath.Path, records: list[dict]) -> None:
    metadata = eval_report.results_metadata(
        self.config, step=step, extractor=self.extractor,
        reference_path=self.reference_path, reference_count=self.reference.count,
        checkpoint=self.checkpoints.step_path(step))
    eval_report.write_all(out_dir, metadata, records)
    eval_report.write_scalars(self.writer, step, metadata, records)
    logging.info("Evaluation of step %d, written to %s:\n%s", step, out_dir,
                 eval_report.to_markdown(metadata, records))

  def close(self) -> None:
    self.writer.close()


def run(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> list[dict]:
  """--mode=evaluate: one record per guidance weight, also written to WORKDIR/eval/<step>/.

  Evaluates eval.step (None: the latest checkpoint), or with eval.watch every checkpoint
  as it appears (returning the last one's records). Records are [] off process 0.
  """
  check_config(config)
  if config.eval.watch:
    results = watch(config, workdir, mesh)
    return results[max(results)] if results else []
  if config.eval.step is None and not eval_reference.chief_says(
      bool(checkpointing.Checkpointer(workdir, create=False).all_steps())):
    raise checkpointing.CheckpointError(f"no checkpoint in {epath.Path(workdir)}/checkpoints "
                                        "to evaluate (--workdir).")
  evaluation = Evaluation(config, workdir, mesh)
  try:
    return evaluation.evaluate(config.eval.step)[1]
  finally:
    evaluation.close()


def _next_action(evaluation: Evaluation, final_step: int, skipped: set, idle_since: float,
                 timeout: float) -> int:
  """The oldest checkpoint without results, else _STOP (final done, or idle) or _WAIT."""
  steps = evaluation.checkpoints.all_steps()
  done = lambda s: (evaluation.workdir / "eval" / str(s) / "results.json").exists()
  pending = [s for s in steps if s not in skipped and not done(s)]
  if pending:
    return pending[0]
  if steps and steps[-1] >= final_step:
    return _STOP
  if timeout and time.monotonic() - idle_since >= timeout:
    return _STOP
  return _WAIT


def watch(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict[int, list]:
  """Evaluates each checkpoint of a training run as it appears: {step: records}.

  Polls every eval.watch_interval seconds; skips checkpoints that already have results;
  stops once a step >= train.num_steps is evaluated, or after eval.watch_timeout idle
  seconds (0 = never). Process 0 decides, so every process evaluates the same steps.
  """
  ev = config.eval
  evaluation = Evaluation(config, workdir, mesh)
  results, skipped, idle_since = {}, set(), time.monotonic()
  try:
    while True:
      action = _next_action(evaluation, config.train.num_steps, skipped, idle_since,
                            ev.watch_timeout) if evaluation.is_chief else 0
      if jax.process_count() > 1:
        action = int(multihost_utils.broadcast_one_to_all(np.int64(action)))
      if action == _STOP:
        return results
      if action == _WAIT:
        time.sleep(ev.watch_interval)
        continue
      try:
        results[action] = evaluation.evaluate(action)[1]
      except checkpointing.CheckpointError as e:  # Deleted by training's max_to_keep.
        logging.warning("Skipping step %d: %s", action, e)
        skipped.add(action)
      idle_since = time.monotonic()
  finally:
    evaluation.close()
