"""The MoE dispatches against a slow loop-over-experts reference kept here.

Dimensions: B batch, N tokens, D model, F expert hidden, E experts, K top-k.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import dispatch as moe
from models import ragged, routing
from models.config import ConfigError, MoeConfig

D, F = 8, 6


def reference_moe(x, weights, indices, params):
  """Loop over experts: select each expert's tokens with numpy, SwiGLU, add."""
  x, weights, indices = np.asarray(x, np.float64), np.asarray(weights), np.asarray(indices)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  out = np.zeros_like(x)
  for e in range(p['gate'].shape[0]):
    token, slot = np.nonzero(indices == e)
    if not token.size:
      continue
    h = x[token] @ p['gate'][e]
    h = h / (1.0 + np.exp(-h)) * (x[token] @ p['up'][e])
    np.add.at(out, token, weights[token, slot, None] * (h @ p['down'][e]))
  return out


def make_params(rng, e, d=D, f=F):
  return {
    'gate': jnp.asarray(rng.normal(0, 0.5, (e, d, f)), jnp.float32),
    'up': jnp.asarray(rng.normal(0, 0.5, (e, d, f)), jnp.float32),
    'down': jnp.asarray(rng.normal(0, 0.5, (e, f, d)), jnp.float32),
  }


def make_routing(rng, n, k, e, kind):
  """(weights [N, K] float32, indices [N, K] int32), distinct experts per token."""
  if kind == 'random':
    indices = np.stack([rng.permutation(e)[:k] for _ in range(n)])
  elif kind == 'skewed':  # experts >= k + 1 never chosen
    indices = np.stack([rng.permutation(k + 1)[:k] for _ in range(n)])
  elif kind == 'one_expert':  # every token's first choice is expert e - 1
    rest = [rng.permutation(e - 1)[: k - 1] for _ in range(n)]
    indices = np.stack([np.concatenate([[e - 1], r]) for r in rest])
  else:
    raise ValueError(kind)
  weights = rng.uniform(0.05, 1.0, (n, k))
  return jnp.asarray(weights, jnp.float32), jnp.asarray(indices, jnp.int32)


def dense_topk(x, weights, indices, params):
  """moe_dense with the top-k weights scattered into a combine matrix."""
  combine = routing.combine_weights(weights, indices, params['gate'].shape[0])
  return moe.moe_dense(x, combine, params)


DISPATCHES = {
  'dense': dense_topk,
  'gather': moe.moe_gather,
  'sorted': moe.moe_sorted,
  'sorted_block1': functools.partial(moe.moe_sorted, block_size=1),
  'sorted_block8': functools.partial(moe.moe_sorted, block_size=8),
  'topk': moe.moe_topk,
  'ragged': ragged.moe_ragged,
  'topk_ragged': functools.partial(moe.moe_topk, impl='ragged'),
  'sorted_folding': moe.moe_sorted_folding,
  'topk_fold': functools.partial(moe.moe_topk, fold_vmap=True),
}
# The dispatches whose vmap folds the batch into the tokens (`models.fold`).
FOLDING = {'ragged': ragged.moe_ragged, 'sorted_folding': moe.moe_sorted_folding}

# (N, K, E, routing kind). N*K is never a multiple of 8 in the odd cases.
CASES = [
  (1, 1, 1, 'random'),
  (2, 8, 64, 'random'),  # decode: N*K <= E
  (7, 3, 5, 'random'),
  (37, 4, 16, 'skewed'),
  (101, 1, 8, 'one_expert'),
  (50, 3, 6, 'one_expert'),
  (257, 2, 4, 'random'),
]


