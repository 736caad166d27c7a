"""Chooses the demo's settings on the dev split, every method alike, and records them.

Per method (`--grid=per_method`, the default): every method with
hyper-parameters gets its own dev grid of the same size (`GRIDS`, 4 points
each: NGD learning rate x optimization mode, kernel regression kernel x k,
mode finding alpha x neighbours, ICL shots (its k: 1-4), prefix tuning and soft
prompt learning rate x prompt length), runs with base alone at each point,
and keeps the point with its best pooled dev accuracy (ties: the earlier
point; each list is in order of preference). The choices go into the
manifest's c3po_settings["per_method"], which `python -m c3po_jax.main` turns
into --per_method for runs of that suite: each method runs with its own.

Shared (`--grid=shared`): one grid over RunConfig fields shared by every
method (NGD start, mode, learning rate, k, overlap filter, bandwidth rule,
steps), chosen on pooled NGD dev accuracy, written to c3po_settings
["settings"] (how the demo's shared settings were chosen).

The test split is never read. Each point's runs are kept under --output_dir
(--resume reuses a point already run).

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


# The per-method dev grids: the same size (4 points) for every method with settings.
GRIDS = {
  'ngd': {'lr': [0.1, 0.3], 'opt_pathway_mode': ['topk', 'dense']},
  'kernel_regression': {'kernel': ['gaussian', 'matern'], 'k': [3, 10]},
  'mode_finding': {'mode_alpha': [0.5, 0.8], 'mode_neighbours': [3, 10]},
  'icl': {'k': [1, 2, 3, 4]},  # shots (its k neighbours shown): the 1-4 the model was trained on
  'prefix_tuning': {'baseline_lr': [0.1, 0.3], 'baseline_prefix_len': [5, 10]},
  'soft_prompt': {'baseline_lr': [0.1, 0.3], 'baseline_prefix_len': [5, 10]},
}


def tune_method(base: RunConfig, suite_dir: str, method: str, grid: dict[str, list]) -> dict:
  """One method's grid on dev (with base alone); its c3po_settings['per_method'] entry."""
  names = list(grid)
  points = []
  for values in itertools.product(*(grid[n] for n in names)):
    point = dict(zip(names, values))
    out = os.path.join(base.execution.output_dir, method, _tag(point).replace(':', ''))
    rc = base.replace(methods=('base', method), per_method='', output_dir=out, **point)
    pooled = suite_run.run_suite(rc, suite_dir, split='dev')['pooled']
    entry = {
      **point,
      'dev_accuracy': pooled[method]['accuracy'],
      'base_dev_accuracy': pooled['base']['accuracy'],
      'mcnemar_p_vs_base': pooled[method]['mcnemar_p_vs_base'],
    }
    logging.info('%s dev grid point %s', method, entry)
    points.append(entry)
  best = points[max(range(len(points)), key=lambda i: (points[i]['dev_accuracy'], -i))]
  return {
    'settings': {n: best[n] for n in names},
    'dev_accuracy': best['dev_accuracy'],
    'chosen_on': 'dev',
    'criterion': f'pooled {method} accuracy on dev (ties: the earlier grid point)',
    'searched': {n: list(grid[n]) for n in names},
    'dev_samples_per_benchmark': base.data.max_test_samples,
    'grid': points,
  }


def tune_methods(base: RunConfig, suite_dir: str, grids: dict[str, dict]) -> dict:
  """Every method's own grid on dev: {method: its per_method entry}."""
  return {m: tune_method(base, suite_dir, m, g) for m, g in grids.items()}


def write_per_method(suite_dir: str, entries: dict) -> None:
  """Records each method's choice under c3po_settings['per_method'] (others kept)."""
  manifest = suite.read_manifest(suite_dir)
  settings = manifest.setdefault('c3po_settings', {})
  settings['per_method'] = {**settings.get('per_method', {}), **entries}
  suite.write_manifest(suite_dir, manifest)


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
  if F.grid == 'per_method':
    # The suite's shared settings (chosen earlier) hold for every point.
    shared = suite_run.suite_settings(suite_run.read_suite(F.suite))
    shared.pop('per_method', None)
    rc = rc.replace(**{k: v for k, v in shared.items() if k != 'fmt'}, resume=F.resume)
    unknown = set(F.tune_methods) - set(GRIDS)
    if unknown:
      raise app.UsageError(f'--tune_methods: no grid for {sorted(unknown)}; have {sorted(GRIDS)}')
    entries = tune_methods(rc, F.suite, {m: GRIDS[m] for m in F.tune_methods})
    write_per_method(F.suite, entries)
    print(json.dumps({m: e['settings'] for m, e in entries.items()}, indent=2))
    return
  entry = tune(rc, F.suite, grid)
  write_settings(F.suite, entry)
  print(json.dumps(entry['settings'], indent=2))


if __name__ == '__main__':
  flags.DEFINE_string('suite', 'checkpoints/demo/suite', 'Suite directory (suite.json).')
  flags.DEFINE_string('checkpoint_dir', 'checkpoints/demo', 'The model the suite is run on.')
  flags.DEFINE_string('output_dir', 'runs/tune', 'Where the dev runs are written.')
  flags.DEFINE_enum(
    'grid', 'per_method', ['per_method', 'shared'], 'Each method its own grid, or one shared.'
  )
  flags.DEFINE_list('tune_methods', list(GRIDS), 'Methods tuned (--grid=per_method).')
  flags.DEFINE_bool('resume', False, 'Reuse grid points already run in --output_dir.')
  flags.DEFINE_list('methods', ['base', 'ngd'], 'Methods run at each point (--grid=shared).')
  # --grid=shared:
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
