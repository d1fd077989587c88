"""A small CNN classifier that stands in for Inception-v3 where its graph file is absent.

Trained on the data set's own training split; its penultimate features and logits
feed the same FID/IS code, the first channels of its last convolution the sFID code (as
Inception's mixed_6/conv does), and every figure it yields is labelled with its name
(see `metrics.metric_names`).
"""

import functools
import json
import os
import shutil
import tempfile

import flax.nnx as nnx
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from cfg_guidance.runtime import backend

CHECKPOINT_SUBDIR = "classifier"
_METADATA_FILE = "classifier.json"
SPATIAL_CHANNELS = 7  # As many as sFID takes of Inception's mixed_6/conv.


class SmallCNN(nnx.Module):
  """Two conv + average-pool stages, a hidden layer (the features), a linear head."""

  def __init__(self, *, image_shape, num_classes, channels=(32, 64), features=128,
               rngs):
    height, width, in_channels = image_shape
    if height % 4 or width % 4:
      raise ValueError(f"image_shape {image_shape}: height and width must be "
                       "multiples of 4 (two 2×2 poolings).")
    self.conv1 = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
    self.hidden = nnx.Linear((height // 4) * (width // 4) * channels[1], features,
                             rngs=rngs)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    """x: [N, H, W, C] in [-1, 1] -> (features [N, F], logits [N, num_classes])."""
    return self.activations(x)[:2]

  def activations(self, x):
    """(features, logits, spatial [N, H/2 · W/2 · 7]): the last convolution's first
    channels before its ReLU, flattened NHWC, as sFID takes Inception's mixed_6/conv."""
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
    conv = self.conv2(x)
    spatial = conv[..., :SPATIAL_CHANNELS].reshape(conv.shape[0], -1)
    x = nnx.avg_pool(nnx.relu(conv), (2, 2), strides=(2, 2))
    features = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return features, self.head(features), spatial


def _architecture(meta):
  """The hashable part of the metadata that fixes the network."""
  return (tuple(meta["image_shape"]), meta["num_classes"], tuple(meta["channels"]),
          meta["features"])


def _make(architecture, key):
  image_shape, num_classes, channels, features = architecture
  return SmallCNN(image_shape=image_shape, num_classes=num_classes, channels=channels,
                  features=features, rngs=nnx.Rngs(params=key))


def _abstract(meta):
  """(graphdef, parameter shapes) without computing anything."""
  architecture = _architecture(meta)
  return nnx.split(nnx.eval_shape(lambda: _make(architecture, jax.random.key(0))))


def _init_params(meta, seed):
  return _init_fn(_architecture(meta))(jax.random.key(seed))


# The compiled programs below are cached per architecture (graphdef) so that
# repeated training or restoring in one process does not compile again.
@functools.lru_cache(maxsize=16)
def _init_fn(architecture):
  # Inside jit: un-jitted initialisation is slow on CPU.
  return jax.jit(lambda key: nnx.state(_make(architecture, key)))


@functools.lru_cache(maxsize=16)
def _apply_fn(graphdef):
  return jax.jit(lambda params, x: nnx.merge(graphdef, params).activations(x))


@functools.lru_cache(maxsize=16)
def _train_fns(graphdef, learning_rate):
  """(jitted init of the Adam state, jitted train step)."""
  tx = optax.adam(learning_rate)

  def train_step(params, opt_state, x, y):
    def loss_fn(params):
      _, logits = nnx.merge(graphdef, params)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(tx.init), jax.jit(train_step, donate_argnums=(0, 1),
                                 compiler_options=backend.compiler_options())


class ClassifierExtractor:
  """`extractor(images) -> (features [N, F], logits [N, num_classes])`, float32 numpy.

  With `spatial=True`, also the last convolution's spatial features [N, spatial_dim]
  (a third output), the stand-in's counterpart of sFID's mixed_6/conv channels.
  images: uint8 [N, H, W, C] in [0, 255], or floating point in [-1, 1], with the
  shape the classifier was trained on.
  """

  comparable = False  # not the literature's Inception: metrics carry `name`

  def __init__(self, graphdef, params, meta, *, checkpoint_dir=None, batch_size=256):
    self.meta = dict(meta)
    self.name = meta["name"]
    self.image_shape = tuple(meta["image_shape"])
    height, width, _ = self.image_shape
    self.spatial_dim = (height // 2) * (width // 2) * SPATIAL_CHANNELS
    self.heldout_accuracy = meta.get("heldout_accuracy")
    self.checkpoint_dir = checkpoint_dir
    self.batch_size = batch_size
    self.params = params
    self._apply = _apply_fn(graphdef)

  def __call__(self, images, *, spatial=False):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f"images must be [N, {', '.join(map(str, self.image_shape))}] for "
                       f"{self.name}; got {images.shape}.")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 127.5 - 1.0
    elif not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be uint8 or floating point; got {images.dtype}.")
    elif images.size and (images.min() < -1.001 or images.max() > 1.001):
      raise ValueError("floating-point images must lie in [-1, 1]; got "
                       f"[{images.min():.3g}, {images.max():.3g}].")
    outputs = [[] for _ in range(3)]
    for start in range(0, images.shape[0], self.batch_size):
      batch = images[start:start + self.batch_size].astype(np.float32)
      # Pad the last batch so a single program serves every call.
      padded = np.zeros((self.batch_size, *self.image_shape), np.float32)
      padded[:batch.shape[0]] = batch
      for kept, value in zip(outputs, self._apply(self.params, padded)):
        kept.append(np.asarray(value)[:batch.shape[0]])
    dims = (self.meta["features"], self.meta["num_classes"], self.spatial_dim)
    outputs = tuple(np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)
                    for kept, dim in zip(outputs, dims))
    return outputs if spatial else outputs[:2]


