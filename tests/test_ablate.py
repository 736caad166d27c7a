"""The ablation study on a tiny random OLMoE: every study end to end, and what it shares.

A setting run by the study (sharing one base pass, reference set,
neighbourhoods, engines and prefix-state stores with every other setting)
must give the same answers as a plain `pipeline.run` with those settings.
"""

import json
import os
import subprocess
import sys

import pytest

from c3po_jax.ablate import studies, study
from c3po_jax.run import pipeline, results
from c3po_jax.run.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def ckpt(tiny_checkpoint):
  return tiny_checkpoint  # conftest.py: one per session, read-only


def _rc(ckpt, tmp_path, **kw):
  return RunConfig.make(
    checkpoint_dir=ckpt,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'ngd'),
    max_test_samples=2,
    max_reference_samples=12,
    batch_size=2,
    critical_layers='last:2',
    core_experts=4,
    ngd_steps=2,
    lr=0.1,
    max_similarity=1.0,
    output_dir=str(tmp_path / 'ablate'),
    cache_dir=str(tmp_path / 'cache'),
    **kw,
  )


@pytest.mark.slow
def test_shared_settings_equal_separate_runs(ckpt, tmp_path):
  """A kernel reuses the neighbourhood and engine, a layer set with another first layer
  gets its own engine and store: each equals its own pipeline run."""
  rc = _rc(ckpt, tmp_path)
  grids = {
    'kernels': [studies.Setting('kernels', 'linear', (('kernel', 'linear'),))],
    'layers': [studies.Setting('layers', 'F1', (('critical_layers', '0'),))],
  }
  benches, _ = study.run(rc, grids)
  (bench,) = benches
  for (name, label), records in bench.records.items():
    (setting,) = [s for s in grids[name] if s.label == label]
    out = str(tmp_path / f'run_{name}')
    pipeline.run(rc.replace(output_dir=out, **setting.fields))
    by_id = {
      r['id']: r
      for r in results.read_rows(os.path.join(out, 'results.jsonl'))
      if r['method'] == 'ngd'
    }
    assert len(by_id) == len(records) == 2
    for rec in records:
      row = by_id[rec['id']]
      assert rec['prediction'] == row['prediction'], (name, rec['id'])
      assert rec['step_correct'] == row['step_correct'], (name, rec['id'])
      assert rec['base_correct'] == (row['base_prediction'] == row['gold'])


@pytest.mark.slow
def test_cli_runs_every_study_and_resumes(ckpt, tmp_path):
  """Every study's first setting, chosen to coincide with the run's own where the grid
  allows (k 1, 3 steps, layer 0, 2 core experts): settings asked by several studies
  run once, so only the run's, the linear kernel's and the all-experts one compute."""
  out = tmp_path / 'ablate'
  args = [sys.executable, '-m', 'c3po_jax.ablate', f'--checkpoint_dir={ckpt}']
  args += ['--benchmark=arc_challenge', '--reference=openbookqa', '--max_test_samples=2']
  args += ['--max_reference_samples=16', '--batch_size=2', '--settings_per_study=1']
  args += ['--k=1', '--ngd_steps=3', '--critical_layers=0', '--core_experts=2']
  args += ['--max_similarity=1.0', '--lr=0.1']
  args += [f'--output_dir={out}', f'--cache_dir={tmp_path / "cache"}']
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=2400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / 'ablations.json').read_text())
  for name in ('tokens', 'neighbourhood', 'steps', 'kernels', 'layers', 'core'):
    (row,) = result['studies'][name]
    assert 0 <= row['avg'] <= 100 and set(row['ours']) == {'arc_challenge'}, name
  assert result['studies']['core'][0]['flops_vs_base'] > 1.0
  assert len(result['coverage']['ours']) == 8 - 2 + 1  # n = k..E
  assert result['coverage']['ours'][-1] == 100.0  # the top-k is always inside all E
  assert len(result['trajectory']['accuracy']) == 3 + 1  # the run's 3 steps and the start
  for fig in ('fig4_accuracy_vs_flops', 'fig5_coverage', 'fig6_accuracy_per_step'):
    assert (out / f'{fig}.png').stat().st_size > 0
  assert 'tokens (NGD accuracy %' in proc.stdout and 'paper' in proc.stdout
  settings = sorted(os.listdir(out / 'settings'))
  assert len(settings) == 3  # the run's setting, the linear kernel, every expert
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=2400)
  assert again.returncode == 0, again.stderr[-3000:]
  assert sorted(os.listdir(out / 'settings')) == settings
  progress = [line for line in again.stdout.splitlines() if line.startswith('[')]
  assert len(progress) == 8 and all(line.endswith('(stored)') for line in progress)
  assert json.loads((out / 'ablations.json').read_text())['studies'] == result['studies']
