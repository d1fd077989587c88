"""Tests for cfg_guidance.classifier, the stand-in feature extractor, on sklearn's digits."""

import os

import numpy as np
import pytest
import sklearn.datasets

from cfg_guidance.evaluation import classifier
from cfg_guidance.evaluation import metrics


@pytest.fixture(scope="module")
def digits():
  data = sklearn.datasets.load_digits()
  return (data.images[..., None] / 8.0 - 1.0).astype(np.float32), data.target


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("workdir")
  images, labels = digits
  return workdir, classifier.train_classifier(
      images, labels, num_classes=10, workdir_or_path=workdir, seed=0, name="digits-cnn")


def test_heldout_accuracy_at_least_95_percent(digits, trained):
  images, labels = digits
  _, extractor = trained
  heldout = slice(len(labels) - round(0.2 * len(labels)), None)
  features, logits = extractor(images[heldout])
  accuracy = np.mean(logits.argmax(-1) == labels[heldout])
  assert accuracy >= 0.95
  assert extractor.heldout_accuracy == pytest.approx(accuracy)
  assert features.shape == (359, 128) and logits.shape == (359, 10)  # round(0.2 · 1797)
  assert metrics.metric_names(extractor)["fid"] == "FID (digits-cnn)"


def test_restore_gives_identical_logits(digits, trained):
  images, labels = digits
  workdir, extractor = trained
  assert extractor.checkpoint_dir == os.path.join(workdir, "classifier")
  # steps=1 would give a different network if the checkpoint were not restored.
  again = classifier.train_classifier(images, labels, num_classes=10,
                                      workdir_or_path=workdir, steps=1)
  direct = classifier.restore_classifier(workdir / "classifier")
  expected = extractor(images[:300])
  for restored in (again, direct):
    assert restored.name == "digits-cnn"
    for got, want in zip(restored(images[:300]), expected):
      np.testing.assert_array_equal(got, want)


def test_uint8_input_matches_scaled_floats(trained):
  _, extractor = trained
  pixels = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
  for got, want in zip(extractor(pixels), extractor(pixels / 127.5 - 1.0)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_same(x, kernel, bias):
  """3×3 'SAME' convolution in float64: x [N, H, W, C], kernel [3, 3, C, O]."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(np.einsum("nhwc,co->nhwo", padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
            for dy in range(3) for dx in range(3))
  return out + bias


def test_spatial_features_are_the_last_convolution(digits, trained):
  images, _ = digits
  _, extractor = trained
  x = images[:6].astype(np.float64)
  p = {name: {k: np.asarray(v[...], np.float64) for k, v in extractor.params[name].items()}
       for name in ("conv1", "conv2")}
  h = np.maximum(_conv_same(x, p["conv1"]["kernel"], p["conv1"]["bias"]), 0)
  h = h.reshape(6, 4, 2, 4, 2, -1).mean(axis=(2, 4))  # 2×2 average pooling.
  conv2 = _conv_same(h, p["conv2"]["kernel"], p["conv2"]["bias"])
  expected = conv2[..., :classifier.SPATIAL_CHANNELS].reshape(6, -1)  # NHWC, as ADM.
  features, logits, spatial = extractor(images[:6], spatial=True)
  assert extractor.spatial_dim == spatial.shape[1] == 4 * 4 * 7
  np.testing.assert_allclose(spatial, expected, rtol=1e-4, atol=1e-4)
  for got, want in zip((features, logits), extractor(images[:6])):
    np.testing.assert_array_equal(got, want)


def test_training_is_deterministic(digits, tmp_path):
  images, labels = digits
  runs = [classifier.train_classifier(images, labels, num_classes=10,
                                      workdir_or_path=tmp_path / str(i), seed=3, steps=5)
          for i in range(2)]
  other_seed = classifier.train_classifier(images, labels, num_classes=10,
                                           workdir_or_path=tmp_path / "2", seed=4, steps=5)
  logits = [run(images[:64])[1] for run in runs + [other_seed]]
  np.testing.assert_array_equal(logits[0], logits[1])
  assert np.abs(logits[0] - logits[2]).max() > 1e-3


def test_bad_inputs_raise(digits, trained, tmp_path):
  images, labels = digits
  workdir, extractor = trained
  with pytest.raises(ValueError, match="labels"):
    classifier.train_classifier(images, labels + 1, num_classes=10,
                                workdir_or_path=tmp_path / "x")
  with pytest.raises(ValueError, match="num_classes"):
    classifier.train_classifier(images, labels, num_classes=9, workdir_or_path=workdir)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    extractor(images * 3)
  with pytest.raises(ValueError, match="8, 8, 1"):
    extractor(np.zeros((2, 16, 16, 1), np.uint8))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    classifier.restore_classifier(tmp_path / "nowhere")


def test_damaged_checkpoint_names_path(digits, trained, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  broken = tmp_path / "broken"
  shutil.copytree(workdir / "classifier", broken)
  shutil.rmtree(broken / "params")
  with pytest.raises(ValueError, match="broken"):
    classifier.restore_classifier(broken)
