"""The premise diagnostic's first-order part against a re-derivation with full forwards.

`premise_descent.descent_direction` takes the NGD objective's gradient from the
prefix-state loss the engine uses; here the same numbers are derived
independently: the neighbours' full prompts through the model (`NaiveLoss`),
the neighbours' mean routing from the reference set's router rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.demo import premise, premise_descent
from c3po_jax.neighbours import search as neighbours
from c3po_jax.remix import batch as batch_lib
from c3po_jax.remix import losses
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run import pipeline
from c3po_jax.run.config import RunConfig
from c3po_jax.run.runner import Runner, load_model
from c3po_jax.tasks import load_examples, load_references


@pytest.fixture(scope='module')
def setup(tiny_checkpoint, tmp_path_factory):
  rc = RunConfig.make(
    checkpoint_dir=tiny_checkpoint,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base',),
    fmt='rc',
    max_test_samples=5,
    max_reference_samples=24,
    batch_size=4,
    critical_layers='last:2',
    core_experts=6,
    k=3,
    max_similarity=1.0,
    output_dir=str(tmp_path_factory.mktemp('run')),
    cache_dir=str(tmp_path_factory.mktemp('cache')),
  )
  config, params, tok = load_model(rc)
  test = load_examples(rc.data.benchmark, limit=5)
  pool, _ = load_references(rc.data.reference, max_samples=24)
  runner = Runner(rc, config, params, tok)
  runner.begin(test, max(len(e.choices) for e in test + pool))
  base = runner.analyze(test, runner.encode(test), 'test')
  refs = runner.reference_set(pool)
  nbh = neighbours.find(base.embeddings, refs.embeddings, k=3, max_similarity=1.0)
  kw = pipeline.kernel_weights(rc, refs, nbh)
  return runner, base, refs, nbh, kw


@pytest.mark.slow
def test_descent_direction_matches_full_forward_derivation(setup):
  runner, base, refs, nbh, kw = setup
  probs = np.asarray(base.router_probs)
  got = premise_descent.descent_direction(runner, probs, refs, nbh, kw)
  assert got['cosine'].shape == got['hit'].shape == (5,)  # 5 samples over batches of 4
  assert np.all(np.isfinite(got['cosine'])) and np.all(np.abs(got['cosine']) <= 1 + 1e-6)

  eng, params, config = runner.engine, runner.params, runner.config
  spec = eng.ec.spec
  # One program (params an argument), not an eager op-by-op pass per sample.
  naive_grad = jax.jit(
    lambda p, *a: jax.grad(losses.NaiveLoss.make_loss(p, config, eng.ec, 'dense'))(*a)
  )
  ref_prompts = runner.encode(refs.examples)
  for i in (0, 4):  # the first batch and the padded last one
    pidx = [i] * runner.rc.execution.batch_size
    data, w, _ = batch_lib.neighbour_data(runner, pidx, refs, nbh, kw, ref_prompts, prepared=False)
    cs = pw_lib.core_slice(jnp.asarray(probs[i]), spec)
    w0 = pw_lib.base_weights(cs)
    one = jax.tree.map(lambda a: a[0], data)
    g = np.asarray(naive_grad(params, w0, cs, one, w[0]))  # [C, Kc]
    rows = [
      np.asarray(pw_lib.core_weights(jnp.asarray(refs.router_probs[j]), cs.core, spec.layers))
      for j in nbh.index[i]
    ]
    k = kw[i] / kw[i].sum()
    w_hat = np.einsum('n,nck->ck', k, np.stack(rows))
    w_hat *= np.asarray(cs.mass)[:, None] / w_hat.sum(-1, keepdims=True)
    step = -(g - g.mean(-1, keepdims=True))
    way = w_hat - np.asarray(w0)
    want = (step * way).sum() / (np.linalg.norm(step) * np.linalg.norm(way))
    np.testing.assert_allclose(got['cosine'][i], want, rtol=1e-3, atol=1e-4)
    top = np.argsort(-w_hat, axis=-1)[:, : config.num_experts_per_tok]
    hit = np.mean([np.argmin(g[c]) in top[c] for c in range(len(spec.layers))])
    assert got['hit'][i] == hit


@pytest.mark.slow
def test_neighbour_source_share_of_a_shared_pool(setup):
  runner, base, refs, nbh, kw = setup
  b = premise.Benchmark(
    'arc',
    runner,
    runner.encode(load_examples(runner.rc.data.benchmark, limit=5)),
    np.zeros(5, int),
    np.asarray(base.scores),
    np.asarray(base.router_probs),
    np.asarray(base.embeddings),
  )
  pool = refs.examples
  tasks = {e.task for e in pool}
  assert tasks == {'openbookqa'}  # the source name, as the suite's reference_sources give it
  for own, want in ((tasks, 1.0), ({'sciq'}, 0.0)):
    got = premise.transfer_gap(b, pool, [1], 3, 1.0, own)['own_share']
    np.testing.assert_array_equal(got, np.full(5, want))
  assert np.all(np.isnan(premise.transfer_gap(b, pool, [1], 3, 1.0)['own_share']))


def test_summary_splits_descent_by_base_outcome():
  correct = np.array([True, False, False])
  nan3 = np.full(3, np.nan)
  out = premise.summarize(
    correct,
    nan3,
    nan3,
    nan3,
    correct,
    correct,
    correct,
    np.array([0.5, -0.2, np.nan]),  # cosine; the third sample has no neighbour
    np.array([1.0, 0.0, np.nan]),
    np.array([1.0, 0.0, 0.5]),  # neighbours from the benchmark's own sources
  )
  assert out['neighbours_own_sources'] == 0.5
  assert out['descent_cosine_base_right'] == 0.5 and out['descent_cosine_base_wrong'] == -0.2
  assert out['descent_hit_base_wrong'] == 0.0
  table = premise.format_table(
    {'benchmarks': {'a': out}, 'pooled': out, 'descent_hit_chance': 0.25}
  )
  assert 'cos|wrong' in table and '-0.200' in table