def resolve_checkpoint_dir(workdir_or_path):
  """Where the classifier checkpoint lives.

  `workdir_or_path` itself if it holds a classifier checkpoint or does not exist
  yet; otherwise it is an existing workdir and the checkpoint is its `classifier/`.
  """
  path = os.fspath(workdir_or_path)
  if is_checkpoint(path) or not os.path.exists(path):
    return path
  return os.path.join(path, CHECKPOINT_SUBDIR)


def is_checkpoint(path) -> bool:
  """Whether `path` holds a classifier saved by `train_classifier`."""
  return os.path.isfile(os.path.join(path, _METADATA_FILE))


def restore_classifier(checkpoint_dir, *, batch_size=256):
  """Loads a classifier saved by `train_classifier` into an extractor."""
  checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
  if not is_checkpoint(checkpoint_dir):
    raise FileNotFoundError(f"No stand-in classifier checkpoint at {checkpoint_dir!r} "
                            f"(expected {_METADATA_FILE} there).")
  with open(os.path.join(checkpoint_dir, _METADATA_FILE)) as f:
    meta = json.load(f)
  graphdef, abstract = _abstract(meta)
  try:
    params = ocp.StandardCheckpointer().restore(
        os.path.join(checkpoint_dir, "params"), abstract)
  except Exception as e:  # Orbax raises several types for a damaged directory
    raise ValueError(f"Cannot restore the classifier checkpoint at {checkpoint_dir!r}: "
                     f"{e}") from e
  return ClassifierExtractor(graphdef, params, meta, checkpoint_dir=checkpoint_dir,
                             batch_size=batch_size)


def _save(checkpoint_dir, params, meta):
  """Writes params (Orbax) and metadata into a temporary sibling, then renames it."""
  checkpoint_dir = os.path.abspath(checkpoint_dir)
  parent = os.path.dirname(checkpoint_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(checkpoint_dir)}-tmp-")
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp_dir, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(tmp_dir, _METADATA_FILE), "w") as f:
      json.dump(meta, f, indent=2)
    os.rename(tmp_dir, checkpoint_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise


def _check_data(images, labels, num_classes):
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be floating point [N, H, W, C]; got {images.dtype} "
                     f"{images.shape}.")
  if images.min() < -1.001 or images.max() > 1.001:
    raise ValueError(f"images must lie in [-1, 1]; got [{images.min():.3g}, "
                     f"{images.max():.3g}].")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int [N={images.shape[0]}]; got {labels.dtype} "
                     f"{labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, num_classes={num_classes}); got "
                     f"[{labels.min()}, {labels.max()}].")
  return images.astype(np.float32), labels.astype(np.int32)


