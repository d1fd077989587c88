"""The ADM protocol: on the same feature arrays, the sweep's FID, sFID, IS, precision and
recall equal those of openai/guided-diffusion's `evaluations/evaluator.py` (Dhariwal &
Nichol 2021), whose numbers the paper's tables compare with.

ADM's formulas are re-typed below from their equations, not imported:
  statistics   mu = mean, sigma = unbiased covariance (np.cov), of pool_3 for FID and of
               mixed_6/conv's first 7 channels, flattened, for sFID;
  Fréchet      |mu1 − mu2|² + tr(sigma1 + sigma2 − 2 sqrtm(sigma1 sigma2)) (TTUR);
  IS           p = softmax(pool_3 @ W) in consecutive splits of 5,000 samples,
               exp(mean_x KL(p(y|x) ‖ mean_split p(y))), averaged over splits;
  P/R          ManifoldEstimator, k = 3: r_i = the 4th smallest squared distance from
               point i to its own set (itself, at 0, is the first); precision = share of
               samples within r_i of some reference point i, recall = share of
               reference points within r_j of some sample j; 10,000 random reference
               images against all 50,000 samples.
"""

import os
import socket
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
from PIL import Image
import pytest
import scipy.linalg

from cfg_guidance.evaluation import metrics, reference, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _adm_statistics(acts):
  return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _adm_frechet(stats1, stats2):
  (mu1, sigma1), (mu2, sigma2) = stats1, stats2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def _adm_inception_score(logits, split_size=5000):
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for start in range(0, len(p), split_size):
    part = p[start:start + split_size]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return np.mean(scores), len(scores)


def _adm_precision_recall(ref, sample, k=3):
  def sq_dist(u, v):
    return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)
  ref, sample = ref.astype(np.float64), sample.astype(np.float64)
  radii_ref = np.sort(sq_dist(ref, ref), axis=1)[:, k]
  radii_sample = np.sort(sq_dist(sample, sample), axis=1)[:, k]
  d = sq_dist(ref, sample)  # [N_ref, N_sample]
  precision = np.mean(np.any(d <= radii_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= radii_sample[None, :], axis=1))
  return precision, recall


def _features(rng, n, dim, shift):
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return (rng.normal(size=(n, dim)) @ mix + shift).astype(np.float32)


def _stream(stats, pool, logits, spatial, batch=1000, seed=0):
  """Feeds SweepStats as the sweep does: gathered batches, in a shuffled order."""
  n = len(pool)
  for start in np.random.default_rng(seed).permutation(np.arange(0, n, batch)):
    idx = np.arange(start, min(start + batch, n))
    stats.add(idx, pool[idx], logits[idx], idx % 10, spatial[idx])


def test_fid_sfid_and_is_over_splits_of_5000_on_50000_samples():
  rng = np.random.default_rng(0)
  n, num_ref, dim, spatial_dim, classes = 50_000, 20_000, 12, 9, 10
  pool, ref_pool = _features(rng, n, dim, 0.3), _features(rng, num_ref, dim, 0.0)
  spatial = _features(rng, n, spatial_dim, -0.2)
  ref_spatial = _features(rng, num_ref, spatial_dim, 0.0)
  w = rng.normal(size=(dim, classes)).astype(np.float32)
  logits = pool @ w  # float32, as ADM's softmax graph takes pool_3 @ W.

  stats = report.SweepStats(num_samples=n, num_classes=classes, with_spatial=True)
  _stream(stats, pool, logits, spatial)
  ref_stats, ref_spatial_stats = metrics.FeatureStats(), metrics.FeatureStats()
  for start in range(0, num_ref, 3000):  # As reference._reference_pass streams them.
    ref_stats.update(ref_pool[start:start + 3000])
    ref_spatial_stats.update(ref_spatial[start:start + 3000])
  got = stats.results(ref_stats, spatial_reference=ref_spatial_stats)

  as_f64 = lambda x: x.astype(np.float64)
  fid = _adm_frechet(_adm_statistics(as_f64(pool)), _adm_statistics(as_f64(ref_pool)))
  sfid = _adm_frechet(_adm_statistics(as_f64(spatial)),
                      _adm_statistics(as_f64(ref_spatial)))
  inception_score, num_splits = _adm_inception_score(as_f64(logits))
  assert num_splits == metrics.DEFAULT_SPLITS == 10
  assert fid > 0.05 and sfid > 0.05 and inception_score > 1.5  # Not trivial cases.
  np.testing.assert_allclose(got["fid"], fid, rtol=1e-6)
  np.testing.assert_allclose(got["sfid"], sfid, rtol=1e-6)
  np.testing.assert_allclose(got["is"], inception_score, rtol=1e-6)


