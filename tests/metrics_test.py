"""Tests for evaluation.metrics and .manifold against closed forms and float64 references."""

import os
import types

import numpy as np
import pytest
import scipy.linalg

from cfg_guidance.evaluation import manifold, metrics


def _random_cov(rng, dim, scale=1.0):
  a = rng.normal(size=(dim, dim))
  return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


def _fid_by_sqrtm(mu1, sigma1, mu2, sigma2):
  """tfgan's and pytorch-fid's route: scipy's matrix square root of the product."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():  # Singular product: pytorch-fid's 1e-6 offset.
    offset = 1e-6 * np.eye(len(mu1))
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  tr_covmean = np.trace(covmean).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


class TestFrechetDistance:

  def test_commuting_covariances_closed_form(self):
    # S1 = Q diag(a) Qᵀ, S2 = Q diag(b) Qᵀ commute, so (S1 S2)^½ = Q diag(√(ab)) Qᵀ and
    # d² = |Δμ|² + Σ (√a − √b)².
    rng = np.random.default_rng(0)
    dim = 12
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    np.testing.assert_allclose(got, expected, rtol=1e-10)

  def test_identical_is_zero_and_symmetric(self):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=20), _random_cov(rng, 20)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    mu2, sigma2 = rng.normal(size=20), _random_cov(rng, 20, scale=2.0)
    np.testing.assert_allclose(metrics.frechet_distance(mu, sigma, mu2, sigma2),
                               metrics.frechet_distance(mu2, sigma2, mu, sigma),
                               rtol=1e-10)

  def test_matches_sqrtm_reference(self):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    y = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    expected = _fid_by_sqrtm(*args)
    assert expected > 1.0
    np.testing.assert_allclose(metrics.frechet_distance(*args), expected, rtol=1e-9)

  def test_rank_deficient_covariances_stay_finite(self):
    # 6 and 9 samples in 32 dimensions: both covariances, and their product, are singular.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 32)), rng.normal(size=(9, 32)) + 0.5
    args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    got = metrics.frechet_distance(*args)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, _fid_by_sqrtm(*args), rtol=1e-6)
    zero = np.zeros((32, 32))  # one image repeated: a zero covariance
    np.testing.assert_allclose(metrics.frechet_distance(args[0], zero, args[2], args[3]),
                               _fid_by_sqrtm(args[0], zero, args[2], args[3]),
                               rtol=1e-9)

  def test_invalid_covariances_raise(self):
    rng = np.random.default_rng(4)
    sigma = _random_cov(rng, 8)
    with pytest.raises(ValueError, match="not valid covariances"):
      metrics.frechet_distance(np.zeros(8), sigma, np.zeros(8), -sigma)
    with pytest.raises(ValueError, match="not valid covariances"):
      metrics.frechet_distance(np.zeros(8), -sigma, np.zeros(8), sigma)
    with pytest.raises(ValueError, match="sigma2"):
      metrics.frechet_distance(np.zeros(8), sigma, np.zeros(8), np.full((8, 8), np.nan))

  def test_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="mu2"):
      metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))


class TestInceptionScore:

  def test_uniform_predictions_give_one(self):
    mean, std = metrics.inception_score(np.zeros((100, 7)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)

  def test_confident_balanced_predictions_give_num_classes(self):
    num_classes = 8
    labels = np.arange(10 * num_classes * 3) % num_classes
    mean, std = metrics.inception_score(60.0 * np.eye(num_classes)[labels])
    np.testing.assert_allclose([mean, std], [num_classes, 0.0], atol=1e-9)

  def test_two_class_closed_form(self):
    # Alternating p(y|x) = (q, 1−q) and (1−q, q): p(y) = (½, ½) in every split, so
    # IS = exp(log 2 − H(q)) = 2 exp(−H(q)).
    q = 0.8
    probs = np.array([[q, 1 - q], [1 - q, q]] * 50)
    entropy = -(q * np.log(q) + (1 - q) * np.log(1 - q))
    mean, _ = metrics.inception_score(np.log(probs))
    np.testing.assert_allclose(mean, 2 * np.exp(-entropy), rtol=1e-12)

  def test_matches_improved_gan_splits(self):
    # 103 examples: improved-gan's floor(i·n/10) block edges give splits of 10 and 11.
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.normal(size=(103, 6))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):
      part = probs[i * 103 // 10:(i + 1) * 103 // 10]
      kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
      scores.append(np.exp(kl.sum(1).mean()))
    np.testing.assert_allclose(metrics.inception_score(logits),
                               [np.mean(scores), np.std(scores)], rtol=1e-12)

  def test_split_index_matches_block_edges(self):
    for n in (10, 11, 99, 103, 1000):
      expected = np.concatenate(
          [np.full((s + 1) * n // 10 - s * n // 10, s) for s in range(10)])
      np.testing.assert_array_equal(metrics.split_index(np.arange(n), n), expected)

  def test_too_few_examples_raises(self):
    with pytest.raises(ValueError, match="num_splits"):
      metrics.inception_score(np.zeros((5, 3)))


class TestPrecisionRecall:
  """manifold.py's k-NN precision/recall; tests/adm_protocol_test.py checks it against
  ADM's evaluator."""

  def test_identical_sets(self):
    x = np.random.default_rng(6).normal(size=(200, 5))
    assert manifold.precision_recall(x, x, block_size=64) == (1.0, 1.0)

  def test_disjoint_far_apart_sets(self):
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(100, 5)), rng.normal(size=(80, 5)) + 100.0
    assert manifold.precision_recall(real, fake) == (0.0, 0.0)

  def test_half_the_fakes_off_manifold(self):
    # Real: the integers 0..99 (3rd-neighbour radius 2). Fake: 50 points at 0.5, 2.5, …
    # inside the real line and 50 far away. Half the fakes are real-like
    # (precision ½); every real point is 0.5 from a fake with radius ≥ 2 (recall 1).
    real = np.arange(100.0)[:, None]
    fake = np.concatenate([np.arange(0.5, 100, 2.0), 1000.0 + 10 * np.arange(50)])
    precision, recall = manifold.precision_recall(real, fake[:, None], block_size=33)
    assert (precision, recall) == (0.5, 1.0)

  def test_blocks_do_not_change_radii(self):
    # Duplicated rows make exact ties (radius 0 for k below the multiplicity).
    x = np.random.default_rng(8).normal(size=(90, 4)).astype(np.float32)
    x = np.concatenate([x, x[:10]])
    d = np.sum((x[:, None].astype(np.float64) - x[None]) ** 2, axis=-1)
    expected = np.sort(d, axis=1)[:, 3]
    for block in (1, 7, 100, 4096):
      np.testing.assert_allclose(manifold.manifold_radii(x, block_size=block), expected,
                                 rtol=1e-12, atol=1e-12)

  def test_too_few_points_raise(self):
    with pytest.raises(ValueError, match="k=3"):
      manifold.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


