"""Faithful re-mixing: the weights parameterization, dense mixing over the core,
alpha on the evaluation-mode loss, per-sequence routing, the layer grammar."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from c3po_jax.remix import engine, methods, scoring
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from c3po_jax.testing import checkpoints
from models import dispatch as moe_lib
from models import params as params_lib
from models import transformer
from models.families.olmoe import TINY
from models.nn import layers

L, E = TINY.num_hidden_layers, TINY.num_experts


def test_critical_layers_count_moe_layers_only():
  moe = (1, 2, 3)  # layer 0 dense, as in DeepSeekMoE
  assert pw_lib.parse_layers('last:3', 4, moe) == (1, 2, 3)
  assert pw_lib.parse_layers('last:2', 4, moe) == (2, 3)
  with pytest.raises(ValueError, match='MoE layers'):
    pw_lib.parse_layers('last:4', 4, moe)
  with pytest.raises(ValueError, match='dense'):
    pw_lib.parse_layers('0,3', 4, moe)


def test_parse_layers_grammar():
  assert pw_lib.parse_layers('last:5', 16) == (11, 12, 13, 14, 15)
  assert pw_lib.parse_layers('7', 16) == (7,)  # one layer, not "the last 7"
  assert pw_lib.parse_layers('0,7,15', 16) == (0, 7, 15)
  assert pw_lib.parse_layers('15, -16', 16) == (0, 15)
  assert pw_lib.parse_layers((3, 1), 16) == (1, 3)
  for bad in ('last:0', 'last:17', '16', 'a,b', 'last:x', ''):
    with pytest.raises(ValueError):
      pw_lib.parse_layers(bad, 16)
  with pytest.raises(TypeError, match='last:5'):
    pw_lib.parse_layers(5, 16)


def test_project_simplex_is_the_closest_valid_point():
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(0.1, 0.3, (64, 6)), jnp.float32)
  mass = jnp.asarray(rng.uniform(0.2, 1.0, (64,)), jnp.float32)
  w = pw_lib.project_simplex(v, mass)
  assert float(jnp.min(w)) >= 0.0
  np.testing.assert_allclose(jnp.sum(w, -1), mass, rtol=1e-5)
  np.testing.assert_allclose(pw_lib.project_simplex(w, mass), w, atol=1e-6)  # idempotent
  # No random valid point is closer (it is the Euclidean projection).
  cand = rng.dirichlet(np.ones(6), size=(2000, 64)) * np.asarray(mass)[None, :, None]
  d_proj = np.sum((np.asarray(w) - np.asarray(v)) ** 2, -1)
  d_cand = np.sum((cand - np.asarray(v)[None]) ** 2, -1).min(0)
  assert np.all(d_proj <= d_cand + 1e-6)
  # A point already valid is left as it is.
  inside = jnp.asarray([[0.1, 0.2, 0.3]])
  np.testing.assert_allclose(pw_lib.project_simplex(inside, jnp.asarray([0.6])), inside, atol=1e-7)


def _router_row(rng, e=64):
  """A router-like probability row: a few large, a long tail."""
  return jax.nn.softmax(jnp.asarray(rng.normal(0, 1.5, e), jnp.float32))


@pytest.mark.slow
@pytest.mark.parametrize('param,enters', [('weights', True), ('logits', False)])
def test_paper_lr_moves_an_expert_into_the_top8_only_with_weights(param, enters):
  """The issue's simulation: a perfectly consistent gradient towards expert #12.

  At the paper's settings (Adam, cosine 1e-2 -> 1e-5, 10 steps) the weights
  parameterization brings the 12th-ranked expert into the top-8; on logits
  each weight stays within about x[0.89, 1.12] and it does not get in.
  """
  rng = np.random.default_rng(1)
  base = _router_row(rng)[None]  # [C=1, E]
  spec = pw_lib.PathwaySpec(layers=(0,), num_core=20)
  cs = pw_lib.core_slice(base, spec)
  target = int(cs.core[0, 11])  # ranked 12th
  loss_fn = lambda w, cs, d, wt, a=None: -pw_lib.pathway_rows(w, cs)[0, target]
  mc = methods.MethodConfig(pathway_param=param)
  trace = methods.ngd(loss_fn, cs, None, jnp.ones(1), pw_lib.base_weights(cs), mc)
  top8 = set(np.asarray(jax.lax.top_k(pw_lib.pathway_rows(trace.w, cs)[0], 8)[1]).tolist())
  assert (target in top8) == enters
  np.testing.assert_allclose(jnp.sum(trace.w), cs.mass[0], rtol=1e-5)  # mass kept
  assert float(jnp.min(trace.w)) >= 0.0
  assert float(pw_lib.topk_change(trace.w, cs, 8)[0]) == (0.125 if enters else 0.0)


def test_ngd_weights_step_is_a_projected_adam_step():
  cs = pw_lib.CoreSlice(base=jnp.asarray([[0.5, 0.3, 0.15, 0.05]]), core=jnp.asarray([[0, 1, 2]]))
  g = jnp.asarray([[1.0, -2.0, 0.5]])
  loss_fn = lambda w, cs, d, wt, a=None: jnp.sum(g * w)
  mc = methods.MethodConfig(ngd_steps=1, lr=0.1, lr_end=0.1)
  trace = methods.ngd(loss_fn, cs, None, jnp.ones(1), pw_lib.base_weights(cs), mc)
  w0 = pw_lib.base_weights(cs)
  want = pw_lib.project_simplex(w0 - 0.1 * jnp.sign(g), cs.mass)  # Adam's first step: lr * sign
  np.testing.assert_allclose(trace.w, want, atol=1e-5)
  np.testing.assert_allclose(trace.path[0], w0)
  np.testing.assert_allclose(trace.path[-1], trace.w)


@functools.cache
def _model():
  """Random tiny model with experts scaled up so that routing moves logits."""
  return checkpoints.loud_experts(transformer.init_params(TINY, jax.random.PRNGKey(0)))


# Setup and reference computations run under `jax.jit`: run op by op, JAX compiles
# one program per primitive and shape (hundreds per test). Static settings are
# bound, params and data are arguments (not compile-time constants).
_forward = jax.jit(transformer.forward, static_argnames='config')
_forward_hidden = jax.jit(transformer.forward_hidden, static_argnames=('config', 'pathway_mode'))
_analyze = jax.jit(scoring.analyze, static_argnames=('config', 'pathway_mode'))
_base_weights = jax.jit(jax.vmap(pw_lib.base_weights))


@pytest.mark.slow
def test_dense_mode_mixes_exactly_the_given_core():
  params = _model()
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, (2, 9)), jnp.int32)
  core = [1, 4, 6]
  w = np.zeros((2, E), np.float32)
  w[:, core] = [[0.3, 0.2, 0.1], [0.05, 0.5, 0.25]]  # sums below 1: used as given
  layer = L - 1
  out = _forward_hidden(
    params, tokens, config=TINY, pathway={layer: jnp.asarray(w)}, pathway_mode='dense'
  )
  plain = _forward_hidden(params, tokens, config=TINY)
  want = _dense_last_layer_by_hand(layer, params, tokens, jnp.asarray(w))
  np.testing.assert_allclose(out.hidden[:, -1], want, atol=2e-5)
  np.testing.assert_allclose(out.hidden[:, :-1], plain.hidden[:, :-1], atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _dense_last_layer_by_hand(layer, params, tokens, w):
  """The last position's final hidden state [B, D], `layer` (the last) re-run by hand
  with its expert mix w [B, E]: its input is unchanged (no earlier pathway)."""
  model = params_lib.bind(params, TINY)
  m = model.layer(layer)
  x = _layer_input(model, tokens, layer)
  h_attn = x + _attn(m, x)
  h = m.post_attn_norm(h_attn)[:, -1]
  y = moe_lib.expert_outputs(h, params[f'layer_{layer}']['moe']['experts'])  # [B, E, D]
  want_last = h_attn[:, -1] + jnp.einsum('bed,be->bd', y, w)
  return model.final_norm(want_last)


def _layer_input(model, tokens, layer):
  """Residual stream entering `layer` (native routing)."""
  b, t = tokens.shape
  mask = jnp.ones((b, t), jnp.int32)
  x = model.embed(tokens)
  for i in range(layer):
    x, *_ = model.layer(i)(
      x,
      positions=transformer.positions_from_mask(mask),
      query_slots=jnp.broadcast_to(jnp.arange(t), (b, t)),
      key_valid=mask.astype(bool),
      last_index=jnp.full((b,), t - 1),
    )
  return x


def _attn(m, x):
  b, t, _ = x.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  q, k, v = m.attn.qkv(m.input_norm(x), pos)
  return m.attn.out(layers.attend(q, k, v, pos, jnp.ones((b, t), bool)))


def test_dense_rows_put_the_core_weights_and_nothing_else():
  base = jax.nn.softmax(jnp.asarray(np.random.default_rng(3).normal(size=(2, E)), jnp.float32))
  spec = pw_lib.PathwaySpec(layers=(0, 1), num_core=3)
  cs = pw_lib.core_slice(base, spec)
  w = pw_lib.base_weights(cs) * 1.0
  dense = pw_lib.pathway_rows(w, cs, 'dense')
  topk = pw_lib.pathway_rows(w, cs, 'topk')
  assert int(jnp.sum(dense > 0)) == 2 * 3
  np.testing.assert_array_equal(topk, base)  # identity: exactly the router's row
  np.testing.assert_array_equal(jnp.take_along_axis(dense, cs.core, -1), w)


def _prompts(rng, n, fmt, per_choice=False, choices=3):
  out = []
  tok = lambda m: tuple(int(x) for x in rng.integers(3, TINY.vocab_size, m))
  for _ in range(n):
    ctx = tok(int(rng.integers(4, 12)))
    if fmt == 'mc':
      conts = tuple((10 + c,) for c in range(choices))
    else:
      conts = tuple(tok(int(rng.integers(1, 4))) for _ in range(choices))
    contexts = tuple(tok(int(rng.integers(4, 12))) for _ in range(choices)) if per_choice else None
    gold = int(rng.integers(choices))
    out.append(EncodedPrompt(ctx, conts, gold, (1,) * choices, fmt, contexts))
  return out


def _engine(**ec):
  spec = pw_lib.PathwaySpec.make(L, E, 'last:2', 6)
  return engine.shared(TINY, engine.EngineConfig(spec=spec, **ec))


@pytest.mark.slow
@pytest.mark.parametrize('fmt,per_choice', [('mc', False), ('rc', False), ('rc', True)])
def test_identity_pathway_reproduces_base_scores_in_every_format(fmt, per_choice):
  """Kernel regression with alpha = 1 (the identity pathway) == base, per choice."""
  params = _model()
  eng = engine.shared(
    TINY,
    engine.EngineConfig(
      spec=pw_lib.PathwaySpec.make(L, E, 'last:2', 6), method=methods.MethodConfig(kr_alpha=1.0)
    ),
  )
  rng = np.random.default_rng(4)
  test = scoring.make_batch(_prompts(rng, 4, fmt, per_choice), num_choices=3)
  base = eng.analyze(params, test)
  if per_choice:  # the contexts do route differently: the check can fail
    assert float(jnp.max(jnp.abs(base.seq_router_probs[:, 1] - base.seq_router_probs[:, 0]))) > 1e-3
  cs = eng.core_slices(base.router_probs)
  nb = jax.tree.map(lambda x: x[:, None], test)  # any neighbours: alpha = 1 ignores them
  w_nb = eng.neighbour_weights(cs, base.router_probs[:, None])
  out = eng.kernel_regression(params, cs, eng.prepare(params, nb), jnp.ones((4, 1)), w_nb)
  same = eng.analyze_remixed(params, test, cs, out.trace.w, base.seq_router_probs)
  np.testing.assert_allclose(same.scores, base.scores, atol=1e-5, rtol=0)
  assert float(jnp.max(out.topk_new)) == 0.0 and float(jnp.max(out.mean_abs_delta)) == 0.0
  # Sequence 0's rows for every choice (the old behaviour) do shift the scores.
  if per_choice:
    rows = _sequence0_rows(cs)
    pathway = {layer: rows[:, i] for i, layer in enumerate(eng.ec.spec.layers)}
    old = _analyze(params, test, config=TINY, pathway=pathway)
    assert float(jnp.max(jnp.abs(old.scores[:, 1:] - base.scores[:, 1:]))) > 1e-3


_sequence0_rows = jax.jit(jax.vmap(lambda c: pw_lib.pathway_rows(pw_lib.base_weights(c), c)))


@pytest.mark.slow
def test_kr_alpha_one_grid_loss_is_the_base_models_loss():
  """With the test samples as their own neighbours, alpha = 1 scores the plain model."""
  params = _model()
  eng = _engine(loss='choice_ce')
  rng = np.random.default_rng(5)
  test = scoring.make_batch(_prompts(rng, 3, 'mc'), num_choices=3)
  base = eng.analyze(params, test)
  cs = eng.core_slices(base.router_probs)
  data = eng.prepare(params, jax.tree.map(lambda x: x[:, None], test))
  w_nb = eng.neighbour_weights(cs, base.router_probs[:, None] * 0.5)
  out = eng.kernel_regression(params, cs, data, jnp.ones((3, 1)), w_nb)
  want = scoring.choice_loss(base.scores, test.gold, test.choice_valid, 'choice_ce')
  np.testing.assert_allclose(out.trace.losses[:, -1], want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_oracle_with_per_choice_contexts_starts_at_the_base_loss():
  """The oracle scores each of the sample's sequences with its own rows."""
  params = _model()
  eng = _engine(loss='choice_ce', opt_pathway_mode='topk')
  rng = np.random.default_rng(6)
  test = scoring.make_batch(_prompts(rng, 3, 'rc', per_choice=True), num_choices=3)
  base = eng.analyze(params, test)
  cs = eng.core_slices(base.router_probs)
  data = eng.prepare(params, jax.tree.map(lambda x: x[:, None], test))
  out = eng.oracle(params, cs, data, base.seq_router_probs)
  want = scoring.choice_loss(base.scores, test.gold, test.choice_valid, 'choice_ce')
  np.testing.assert_allclose(out.trace.losses[:, 0], want, atol=1e-5, rtol=0)
  # The accuracy-after-each-step path starts at base and ends at the final pathway.
  tests = eng.prepare_tests(params, test)
  path = eng.path_scores(params, cs, tests, base.seq_router_probs, out.trace.path)
  after = eng.analyze_remixed(params, test, cs, out.trace.w, base.seq_router_probs)
  np.testing.assert_allclose(path[:, 0], base.scores, atol=1e-4, rtol=0)
  np.testing.assert_allclose(path[:, -1], after.scores, atol=1e-4, rtol=0)


