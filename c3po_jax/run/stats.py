"""The statistics of a results table: Wilson intervals, exact McNemar p, chance."""

from __future__ import annotations

import math


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """The Wilson score interval of k successes in n trials (95% for z=1.96).

  Unlike the normal approximation it stays inside [0, 1] and is sensible at 0
  and n successes, which small benchmarks hit.
  """
  if n == 0:
    return (0.0, 1.0)
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(b: int, c: int) -> float:
  """Exact two-sided McNemar p-value from the discordant counts b, c."""
  n = b + c
  if n == 0:
    return 1.0
  k = min(b, c)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
  return min(1.0, 2.0 * tail)


def chance(rows: list[dict]) -> float | None:
  """Accuracy (fraction) of guessing uniformly: the mean of 1 / choices over the samples."""
  per_id = {r['id']: len(r['choices']) for r in rows if r.get('choices')}
  return round(sum(1 / n for n in per_id.values()) / len(per_id), 6) if per_id else None
