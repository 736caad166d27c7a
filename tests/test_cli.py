"""End to end: the CLI on a tiny random model with real ARC / OpenBookQA rows."""

import json
import os
import subprocess
import sys

import pytest

from c3po_jax.run import pipeline, results, runner
from c3po_jax.run.config import METHODS, RunConfig

TIMING = ('seconds', 'compile_seconds')  # differ from run to run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def ckpt(tiny_checkpoint):
  return tiny_checkpoint  # conftest.py: one per session, read-only


def _common(ckpt, tmp_path):
  return dict(
    checkpoint_dir=ckpt,
    benchmark='arc_challenge',
    reference=('openbookqa', 'sciq'),
    max_test_samples=4,
    max_reference_samples=16,
    batch_size=2,
    critical_layers='last:2',
    core_experts=4,
    ngd_steps=2,
    cache_dir=str(tmp_path / 'cache'),
  )


def _run_main(tmp_path, out, *flags) -> subprocess.CompletedProcess:
  """python -m c3po_jax.main with 2 test samples, batch 2, 2 NGD / mode steps."""
  args = [sys.executable, '-m', 'c3po_jax.main', *flags]
  args += ['--max_test_samples=2', '--batch_size=2', '--ngd_steps=2', '--mode_iters=2']
  args += [f'--cache_dir={tmp_path / "cache"}', f'--output_dir={out}']
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_cli_runs_every_method(ckpt, tmp_path):
  out = tmp_path / 'run'
  proc = _run_main(
    tmp_path,
    out,
    f'--checkpoint_dir={ckpt}',
    '--benchmark=arc_challenge',
    '--reference=openbookqa,sciq',
    '--max_reference_samples=12',
    '--critical_layers=last:2',
    '--core_experts=4',
  )
  summary = json.loads((out / 'summary.json').read_text())['methods']
  assert set(summary) == set(METHODS)  # every method, the trained-prompt baselines too
  rows = results.read_rows(str(out / 'results.jsonl'))
  assert len(rows) == len(METHODS) * 2
  ngd = [r for r in rows if r['method'] == 'ngd']
  assert all(len(r['losses']) == 3 and r['neighbours'] for r in ngd)
  assert 'base' in proc.stdout and 'ngd' in proc.stdout  # the printed table
  assert list(out.glob('routing_*.png'))
  # A second run reuses the cached reference set.
  assert len(list((tmp_path / 'cache').glob('refs-*'))) == 1


def test_missing_checkpoint_says_how_to_convert(tmp_path):
  rc = RunConfig.make(
    checkpoint_dir=str(tmp_path / 'nope'), benchmark='arc_challenge', reference=('openbookqa',)
  )
  with pytest.raises(runner.MissingCheckpointError, match='c3po_jax.ckpts.convert'):
    pipeline.run(rc)


def _strip(rows):
  return sorted(
    json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True) for r in rows
  )


@pytest.mark.slow
def test_interrupted_run_resumes_without_loss_or_duplicates(ckpt, tmp_path, monkeypatch):
  methods = ('base', 'kernel_regression', 'ngd')
  full = tmp_path / 'full'
  pipeline.run(RunConfig.make(**_common(ckpt, tmp_path), methods=methods, output_dir=str(full)))
  want = results.read_rows(str(full / 'results.jsonl'))
  assert len(want) == 3 * 4

  cut = tmp_path / 'cut'
  write = results.ResultsWriter.write
  count = {'n': 0}

  def crashing_write(self, row):
    if count['n'] == 5:  # die mid-line, as a killed process would
      self._file.write(json.dumps(row)[:20])
      self._file.flush()
      raise KeyboardInterrupt
    count['n'] += 1
    write(self, row)

  monkeypatch.setattr(results.ResultsWriter, 'write', crashing_write)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(RunConfig.make(**_common(ckpt, tmp_path), methods=methods, output_dir=str(cut)))
  monkeypatch.setattr(results.ResultsWriter, 'write', write)
  with pytest.raises(results.ResultsExistError):
    pipeline.run(RunConfig.make(**_common(ckpt, tmp_path), methods=methods, output_dir=str(cut)))
  pipeline.run(
    RunConfig.make(**_common(ckpt, tmp_path), methods=methods, output_dir=str(cut), resume=True)
  )
  got = results.read_rows(str(cut / 'results.jsonl'))
  assert _strip(got) == _strip(want)


DEMO = os.path.join(ROOT, 'checkpoints', 'demo')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEMO), reason='no shipped demo checkpoint')
def test_no_flag_run_is_the_embedded_demo(tmp_path):
  """The README's main command, shortened: every method on every demo family."""
  out = tmp_path / 'demo'
  proc = _run_main(tmp_path, out, '--max_reference_samples=16')
  summary = json.loads((out / 'summary.json').read_text())
  with open(os.path.join(DEMO, 'suite', 'suite.json')) as f:
    families = tuple(json.load(f)['benchmarks'])
  assert len(families) >= 2 and set(summary['benchmarks']) == set(families)
  assert set(summary['provenance']['data']) == set(families)  # one provenance block
  assert summary['provenance']['versions']['jax'] and 'ngd' in summary['diagnostics']
  methods = {'base', 'icl', 'prefix_tuning', 'soft_prompt', 'mode_finding'}
  methods |= {'kernel_regression', 'ngd', 'oracle', 'random_pathway'}
  assert set(summary['pooled']) == methods
  # The suite's own settings apply: its prompt format and what was chosen on dev.
  with open(os.path.join(DEMO, 'suite', 'suite.json')) as f:
    manifest = json.load(f)
  rc = summary['run_config']
  assert rc['fmt'] == manifest['prompt']['format']
  given = {'max_test_samples', 'max_reference_samples', 'batch_size', 'ngd_steps', 'mode_iters'}
  settings = manifest.get('c3po_settings', {}).get('settings', {})
  for name, value in settings.items():
    if name not in given:
      assert rc[name] == (tuple(value) if isinstance(value, list) else value), name
  assert rc['max_test_samples'] == 2 and rc['ngd_steps'] == 2  # flags win
  assert 'ngd_steps' in settings and 'lr' in settings
  for family in families:
    rows = results.read_rows(str(out / family / 'results.jsonl'))
    assert len(rows) == 2 * len(methods)
  assert all(f in proc.stdout for f in families) and 'oracle' in proc.stdout
  assert (out / 'accuracy.png').exists() and (out / 'ngd_steps.png').exists()  # pooled


def test_suite_settings_reject_unknown_fields():
  from c3po_jax.run import suite as suite_run

  manifest = {'prompt': {'format': 'rc'}, 'c3po_settings': {'settings': {'lr': 0.1}}}
  assert suite_run.suite_settings(manifest) == {'fmt': 'rc', 'lr': 0.1}
  assert suite_run.suite_settings({}) == {}
  with pytest.raises(ValueError, match='learning_rate'):
    suite_run.suite_settings({'c3po_settings': {'settings': {'learning_rate': 0.1}}})
