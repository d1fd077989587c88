"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM's evaluator runs them.

Each set's manifold is the union of balls around its points, of radius the distance to
the k-th nearest other point of the same set (k = 3). Precision is the fraction of
samples inside the real manifold, recall the fraction of real points inside the samples'.

Features are kept as float32 (what the extractors return, 400 MB for 50,000 × 2048) and
every distance block is computed in float64 from them, so a block of rows × columns is
all the extra memory and no comparison at a ball's edge depends on round-off. ADM
computes the same squared distances in float16 (float32 where float16 overflows); the
estimator is the same, the rounding is not.
"""

import numpy as np

K = 3  # Kynkäänniemi et al.'s and ADM's neighbourhood size.
BLOCK_SIZE = 4096  # Rows and columns per distance block: 128 MiB of float64.


def _squared_distances(a, b):
  """[A, B] float64 |a_i − b_j|² of float rows a: [A, D], b: [B, D]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sq = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
  return np.maximum(sq, 0.0)


def manifold_radii(features, *, k=K, block_size=BLOCK_SIZE):
  """[N] float64 squared distance from each row of features [N, D] to its k-th neighbour.

  The k + 1 smallest distances of a row, itself (0) included, lie among the k + 1
  smallest of each column block, so a row never needs all N distances at once.
  """
  n = features.shape[0]
  radii = np.empty(n)
  for start in range(0, n, block_size):
    rows = features[start:start + block_size]
    nearest = []
    for col in range(0, n, block_size):
      d = _squared_distances(rows, features[col:col + block_size])
      keep = min(k + 1, d.shape[1])
      nearest.append(np.partition(d, keep - 1, axis=1)[:, :keep])
    radii[start:start + block_size] = np.partition(np.concatenate(nearest, axis=1), k,
                                                   axis=1)[:, k]
  return radii


def coverage(manifold, radii, queries, *, block_size=BLOCK_SIZE):
  """Fraction of queries [M, D] within some ball |q − manifold_i|² <= radii_i."""
  inside = np.zeros(queries.shape[0], bool)
  for start in range(0, queries.shape[0], block_size):
    rows = queries[start:start + block_size]
    for col in range(0, manifold.shape[0], block_size):
      d = _squared_distances(rows, manifold[col:col + block_size])
      inside[start:start + block_size] |= np.any(d <= radii[None, col:col + block_size],
                                                 axis=1)
  return float(inside.mean())


def precision_recall(real_features, fake_features, *, k=K, block_size=BLOCK_SIZE):
  """(precision, recall) of samples fake_features [M, D] against real_features [N, D].

  precision = (1/M) Σ_j 1[∃i: |f_j − r_i|² <= NN_k(r_i)²],
  recall    = (1/N) Σ_i 1[∃j: |r_i − f_j|² <= NN_k(f_j)²],
  with NN_k the distance to the k-th nearest other point of the same set. ADM uses
  10,000 random reference images and all 50,000 samples. Inputs keep their dtype
  (float32 from the sweep); each block is computed in float64.
  """
  real, fake = np.asarray(real_features), np.asarray(fake_features)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError("real_features and fake_features must be [N, D] and [M, D]; "
                     f"got {real.shape} and {fake.shape}.")
  if min(real.shape[0], fake.shape[0]) <= k:
    raise ValueError(f"Each set needs more than k={k} points; got "
                     f"{real.shape[0]} real and {fake.shape[0]} fake.")
  real_radii = manifold_radii(real, k=k, block_size=block_size)
  fake_radii = manifold_radii(fake, k=k, block_size=block_size)
  precision = coverage(real, real_radii, fake, block_size=block_size)
  recall = coverage(fake, fake_radii, real, block_size=block_size)
  return precision, recall