def test_optax_schedule_sum_matches_the_docstring():
  """The paper's cosine 1e-2 -> 1e-5 over 10 steps: the learning rates sum to ~0.055."""
  sched = optax.cosine_decay_schedule(1e-2, decay_steps=10, alpha=1e-3)
  assert abs(sum(float(sched(i)) for i in range(10)) - 0.055) < 1e-3


def test_reference_bandwidth_is_the_median_neighbourhood_spread():
  from c3po_jax.neighbours import kernels
  from c3po_jax.neighbours import search as neighbours

  rng = np.random.default_rng(7)
  centres = rng.normal(size=(6, 16))
  emb = neighbours.unit(np.repeat(centres, 20, axis=0) + 0.3 * rng.normal(size=(120, 16)))
  sigma = kernels.reference_bandwidth(emb, k=3, max_similarity=0.999)
  # Brute force: each reference's 3 nearest others, spread of squared distances.
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  top = -np.sort(-sim, axis=1)[:, :3]
  spread = (2 - 2 * top[:, 2]) - (2 - 2 * top[:, 0])
  np.testing.assert_allclose(sigma**2, np.median(spread), rtol=1e-4)
  # A neighbourhood spread like the median one: the k-th neighbour weighs
  # exp(-1/2) of the nearest under the Gaussian kernel; linear stays ~uniform.
  d2 = np.array([0.0, 0.5, 1.0]) * sigma**2 + 0.14
  sims = 1 - d2[None] / 2
  valid = np.ones((1, 3), bool)
  g = kernels.kernel_weights(sims, valid, kind='gaussian', sigma=sigma)[0]
  lin = kernels.kernel_weights(sims, valid, kind='linear')[0]
  np.testing.assert_allclose(g[2] / g[0], np.exp(-0.5), rtol=1e-4)
  assert lin[2] / lin[0] > 0.95
  # The old per-sample median rule is near uniform on the example.
  old = kernels.kernel_weights(np.array([[0.93, 0.92, 0.90]]), valid, sigma='median')[0]
  assert old[2] / old[0] > 0.8


