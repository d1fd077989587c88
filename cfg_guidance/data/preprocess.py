"""Image decoding and resizing in numpy: centre crop, then area resize as the paper did.

Runs inside grain worker threads and processes, so it uses PIL and numpy (both release the
GIL in their heavy loops) instead of importing TensorFlow into every worker.
"""

import functools
import io

import numpy as np
from PIL import Image

# What PIL raises on corrupt, truncated or unrecognised images (UnidentifiedImageError and
# "image file is truncated" are OSErrors). These examples are counted and skipped.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_rgb(data: bytes) -> np.ndarray:
  """Decodes an encoded image (JPEG, PNG, ...; grey, CMYK or palette) to uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def center_crop(image: np.ndarray) -> np.ndarray:
  """The largest central square: [H, W, C] -> [S, S, C] with S = min(H, W)."""
  height, width = image.shape[:2]
  size = min(height, width)
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


@functools.lru_cache(maxsize=1024)
def area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Sparse weights of area (box-integral) resampling from in_size to out_size samples.

  Output sample i averages the input over [i s, (i + 1) s), s = in_size / out_size, where
  input sample j covers [j, j + 1) and contributes its overlap with that interval, over s.
  Returns (index [out_size, K] int, weight [out_size, K] float32), K taps per output.
  """
  scale = in_size / out_size
  lo = np.arange(out_size) * scale
  hi = lo + scale
  first = np.minimum(np.floor(lo).astype(np.int64), in_size - 1)
  num_taps = int(np.max(np.ceil(hi).astype(np.int64) - first))
  index = first[:, None] + np.arange(num_taps)
  overlap = np.minimum(hi[:, None], index + 1) - np.maximum(lo[:, None], index)
  weight = (np.clip(overlap, 0.0, None) / scale).astype(np.float32)
  index = np.minimum(index, in_size - 1)  # Taps past the end carry zero weight.
  for array in (index, weight):
    array.flags.writeable = False
  return index, weight


def _area_resize_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Area resampling along axis 0: [N, ...] -> float32 [size, ...]."""
  index, weight = area_taps(x.shape[0], size)
  # A few gathered multiply-adds instead of a dense averaging matmul: as fast, and no
  # OpenBLAS thread pool spinning up inside every data-loading thread.
  out = np.zeros((size,) + x.shape[1:], np.float32)
  expand = (slice(None),) + (None,) * (x.ndim - 1)
  for tap in range(index.shape[1]):
    out += weight[:, tap][expand] * x[index[:, tap]]
  return out


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Area resize of [H, W, C] to float32 [size, size, C], as tf.image.resize(method="area")."""
  x = _area_resize_rows(np.asarray(image, np.float32), size)  # [size, W, C]
  return np.ascontiguousarray(_area_resize_rows(x.transpose(1, 0, 2), size).transpose(1, 0, 2))


def to_signed_unit(image: np.ndarray) -> np.ndarray:
  """Maps pixel values in [0, 255] to float32 [-1, 1]."""
  return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def preprocess_encoded(data: bytes, image_size: int, flip: bool) -> np.ndarray:
  """Encoded image -> float32 [image_size, image_size, 3] in [-1, 1].

  Centre crop to a square, area resize (skipped when the square already has the size),
  then an optional horizontal flip. Raises one of DECODE_ERRORS on unreadable data.
  """
  image = center_crop(decode_rgb(data))
  if image.shape[0] != image_size:
    image = area_resize(image, image_size)
  if flip:
    image = image[:, ::-1]
  return to_signed_unit(image)
