"""The ablation study's pieces without a model: layer sets, grids, FLOPs, statistics, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.ablate import analysis, flops, layer_sets, store, studies
from c3po_jax.remix import methods
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run.config import RunConfig
from models.config import MoeConfig

OLMOE = MoeConfig()  # the defaults are OLMoE-1B-7B's
DEMO = MoeConfig(
  vocab_size=448, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
  num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
)  # fmt: skip


def test_layer_sets_count_as_the_paper_for_16_layers():
  sets = layer_sets.paper_sets(range(16))
  assert sets['F1'] == (0,) and sets['M1'] == (7,) and sets['L1'] == (15,)
  assert sets['M2'] == (7, 8) and sets['L2'] == (14, 15) and sets['F2'] == (0, 1)
  assert sets['F2M3'] == (0, 1, 6, 7, 8) and sets['M2L3'] == (7, 8, 13, 14, 15)
  assert sets['F5'] == (0, 1, 2, 3, 4) and sets['M5'] == (5, 6, 7, 8, 9)
  assert sets['L5'] == (11, 12, 13, 14, 15) and sets['All16'] == tuple(range(16))
  assert len(sets) == 16 and len(set(sets.values())) == 16  # all distinct at 16 layers


def test_layer_sets_count_moe_layers_only_and_clamp():
  moe = tuple(range(1, 28))  # DeepSeekMoE: layer 0 is dense
  assert layer_sets.layers('F1', moe) == (1,) and layer_sets.layers('L1', moe) == (27,)
  assert layer_sets.layers('All27', moe) == moe
  four = layer_sets.paper_sets(range(4))
  assert four['F5'] == four['M5'] == four['L5'] == four['All4'] == (0, 1, 2, 3)
  assert four['M1'] == (1,) and four['M2'] == (1, 2) and four['F2L3'] == (0, 1, 2, 3)
  with pytest.raises(ValueError, match='layer set'):
    layer_sets.layers('X3', range(4))
  with pytest.raises(ValueError, match='at least one'):
    layer_sets.layers('F0', range(4))


def test_layer_study_runs_each_distinct_set_once():
  grid = studies.layers(DEMO)
  sets = [dict(s.info)['layers'] for s in grid]
  assert len(sets) == len({tuple(s) for s in sets}) == 11
  merged = next(s for s in grid if 'L5' in s.label)
  assert merged.label == 'F2L3=F5=M5=L5=All4' and merged.paper == 79.2
  assert len(studies.layers(OLMOE)) == 16


def test_core_grid_from_k_to_all_experts():
  assert studies.core_grid(64, 8) == [8, 12, 16, 20, 24, 32, 48, 64]
  assert studies.core_grid(8, 2) == [2, 3, 4, 5, 6, 8]


def test_steps_grid_definitions():
  own = studies.steps('own')
  assert [s.fields['ngd_steps'] for s in own] == [3, 5, 10, 20, 50]
  assert all(s.read_step is None for s in own)
  prefix = studies.steps('prefix')
  assert {s.fields['ngd_steps'] for s in prefix} == {50}  # one trajectory
  assert [s.read_step for s in prefix] == [3, 5, 10, 20, 50]
  with pytest.raises(ValueError, match='schedule'):
    studies.steps('linear')


def test_tokens_grid_follows_the_token_count_setting():
  labels = [s.label for s in studies.tokens()]
  assert 'first 1' in labels and 'middle 1' in labels and 'last 1' in labels
  assert ('last 3' in labels) == studies.has_token_count()


def _quadratic_loss(target):
  def loss_fn(w, cs, data, weights, anchors=None):
    del cs, data, weights, anchors
    return jnp.sum((w - target) ** 2)

  return loss_fn


@pytest.mark.slow
def test_prefix_schedule_reads_the_long_trajectory():
  """Step s of the 50-step trajectory == an s-step run whose schedule spans 50 steps;
  under the paper's definition (its own schedule) the two differ."""
  probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (2, 8)))
  cs = pw_lib.core_slice(probs, pw_lib.PathwaySpec(layers=(0, 1), num_core=8))
  w0 = pw_lib.base_weights(cs)
  loss_fn = _quadratic_loss(jnp.roll(w0, 3, axis=-1))
  ones = jnp.ones((1,))
  long = methods.ngd(loss_fn, cs, None, ones, w0, methods.MethodConfig(ngd_steps=50, lr=0.05))
  for s in (3, 10):
    prefix = methods.MethodConfig(ngd_steps=s, schedule_steps=50, lr=0.05)
    short = methods.ngd(loss_fn, cs, None, ones, w0, prefix)
    np.testing.assert_allclose(short.w, long.path[s], atol=1e-6)
    np.testing.assert_allclose(short.path, long.path[: s + 1], atol=1e-6)
    own = methods.ngd(loss_fn, cs, None, ones, w0, methods.MethodConfig(ngd_steps=s, lr=0.05))
    assert not np.allclose(own.w, long.path[s], atol=1e-4)


