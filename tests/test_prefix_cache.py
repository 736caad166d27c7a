"""The prefix-cached neighbour loss equals the naive full-forward one.

Loss and gradient w.r.t. the core distribution q are compared with
`losses.NaiveLoss` on a tiny random 4-layer model, for both prompt formats,
both pathway modes, both loss kinds, contiguous and non-contiguous critical
layers, and neighbours of different lengths (padded, one left-truncated).
Then: padded or cut states, the per-reference LRU cache, and the batched
engine against per-sample runs without recompiling.

Dimensions: Q test samples, N neighbours, C critical layers, Kc core experts,
L layers, E experts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.remix import engine, losses, methods, scoring, state_cache
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from models import transformer
from models.families.olmoe import TINY

CONFIG = TINY.replace(num_hidden_layers=4)
L, E = CONFIG.num_hidden_layers, CONFIG.num_experts
NUM_CORE = 5
MAX_LEN = 20  # the longest neighbour context (25 tokens) is left-truncated
TOL = 1e-5


@functools.cache
def _params():
  """Random params, large enough that routing and the pathway move the loss."""
  params = transformer.init_params(CONFIG, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))

  def draw(p):
    noise = jax.random.normal(next(keys), p.shape, p.dtype)
    return 1.0 + 0.1 * noise if p.ndim == 1 else 0.2 * noise

  return jax.tree.map(draw, params)


# Reference computations run under `jax.jit`: run op by op, JAX compiles one
# program per primitive and shape (hundreds per test). Static settings are
# bound, params and data are arguments (not compile-time constants).
_analyze = jax.jit(functools.partial(scoring.analyze, config=CONFIG))
_prepare_prefix = jax.jit(losses.prepare_prefix, static_argnums=(1, 2))
_analyze_and_prepare = jax.jit(losses.analyze_and_prepare, static_argnums=(1, 2))
_fit = jax.jit(losses.fit, static_argnums=(1, 2))
_base_weights = jax.jit(jax.vmap(pw_lib.base_weights))
_stack = jax.jit(lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees))
_take = jax.jit(lambda tree, rows: jax.tree.map(lambda x: x[rows], tree))


def _prompts(fmt: str, seed: int = 0) -> list[EncodedPrompt]:
  """Three neighbours of different lengths; one has fewer choices (mc)."""
  rng = np.random.default_rng(seed)
  tok = lambda n: tuple(int(x) for x in rng.integers(3, CONFIG.vocab_size, n))
  if fmt == 'mc':
    shapes = [(5, 4, 1), (12, 3, 2), (25, 4, 0)]  # (context length, choices, gold)
    return [
      EncodedPrompt(tok(n), tuple((t,) for t in tok(c)), g, (1,) * c, 'mc') for n, c, g in shapes
    ]
  shapes = [(5, (1, 3, 2), 1), (9, (2, 2, 1), 0), (25, (3, 1, 1), 2)]
  out = [EncodedPrompt(tok(n), tuple(tok(m) for m in ms), g, ms, 'rc') for n, ms, g in shapes]
  # WinoGrande-style: one context per choice, of different lengths.
  p = out[1]
  out[1] = EncodedPrompt(
    p.context, p.continuations, p.gold, p.cont_chars, 'rc', (tok(4), tok(7), tok(11))
  )
  return out


def _batch(fmt: str, seed: int = 0) -> scoring.ChoiceBatch:
  """[N, S, T] neighbour batch."""
  return scoring.make_batch(
    _prompts(fmt, seed), num_choices=4 if fmt == 'mc' else 3, max_len=MAX_LEN
  )


def _slice(layers, seed=1):
  """A random base routing, its core slice, and core weights away from the base."""
  spec = pw_lib.PathwaySpec.make(L, E, layers, NUM_CORE)
  base = jax.nn.softmax(2.0 * jax.random.normal(jax.random.key(seed), (L, E)), axis=-1)
  cs = pw_lib.core_slice(base, spec)
  q = jax.nn.softmax(
    jax.random.normal(jax.random.key(seed + 1), (len(spec.layers), NUM_CORE)), axis=-1
  )
  return spec, cs, q * cs.mass[:, None]


WEIGHTS = jnp.asarray([0.5, 0.3, 0.2], jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _value_and_grads(spec, mode, kinds, params, data, cs, q):
  """{(backend, loss kind): (loss, dloss/dq)} for both backends."""
  out, states = {}, {}
  for kind in kinds:
    ec = engine.EngineConfig(spec=spec, loss=kind, opt_pathway_mode=mode)
    for name, backend in losses.BACKENDS.items():
      states[name] = backend.prepare(params, CONFIG, ec, data)
      loss_fn = backend.make_loss(params, CONFIG, ec)
      out[name, kind] = jax.value_and_grad(loss_fn)(q, cs, states[name], WEIGHTS)
  return out, states['prefix']


@pytest.mark.parametrize(
  'fmt,mode,layers,kinds',
  [
    ('mc', 'dense', (1, 3), engine.LOSS_KINDS),  # layer 2 runs natively in between
    ('rc', 'topk', (1, 3), engine.LOSS_KINDS),
    ('mc', 'topk', (0, 2), ('choice_ce',)),  # from the embeddings on
    ('rc', 'dense', (2, 3), ('gold_nll',)),
  ],
)
@pytest.mark.slow
def test_prefix_loss_and_grad_equal_naive(fmt, mode, layers, kinds):
  spec, cs, q = _slice(layers)
  data = _batch(fmt)
  out, state = _value_and_grads(spec, mode, kinds, _params(), data, cs, q)
  for kind in kinds:
    naive_loss, naive_grad = out['naive', kind]
    loss, grad = out['prefix', kind]
    assert np.isfinite(naive_loss) and float(jnp.max(jnp.abs(naive_grad))) > 1e-3  # not vacuous
    np.testing.assert_allclose(loss, naive_loss, atol=TOL, rtol=0, err_msg=kind)
    np.testing.assert_allclose(grad, naive_grad, atol=TOL, rtol=0, err_msg=kind)
  n, s, t = data.tokens.shape
  assert all(leaf.shape[0] == n for leaf in jax.tree.leaves(state))
  lc = L - min(layers)  # layers from the first critical one on
  assert state.window.k.shape == (n, s, lc, t, CONFIG.num_key_value_heads, CONFIG.head_dim)
  assert state.window.x.shape == (n, s, data.cont_pos.shape[-1], CONFIG.hidden_size)


@functools.cache
def _engine():
  spec = pw_lib.PathwaySpec.make(L, E, (1, 3), NUM_CORE)
  mc = methods.MethodConfig(ngd_steps=3, lr=0.1, lr_end=0.01, alpha_grid=5)
  ec = engine.EngineConfig(spec=spec, method=mc, loss='gold_nll')
  return engine.shared(CONFIG, ec)


def _own_state(eng, prompt, kw):
  """One prompt's state [1, ...] at its own buckets, prepared alone."""
  return _prepare_one(eng, _params(), scoring.make_batch([prompt], **kw))


