"""Invariants of the routing pathway that C3PO depends on.

The pathway overrides the router probabilities of each row's last real token
in the listed layers. Checked here: the identity pathway is a no-op; nothing
else changes; dense-mode gradients match finite differences; vmap and jit
apply; and the override matches the public C3PO code's semantics, re-built in
PyTorch on a tiny transformers model by wrapping its MoE blocks.

Dimensions: N samples, B batch, T tokens, V vocab, L layers, E experts.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from c3po_jax.testing import hf_models
from c3po_jax.testing.torch_c3po import c3po_moe
from models import routing, transformer
from models.families.olmoe import TINY

E = TINY.num_experts
L = TINY.num_hidden_layers

forward = jax.jit(transformer.forward, static_argnames=('config', 'pathway_mode'))


def random_params(config, seed=0, std=0.2):
  """Random params with weights large enough that routing and logits vary."""
  params = transformer.init_params(config, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))

  def draw(p):
    noise = jax.random.normal(next(keys), p.shape, p.dtype)
    return 1.0 + 0.1 * noise if p.ndim == 1 else std * noise

  return jax.tree.map(draw, params)


def mixed_batch(seed=0, t=9):
  """Rows right-padded, left-padded and unpadded: tokens and mask [3, T]."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, TINY.vocab_size, (3, t)).astype(np.int32)
  mask = np.ones((3, t), np.int32)
  mask[0, 5:] = 0  # right-padded
  mask[1, :3] = 0  # left-padded
  tokens[mask == 0] = TINY.pad_token_id
  return jnp.asarray(tokens), jnp.asarray(mask)


def random_pathway(layers, b, seed, low=0.0):
  rng = np.random.default_rng(seed)
  return {i: jnp.asarray(rng.uniform(low, 1.0, (b, E)), jnp.float32) for i in layers}


@pytest.mark.slow
@pytest.mark.parametrize('layers', [(L - 1,), tuple(range(L))])
def test_identity_pathway_equals_no_pathway(layers):
  params = random_params(TINY)
  tokens, mask = mixed_batch()
  plain = forward(params, tokens, config=TINY, attention_mask=mask)
  rows = jnp.arange(tokens.shape[0])
  # The model's own last-token router probabilities, as a pathway.
  identity = {i: plain.router_probs[i, rows, plain.last_index] for i in layers}
  out = forward(params, tokens, config=TINY, attention_mask=mask, pathway=identity)
  np.testing.assert_allclose(out.logits, plain.logits, atol=1e-5, rtol=0)
  np.testing.assert_allclose(out.router_probs, plain.router_probs, atol=1e-6, rtol=0)


def test_pathway_changes_only_the_last_token_in_listed_layers():
  params = random_params(TINY)
  tokens, mask = mixed_batch()
  layer = 1
  pathway = random_pathway([layer], 3, seed=1)
  plain = forward(params, tokens, config=TINY, attention_mask=mask)
  out = forward(params, tokens, config=TINY, attention_mask=mask, pathway=pathway)
  last = np.asarray(plain.last_index)
  np.testing.assert_array_equal(out.last_index, last)
  is_last = np.arange(tokens.shape[1])[None, :] == last[:, None]  # [B, T]
  before = np.asarray(mask, bool) & (np.arange(tokens.shape[1])[None, :] < last[:, None])

  got, want = np.asarray(out.router_probs), np.asarray(plain.router_probs)  # [L, B, T, E]
  np.testing.assert_allclose(got[:layer], want[:layer], atol=1e-6, rtol=0)
  np.testing.assert_allclose(got[layer][~is_last], want[layer][~is_last], atol=1e-6, rtol=0)
  np.testing.assert_allclose(
    got[layer][is_last], routing.normalize_pathway(pathway[layer]), atol=1e-7, rtol=0
  )
  # Later layers: only the last token (the one whose MoE output changed) moves.
  np.testing.assert_allclose(got[layer + 1 :, before], want[layer + 1 :, before], atol=1e-6)
  assert np.abs(got[layer + 1 :][:, is_last] - want[layer + 1 :][:, is_last]).max() > 1e-3
  np.testing.assert_allclose(out.logits[before], plain.logits[before], atol=1e-6, rtol=0)
  assert np.abs(out.logits[is_last] - plain.logits[is_last]).max() > 1e-3


@pytest.mark.slow
def test_dense_gradient_matches_finite_differences():
  params = random_params(TINY)
  tokens, mask = mixed_batch(seed=2)
  target = jnp.asarray([5, 17, 99])
  w0 = random_pathway([L - 2, L - 1], 3, seed=3, low=0.2)

  def loss(pathway):
    out = transformer.forward(
      params, tokens, config=TINY, attention_mask=mask, pathway=pathway, pathway_mode='dense'
    )
    last = jnp.take_along_axis(out.logits, out.last_index[:, None, None], axis=1)[:, 0]
    logp = jax.nn.log_softmax(last)  # [B, V]
    return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))

  grad = jax.jit(jax.grad(loss))(w0)
  # Central differences along every coordinate, all in one vmapped call.
  eps = 3e-2  # float32: rounding error ~1e-7 / eps, truncation ~eps^2
  flat, unravel = ravel_pytree(w0)
  steps = eps * jnp.eye(flat.size)
  losses = jax.jit(jax.vmap(lambda v: loss(unravel(v))))
  fd = (losses(flat + steps) - losses(flat - steps)) / (2 * eps)
  want = ravel_pytree(grad)[0]
  assert np.abs(want).max() > 1e-2  # the loss does depend on the pathway
  np.testing.assert_allclose(fd, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['topk', 'dense'])