def test_precision_recall_random_real_subset_against_all_samples():
  rng = np.random.default_rng(1)
  num_ref, n, dim = 6000, 3000, 6
  ref_pool = rng.normal(size=(num_ref, dim)).astype(np.float32)
  pool = (0.8 * rng.normal(size=(n, dim)) + 0.5).astype(np.float32)
  indices = reference.draw_subset(num_ref, 2000, seed=0)
  real = ref_pool[indices]
  stats = report.SweepStats(num_samples=n, num_classes=10, precision_recall=True)
  _stream(stats, pool, np.zeros((n, 10), np.float32), np.zeros((n, 1)), batch=256)
  got = stats.results(metrics.FeatureStats().update(ref_pool), real)
  precision, recall = _adm_precision_recall(real, pool)
  assert 0.2 < precision < 0.95 and 0.2 < recall < 0.95  # Neither 0 nor 1 by design.
  np.testing.assert_allclose([got["precision"], got["recall"]], [precision, recall],
                             rtol=1e-6)


def test_draw_subset_is_uniform_sorted_and_seeded():
  a = reference.draw_subset(100_000, 10_000, seed=3)
  assert len(np.unique(a)) == 10_000 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(a, reference.draw_subset(100_000, 10_000, seed=3))
  assert len(np.intersect1d(a, reference.draw_subset(100_000, 10_000, seed=4))) < 1500
  # Uniform: each tenth of the records holds 1,000 ± 4σ (σ ≈ 28) of them.
  counts = np.bincount(a // 10_000, minlength=10)
  assert np.all(np.abs(counts - 1000) < 120), counts
  np.testing.assert_array_equal(reference.draw_subset(50, 80, seed=0), np.arange(50))


# --- The real set of an image folder sorted by class -------------------------------

NUM_CLASSES, PER_CLASS, SUBSET = 4, 60, 80


class MeanColourExtractor:
  """A stand-in extractor: features are each image's mean RGB ([N, 3])."""

  name, comparable, spatial_dim = "mean-colour", False, None

  def __call__(self, images):
    x = np.asarray(images, np.float32).mean(axis=(1, 2))
    return x, np.zeros((len(x), 2), np.float32)


def _write_folder(root):
  """NUM_CLASSES class folders of PER_CLASS 8×8 PNGs, class c's red channel = 60 c."""
  rng = np.random.default_rng(0)
  for c in range(NUM_CLASSES):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(PER_CLASS):
      pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
      pixels[..., 0] = 60 * c
      Image.fromarray(pixels).save(root / f"class{c}" / f"{i:03d}.png")


def _configs(folder, workdir_reference=None):
  data = ml_collections.ConfigDict(dict(name="image_folder", folder=str(folder),
                                        image_size=8, num_threads=0))
  ev = ml_collections.ConfigDict(dict(reference_stats=workdir_reference, batch_size=24,
                                      precision_recall=True, pr_num_samples=SUBSET,
                                      pr_seed=5))
  return ev, data


WORKER = textwrap.dedent("""
    import sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from cfg_guidance.runtime import distributed
    distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
    from cfg_guidance.evaluation import reference
    import adm_protocol_test as t
    ev, data = t._configs({folder!r}, {out!r})
    reference.reference_statistics(ev, data, None, t.MeanColourExtractor(),
                                   image_shape=(8, 8, 3))
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_real_subset_of_a_sorted_folder_is_random_recorded_and_process_invariant(
    tmp_path):
  folder = tmp_path / "folder"
  _write_folder(folder)
  ev, data = _configs(folder)
  workdir = tmp_path / "work" / "eval"  # The evaluation directory.
  extractor = MeanColourExtractor()
  ref = reference.reference_statistics(ev, data, workdir, extractor, image_shape=(8, 8, 3))
  path = workdir / "reference_image_folder_mean-colour.npz"
  assert ref.path == path and path.exists()

  # Storage order is class order, so the first 80 would be classes 0 and 1 only.
  labels = ref.real_indices // PER_CLASS
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  assert counts.sum() == SUBSET and np.all(np.abs(counts - SUBSET / NUM_CLASSES) <= 8), counts
  np.testing.assert_array_equal(ref.real_indices,
                                reference.draw_subset(NUM_CLASSES * PER_CLASS, SUBSET, 5))
  np.testing.assert_allclose(ref.real_features[:, 0], 60.0 * labels)  # Their own images.
  with np.load(path) as saved:
    np.testing.assert_array_equal(saved["pr_indices"], ref.real_indices)
    assert int(saved["pr_seed"]) == 5 and int(saved["pr_num_samples"]) == SUBSET
  assert ref.stats.count == NUM_CLASSES * PER_CLASS
  np.testing.assert_allclose(ref.stats.mean[0], 60.0 * (NUM_CLASSES - 1) / 2, rtol=1e-6)

  # A rerun reads the recorded set; another seed draws (and records) another one.
  before = path.stat().st_mtime_ns
  again = reference.reference_statistics(ev, data, workdir, extractor,
                                         image_shape=(8, 8, 3))
  np.testing.assert_array_equal(again.real_indices, ref.real_indices)
  assert path.stat().st_mtime_ns == before
  ev.pr_seed = 6
  other = reference.reference_statistics(ev, data, workdir, extractor,
                                         image_shape=(8, 8, 3))
  assert not np.array_equal(other.real_indices, ref.real_indices)
  with np.load(path) as saved:
    np.testing.assert_array_equal(saved["pr_indices"], other.real_indices)
    np.testing.assert_array_equal(saved["mu"], ref.stats.mean)  # FID part kept as is.

  # Two JAX processes (gloo on CPU) give the same file.
  out = tmp_path / "two_processes.npz"
  script = tmp_path / "worker.py"
  script.write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                  port=_free_port(), folder=str(folder), out=str(out)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, str(script), str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)
  with np.load(out) as two, np.load(path) as one:
    np.testing.assert_array_equal(two["pr_indices"], ref.real_indices)
    np.testing.assert_array_equal(two["pr_features"], ref.real_features)
    np.testing.assert_allclose(two["mu"], one["mu"], rtol=1e-12)
    np.testing.assert_allclose(two["sigma"], one["sigma"], rtol=1e-9, atol=1e-9)


def test_old_reference_files(tmp_path):
  """Without sFID's statistics: a workdir file is recomputed, a named one refused."""
  folder = tmp_path / "folder"
  _write_folder(folder)
  ev, data = _configs(folder)
  ev.precision_recall = False

  class WithSpatial(MeanColourExtractor):
    spatial_dim = 3

    def __call__(self, images, spatial=False):
      features, logits = super().__call__(images)
      return (features, logits, 2 * features) if spatial else (features, logits)

  old = metrics.FeatureStats().update(np.random.default_rng(0).normal(size=(10, 3)))
  workdir = tmp_path / "work"
  path = reference.reference_path(ev, data, workdir, WithSpatial())
  old.save(path)
  ref = reference.reference_statistics(ev, data, workdir, WithSpatial(),
                                       image_shape=(8, 8, 3))
  assert ref.stats.count == NUM_CLASSES * PER_CLASS
  np.testing.assert_allclose(ref.spatial.cov, 4 * ref.stats.cov, rtol=1e-9)
  with np.load(path) as saved:
    assert "mu_s" in saved and int(saved["count"]) == NUM_CLASSES * PER_CLASS

  named = tmp_path / "old.npz"
  old.save(named)
  ev.reference_stats = str(named)
  with pytest.raises(ValueError, match=r"config.eval.reference_stats=.*mu_s"):
    reference.reference_statistics(ev, data, workdir, WithSpatial(), image_shape=(8, 8, 3))


def test_adm_reference_batch_gives_its_statistics_and_images(tmp_path):
  """ADM's VIRTUAL_*.npz: mu/sigma, mu_s/sigma_s and the real set's images arr_0."""
  rng = np.random.default_rng(2)
  arr_0 = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
  arrays = dict(mu=rng.normal(size=3), sigma=np.eye(3), mu_s=rng.normal(size=3),
                sigma_s=2 * np.eye(3), arr_0=arr_0)
  path = tmp_path / "VIRTUAL_ref.npz"
  np.savez(path, **arrays)
  before = path.read_bytes()
  ev, data = _configs(tmp_path / "unused", str(path))

  class WithSpatial(MeanColourExtractor):
    spatial_dim = 3

  ref = reference.reference_statistics(ev, data, tmp_path, WithSpatial(),
                                       image_shape=(8, 8, 3))
  np.testing.assert_array_equal(ref.stats.mean, arrays["mu"])
  np.testing.assert_array_equal(ref.spatial.cov, arrays["sigma_s"])
  np.testing.assert_allclose(ref.real_features, arr_0.astype(np.float64).mean(axis=(1, 2)),
                             rtol=1e-6)
  assert ref.real_indices is None and path.read_bytes() == before
