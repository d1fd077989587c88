"""Random-access example sources: in-memory arrays, TFDS data sources and image folders.

Every source has `len(source)` records and `source.load(records, flips)`, which returns
`(images, labels, ok)` for a batch of record indices; `ok[i]` is False for an example that
could not be read or decoded (its image is zeros), so callers can count and replace it.
"""

from collections.abc import Sequence

from absl import logging
from etils import epath
import numpy as np

from cfg_guidance.data import preprocess
from cfg_guidance.runtime import backend

# File name endings read by the image-folder source (case-insensitive); others are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class ArraySource:
  """Examples held in memory in their final form. images: float32 [N, ...], labels: [N].

  Every source has `num_classes` (its labels are 0..num_classes-1) and `example_shape`.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, *, flip_axis: int | None):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images = np.asarray(images, np.float32)
    self.labels = np.asarray(labels, np.int32)
    self.flip_axis = flip_axis  # Axis of a batch that a horizontal flip reverses.
    self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
    self.example_shape = tuple(self.images.shape[1:])

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, records: np.ndarray, flips: np.ndarray):
    """records, flips: [B] -> (images [B, ...], labels [B], ok [B])."""
    images = self.images[records]
    if self.flip_axis is not None and flips.any():
      images[flips] = np.flip(images[flips], axis=self.flip_axis)
    return images, self.labels[records], np.ones(len(records), bool)


class _EncodedSource:
  """Encoded images decoded one at a time; subclasses say how to read a record."""

  def __init__(self, image_size: int, num_classes: int):
    self.image_size = image_size
    self.num_classes = num_classes
    self.example_shape = (image_size, image_size, 3)

  def read(self, record: int) -> tuple[bytes, int]:
    raise NotImplementedError

  def describe(self, record: int) -> str:
    return f"record {record}"

  def load(self, records: np.ndarray, flips: np.ndarray):
    """records, flips: [B] -> (images float32 [B, S, S, 3] in [-1, 1], labels [B], ok [B])."""
    size = self.image_size
    images = np.zeros((len(records), size, size, 3), np.float32)
    labels = np.zeros(len(records), np.int32)
    ok = np.ones(len(records), bool)
    for i, (record, flip) in enumerate(zip(records, flips)):
      try:
        data, labels[i] = self.read(int(record))
        images[i] = preprocess.preprocess_encoded(data, size, bool(flip))
      except preprocess.DECODE_ERRORS as e:
        ok[i] = False
        logging.warning("Skipping unreadable example (%s): %s", self.describe(int(record)), e)
    return images, labels, ok


class TfdsSource(_EncodedSource):
  """A TFDS data source (ArrayRecord) whose image feature is left encoded for PIL."""

  def __init__(self, data_source: Sequence[dict], image_size: int, num_classes: int):
    super().__init__(image_size, num_classes)
    self.data_source = data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, record: int) -> tuple[bytes, int]:
    example = self.data_source[record]
    return example["image"], int(example["label"])


class FolderSource(_EncodedSource):
  """Image files under root/<class>/..., with labels given by the sorted class names."""

  def __init__(self, root: str, files: Sequence[str], labels: np.ndarray, image_size: int,
               num_classes: int):
    super().__init__(image_size, num_classes)
    self.root = root
    self.files = list(files)  # Relative to root.
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def read(self, record: int) -> tuple[bytes, int]:
    return epath.Path(self.root, self.files[record]).read_bytes(), int(self.labels[record])

  def describe(self, record: int) -> str:
    return str(epath.Path(self.root, self.files[record]))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: (images float32 [1797, 8, 8, 1] in [-1, 1], labels int32)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] / np.float32(8.0) - np.float32(1.0)
  return images, digits.target.astype(np.int32)


def list_image_folder(folder: str) -> tuple[list[str], list[str], np.ndarray]:
  """Scans root/<class>/<image>: (class names sorted, files relative to root, labels [N]).

  Raises ValueError naming `data.folder` when the folder is missing or holds no images.
  """
  root = epath.Path(folder)
  if not root.is_dir():
    raise ValueError(f"data.folder={folder!r} is not a directory.")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  files, labels = [], []
  for label, name in enumerate(classes):
    names = sorted(p.name for p in (root / name).iterdir()
                   if p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith("."))
    files.extend(f"{name}/{n}" for n in names)
    labels.extend([label] * len(names))
  if not files:
    raise ValueError(
        f"data.folder={folder!r} holds no images: expected one sub-folder per class with "
        f"files ending in {', '.join(IMAGE_EXTENSIONS)}.")
  return classes, files, np.asarray(labels, np.int32)


def open_tfds(tfds_name: str, split: str, data_dir: str | None) -> Sequence[dict]:
  """The ArrayRecord data source of a prepared TFDS data set; images stay encoded.

  Raises ValueError naming `data.data_dir`, with the command that prepares the data, when
  the data set is not there in ArrayRecord format. Never downloads.
  """
  tfds = backend.tensorflow_datasets(f"data.name={tfds_name!r} (a TFDS data set)")
  try:
    return tfds.data_source(
        tfds_name, split=split, data_dir=data_dir, download=False,
        builder_kwargs={"file_format": "array_record"},
        decoders={"image": tfds.decode.SkipDecoding()})
  except (KeyError, NotImplementedError, FileNotFoundError, tfds.core.DatasetNotFoundError) as e:
    raise ValueError(
        f"Cannot open TFDS {tfds_name!r} split {split!r} under data.data_dir={data_dir!r} "
        f"({type(e).__name__}: {e}). grain needs random access, so prepare ArrayRecord files "
        f"once: python -c \"import tensorflow_datasets as tfds; tfds.builder({tfds_name!r}, "
        f"data_dir={data_dir!r}, file_format='array_record').download_and_prepare()\" "
        "(imagenet2012 also needs download_config=tfds.download.DownloadConfig("
        "manual_dir=DIR) with ILSVRC2012_img_{train,val}.tar in DIR; see README).") from e