@pytest.mark.parametrize('dispatch', sorted(DISPATCHES))
@pytest.mark.parametrize('n,k,e,kind', CASES)
def test_dispatch_matches_reference(dispatch, n, k, e, kind):
  rng = np.random.default_rng(n * 1000 + k * 10 + e)
  params = make_params(rng, e)
  x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  weights, indices = make_routing(rng, n, k, e, kind)
  got = jax.jit(DISPATCHES[dispatch])(x, weights, indices, params)
  assert got.shape == (n, D) and got.dtype == x.dtype
  np.testing.assert_allclose(got, reference_moe(x, weights, indices, params), rtol=1e-5, atol=1e-5)


def test_expert_outputs_is_every_expert_on_every_token():
  rng = np.random.default_rng(0)
  params = make_params(rng, 5)
  x = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
  got = moe.expert_outputs(x, params)  # [N, E, D]
  for e in range(5):
    one = np.full((4, 1), e)
    want = reference_moe(x, np.ones((4, 1)), one, params)
    np.testing.assert_allclose(got[:, e], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
  'dispatch', ['gather', 'sorted', 'sorted_block8', 'topk', 'ragged', 'sorted_folding']
)
def test_vmap_equals_per_sample_loop(dispatch):
  rng = np.random.default_rng(1)
  b, n, k, e = 3, 19, 3, 8
  params = make_params(rng, e)
  x = jnp.asarray(rng.normal(size=(b, n, D)), jnp.float32)
  routes = [make_routing(rng, n, k, e, kind) for kind in ('random', 'skewed', 'one_expert')]
  weights = jnp.stack([w for w, _ in routes])  # [B, N, K]
  indices = jnp.stack([i for _, i in routes])
  fn = DISPATCHES[dispatch]
  got = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, None)))(x, weights, indices, params)
  one = jax.jit(fn)
  for i in range(b):
    np.testing.assert_allclose(got[i], one(x[i], weights[i], indices[i], params), atol=1e-6)
    np.testing.assert_allclose(
      got[i], reference_moe(x[i], weights[i], indices[i], params), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize(
  'dispatch', ['gather', 'sorted', 'sorted_block8', 'topk', 'ragged', 'sorted_folding']
)
def test_grad_matches_dense(dispatch):
  rng = np.random.default_rng(2)
  n, k, e, kind = 29, 3, 8, 'one_expert'
  params = make_params(rng, e)
  x = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
  weights, indices = make_routing(rng, n, k, e, kind)
  cotangent = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)

  def loss(fn, x, weights, params):
    return jnp.sum(fn(x, weights, indices, params) * cotangent)

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
  got = grad(DISPATCHES[dispatch], x, weights, params)
  want = grad(dense_topk, x, weights, params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _intermediate_shapes(jaxpr):
  """Shapes of every value a jaxpr computes, inside loops and remat too."""
  for eqn in jaxpr.eqns:
    yield from (v.aval.shape for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _intermediate_shapes(sub)


def test_vmapped_grad_copies_no_expert_weights():
  """C3PO's per-sample gradients must not copy the experts' weights per block.

  Stacking one [D, F] slice per block (scan residuals), or broadcasting the
  [E, D, F] weights over the batch (what `cond` under vmap does), would cost
  far more than the matmuls. Only slices of at most one expert per sample
  may appear.
  """
  rng = np.random.default_rng(4)
  b, n, k, e, d, f = 3, 5, 2, 4, 8, 6
  params = make_params(rng, e, d, f)
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  routes = [make_routing(rng, n, k, e, 'random') for _ in range(b)]
  weights = jnp.stack([w for w, _ in routes])  # [B, N, K]
  indices = jnp.stack([i for _, i in routes])

  def loss(x, weights):
    out = jax.vmap(moe.moe_topk, in_axes=(0, 0, 0, None))(x, weights, indices, params)
    return jnp.sum(out**2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, weights).jaxpr
  for shape in _intermediate_shapes(jaxpr):
    if shape[-2:] in ((d, f), (f, d)):
      assert np.prod(shape) <= b * d * f, f'copy of expert weights: {shape}'


def test_auto_dispatch_is_sorted_on_cpu():
  assert moe.resolve('auto') == 'sorted' and moe.resolve('ragged') == 'ragged'
  with pytest.raises(ValueError, match='dispatch'):
    moe.resolve('megablocks')
  with pytest.raises(ConfigError, match='dispatch'):
    MoeConfig(dispatch='megablocks')


def _batched_problem(seed, b=3, n=11, k=3, e=6):
  rng = np.random.default_rng(seed)
  params = make_params(rng, e)
  x = jnp.asarray(rng.normal(size=(b, n, D)), jnp.float32)
  routes = [make_routing(rng, n, k, e, kind) for kind in ('random', 'skewed', 'one_expert')[:b]]
  weights = jnp.stack([w for w, _ in routes])  # [B, N, K]
  indices = jnp.stack([i for _, i in routes])
  cotangent = jnp.asarray(rng.normal(size=(b, n, D)), jnp.float32)
  return params, x, weights, indices, cotangent


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', sorted(FOLDING))
def test_folding_nested_vmap_and_unbatched_args(dispatch):
  """Folding works through two vmaps and with x shared by the batch."""
  params, x, weights, indices, _ = _batched_problem(5)
  fn = FOLDING[dispatch]
  nested = jax.vmap(jax.vmap(fn, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, None))
  got = jax.jit(nested)(x[None], weights[None], indices[None], params)[0]
  shared_x = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0, None)))
  got_shared = shared_x(x[0], weights, indices, params)
  for i in range(x.shape[0]):
    want = reference_moe(x[i], weights[i], indices[i], params)
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    want = reference_moe(x[0], weights[i], indices[i], params)
    np.testing.assert_allclose(got_shared[i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', sorted(FOLDING))
@pytest.mark.parametrize('order', ['vmap_of_grad', 'grad_of_vmap'])
def test_folding_grad_under_vmap_matches_sorted(order, dispatch):
  """Per-sample gradients (x, routing weights, expert weights) equal the sorted dispatch's."""
  params, x, weights, indices, cotangent = _batched_problem(6)

  def loss(fn, x, w, idx, p, ct):
    return jnp.sum(fn(x, w, idx, p) * ct)

  def grads(fn):
    g = jax.grad(functools.partial(loss, fn), argnums=(0, 1, 3))
    if order == 'vmap_of_grad':
      return jax.jit(jax.vmap(g, in_axes=(0, 0, 0, None, 0)))(
        x, weights, indices, params, cotangent
      )
    batched = lambda x, w, p: jnp.sum(
      jax.vmap(fn, in_axes=(0, 0, 0, None))(x, w, indices, p) * cotangent
    )
    return jax.jit(jax.grad(batched, argnums=(0, 1, 2)))(x, weights, params)

  got, want = grads(FOLDING[dispatch]), grads(moe.moe_sorted)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('dispatch', sorted(FOLDING))
def test_folding_pathway_gradient_copies_no_expert_weights(dispatch):
  """vmap(grad) w.r.t. x and routing weights only: no per-sample expert weights are compiled.

  Neither the per-sample weight cotangents [B, E, D, F] nor per-sample slices
  of one expert [B, D, F] (what a vmapped, unfolded sorted dispatch gathers
  per block); the ragged dispatch has no loop at all.
  """
  params, x, weights, indices, cotangent = _batched_problem(7, b=3, e=5)
  fn = FOLDING[dispatch]

  def loss(x, w, idx, ct):
    return jnp.sum(fn(x, w, idx, params) * ct)

  grad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
  lowered = grad.lower(x, weights, indices, cotangent)
  hlo = lowered.compile().as_text()
  e, d, f = params['gate'].shape
  assert f'[3,{e},{d},{f}]' not in hlo
  assert f'[3,{d},{f}]' not in hlo and f'[3,{f},{d}]' not in hlo
  # Our program (before XLA): the CPU backend may itself expand ragged_dot into a
  # loop (it does with the test suite's fast-compile flags), which is not ours.
  assert dispatch != 'ragged' or 'while' not in lowered.as_text()
