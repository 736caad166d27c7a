"""Per-method settings: each method runs with its own, exactly as a run with those flags would.

Also the per-method dev tuning of the demo (`c3po_jax.demo.tune`): every
method's grid, the choice on pooled dev accuracy, and the manifest entry that
runs of the suite apply.
"""

import itertools
import json

import pytest

from c3po_jax.run import per_method, pipeline
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig


def _rc(**kw):
  return RunConfig.make(benchmark='arc_challenge', reference=('openbookqa',), **kw)


def test_text_form_is_canonical_and_typed():
  rc = _rc(per_method=' ngd:lr=0.1 ; kernel_regression:kr_alpha=None,kernel=matern,k=10')
  assert rc.method.per_method == 'kernel_regression:k=10,kernel=matern,kr_alpha=None;ngd:lr=0.1'
  assert rc.method_settings() == {
    'kernel_regression': {'k': 10, 'kernel': 'matern', 'kr_alpha': None},
    'ngd': {'lr': 0.1},
  }
  kr = rc.for_method('kernel_regression')
  assert kr.neighbourhood.k == 10 and kr.neighbourhood.kernel == 'matern'
  assert rc.neighbourhood.k == 3 and rc.for_method('icl') == rc  # the others keep the run's
  assert rc.for_method('ngd').method.lr == 0.1 and rc.method.lr == 0.01
  again = _rc(per_method=rc.method.per_method)
  assert again == rc  # one text per meaning: --resume compares it


@pytest.mark.parametrize(
  'spec, message',
  [
    ('nope:k=1', 'METHOD:FIELD=VALUE'),
    ('icl', 'METHOD:FIELD=VALUE'),
    ('icl:critical_layers=1', 'a method may set'),
    ('icl:k', 'a method may set'),
    ('ngd:lr=fast', 'is not a float'),
    ('ngd:lr=-1', r'--per_method \(ngd\): --lr=-1.0: must be > 0'),
    ('kernel_regression:kernel=cosine', r'--per_method \(kernel_regression\): kernel='),
    ('icl:k=0', r'--per_method \(icl\)'),
  ],
)
def test_bad_settings_fail_before_any_model(spec, message):
  with pytest.raises(ValueError, match=message):
    _rc(per_method=spec)


def test_suite_manifest_per_method_entries_become_the_flag():
  manifest = {
    'prompt': {'format': 'rc'},
    'c3po_settings': {
      'settings': {'lr': 0.1, 'k': 3},
      'per_method': {
        'icl': {'settings': {'k': 1}, 'grid': []},
        'kernel_regression': {'settings': {'kernel': 'matern', 'k': 10}},
      },
    },
  }
  got = suite_run.suite_settings(manifest)
  assert got == {
    'fmt': 'rc',
    'lr': 0.1,
    'k': 3,
    'per_method': 'icl:k=1;kernel_regression:k=10,kernel=matern',
  }
  rc = _rc(**{k: v for k, v in got.items()})
  assert rc.for_method('icl').neighbourhood.k == 1 and rc.for_method('ngd').neighbourhood.k == 3


