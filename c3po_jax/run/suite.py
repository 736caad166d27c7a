"""Runs C3PO over a suite of benchmarks, each with its own reference sources.

A suite is a built-in name (`table1`, see `c3po_jax.tasks.suites`) or a
directory holding `suite.json`:
  {"benchmarks": {NAME: {"test": SOURCE, "dev": SOURCE, "reference": [SOURCE, ...]}}}
with each SOURCE a registry name ('arc_challenge', 'openbookqa:validation')
or a generic multiple-choice JSONL file relative to the directory. Each
benchmark runs as its own C3PO run in OUTPUT_DIR/NAME (resumable as usual;
with --resume a benchmark whose summary.json already covers the settings and
methods is not run again), all on one model and engine (loaded and compiled
once); the combined table (methods x benchmarks + average, like the paper's
Table 1; next to the paper's numbers where the suite carries them) and
OUTPUT_DIR/summary.json cover them all, with a McNemar test over every
paired sample of the suite and the reference splits each benchmark used.
"""

from __future__ import annotations

import json
import os
import time

import jax

from c3po_jax.common import errors, files
from c3po_jax.remix import diagnostics
from c3po_jax.run import output as run_output
from c3po_jax.run import paper_table, per_method, pipeline, plots, preflight, results
from c3po_jax.run.config import GROUP_OF, RunConfig
from c3po_jax.tasks import suites

# The embedded demo ships next to the package (`checkpoints/` of the repository), so the bare
# command and the API find it from any working directory.
CHECKPOINTS = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'checkpoints'
)
DEMO_WORLDS = {'remix': 'demo', 'control': 'demo_control'}
# How the suite table names the neighbour embedder (--embedder).
EMBEDDERS = {
  'moe': "MoEE, the model's own hidden state and routing logits (--embedder=moe)",
  'minilm': "all-MiniLM-L6-v2 on the question text, the paper's (--embedder=minilm)",
}
# The embedded demo's default size: finishes in minutes on 2 CPU cores.
DEMO_SIZE = {
  'max_test_samples': 100,
  'max_reference_samples': None,  # every reference of the suite (600 / 400 per family)
  'batch_size': 25,
}


def demo_suite(world: str = 'remix') -> str:
  """The embedded demo suite of a world: relative to the working directory when under it."""
  path = os.path.join(CHECKPOINTS, DEMO_WORLDS[world], 'suite')
  relative = os.path.relpath(path)
  return path if relative.startswith(os.pardir) else relative


def _is_demo(suite_dir: str) -> bool:
  return os.path.isdir(suite_dir) and any(
    os.path.samefile(suite_dir, os.path.join(CHECKPOINTS, d, 'suite'))
    for d in DEMO_WORLDS.values()
    if os.path.isdir(os.path.join(CHECKPOINTS, d, 'suite'))
  )


def with_suite_settings(rc: RunConfig, suite_dir: str, given) -> RunConfig:
  """rc with the suite's own settings (prompt format, settings chosen on dev; for the
  embedded demo also its model and size) for every field not in `given`."""
  settings = suite_settings(read_suite(suite_dir))
  if _is_demo(suite_dir):
    own = {'checkpoint_dir': os.path.dirname(os.path.normpath(suite_dir)), **DEMO_SIZE}
    settings = {**own, **settings}
  return rc.replace(**{k: v for k, v in settings.items() if k not in set(given)})


def read_suite(suite_dir: str) -> dict:
  """The manifest of a built-in suite name or of a suite directory."""
  manifest = suites.builtin(suite_dir)
  if manifest is not None:
    return manifest
  path = os.path.join(suite_dir, 'suite.json')
  if not os.path.exists(path):
    hint = f' (the embedded demo is {demo_suite()})' if 'demo' in suite_dir else ''
    raise FileNotFoundError(f'no suite manifest at {path}{hint}')
  with open(path) as f:
    manifest = json.load(f)
  if not isinstance(manifest.get('benchmarks'), dict) or not manifest['benchmarks']:
    raise ValueError(f'{path}: no "benchmarks" mapping')
  return manifest