def train_classifier(images, labels, *, num_classes, workdir_or_path, seed=0, steps=800,
                     batch_size=128, learning_rate=3e-3, holdout_fraction=0.2,
                     max_shift=1, name="small-cnn", channels=(32, 64), features=128):
  """Trains the stand-in classifier, or restores it if its checkpoint exists.

  The last `holdout_fraction` of the examples (in the given order, no augmentation)
  is held out; the rest trains with Adam on shuffled, randomly shifted batches
  drawn from `seed`, deterministically. The result's `heldout_accuracy` is
  measured on the held-out part and saved with the checkpoint. The checkpoint
  directory appears atomically (written beside it, then renamed). Single-process:
  in a multi-process job, train it once before launching the job's evaluation.

  Args:
    images: float [N, H, W, C] in [-1, 1]; H and W multiples of 4.
    labels: int [N] in [0, num_classes).
    num_classes: number of classes.
    workdir_or_path: the checkpoint directory, or a workdir whose `classifier/`
      holds it (see `resolve_checkpoint_dir`).
    seed: initialisation and batch order.
    steps: optimiser steps.
    batch_size, learning_rate: Adam's batch and step size.
    holdout_fraction: the held-out share, taken from the end.
    max_shift: training-time translation, in pixels.
    name: what results call the extractor, e.g. "digits-cnn".
    channels, features: the two conv widths and the feature dimension.

  Returns:
    A ClassifierExtractor.
  """
  checkpoint_dir = os.path.abspath(resolve_checkpoint_dir(workdir_or_path))
  images, labels = _check_data(images, labels, num_classes)
  if is_checkpoint(checkpoint_dir):
    extractor = restore_classifier(checkpoint_dir)
    found = (extractor.meta["num_classes"], extractor.image_shape)
    if found != (num_classes, images.shape[1:]):
      raise ValueError(f"The classifier at {checkpoint_dir!r} was trained for "
                       f"(num_classes, image_shape)={found}, not "
                       f"{(num_classes, images.shape[1:])}; delete it or use another path.")
    return extractor

  num_train = images.shape[0] - int(round(images.shape[0] * holdout_fraction))
  if not 0 < num_train < images.shape[0] or num_train < batch_size:
    raise ValueError(f"holdout_fraction={holdout_fraction} leaves {num_train} of "
                     f"{images.shape[0]} examples to train on with batch_size={batch_size}.")
  meta = dict(name=name, num_classes=int(num_classes), image_shape=list(images.shape[1:]),
              channels=list(channels), features=int(features), seed=int(seed),
              steps=int(steps), max_shift=int(max_shift), num_train=int(num_train))
  graphdef, params = _abstract(meta)[0], _init_params(meta, seed)
  init_opt, train_step = _train_fns(graphdef, float(learning_rate))
  opt_state = init_opt(params)
  for x, y in _batches(images[:num_train], labels[:num_train], batch_size, steps, seed,
                       max_shift):
    params, opt_state = train_step(params, opt_state, x, y)

  extractor = ClassifierExtractor(graphdef, params, meta, checkpoint_dir=checkpoint_dir)
  _, logits = extractor(images[num_train:])
  meta["heldout_accuracy"] = float(np.mean(logits.argmax(-1) == labels[num_train:]))
  _save(checkpoint_dir, params, meta)
  return ClassifierExtractor(graphdef, params, meta, checkpoint_dir=checkpoint_dir)


def _batches(images, labels, batch_size, steps, seed, max_shift):
  """Yields `steps` (x, y) batches from seeded per-epoch permutations.

  Each image is translated by up to `max_shift` pixels, filling with -1 (the
  background): handwriting shifts between writers, and the held-out writers differ.
  """
  rng = np.random.default_rng(seed)
  n, height, width, _ = images.shape
  per_epoch = n // batch_size
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)),
                  constant_values=-1.0)
  order = None
  for step in range(steps):
    if step % per_epoch == 0:
      order = rng.permutation(n)
    idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, batch_size))
    rows = (dy[:, None] + np.arange(height))[:, :, None]
    cols = (dx[:, None] + np.arange(width))[:, None, :]
    yield padded[idx[:, None, None], rows, cols], labels[idx]