@functools.partial(jax.jit, static_argnums=0)
def _prepare_one(eng, params, data):
  """eng.prepare of one neighbour batch [N, ...] (as Q = 1) -> state [N, ...]."""
  return jax.tree.map(lambda x: x[0], eng.prepare(params, jax.tree.map(lambda x: x[None], data)))


@functools.partial(jax.jit, static_argnums=0)
def _prefix_loss(ec, params, q, cs, state, weights):
  return losses.PrefixLoss.make_loss(params, CONFIG, ec)(q, cs, state, weights)


@pytest.mark.slow
def test_state_cache_pads_cuts_and_evicts():
  eng = _engine()
  prompts = _prompts('rc') + _prompts('rc', seed=5)[:1]  # 16- and 32-token buckets
  kw = dict(num_choices=3, max_len=MAX_LEN)
  sizes = [state_cache.nbytes(_own_state(eng, p, kw)) for p in prompts]
  assert len(set(sizes)) > 1  # a byte bound, not a count: states differ in size
  bound = sizes[0] + sizes[2] + sizes[3]  # room for the three used last
  cache = state_cache.StateCache(eng.prepare, _fit, max_bytes=bound)
  order = [0, 1, 2, 0, 3, 0]  # two test samples' neighbours; reference 0 recurs
  got = cache.states(_params(), [('r', i) for i in order], [prompts[i] for i in order], **kw)
  assert (cache.misses, cache.hits, len(cache)) == (4, 2, 3)
  assert cache.device_bytes == bound
  assert ('r', 1) not in cache and all(('r', i) in cache for i in (0, 2, 3))  # LRU went
  # Reference: the four prepared together, at the batch's buckets.
  direct = _prepare_one(eng, _params(), scoring.make_batch(prompts, **kw))
  want = _take(direct, np.asarray(order))
  assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
  _, cs, q = _slice((1, 3))
  loss_fn = functools.partial(_prefix_loss, eng.ec, _params())
  w = jnp.linspace(0.5, 1.0, len(order))
  np.testing.assert_allclose(loss_fn(q, cs, got, w), loss_fn(q, cs, want, w), atol=TOL, rtol=0)
  # Cutting slots that hold real tokens does change it (the check can fail).
  cut = _fit(_fit(want, 16, 1), 32, 4)
  assert abs(float(loss_fn(q, cs, cut, w) - loss_fn(q, cs, want, w))) > 1e-3


