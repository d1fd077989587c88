"""What the w-sweep reports: each w's running statistics, then results.json, CSV, a
Markdown table like the paper's Table 1, and plots. Every write is atomic.
"""

import csv
import io
import json
import math
import os

from etils import epath
import numpy as np

from cfg_guidance import files, images
from cfg_guidance.evaluation import manifold, metrics

PR_K = manifold.K

# Record keys in table order, with the direction that is better (Table 1: FID ↓, IS ↑).
METRICS = (("fid", "↓"), ("sfid", "↓"), ("is", "↑"), ("precision", "↑"), ("recall", "↑"),
           ("accuracy", "↑"), ("diversity", ""))


class SweepStats:
  """Running statistics of one guidance weight's samples, fed a batch at a time.

  FID/IS moments (metrics.FeatureStats, IS splits by global index), sFID's moments of
  the spatial features (`with_spatial`), the classifier's accuracy on the intended
  labels, per-class feature moments for the diversity, and with `precision_recall` every
  sample's features as float32 (ADM compares all 50,000 samples: 400 MB at D = 2048).
  Rows with index >= num_samples (the padding of a last batch) are dropped.
  """

  def __init__(self, *, num_samples: int, num_classes: int,
               precision_recall: bool = False, with_accuracy: bool = False,
               with_spatial: bool = False, num_splits: int = metrics.DEFAULT_SPLITS):
    self.num_samples, self.num_classes = num_samples, num_classes
    self.precision_recall, self.with_accuracy = precision_recall, with_accuracy
    self.fid_is = metrics.FeatureStats(num_samples=num_samples, num_splits=num_splits)
    self.spatial = metrics.FeatureStats() if with_spatial else None
    self.num_correct = 0
    self.class_count = np.zeros(num_classes, np.int64)
    self._class_mean = self._class_m2 = None  # [K, D] float64.
    self._kept = []

  def add(self, indices, features, logits, labels, spatial=None) -> None:
    """indices, labels: [B] ints; features: [B, D]; logits: [B, C]; spatial: [B, S]."""
    indices = np.asarray(indices)
    valid = indices < self.num_samples
    indices, labels = indices[valid], np.asarray(labels)[valid]
    kept = np.asarray(features)[valid]
    features = kept.astype(np.float64)
    logits = np.asarray(logits, np.float64)[valid]
    self.fid_is.update(features, logits, indices=indices)
    if self.spatial is not None:
      self.spatial.update(np.asarray(spatial, np.float64)[valid])
    if self.with_accuracy:
      self.num_correct += int(np.sum(np.argmax(logits, axis=-1) == labels))
    self._add_class_moments(features, labels)
    if self.precision_recall:
      self._kept.append(kept.astype(np.float32))

  def _add_class_moments(self, features, labels):
    """Chan et al.'s merge of per-class count, mean and M2 (per feature dimension)."""
    if self._class_mean is None:
      self._class_mean = np.zeros((self.num_classes, features.shape[1]))
      self._class_m2 = np.zeros_like(self._class_mean)
    count = np.bincount(labels, minlength=self.num_classes)
    mean = np.zeros_like(self._class_mean)
    np.add.at(mean, labels, features)
    mean /= np.maximum(count, 1)[:, None]
    m2 = np.zeros_like(self._class_m2)
    np.add.at(m2, labels, np.square(features - mean[labels]))
    total = self.class_count + count
    frac = (count / np.maximum(total, 1))[:, None]
    delta = mean - self._class_mean
    self._class_mean += delta * frac
    self._class_m2 += m2 + np.square(delta) * (self.class_count[:, None] * frac)
    self.class_count = total

  def diversity(self) -> float:
    """Mean over classes (with >= 2 samples) of the features' mean per-dimension std."""
    ok = self.class_count >= 2
    if not ok.any():
      return float("nan")
    var = self._class_m2[ok] / (self.class_count[ok, None] - 1)
    return float(np.sqrt(var).mean(axis=1).mean())

  def results(self, reference: metrics.FeatureStats,
              real_features: np.ndarray | None = None,
              spatial_reference: metrics.FeatureStats | None = None) -> dict:
    """{fid, [sfid], is, is_std, [precision, recall], [accuracy], diversity}.

    reference, spatial_reference: the training split's FID and sFID statistics;
    real_features: [M, D], the precision/recall real set.
    """
    out = {"fid": self.fid_is.frechet_distance(reference)}
    if self.spatial is not None:
      out["sfid"] = self.spatial.frechet_distance(spatial_reference)
    out["is"], out["is_std"] = self.fid_is.inception_score()
    if self.precision_recall:
      out["precision"], out["recall"] = manifold.precision_recall(
          real_features, np.concatenate(self._kept), k=PR_K)
    if self.with_accuracy:
      out["accuracy"] = self.num_correct / self.fid_is.count
    out["diversity"] = self.diversity()
    return out


