"""One table over several runs of the demo: per-run rows and a pooled paired test.

Each run is an output directory of `python -m c3po_jax.main` on a suite (one
results.jsonl per family, under its own folder). Per run: pooled accuracy of
every method, NGD's exact McNemar p against base with its fixed / broken
counts, and the oracle's gap over base. A pool (`--pool=a,b,c`: e.g. three
training seeds on the same test draw) adds one row over all its runs'
questions: a question of one run and the same question of another are
different pairs (different models), so the paired test concatenates the
(run, family, id) pairs and applies the exact McNemar test to the totals.

  python -m c3po_jax.demo.robustness --run=shipped:OUT0 --run=seed1:OUT1 \\
      --run=seed2:OUT2 --run=seed3:OUT3 --pool=seed1,seed2,seed3 --json=table.json
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from collections.abc import Sequence

from absl import app, flags

from c3po_jax.run import results
from c3po_jax.run.stats import mcnemar_p

# The README's row order: base, the control, then the paper's Table 1 order.
ORDER = (
  'base',
  'random_pathway',
  *(m for m in results.METHOD_ORDER if m not in ('base', 'random_pathway')),
)
REMIX = ('mode_finding', 'kernel_regression', 'ngd')


def load_run(output_dir: str) -> dict[str, dict[tuple[str, str], bool]]:
  """method -> {(family, id): correct} over every family folder of a main run."""
  paths = sorted(glob.glob(os.path.join(glob.escape(output_dir), '*', results.RESULTS_FILE)))
  if not paths:
    raise FileNotFoundError(f'{output_dir}: no */{results.RESULTS_FILE} (not a suite run?)')
  out: dict[str, dict[tuple[str, str], bool]] = defaultdict(dict)
  for path in paths:
    family = os.path.basename(os.path.dirname(path))
    for row in results.read_rows(path):
      out[row['method']][(family, row['id'])] = bool(row['correct'])
  return dict(out)


def compare(per_method: dict[str, dict], method: str, against: str = 'base') -> dict:
  """Paired counts of method vs `against` on their shared keys, and the exact McNemar p."""
  a, b = per_method[against], per_method[method]
  keys = sorted(set(a) & set(b))
  fixed = sum(1 for k in keys if b[k] and not a[k])
  broken = sum(1 for k in keys if a[k] and not b[k])
  return {'n': len(keys), 'fixed': fixed, 'broken': broken, 'p': mcnemar_p(fixed, broken)}


def summarize_run(per_method: dict[str, dict]) -> dict:
  """Accuracy (%) per method, NGD vs base, the oracle's gap, the re-mixing order."""
  acc = {m: 100 * sum(v.values()) / len(v) for m, v in per_method.items() if v}
  out = {'n': len(per_method.get('base', {})), 'accuracy': acc}
  if 'ngd' in per_method and 'base' in per_method:
    out['ngd_vs_base'] = compare(per_method, 'ngd')
  if 'oracle' in per_method and 'base' in per_method:
    out['oracle_gap'] = acc['oracle'] - acc['base']
  remix = [m for m in REMIX if m in acc]
  out['remix_order'] = sorted(remix, key=lambda m: -acc[m])
  return out


def pool(runs: dict[str, dict[str, dict]], names: Sequence[str]) -> dict[str, dict]:
  """The runs' questions as one set: keys become (run, family, id)."""
  pooled: dict[str, dict] = defaultdict(dict)
  for name in names:
    for method, answers in runs[name].items():
      for key, ok in answers.items():
        pooled[method][(name, *key)] = ok
  return dict(pooled)


def markdown(table: dict[str, dict]) -> str:
  """The table: a row per run (and pool), a column per method, NGD's p and +/-."""
  methods = [m for m in ORDER if any(m in t['accuracy'] for t in table.values())]
  head = ['run', 'n', *methods, 'NGD p vs base (+/−)', 'oracle gap', 're-mixing order']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, t in table.items():
    cells = [name, str(t['n'])]
    cells += [f'{t["accuracy"][m]:.2f}' if m in t['accuracy'] else '' for m in methods]
    c = t.get('ngd_vs_base')
    cells.append(f'{c["p"]:.2g} (+{c["fixed"]}/−{c["broken"]})' if c else '')
    gap = t.get('oracle_gap')
    cells.append(f'{gap:.2f}' if gap is not None else '')
    cells.append(' > '.join(t['remix_order']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def build(specs: Sequence[str], pools: Sequence[str]) -> dict[str, dict]:
  """specs 'name:dir'; pools 'a,b,...' of those names -> {row name: summary}."""
  runs = {}
  for spec in specs:
    name, sep, path = spec.partition(':')
    if not sep or not name or not path:
      raise ValueError(f'--run={spec!r}: expected NAME:OUTPUT_DIR')
    runs[name] = load_run(path)
  table = {name: summarize_run(r) for name, r in runs.items()}
  for spec in pools:
    names = [n for n in spec.split(',') if n]
    missing = [n for n in names if n not in runs]
    if missing or len(names) < 2:
      raise ValueError(f'--pool={spec!r}: needs two or more of the --run names ({missing})')
    table['pooled ' + '+'.join(names)] = summarize_run(pool(runs, names))
  return table


_RUN = flags.DEFINE_multi_string('run', [], 'NAME:OUTPUT_DIR of a main run on a suite.')
_POOL = flags.DEFINE_multi_string('pool', [], 'Comma-separated run names pooled into one row.')
_JSON = flags.DEFINE_string('json', None, 'Also write the table as JSON here.')


def main(argv):
  del argv
  if not _RUN.value:
    raise app.UsageError('give at least one --run=NAME:OUTPUT_DIR')
  try:
    table = build(_RUN.value, _POOL.value)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(markdown(table))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(table, f, indent=2, sort_keys=True)


if __name__ == '__main__':
  app.run(main)
