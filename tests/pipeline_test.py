"""Tests of the input pipelines: every data set, determinism, resume, shards, bad configs."""

import io
import itertools

import ml_collections
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets as sk_datasets

from cfg_guidance.data import pipeline, preprocess, sources, stream, toy2d


def _config(**fields) -> ml_collections.ConfigDict:
  base = dict(name="digits", image_size=None, data_dir=None, folder=None, random_flip=False,
              num_workers=0, num_threads=0, num_toy_examples=300, toy_seed=0)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def _take(it, num):
  return [next(it) for _ in range(num)]


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in ("image", "label")}


def _rows(images):
  """Each example as bytes, to compare sets of examples."""
  return [x.tobytes() for x in images]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("height,width,size", [(37, 53, 16), (375, 500, 64), (10, 25, 16),
                                                (33, 33, 32), (6, 6, 8)])
def test_area_resize_matches_tensorflow(height, width, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(height).integers(0, 256, (height, width, 3), np.uint8)
  square = preprocess.center_crop(image)
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  np.testing.assert_array_equal(square, image[top:top + side, left:left + side])
  expected = tf.image.resize(square, (size, size), method="area").numpy()
  np.testing.assert_allclose(preprocess.area_resize(square, size), expected, atol=2e-4)


def test_area_resize_integer_factor_is_block_mean():
  image = np.random.default_rng(0).integers(0, 256, (12, 12, 2)).astype(np.float64)
  expected = image.reshape(4, 3, 4, 3, 2).mean(axis=(1, 3))
  np.testing.assert_allclose(preprocess.area_resize(image, 4), expected, rtol=1e-5)


# ---------------------------------------------------------------- in-memory data sets


def test_digits_one_epoch_is_every_digit_once_in_signed_unit_range():
  digits = sk_datasets.load_digits()
  it = pipeline.create_dataset(_config(), global_batch_size=599, seed=3,
                                     process_index=0, process_count=1)
  epoch = _concat(_take(it, 3))  # 3 * 599 = 1797: exactly one epoch.
  assert epoch["image"].shape == (1797, 8, 8, 1) and epoch["image"].dtype == np.float32
  assert epoch["label"].dtype == np.int32
  assert epoch["image"].min() == -1.0 and epoch["image"].max() == 1.0
  expected = (digits.images / 8.0 - 1.0)[..., None].astype(np.float32)
  assert sorted(_rows(epoch["image"])) == sorted(_rows(expected))
  np.testing.assert_array_equal(np.bincount(epoch["label"]), np.bincount(digits.target))
  # Labels travel with their images.
  lookup = dict(zip(_rows(expected), digits.target))
  assert all(lookup[r] == y for r, y in zip(_rows(epoch["image"]), epoch["label"]))


def test_load_digits_arrays():
  images, labels = sources.load_digits_arrays()
  digits = sk_datasets.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_allclose(images[..., 0], digits.images / 8.0 - 1.0, rtol=1e-6)
  np.testing.assert_array_equal(labels, digits.target)


def test_toy2d_stream_is_a_permutation_of_the_fixed_training_set():
  config = _config(name="toy2d", num_toy_examples=300, toy_seed=5)
  x, labels = toy2d.sample_data(5, 300)
  it = pipeline.create_dataset(config, global_batch_size=100, seed=0,
                                     process_index=0, process_count=1)
  epoch = _concat(_take(it, 3))
  assert epoch["image"].shape == (300, 2) and epoch["image"].dtype == np.float32
  assert sorted(_rows(epoch["image"])) == sorted(_rows(x))
  np.testing.assert_array_equal(np.bincount(epoch["label"]), [100, 100, 100])
  assert not np.array_equal(epoch["image"], x)  # Shuffled.


def test_epochs_reshuffle_and_stream_is_deterministic_in_seed():
  def stream_of(seed):
    it = pipeline.create_dataset(_config(), global_batch_size=599, seed=seed,
                                       process_index=0, process_count=1)
    return _concat(_take(it, 6))["label"]
  a, b, c = stream_of(0), stream_of(0), stream_of(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  first, second = a[:1797], a[1797:]
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(np.bincount(first), np.bincount(second))


def test_stream_matches_the_documented_index_formula():
  """Process i's part of global batch k holds records perm(seed, p // N)[p % N] for the
  positions p = k G + i B + [0, B)."""
  config = _config()
  images, _ = sources.load_digits_arrays()
  n = 1797
  it = pipeline.create_dataset(config, global_batch_size=3 * 200, seed=7,
                                     process_index=2, process_count=3)
  got = _concat(_take(it, 4))["image"]  # 2400 global positions: into the second epoch.
  positions = np.concatenate([k * 600 + 400 + np.arange(200) for k in range(4)])
  perms = [np.random.default_rng([7, 0, e]).permutation(n) for e in (0, 1)]
  records = np.array([perms[p // n][p % n] for p in positions])
  np.testing.assert_array_equal(got, images[records])


def test_global_batches_do_not_depend_on_the_process_count():
  config = _config()
  one = _concat(_take(pipeline.create_dataset(
      config, global_batch_size=64, seed=3, process_index=0, process_count=1), 5))
  parts = [_take(pipeline.create_dataset(
      config, global_batch_size=64, seed=3, process_index=i, process_count=4), 5)
           for i in range(4)]
  for k in range(5):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([parts[i][k][key] for i in range(4)]), one[key][64 * k:64 * (k + 1)])


def test_random_flip_mirrors_a_fair_share_of_examples():
  plain = _concat(_take(pipeline.create_dataset(
      _config(), global_batch_size=400, seed=0, process_index=0, process_count=1), 2))
  flipped = _concat(_take(pipeline.create_dataset(
      _config(random_flip=True), global_batch_size=400, seed=0, process_index=0,
      process_count=1), 2))
  np.testing.assert_array_equal(plain["label"], flipped["label"])
  mirror = plain["image"][:, :, ::-1]
  mirrored = np.all(flipped["image"] == mirror, axis=(1, 2, 3))
  same = np.all(flipped["image"] == plain["image"], axis=(1, 2, 3))
  assert np.all(mirrored | same)
  asymmetric = ~np.all(mirror == plain["image"], axis=(1, 2, 3))
  assert 0.4 < np.sum(mirrored & asymmetric) / np.sum(asymmetric) < 0.6


# ---------------------------------------------------------------- shards, one pass, resume


def test_process_shards_are_disjoint_and_one_pass_covers_all():
  config = _config()
  epochs = []
  for index in range(2):
    it = pipeline.create_dataset(config, global_batch_size=2 * 449, seed=0,
                                       process_index=index, process_count=2)
    epochs.append(_concat(_take(it, 2))["image"])  # 898 = one epoch of a shard.
  rows = [set(_rows(e)) for e in epochs]
  assert len(rows[0]) == len(rows[1]) == 898 and not rows[0] & rows[1]

  images, labels = sources.load_digits_arrays()
  parts = []
  for index in range(2):
    one_pass = pipeline.iterate_once(config, batch_size=500, process_index=index,
                                           process_count=2)
    batches = list(one_pass)
    assert [len(b["label"]) for b in batches] == [500, 399 - index]
    assert one_pass.num_skipped == 0
    parts.append(_concat(batches))
  whole = _concat(parts)
  np.testing.assert_array_equal(whole["image"], images)
  np.testing.assert_array_equal(whole["label"], labels)
  assert rows[0] | rows[1] <= set(_rows(images))


def test_resume_from_state_continues_the_same_stream():
  config = _config(random_flip=True)
  kwargs = dict(global_batch_size=128, seed=1, process_index=1, process_count=2)
  reference = _take(pipeline.create_dataset(config, **kwargs), 20)
  it = pipeline.create_dataset(config, **kwargs)
  _take(it, 13)
  state = it.get_state()
  assert state["step"] == 13
  resumed = pipeline.create_dataset(config, **kwargs)
  resumed.set_state(state)
  for want, got in zip(reference[13:], _take(resumed, 7)):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_state_is_identical_across_processes_and_rejects_another_stream():
  states = []
  for index in range(2):
    it = pipeline.create_dataset(_config(), global_batch_size=64, seed=0,
                                       process_index=index, process_count=2)
    _take(it, 3)
    states.append(it.get_state())
  assert states[0] == states[1]
  other = pipeline.create_dataset(_config(), global_batch_size=32, seed=0,
                                        process_index=0, process_count=2)
  with pytest.raises(ValueError, match="global_batch_size"):
    other.set_state(states[0])


# ---------------------------------------------------------------- TFDS under mock_data


@pytest.mark.parametrize("name,image_size", [("cifar10", None), ("imagenet2012", 16),
                                             ("imagenet_resized", None)])
def test_tfds_pipelines_under_mock_data(name, image_size):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config(name=name, image_size=image_size, random_flip=True, num_threads=2)
  side = {"cifar10": 32, "imagenet2012": 16, "imagenet_resized": 64}[name]
  num_classes = {"cifar10": 10}.get(name, 1000)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    epochs, reference = [], None
    for index in range(2):
      kwargs = dict(global_batch_size=8, seed=4, process_index=index, process_count=2)
      batches = _take(pipeline.create_dataset(config, **kwargs), 6)
      for batch in batches:
        assert batch["image"].shape == (4, side, side, 3)
        assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert np.all((0 <= batch["label"]) & (batch["label"] < num_classes))
      epochs.append(_concat(batches[:3]))  # 12 positions: one epoch of a shard.
      if index == 0:
        reference = batches
        resumed = pipeline.create_dataset(config, **kwargs)
        resumed.set_state({**resumed.get_state(), "step": 4})
        for want, got in zip(reference[4:], _take(resumed, 2)):
          np.testing.assert_array_equal(got["image"], want["image"])
    everything = _concat(list(pipeline.iterate_once(
        config, batch_size=5, process_index=0, process_count=1)))
  assert len(everything["label"]) == 24
  candidates = set(_rows(everything["image"])) | set(_rows(everything["image"][:, :, ::-1]))
  shard_rows = [set(_rows(e["image"])) for e in epochs]
  assert len(shard_rows[0]) == len(shard_rows[1]) == 12
  assert not shard_rows[0] & shard_rows[1]
  assert shard_rows[0] | shard_rows[1] <= candidates


# ---------------------------------------------------------------- image folder


def _write_folder(root):
  """Three classes of PNG/JPEG files, one corrupt file and ignored non-images.

  Returns the expected pipeline output (in storage order) of the readable images at side 4.
  """
  rng = np.random.default_rng(0)
  expected = []
  for label, name in enumerate(["ant", "bee", "cat"]):
    (root / name).mkdir()
    for i in range(3):
      height, width = [(12, 16), (20, 12), (8, 8)][i]
      pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.png")
      side = min(height, width)
      top, left = (height - side) // 2, (width - side) // 2
      square = pixels[top:top + side, left:left + side].astype(np.float64)
      block = side // 4
      mean = square.reshape(4, block, 4, block, 3).mean(axis=(1, 3))
      expected.append((mean / 127.5 - 1.0, label))
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (16, 24, 3), np.uint8)).save(buffer, format="JPEG")
  (root / "cat" / "3.jpg").write_bytes(buffer.getvalue())
  decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
  mean = decoded[:, 4:20].astype(np.float64).reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))
  expected.append((mean / 127.5 - 1.0, 2))
  (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  (root / "bee" / "notes.txt").write_text("not an image")
  (root / ".cache").mkdir()
  return expected


def test_image_folder_reads_crops_resizes_and_skips_the_corrupt_file(tmp_path):
  expected = _write_folder(tmp_path)
  config = _config(name="image_folder", folder=str(tmp_path), image_size=4, num_threads=2)

  one_pass = pipeline.iterate_once(config, batch_size=4, process_index=0,
                                         process_count=1)
  batches = list(one_pass)
  assert [len(b["label"]) for b in batches] == [4, 4, 2]
  assert one_pass.num_skipped == 1
  got = _concat(batches)
  np.testing.assert_allclose(got["image"], np.stack([e[0] for e in expected]), atol=1e-5)
  np.testing.assert_array_equal(got["label"], [e[1] for e in expected])

  # The infinite stream replaces the corrupt file by a readable one, counted once per epoch.
  it = pipeline.create_dataset(config, global_batch_size=11, seed=0,
                                     process_index=0, process_count=1)
  readable = set(_rows(got["image"]))
  for batch in _take(it, 3):  # One epoch per batch.
    rows = _rows(batch["image"])
    assert batch["image"].shape == (11, 4, 4, 3)
    assert set(rows) <= readable and len(set(rows)) == 10  # One readable image twice.
  assert it.num_skipped == 3


def test_image_folder_stream_is_the_same_with_threads_and_worker_processes(tmp_path):
  _write_folder(tmp_path)
  kwargs = dict(global_batch_size=11, seed=2, process_index=0, process_count=1)
  streams = []
  for threads, workers in [(0, 0), (3, 0), (1, 1)]:
    config = _config(name="image_folder", folder=str(tmp_path), image_size=4,
                     random_flip=True, num_threads=threads, num_workers=workers)
    it = pipeline.create_dataset(config, **kwargs)
    streams.append(_concat(_take(it, 4)))
    assert it.num_skipped == 4  # Four epochs: the corrupt file four times.
    it.close()
  for other in streams[1:]:
    np.testing.assert_array_equal(other["image"], streams[0]["image"])
    np.testing.assert_array_equal(other["label"], streams[0]["label"])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fields,match", [
    (dict(name="mnist"), "data.name"),
    (dict(name="image_folder"), "data.folder"),
    (dict(name="image_folder", folder="/nonexistent/cfg_guidance", image_size=8),
     "data.folder"),
    (dict(name="digits", image_size=64), "data.image_size"),
    (dict(name="imagenet2012", image_size=None), "data.image_size"),
    (dict(name="toy2d", num_toy_examples=0), "data.num_toy_examples"),
])
def test_bad_config_names_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    pipeline.create_dataset(_config(**fields), global_batch_size=8, seed=0,
                                  process_index=0, process_count=1)


