"""Evaluation's reference side: the feature extractor and the real data's statistics.

One `.npz` per data set and extractor holds the training split's FID statistics (`mu`,
`sigma`, ...), sFID's (`mu_s`, `sigma_s`, ..., as in ADM's reference batches) and the
precision/recall real set: the record indices of a seeded, uniformly random subset
(`pr_indices`, `pr_seed`, `pr_num_samples`) and their features (`pr_features`), so a
rerun compares with the same images. Every process takes part; process 0 decides and
writes.
"""

import dataclasses
import logging

from etils import epath
import jax
import numpy as np

from cfg_guidance import files, images
from cfg_guidance.data import pipeline, sources, stream
from cfg_guidance.evaluation import classifier, inception, metrics
from cfg_guidance.runtime import distributed

SPATIAL_SUFFIX = "_s"  # ADM's reference batches name sFID's statistics mu_s, sigma_s.
PR_KEYS = ("pr_indices", "pr_features", "pr_seed", "pr_num_samples")
_PR_STREAM = 2  # Keeps the subset's draw apart from other uses of eval.pr_seed.
# What process 0 tells the others to do (bits), or that it is raising.
_PASS, _SUBSET, _ERROR = 1, 2, 4


@dataclasses.dataclass
class Reference:
  """The real data's side of every metric (process 0's; None elsewhere).

  stats: FID statistics; spatial: sFID statistics, None without spatial features;
  real_features: float32 [M, D] precision/recall real set, None when not asked for;
  real_indices: [M] its record indices in the training split (None for a real set that
  came from an ADM reference batch's images).
  """
  path: epath.Path
  stats: metrics.FeatureStats | None = None
  spatial: metrics.FeatureStats | None = None
  real_features: np.ndarray | None = None
  real_indices: np.ndarray | None = None


def _training_arrays(data_config) -> tuple[np.ndarray, np.ndarray]:
  """The whole training split in memory: float [N, H, W, C] in [-1, 1], int labels [N]."""
  if data_config.name == "digits":
    return sources.load_digits_arrays()
  batches = list(pipeline.iterate_once(data_config, batch_size=1024, process_index=0,
                                       process_count=1))
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))


