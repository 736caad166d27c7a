"""The Python API runs C3PO without the CLI; its summary carries provenance."""

import json
import os
import shutil

import pytest

import c3po_jax
from c3po_jax.run import output as run_output
from c3po_jax.run import results
from c3po_jax.testing.checkpoints import make_checkpoint


@pytest.mark.slow
def test_run_returns_predictions_pathways_and_provenance(tiny_checkpoint, tmp_path):
  ckpt = str(shutil.copytree(tiny_checkpoint, tmp_path / 'tiny'))  # overwritten below
  rc = c3po_jax.RunConfig.make(
    checkpoint_dir=ckpt,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'ngd'),
    max_test_samples=2,
    max_reference_samples=8,
    batch_size=2,
    critical_layers=(2, 3),
    core_experts=4,
    ngd_steps=2,
    max_similarity=1.0,
    num_plots=0,
    max_len=24,  # shorter than every prompt: each is left-truncated, with a warning
    output_dir=str(tmp_path / 'out'),
    cache_dir=str(tmp_path / 'cache'),
  )
  result = c3po_jax.run(rc)
  assert set(result.summary) == {'base', 'ngd'}
  preds = result.predictions('ngd')
  assert len(preds) == 2 and all(isinstance(p, int) for p in preds.values())
  assert set(result.pathways('ngd')) == set(preds)
  assert all(p is None for p in result.pathways('base').values())
  with pytest.raises(KeyError, match='icl'):
    result.predictions('icl')

  # The texts once per sample (in its first row), every row warned of the truncation.
  for sample in preds:
    mine = [r for r in result.rows if r['id'] == sample]
    assert len(mine) == 2 and sum('question' in r and 'prompt' in r for r in mine) == 1
  assert all('--max_len=24' in r['warning'] for r in result.rows)
  assert result.summary['base']['seconds_per_sample'] > 0  # the base pass, timed

  summary = json.loads((tmp_path / 'out' / results.SUMMARY_FILE).read_text())
  prov = summary['provenance']
  assert prov['started'] <= prov['finished'] == prov['date']
  assert prov['versions']['jax'] and prov['wall_seconds'] > 0
  assert len(prov['checkpoint']['fingerprint']) == 16
  assert prov['data']['test'] == {'benchmark': 'arc_challenge', 'split': 'test', 'size': 2}
  ref = prov['data']['references'][0]
  assert ref['source'] == 'openbookqa' and ref['split'] and ref['size'] == 8
  assert summary['reference_splits'] == {'openbookqa': ref['split']}
  lo, hi = summary['methods']['base']['accuracy_ci95']
  assert 0 <= lo <= summary['methods']['base']['accuracy'] <= hi <= 1
  assert os.path.exists(tmp_path / 'out' / 'run_config.json')

  # The same checkpoint path with other weights: --resume refuses to mix rows.
  make_checkpoint(tmp_path / 'tiny', seed=1)
  with pytest.raises(run_output.ConfigMismatchError, match='other model weights'):
    c3po_jax.run(rc.replace(resume=True))
