"""The paper's Table 3 token positions: first / middle / last, 1 or 3 tokens.

With U = 3 tokens the sample's pathway is the mean of their routing rows and
the tokens share it: each keeps its own base row plus the pathway's change.
So the base pathway given back reproduces the base model on every format
and every setting, and a changed pathway moves all U tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.remix import engine, scoring
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from c3po_jax.testing import checkpoints
from models import routing, transformer
from models.families.olmoe import TINY

SPEC = pw_lib.PathwaySpec.make(TINY.num_hidden_layers, TINY.num_experts, 'last:2', 6)
SETTINGS = [(p, c) for p in ('last', 'first', 'middle') for c in (1, 3)]


@pytest.fixture(scope='module')
def model():
  return checkpoints.loud_experts(transformer.init_params(TINY, jax.random.PRNGKey(0)))


# Setup and reference computations run under `jax.jit`: run op by op, JAX compiles
# one program per primitive and shape (hundreds per test). Static settings are
# bound, params and data are arguments (not compile-time constants).
_base_weights = jax.jit(jax.vmap(pw_lib.base_weights))
_normalize_pathway = jax.jit(routing.normalize_pathway)


@jax.jit
def _changed_rows(cs, seq_probs):
  """A changed pathway w [Q, C, Kc], its rows at the 3 tokens, and their change on the core.

  -> (w, rows [Q, S, U, C, E], delta: the rows' change on the core [Q, S, U, C, Kc],
  want: w's change [Q, 1, 1, C, Kc], kept: where the change leaves a core row positive).
  """
  w0 = jax.vmap(pw_lib.base_weights)(cs)
  w = jax.vmap(pw_lib.project_simplex)(w0 + 0.05 * jnp.arange(6.0) / 6, cs.mass)
  anchors = jnp.take(seq_probs, jnp.asarray(SPEC.layers), axis=-2)  # [Q,S,U,C,E]
  rows = jax.vmap(lambda wi, ci, ai: pw_lib.pathway_rows(wi, ci, 'topk', ai))(w, cs, anchors)
  delta = jnp.take_along_axis(rows - anchors, cs.core[:, None, None], axis=-1)  # [Q,S,U,C,Kc]
  want = (w - w0)[:, None, None]
  kept = jnp.take_along_axis(anchors, cs.core[:, None, None], axis=-1) + want > 0
  return w, rows, delta, want, kept


@jax.jit
def _analyze_with_rows(params, batch, rows):
  """`scoring.analyze` with rows [Q, S, U, C, E] as the pathway of the critical layers."""
  flat = {layer: rows[..., i, :] for i, layer in enumerate(SPEC.layers)}  # [Q, S, U, E]
  return scoring.analyze(params, batch, config=TINY, pathway=flat)


def _prompts(fmt, seed=0):
  """Three samples; in rc one has a context per choice (WinoGrande), one a 2-token context."""
  rng = np.random.default_rng(seed)
  tok = lambda n: tuple(int(x) for x in rng.integers(3, TINY.vocab_size, n))
  if fmt == 'mc':
    return [EncodedPrompt(tok(n), ((10,), (11,), (12,)), 1, (1, 1, 1), 'mc') for n in (2, 7, 12)]
  out = [EncodedPrompt(tok(n), (tok(2), tok(1), tok(3)), 0, (2, 1, 3), 'rc') for n in (2, 6, 9)]
  p = out[1]
  out[1] = EncodedPrompt(
    p.context, p.continuations, 2, p.cont_chars, 'rc', (tok(4), tok(5), tok(8))
  )
  return out


def test_sites_of_each_setting():
  p = [EncodedPrompt(tuple(range(3, 13)), ((1,), (2,)), 0, (1, 1), 'mc')]  # 10 tokens
  site = lambda pos, n: np.asarray(scoring.make_batch(p, position=pos, count=n).site)[0, 0]
  assert site('last', 1) == 9 and site('first', 1) == 0 and site('middle', 1) == 4
  assert site('last', 3).tolist() == [7, 8, 9]
  assert site('first', 3).tolist() == [0, 1, 2]
  assert site('middle', 3).tolist() == [3, 4, 5]
  short = [EncodedPrompt((5, 6), ((1,), (2,)), 0, (1, 1), 'mc')]
  got = np.asarray(scoring.make_batch(short, position='last', count=3).site)[0, 0]
  assert got.tolist() == [0, 0, 1]  # clipped to the context


def test_place_rows_puts_each_row_at_its_token():
  x = jnp.zeros((2, 5, 3))
  rows = jnp.arange(18, dtype=jnp.float32).reshape(2, 3, 3) + 1
  out = routing.place_rows(x, jnp.asarray([[0, 2, 4], [1, 1, 3]]), rows)
  np.testing.assert_array_equal(out[0, [0, 2, 4]], rows[0])
  np.testing.assert_array_equal(out[0, [1, 3]], 0)
  np.testing.assert_array_equal(out[1, 1], rows[1, 1])  # named twice: the last row
  np.testing.assert_array_equal(out[1, 3], rows[1, 2])
  one = routing.place_rows(x, jnp.asarray([3, 0]), rows[:, 0])  # [B] index, [B, F] rows
  np.testing.assert_array_equal(one[0, 3], rows[0, 0])
  np.testing.assert_array_equal(one[1, 0], rows[1, 0])


@pytest.mark.slow
@pytest.mark.parametrize('position,count', SETTINGS)
@pytest.mark.parametrize('fmt', ['mc', 'rc'])
@pytest.mark.parametrize('mode', ['topk', 'dense'])
def test_base_pathway_given_back_is_the_base_model(model, fmt, position, count, mode):
  """Every format and setting: the identity pathway (base weights, own anchors) == base."""
  eng = engine.shared(TINY, engine.EngineConfig(spec=SPEC, eval_pathway_mode=mode))
  batch = scoring.make_batch(_prompts(fmt), num_choices=3, position=position, count=count)
  base = eng.analyze(model, batch)
  shape = base.seq_router_probs.shape
  assert shape[2:] == ((count,) if count > 1 else ()) + (TINY.num_hidden_layers, TINY.num_experts)
  cs = eng.core_slices(base.router_probs)
  w0 = _base_weights(cs)
  got = eng.analyze_remixed(model, batch, cs, w0, base.seq_router_probs)
  if mode == 'topk':  # exactly the base model's routing
    np.testing.assert_allclose(got.scores, base.scores, atol=2e-5, rtol=1e-5)
  else:  # dense mixes only the core experts: scores move, but stay finite and valid
    assert np.all(np.isfinite(np.asarray(got.scores)[np.asarray(batch.choice_valid)]))


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['mc', 'rc'])
def test_three_tokens_share_the_change(model, fmt):
  """A changed pathway moves every one of the 3 tokens' routing by the same core change."""
  eng = engine.shared(TINY, engine.EngineConfig(spec=SPEC))
  batch = scoring.make_batch(_prompts(fmt), num_choices=3, position='last', count=3)
  base = eng.analyze(model, batch)
  cs = eng.core_slices(base.router_probs)
  w, rows, delta, want, kept = _changed_rows(cs, base.seq_router_probs)
  np.testing.assert_allclose(jnp.where(kept, delta, 0), jnp.where(kept, want, 0), atol=1e-6)
  moved = eng.analyze_remixed(model, batch, cs, w, base.seq_router_probs)
  assert not np.allclose(moved.scores, base.scores, atol=1e-4)
  # The pathway enters at all three tokens: the routing the pass reports there is the rows'.
  an = _analyze_with_rows(model, batch, rows)
  for i, layer in enumerate(SPEC.layers):
    used = an.seq_router_probs[..., layer, :]  # [Q, S, U, E]
    np.testing.assert_allclose(used, _normalize_pathway(rows[..., i, :]), atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('benchmark,fmt', [('arc_challenge', 'mc'), ('winogrande', 'rc')])
def test_three_token_run_end_to_end(tiny_checkpoint, tmp_path, benchmark, fmt):
  """--token_count=3 through the pipeline: identity == base per choice, NGD and oracle run."""
  from c3po_jax.run import pipeline, results
  from c3po_jax.run.config import RunConfig

  rc = RunConfig.make(
    checkpoint_dir=tiny_checkpoint,
    benchmark=benchmark,
    reference=('openbookqa',),
    methods=('base', 'kernel_regression', 'ngd', 'oracle'),
    fmt=fmt,
    token_count=3,
    kr_alpha=1.0,
    ngd_steps=2,
    lr=0.1,
    max_test_samples=3,
    max_reference_samples=16,
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
  assert len(rows) == 12
  for i in ids:
    np.testing.assert_allclose(
      by['kernel_regression', i]['choice_scores'], by['base', i]['choice_scores'], atol=2e-4
    )
    for method in ('ngd', 'oracle'):
      r = by[method, i]
      # The naive backend scores the final pathway only (no per-step accuracy off the window).
      assert 'fallback' not in r and len(r['losses']) == 3 and 'step_correct' not in r
      assert np.isfinite(r['loss_before']) and np.isfinite(r['loss_after'])