def _engine_problem(seed, q=3):
  """Q mc test samples, each with 3 neighbours, kernel weights and a core slice."""
  rng = np.random.default_rng(seed)
  seeds = rng.integers(1 << 30, size=q)
  nb = _stack([_batch('mc', int(s)) for s in seeds])  # [Q, N, ...]
  cs = _stack([_slice((1, 3), int(s))[1] for s in seeds])
  w = jnp.asarray(rng.uniform(0.1, 1.0, (q, 3)), jnp.float32)
  return nb, cs, w


@pytest.mark.slow
def test_batched_ngd_equals_per_sample_and_compiles_once():
  eng = _engine()
  assert eng.loss_backend is losses.PrefixLoss  # the default
  nb, cs, w = _engine_problem(seed=0)
  batched = eng.ngd(_params(), cs, eng.prepare(_params(), nb), w)
  sizes = eng.ngd._cache_size(), eng.prepare._cache_size()
  for i in range(3):
    alone = lambda x, i=i: jnp.repeat(x[i : i + 1], 3, axis=0)  # only sample i in the batch
    single = eng.ngd(
      _params(), jax.tree.map(alone, cs), eng.prepare(_params(), jax.tree.map(alone, nb)), alone(w)
    )
    np.testing.assert_allclose(single.trace.w[0], batched.trace.w[i], atol=TOL, rtol=0)
    np.testing.assert_allclose(single.trace.losses[0], batched.trace.losses[i], atol=TOL, rtol=0)
  nb2, cs2, w2 = _engine_problem(seed=1)  # other samples, same buckets
  eng.ngd(_params(), cs2, eng.prepare(_params(), nb2), w2)
  assert (eng.ngd._cache_size(), eng.prepare._cache_size()) == sizes


@pytest.mark.slow
def test_kernel_regression_chooses_alpha_on_the_evaluation_mode_loss():
  eng = _engine()
  assert (eng.ec.opt_pathway_mode, eng.ec.eval_pathway_mode) == ('dense', 'topk')
  nb, cs, w = _engine_problem(seed=0)
  data = eng.prepare(_params(), nb)
  w_nb = jax.nn.softmax(jax.random.normal(jax.random.key(7), (3, 3, 2, NUM_CORE)), axis=-1)
  kr = eng.kernel_regression(_params(), cs, data, w, w_nb).trace
  # The alpha grid's last point (alpha = 1) is the base pathway, scored in
  # top-k mode as the result will be evaluated: the naive top-k forward.
  w0 = _base_weights(cs)
  want = _naive_losses(eng.ec, 'topk', _params(), cs, nb, w, w0)
  np.testing.assert_allclose(kr.losses[:, -1], want, atol=TOL, rtol=0)
  # ... which is not NGD's dense starting loss.
  ngd = eng.ngd(_params(), cs, data, w).trace
  assert float(jnp.max(jnp.abs(ngd.losses[:, 0] - kr.losses[:, -1]))) > 1e-4


@functools.partial(jax.jit, static_argnums=(0, 1))
def _naive_losses(ec, mode, params, cs, nb, weights, w):
  """NaiveLoss in `mode` of Q samples [Q, ...] at their core weights w [Q, C, Kc]."""
  naive = losses.NaiveLoss.make_loss(params, CONFIG, ec, mode)
  return jax.vmap(lambda c, d, wt, x: naive(x, c, d, wt))(cs, nb, weights, w)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _anchored_scores(name, ec, mode, params, w, cs, data, anchors):
  """A loss backend's anchored scores [N, C] in `mode`, from its own state."""
  backend = losses.BACKENDS[name]
  state = backend.prepare(params, CONFIG, ec, data)
  return backend.make_scores(params, CONFIG, ec, mode)(w, cs, state, anchors)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
