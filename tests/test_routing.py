"""Routing maths (models/routing.py) against plain numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import routing

E = 8


def np_softmax(x):
  z = np.exp(x - x.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def np_normalize(w):
  w = np.where(w > 0, w, 1e-10)
  return w / w.sum(axis=-1, keepdims=True)


def test_router_probs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  router = rng.normal(size=(16, E)).astype(np.float32)
  logits, probs = routing.router_probs(jnp.asarray(x), jnp.asarray(router))
  want = np.einsum('btd,de->bte', x.astype(np.float64), router)
  assert logits.dtype == probs.dtype == jnp.float32
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probs, np_softmax(want), rtol=1e-5, atol=1e-7)


def test_normalize_pathway():
  w = np.array(
    [
      [0.5, 1.0, 2.0, 0.1, 0.3, 0.7, 1.5, 0.2],  # dense
      [0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # sparse: zeros get 1e-10
      [0.0] * E,  # empty: uniform
      [-1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # negative counts as missing
    ],
    np.float32,
  )
  got = np.asarray(routing.normalize_pathway(jnp.asarray(w)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np_normalize(w.astype(np.float64)), rtol=1e-6, atol=0)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(got[2], 1.0 / E, rtol=1e-6)
  assert got[1, 0] > 0 and got[1, 0] < 1e-10


def test_last_token_mask():
  got = routing.last_token_mask(jnp.array([0, 3, 2]), 4)
  want = np.zeros((3, 4), bool)
  want[[0, 1, 2], [0, 3, 2]] = True
  np.testing.assert_array_equal(got, want)


def test_override_last_token():
  rng = np.random.default_rng(1)
  probs = np_softmax(rng.normal(size=(3, 6, E))).astype(np.float32)
  last = np.array([5, 2, 0])
  w = rng.uniform(0, 1, (3, E)).astype(np.float32)
  w[1, :5] = 0
  got = np.asarray(routing.override_last_token(jnp.asarray(probs), jnp.asarray(last), w))
  want = probs.copy()
  for b, t in enumerate(last):
    want[b, t] = np_normalize(w[b].astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  untouched = ~routing.last_token_mask(jnp.asarray(last), 6)
  np.testing.assert_array_equal(got[untouched], probs[untouched])


@pytest.mark.parametrize('norm', [False, True])
def test_top_k(norm):
  rng = np.random.default_rng(2)
  probs = np_softmax(rng.normal(size=(2, 4, E))).astype(np.float32)
  weights, indices = routing.top_k(jnp.asarray(probs), 3, norm)
  assert indices.dtype == jnp.int32 and weights.dtype == jnp.float32
  want_idx = np.argsort(-probs, axis=-1, kind='stable')[..., :3]
  want_w = np.take_along_axis(probs, want_idx, axis=-1)
  if norm:
    want_w = want_w / want_w.sum(-1, keepdims=True)
  np.testing.assert_array_equal(indices, want_idx)
  np.testing.assert_allclose(weights, want_w, rtol=1e-6, atol=0)


def test_combine_weights():
  rng = np.random.default_rng(3)
  indices = np.stack([rng.permutation(E)[:3] for _ in range(10)]).reshape(2, 5, 3)
  weights = rng.uniform(size=(2, 5, 3)).astype(np.float32)
  got = routing.combine_weights(jnp.asarray(weights), jnp.asarray(indices), E)
  want = np.zeros((2, 5, E), np.float32)
  for b in range(2):
    for t in range(5):
      for w, e in zip(weights[b, t], indices[b, t]):
        want[b, t, e] += w
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
