"""The paper's ablation study: `python -m c3po_jax.ablate [--suite=DIR | --flagfile=olmoe.flags]`.

Every run flag of `python -m c3po_jax.main` applies (they set the run's own
setting, around which each study varies one thing); with neither --benchmark
nor --suite, the embedded demo suite. Results go to --output_dir: one JSON
file per (benchmark, setting) under settings/ (a rerun resumes), then
ablations.json, tables.txt and the figures.
"""

from __future__ import annotations

import time

from absl import flags, logging

from c3po_jax import main as _main_flags  # noqa: F401  (the run flags, --suite, --demo)
from c3po_jax.ablate import report, studies, study
from c3po_jax.common import cli, errors
from c3po_jax.run import checks, pipeline
from c3po_jax.run import config as run_config
from c3po_jax.run import suite as suite_run

F = flags.FLAGS
flags.DEFINE_list('studies', list(studies.STUDIES), f'Studies to run, from {studies.STUDIES}.')
flags.DEFINE_enum(
  'steps_schedule',
  'own',
  list(studies.SCHEDULES),
  "Steps study: 'own' (each step count its own cosine schedule, the paper's) or 'prefix' "
  '(s steps = the first s of the 50-step schedule: one trajectory read at each count).',
)
flags.DEFINE_integer(
  'settings_per_study', 0, 'Run only the first N settings of each study (0: all).'
)
flags.DEFINE_bool(
  'stored_only', False, 'Run nothing new: report the settings already in --output_dir.'
)
DEFAULT_OUTPUT = 'runs/ablate'


def main(argv):
  del argv
  started = time.time()
  suite = F.suite or (suite_run.demo_suite(F.demo) if not F.benchmark else None)
  with errors.usage_errors():
    named = {'benchmark': '(suite)', 'reference': ('(suite)',)} if suite else {}
    given = run_config.given_flags(F)
    if 'output_dir' not in given:
      named['output_dir'] = DEFAULT_OUTPUT
    rc = run_config.from_flags(F, **named).replace(methods=('base', 'ngd'))
    if suite:
      rc = suite_run.with_suite_settings(rc, suite, given)
      checks.check_suite(suite, suite_run.read_suite(suite), F.suite_split)
    # The study varies NGD's settings: NGD's own (--per_method) are its starting point.
    rc = rc.for_method('ngd').replace(per_method='')
    unknown = set(F.studies) - set(studies.STUDIES)
    if unknown:
      raise ValueError(f'unknown studies {sorted(unknown)}; choose from {studies.STUDIES}')
  logging.info('run config: %s', rc)
  runner = pipeline.open_runner(rc)
  grids = {
    name: studies.grid(name, runner.config, schedule=F.steps_schedule, limit=F.settings_per_study)
    for name in F.studies
  }
  benches, config = study.run(
    rc, grids, suite_dir=suite, split=F.suite_split, runner=runner, stored_only=F.stored_only
  )
  grids = report.complete(grids, benches)  # with --stored_only: the settings run so far
  result = report.build(benches, config, rc, grids, F.steps_schedule)
  result['wall_seconds'] = round(time.time() - started, 1)
  result['run_config'] = rc.flat()
  print('\n' + report.tables(result))
  report.write(result, rc.execution.output_dir)
  print(f'Results in {rc.execution.output_dir} ({cli.duration(time.time() - started)}).')


if __name__ == '__main__':
  cli.run(main)
