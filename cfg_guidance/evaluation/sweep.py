"""--mode=evaluate: FID, sFID, IS, precision/recall and more of a checkpoint's EMA samples
for each guidance weight, by the protocol of ADM's evaluator.

Example i has label i mod num_classes and is drawn by the sampling driver
(`generate`) from fold_in(key(eval.seed), i), so the images do not depend on batch size,
device count or process count. Features stream into float64 statistics on process 0,
which writes WORKDIR/eval/<step>/ (the files are made in report.py).
"""

import logging
import time

from etils import epath
import jax
import ml_collections
import numpy as np

from cfg_guidance import api, files, generate, images
from cfg_guidance import config as config_lib
from cfg_guidance.evaluation import classifier, inception, metrics, reference, report
from cfg_guidance.runtime import checkpointing, distributed, reporting, sharding

# The grids' keys hang off fold_in(key(seed), GRID_STREAM), an index no sweep reaches.
GRID_STREAM = 2**32 - 1
_WAIT, _STOP = -1, -2  # Watch-mode actions besides "evaluate step s >= 0".


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every field the evaluation reads, checked before any compute."""
  config_lib.check_eval(config, min_samples=metrics.DEFAULT_SPLITS, pr_k=report.PR_K)
  if config.eval.extractor == "inception":
    inception.resolve_graph_path(config.eval.inception_path)  # Names the field.


def output_dir(config: ml_collections.ConfigDict, workdir) -> epath.Path:
  """Where the evaluation writes: config.eval.output_dir, else WORKDIR/eval."""
  return epath.Path(config.eval.output_dir or epath.Path(workdir) / "eval")


def check_writable(path: epath.Path, name: str) -> None:
  """Creates `path` and writes and deletes a probe file there (process 0), so that a
  read-only destination fails before any sampling; the error names `name`."""
  error = files.unwritable(path) if jax.process_index() == 0 else ""
  if not distributed.chief_says(not error):  # Every process raises, none waits.
    raise PermissionError(f"{name}: cannot write evaluation results to {path} "
                          f"({error or 'see process 0'}).")


class Evaluation:
  """What every checkpoint's sweep shares: mesh, extractor, reference, sampler, writer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    check_config(config)
    self.config, self.workdir = config, epath.Path(workdir)
    self.mesh = mesh or sharding.create_mesh()
    self.settings = generate.settings_from_config(config, num_steps=config.eval.num_steps,
                                                  batch_size=config.eval.batch_size)
    self.is_chief = jax.process_index() == 0
    # Made by every process (Orbax synchronises them); listing steps later is local.
    self.checkpoints = checkpointing.Checkpointer(self.workdir, create=False)
    ev = config.eval
    self.out = output_dir(config, workdir)
    check_writable(self.out, "config.eval.output_dir" if ev.output_dir else
                   "--workdir (or set config.eval.output_dir to write elsewhere)")
    self.extractor = reference.make_extractor(ev, config.data, workdir,
                                              num_classes=config.model.num_classes,
                                              seed=config.seed, eval_dir=self.out)
    self.reference = reference.reference_statistics(
        ev, config.data, self.out, self.extractor, image_shape=self.settings.shape)
    self.writer = reporting.Writer(self.out, is_chief=self.is_chief,
                                   wandb_config=config.wandb, job="evaluate")

  def evaluate(self, step: int | None = None) -> tuple[int, list[dict]]:
    """Sweeps eval.guidance_weights on checkpoint `step` (None: the latest).

    Returns (step, records); the records are process 0's, [] on other processes.
    """
    model = api.load(self.workdir, step, mesh=self.mesh)
    config_lib.check_same_model(self.config, model.config, str(model.path))
    out_dir = self.out / str(model.step)
    records = []
    for w in self.config.eval.guidance_weights:
      start = time.time()
      record = self.weight_metrics(model.eps_fn, float(w))
      grid = self._grid(model.eps_fn, float(w))
      if self.is_chief:
        record["seconds"] = time.time() - start
        images.save_png(out_dir / f"samples_w{float(w):g}.png", grid)
        self.writer.write_images(model.step, {f"samples/w={float(w):g}": grid[None]})
        logging.info("Step %d, w=%g: %s", model.step, w, record)
        records.append(record)
    if self.is_chief:
      self._write(model.step, model.path, out_dir, records)
    distributed.barrier(f"evaluate step {model.step}")  # Process 0 has written.
    return model.step, records

  def weight_metrics(self, eps_fn, w: float, settings: generate.Settings | None = None,
                     *, progress: str | None = None, **networks) -> dict | None:
    """The metrics of eval.num_samples samples at weight w, streamed through the
    extractor; None off process 0. `settings`: another sampler (default: the sweep's);
    `networks`: a guidance rule's second network (generate.batches' negative_eps_fn or
    classifier_fn)."""
    ev, num_classes = self.config.eval, self.config.model.num_classes
    with_spatial = reference.spatial_dim(self.extractor) is not None  # sFID.
    stats = report.SweepStats(
        num_samples=ev.num_samples, num_classes=num_classes,
        precision_recall=ev.precision_recall, with_spatial=with_spatial,
        with_accuracy=isinstance(self.extractor, classifier.ClassifierExtractor))
    labels = np.arange(ev.num_samples) % num_classes
    for batch in generate.batches(eps_fn, labels, w, settings=settings or self.settings,
                                  seed=ev.seed, mesh=self.mesh,
                                  progress=progress or f"evaluating w={w:g}", **networks):
      x = images.to_uint8(batch.samples)
      outputs = self.extractor(x, spatial=True) if with_spatial else self.extractor(x)
      indices, valid, *outputs = distributed.gather(batch.indices, batch.valid, *outputs)
      if self.is_chief:
        stats.add(indices[valid], *(a[valid] for a in outputs[:2]),
                  indices[valid] % num_classes,
                  outputs[2][valid] if with_spatial else None)
    if not self.is_chief:
      return None
    ref = self.reference
    return {"w": w, **stats.results(ref.stats, ref.real_features, ref.spatial)}

  def _grid(self, eps_fn, w: float) -> np.ndarray | None:
    """Figs. 6/7 at a fixed seed: random classes left, eval.grid_class right."""
    ev = self.config.eval
    n = ev.grid_size**2
    rng = np.random.default_rng(ev.seed)
    labels = np.concatenate([rng.integers(0, self.config.model.num_classes, n),
                             np.full(n, ev.grid_class)])
    # Whole sweep batches (padded with repeats), so no second program is compiled.
    batch = generate.global_batch_size(self.settings, ev.num_samples, self.mesh)
    labels = np.resize(labels, -(-2 * n // batch) * batch)
    x = generate.draw(eps_fn, labels, w, settings=self.settings, seed=ev.seed,
                      stream=GRID_STREAM, mesh=self.mesh)
    if not self.is_chief:
      return None
    return report.sample_grid(x[:n], x[n:2 * n], ev.grid_size)

  def _write(self, step: int, checkpoint: epath.Path, out_dir: epath.Path,
             records: list[dict]) -> None:
    metadata = report.results_metadata(
        self.config.eval, self.settings, step=step, extractor=self.extractor,
        reference_path=self.reference.path, reference_count=self.reference.stats.count,
        checkpoint=checkpoint,
        pr_num_real=(None if self.reference.real_features is None
                     else len(self.reference.real_features)))
    report.write_all(out_dir, metadata, records)
    report.write_scalars(self.writer, step, metadata, records)
    logging.info("Evaluation of step %d, written to %s:\n%s", step, out_dir,
                 report.to_markdown(metadata, records))

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
  if config.eval.step is None and not distributed.chief_says(
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
  done = lambda s: (evaluation.out / str(s) / "results.json").exists()
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
      action = distributed.chief_value(
          _next_action(evaluation, config.train.num_steps, skipped, idle_since,
                       ev.watch_timeout) if evaluation.is_chief else 0)
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
