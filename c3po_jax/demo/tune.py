"""Chooses the demo's C3PO settings on the dev split and records them in suite.json.

Runs the suite's dev split once per grid point (NGD learning rate x
max_similarity), picks the point with the best pooled NGD dev accuracy (ties:
the smaller step, then the stricter filter), and writes it with the whole grid
into the manifest's "c3po_settings", which `python -m c3po_jax.main` applies
to runs of that suite unless a flag says otherwise. The test split is never
read.

  python -m c3po_jax.demo.tune --suite=checkpoints/demo/suite \\
      --checkpoint_dir=checkpoints/demo
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags, logging

from c3po_jax import suite_run
from c3po_jax.demo import suite
from c3po_jax.run_config import RunConfig

TUNED = ('lr', 'max_similarity')


def tune(base: RunConfig, suite_dir: str, lrs: list[float], max_similarities: list[float]) -> dict:
  """Runs the grid on dev; returns the manifest's c3po_settings entry."""
  grid = []
  for max_sim in max_similarities:
    for lr in lrs:
      rc = dataclasses.replace(
        base,
        lr=lr,
        max_similarity=max_sim,
        output_dir=os.path.join(base.output_dir, f'lr{lr:g}_sim{max_sim:g}'),
      )
      res = suite_run.run_suite(rc, suite_dir, split='dev')
      point = {
        'lr': lr,
        'max_similarity': max_sim,
        'dev_accuracy': {m: p['accuracy'] for m, p in res['pooled'].items()},
        'mcnemar_p_vs_base': {m: p['mcnemar_p_vs_base'] for m, p in res['pooled'].items()},
      }
      logging.info('dev grid point %s', point)
      grid.append(point)
  best = max(grid, key=lambda g: (g['dev_accuracy']['ngd'], -g['lr'], -g['max_similarity']))
  fixed = {'k': base.k, 'critical_layers': base.critical_layers, 'ngd_steps': base.ngd_steps}
  return {
    'settings': {**fixed, **{name: best[name] for name in TUNED}},
    'chosen_on': 'dev',
    'criterion': 'pooled NGD accuracy on dev (ties: smaller lr, stricter max_similarity)',
    'dev_samples_per_benchmark': base.max_test_samples,
    'grid': grid,
  }


def write_settings(suite_dir: str, entry: dict) -> None:
  manifest = suite.read_manifest(suite_dir)
  manifest['c3po_settings'] = entry
  suite.write_manifest(suite_dir, manifest)


def main(argv):
  del argv
  F = flags.FLAGS
  rc = RunConfig(
    checkpoint_dir=F.checkpoint_dir,
    benchmark='(suite)',
    reference=('(suite)',),
    methods=('base', 'ngd'),
    output_dir=F.output_dir,
    max_test_samples=F.max_dev_samples,
    max_reference_samples=F.max_reference_samples,
    batch_size=F.batch_size,
    fmt=suite_run.suite_settings(suite_run.read_suite(F.suite)).get('fmt', 'mc'),
    k=F.k,
    critical_layers=F.critical_layers,
    cache_dir=F.cache_dir,
    num_plots=0,
  )
  entry = tune(rc, F.suite, [float(x) for x in F.lrs], [float(x) for x in F.max_similarities])
  write_settings(F.suite, entry)
  print(json.dumps(entry['settings'], indent=2))


if __name__ == '__main__':
  flags.DEFINE_string('suite', 'checkpoints/demo/suite', 'Suite directory (suite.json).')
  flags.DEFINE_string('checkpoint_dir', 'checkpoints/demo', 'The model the suite is run on.')
  flags.DEFINE_string('output_dir', 'runs/tune', 'Where the dev runs are written.')
  flags.DEFINE_list('lrs', ['0.01', '0.03', '0.1', '0.3'], 'NGD learning rates to try.')
  flags.DEFINE_list('max_similarities', ['0.99'], 'Overlap filters to try.')
  flags.DEFINE_integer('max_dev_samples', 100, 'Dev samples per benchmark.')
  flags.DEFINE_integer('max_reference_samples', 400, 'Reference candidates per benchmark.')
  flags.DEFINE_integer('batch_size', 25, 'Test samples per jitted batch.')
  flags.DEFINE_integer('k', 3, 'Neighbours per test sample.')
  flags.DEFINE_integer('critical_layers', 5, 'Last N layers re-mixed.')
  flags.DEFINE_string('cache_dir', '~/.cache/c3po_jax', 'Reference-set cache directory.')
  app.run(main)
