"""Full-size readiness: the full widths lower and compile on abstract inputs.

`scripts/aot_memory.py` compiles the whole models (docs/speed.md "Full-size
readiness"); here two layers of OLMoE-1B-7B and DeepSeekMoE-16B at their full
widths, in bfloat16, at the flagfiles' batch (Q = 8, k = 3, 10 NGD steps), with
nothing allocated: a layout or sharding-free shape mistake fails here.
"""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import families, params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache  # once: the script defines absl flags
def _script():
  spec = importlib.util.spec_from_file_location(
    'aot_memory', os.path.join(ROOT, 'scripts', 'aot_memory.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
@pytest.mark.parametrize(
  'preset,programs',
  [('olmoe-1b-7b-0924', ('forward', 'prepare', 'ngd')), ('deepseek-moe-16b', ('forward', 'ngd'))],
)
def test_full_width_programs_compile_on_abstract_inputs(preset, programs):
  full = families.PRESETS[preset]
  config = full.replace(num_hidden_layers=2, dense_layers=full.dense_layers[:1])
  stats = _script().compile_programs(
    config, dtype=jnp.bfloat16, batch_size=8, seq_len=128, critical_layers='last:1', only=programs
  )
  assert set(stats) == set(programs)
  param_bytes = sum(np.prod(s.shape) * 2 for s in jax.tree.leaves(params.param_structs(config)))
  # The forward reads every parameter, in bfloat16, plus the [Q, T] tokens.
  np.testing.assert_allclose(stats['forward']['argument_gib'] * 2**30, param_bytes, rtol=1e-3)
  for s in stats.values():
    assert 0 < s['total_gib'] < 64, s
