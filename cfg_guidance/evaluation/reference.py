"""Evaluation's reference side: the feature extractor and the real data's statistics.

Statistics are computed once per data set and extractor and cached as `.npz`; every
process takes part, process 0 decides and writes.
"""

import logging

from etils import epath
import jax
import numpy as np

from cfg_guidance import files, images
from cfg_guidance.data import pipeline, sources
from cfg_guidance.evaluation import classifier, inception, metrics
from cfg_guidance.runtime import distributed


def _training_arrays(data_config) -> tuple[np.ndarray, np.ndarray]:
  """The whole training split in memory: float [N, H, W, C] in [-1, 1], int labels [N]."""
  if data_config.name == "digits":
    return sources.load_digits_arrays()
  batches = list(pipeline.iterate_once(data_config, batch_size=1024, process_index=0,
                                       process_count=1))
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def make_extractor(eval_config, data_config, workdir, *, num_classes: int, seed: int):
  """Inception-v3 from eval.inception_path, or the stand-in CNN in WORKDIR/classifier/
  (trained on the data's training split if it is not there yet)."""
  ev = eval_config
  if ev.extractor == "inception":
    return inception.InceptionExtractor(ev.inception_path)
  checkpoint_dir = classifier.resolve_checkpoint_dir(epath.Path(workdir)
                                                     / classifier.CHECKPOINT_SUBDIR)
  if jax.process_count() > 1:
    # Orbax saves with a barrier over every process, so one process cannot train it here.
    try:
      return classifier.restore_classifier(checkpoint_dir)
    except FileNotFoundError as e:
      raise ValueError(
          f"config.eval.extractor='classifier' in a multi-process run needs the stand-in "
          f"classifier at {checkpoint_dir} already: run --mode=evaluate once in a single "
          "process (e.g. with --config.eval.num_samples=10) to train it.") from e
  x, y = _training_arrays(data_config)
  extractor = classifier.train_classifier(
      x, y, num_classes=num_classes, workdir_or_path=checkpoint_dir, seed=seed,
      steps=ev.classifier_steps, name=f"{data_config.name}-cnn")
  logging.info("Stand-in classifier %s: held-out accuracy %.4f.", extractor.name,
               extractor.heldout_accuracy)
  return extractor


def reference_path(eval_config, data_config, workdir, extractor) -> epath.Path:
  if eval_config.reference_stats:
    return epath.Path(eval_config.reference_stats)
  return (epath.Path(workdir) / "eval"
          / f"reference_{data_config.name}_{extractor.name}.npz")


def _pr_path(path: epath.Path, num: int) -> epath.Path:
  return path.parent / f"{path.stem}_pr{num}.npz"


def _reference_pass(data_config, extractor, batch_size: int, image_shape
                    ) -> metrics.FeatureStats:
  """Feature statistics of the whole training split (process 0's; empty elsewhere).

  Every process reads its shard; rounds of a fixed size with a validity mask keep every
  process in every gather until all are done.
  """
  per_process = -(-batch_size // jax.process_count())
  batches = pipeline.iterate_once(data_config, batch_size=per_process)
  stats = metrics.FeatureStats()
  while True:
    batch = next(batches, None)
    n = 0 if batch is None else len(batch["label"])
    x = (np.zeros((0, *image_shape), np.uint8) if batch is None
         else images.to_uint8(batch["image"]))
    features, _ = extractor(x)
    padded = np.zeros((per_process, features.shape[1]), np.float32)
    padded[:n] = features
    features, valid = distributed.gather(padded, np.arange(per_process) < n)
    if not valid.any():
      return stats
    if jax.process_index() == 0:
      stats.update(features[valid])


def _first_real_features(data_config, extractor, num: int) -> np.ndarray:
  """Features [num, D] of the training split's first `num` examples (one process reads)."""
  kept, count = [], 0
  for batch in pipeline.iterate_once(data_config, batch_size=min(num, 1000),
                                     process_index=0, process_count=1):
    features, _ = extractor(images.to_uint8(batch["image"][:num - count]))
    kept.append(features)
    count += len(features)
    if count >= num:
      break
  return np.concatenate(kept)


def reference_statistics(eval_config, data_config, workdir, extractor, *, image_shape):
  """(statistics, path, real features for precision/recall or None) of the training split.

  Loaded from `reference_path` if it exists, else computed with `extractor` and saved
  there (process 0). The statistics and features are None on other processes.
  """
  ev = eval_config
  path = reference_path(ev, data_config, workdir, extractor)
  keep = ev.pr_num_samples if ev.precision_recall else 0
  if not distributed.chief_says(path.exists()):
    logging.info("Computing reference statistics of %s with %s -> %s.", data_config.name,
                 extractor.name, path)
    stats = _reference_pass(data_config, extractor, ev.batch_size, image_shape)
    if jax.process_index() == 0:
      stats.save(path)
  if jax.process_index() != 0:
    return None, path, None
  real = None
  if keep:
    pr_path = _pr_path(path, keep)
    if not pr_path.exists():
      files.save_npz(pr_path, features=_first_real_features(data_config, extractor, keep))
    real = files.load_npz(pr_path)["features"]
  return metrics.FeatureStats.load(path), path, real
