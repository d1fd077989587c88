"""Input-pipeline throughput (images/s) of the 64x64 ImageNet-shaped pipeline: grain vs tf.data.

  python -m bench.input_bench [--quick] [--folder=DIR]

Both read the same folder of JPEGs with ImageNet-like sizes (generated into a temporary
folder unless --folder is given), centre-crop, area-resize to 64x64, flip and batch, in
one process. Numbers depend on the cores available; report them with the core count.
"""

import argparse
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

from cfg_guidance.data import pipeline
from cfg_guidance.data import preprocess
from cfg_guidance.data import sources

# (width, height) of common ImageNet train images; the mean JPEG there is ~110 kB.
IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (400, 300))


def make_image_folder(root: str, num_images: int, num_classes: int = 10, seed: int = 0) -> str:
  """Writes num_images JPEGs (quality 90, smooth content plus noise) under root/<class>/."""
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    width, height = IMAGENET_SIZES[i % len(IMAGENET_SIZES)]
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    class_dir = os.path.join(root, f"class_{i % num_classes:03d}")
    os.makedirs(class_dir, exist_ok=True)
    Image.fromarray(noisy).save(os.path.join(class_dir, f"{i:06d}.jpg"), quality=90)
  return root


def _rate(batches, batch_size: int, num_batches: int) -> dict:
  """Images per wall-clock second, and per CPU-second of this process (all its threads).

  On a shared machine the second is the fairer comparison: wall-clock rates also measure
  how much of the CPUs each pipeline wins from other jobs. Worker processes' CPU time is
  not in this process, so the CPU rate is left out for them.
  """
  next(batches)  # Warm-up: thread pools, worker processes, TF graph tracing.
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(batches)
  num_images = batch_size * num_batches
  return {"images_per_s": num_images / (time.perf_counter() - wall),
          "images_per_cpu_s": num_images / (time.process_time() - cpu)}


def grain_rate(folder: str, *, num_threads: int, num_workers: int, batch_size: int,
               num_batches: int) -> dict:
  """Images/s of pipeline.create_dataset on an image folder."""
  config = ml_collections.ConfigDict(dict(
      name="image_folder", folder=folder, image_size=64, random_flip=True,
      num_threads=num_threads, num_workers=num_workers))
  it = pipeline.create_dataset(config, global_batch_size=batch_size, seed=0,
                                     process_index=0, process_count=1)
  try:
    rates = _rate(it, batch_size, num_batches)
  finally:
    it.close()
  if num_workers:
    del rates["images_per_cpu_s"]
  return rates


def tfdata_rate(folder: str, *, batch_size: int, num_batches: int) -> dict:
  """Images/s of the same preprocessing written as a tf.data pipeline (AUTOTUNE)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, files, labels = sources.list_image_folder(folder)
  paths = [os.path.join(folder, f) for f in files]

  def load(path, label, seed):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.minimum(height, width)
    image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                          side, side)
    image = tf.image.resize(image, (64, 64), method="area")
    image = tf.image.stateless_random_flip_left_right(image, seed)
    return {"image": image / 127.5 - 1.0, "label": tf.cast(label, tf.int32)}

  dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=0)
  dataset = tf.data.Dataset.zip(
      dataset.repeat(), tf.data.Dataset.random(seed=0).batch(2)).map(
          lambda example, seed: load(*example, seed), num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _rate(dataset.as_numpy_iterator(), batch_size, num_batches)


def per_image_ms(folder: str, num: int = 50) -> dict:
  """Single-thread CPU cost of the two stages of preprocess_encoded, in ms per image."""
  _, files, _ = sources.list_image_folder(folder)
  blobs = [open(os.path.join(folder, f), "rb").read() for f in files[:num]]
  start = time.process_time()
  squares = [preprocess.center_crop(preprocess.decode_rgb(b)) for b in blobs]
  decode = time.process_time() - start
  start = time.process_time()
  for square in squares:
    preprocess.area_resize(square, 64)
  resize = time.process_time() - start
  return {"decode_crop_cpu_ms": 1e3 * decode / len(blobs),
          "area_resize_cpu_ms": 1e3 * resize / len(blobs),
          "mean_jpeg_kb": float(np.mean([len(b) for b in blobs]) / 1e3)}


def run(quick: bool = False, folder: str | None = None) -> dict:
  """Images/s for grain (threads / worker processes) and tf.data on one folder."""
  num_images, batch_size, num_batches = (48, 8, 2) if quick else (512, 64, 12)
  with tempfile.TemporaryDirectory() as tmp:
    folder = folder or make_image_folder(tmp, num_images)
    results = {"cpu_count": os.cpu_count(), "batch_size": batch_size,
               **per_image_ms(folder, num=8 if quick else 50)}
    settings = [(2, 0)] if quick else [(1, 0), (2, 0), (4, 0), (1, 2)]
    for num_threads, num_workers in settings:
      results[f"grain_threads{num_threads}_workers{num_workers}"] = grain_rate(
          folder, num_threads=num_threads, num_workers=num_workers, batch_size=batch_size,
          num_batches=num_batches)
    results["tfdata_autotune"] = tfdata_rate(folder, batch_size=batch_size,
                                             num_batches=num_batches)
  return results


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="A few batches, as a smoke test.")
  parser.add_argument("--folder", help="An existing image folder to read instead.")
  args = parser.parse_args()
  print(json.dumps(run(quick=args.quick, folder=args.folder), indent=2))
