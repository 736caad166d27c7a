"""The C3PO surrogates on small problems with known answers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.neighbours import kernels
from c3po_jax.neighbours import search as neighbours
from c3po_jax.remix import engine, losses, methods, scoring
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from c3po_jax.testing import checkpoints
from models import transformer
from models.families.olmoe import TINY

SPEC = pw_lib.PathwaySpec.make(TINY.num_hidden_layers, TINY.num_experts, 'last:2', 6)


def _prompts(rng, n, fmt='mc', choices=3):
  out = []
  for _ in range(n):
    ctx = tuple(int(x) for x in rng.integers(3, TINY.vocab_size, rng.integers(4, 12)))
    if fmt == 'mc':
      conts = tuple((10 + c,) for c in range(choices))
    else:
      conts = tuple(
        tuple(int(x) for x in rng.integers(3, TINY.vocab_size, rng.integers(1, 4)))
        for _ in range(choices)
      )
    out.append(EncodedPrompt(ctx, conts, int(rng.integers(choices)), (1,) * choices, fmt))
  return out


@pytest.fixture(scope='module')
def model():
  """Random tiny model with experts scaled up so that routing moves logits."""
  return checkpoints.loud_experts(transformer.init_params(TINY, jax.random.PRNGKey(0)))


# Setup and reference computations run under `jax.jit`: run op by op, JAX compiles
# one program per primitive and shape (hundreds per test). Static settings are
# bound, params and data are arguments (not compile-time constants).
_base_weights = jax.jit(jax.vmap(pw_lib.base_weights))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _naive_losses(ec, mode, params, w, cs, nb, weights):
  """The naive backend's loss in `mode` of Q samples [Q, ...] at core weights w [Q, C, Kc]."""
  return jax.vmap(losses.NaiveLoss.make_loss(params, TINY, ec, mode))(w, cs, nb, weights)


def _engine(**kw):
  mc = methods.MethodConfig(
    **{k: v for k, v in kw.items() if k in methods.MethodConfig.__dataclass_fields__}
  )
  ec_kw = {k: v for k, v in kw.items() if k in ('loss', 'opt_pathway_mode', 'eval_pathway_mode')}
  spec = kw.get('spec', SPEC)
  return engine.shared(TINY, engine.EngineConfig(spec=spec, method=mc, **ec_kw))


@functools.cache
def _ngd_engine():
  """One engine shared by the NGD tests, so they compile once."""
  return _engine(ngd_steps=4, lr=0.1, lr_end=0.01)


def _problem(model, eng, q=3, k=3, fmt='mc', seed=0):
  rng = np.random.default_rng(seed)
  test = scoring.make_batch(_prompts(rng, q, fmt), num_choices=3)
  nb = scoring.make_batch(_prompts(rng, q * k, fmt), num_choices=3)
  nb = jax.tree.map(lambda x: x.reshape((q, k) + x.shape[1:]), nb)
  base = eng.analyze(model, test)
  cs = eng.core_slices(base.router_probs)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (q, k)), jnp.float32)
  return test, nb, cs, w


def test_kernel_weights_by_hand():
  sim = np.array([[0.9, 0.5, 0.1]])
  valid = np.array([[True, True, True]])
  d2 = 2 - 2 * sim
  sigma = np.median(np.sqrt(d2))
  want = np.exp(-d2 / (2 * sigma**2))
  np.testing.assert_allclose(kernels.kernel_weights(sim, valid), want / want.sum(), rtol=1e-6)
  got = kernels.kernel_weights(sim, valid, kind='gaussian', sigma=0.5)
  want = np.exp(-d2 / 0.5)
  np.testing.assert_allclose(got, want / want.sum(), rtol=1e-6)
  lin = kernels.kernel_weights(sim, np.array([[True, False, True]]), kind='linear')
  np.testing.assert_allclose(lin, [[0.9, 0.0, 0.1]], rtol=1e-6)
  for kind in kernels.KERNELS:  # closer neighbours never weigh less
    w = kernels.kernel_weights(sim, valid, kind=kind)[0]
    assert np.all(np.diff(w) <= 1e-7) and abs(w.sum() - 1) < 1e-6


def test_neighbours_knn_eps_and_overlap():
  refs = np.array([[1, 0], [0.9, 0.436], [0.6, 0.8], [0, 1]], np.float32)
  query = np.array([[1, 0.05]], np.float32)
  nb = neighbours.find(query, refs, k=2)
  assert nb.index.tolist() == [[1, 2]]  # ref 0 is a near-duplicate (> 0.95): dropped
  ball = neighbours.find(query, refs, k=3, epsilon=0.1)
  assert ball.valid[0, 0] and ball.valid.sum() == 1
  with pytest.raises(ValueError, match='empty'):
    neighbours.find(query, refs[:0], k=2)


