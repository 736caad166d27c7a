"""A small 'mc' scorer for the demo model (a training diagnostic, not the engine).

A question's prediction is the argmax, over its choices, of the log-probability
of the letter continuation ' A', ' B', ... at the last prompt token. Prompts
are right-padded into one fixed [B, T] shape so the forward compiles once.

Dimensions: B batch, T tokens, V vocab, C choices (at most 5).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from c3po_jax.demo import prompts
from c3po_jax.demo import tokenizer as tokenizer_lib
from models.olmoe import transformer
from models.olmoe.config import OlmoeConfig


@functools.partial(jax.jit, static_argnames='config')
def _letter_log_probs(params, tokens, mask, letter_ids, *, config: OlmoeConfig):
  out = transformer.forward(params, tokens, config=config, attention_mask=mask)
  last = jnp.take_along_axis(out.logits, out.last_index[:, None, None], axis=1)[:, 0]  # [B, V]
  return jax.nn.log_softmax(last, axis=-1)[:, letter_ids]  # [B, 5]


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each prompt (no special tokens), for a tokenizers or HF tokenizer."""
  if hasattr(tokenizer, 'encode_batch'):
    return [e.ids for e in tokenizer.encode_batch(list(texts))]
  return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def letter_log_probs(
  params,
  config: OlmoeConfig,
  tokenizer,
  records: Sequence[dict],
  *,
  batch_size: int = 64,
  max_len: int = 64,
) -> np.ndarray:
  """[N, 5] log-probabilities of ' A'..' E' after each record's mc prompt."""
  letter_ids = jnp.asarray(tokenizer_lib.letter_token_ids(tokenizer))
  ids = encode_prompts(tokenizer, [prompts.format_mc(r['question'], r['choices']) for r in records])
  longest = max(len(x) for x in ids)
  if longest > max_len:
    raise ValueError(f'a prompt has {longest} tokens, more than max_len={max_len}')
  out = []
  for start in range(0, len(ids), batch_size):
    chunk = ids[start : start + batch_size]
    tokens = np.zeros((batch_size, max_len), np.int32)
    mask = np.zeros((batch_size, max_len), np.int32)
    mask[:, 0] = 1  # Filler rows: one token, discarded below.
    for i, x in enumerate(chunk):
      tokens[i, : len(x)] = x
      mask[i, : len(x)] = 1
    lp = _letter_log_probs(params, tokens, mask, letter_ids, config=config)
    out.append(np.asarray(lp)[: len(chunk)])
  return np.concatenate(out)


def predictions(log_probs: np.ndarray, records: Sequence[dict]) -> np.ndarray:
  """Argmax over each record's own choices (ignores letters beyond them)."""
  return np.array([int(np.argmax(lp[: len(r['choices'])])) for lp, r in zip(log_probs, records)])


def accuracy(params, config: OlmoeConfig, tokenizer, records: Sequence[dict], **kwargs) -> float:
  """Fraction of records whose argmax letter is the gold one."""
  lp = letter_log_probs(params, config, tokenizer, records, **kwargs)
  gold = np.array([r['answer'] for r in records])
  return float(np.mean(predictions(lp, records) == gold))
