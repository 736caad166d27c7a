"""The whole pipeline with the identity pathway reproduces base, in every format.

Kernel regression with alpha = 1 keeps every sample's base pathway: its
per-choice scores in results.jsonl must equal base's, for mc letters, rc, and
rc with per-choice contexts (WinoGrande), where each sequence has to keep its
own routing. Its final scores come from the test samples' prefix states kept
by the base pass (a window forward), the base's from that full pass.
"""

import numpy as np
import pytest

from c3po_jax.run import pipeline, results
from c3po_jax.run.config import RunConfig


@pytest.fixture(scope='module')
def ckpt(tiny_checkpoint):
  return tiny_checkpoint  # conftest.py: one per session, read-only


@pytest.mark.slow
@pytest.mark.parametrize(
  'benchmark,fmt', [('arc_challenge', 'mc'), ('arc_challenge', 'rc'), ('winogrande', 'rc')]
)
def test_identity_pathway_rows_equal_base(ckpt, tmp_path, benchmark, fmt):
  rc = RunConfig.make(
    checkpoint_dir=ckpt,
    benchmark=benchmark,
    reference=('openbookqa', 'sciq'),
    methods=('base', 'kernel_regression'),
    fmt=fmt,
    kr_alpha=1.0,
    max_test_samples=3,
    max_reference_samples=32,
    batch_size=3,
    critical_layers='last:2',
    core_experts=4,
    max_similarity=1.0,
    output_dir=str(tmp_path / 'run'),
    cache_dir=str(tmp_path / 'cache'),
  )
  pipeline.run(rc)
  rows = results.read_rows(str(tmp_path / 'run' / 'results.jsonl'))
  by = {(r['method'], r['id']): r for r in rows}
  ids = sorted({r['id'] for r in rows})
  assert len(ids) == 3
  for i in ids:
    base, kr = by['base', i], by['kernel_regression', i]
    assert len(base['choice_scores']) == len(base['choices']) >= 2
    np.testing.assert_allclose(kr['choice_scores'], base['choice_scores'], atol=2e-4)
    assert kr['prediction'] == base['prediction'] and kr['alpha'] == 1.0
    assert kr['topk_new'] == 0.0 and kr['mean_abs_delta'] == 0.0
    assert np.all(np.isfinite(base['choice_scores']))
    assert kr['compile_seconds'] >= 0.0  # compilation apart from the steady-state seconds
  summary = results.summarize(rows)['kernel_regression']
  assert summary['compile_seconds'] > 0.0 and 'first_batch_seconds_per_sample' not in summary