def metric_labels(names: dict, extractor_name: str) -> dict:
  """Display labels of every record key; `names` is `metrics.metric_names(extractor)`.

  Accuracy and diversity always carry the extractor: they are not standard figures.
  """
  return {**names, "accuracy": f"Accuracy ({extractor_name})",
          "diversity": f"Intra-class feature std ({extractor_name})"}


def results_metadata(eval_config, settings, *, step: int, extractor, reference_path,
                     reference_count: int, checkpoint, pr_num_real: int | None = None
                     ) -> dict:
  """What results.json says besides the records: checkpoint, sampler, extractor, names.

  eval_config: config.eval; settings: the sweep's `generate.Settings`; pr_num_real: the
  size of the precision/recall real set.
  """
  ev, s = eval_config, settings
  names = metrics.metric_names(extractor)
  meta = dict(
      step=step, num_samples=ev.num_samples, sampler=s.sampler, num_steps=s.num_steps,
      grid=s.grid, num_evaluations=s.num_evaluations,
      v=s.v, eta=s.eta, clip_x=s.clip_x, seed=ev.seed,
      logsnr_min=s.logsnr_min, logsnr_max=s.logsnr_max,
      extractor=extractor.name, comparable=bool(extractor.comparable), metric_names=names,
      metric_labels=metric_labels(names, extractor.name),
      reference_stats=os.fspath(reference_path), reference_count=reference_count or None,
      checkpoint=os.fspath(checkpoint))
  if ev.precision_recall:
    meta.update(pr_num_real=pr_num_real, pr_num_fake=ev.num_samples, pr_seed=ev.pr_seed,
                pr_k=PR_K)
  if getattr(extractor, "heldout_accuracy", None) is not None:
    meta["classifier_heldout_accuracy"] = extractor.heldout_accuracy
  return meta


def write_scalars(writer, step: int, metadata: dict, records: list[dict]) -> None:
  """TensorBoard scalars "<label>/w=<w>" at the checkpoint's step (CLU metric writer)."""
  labels = metadata["metric_labels"]
  writer.write_scalars(step, {f"{labels[key]}/w={r['w']:g}": r[key]
                              for r in records for key, _ in METRICS if key in r})
  writer.flush()


def _finite_or_none(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def to_json(metadata: dict, records: list[dict]) -> str:
  """{**metadata, "records": [...]}; a non-finite number becomes null (valid JSON)."""
  clean = [{k: _finite_or_none(v) for k, v in r.items()} for r in records]
  return json.dumps({**metadata, "records": clean}, indent=2, allow_nan=False)


def to_csv(records: list[dict]) -> str:
  """One row per w; floats written with repr, so they read back exactly."""
  columns = list(records[0])
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(columns)
  for r in records:
    writer.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in columns])
  return buf.getvalue()


def _columns(records: list[dict]) -> list[str]:
  return [key for key, _ in METRICS if key in records[0]]


def format_cell(record: dict, key: str) -> str:
  value = record[key]
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  if key == "is":
    return f"{value:.2f} ± {record['is_std']:.2f}"
  return f"{value:.4f}" if key in ("precision", "recall", "accuracy") else f"{value:.3f}"


def to_markdown(metadata: dict, records: list[dict]) -> str:
  """Table 1's layout: one row per w, the metrics as columns, a caption with the setup."""
  labels = metadata["metric_labels"]
  arrows = dict(METRICS)
  columns = _columns(records)
  header = ["Guidance"] + [f"{labels[c]} {arrows[c]}".rstrip() for c in columns]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join([":--"] + ["--:"] * len(columns)) + "|"]
  for r in records:
    lines.append("| " + " | ".join([f"w = {r['w']:g}"] + [format_cell(r, c) for c in columns])
                 + " |")
  if metadata["sampler"] == "ancestral":
    sampler = f"ancestral sampler, T = {metadata['num_steps']}, v = {metadata['v']:g}"
  else:
    sampler = (f"{metadata['sampler']} sampler, {metadata['num_steps']} steps "
               f"({metadata.get('num_evaluations', metadata['num_steps'])} network "
               f"evaluations, {metadata.get('grid', 'u')} grid)")
  caption = (f"Step {metadata['step']}: {metadata['num_samples']} samples per w, "
             f"{sampler}; features: {metadata['extractor']}")
  if not metadata["comparable"]:
    caption += " (a stand-in network: not comparable with published FID/IS"
    caption += "; sFID from its last convolution)" if "sfid" in records[0] else ")"
  return "\n".join(lines) + f"\n\n{caption}.\n"


