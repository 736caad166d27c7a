"""Runs C3PO over a suite of benchmarks, each with its own reference sources.

A suite directory holds `suite.json` mapping benchmark names to files:
  {"benchmarks": {NAME: {"test": FILE, "dev": FILE, "reference": [FILE, ...]}}}
(paths relative to the directory; generic multiple-choice JSONL). Each
benchmark runs as its own C3PO run in OUTPUT_DIR/NAME (resumable as usual),
all on one model and engine (loaded and compiled once);
the combined table (methods x benchmarks + average, like the paper's Table 1)
and OUTPUT_DIR/summary.json cover them all, with a McNemar test over every
paired sample of the suite.
"""

from __future__ import annotations

import json
import os
import time

import jax

from c3po_jax.common import files
from c3po_jax.remix import diagnostics
from c3po_jax.run import pipeline, plots, results
from c3po_jax.run.config import GROUP_OF, RunConfig


def read_suite(suite_dir: str) -> dict:
  path = os.path.join(suite_dir, 'suite.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no suite manifest at {path}')
  with open(path) as f:
    manifest = json.load(f)
  if not isinstance(manifest.get('benchmarks'), dict) or not manifest['benchmarks']:
    raise ValueError(f'{path}: no "benchmarks" mapping')
  return manifest


def suite_settings(manifest: dict) -> dict:
  """RunConfig fields a suite asks for: its prompt format and settings chosen on dev.

  A manifest may hold {"prompt": {"format": "rc"}} and {"c3po_settings":
  {FIELD: VALUE, ...}} (RunConfig field names; chosen on the dev split, see
  c3po_jax/demo/tune.py). Flags given on the command line win over these.
  """
  out = {}
  fmt = manifest.get('prompt', {}).get('format')
  if fmt is not None:
    out['fmt'] = fmt
  settings = manifest.get('c3po_settings', {}).get('settings', {})
  unknown = set(settings) - set(GROUP_OF)
  if unknown:
    raise ValueError(f'suite c3po_settings has unknown RunConfig fields {sorted(unknown)}')
  out.update(settings)
  if isinstance(out.get('critical_layers'), int):  # older manifests: an int was "the last N"
    out['critical_layers'] = f'last:{out["critical_layers"]}'
  elif isinstance(out.get('critical_layers'), list):
    out['critical_layers'] = ','.join(str(i) for i in out['critical_layers'])
  return out


def run_suite(rc: RunConfig, suite_dir: str, split: str = 'test') -> dict:
  """One pipeline run per benchmark of the suite; returns the combined summary."""
  started = time.time()
  manifest = read_suite(suite_dir)
  per_benchmark, all_rows = {}, []
  runner = None  # opened at the first benchmark (after its inputs are checked), then shared
  for name, entry in manifest['benchmarks'].items():
    if split not in entry:
      raise ValueError(f'suite benchmark {name!r} has no {split!r} split')
    sub = rc.replace(
      benchmark=os.path.join(suite_dir, entry[split]),
      reference=tuple(os.path.join(suite_dir, r) for r in entry['reference']),
      output_dir=os.path.join(rc.execution.output_dir, name),
    )
    print(f'\n== {name} ({split}) ==')
    runner = runner or pipeline.open_runner(sub)
    per_benchmark[name] = pipeline.run(sub, runner)
    if jax.process_index() != 0:
      continue  # only process 0 holds the merged results (multi-process runs)
    rows = results.read_rows(os.path.join(sub.execution.output_dir, results.RESULTS_FILE))
    all_rows += [{**r, 'id': f'{name}/{r["id"]}'} for r in rows]
  if jax.process_index() != 0:
    return {'benchmarks': per_benchmark, 'pooled': {}}
  pooled = results.summarize(all_rows)
  diag = diagnostics.summarize(all_rows)
  provenance = _suite_provenance(rc.execution.output_dir, list(manifest['benchmarks']), started)
  table = format_suite_table(per_benchmark, pooled)
  print('\n' + table)
  if diag:
    print(diagnostics.format_table(diag))
    plots.ngd_steps(diag, rc.execution.output_dir)
  path = os.path.join(rc.execution.output_dir, results.SUMMARY_FILE)
  files.write_json(
    path,
    {
      'suite': suite_dir,
      'split': split,
      'benchmarks': per_benchmark,
      'pooled': pooled,
      'diagnostics': diag,
      'provenance': provenance,
      'run_config': rc.flat(),
    },
  )
  return {'benchmarks': per_benchmark, 'pooled': pooled}


def _suite_provenance(output_dir: str, names: list[str], started: float) -> dict:
  """The benchmarks' provenance blocks merged: shared fields once, data per benchmark."""
  blocks = {}
  for name in names:
    path = os.path.join(output_dir, name, results.SUMMARY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        blocks[name] = json.load(f).get('provenance') or {}
  if not blocks:
    return {}
  first = dict(next(iter(blocks.values())))
  first['data'] = {name: b.get('data') for name, b in blocks.items()}
  first['wall_seconds'] = round(time.time() - started, 1)
  return first


def format_suite_table(per_benchmark: dict, pooled: dict) -> str:
  names = list(per_benchmark)
  width = max(8, *(len(n) for n in names))
  head = f'{"method":<18}' + ''.join(f' {n:>{width}}' for n in names) + f' {"avg":>7} {"p":>7}'
  lines = [head, '-' * len(head)]
  for method, p in pooled.items():
    accs = [per_benchmark[n].get(method, {}).get('accuracy') for n in names]
    cells = ''.join(f' {"-" if a is None else f"{100 * a:.1f}":>{width}}' for a in accs)
    known = [a for a in accs if a is not None]
    avg = 100 * sum(known) / len(known) if known else float('nan')
    lines.append(f'{method:<18}{cells} {avg:>7.1f} {p["mcnemar_p_vs_base"]:>7.3f}')
  lines.append('(accuracy %; avg: mean over benchmarks; p: exact McNemar vs base, pooled)')
  return '\n'.join(lines)