def suite_settings(manifest: dict) -> dict:
  """RunConfig fields a suite asks for: its prompt format and settings chosen on dev.

  A manifest may hold {"prompt": {"format": "rc"}} and {"c3po_settings":
  {"settings": {FIELD: VALUE, ...}, "per_method": {METHOD: {"settings": {...}}}}}
  (RunConfig field names; chosen on the dev split, see c3po_jax/demo/tune.py;
  a method's own settings become --per_method). Flags given on the command
  line win over these.
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
  # Each method's own settings, chosen on dev by its own grid (`tune`): --per_method.
  own = manifest.get('c3po_settings', {}).get('per_method', {})
  if own and 'per_method' not in settings:
    out['per_method'] = per_method.format_spec({m: e['settings'] for m, e in own.items()})
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
  runner = None  # opened at the first benchmark (after every input is checked), then shared
  subs, inputs = {}, {}
  with errors.usage_errors():  # every benchmark's data, config and output: before any model
    for name, entry in manifest['benchmarks'].items():
      try:
        test, test_split, refs = suites.resolve_entry(suites.base_dir(suite_dir), entry, split)
      except ValueError as e:
        raise ValueError(f'suite benchmark {name!r} has {e}') from None
      subs[name] = rc.replace(
        benchmark=test,
        split=test_split,
        reference=refs,
        output_dir=os.path.join(rc.execution.output_dir, name),
      )
      inputs[name] = preflight.inputs(subs[name])
  for name, sub in subs.items():
    print(f'\n== {name} ({split}) ==')
    finished = _finished(sub)
    if finished is not None:
      print(f'(finished earlier: {sub.execution.output_dir}/{results.SUMMARY_FILE})')
      per_benchmark[name] = finished['methods']
    else:
      # One runner for the suite: its prefix-state keys carry the choice count,
      # so benchmarks sharing a reference source never mix padded widths.
      runner = runner or pipeline.open_runner(sub)
      # Its figures are titled with the suite's name of the benchmark.
      per_benchmark[name] = pipeline.run(sub, runner, inputs.pop(name), name)
    if jax.process_index() != 0:
      continue  # only process 0 holds the merged results (multi-process runs)
    rows = results.read_rows(os.path.join(sub.execution.output_dir, results.RESULTS_FILE))
    all_rows += [{**r, 'id': f'{name}/{r["id"]}'} for r in rows]
  if jax.process_index() != 0:
    return {'benchmarks': per_benchmark, 'pooled': {}}
  pooled = results.summarize(all_rows)
  diag = diagnostics.summarize(all_rows)
  names = list(manifest['benchmarks'])
  provenance = _suite_provenance(rc.execution.output_dir, names, started)
  ref_splits = _reference_splits(rc.execution.output_dir, names)
  chance = {n: results.chance([r for r in all_rows if r['id'].startswith(f'{n}/')]) for n in names}
  chance['pooled'] = results.chance(all_rows)
  table = format_suite_table(
    per_benchmark,
    pooled,
    chance,
    EMBEDDERS.get(rc.neighbourhood.embedder, rc.neighbourhood.embedder),
  )
  print('\n' + table)
  vs_paper = None
  if 'paper' in manifest:
    vs_paper = paper_table.compare(per_benchmark, manifest['paper'])
    print('\n' + paper_table.format_table(vs_paper, manifest['paper']))
  pooled_scope = plots.scope(pooled, f'{len(names)} benchmarks pooled')
  plots.accuracy(pooled, rc.execution.output_dir, pooled_scope)
  if diag:
    print(diagnostics.format_table(diag))
    plots.ngd_steps(diag, rc.execution.output_dir, pooled, pooled_scope)
  path = os.path.join(rc.execution.output_dir, results.SUMMARY_FILE)
  files.write_json(
    path,
    {
      'suite': suite_dir,
      'split': split,
      'benchmarks': per_benchmark,
      'pooled': pooled,
      'chance_accuracy': chance,
      'reference_splits': ref_splits,
      'vs_paper': vs_paper,
      'diagnostics': diag,
      'provenance': provenance,
      'run_config': rc.flat(),
    },
  )
  return {'benchmarks': per_benchmark, 'pooled': pooled}


def _finished(sub: RunConfig) -> dict | None:
  """The stored summary of a benchmark that --resume need not run again, else None."""
  path = os.path.join(sub.execution.output_dir, results.SUMMARY_FILE)
  if not sub.execution.resume or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
    same = not run_output.config_mismatch(stored['run_config'], sub)
    covered = set(sub.methods) <= set(stored['methods'])
  except (OSError, ValueError, KeyError, TypeError):
    return None  # unreadable: run it (pipeline.run checks and resumes its rows)
  return stored if same and covered else None


def _reference_splits(output_dir: str, names: list[str]) -> dict:
  """Per benchmark, {reference source: split} as its summary.json recorded."""
  out = {}
  for name in names:
    path = os.path.join(output_dir, name, results.SUMMARY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        out[name] = json.load(f).get('reference_splits')
  return out


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
  now = time.time()  # the suite's start and end, not its first benchmark's
  first['date'] = first['finished'] = run_output.timestamp(now)
  first['started'] = run_output.timestamp(started)
  first['wall_seconds'] = round(now - started, 1)
  return first


def format_suite_table(
  per_benchmark: dict, pooled: dict, chance: dict | None = None, embedder: str | None = None
) -> str:
  """Accuracy per benchmark, their mean, and pooled over every question (95% Wilson
  interval, fixed/broken vs base, exact McNemar p); chance: {benchmark or 'pooled':
  fraction} as a last row; embedder: the neighbour embedder, named under the table."""
  names = list(per_benchmark)
  width = max(8, *(len(n) for n in names))
  head = f'{"method":<18}' + ''.join(f' {n:>{width}}' for n in names)
  head += f' {"avg":>7} {"pooled":>7} {"95% CI":>11} {"+/-":>9} {"p":>9}'
  lines = [head, '-' * len(head)]
  for method, p in pooled.items():
    accs = [per_benchmark[n].get(method, {}).get('accuracy') for n in names]
    cells = ''.join(f' {"-" if a is None else f"{100 * a:.1f}":>{width}}' for a in accs)
    known = [a for a in accs if a is not None]
    avg = 100 * sum(known) / len(known) if known else float('nan')
    lo, hi = (100 * x for x in p.get('accuracy_ci95', (float('nan'),) * 2))
    moved = f'+{p.get("improved_vs_base", 0)}/-{p.get("worsened_vs_base", 0)}'
    lines.append(
      f'{method:<18}{cells} {avg:>7.1f} {100 * p["accuracy"]:>7.1f} {f"{lo:.1f}-{hi:.1f}":>11}'
      f' {moved:>9} {p["mcnemar_p_vs_base"]:>9.3g}'
    )
  if chance:
    cells = ''.join(f' {100 * (chance.get(n) or 0):>{width}.1f}' for n in names)
    lines.append(f'{"chance":<18}{cells} {100 * (chance.get("pooled") or 0):>7.1f}')
  lines.append(
    '(accuracy %; avg: mean over benchmarks; pooled: every question, with its 95% Wilson'
    ' interval; +/-: answers fixed/broken vs base; p: exact McNemar vs base, pooled)'
  )
  if embedder:
    lines.append(f'(neighbours: {embedder})')
  return '\n'.join(lines)