def _uniform_slice(c, kc, mass=1.0):
  """A CoreSlice whose core is every expert, with base mass `mass` per layer."""
  base = jnp.full((c, kc), mass / kc)
  return pw_lib.CoreSlice(base=base, core=jnp.tile(jnp.arange(kc, dtype=jnp.int32), (c, 1)))


@pytest.mark.slow
def test_kernel_regression_is_weighted_mean_when_alpha_fixed():
  cs = _uniform_slice(2, 3, mass=0.8)
  w0 = pw_lib.base_weights(cs)
  wn = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(3), size=(4, 2)), jnp.float32)
  w = jnp.asarray([0.5, 0.25, 0.25, 0.0])
  zero_loss = lambda q, cs, d, w: jnp.sum(q)
  trace, alpha = methods.kernel_regression(
    zero_loss, cs, None, w, w0, wn, methods.MethodConfig(kr_alpha=0.0)
  )
  # The weighted mean of the neighbours' weights, rescaled to the core mass.
  want = 0.8 * (0.5 * wn[0] + 0.25 * wn[1] + 0.25 * wn[2])
  np.testing.assert_allclose(trace.w, want, rtol=1e-6)
  assert float(alpha) == 0.0
  # The alpha search picks the grid point with the lowest loss.
  target = 0.3 * w0 + 0.7 * want
  loss = lambda q, cs, d, w: jnp.sum((q - target) ** 2)
  trace, alpha = methods.kernel_regression(loss, cs, None, w, w0, wn, methods.MethodConfig())
  np.testing.assert_allclose(float(alpha), 0.3, atol=1e-6)


def test_mode_finding_converges_to_the_dominant_mode():
  rng = np.random.default_rng(0)
  mode_a = np.array([0.7, 0.2, 0.1])
  mode_b = np.array([0.1, 0.2, 0.7])
  pts = np.concatenate(
    [
      rng.dirichlet(mode_a * 200, size=40),
      rng.dirichlet(mode_b * 200, size=10),
    ]
  )[:, None, :]  # [R, C=1, Kc=3]
  cs = pw_lib.CoreSlice(base=jnp.asarray([[0.5, 0.25, 0.25]]), core=jnp.asarray([[0, 1, 2]]))
  mc = methods.MethodConfig(mode_alpha=0.5, mode_iters=60, mode_neighbours=15)
  trace = methods.mode_finding(
    cs, pw_lib.base_weights(cs), jnp.asarray(pts), jnp.ones(50, bool), mc
  )
  np.testing.assert_allclose(trace.w[0], mode_a, atol=0.03)
  assert bool(trace.finite)


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['mc', 'rc'])
def test_ngd_lowers_the_surrogate_loss(model, fmt):
  eng = _ngd_engine()
  _, nb, cs, w = _problem(model, eng, fmt=fmt)
  trace = eng.ngd(model, cs, eng.prepare(model, nb), w).trace
  losses = np.asarray(trace.losses)
  assert np.all(np.asarray(trace.finite))
  assert np.all(losses[:, -1] < losses[:, 0] - 1e-4), losses


@pytest.mark.slow
def test_batched_equals_per_sample_and_is_deterministic(model):
  eng = _ngd_engine()
  _, nb, cs, w = _problem(model, eng)
  batched = eng.ngd(model, cs, eng.prepare(model, nb), w).trace
  again = eng.ngd(model, cs, eng.prepare(model, nb), w).trace
  np.testing.assert_array_equal(batched.w, again.w)
  for i in range(3):
    one = lambda x, i=i: x[i : i + 1]
    single = eng.ngd(
      model, jax.tree.map(one, cs), eng.prepare(model, jax.tree.map(one, nb)), w[i : i + 1]
    ).trace
    np.testing.assert_allclose(single.w[0], batched.w[i], atol=1e-5)
    np.testing.assert_allclose(single.losses[0], batched.losses[i], rtol=1e-5)


def test_nan_falls_back_to_base(model):
  eng = _ngd_engine()
  _, nb, cs, w = _problem(model, eng)
  w = w.at[0].set(jnp.nan)
  trace = eng.ngd(model, cs, eng.prepare(model, nb), w).trace
  assert not bool(trace.finite[0]) and bool(trace.finite[1])
  np.testing.assert_allclose(trace.w[0], jax.vmap(pw_lib.base_weights)(cs)[0], rtol=1e-6)


@pytest.mark.slow
def test_oracle_flips_wrong_answers_to_the_label(model):
  spec = pw_lib.PathwaySpec.make(TINY.num_hidden_layers, TINY.num_experts, 'last:3', 0)
  eng = _engine(ngd_steps=30, lr=0.5, lr_end=0.05, spec=spec, eval_pathway_mode='dense')
  rng = np.random.default_rng(3)
  prompts = _prompts(rng, 12, 'mc')
  test = scoring.make_batch(prompts, num_choices=3)
  base = eng.analyze(model, test)
  wrong = np.flatnonzero(np.argmax(base.scores, -1) != np.asarray(test.gold))
  assert len(wrong) >= 3
  cs = eng.core_slices(base.router_probs)
  data = eng.prepare(model, jax.tree.map(lambda x: x[:, None], test))
  trace = eng.oracle(model, cs, data, base.seq_router_probs).trace
  after = eng.analyze_remixed(model, test, cs, trace.w, base.seq_router_probs)
  pred = np.argmax(after.scores, -1)
  flipped = np.mean(pred[wrong] == np.asarray(test.gold)[wrong])
  assert flipped >= 0.5, (flipped, pred[wrong], np.asarray(test.gold)[wrong])


