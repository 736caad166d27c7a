"""Chooses the demo's C3PO settings on the dev split and records them in suite.json.

Runs the suite's dev split once per point of a grid over RunConfig fields
(NGD start point, NGD pathway mode, NGD learning rate, neighbours k, overlap
filter max_similarity, kernel bandwidth rule sigma, NGD steps), picks the point with the best pooled NGD dev
accuracy (ties: the earlier point; each list is given in order of preference,
e.g. the smaller step first), and writes it with the whole grid into the
manifest's "c3po_settings", which `python -m c3po_jax.main` applies to runs of
that suite unless a flag says otherwise. The test split is never read.

  python -m c3po_jax.demo.tune --suite=checkpoints/demo/suite \\
      --checkpoint_dir=checkpoints/demo
"""

from __future__ import annotations

import itertools
import json
import os

from absl import app, flags, logging

from c3po_jax.demo import suite
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig


def _tag(point: dict) -> str:
  return '_'.join(f'{k}{v:g}' if isinstance(v, float) else f'{k}{v}' for k, v in point.items())


def tune(base: RunConfig, suite_dir: str, grid: dict[str, list]) -> dict:
  """Runs every point of the grid (RunConfig field -> values) on dev.

  Returns the manifest's c3po_settings entry.
  """
  names = list(grid)
  points = []
  for values in itertools.product(*(grid[n] for n in names)):
    point = dict(zip(names, values))
    rc = base.replace(
      **point, output_dir=os.path.join(base.execution.output_dir, _tag(point).replace(':', ''))
    )
    res = suite_run.run_suite(rc, suite_dir, split='dev')
    entry = {
      **point,
      'dev_accuracy': {m: p['accuracy'] for m, p in res['pooled'].items()},
      'mcnemar_p_vs_base': {m: p['mcnemar_p_vs_base'] for m, p in res['pooled'].items()},
    }
    logging.info('dev grid point %s', entry)
    points.append(entry)
  best_i = max(range(len(points)), key=lambda i: (points[i]['dev_accuracy']['ngd'], -i))
  best = points[best_i]
  fixed = {'critical_layers': base.method.critical_layers}
  return {
    'settings': {**fixed, **{n: best[n] for n in names}},
    'chosen_on': 'dev',
    'criterion': 'pooled NGD accuracy on dev (ties: the earlier grid point)',
    'searched': {n: list(grid[n]) for n in names},
    'dev_samples_per_benchmark': base.data.max_test_samples,
    'grid': points,
  }


def write_settings(suite_dir: str, entry: dict) -> None:
  """Records entry as the suite's c3po_settings; an earlier entry is kept under 'previous'."""
  manifest = suite.read_manifest(suite_dir)
  if manifest.get('c3po_settings'):
    entry = {**entry, 'previous': manifest['c3po_settings']}
  manifest['c3po_settings'] = entry
  suite.write_manifest(suite_dir, manifest)


def main(argv):
  del argv
  F = flags.FLAGS
  rc = RunConfig.make(
    checkpoint_dir=F.checkpoint_dir,
    benchmark='(suite)',
    reference=('(suite)',),
    methods=tuple(F.methods),
    output_dir=F.output_dir,
    max_test_samples=F.max_dev_samples,
    max_reference_samples=F.max_reference_samples,
    batch_size=F.batch_size,
    fmt=suite_run.suite_settings(suite_run.read_suite(F.suite)).get('fmt', 'mc'),
    critical_layers=F.critical_layers,
    cache_dir=F.cache_dir,
    num_plots=0,
  )
  grid = {
    'ngd_init': list(F.ngd_inits),
    'opt_pathway_mode': list(F.opt_pathway_modes),
    'lr': [float(x) for x in F.lrs],
    'k': [int(x) for x in F.ks],
    'max_similarity': [float(x) for x in F.max_similarities],
    'sigma': list(F.sigmas),
    'ngd_steps': [int(x) for x in F.ngd_steps],
  }
  entry = tune(rc, F.suite, grid)
  write_settings(F.suite, entry)
  print(json.dumps(entry['settings'], indent=2))


if __name__ == '__main__':
  flags.DEFINE_string('suite', 'checkpoints/demo/suite', 'Suite directory (suite.json).')
  flags.DEFINE_string('checkpoint_dir', 'checkpoints/demo', 'The model the suite is run on.')
  flags.DEFINE_string('output_dir', 'runs/tune', 'Where the dev runs are written.')
  flags.DEFINE_list('methods', ['base', 'ngd'], 'Methods run at each point (ngd is the criterion).')
  flags.DEFINE_list('ngd_inits', ['base'], 'NGD start points to try (base, kernel_mean).')
  flags.DEFINE_list('opt_pathway_modes', ['dense'], 'Pathway modes NGD optimizes in (dense, topk).')
  flags.DEFINE_list('lrs', ['0.003', '0.01', '0.03', '0.1'], 'NGD learning rates to try.')
  flags.DEFINE_list('ks', ['3', '10'], 'Neighbours per test sample to try.')
  flags.DEFINE_list('max_similarities', ['0.99'], 'Overlap filters to try.')
  flags.DEFINE_list('sigmas', ['median'], 'Kernel bandwidth rules to try.')
  flags.DEFINE_list('ngd_steps', ['10'], 'NGD step counts to try.')
  flags.DEFINE_integer('max_dev_samples', 100, 'Dev samples per benchmark.')
  flags.DEFINE_integer(
    'max_reference_samples', None, 'Reference candidates per benchmark (default: all).'
  )
  flags.DEFINE_integer('batch_size', 25, 'Test samples per jitted batch.')
  flags.DEFINE_string('critical_layers', 'last:5', 'Critical layers (fixed).')
  flags.DEFINE_string('cache_dir', '~/.cache/c3po_jax', 'Reference-set cache directory.')
  app.run(main)
