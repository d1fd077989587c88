"""Evaluation's reference side: the feature extractor and the real data's statistics.

Statistics are computed once per data set and extractor and cached as `.npz`; every
process takes part, process 0 decides and writes.
"""

import logging
import os
import tempfile

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from cfg_guidance import classifier, grids, images, inception, input_pipeline, metrics


def gather(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Every process's rows, concatenated in process order (identity in one process)."""
  if jax.process_count() == 1:
    return arrays
  return tuple(np.asarray(a) for a in multihost_utils.process_allgather(arrays, tiled=True))


def _training_arrays(config) -> tuple[np.ndarray, np.ndarray]:
  """The whole training split in memory: float [N, H, W, C] in [-1, 1], int labels [N]."""
  if config.data.name == "digits":
    return input_pipeline.load_digits_arrays()
  batches = list(input_pipeline.iterate_once(config.data, batch_size=1024, process_index=0,
                                             process_count=1))
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def make_extractor(config, workdir):
  """Inception-v3 from eval.inception_path, or the stand-in CNN in WORKDIR/classifier/."""
  ev = config.eval
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
  x, y = _training_arrays(config)
  extractor = classifier.train_classifier(
      x, y, num_classes=config.model.num_classes, workdir_or_path=checkpoint_dir,
      seed=config.seed, steps=ev.classifier_steps, name=f"{config.data.name}-cnn")
  logging.info("Stand-in classifier %s: held-out accuracy %.4f.", extractor.name,
               extractor.heldout_accuracy)
  return extractor


def reference_path(config, workdir, extractor) -> epath.Path:
  if config.eval.reference_stats:
    return epath.Path(config.eval.reference_stats)
  return (epath.Path(workdir) / "eval"
          / f"reference_{config.data.name}_{extractor.name}.npz")


def _pr_path(path: epath.Path, num: int) -> epath.Path:
  return path.parent / f"{path.stem}_pr{num}.npz"


def chief_says(flag: bool) -> bool:
  """Process 0's answer on every process, so collective loops agree."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _reference_pass(config, extractor) -> metrics.FeatureStats:
  """Feature statistics of the whole training split (process 0's; empty elsewhere).

  Every process reads its shard; rounds of a fixed size with a validity mask keep every
  process in every gather until all are done.
  """
  per_process = -(-config.eval.batch_size // jax.process_count())
  batches = input_pipeline.iterate_once(config.data, batch_size=per_process)
  stats = metrics.FeatureStats()
  while True:
    batch = next(batches, None)
    n = 0 if batch is None else len(batch["label"])
    x = (np.zeros((0, *grids.image_shape(config)), np.uint8) if batch is None
         else images.to_uint8(batch["image"]))
    features, _ = extractor(x)
    padded = np.zeros((per_process, features.shape[1]), np.float32)
    padded[:n] = features
    features, valid = gather(padded, np.arange(per_process) < n)
    if not valid.any():
      return stats
    if jax.process_index() == 0:
      stats.update(features[valid])


def _first_real_features(config, extractor, num: int) -> np.ndarray:
  """Features [num, D] of the training split's first `num` examples (one process reads)."""
  kept, count = [], 0
  for batch in input_pipeline.iterate_once(config.data, batch_size=min(num, 1000),
                                           process_index=0, process_count=1):
    features, _ = extractor(images.to_uint8(batch["image"][:num - count]))
    kept.append(features)
    count += len(features)
    if count >= num:
      break
  return np.concatenate(kept)


def _save_stats(stats: metrics.FeatureStats, path: epath.Path) -> None:
  """FeatureStats.save to any epath (e.g. gs://): written locally, copied atomically."""
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path.name)
    stats.save(local)
    images.atomic_write_bytes(path, epath.Path(local).read_bytes())


def _load_stats(path: epath.Path) -> metrics.FeatureStats:
  if os.path.exists(os.fspath(path)):
    return metrics.FeatureStats.load(os.fspath(path))
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path.name)
    epath.Path(local).write_bytes(path.read_bytes())
    return metrics.FeatureStats.load(local)


def reference_statistics(config, workdir, extractor):
  """(statistics, path, real features for precision/recall or None) of the training split.

  Loaded from `reference_path` if it exists, else computed with `extractor` and saved
  there (process 0). The statistics and features are None on other processes.
  """
  ev = config.eval
  path = reference_path(config, workdir, extractor)
  keep = ev.pr_num_samples if ev.precision_recall else 0
  have_stats = chief_says(path.exists())
  if not have_stats:
    logging.info("Computing reference statistics of %s with %s -> %s.", config.data.name,
                 extractor.name, path)
    stats = _reference_pass(config, extractor)
    if jax.process_index() == 0:
      _save_stats(stats, path)
  if jax.process_index() != 0:
    return None, path, None
  real = None
  if keep:
    pr_path = _pr_path(path, keep)
    if not pr_path.exists():
      images.save_npz(pr_path, features=_first_real_features(config, extractor, keep))
    with pr_path.open("rb") as f:
      real = np.load(f, allow_pickle=False)["features"]
  return _load_stats(path), path, real
