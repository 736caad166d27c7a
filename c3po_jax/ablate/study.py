"""The study driver: every selected grid on one loaded model, study by study.

One runner (model, engine, prefix-state store) for the whole study; per
benchmark one base pass and one reference set (per token position), the
neighbourhoods found once per k / epsilon; each setting's NGD results are
written as soon as it finishes (`store`), so a rerun resumes where it
stopped, and a setting two studies share runs once.
"""

from __future__ import annotations

import dataclasses
import os
import time

from c3po_jax.ablate import context, store, studies
from c3po_jax.common import cli
from c3po_jax.neighbours import references
from c3po_jax.run import pipeline
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig
from c3po_jax.tasks import load_examples, load_references, suites


@dataclasses.dataclass
class Benchmark:
  """One benchmark of the study: its settings' records and what FLOPs need of it."""

  name: str
  base: list[bool]  # base correct per test sample (last-token base pass)
  records: dict  # (study, label) -> records
  test_tokens: float  # mean test prompt length
  ref_tokens: float  # mean reference prompt length


def benchmarks(rc: RunConfig, suite_dir: str | None, split: str) -> list[tuple[str, RunConfig]]:
  """(name, its RunConfig) per benchmark: a suite's, or rc's own benchmark."""
  if suite_dir is None:
    return [(os.path.basename(rc.data.benchmark).split('.')[0], rc)]
  out = []
  for name, entry in suite_run.read_suite(suite_dir)['benchmarks'].items():
    test, test_split, refs = suites.resolve_entry(suites.base_dir(suite_dir), entry, split)
    out.append((name, rc.replace(benchmark=test, split=test_split, reference=refs)))
  return out


def run(
  rc: RunConfig,
  grids: dict[str, list[studies.Setting]],
  *,
  suite_dir: str | None = None,
  split: str = 'test',
  runner=None,
  stored_only: bool = False,
) -> tuple[list[Benchmark], object]:
  """Runs every setting of `grids` on every benchmark; returns them and the model config.

  stored_only: run nothing new; report the settings already in the store.
  """
  plan = benchmarks(rc, suite_dir, split)
  runner = runner or pipeline.open_runner(rc)
  models = context.Models(runner)
  results = store.SettingStore(rc.execution.output_dir)
  fingerprint = references.params_fingerprint(runner.params)
  benches, inputs = [], {}
  for name, sub in plan:  # one base pass and reference set per benchmark
    d = sub.data
    test = load_examples(d.benchmark, split=d.split, source=d.source, limit=d.max_test_samples)
    pool, _ = load_references(d.reference, d.reference_split, d.max_reference_samples)
    runner.begin(test, max(len(e.choices) for e in test + pool))
    main = context.Shared.build(name, runner, test, pool)
    inputs[name] = (sub, test, pool, {context.position(rc): main})
    lens = _mean_len(main.prompts), _mean_len(main.ref_prompts)
    benches.append(Benchmark(name, main.base_correct.tolist(), {}, *lens))

  def shared_at(name, s_rc) -> context.Shared:
    _, test, pool, shared = inputs[name]
    pos = context.position(s_rc)
    if pos not in shared:  # another token position: its own base pass and reference set
      shared[pos] = context.Shared.build(name, models.variant(s_rc), test, pool)
    return shared[pos]

  for study, grid in grids.items():  # study by study: each finishes on every benchmark
    for i, setting in enumerate(grid):
      for bench in benches:
        sub, test, pool, _ = inputs[bench.name]
        runner.begin(test, max(len(e.choices) for e in test + pool))
        s_rc = sub.replace(**setting.fields)
        sh = shared_at(bench.name, s_rc)
        parts = {
          'benchmark': bench.name,
          'test': references.examples_fingerprint(test),
          'references': sh.refs.key,
          'model': fingerprint,
          'settings': store.effective(s_rc, runner.config),
        }
        key = store.key(parts)
        got = results.get(key)
        status = 'stored'
        if got is None and stored_only:
          print(f'[{study} {i + 1}/{len(grid)}] {setting.label} on {bench.name}: not run')
          continue
        if got is None:
          t0 = time.time()
          recs = context.run_setting(sh, models, s_rc)
          got = {'parts': parts, 'records': recs, 'seconds': round(time.time() - t0, 1)}
          results.put(key, got)
          status = cli.duration(got['seconds'])
        bench.records[study, setting.label] = got['records']
        acc = 100 * sum(r['correct'] for r in got['records']) / len(got['records'])
        print(
          f'[{study} {i + 1}/{len(grid)}] {setting.label} on {bench.name}: NGD {acc:.1f}%'
          f' ({status})',
          flush=True,
        )
  return benches, runner.config


def _mean_len(prompts) -> float:
  return sum(len(p.context) for p in prompts) / max(len(prompts), 1)