class TestFeatureStats:

  def _data(self, n=103, dim=6, num_classes=7, seed=8):
    rng = np.random.default_rng(seed)
    # A large offset makes naive sum-of-squares covariances lose digits.
    features = 1e3 + rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    return features, 2.0 * rng.normal(size=(n, num_classes))

  def _stream(self, features, logits, sizes, **kwargs):
    stats = metrics.FeatureStats(**kwargs)
    start = 0
    for size in sizes:
      stats.update(features[start:start + size], logits[start:start + size])
      start += size
    assert start == features.shape[0]
    return stats

  def test_streaming_equals_one_shot(self):
    features, logits = self._data()
    stats = self._stream(features, logits, [1, 17, 0, 40, 45], num_samples=103)
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.inception_score(), metrics.inception_score(logits),
                               rtol=1e-10)

  def test_merge_with_explicit_indices(self):
    features, logits = self._data()
    perm = np.random.default_rng(9).permutation(103)
    parts = [metrics.FeatureStats(num_samples=103) for _ in range(2)]
    for part, idx in zip(parts, (perm[:60], perm[60:])):
      part.update(features[idx[:25]], logits[idx[:25]], indices=idx[:25])
      part.update(features[idx[25:]], logits[idx[25:]], indices=idx[25:])
    merged = parts[0].merge(parts[1])
    np.testing.assert_allclose(merged.mean, features.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.cov, np.cov(features, rowvar=False),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(merged.inception_score(), metrics.inception_score(logits),
                               rtol=1e-10)

  def test_without_num_samples_splits_by_index_mod_splits(self):
    features, logits = self._data(n=100)
    stats = self._stream(features, logits, [33, 67])
    reordered = np.concatenate([logits[s::10] for s in range(10)])
    np.testing.assert_allclose(stats.inception_score(),
                               metrics.inception_score(reordered), rtol=1e-10)

  def test_incomplete_sample_count_raises(self):
    features, logits = self._data()
    stats = self._stream(features[:50], logits[:50], [50], num_samples=103)
    with pytest.raises(ValueError, match="num_samples=103"):
      stats.inception_score()

  def test_save_load_round_trip_and_resume(self, tmp_path):
    features, logits = self._data()
    stats = self._stream(features[:70], logits[:70], [30, 40], num_samples=103)
    path = tmp_path / "stats.npz"
    stats.save(path)
    assert os.listdir(tmp_path) == ["stats.npz"]
    with np.load(path) as data:
      np.testing.assert_allclose(data["mu"], features[:70].mean(0), rtol=1e-13)
      np.testing.assert_allclose(data["sigma"], np.cov(features[:70], rowvar=False),
                                 rtol=1e-9, atol=1e-9)
    loaded = metrics.FeatureStats.load(path)
    loaded.update(features[70:], logits[70:])
    np.testing.assert_allclose(loaded.cov, np.cov(features, rowvar=False),
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(loaded.inception_score(), metrics.inception_score(logits),
                               rtol=1e-10)

  def test_failed_save_keeps_old_file(self, tmp_path, monkeypatch):
    features, logits = self._data()
    path = tmp_path / "stats.npz"
    self._stream(features, logits, [103]).save(path)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
      raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
      self._stream(features[:20], logits[:20], [20]).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["stats.npz"]

  def test_adm_reference_file(self, tmp_path):
    # ADM's reference batches hold mu/sigma (and more) without a count.
    features, logits = self._data()
    ref_features = self._data(seed=10)[0]
    mu, sigma = ref_features.mean(0), np.cov(ref_features, rowvar=False)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, mu=mu, sigma=sigma, mu_s=mu[:2], arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    reference = metrics.FeatureStats.load(path)
    stats = self._stream(features, logits, [103])
    np.testing.assert_allclose(
        stats.frechet_distance(reference),
        _fid_by_sqrtm(features.mean(0), np.cov(features, rowvar=False), mu, sigma),
        rtol=1e-8)
    with pytest.raises(ValueError, match="cannot be updated"):
      reference.update(features, logits)

  def test_suffixed_arrays_round_trip_beside_others(self):
    # sFID's statistics sit beside FID's in one file, under ADM's "_s" names.
    features, logits = self._data()
    spatial = self._data(dim=4, seed=11)[0]
    stats = self._stream(features, logits, [50, 53], num_samples=103)
    arrays = {**stats.to_arrays(), **metrics.FeatureStats().update(spatial).to_arrays("_s")}
    assert {"mu", "sigma", "mu_s", "sigma_s", "count_s"} <= set(arrays)
    back = metrics.FeatureStats.from_arrays(arrays, "_s")
    np.testing.assert_allclose(back.cov, np.cov(spatial, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(metrics.FeatureStats.from_arrays(arrays).inception_score(),
                               metrics.inception_score(logits), rtol=1e-10)
    frozen = metrics.FeatureStats.from_arrays({"mu_s": arrays["mu_s"],
                                               "sigma_s": arrays["sigma_s"]}, "_s")
    np.testing.assert_array_equal(frozen.cov, arrays["sigma_s"])
    with pytest.raises(ValueError, match="sigma_s"):
      metrics.FeatureStats.from_arrays({"mu": arrays["mu"], "sigma": arrays["sigma"]}, "_s")

  def test_load_refuses_pickles_and_names_missing_keys(self, tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, mu=np.zeros(2), sigma=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
      metrics.FeatureStats.load(pickled)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mean=np.zeros(2))
    with pytest.raises(ValueError, match="sigma"):
      metrics.FeatureStats.load(wrong)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
      metrics.FeatureStats.load(tmp_path / "absent.npz")


def test_metric_names_label_stand_in_extractors():
  inception = types.SimpleNamespace(name="inception-2015-12-05", comparable=True)
  stand_in = types.SimpleNamespace(name="digits-cnn", comparable=False)
  assert metrics.metric_names(inception)["fid"] == "FID"
  assert metrics.metric_names(stand_in) == {
      "fid": "FID (digits-cnn)", "sfid": "sFID (digits-cnn)", "is": "IS (digits-cnn)",
      "precision": "Precision (digits-cnn)", "recall": "Recall (digits-cnn)"}
