"""Neighbourhoods in an embedding space: kNN or epsilon-ball, overlap control.

Dimensions: Q test samples, R references, De embedding, N neighbours (k).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Neighbourhood:
  index: np.ndarray  # [Q, N] int reference indices (-1: none)
  similarity: np.ndarray  # [Q, N] cosine similarity
  valid: np.ndarray  # [Q, N] bool


def unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def find(
  queries: np.ndarray,
  references: np.ndarray,
  *,
  k: int,
  epsilon: float | None = None,
  max_similarity: float = 0.95,
  ball_cap: int = 64,
  chunk: int = 1024,
) -> Neighbourhood:
  """Nearest references of each query by cosine similarity.

  Args:
    queries: [Q, De] embeddings (normalized here).
    references: [R, De] embeddings (normalized here).
    k: neighbours per query (kNN); ignored for an epsilon-ball.
    epsilon: if set, every reference within cosine distance 1 - s <= epsilon
      (epsilon-ball), nearest first, up to `ball_cap` of them (a static
      bound for fixed shapes; not k).
    max_similarity: drop references more similar than this to the query
      (overlap control: near-duplicates of the test question).
    chunk: queries per similarity block (bounds memory at chunk x R).
  """
  if len(references) == 0:
    raise ValueError('the reference set is empty: no neighbours can be found')
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  uq, ur = unit(queries), unit(references)
  width = k if epsilon is None else ball_cap
  n = min(width, len(ur))
  index = np.full((len(uq), width), -1, np.int64)
  sim = np.zeros((len(uq), width), np.float32)
  valid = np.zeros((len(uq), width), bool)
  for start in range(0, len(uq), chunk):
    s = uq[start : start + chunk] @ ur.T  # [chunk, R]
    s = np.where(s > max_similarity, -np.inf, s)
    top = np.argsort(-s, axis=-1, kind='stable')[:, :n]  # [chunk, n]
    top_s = np.take_along_axis(s, top, axis=-1)
    ok = np.isfinite(top_s)
    if epsilon is not None:
      ok &= (1.0 - top_s) <= epsilon
    rows = slice(start, start + len(s))
    index[rows, :n] = np.where(ok, top, -1)
    sim[rows, :n] = np.where(ok, top_s, 0.0)
    valid[rows, :n] = ok
  return Neighbourhood(index=index, similarity=sim, valid=valid)
