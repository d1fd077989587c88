"""FID, sFID and Inception Score in float64 numpy, plus streaming statistics.

The extractors that produce the features and logits live in `inception.py` (the
literature's Inception-v3) and `classifier.py` (a small stand-in CNN); precision and
recall in `manifold.py`.
"""

import os

from etils import epath
import numpy as np
import scipy.linalg
import scipy.special

from cfg_guidance import files

# improved-gan's inception_score.py and every paper since report IS over 10 splits;
# ADM's evaluator takes splits of 5,000, the same blocks for its 50,000 samples.
DEFAULT_SPLITS = 10


def frechet_distance(mu1, sigma1, mu2, sigma2, *, rtol=1e-6):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = |mu1 − mu2|² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)  (Heusel et al. 2017),
  with tr (sigma1 sigma2)^½ = Σ √λ(sigma1^½ sigma2 sigma1^½): eigenvalues of symmetric
  positive semi-definite matrices, so the computation stays real and takes a fixed time
  when the covariances are singular (fewer samples than dimensions), where
  `scipy.linalg.sqrtm` of the non-symmetric product took 10–90 s at D = 2048.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.
    rtol: an eigenvalue below −rtol·(largest) means the inputs are not covariances (a
      ValueError); smaller negative ones are round-off and count as 0.

  Returns:
    The distance, a Python float.
  """
  mu1, mu2 = (np.asarray(m, np.float64) for m in (mu1, mu2))
  sigma1, sigma2 = (np.asarray(s, np.float64) for s in (sigma1, sigma2))
  for name, mu, sigma in (("1", mu1, sigma1), ("2", mu2, sigma2)):
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f"mu{name} must be [D] and sigma{name} [D, D]; got "
                       f"{mu.shape} and {sigma.shape}.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
      raise ValueError(f"mu{name} or sigma{name} has NaN or inf entries.")
  if mu1.shape != mu2.shape:
    raise ValueError(f"Feature dimensions differ: mu1 {mu1.shape} vs mu2 {mu2.shape}.")

  def nonnegative(eigenvalues, what):
    if eigenvalues.min() < -rtol * max(np.abs(eigenvalues).max(), np.finfo(float).tiny):
      raise ValueError(f"{what} has a negative eigenvalue {eigenvalues.min():.3g}: "
                       "sigma1/sigma2 are not valid covariances.")
    return np.clip(eigenvalues, 0.0, None)

  w, v = scipy.linalg.eigh(sigma1)
  sqrt_sigma1 = (v * np.sqrt(nonnegative(w, "sigma1"))) @ v.T
  product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  eig = scipy.linalg.eigh((product + product.T) / 2, eigvals_only=True)
  trace_sqrt = np.sqrt(nonnegative(eig, "sigma1^½ sigma2 sigma1^½")).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def split_index(indices, num_samples, num_splits=DEFAULT_SPLITS):
  """The IS split of each example: improved-gan's contiguous blocks.

  Split s holds examples floor(s·n/S) <= i < floor((s+1)·n/S), so i belongs to
  split (S·(i+1) − 1) // n.

  Args:
    indices: [B] int example indices in [0, num_samples).
    num_samples: n, the total number of examples.
    num_splits: S.

  Returns:
    [B] int split indices in [0, S).
  """
  indices = np.asarray(indices, np.int64)
  return (num_splits * (indices + 1) - 1) // num_samples


def inception_score(logits, *, num_splits=DEFAULT_SPLITS):
  """Inception Score exp(E_x KL(p(y|x) ‖ p(y))) over splits (Salimans et al. 2016).

  Splits are improved-gan's contiguous blocks (see `split_index`); p(y) is each
  split's mean prediction.

  Args:
    logits: [N, C] unnormalised class scores; p(y|x) = softmax(logits).
    num_splits: S; requires N >= S.

  Returns:
    (mean, std) of the S per-split scores, Python floats.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, C]; got shape {logits.shape}.")
  n = logits.shape[0]
  if n < num_splits:
    raise ValueError(f"Inception Score needs at least num_splits={num_splits} "
                     f"examples; got {n}.")
  log_p = scipy.special.log_softmax(logits, axis=-1)
  p = np.exp(log_p)
  scores = []
  for s in range(num_splits):
    part_p = p[s * n // num_splits:(s + 1) * n // num_splits]
    part_log_p = log_p[s * n // num_splits:(s + 1) * n // num_splits]
    p_y = part_p.mean(axis=0)
    # Classes no example in the split predicts (p = 0 exactly) contribute 0 log 0 = 0.
    log_p_y = np.log(np.where(p_y > 0, p_y, 1.0))
    kl = np.sum(part_p * (part_log_p - log_p_y), axis=-1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def metric_names(extractor):
  """Display names for the metrics an extractor's features give.

  Only the literature's Inception-v3 (`extractor.comparable`) earns the bare
  names; any other extractor's figures carry its name, e.g. "FID (digits-cnn)".

  Returns:
    {"fid": ..., "sfid": ..., "is": ..., "precision": ..., "recall": ...}.
  """
  suffix = "" if getattr(extractor, "comparable", False) else f" ({extractor.name})"
  return {"fid": "FID" + suffix, "sfid": "sFID" + suffix, "is": "IS" + suffix,
          "precision": "Precision" + suffix, "recall": "Recall" + suffix}


class FeatureStats:
  """Streaming float64 statistics for FID (mean, covariance) and IS (per split).

  Features are merged batch by batch with Chan et al.'s parallel update of the
  count, mean and centred second moment M2, so `cov` = M2 / (n − 1) matches
  `np.cov` without keeping the features. When logits are given, each IS split
  keeps its count, Σ p(y|x) and Σ_x Σ_y p log p, which is all that
  E_x KL(p(y|x) ‖ p(y)) = E_x Σ p log p − Σ p(y) log p(y) needs.

  Split assignment: with `num_samples` known, example i goes to improved-gan's
  contiguous block (`split_index`), so the result equals `inception_score` on all
  logits at once. Without it, example i goes to split i mod S, which is an
  equally valid IS estimate but not the same number. Example indices count up
  from 0 across `update` calls; pass `indices` explicitly when several
  accumulators (e.g. one per process) see disjoint parts of one sample set.
  """

  def __init__(self, *, num_samples=None, num_splits=DEFAULT_SPLITS):
    if num_samples is not None and num_samples < num_splits:
      raise ValueError(f"num_samples={num_samples} must be at least "
                       f"num_splits={num_splits}.")
    self.num_samples = num_samples
    self.num_splits = num_splits
    self.count = 0
    self._mean = None
    self._m2 = None
    self._next_index = 0
    # IS accumulators, [S], [S, C] and [S]; created by the first update with logits.
    self._split_count = None
    self._split_sum_p = None
    self._split_sum_plogp = None
    # Statistics loaded without a count (an ADM / TTUR reference file) are frozen.
    self._frozen_cov = None

  def update(self, features, logits=None, *, indices=None):
    """Adds a batch. features: [B, D]; logits: [B, C] or None; indices: [B] or None."""
    self._check_mutable()
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be [B, D]; got shape {features.shape}.")
    batch = features.shape[0]
    if indices is None:
      indices = np.arange(self._next_index, self._next_index + batch)
    indices = np.asarray(indices, np.int64)
    if indices.shape != (batch,):
      raise ValueError(f"indices must be [B={batch}]; got shape {indices.shape}.")
    if self.num_samples is not None and batch and (
        indices.min() < 0 or indices.max() >= self.num_samples):
      raise ValueError(f"Example indices must lie in [0, num_samples="
                       f"{self.num_samples}); got [{indices.min()}, {indices.max()}].")
    if self.count and (logits is None) != (self._split_count is None):
      raise ValueError("Give logits with every batch or with none: IS would silently "
                       "miss the examples of batches without them.")
    if logits is not None:
      logits = np.asarray(logits, np.float64)
      if logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits must be [B={batch}, C]; got {logits.shape}.")
      if self._split_count is not None and logits.shape[1] != self._split_sum_p.shape[1]:
        raise ValueError(f"Number of classes changed: {self._split_sum_p.shape[1]} "
                         f"then {logits.shape[1]}.")
    if batch == 0:
      return self
    batch_mean = features.mean(axis=0)
    centred = features - batch_mean
    self._merge_moments(batch, batch_mean, centred.T @ centred)
    self._next_index = max(self._next_index, int(indices.max()) + 1)
    if logits is not None:
      self._add_logits(logits, indices)
    return self

  def merge(self, other):
    """Adds another accumulator's statistics to this one; returns self."""
    self._check_mutable()
    other._check_mutable()
    if (other.num_samples, other.num_splits) != (self.num_samples, self.num_splits):
      raise ValueError("Cannot merge statistics with different num_samples/num_splits: "
                       f"{(self.num_samples, self.num_splits)} vs "
                       f"{(other.num_samples, other.num_splits)}.")
    if self.count and other.count and (
        (self._split_count is None) != (other._split_count is None)):
      raise ValueError("Only one of the statistics has logits; merged IS would "
                       "silently miss the other's examples.")
    if other._split_count is not None:
      self._ensure_splits(other._split_sum_p.shape[1])
    if other.count:
      self._merge_moments(other.count, other._mean, other._m2)
      self._next_index = max(self._next_index, other._next_index)
    if other._split_count is not None:
      self._split_count += other._split_count
      self._split_sum_p += other._split_sum_p
      self._split_sum_plogp += other._split_sum_plogp
    return self

  @property
  def mean(self):
    """[D] float64 mean of the features."""
    if self._mean is None:
      raise ValueError("No features have been added to these statistics.")
    return self._mean

  @property
  def cov(self):
    """[D, D] float64 unbiased covariance (as np.cov) of the features."""
    if self._frozen_cov is not None:
      return self._frozen_cov
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 examples; got {self.count}.")
    return self._m2 / (self.count - 1)

  def frechet_distance(self, other):
    """FID between these statistics and another FeatureStats (e.g. a reference)."""
    return frechet_distance(self.mean, self.cov, other.mean, other.cov)

  def inception_score(self):
    """(mean, std) over splits; equals `inception_score` when num_samples was set."""
    if self._split_count is None:
      raise ValueError("No logits were added, so there is no Inception Score.")
    if self.num_samples is not None and self._split_count.sum() != self.num_samples:
      raise ValueError(f"Expected num_samples={self.num_samples} examples with logits; "
                       f"got {int(self._split_count.sum())}.")
    if (self._split_count == 0).any():
      raise ValueError(f"Every one of the {self.num_splits} splits needs examples; "
                       f"got counts {self._split_count.tolist()}.")
    p_y = self._split_sum_p / self._split_count[:, None]
    kl = (self._split_sum_plogp / self._split_count
          - scipy.special.xlogy(p_y, p_y).sum(axis=-1))
    scores = np.exp(kl)
    return float(scores.mean()), float(scores.std())

  def to_arrays(self, suffix=""):
    """`mu`, `sigma` (ADM/TTUR's keys) and what merging needs, each key + suffix."""
    arrays = {"mu": self.mean, "sigma": self.cov}
    if self._frozen_cov is None:
      arrays.update(count=np.int64(self.count), next_index=np.int64(self._next_index),
                    num_splits=np.int64(self.num_splits),
                    num_samples=np.int64(-1 if self.num_samples is None
                                         else self.num_samples))
    if self._split_count is not None:
      arrays.update(split_count=self._split_count, split_sum_p=self._split_sum_p,
                    split_sum_plogp=self._split_sum_plogp)
    return {key + suffix: value for key, value in arrays.items()}

  def save(self, path):
    """Writes `to_arrays()` as an .npz, atomically, to any epath (gs:// too)."""
    files.save_npz(path, **self.to_arrays())

  @classmethod
  def from_arrays(cls, arrays, suffix="", *, source="the arrays"):
    """Reads `to_arrays(suffix)`, or `mu`/`sigma` + suffix alone (ADM reference batches).

    Arrays without a `count` give frozen statistics: usable as an FID reference, but
    `update`/`merge` refuse them. `source` names the file in errors.
    """
    missing = {"mu" + suffix, "sigma" + suffix} - set(arrays)
    if missing:
      raise ValueError(f"{source} is not a statistics file: it lacks "
                       f"{sorted(missing)} (has {sorted(arrays)}).")
    mu = np.asarray(arrays["mu" + suffix], np.float64)
    sigma = np.asarray(arrays["sigma" + suffix], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f"{source}: mu{suffix} must be [D] and sigma{suffix} [D, D]; got "
                       f"{mu.shape} and {sigma.shape}.")
    if "count" + suffix not in arrays:
      stats = cls()
      stats._mean, stats._frozen_cov = mu, sigma
      return stats
    get = lambda key: arrays[key + suffix]
    num_samples = int(get("num_samples"))
    stats = cls(num_samples=None if num_samples < 0 else num_samples,
                num_splits=int(get("num_splits")))
    stats.count = int(get("count"))
    stats._next_index = int(get("next_index"))
    stats._mean = mu
    stats._m2 = sigma * (stats.count - 1)
    if "split_count" + suffix in arrays:
      stats._split_count = get("split_count").astype(np.int64)
      stats._split_sum_p = get("split_sum_p").astype(np.float64)
      stats._split_sum_plogp = get("split_sum_plogp").astype(np.float64)
    return stats

  @classmethod
  def load(cls, path):
    """Reads `save`'s .npz, or any .npz with `mu` and `sigma` (ADM reference batches)."""
    path = os.fspath(path)
    if not epath.Path(path).exists():
      raise FileNotFoundError(f"No statistics file at {path!r}.")
    return cls.from_arrays(files.load_npz(path), source=repr(path))

  def _check_mutable(self):
    if self._frozen_cov is not None:
      raise ValueError("These statistics were loaded from a file without a sample "
                       "count (a reference mu/sigma); they cannot be updated or merged.")

  def _merge_moments(self, count, mean, m2):
    if self.count == 0:
      self.count, self._mean, self._m2 = count, mean.copy(), m2.copy()
      return
    if mean.shape != self._mean.shape:
      raise ValueError(f"Feature dimension changed: {self._mean.shape[0]} then "
                       f"{mean.shape[0]}.")
    total = self.count + count
    delta = mean - self._mean
    self._mean = self._mean + delta * (count / total)
    self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
    self.count = total

  def _ensure_splits(self, num_classes):
    if self._split_count is None:
      self._split_count = np.zeros(self.num_splits, np.int64)
      self._split_sum_p = np.zeros((self.num_splits, num_classes))
      self._split_sum_plogp = np.zeros(self.num_splits)
    elif self._split_sum_p.shape[1] != num_classes:
      raise ValueError(f"Number of classes changed: {self._split_sum_p.shape[1]} then "
                       f"{num_classes}.")

  def _add_logits(self, logits, indices):
    self._ensure_splits(logits.shape[1])
    if self.num_samples is None:
      splits = indices % self.num_splits
    else:
      splits = split_index(indices, self.num_samples, self.num_splits)
    log_p = scipy.special.log_softmax(logits, axis=-1)
    p = np.exp(log_p)
    np.add.at(self._split_count, splits, 1)
    np.add.at(self._split_sum_p, splits, p)
    np.add.at(self._split_sum_plogp, splits, np.sum(p * log_p, axis=-1))