def figure_png(figure) -> bytes:
  # The Agg canvas directly, so a user's interactive pyplot backend is left alone.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(figure)
  buf = io.BytesIO()
  figure.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def plot_fid_vs_is(metadata: dict, records: list[dict]) -> bytes:
  """Figs. 4/5: FID against IS, one point per w, labelled with w. Returns PNG bytes."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  labels = metadata["metric_labels"]
  fig = Figure(figsize=(5, 4))
  ax = fig.add_subplot()
  fid = [r["fid"] for r in records]
  inception = [r["is"] for r in records]
  ax.plot(inception, fid, "o-")
  for r in records:
    ax.annotate(f"w={r['w']:g}", (r["is"], r["fid"]), textcoords="offset points",
                xytext=(4, 4), fontsize=7)
  ax.set_xlabel(labels["is"])
  ax.set_ylabel(labels["fid"])
  ax.set_title(f"Step {metadata['step']}")
  ax.grid(alpha=0.3)
  return figure_png(fig)


def plot_metrics_vs_w(metadata: dict, records: list[dict]) -> bytes:
  """One panel per metric against w. Returns PNG bytes."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  labels = metadata["metric_labels"]
  columns = _columns(records)
  num_cols = min(3, len(columns))
  num_rows = -(-len(columns) // num_cols)
  fig = Figure(figsize=(4 * num_cols, 3.2 * num_rows), layout="constrained")
  w = [r["w"] for r in records]
  for i, key in enumerate(columns):
    ax = fig.add_subplot(num_rows, num_cols, i + 1)
    values = np.array([np.nan if r[key] is None else r[key] for r in records], float)
    ax.plot(w, values, "o-")
    if key == "is":
      ax.errorbar(w, values, yerr=[r["is_std"] for r in records], fmt="none", capsize=2)
    ax.set_xlabel("guidance weight w")
    ax.set_title(labels[key], fontsize=9)
    ax.grid(alpha=0.3)
  fig.suptitle(f"Step {metadata['step']}")
  return figure_png(fig)


def sample_grid(left: np.ndarray, right: np.ndarray, num_cols: int) -> np.ndarray:
  """Figs. 6/7: random classes (left) beside one class (right), a blank column between.

  left, right: [n, H, W, C] in [-1, 1] → one uint8 [H', W', C] image, enlarged so that
  small images stay visible.
  """
  left_grid = images.make_grid(images.to_uint8(left), num_cols)
  right_grid = images.make_grid(images.to_uint8(right), num_cols)
  gap = np.full((left_grid.shape[0], left.shape[2] + 1, left_grid.shape[2]), 255, np.uint8)
  grid = np.concatenate([left_grid, gap, right_grid], axis=1)
  return images.upscale(grid, max(1, 32 // left.shape[1]))


def write_all(out_dir: epath.Path, metadata: dict, records: list[dict]) -> dict:
  """Writes CSV, Markdown and plots, then results.json last (its presence means done).

  Returns {kind: path}.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"csv": out_dir / "results.csv", "markdown": out_dir / "results.md",
           "fid_vs_is": out_dir / "fid_vs_is.png",
           "metrics_vs_w": out_dir / "metrics_vs_w.png", "json": out_dir / "results.json"}
  files.atomic_write_bytes(paths["csv"], to_csv(records).encode())
  files.atomic_write_bytes(paths["markdown"], to_markdown(metadata, records).encode())
  files.atomic_write_bytes(paths["fid_vs_is"], plot_fid_vs_is(metadata, records))
  files.atomic_write_bytes(paths["metrics_vs_w"], plot_metrics_vs_w(metadata, records))
  files.atomic_write_bytes(paths["json"], to_json(metadata, records).encode())
  return paths