def test_defaults_to_this_jax_process_and_rejects_unknown_splits():
  implicit = next(pipeline.create_dataset(_config(), global_batch_size=16, seed=0))
  explicit = next(pipeline.create_dataset(_config(), global_batch_size=16, seed=0,
                                                process_index=0, process_count=1))
  np.testing.assert_array_equal(implicit["image"], explicit["image"])
  with pytest.raises(ValueError, match="split"):
    pipeline.iterate_once(_config(), batch_size=8, split="validation")


def test_batch_not_divisible_by_processes_names_train_batch_size():
  with pytest.raises(ValueError, match="train.batch_size"):
    pipeline.create_dataset(_config(), global_batch_size=9, seed=0,
                                  process_index=0, process_count=2)


def test_unprepared_tfds_data_names_data_dir(tmp_path):
  config = _config(name="cifar10", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="data.data_dir"):
    pipeline.create_dataset(config, global_batch_size=8, seed=0,
                                  process_index=0, process_count=1)


def test_shard_ranges_cover_every_record_once():
  for num, count in itertools.product([0, 1, 7, 10], [1, 2, 3]):
    ranges = [stream.shard_range(num, i, count, drop_remainder=False) for i in range(count)]
    covered = np.concatenate([np.arange(a, b) for a, b in ranges])
    np.testing.assert_array_equal(covered, np.arange(num))
    sizes = [stream.shard_range(num, i, count, drop_remainder=True) for i in range(count)]
    assert all(b - a == num // count for a, b in sizes)
