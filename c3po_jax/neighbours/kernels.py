"""Kernels K(x_i, x) that weight neighbours, and their bandwidth rule.

Embeddings are unit vectors, so with s = cosine similarity the squared
distance is d^2 = 2 - 2 s. Normalized Gaussian weights depend only on the
differences of d^2 between a sample's neighbours, relative to sigma^2: a
kernel matters only when sigma^2 is on the scale of that spread.

Bandwidth rules (`sigma`; the paper does not report sigma):
* 'reference' (default): one sigma for the run, from the reference set alone:
  sigma^2 = the median, over references, of d_k^2 - d_1^2, the spread of
  squared distances to their own k nearest other references (overlap
  control applied as for test samples). A test sample whose neighbours are
  spread like a typical neighbourhood gives its k-th neighbour exp(-1/2)
  times the weight of its nearest, a tight one weights them about equally,
  a loose one concentrates on the nearest. It uses no test data, so every
  sample's weights are the same in a resumed, sharded or partial run.
* 'median': per test sample, the median distance to its selected neighbours
  (the previous default). Its scale cancels: sigma ~ d makes every
  neighbour's weight about exp(-1/2), so with k = 3 close neighbours every
  kernel is near uniform (similarities 0.93/0.92/0.90 give Gaussian weights
  0.36/0.34/0.30, linear 0.34/0.34/0.33).
* a positive float: sigma in units of d.

Dimensions: Q test samples, N neighbours, R references.
"""

from __future__ import annotations

import warnings

import numpy as np

KERNELS = ('gaussian', 'matern', 'polynomial', 'linear')
_MIN_SIGMA = 1e-3


def distances(similarity: np.ndarray) -> np.ndarray:
  """Cosine similarity of unit vectors -> Euclidean distance."""
  return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))


def reference_bandwidth(
  embeddings: np.ndarray, *, k: int, max_similarity: float = 0.95, max_points: int = 2048
) -> float:
  """The 'reference' rule: sigma from the references' own neighbourhoods.

  embeddings [R, De] (unit vectors). Uses at most `max_points` references
  (evenly spaced, deterministic) as queries against all of them.
  """
  from c3po_jax.neighbours.search import unit

  e = unit(embeddings)
  r = len(e)
  k = max(int(k), 2)  # one neighbour has no spread
  if r < 3:
    return 1.0
  queries = np.unique(np.linspace(0, r - 1, min(r, max_points)).astype(np.int64))
  spreads = []
  for start in range(0, len(queries), 512):
    rows = queries[start : start + 512]
    sim = e[rows] @ e.T  # [q, R]
    sim[np.arange(len(rows)), rows] = -np.inf  # not itself
    sim = np.where(sim > max_similarity, -np.inf, sim)
    n = min(k, r - 1)
    top = -np.sort(-sim, axis=-1)[:, :n]  # descending similarity
    ok = np.all(np.isfinite(top), axis=-1)
    d2 = 2.0 - 2.0 * top[ok]
    spreads.append(d2[:, -1] - d2[:, 0])
  spread = np.concatenate(spreads) if spreads else np.zeros(0)
  if not len(spread):
    return 1.0
  return float(np.sqrt(max(np.median(spread), _MIN_SIGMA**2)))


def bandwidth(dist: np.ndarray, valid: np.ndarray, sigma) -> np.ndarray:
  """[Q, N] distances -> [Q, 1] bandwidth ('median' or a positive float).

  The 'reference' rule is resolved to a float by the caller
  (`reference_bandwidth`), as it needs the reference set.
  """
  if sigma == 'median':
    masked = np.where(valid, dist, np.nan)
    with warnings.catch_warnings():  # rows without neighbours: NaN, replaced below
      warnings.simplefilter('ignore', RuntimeWarning)
      med = np.nanmedian(masked, axis=-1, keepdims=True)
    return np.maximum(np.nan_to_num(med, nan=1.0), _MIN_SIGMA)
  if sigma == 'reference':
    raise ValueError("sigma='reference' needs the reference set: resolve it first")
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