def test_epsilon_ball_is_not_capped_at_k():
  from c3po_jax.neighbours import search as neighbours

  refs = neighbours.unit(np.array([[1, 0.1 * i] for i in range(10)], np.float32))
  query = np.array([[1.0, 0.05]], np.float32)
  ball = neighbours.find(query, refs, k=3, epsilon=0.05, max_similarity=1.0)
  d = 1 - (neighbours.unit(query) @ refs.T)[0]
  assert int(ball.valid.sum()) == int((d <= 0.05).sum()) > 3
  capped = neighbours.find(query, refs, k=3, epsilon=0.05, max_similarity=1.0, ball_cap=4)
  assert int(capped.valid.sum()) == 4


@pytest.mark.slow
@pytest.mark.parametrize('position', ['first', 'middle'])
def test_token_position_moves_the_pathway_site(position):
  """The re-mixed token (Table 3): routing is read and overridden there only."""
  params = _model()
  rng = np.random.default_rng(8)
  prompts = _prompts(rng, 3, 'rc', per_choice=True)
  last = scoring.make_batch(prompts, num_choices=3)
  batch = scoring.make_batch(prompts, num_choices=3, position=position)
  n_ctx = np.asarray(last.ctx_last) + 1
  want_site = np.zeros_like(n_ctx) if position == 'first' else (n_ctx - 1) // 2
  np.testing.assert_array_equal(batch.site, want_site)
  an = _analyze(params, batch, config=TINY)
  plain = _forward(params, batch.tokens[:, 0], config=TINY, attention_mask=batch.mask[:, 0])
  site0 = np.asarray(batch.site[:, 0])
  want = np.swapaxes(np.asarray(plain.router_probs), 0, 1)[np.arange(3), :, site0]  # [B, L, E]
  np.testing.assert_allclose(an.router_probs, want, atol=1e-6)
  # A pathway at the site changes the scores; at identity they stay.
  eng = engine.shared(TINY, engine.EngineConfig(spec=pw_lib.PathwaySpec.make(L, E, 'last:2', 6)))
  cs = eng.core_slices(an.router_probs)
  w0 = _base_weights(cs)
  same = eng.analyze_remixed(params, batch, cs, w0, an.seq_router_probs)
  np.testing.assert_allclose(same.scores, an.scores, atol=1e-5)
  flipped = _flipped(w0, cs)
  moved = eng.analyze_remixed(params, batch, cs, flipped, an.seq_router_probs)
  assert float(jnp.max(jnp.abs(moved.scores - an.scores))) > 1e-3