def test_anchored_scores_equal_naive(mode):
  """Per-sequence anchors (a sample's own rows, per-choice contexts) on both backends."""
  spec, cs, w = _slice((1, 3))
  data = _batch('rc')  # prompt 1 has one context per choice
  ec = engine.EngineConfig(spec=spec, opt_pathway_mode=mode)
  an = _analyze(_params(), data)
  anchors = an.seq_router_probs[:, :, jnp.asarray(spec.layers)]  # [N, S, C, E]
  got = {
    name: _anchored_scores(name, ec, mode, _params(), w, cs, data, anchors)
    for name in losses.BACKENDS
  }
  np.testing.assert_allclose(got['prefix'], got['naive'], atol=TOL, rtol=0)


def _assert_trees_close(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_store_spills_to_host_then_disk_and_reads_back(tmp_path):
  eng = _engine()
  kw = dict(num_choices=3, max_len=MAX_LEN)
  prompts = _prompts('rc')
  states = [_own_state(eng, p, kw) for p in prompts]
  size = max(state_cache.nbytes(x) for x in states)
  store = state_cache.StateCache(
    eng.prepare, losses.fit, size, host_bytes=size, spill_dir=str(tmp_path), namespace='m'
  )
  for i, x in enumerate(states):  # 0 -> host -> disk, 1 -> host, 2 on the device
    store.put(('r', i), x)
  assert store.spilled == 1 and len(list(tmp_path.iterdir())) == 1
  for i in (0, 1, 2):  # read back from each tier, equal; nothing recomputed
    _assert_trees_close(store.get(('r', i)), states[i])
  got = store.states(_params(), [('r', 2), ('r', 0)], [prompts[2], prompts[0]], **kw)
  assert store.misses == 0
  assert got.window.k.shape[0] == 2
  # Another namespace (another model or layer split) never reads these files.
  other = state_cache.StateCache(eng.prepare, losses.fit, size, spill_dir=str(tmp_path))
  other.put(('r', 1), states[1])
  assert other.get(('r', 0)) is None


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['mc', 'rc'])
def test_base_pass_states_equal_fresh_states_and_analysis(fmt):
  """The base pass's analysis and prefix states == `scoring.analyze` and `prepare_prefix`."""
  data = _batch(fmt)
  an, st = jax.jit(functools.partial(losses.analyze_and_prepare, config=CONFIG, first_layer=1))(
    _params(), data=data
  )
  _assert_trees_close(an, _analyze(_params(), data))
  _assert_trees_close(st, _prepare_prefix(_params(), CONFIG, 1, data))
  # first_layer = 0: every layer's keys are kept.
  an0, st0 = _analyze_and_prepare(_params(), CONFIG, 0, data)
  _assert_trees_close(an0.scores, an.scores)
  _assert_trees_close(st0, _prepare_prefix(_params(), CONFIG, 0, data))


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
def test_window_evaluation_of_a_test_sample_equals_its_full_forward(mode):
  """`path_scores` on the base pass's states == `analyze_remixed` (a second full forward)."""
  spec, cs, w = _slice((1, 3))
  eng = engine.shared(CONFIG, engine.EngineConfig(spec=spec, eval_pathway_mode=mode))
  data = _batch('rc')  # per-choice contexts: each sequence keeps its own rows
  an, st = eng.analyze_prepared(_params(), data)
  q = data.size
  css = jax.tree.map(lambda x: jnp.stack([x] * q), cs)
  path = jnp.stack([jax.vmap(pw_lib.base_weights)(css), jnp.stack([w] * q)], axis=1)  # [Q, 2, ...]
  tests = jax.tree.map(lambda x: x[:, None], st)
  got = eng.path_scores(_params(), css, tests, an.seq_router_probs, path)  # [Q, 2, C]
  want = eng.analyze_remixed(_params(), data, css, path[:, -1], an.seq_router_probs).scores
  np.testing.assert_allclose(got[:, -1], want, atol=TOL, rtol=0)
  if mode == 'topk':  # the base weights as top-k rows: the base pathway
    np.testing.assert_allclose(got[:, 0], an.scores, atol=TOL, rtol=0)