def test_identity_core_distribution_reproduces_base(model):
  eng = _ngd_engine()
  test, _, cs, _ = _problem(model, eng)
  base = eng.analyze(model, test)
  same = eng.analyze_remixed(
    model, test, cs, jax.vmap(pw_lib.base_weights)(cs), base.seq_router_probs
  )
  np.testing.assert_allclose(same.scores, base.scores, atol=1e-5)


def test_ngd_kernel_mean_init_starts_at_the_neighbours_mean():
  """ngd_init='kernel_mean' starts at kernel regression's alpha = 0 point.

  On a loss with two minima (the base's corner and the neighbours'), descent
  from the base stays in the base's basin and from the kernel mean in the
  neighbours'; with no neighbour it starts at the base.
  """
  cs = _uniform_slice(1, 4, mass=1.0)
  w0 = jnp.asarray([[0.7, 0.1, 0.1, 0.1]])
  cs = pw_lib.CoreSlice(base=w0, core=cs.core)
  wn = jnp.asarray([[[0.0, 0.0, 0.9, 0.1]], [[0.0, 0.0, 0.7, 0.3]]])  # [N, C, Kc]
  wt = jnp.asarray([0.75, 0.25])
  corner = lambda i: jnp.zeros((1, 4)).at[0, i].set(1.0)
  # Two wells: a shallow one at expert 0 (base side), a deep one at expert 2.
  loss = lambda w, cs, d, weights, a=None: (
    -(
      0.5 * jnp.exp(-8 * jnp.sum((w - corner(0)) ** 2))
      + jnp.exp(-8 * jnp.sum((w - corner(2)) ** 2))
    )
  )
  mc = methods.MethodConfig(lr=0.02, lr_end=1e-3, optimizer='sgd', ngd_steps=20)
  from_base = methods.ngd(loss, cs, None, wt, w0, mc, w_neighbours=wn)
  km = methods.MethodConfig(**{**mc.__dict__, 'ngd_init': 'kernel_mean'})
  from_mean = methods.ngd(loss, cs, None, wt, w0, km, w_neighbours=wn)
  np.testing.assert_allclose(from_mean.path[0], [[0.0, 0.0, 0.85, 0.15]], atol=1e-6)
  np.testing.assert_allclose(from_base.path[0], w0, atol=1e-6)
  assert int(jnp.argmax(from_base.w[0])) == 0
  assert int(jnp.argmax(from_mean.w[0])) == 2
  assert float(from_mean.losses[-1]) < float(from_base.losses[-1])
  np.testing.assert_allclose(jnp.sum(from_mean.w), 1.0, atol=1e-5)  # still on the simplex
  alone = methods.ngd(loss, cs, None, jnp.zeros(2), w0, km, w_neighbours=wn)
  np.testing.assert_allclose(alone.path[0], w0, atol=1e-6)
  with pytest.raises(ValueError, match='w_neighbours'):
    methods.ngd(loss, cs, None, wt, w0, km)


@pytest.mark.parametrize('mode', ['dense', 'topk'])
@pytest.mark.slow
def test_loss_before_and_after_are_taken_as_the_model_routes(model, mode):
  """NGD's loss before/after: its objective in the evaluation mode (top-k), in every mode.

  The reference is the naive backend (full forwards of every neighbour with
  the test sample's pathway injected, top-k) at the base and final weights.
  """
  eng = _engine(ngd_steps=2, lr=0.1, opt_pathway_mode=mode)
  _, nb, cs, w = _problem(model, eng)
  out = eng.ngd(model, cs, eng.prepare(model, nb), w)
  w0 = _base_weights(cs)
  want_before = _naive_losses(eng.ec, 'topk', model, w0, cs, nb, w)
  want_after = _naive_losses(eng.ec, 'topk', model, out.trace.w, cs, nb, w)
  np.testing.assert_allclose(out.loss_before, want_before, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.loss_after, want_after, rtol=1e-4, atol=1e-5)
  first = np.asarray(out.trace.losses)[:, 0]
  if mode == 'topk':  # the descent starts there
    np.testing.assert_allclose(first, want_before, rtol=1e-4, atol=1e-5)
  else:  # the dense loss at the base weights mixes every core expert: another number
    assert np.all(np.abs(first - np.asarray(want_before)) > 1e-4)