def test_forward_flops_by_hand():
  c = MoeConfig(
    vocab_size=10, hidden_size=4, intermediate_size=3, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
  )  # fmt: skip
  # q 4, kv 2: projections 2*4*(8+4) = 96; scores 4*4 per key; router 32; 2 experts 2*72.
  assert flops.layer_flops(c, 0, keys=3) == 96 + 16 * 3 + 32 + 144
  # 2 tokens attend to 1.5 keys on average; head 2*4*10 at one position.
  assert flops.forward_flops(c, 2) == 2 * (96 + 16 * 1.5 + 32 + 144) + 80


def test_ngd_flops_grow_with_the_core_in_dense_mode_only():
  kw = dict(test_tokens=30, ref_tokens=40, neighbours=3, steps=10, layers=(11, 12, 13, 14, 15))
  dense = [flops.per_sample(OLMOE, core=n, opt_mode='dense', **kw)['ngd'] for n in (8, 20, 64)]
  assert dense[0]['total'] < dense[1]['total'] < dense[2]['total']
  topk = {flops.per_sample(OLMOE, core=n, opt_mode='topk', **kw)['ngd']['total'] for n in (8, 64)}
  assert len(topk) == 1
  f = flops.per_sample(OLMOE, core=20, opt_mode='dense', **kw)
  assert f['base']['total'] < f['ngd']['forward'] and f['ngd']['backward'] > 0


def test_coverage_counts_final_topk_inside_base_topn():
  # Core in base order; the final top-2 are positions 0 and 3 (layer 0), 4 and 5 (layer 1).
  after = [[0.5, 0.1, 0.0, 0.4, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0, 0.5, 0.4]]
  cov = analysis.coverage([{'after': after}], top_k=2, num_experts=6)
  assert cov == [25.0, 25.0, 50.0, 75.0, 100.0]  # n = 2..6
  with pytest.raises(ValueError, match='every expert'):
    analysis.coverage([{'after': [[1.0, 0.0]]}], top_k=2, num_experts=6)


def test_trajectory_flips_and_fixes():
  recs = [
    {'step_correct': [True, True, False], 'base_correct': True},
    {'step_correct': [True, True, True], 'base_correct': True},
    {'step_correct': [False, True, True], 'base_correct': False},
    {'step_correct': [False, False, False], 'base_correct': False},
  ]
  t = analysis.trajectory(recs)
  assert t['accuracy'] == [50.0, 75.0, 50.0]
  assert t['flip'] == [0.0, 0.0, 50.0] and t['fix'] == [0.0, 50.0, 50.0]
  assert analysis.accuracy(recs[:2], read_step=2) == 50.0
  with pytest.raises(ValueError, match='step 3'):
    analysis.accuracy(recs, read_step=3)


def test_setting_keys_normalize_equal_settings():
  kw = dict(methods=('base', 'oracle'))
  a = RunConfig.make(critical_layers='last:2', core_experts=20, output_dir='x', **kw)
  b = RunConfig.make(critical_layers='2,3', core_experts=8, output_dir='y', batch_size=3, **kw)
  assert store.effective(a, DEMO) == store.effective(b, DEMO)
  c = b.replace(kernel='linear')
  assert store.effective(c, DEMO) != store.effective(b, DEMO)


def test_complete_keeps_settings_every_benchmark_has():
  from c3po_jax.ablate import report, study

  grid = {'kernels': studies.kernels(), 'steps': studies.steps('own')}
  full = {('kernels', 'linear'): [], ('kernels', 'matern'): [], ('steps', '3'): []}
  benches = [
    study.Benchmark('a', [], dict(full), 1.0, 1.0),
    study.Benchmark('b', [], {('kernels', 'linear'): []}, 1.0, 1.0),
  ]
  kept = report.complete(grid, benches)
  assert list(kept) == ['kernels'] and [s.label for s in kept['kernels']] == ['linear']
