"""Running C3PO from Python, without the command line.

  import c3po_jax
  # Every benchmark of a suite, as `python -m c3po_jax.main --suite=DIR` runs them: the
  # suite's own settings (suite.json) apply wherever none is given here.
  suite = c3po_jax.run_suite('checkpoints/demo/suite', methods=('base', 'ngd'))
  suite.pooled['ngd']['accuracy'], suite.benchmarks['max'].predictions('ngd')

  # One benchmark, every setting given:
  rc = c3po_jax.RunConfig.make(
      checkpoint_dir='checkpoints/olmoe-1b-7b-0924',
      benchmark='arc_challenge',
      reference=('openbookqa', 'sciq'),
      methods=('base', 'ngd'),
      output_dir='runs/arc',
  )
  result = c3po_jax.run(rc)
  result.summary['ngd']['accuracy']
  result.predictions('ngd')  # {sample id: predicted choice index}
  result.pathways('ngd')  # {sample id: the re-mixed pathway record}

`run` is exactly what `python -m c3po_jax.main` does for one benchmark (the
same files are written to rc.execution.output_dir, the same checks apply); it returns
the rows instead of printing only the table.
"""

from __future__ import annotations

import dataclasses
import os

from c3po_jax.run import results
from c3po_jax.run.config import RunConfig


@dataclasses.dataclass(frozen=True)
class RunResult:
  """The outcome of one run.

  summary: per method, as in summary.json's "methods" (accuracy, its 95%
    interval, changes versus base, ...).
  rows: one dict per (method, sample), as in results.jsonl.
  output_dir: where the files are.
  """

  summary: dict
  rows: list[dict]
  output_dir: str

  def _by_id(self, method: str, field: str) -> dict:
    if method not in self.summary:
      raise KeyError(f'no rows of method {method!r}; the run has {sorted(self.summary)}')
    return {r['id']: r.get(field) for r in self.rows if r['method'] == method}

  def predictions(self, method: str) -> dict[str, int]:
    """{sample id: predicted choice index} of one method."""
    return self._by_id(method, 'prediction')

  def pathways(self, method: str) -> dict[str, dict | None]:
    """{sample id: pathway record (layers, core experts, before, after)}; None for base."""
    return self._by_id(method, 'pathway')


def _result(summary: dict, output_dir: str) -> RunResult:
  rows = results.read_rows(os.path.join(output_dir, results.RESULTS_FILE))
  return RunResult(summary=summary, rows=rows, output_dir=output_dir)


def run(config: RunConfig) -> RunResult:
  """Runs C3PO as configured; see the module docstring."""
  from c3po_jax.run import pipeline  # the model stack loads only when a run starts

  return _result(pipeline.run(config), config.execution.output_dir)


@dataclasses.dataclass(frozen=True)
class SuiteResult:
  """The outcome of a suite run.

  benchmarks: per benchmark of the suite, its RunResult (in output_dir/NAME).
  pooled: per method, over every sample of the suite (as summary.json's "pooled").
  config: the RunConfig the suite ran with (the suite's settings applied).
  output_dir: where the files are.
  """

  benchmarks: dict[str, RunResult]
  pooled: dict
  config: RunConfig
  output_dir: str


def run_suite(suite: str, *, split: str = 'test', **settings) -> SuiteResult:
  """Runs every benchmark of a suite, as `python -m c3po_jax.main --suite=SUITE` does.

  suite: a suite directory (holding suite.json; `demo_suite()` is the embedded
    demo's) or a built-in suite's name ('table1').
  split: the suite split to evaluate ('test', or 'dev' for choosing settings).
  settings: RunConfig fields by flat name (as `RunConfig.make`). The suite's own
    settings (its prompt format and the settings chosen on dev; for the embedded
    demo also its model and size) apply to every field not given here, as they
    do to every flag not given on the command line.
  """
  from c3po_jax.run import checks
  from c3po_jax.run import suite as suite_run

  named = {'benchmark': '(suite)', 'reference': ('(suite)',)}  # the suite names them
  rc = suite_run.with_suite_settings(RunConfig.make(**named, **settings), suite, settings)
  checks.check_suite(suite, suite_run.read_suite(suite), split)
  out = suite_run.run_suite(rc, suite, split)
  root = rc.execution.output_dir
  benchmarks = {
    name: _result(summary, os.path.join(root, name)) for name, summary in out['benchmarks'].items()
  }
  return SuiteResult(benchmarks=benchmarks, pooled=out['pooled'], config=rc, output_dir=root)


def demo_suite(world: str = 'remix') -> str:
  """The embedded demo's suite directory (world 'remix', or 'control')."""
  from c3po_jax.run import suite as suite_run

  return suite_run.demo_suite(world)
