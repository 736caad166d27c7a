"""Running C3PO from Python, without the command line.

  import c3po_jax
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


def run(config: RunConfig) -> RunResult:
  """Runs C3PO as configured; see the module docstring."""
  from c3po_jax.run import pipeline  # the model stack loads only when a run starts

  summary = pipeline.run(config)
  rows = results.read_rows(os.path.join(config.execution.output_dir, results.RESULTS_FILE))
  return RunResult(summary=summary, rows=rows, output_dir=config.execution.output_dir)
