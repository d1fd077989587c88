"""What a job reports: scalars and images to TensorBoard, the log and (optionally) W&B;
progress lines with an ETA.

The TensorBoard files are written with the `tensorboard` package's own event writer and
protos, in the layout `tf.summary` (and CLU's SummaryWriter) writes: scalars and images
as tensor summaries of the `scalars` and `images` plugins, hyper-parameters for the
`hparams` plugin. So TensorBoard, its EventAccumulator and `tensorboard --inspect` read
them as before, and a core install needs no TensorFlow. (tensorboard opens files through
TensorFlow's gfile when TensorFlow is installed, so `gs://` log directories need the
`[tf]` extra or fsspec's gcsfs.)
"""

import hashlib
import io
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import numpy as np


class Writer:
  """`write_scalars` / `write_images` / `write_hparams`, as CLU's metric writers.

  Every process logs; only the chief (`is_chief`) writes event files and W&B. Values are
  written as they come (no background thread): call `flush()` before reading them back.
  """

  def __init__(self, logdir: str | epath.Path, *, is_chief: bool = True,
               wandb_config: Mapping[str, Any] | None = None, job: str = "train"):
    self.logdir = epath.Path(logdir)
    self._events = None
    self._wandb = None
    if is_chief:
      # pylint: disable=g-import-not-at-top
      from tensorboard.summary.writer import event_file_writer
      # pylint: enable=g-import-not-at-top
      self._events = event_file_writer.EventFileWriter(str(self.logdir))
      if wandb_config and wandb_config.get("enabled"):
        self._wandb = _start_wandb(self.logdir, wandb_config, job)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
    if self._events is not None:
      # pylint: disable=g-import-not-at-top
      from tensorboard.compat.proto import summary_pb2
      from tensorboard.plugins.scalar import metadata
      from tensorboard.util import tensor_util
      # pylint: enable=g-import-not-at-top
      values = [summary_pb2.Summary.Value(
          tag=k, metadata=metadata.create_summary_metadata(display_name=k, description=""),
          tensor=tensor_util.make_tensor_proto(np.float32(v)))
                for k, v in scalars.items()]
      self._write(step, summary_pb2.Summary(value=values))
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: {name: uint8 [N, H, W, C]} (C = 1 or 3), as tf.summary.image takes."""
    logging.info("[%d] Images: %s", step,
                 ", ".join(f"{k} {np.shape(v)}" for k, v in images.items()))
    if self._events is not None:
      # pylint: disable=g-import-not-at-top
      from tensorboard.compat.proto import summary_pb2
      from tensorboard.plugins.image import metadata
      from tensorboard.util import tensor_util
      # pylint: enable=g-import-not-at-top
      values = []
      for name, batch in images.items():
        batch = _uint8_batch(name, batch)
        # The image plugin's tensor: [width, height, png_1, ..., png_N] as strings.
        strings = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode(),
                   *(_png(image) for image in batch)]
        values.append(summary_pb2.Summary.Value(
            tag=name, metadata=metadata.create_summary_metadata(display_name=name,
                                                          description=""),
            tensor=tensor_util.make_tensor_proto(strings, dtype="string")))
      self._write(step, summary_pb2.Summary(value=values))
    if self._wandb is not None:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({k: [wandb.Image(image) for image in _uint8_batch(k, v)]
                       for k, v in images.items()}, step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Flat {name: bool | int | float | str} (see `flat_hparams`)."""
    logging.info("Hyper-parameters: %s", dict(hparams))
    if self._events is not None:
      # pylint: disable=g-import-not-at-top
      from tensorboard.plugins.hparams import summary_v2
      # pylint: enable=g-import-not-at-top
      self._write(0, summary_v2.hparams_pb(dict(hparams)))
    if self._wandb is not None:
      self._wandb.config.update(dict(hparams), allow_val_change=True)

  def _write(self, step: int, summary) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def flat_hparams(d: Mapping[str, Any], prefix: str = "") -> dict:
  """A nested config dict → {"train.batch_size": 128, ...}, values bool/int/float/str."""
  flat = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      flat.update(flat_hparams(v, f"{prefix}{k}."))
    else:
      flat[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
  return flat


def _uint8_batch(name: str, batch) -> np.ndarray:
  batch = np.asarray(batch)
  if batch.ndim != 4 or batch.shape[-1] not in (1, 3) or batch.dtype != np.uint8:
    raise ValueError(f"Image {name!r}: want uint8 [N, H, W, 1 or 3], got {batch.dtype} "
                     f"{batch.shape}.")
  return batch


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


# --- Weights & Biases (config.wandb): off by default; `pip install "cfg_guidance[wandb]"`.

def _start_wandb(logdir: epath.Path, c: Mapping[str, Any], job: str):
  """One W&B run per log directory and job: a resumed training continues its run."""
  import wandb  # pylint: disable=g-import-not-at-top
  id_file = logdir / f"wandb_{job}_id.txt"
  if id_file.exists():
    run_id = id_file.read_text().strip()
  else:  # Unique, and the same on every restart of this job in this directory.
    run_id = f"{job}-" + hashlib.sha1(f"{logdir}:{time.time()}".encode()).hexdigest()[:10]
    logdir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
  local = str(logdir) if "://" not in str(logdir) else None  # W&B writes a local folder.
  return wandb.init(project=c.get("project"), entity=c.get("entity"),
                    name=c.get("name") or f"{logdir.name}/{job}", group=c.get("group"),
                    tags=list(c.get("tags") or ()), mode=c.get("mode") or None,
                    job_type=job, dir=local, id=run_id, resume="allow")


class Progress:
  """Logs `what: done/total unit (p%), rate unit/s, ETA` when called with `done`."""

  def __init__(self, what: str, total: int, unit: str = "samples", start: int = 0):
    self.what, self.total, self.unit = what, total, unit
    self.start_count, self.start_time = start, time.monotonic()

  def __call__(self, done: int) -> None:
    elapsed = time.monotonic() - self.start_time
    rate = (done - self.start_count) / max(elapsed, 1e-9)
    left = (self.total - done) / rate if rate > 0 else float("inf")
    logging.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s", self.what, done, self.total,
                 self.unit, 100 * done / self.total, rate, self.unit, clock_text(left))


def clock_text(seconds: float) -> str:
  """12s, 3m05s, 2h07m."""
  if not np.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