_flipped = jax.jit(jax.vmap(lambda w, c: pw_lib.project_simplex(w[:, ::-1], c.mass)))


def test_diagnostics_summary_from_rows():
  from c3po_jax.remix import diagnostics

  pathway = {'layers': [0], 'core': [[0]], 'before': [[1.0]], 'after': [[1.0]]}
  rows = [
    {'method': 'base', 'id': 'a'},
    {
      'method': 'ngd',
      'id': 'a',
      'pathway': pathway,
      'losses': [1.0, 0.5, 0.25],
      'loss_before': 1.0,
      'loss_after': 0.25,
      'topk_new': 0.5,
      'mean_abs_delta': 0.02,
      'step_correct': [False, True, True],
    },
    {
      'method': 'ngd',
      'id': 'b',
      'pathway': pathway,
      'losses': [2.0, 1.5, 1.0],
      'loss_before': 2.0,
      'loss_after': 1.0,
      'topk_new': 0.0,
      'mean_abs_delta': 0.04,
      'step_correct': [True, True, False],
    },
  ]
  d = diagnostics.summarize(rows)
  assert set(d) == {'ngd'}
  ngd = d['ngd']
  assert ngd['n'] == 2 and ngd['loss_before'] == 1.5 and ngd['loss_after'] == 0.625
  assert ngd['topk_new'] == 0.25 and abs(ngd['mean_abs_delta'] - 0.03) < 1e-9
  assert ngd['step_accuracy'] == [0.5, 1.0, 0.5] and ngd['step_loss'] == [1.5, 1.0, 0.625]
  table = diagnostics.format_table(d)
  assert '25.0%' in table and '50.0 100.0 50.0' in table
