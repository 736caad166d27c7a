"""Language-model batches of the demo suite's training text.

A document is `text + target + EOS`, tokenized as text and target separately
(so the answer tokens are exactly those the scorer reads after 'Answer:').
Every next-token prediction is a loss term of weight 1, the answer tokens' of
weight `answer_weight`. A document may carry a routing target (its family's
expert group at its last context token, see train.route_loss). Documents are right-padded into a few length buckets;
a batch holds one bucket, [B, T] with B * T about `batch_tokens`, so the train
step compiles once per bucket. Few-shot documents (`fewshot_documents`) put
solved questions of the same family before a question, in the format of the
suite's ICL prompts, so the model learns to read in-context examples.

Dimensions: N documents, B batch, T tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import flax.struct
import numpy as np

from c3po_jax.demo import choice_scores
from c3po_jax.tasks.prompts import FEWSHOT_SEPARATOR


@flax.struct.dataclass
class Batch:
  inputs: np.ndarray  # [B, T] int32 token ids (0 = pad)
  targets: np.ndarray  # [B, T] int32 next tokens
  weights: np.ndarray  # [B, T] float32 loss weights (0 on padding)
  mask: np.ndarray  # [B, T] int32 attention mask
  route_pos: np.ndarray  # [B] int32 position of the last context token
  route_group: np.ndarray  # [B] int32 expert group of the document (-1: none)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """All documents of one padded length T. Arrays [N, T]."""

  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  mask: np.ndarray
  route_pos: np.ndarray  # [N]
  route_group: np.ndarray  # [N]
  batch_size: int

  def take(self, rows: np.ndarray) -> Batch:
    return Batch(
      self.inputs[rows],
      self.targets[rows],
      self.weights[rows],
      self.mask[rows],
      self.route_pos[rows],
      self.route_group[rows],
    )


def fewshot_documents(
  docs: Sequence[dict],
  group_of: dict[str, str],
  fraction: float,
  max_shots: int,
  rng: np.random.Generator,
) -> list[dict]:
  """Few-shot training documents built from the question documents of `docs`.

  A `fraction` of the question documents (those with a target whose source is
  in `group_of`) is drawn; each gets 1 to `max_shots` (uniform) other
  question documents of its group (family) as solved examples before it:
  text = demo text + demo target + FEWSHOT_SEPARATOR ... + own text, exactly
  the string `format_example(q, fmt, fewshot=demos)` builds for an ICL
  prompt. The target and source stay the question's.
  """
  if fraction <= 0 or max_shots <= 0:
    return []
  members: dict[str, list[int]] = {}
  for i, d in enumerate(docs):
    if d['target'] and d['source'] in group_of:
      members.setdefault(group_of[d['source']], []).append(i)
  questions = sorted(i for m in members.values() for i in m)
  chosen = np.sort(rng.choice(questions, round(fraction * len(questions)), replace=False))
  out = []
  for i in chosen:
    q = docs[i]
    pool = members[group_of[q['source']]]
    shots = int(rng.integers(1, max_shots + 1))
    demos = [docs[pool[j]] for j in rng.choice(len(pool), shots + 1, replace=False)]
    demos = [d for d in demos if d is not q][:shots]
    text = ''.join(d['text'] + d['target'] + FEWSHOT_SEPARATOR for d in demos) + q['text']
    out.append({'text': text, 'target': q['target'], 'source': q['source']})
  return out


def tokenize_documents(
  tokenizer, docs: Sequence[dict], eos_id: int, answer_weight: float
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per document (ids [n], weight of predicting each ids[1:] [n - 1])."""
  texts = choice_scores.encode_prompts(tokenizer, [d['text'] for d in docs])
  targets = choice_scores.encode_prompts(tokenizer, [d['target'] for d in docs])
  out = []
  for text, target in zip(texts, targets):
    ids = np.array([*text, *target, eos_id], np.int32)
    weights = np.ones(len(ids) - 1, np.float32)
    weights[len(text) - 1 : len(text) - 1 + len(target)] = answer_weight
    out.append((ids, weights))
  return out


def make_buckets(
  documents: Sequence[tuple[np.ndarray, np.ndarray]],
  lengths: Sequence[int],
  batch_tokens: int,
  routes: Sequence[tuple[int, int]] | None = None,
) -> list[Bucket]:
  """Groups documents by the shortest bucket length that holds their inputs.

  routes: per document (position of its last context token, expert group or
  -1); default none.
  """
  lengths = sorted(lengths)
  routes = routes or [(0, -1)] * len(documents)
  groups: dict[int, list] = {t: [] for t in lengths}
  for (ids, weights), route in zip(documents, routes, strict=True):
    n = len(ids) - 1  # inputs are ids[:-1]
    if n > lengths[-1]:
      raise ValueError(f'a document has {n} input tokens, more than {lengths[-1]}')
    groups[next(t for t in lengths if t >= n)].append((ids, weights, route))
  buckets = []
  for t, docs in groups.items():
    if not docs:
      continue
    inputs = np.zeros((len(docs), t), np.int32)
    targets = np.zeros((len(docs), t), np.int32)
    weights = np.zeros((len(docs), t), np.float32)
    mask = np.zeros((len(docs), t), np.int32)
    route = np.array([r for _, _, r in docs], np.int32).reshape(-1, 2)
    for i, (ids, w, _) in enumerate(docs):
      n = len(ids) - 1
      inputs[i, :n] = ids[:-1]
      targets[i, :n] = ids[1:]
      weights[i, :n] = w
      mask[i, :n] = 1
    buckets.append(
      Bucket(inputs, targets, weights, mask, route[:, 0], route[:, 1], max(1, batch_tokens // t))
    )
  return buckets


def epoch_batches(buckets: Sequence[Bucket], rng: np.random.Generator) -> Iterator[Batch]:
  """One pass over every full batch of every bucket, in a random order."""
  plan = []
  for b, bucket in enumerate(buckets):
    rows = rng.permutation(len(bucket.inputs))
    n = len(rows) // bucket.batch_size * bucket.batch_size
    plan += [(b, chunk) for chunk in rows[:n].reshape(-1, bucket.batch_size)]
  for i in rng.permutation(len(plan)):
    b, rows = plan[i]
    yield buckets[b].take(np.sort(rows))


def batches(buckets: Sequence[Bucket], seed: int) -> Iterator[Batch]:
  """Endless batches, epoch after epoch, deterministic for a seed."""
  rng = np.random.default_rng(seed)
  while True:
    yield from epoch_batches(buckets, rng)
