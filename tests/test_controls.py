"""The controls a reader expects next to the methods: chance, and a random pathway."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.remix import methods
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run import results, suite


def test_chance_is_the_mean_of_one_over_the_choices():
  rows = [
    {'method': 'base', 'id': 'a', 'choices': ['x', 'y', 'z', 'w']},
    {'method': 'ngd', 'id': 'a', 'choices': ['x', 'y', 'z', 'w']},  # one sample, counted once
    {'method': 'base', 'id': 'b', 'choices': ['x', 'y']},
  ]
  assert results.chance(rows) == pytest.approx((0.25 + 0.5) / 2)
  assert results.chance([]) is None
  summary = results.summarize([dict(r, correct=True, gold=0, prediction=0) for r in rows[:1]])
  table = results.format_table(summary, 'demo', 0.25)
  assert table.splitlines()[-2].split() == ['chance', '25.0']
  pooled = suite.format_suite_table(
    {'a': summary, 'b': summary}, summary, {'a': 0.25, 'b': 0.5, 'pooled': 0.375}
  )
  assert pooled.splitlines()[-2].split() == ['chance', '25.0', '50.0', '37.5']
  lo, hi = (100 * x for x in summary['base']['accuracy_ci95'])
  base_row = next(line.split() for line in pooled.splitlines() if line.startswith('base'))
  assert base_row == [
    'base',
    '100.0',
    '100.0',
    '100.0',
    '100.0',
    f'{lo:.1f}-{hi:.1f}',
    '+0/-0',
    '1',
  ]
  named = suite.format_suite_table({'a': summary}, summary, embedder='MiniLM')
  assert named.splitlines()[-1] == '(neighbours: MiniLM)'


@pytest.mark.slow
def test_random_pathway_draws_a_row_on_the_core_simplex():
  base = jnp.asarray([[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])  # [C, E]
  cs = pw_lib.CoreSlice(base=base, core=jnp.asarray([[0, 1, 2], [0, 1, 3]]))
  keys = jax.random.split(jax.random.key(0), 200)
  trace = jax.vmap(methods.random_pathway, in_axes=(0, None))(keys, cs)
  w = np.asarray(trace.w)  # [200, C, Kc]
  assert np.all(w >= 0) and bool(np.all(trace.finite))
  np.testing.assert_allclose(w.sum(-1), np.broadcast_to(np.asarray(cs.mass), (200, 2)), rtol=1e-5)
  # Uniform on the simplex: each coordinate's mean is mass / Kc, and draws differ.
  np.testing.assert_allclose(
    w.mean(0), np.asarray(cs.mass)[:, None] / 3 * np.ones((2, 3)), atol=0.04
  )
  assert len({tuple(np.round(x.ravel(), 6)) for x in w}) == 200
  again = methods.random_pathway(keys[0], cs)
  np.testing.assert_allclose(again.w, w[0], rtol=1e-6)  # a key gives one draw
  np.testing.assert_allclose(trace.path[:, 0], np.broadcast_to(pw_lib.base_weights(cs), w.shape))