def make_extractor(eval_config, data_config, workdir, *, num_classes: int, seed: int,
                   eval_dir=None):
  """Inception-v3 from eval.inception_path, or the stand-in CNN in WORKDIR/classifier/
  (trained on the data's training split if it is not there yet: into
  EVAL_DIR/classifier/ when an eval directory other than WORKDIR/eval is given, so that a
  read-only run can be evaluated)."""
  ev = eval_config
  if ev.extractor == "inception":
    return inception.InceptionExtractor(ev.inception_path)
  checkpoint_dir = classifier.resolve_checkpoint_dir(epath.Path(workdir)
                                                     / classifier.CHECKPOINT_SUBDIR)
  if (eval_dir is not None and epath.Path(eval_dir) != epath.Path(workdir) / "eval"
      and not classifier.is_checkpoint(checkpoint_dir)):
    checkpoint_dir = classifier.resolve_checkpoint_dir(epath.Path(eval_dir)
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


def reference_path(eval_config, data_config, eval_dir, extractor) -> epath.Path:
  """eval.reference_stats, else EVAL_DIR/reference_<data>_<extractor>.npz."""
  if eval_config.reference_stats:
    return epath.Path(eval_config.reference_stats)
  return epath.Path(eval_dir) / f"reference_{data_config.name}_{extractor.name}.npz"


def spatial_dim(extractor) -> int | None:
  """The extractor's spatial feature size (sFID), None if it has no spatial features."""
  return getattr(extractor, "spatial_dim", None)


def _extract(extractor, x):
  """(features, spatial features or None) of uint8 images x."""
  if spatial_dim(extractor) is None:
    return extractor(x)[0], None
  features, _, spatial = extractor(x, spatial=True)
  return features, spatial


def _reference_pass(data_config, extractor, batch_size: int, image_shape):
  """FID and sFID statistics of the whole training split (process 0's; empty elsewhere).

  Every process reads its shard; rounds of a fixed size with a validity mask keep every
  process in every gather until all are done.
  """
  per_process = -(-batch_size // jax.process_count())
  batches = pipeline.iterate_once(data_config, batch_size=per_process)
  stats = metrics.FeatureStats()
  spatial = None if spatial_dim(extractor) is None else metrics.FeatureStats()
  while True:
    batch = next(batches, None)
    n = 0 if batch is None else len(batch["label"])
    x = (np.zeros((0, *image_shape), np.uint8) if batch is None
         else images.to_uint8(batch["image"]))
    outputs = [a for a in _extract(extractor, x) if a is not None]
    padded = [np.zeros((per_process, a.shape[1]), np.float32) for a in outputs]
    for p, a in zip(padded, outputs):
      p[:n] = a
    *gathered, valid = distributed.gather(*padded, np.arange(per_process) < n)
    if not valid.any():
      return stats, spatial
    if jax.process_index() == 0:
      stats.update(gathered[0][valid])
      if spatial is not None:
        spatial.update(gathered[1][valid])


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def draw_subset(num_records: int, num: int, seed: int) -> np.ndarray:
  """Sorted int64 [min(num, num_records)] record indices, uniform without replacement."""
  rng = np.random.default_rng([seed, _PR_STREAM])
  return np.sort(rng.choice(num_records, size=min(num, num_records), replace=False))


def subset_features(data_config, extractor, indices: np.ndarray, batch_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [M, D] features, [M] indices) of the split's records `indices`.

  Process p reads its contiguous share of the indices by random access; process 0
  gathers them (empty arrays elsewhere). Unreadable records are left out.
  """
  # The data layer's random-access source: iterate_once only reads whole shards.
  source = pipeline.open_source(data_config, "train")
  process, count = jax.process_index(), jax.process_count()
  start, stop = stream.shard_range(len(indices), process, count, drop_remainder=False)
  per_process = _ceil_div(batch_size, count)
  num_rounds = _ceil_div(_ceil_div(len(indices), count), per_process)  # The same on all.
  kept_features, kept_indices = [], []
  for r in range(num_rounds):
    records = indices[start + r * per_process:min(start + (r + 1) * per_process, stop)]
    x, _, ok = source.load(records, np.zeros(len(records), bool))
    records = records[ok]
    features, _ = _extract(extractor, images.to_uint8(x[ok]))
    padded = np.zeros((per_process, features.shape[1]), np.float32)
    padded[:len(records)] = features
    padded_indices = np.full(per_process, -1, np.int64)
    padded_indices[:len(records)] = records
    features, got = distributed.gather(padded, padded_indices)
    kept_features.append(features[got >= 0])
    kept_indices.append(got[got >= 0])
  features, got = np.concatenate(kept_features), np.concatenate(kept_indices)
  if len(got) < len(indices) and process == 0:
    logging.warning("%d of the %d precision/recall reference records are unreadable; "
                    "using the other %d.", len(indices) - len(got), len(indices), len(got))
  order = np.argsort(got)
  return features[order], got[order]


def _plan(ev, path: epath.Path, extractor) -> tuple[int, dict | None, str]:
  """(action bits, the file's arrays or None, error message) on process 0."""
  if not path.exists():
    return _PASS | (_SUBSET if ev.precision_recall else 0), None, ""
  arrays = files.load_npz(path)
  action, ours = 0, "count" in arrays
  if spatial_dim(extractor) is not None and "mu" + SPATIAL_SUFFIX not in arrays:
    if ev.reference_stats:
      return _ERROR, None, (
          f"config.eval.reference_stats={ev.reference_stats!r} has no sFID statistics "
          f"(mu{SPATIAL_SUFFIX}, sigma{SPATIAL_SUFFIX}): it predates sFID or comes from "
          "another tool. Delete it to recompute it there, leave the field unset to "
          "compute WORKDIR/eval/'s, or use an ADM reference batch (which has them).")
    logging.warning("%s predates sFID (no mu_s/sigma_s); recomputing it.", path)
    return _PASS | (_SUBSET if ev.precision_recall else 0), None, ""
  if ev.precision_recall and "arr_0" not in arrays and not (
      set(PR_KEYS) <= set(arrays) and int(arrays["pr_seed"]) == ev.pr_seed
      and int(arrays["pr_num_samples"]) == ev.pr_num_samples):
    action |= _SUBSET
    if not ours:
      logging.info("%s cannot hold the precision/recall real set; drawing it each run.",
                   path)
  return action, arrays, ""


def reference_statistics(eval_config, data_config, eval_dir, extractor, *,
                         image_shape) -> Reference:
  """The training split's Reference, from `reference_path` or computed and saved there.

  A missing file is computed (one pass over the split) and written by process 0; a
  workdir file from before sFID is recomputed, while an eval.reference_stats file
  without sFID's statistics raises ValueError. The precision/recall real set is
  eval.pr_num_samples records drawn from eval.pr_seed; a file that holds another draw
  (or none) gets this one added. An ADM reference batch (mu, sigma, mu_s, sigma_s,
  arr_0) is used as ADM's evaluator uses it: its images are the real set.
  """
  ev = eval_config
  path = reference_path(ev, data_config, eval_dir, extractor)
  is_chief = jax.process_index() == 0
  action, arrays, error = _plan(ev, path, extractor) if is_chief else (0, None, "")
  action = distributed.chief_value(action)
  if action & _ERROR:
    raise ValueError(error or f"Process 0 found {path} unusable (see its log).")
  if action & _PASS:
    logging.info("Computing reference statistics of %s with %s -> %s.", data_config.name,
                 extractor.name, path)
    stats, spatial = _reference_pass(data_config, extractor, ev.batch_size, image_shape)
    if is_chief:
      arrays = stats.to_arrays()
      if spatial is not None:
        arrays.update(spatial.to_arrays(SPATIAL_SUFFIX))
  if action & _SUBSET:
    num_records = distributed.chief_value(
        len(pipeline.open_source(data_config, "train")) if is_chief else 0)
    indices = draw_subset(num_records, ev.pr_num_samples, ev.pr_seed)
    features, indices = subset_features(data_config, extractor, indices, ev.batch_size)
    if is_chief:
      arrays.update(pr_indices=indices, pr_features=features,
                    pr_seed=np.int64(ev.pr_seed),
                    pr_num_samples=np.int64(ev.pr_num_samples))
  if is_chief and (action & _PASS or (action & _SUBSET and "count" in arrays)):
    files.save_npz(path, **arrays)
  if not is_chief:
    return Reference(path)
  return _from_arrays(arrays, path, extractor, ev.precision_recall)


def _from_arrays(arrays: dict, path: epath.Path, extractor, precision_recall: bool
                 ) -> Reference:
  source = repr(str(path))
  ref = Reference(path, stats=metrics.FeatureStats.from_arrays(arrays, source=source))
  if spatial_dim(extractor) is not None:
    ref.spatial = metrics.FeatureStats.from_arrays(arrays, SPATIAL_SUFFIX, source=source)
  if not precision_recall:
    return ref
  if "pr_features" in arrays:
    ref.real_features = arrays["pr_features"].astype(np.float32)
    ref.real_indices = arrays["pr_indices"]
  else:  # ADM's reference batch: its images, uint8 [N, H, W, 3], are the real set.
    ref.real_features = np.asarray(extractor(arrays["arr_0"])[0], np.float32)
  return ref
