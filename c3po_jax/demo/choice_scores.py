"""A small multiple-choice scorer for the demo model (a training diagnostic, not the engine).

Each (question, choice) pair is one sequence: the prompt's context followed by
the choice's continuation (see format_question); its score is the
summed log-probability of the continuation tokens, and a question's prediction
is the argmax over its choices (lm-eval's 'acc'). Sequences are right-padded
into one fixed [B, T] shape so the forward compiles once.

Dimensions: B batch, T tokens, V vocab, C choices.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c3po_jax.tasks.prompts import format_question
from models import transformer
from models.config import MoeConfig


@functools.partial(jax.jit, static_argnames='config')
def _sequence_scores(params, tokens, mask, weights, *, config: MoeConfig):
  """[B] sum over t of weights[b, t] * log p(tokens[b, t + 1] | tokens[b, :t + 1])."""
  out = transformer.forward(params, tokens, config=config, attention_mask=mask)
  logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(picked * weights[:, :-1], axis=-1)


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text (no special tokens), for a tokenizers or HF tokenizer."""
  if hasattr(tokenizer, 'encode_batch'):
    return [e.ids for e in tokenizer.encode_batch(list(texts))]
  return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def choice_log_probs(
  params,
  config: MoeConfig,
  tokenizer,
  records: Sequence[dict],
  *,
  fmt: str = 'rc',
  batch_size: int = 64,
  max_len: int = 64,
) -> list[np.ndarray]:
  """Per record, [C] summed log-probabilities of its choices' continuations."""
  contexts, conts, owner = [], [], []
  for i, r in enumerate(records):
    context, continuations = format_question(r['question'], r['choices'], fmt)
    contexts += [context] * len(continuations)
    conts += continuations
    owner += [i] * len(continuations)
  ctx_ids = encode_prompts(tokenizer, contexts)
  cont_ids = encode_prompts(tokenizer, conts)
  seqs = [a + b for a, b in zip(ctx_ids, cont_ids)]
  longest = max(len(x) for x in seqs)
  if longest > max_len:
    raise ValueError(f'a prompt has {longest} tokens, more than max_len={max_len}')
  scores = []
  for start in range(0, len(seqs), batch_size):
    tokens = np.zeros((batch_size, max_len), np.int32)
    mask = np.zeros((batch_size, max_len), np.int32)
    weights = np.zeros((batch_size, max_len), np.float32)
    mask[:, 0] = 1  # Filler rows: one token, discarded below.
    chunk = range(start, min(start + batch_size, len(seqs)))
    for row, j in enumerate(chunk):
      n, c = len(seqs[j]), len(ctx_ids[j])
      tokens[row, :n] = seqs[j]
      mask[row, :n] = 1
      weights[row, c - 1 : n - 1] = 1.0  # positions that predict the continuation
    s = _sequence_scores(params, tokens, mask, weights, config=config)
    scores.append(np.asarray(s)[: len(chunk)])
  flat = np.concatenate(scores)
  owner = np.asarray(owner)
  return [flat[owner == i] for i in range(len(records))]


def predictions(log_probs: Sequence[np.ndarray]) -> np.ndarray:
  """Argmax choice of each record."""
  return np.array([int(np.argmax(lp)) for lp in log_probs])


def accuracy(
  params, config: MoeConfig, tokenizer, records: Sequence[dict], *, fmt: str = 'rc', **kwargs
) -> float:
  """Fraction of records whose argmax choice is the gold one."""
  lp = choice_log_probs(params, config, tokenizer, records, fmt=fmt, **kwargs)
  gold = np.array([r['answer'] for r in records])
  return float(np.mean(predictions(lp) == gold))