def test_tune_gives_every_method_its_own_grid_and_records_the_choice(monkeypatch, tmp_path):
  from c3po_jax.demo import tune

  calls = []

  def fake_run_suite(rc, suite_dir, split):
    assert split == 'dev' and rc.methods[0] == 'base' and len(rc.methods) == 2
    method = rc.methods[1]
    assert rc.method.per_method == ''  # the point's settings apply to the whole run
    calls.append((method, rc.neighbourhood.k, rc.method.lr))
    acc = {('icl', 2): 0.5, ('icl', 5): 0.5, ('ngd', 0.3): 0.6}.get(
      (method, rc.neighbourhood.k if method == 'icl' else rc.method.lr), 0.4
    )
    pooled = {
      'base': {'accuracy': 0.3, 'mcnemar_p_vs_base': 1.0},
      method: {'accuracy': acc, 'mcnemar_p_vs_base': 0.04},
    }
    return {'benchmarks': {}, 'pooled': pooled}

  monkeypatch.setattr(suite_run, 'run_suite', fake_run_suite)
  rc = RunConfig.make(
    checkpoint_dir='x', benchmark='(suite)', reference=('(suite)',), output_dir=str(tmp_path)
  )
  grids = {m: tune.GRIDS[m] for m in ('icl', 'ngd')}
  sizes = {m: len(list(itertools.product(*g.values()))) for m, g in tune.GRIDS.items()}
  assert set(sizes.values()) == {4}  # the same number of dev points for every method
  entries = tune.tune_methods(rc, 'suite', grids)
  assert len(calls) == 8
  assert entries['icl']['settings'] == {'k': 2}  # tie with k=5: the earlier point
  assert entries['ngd']['settings'] == {'lr': 0.3, 'opt_pathway_mode': 'topk'}
  assert entries['ngd']['dev_accuracy'] == 0.6 and len(entries['ngd']['grid']) == 4
  assert entries['icl']['criterion'].startswith('pooled icl accuracy on dev')

  from c3po_jax.demo import suite as demo_suite

  suite_dir = tmp_path / 'suite'
  suite_dir.mkdir()
  (suite_dir / 'suite.json').write_text(
    json.dumps({'format': demo_suite.FORMAT, 'benchmarks': {}, 'c3po_settings': {'settings': {}}})
  )
  tune.write_per_method(str(suite_dir), entries)
  manifest = demo_suite.read_manifest(str(suite_dir))
  spec = suite_run.suite_settings(manifest)['per_method']
  assert spec == 'icl:k=2;ngd:lr=0.3,opt_pathway_mode=topk'


@pytest.mark.slow
def test_each_method_runs_as_a_run_with_its_settings_would(tiny_checkpoint, tmp_path):
  """One run with --per_method == separate runs with those settings as flags, row by row."""
  common = dict(
    checkpoint_dir=tiny_checkpoint,
    max_test_samples=3,
    max_reference_samples=16,
    batch_size=2,
    critical_layers='last:2',
    core_experts=6,
    ngd_steps=2,
    max_similarity=1.0,
    num_plots=0,
    cache_dir=str(tmp_path / 'cache'),
  )
  spec = 'icl:k=1;kernel_regression:k=5,kernel=matern;ngd:lr=0.05'
  together = _rc(
    methods=('base', 'icl', 'kernel_regression', 'ngd'),
    per_method=spec,
    output_dir=str(tmp_path / 'together'),
    **common,
  )
  pipeline.run(together)
  alone = {
    'icl': dict(k=1),
    'kernel_regression': dict(k=5, kernel='matern'),
    'ngd': dict(lr=0.05),
  }
  rows = _rows(tmp_path / 'together')
  for method, flags in alone.items():
    out = tmp_path / method
    pipeline.run(_rc(methods=('base', method), output_dir=str(out), **common, **flags))
    mine = _rows(out)
    for key in ('choice_scores', 'neighbours', 'prediction', 'losses'):
      assert [r.get(key) for r in rows[method]] == [r.get(key) for r in mine[method]], (
        method,
        key,
      )
  # The run's own neighbours (k = 3) where a method sets no k of its own.
  assert all(len(r['neighbours']) == 3 for r in rows['ngd'])
  assert all(len(r['neighbours']) == 1 for r in rows['icl'])
  summary = json.loads((tmp_path / 'together' / 'summary.json').read_text())
  assert summary['settings_in_effect']['per_method']['kernel_regression'] == {
    'k': 5,
    'kernel': 'matern',
  }


def _rows(out):
  by = {}
  for line in (out / 'results.jsonl').read_text().splitlines():
    r = json.loads(line)
    by.setdefault(r['method'], []).append(r)
  return {m: sorted(rs, key=lambda r: r['id']) for m, rs in by.items()}


def test_tunable_fields_exist_and_keep_states_and_references():
  from c3po_jax.run.config import FIELDS

  assert set(per_method.TUNABLE) <= set(FIELDS)
  # What the prefix states or the reference set depend on is never per method.
  for name in ('critical_layers', 'core_experts', 'token_position', 'token_count', 'embedder'):
    assert name not in per_method.TUNABLE
