"""Kernels K(x_i, x) that weight neighbours, and their bandwidth rule.

Embeddings are unit vectors, so with s = cosine similarity the squared
distance is d^2 = 2 - 2 s. Bandwidth rule (`sigma='median'`, our default; the
paper does not report sigma): per test sample, the median distance to its
selected neighbours, floored at 1e-3. A median keeps the weights informative
whatever the scale of the embedding space: the nearest neighbour weighs
more, and no neighbour is ignored outright.

Dimensions: Q test samples, N neighbours.
"""

from __future__ import annotations

import warnings

import numpy as np

KERNELS = ('gaussian', 'matern', 'polynomial', 'linear')
_MIN_SIGMA = 1e-3


def distances(similarity: np.ndarray) -> np.ndarray:
  """Cosine similarity of unit vectors -> Euclidean distance."""
  return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))


def bandwidth(dist: np.ndarray, valid: np.ndarray, sigma) -> np.ndarray:
  """[Q, N] distances -> [Q, 1] bandwidth ('median' or a positive float)."""
  if sigma == 'median':
    masked = np.where(valid, dist, np.nan)
    with warnings.catch_warnings():  # rows without neighbours: NaN, replaced below
      warnings.simplefilter('ignore', RuntimeWarning)
      med = np.nanmedian(masked, axis=-1, keepdims=True)
    return np.maximum(np.nan_to_num(med, nan=1.0), _MIN_SIGMA)
  sigma = float(sigma)
  if sigma <= 0:
    raise ValueError(f'sigma must be positive, got {sigma}')
  return np.full((dist.shape[0], 1), sigma)


def kernel_weights(
  similarity: np.ndarray, valid: np.ndarray, *, kind: str = 'gaussian', sigma='median'
) -> np.ndarray:
  """[Q, N] similarities -> [Q, N] non-negative weights summing to 1 per row.

  Rows without a valid neighbour are all zero.
  gaussian: exp(-d^2 / (2 sigma^2)); matern (nu = 3/2): (1 + r) exp(-r) with
  r = sqrt(3) d / sigma; polynomial: ((1 + s) / 2)^2; linear: max(s, 0).
  """
  similarity = np.asarray(similarity, np.float64)
  dist = distances(similarity)
  if kind == 'gaussian':
    sig = bandwidth(dist, valid, sigma)
    w = np.exp(-(dist**2) / (2 * sig**2))
  elif kind == 'matern':
    r = np.sqrt(3.0) * dist / bandwidth(dist, valid, sigma)
    w = (1.0 + r) * np.exp(-r)
  elif kind == 'polynomial':
    w = ((1.0 + similarity) / 2.0) ** 2
  elif kind == 'linear':
    w = np.maximum(similarity, 0.0)
  else:
    raise ValueError(f'unknown kernel {kind!r}; expected one of {KERNELS}')
  w = np.where(valid, w, 0.0)
  total = w.sum(axis=-1, keepdims=True)
  # A row whose kernel vanishes everywhere (e.g. linear with s <= 0) falls
  # back to uniform weights over its valid neighbours.
  uniform = valid / np.maximum(valid.sum(axis=-1, keepdims=True), 1)
  w = np.where(total > 0, w / np.where(total > 0, total, 1.0), uniform)
  return w.astype(np.float32)
