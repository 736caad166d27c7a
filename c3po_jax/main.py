"""C3PO test-time expert re-mixing: `python -m c3po_jax.main [--flagfile=olmoe.flags]`.

This file is intentionally kept short: flags are parsed here once, turned into
a frozen RunConfig, and handed to the pipeline. Library code never reads FLAGS.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

from c3po_jax.common import cli, errors
from c3po_jax.run import checks, pipeline
from c3po_jax.run import config as run_config
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import METHODS
from c3po_jax.tasks import registry

F = flags.FLAGS
run_config.define_flags(F)  # one flag per RunConfig setting, defaults from its fields
flags.adopt_module_key_flags(run_config)  # --help lists them
flags.DEFINE_string(
  'suite',
  None,
  "A suite directory (suite.json) or a built-in suite (table1: the paper's Table 1): run every "
  'benchmark in it with its references.',
)
flags.DEFINE_string('suite_split', 'test', 'Suite split to evaluate (dev: for choosing settings).')
flags.DEFINE_enum(
  'demo',
  'remix',
  ['remix', 'control'],
  'Embedded demo world run when neither --benchmark nor --suite is given: remix (the router '
  'carries the skill) or control (the earlier world, where it does not: a negative control).',
)


def main(argv):
  """Errors end in one `error:` line (exit code 2: usage); see c3po_jax/common/cli.py."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  started = time.time()
  suite = F.suite or (suite_run.demo_suite(F.demo) if not F.benchmark else None)
  with errors.usage_errors():  # flag values: refused before anything loads
    # A suite names each benchmark and its references itself.
    named = {'benchmark': '(suite)', 'reference': ('(suite)',)} if suite else {}
    rc = run_config.from_flags(F, **named)
    if suite:
      rc = suite_run.with_suite_settings(rc, suite, run_config.given_flags(F))
      checks.check_suite(suite, suite_run.read_suite(suite), F.suite_split)
  logging.info('run config: %s', rc)
  if suite:
    suite_run.run_suite(rc, suite, F.suite_split)
  else:
    pipeline.run(rc)
  print(f'Results in {rc.execution.output_dir} ({cli.duration(time.time() - started)}).')


def main_help() -> str:
  """The text `python -m c3po_jax.main --help` prints above the flags."""

  names = [n for n in registry.BENCHMARKS if n != 'mmlu'] + ['mmlu', 'mmlu_<subject>']
  return f"""C3PO test-time expert re-mixing for a Mixture-of-Experts LLM (OLMoE).

  python -m c3po_jax.main                     the embedded demo (model and task suite)
  python -m c3po_jax.main --checkpoint_dir=DIR --benchmark=B --reference=R1,R2 [flags]
  python -m c3po_jax.main --suite=DIR         every benchmark of a suite directory
  python -m c3po_jax.main --flagfile=olmoe.flags

Methods (--methods, default all): {', '.join(METHODS)}.
Benchmarks (--benchmark, --reference): {', '.join(names)};
  or a generic multiple-choice JSONL file (.jsonl, .jsonl.gz).
Results go to --output_dir (results.jsonl, summary.json, plots); an interrupted
run continues with --resume, --overwrite replaces it. Errors print one line
(exit code 2 for usage errors); --verbosity=1 adds tracebacks and library logs.
"""


if __name__ == '__main__':
  __doc__ = main_help()  # what --help prints above the flags
  cli.run(main)
