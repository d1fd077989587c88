"""Tests for cfg_guidance.inception with a tiny stand-in for the 2015 Inception graph."""

import numpy as np
import pytest

from cfg_guidance.evaluation import inception
import fake_inception

DIM, CLASSES = inception.FEATURE_DIM, inception.NUM_LOGITS


def _bilinear_matrix(size_in, size_out=299):
  """[out, in] rows of TF1 ResizeBilinear (align_corners=False, no half-pixel shift)."""
  src = np.arange(size_out) * (size_in / size_out)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  m = np.zeros((size_out, size_in))
  np.add.at(m, (np.arange(size_out), lo), 1 - frac)
  np.add.at(m, (np.arange(size_out), hi), frac)
  return m


@pytest.fixture(scope="module")
def fake_graph(tmp_path_factory):
  """(path, proj, weights) of fake_inception's stand-in graph."""
  return fake_inception.write_graph(tmp_path_factory.mktemp("inception"))


def _expected(images, proj, weights):
  """float64 reference: bilinear resize, scale, mean-pool, project; logits without bias."""
  _, h, w, _ = images.shape
  rows, cols = _bilinear_matrix(h), _bilinear_matrix(w)
  resized = np.einsum("ah,nhwc,bw->nabc", rows, images.astype(np.float64), cols)
  features = ((resized - 128) / 128).mean(axis=(1, 2)) @ proj
  return features, features @ weights


def _expected_spatial(images):
  """mixed_6/conv's first 7 channels, flattened NHWC as ADM's evaluator does: [N, 2023]."""
  _, h, w, _ = images.shape
  rows, cols = _bilinear_matrix(h), _bilinear_matrix(w)
  x = (np.einsum("ah,nhwc,bw->nabc", rows, images.astype(np.float64), cols) - 128) / 128
  small = _bilinear_matrix(299, fake_inception.SPATIAL_SIZE)
  x = np.einsum("ah,nhwc,bw->nabc", small, x, small)
  conv = x @ fake_inception.spatial_projection()  # [N, 17, 17, 8]
  return conv[..., :7].reshape(len(images), 17 * 17 * 7)


def test_features_and_logits_match_reference(fake_graph):
  path, proj, weights = fake_graph
  # 7 images of 5×9 in batches of 3: short last batch, non-square, upsampled 299².
  images = np.random.default_rng(1).integers(0, 256, size=(7, 5, 9, 3), dtype=np.uint8)
  extractor = inception.InceptionExtractor(path.parent, batch_size=3)
  features, logits = extractor(images)
  assert features.shape == (7, DIM) and logits.shape == (7, CLASSES)
  expected_features, expected_logits = _expected(images, proj, weights)
  np.testing.assert_allclose(features, expected_features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
  assert extractor.name == "inception-2015-12-05" and extractor.comparable


def test_spatial_features_are_mixed_6_first_seven_channels(fake_graph):
  path, proj, weights = fake_graph
  images = np.random.default_rng(3).integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
  extractor = inception.InceptionExtractor(path, batch_size=2)
  features, logits, spatial = extractor(images, spatial=True)
  assert spatial.shape == (5, inception.SPATIAL_DIM) == (5, 2023)
  assert extractor.spatial_dim == 2023
  np.testing.assert_allclose(spatial, _expected_spatial(images), rtol=1e-4, atol=1e-4)
  for got, want in zip((features, logits), extractor(images)):  # Same two outputs.
    np.testing.assert_array_equal(got, want)
  empty = extractor(images[:0], spatial=True)
  assert [a.shape for a in empty] == [(0, DIM), (0, CLASSES), (0, 2023)]


def test_grayscale_is_repeated_to_rgb(fake_graph):
  path, proj, weights = fake_graph
  gray = np.random.default_rng(2).integers(0, 256, size=(4, 6, 6, 1), dtype=np.uint8)
  features, _ = inception.InceptionExtractor(path)(gray)
  expected, _ = _expected(np.repeat(gray, 3, axis=-1), proj, weights)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_float_images_raise(fake_graph):
  extractor = inception.InceptionExtractor(fake_graph[0])
  with pytest.raises(ValueError, match="uint8"):
    extractor(np.zeros((2, 8, 8, 3), np.float32))


def test_missing_file_names_config_field_and_url(tmp_path):
  with pytest.raises(FileNotFoundError, match="eval.inception_path") as info:
    inception.InceptionExtractor(tmp_path / "nowhere.pb")
  assert inception.INCEPTION_URL in str(info.value)
  assert "inception-2015-12-05.tgz" in str(info.value)
  with pytest.raises(ValueError, match="eval.inception_path"):
    inception.InceptionExtractor("")


def test_wrong_file_raises(tmp_path):
  path = tmp_path / "bogus.pb"
  path.write_bytes(b"\x00not a graph\xff" * 10)
  with pytest.raises(ValueError, match="eval.inception_path"):
    inception.InceptionExtractor(path)
