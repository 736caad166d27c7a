"""The demo suite's splits: random streams, the frozen held-out pools, leak checks.

Every split of a suite is drawn from its own named random stream (`stream`),
so adding a split or changing a size leaves the others as they were. The
held-out problems of a family are split once, by the suite's seed, into a dev
pool and a test pool (`held_out_pools`): every draw takes dev from the first
and test from the second, so a test problem of any draw is never a dev
problem of any draw, and never asked in the test phrasing in train or
reference. The plain phrasings do ask it in train: they teach the skill
the test phrasing needs (suite.py).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence

import numpy as np

SPLITS = ('train', 'reference', 'dev', 'test')


def stream(seed: int, *names: str) -> np.random.Generator:
  """An independent random stream per seed and name path."""
  keys = [zlib.crc32(n.encode()) for n in names]
  return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def sample(rng: np.random.Generator, problems: Sequence, n: int) -> list:
  """n problems, without replacement while there are enough."""
  idx = rng.choice(len(problems), size=n, replace=n > len(problems))
  return [problems[i] for i in idx]


def held_out_pools(family, config) -> tuple[list, list, list]:
  """(dev pool, test pool, rest): the family's problems, split once by config.seed (a SuiteConfig).

  The held-out problems (never asked in the test phrasing in train or
  reference) are divided into a dev pool and a test pool, disjoint. The
  seed's draw of dev + test problems leads each pool (so the seed's own draw
  is the same files as before pools existed); the held-out problems it did
  not pick are dealt out alternately. `rest` holds every other problem: the
  references and the test phrasing's training questions come from it.
  """
  seed = config.seed
  problems = family.problems(stream(seed, family.name, 'problems'))
  order = stream(seed, family.name, 'split').permutation(len(problems))
  num_eval = config.num_dev + config.num_test
  num_held = max(num_eval, round(config.held_out_fraction * len(problems)))
  if num_held >= len(problems):
    raise ValueError(f'{family.name} has {len(problems)} problems, too few for {num_held}')
  held_out = [problems[i] for i in order[:num_held]]
  rest = [problems[i] for i in order[num_held:]]
  picked = stream(seed, family.name, 'draw').choice(num_held, size=num_eval, replace=False)
  taken = set(picked.tolist())
  unpicked = [i for i in range(num_held) if i not in taken]
  dev = [held_out[i] for i in (*picked[: config.num_dev], *unpicked[0::2])]
  test = [held_out[i] for i in (*picked[config.num_dev :], *unpicked[1::2])]
  return dev, test, rest


def draw_from(pool: list, n: int, rng: np.random.Generator | None) -> list:
  """n problems of a pool: its leading ones (rng None), or a fresh sample."""
  if rng is None:
    return pool[:n]
  return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]


def pool_digest(problems: Sequence) -> str:
  """sha256 of a pool: its problems, sorted, as JSON."""
  data = json.dumps(sorted(list(p) if isinstance(p, tuple) else p for p in problems))
  return hashlib.sha256(data.encode()).hexdigest()


def check_no_leak(records: dict[tuple[str, str], list[dict]]) -> None:
  """Raises ValueError if a dev/test question occurs in train or reference, or dev in test."""
  seen = {
    split: {r['question'] for (_, s), rows in records.items() if s == split for r in rows}
    for split in SPLITS
  }
  for split in ('dev', 'test'):
    for other in ('train', 'reference'):
      leaked = seen[split] & seen[other]
      if leaked:
        raise ValueError(f'{len(leaked)} {split} questions occur in {other}: {sorted(leaked)[:3]}')
  if seen['dev'] & seen['test']:
    raise ValueError('dev and test share questions')