def test_vmap_over_samples_matches_loop(mode):
  params = random_params(TINY)
  n = 3
  batches = [mixed_batch(seed=s) for s in range(n)]
  tokens = jnp.stack([t for t, _ in batches])  # [N, B, T]
  mask = jnp.stack([m for _, m in batches])
  pathway = random_pathway([0, L - 1], n * 3, seed=4)
  pathway = {i: w.reshape(n, 3, E) for i, w in pathway.items()}  # [N, B, E]

  def logits(tokens, mask, pathway):
    return transformer.forward(
      params, tokens, config=TINY, attention_mask=mask, pathway=pathway, pathway_mode=mode
    ).logits

  batched = jax.jit(jax.vmap(logits))(tokens, mask, pathway)
  single = jax.jit(logits)
  for i in range(n):
    want = single(tokens[i], mask[i], {k: w[i] for k, w in pathway.items()})
    np.testing.assert_allclose(batched[i], want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_jit_traces_pathway_values_not_keys():
  params = random_params(TINY)
  tokens, mask = mixed_batch()
  traces = []

  @functools.partial(jax.jit, static_argnames='mode')
  def logits(pathway, mode):
    traces.append(tuple(sorted(pathway)))
    out = transformer.forward(
      params, tokens, config=TINY, attention_mask=mask, pathway=pathway, pathway_mode=mode
    )
    return out.logits

  a = logits(random_pathway([1], 3, seed=5), 'topk')
  b = logits(random_pathway([1], 3, seed=6), 'topk')
  assert traces == [(1,)]
  assert np.abs(a - b).max() > 1e-3
  logits(random_pathway([1, 2], 3, seed=5), 'topk')
  assert traces == [(1,), (1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize('norm_topk_prob', [False, True])
def test_override_matches_public_c3po_semantics(norm_topk_prob):
  torch = pytest.importorskip('torch')
  model, _ = hf_models.make_hf_model(seed=7, norm_topk_prob=norm_topk_prob)
  with torch.no_grad():  # larger weights, so that routing changes show in the logits
    for name, p in model.named_parameters():
      if 'norm' not in name:
        p.mul_(5.0)
  config, params = hf_models.params_from_torch(model)
  n_layers, k = config.num_hidden_layers, config.num_experts_per_tok
  rng = np.random.default_rng(8)
  tokens = rng.integers(3, config.vocab_size, (2, 7)).astype(np.int32)

  dense = [rng.uniform(0.05, 1.0, (2, config.num_experts)) for _ in range(2)]
  sparse = [np.zeros((2, config.num_experts)) for _ in range(2)]
  sparse[0][0, [1, 4, 6]] = [0.5, 0.2, 0.3]  # more experts than top-k
  sparse[0][1, 3] = 1.0  # fewer than top-k: the rest tie at 1e-10
  sparse[1][0, [0, 7]] = [2.0, 0.1]
  sparse[1][1, [2, 5, 6]] = [0.3, 0.3, 0.4]
  assert k == 2

  layers = model.model.layers
  originals = [layers[i].mlp for i in range(n_layers - 2, n_layers)]
  for w1, w2 in (dense, sparse):
    # Instance-level replacement of the last two layers' MoE blocks.
    for i, (block, w) in enumerate(zip(originals, (w1, w2))):
      layers[n_layers - 2 + i].mlp = c3po_moe(torch, block, {0: torch.from_numpy(w).float()}, 0)
    try:
      with torch.no_grad():
        want = model(torch.from_numpy(tokens).long()).logits.numpy()
    finally:
      for i, block in enumerate(originals):
        layers[n_layers - 2 + i].mlp = block
    pathway = {
      n_layers - 2: jnp.asarray(w1, jnp.float32),
      n_layers - 1: jnp.asarray(w2, jnp.float32),
    }
    got = forward(params, jnp.asarray(tokens), config=config, pathway=pathway).logits
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # The override did something: the plain model differs at the last position.
  with torch.no_grad():
    plain = model(torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(plain[:, -1] - want[:, -1]).max() > 1e-3
  np.testing.assert_allclose(plain[:, :-1], want[:, :-1], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ragged_dispatch_equals_sorted_in_vmapped_pathway_gradient():
  """The model on 'ragged' dispatch: same logits and per-sample pathway gradients."""
  params = random_params(TINY)
  n = 2
  batches = [mixed_batch(seed=s) for s in range(n)]
  tokens = jnp.stack([t for t, _ in batches])  # [N, B, T]
  mask = jnp.stack([m for _, m in batches])
  pathway = random_pathway([L - 2, L - 1], n * 3, seed=5, low=0.2)
  pathway = {i: w.reshape(n, 3, E) for i, w in pathway.items()}  # [N, B, E]

  def run(dispatch):
    config = TINY.replace(dispatch=dispatch)

    def loss(tokens, mask, pathway):
      out = transformer.forward(params, tokens, config=config, attention_mask=mask, pathway=pathway)
      last = jnp.take_along_axis(out.logits, out.last_index[:, None, None], axis=1)[:, 0]
      return jnp.mean(jax.nn.logsumexp(last, axis=-1) - last[:, 5]), out.logits

    grad = jax.vmap(jax.value_and_grad(loss, argnums=2, has_aux=True))
    return jax.jit(grad)(tokens, mask, pathway)

  got, want = run('ragged'), run('sorted')
  assert np.abs(ravel_pytree(want[1])[0]).max() > 1e-3  # the loss depends on the pathway
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
