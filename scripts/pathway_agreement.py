"""Do the re-mixing methods of a run land on the same experts?

Reads every `results.jsonl` under --run_dir (one per benchmark) and, from each
method's final pathway (`pathway.after` over `pathway.core`), takes the top-1
expert of every critical layer. Prints, per benchmark and pooled, the share
of (question, layer) cases where two methods pick the same top-1 expert, and
with --groups (the demo's families in training order, e.g.
`sum,diff,max,min`; family f owns experts [f*G, (f+1)*G), G = E / families)
the share whose top-1 is in the benchmark's own family group, before
(`base`: the test sample's own routing) and after each method.

  PYTHONPATH=. python scripts/pathway_agreement.py --run_dir=runs/c3po \\
      --groups=sum,diff,max,min --num_experts=8
"""

from __future__ import annotations

import collections
import glob
import itertools
import os

import numpy as np
from absl import app, flags

from c3po_jax.run import results

_RUN_DIR = flags.DEFINE_string('run_dir', 'runs/c3po', 'A run directory (per-benchmark subdirs).')
_GROUPS = flags.DEFINE_list('groups', [], 'Families in training order (demo routing groups).')
_NUM_EXPERTS = flags.DEFINE_integer('num_experts', 8, 'Experts per layer (with --groups).')


def top1(pathway: dict, key: str) -> list[int]:
  """The top-1 expert of each critical layer of a row's pathway record."""
  core, w = np.asarray(pathway['core']), np.asarray(pathway[key])
  return [int(core[c][np.argmax(w[c])]) for c in range(len(core))]


def benchmark_counts(rows: list[dict], group: set[int] | None) -> collections.Counter:
  by_id = collections.defaultdict(dict)
  for r in rows:
    if r.get('pathway'):
      by_id[r['id']][r['method']] = r['pathway']
  c = collections.Counter()
  for methods in by_id.values():
    tops = {m: top1(p, 'after') for m, p in methods.items()}
    tops['base'] = top1(next(iter(methods.values())), 'before')
    c['cases'] += len(tops['base'])
    for a, b in itertools.combinations(sorted(tops), 2):
      c[f'{a} = {b}'] += sum(x == y for x, y in zip(tops[a], tops[b]))
    if group is not None:
      for m, t in tops.items():
        c[f'{m} in family group'] += sum(x in group for x in t)
  return c


def main(argv):
  del argv
  groups = _GROUPS.value
  size = _NUM_EXPERTS.value // len(groups) if groups else 0
  pooled = collections.Counter()
  for path in sorted(glob.glob(os.path.join(_RUN_DIR.value, '*', 'results.jsonl'))):
    name = os.path.basename(os.path.dirname(path))
    rows = results.read_rows(path)
    group = None
    if name in groups:
      f_idx = groups.index(name)
      group = set(range(f_idx * size, (f_idx + 1) * size))
    c = benchmark_counts(rows, group)
    pooled += c
    print(name, {k: round(v / c['cases'], 3) for k, v in sorted(c.items()) if k != 'cases'})
  if pooled['cases']:
    print(
      'pooled',
      {k: round(v / pooled['cases'], 3) for k, v in sorted(pooled.items()) if k != 'cases'},
    )


if __name__ == '__main__':
  app.run(main)
