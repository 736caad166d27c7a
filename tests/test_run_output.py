"""What the CLI prints: no third-party INFO noise, a last line saying where and how long."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = {
  name
  for folder in ('c3po_jax', 'models', 'benchmarks')
  for _, _, names in os.walk(os.path.join(ROOT, folder))
  for name in names
  if name.endswith('.py')
}


@pytest.fixture(scope='module')
def ckpt(tiny_checkpoint):
  return tiny_checkpoint  # conftest.py: one per session, read-only


def _main(*flags) -> subprocess.CompletedProcess:
  args = [sys.executable, '-m', 'c3po_jax.main', *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_console_and_rerun(ckpt, tmp_path):
  out = tmp_path / 'run'
  flags = [
    f'--checkpoint_dir={ckpt}',
    '--benchmark=arc_challenge',
    '--methods=base',
    '--critical_layers=2',
    '--core_experts=4',
    '--max_test_samples=2',
    '--batch_size=2',
    f'--output_dir={out}',
    f'--cache_dir={tmp_path / "cache"}',
  ]
  proc = _main(*flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.fullmatch(rf'Results in {out} \(\d+\.\d s\)\.', proc.stdout.strip().splitlines()[-1])
  assert '95% CI' in proc.stdout
  # absl INFO lines ("I1201 05:08:03.17 123 file.py:172] ...") come only from our files.
  info = re.findall(r'^I\d{4} [\d:.]+ +\d+ (\S+?):\d+\]', proc.stderr, re.M)
  assert info and set(info) <= OWN, set(info) - OWN
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['provenance']['data']['test']['size'] == 2

  again = _main(*flags)
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-1] == (
    f'error: --output_dir={out} already has results: pass --resume to continue that run, '
    '--overwrite to replace it, or choose another --output_dir'
  )
  assert 'model: MoeConfig' not in again.stderr  # refused before the model loaded
  assert _main(*flags, '--overwrite').returncode == 0
  assert _main(*flags, '--resume', '--max_test_samples=1').returncode == 2
