"""Choice scoring equals a straightforward re-computation with the plain model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.remix import scoring
from c3po_jax.tasks import encoding, load_examples
from c3po_jax.tasks.tokenizer import load_tokenizer
from c3po_jax.testing.checkpoints import TINY_TOKENIZER_CONFIG as CFG
from c3po_jax.testing.checkpoints import tiny_params
from models import transformer


@pytest.fixture(scope='module')
def setup():
  return tiny_params(), load_tokenizer()


_PAD = 128


@jax.jit
def _plain_logits(params, seq, mask):
  return transformer.forward(params, seq, config=CFG, attention_mask=mask).logits[0]


def _loglik(params, context, continuation):
  """Sum log p(continuation | context) by one plain (right-padded) forward pass."""
  ids = list(context) + list(continuation)
  seq = np.zeros((1, _PAD), np.int32)
  seq[0, : len(ids)] = ids
  mask = (np.arange(_PAD) < len(ids))[None].astype(np.int32)
  logits = np.asarray(_plain_logits(params, seq, mask), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  total = 0.0
  for j, tok in enumerate(continuation):
    total += logp[len(context) - 1 + j, tok]
  return total


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['rc', 'mc'])
@pytest.mark.parametrize('task', ['arc_challenge', 'winogrande'])
def test_scores_match_plain_loglikelihood(setup, fmt, task):
  params, tok = setup
  examples = load_examples(task, split='validation', limit=2)
  prompts = [encoding.encode(tok, e, fmt) for e in examples]
  batch = scoring.make_batch(prompts, batch_size=4, num_choices=5)
  an = jax.jit(lambda p, b: scoring.analyze(p, b, config=CFG))(params, batch)
  scores = np.asarray(an.scores)
  for i, p in enumerate(prompts):
    for c, cont in enumerate(p.continuations):
      want = _loglik(params, p.context_of(c), cont)
      np.testing.assert_allclose(scores[i, c], want, rtol=1e-4, atol=1e-4)
    assert np.all(np.isneginf(scores[i, len(p.continuations) :]))


@pytest.mark.slow
def test_analysis_states_are_at_last_context_token(setup):
  params, tok = setup
  examples = load_examples('arc_challenge', split='validation', limit=2)
  prompts = [encoding.encode(tok, e, 'rc') for e in examples]
  # Both jitted: run op by op (eagerly), this test took 46 s on the 2-core machine.
  an = jax.jit(functools.partial(scoring.analyze, config=CFG))(params, scoring.make_batch(prompts))
  forward = jax.jit(functools.partial(transformer.forward, config=CFG))
  for i, p in enumerate(prompts):
    out = forward(params, jnp.asarray([p.context]))
    np.testing.assert_allclose(an.last_hidden[i], out.last_hidden[0], atol=1e-5)
    np.testing.assert_allclose(an.router_probs[i], out.router_probs[:, 0, -1], atol=1e-6)


def test_choice_loss():
  scores = jnp.asarray([[-1.0, -2.0, -jnp.inf], [-3.0, -0.5, -1.0]])
  valid = jnp.asarray([[True, True, False], [True, True, True]])
  gold = jnp.asarray([1, 0])
  ce = scoring.choice_loss(scores, gold, valid, 'choice_ce')
  want0 = -np.log(np.exp(-2.0) / (np.exp(-1.0) + np.exp(-2.0)))
  want1 = -np.log(np.exp(-3.0) / np.exp([-3.0, -0.5, -1.0]).sum())
  np.testing.assert_allclose(ce, [want0, want1], rtol=1e-6)
  np.testing.assert_allclose(scoring.choice_loss(scores, gold, valid, 'gold_nll'), [2.0, 3.0])
