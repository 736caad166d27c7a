"""`benchmarks/accelerator.py` runs end to end (here on CPU, the tiny preset) and ends in JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_benchmark_smoke():
  args = [
    '--config=tiny',
    '--dtype=float32',
    '--forward_batches=2',
    '--num_samples=2',
    '--k=2',
    '--seq_len=16',
    '--steps=1',
    '--critical_layers=1',
    '--core_experts=4',
    '--repeats=1',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  cmd = [sys.executable, '-m', 'benchmarks.accelerator', *args]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['backend'] == 'cpu' and result['auto_dispatch'] == 'sorted'
  for name in ('sorted', 'ragged', 'torch'):
    assert result[f'forward_b2_{name}_tok_s'] > 0
  for name in ('sorted', 'ragged'):  # float32: the same model as transformers'
    assert result[f'max_abs_logit_diff_b2_{name}'] < 1e-4
  assert result['ngd_s_per_sample'] > 0 and result['ngd_over_base'] > 0
  assert set(result['memory']) >= {'forward_b2_sorted', 'ngd_step'}
