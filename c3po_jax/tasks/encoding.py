"""Examples -> formatted prompts -> token ids (`EncodedPrompt`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Sequence

from c3po_jax.tasks import Example, format_example
from c3po_jax.tasks.tokenizer import encode_prompt


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
  """One tokenized multiple-choice sample.

  fmt 'mc': `continuations` are single answer-letter tokens, predicted at the
  last context token. fmt 'rc': each continuation is appended to the context.
  """

  context: tuple[int, ...]
  continuations: tuple[tuple[int, ...], ...]
  gold: int
  cont_chars: tuple[int, ...]  # characters of each continuation (acc_norm)
  fmt: str
  # rc only: per-choice contexts (WinoGrande's partial scoring); else None.
  choice_contexts: tuple[tuple[int, ...], ...] | None = None
  # Longer than max_len tokens: the model sees only its last max_len (left-truncated).
  truncated: bool = False

  def context_of(self, choice: int) -> tuple[int, ...]:
    return self.context if self.choice_contexts is None else self.choice_contexts[choice]


def content_hash(prompt: EncodedPrompt) -> str:
  """sha256 (hex, 20 chars) of what a prompt's states and rows are computed from.

  Its tokens (context, per-choice contexts, continuations), format and gold:
  anything cached across runs is keyed by it, never by a sample's id alone
  (ids repeat across data files and draws).
  """
  parts = [prompt.fmt, prompt.context, prompt.choice_contexts, prompt.continuations, prompt.gold]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token(tokenizer) -> int:
  """The most characters one token of the tokenizer's vocabulary covers (a bound)."""
  if tokenizer not in _LONGEST:
    _LONGEST[tokenizer] = max(len(t) for t in tokenizer.get_vocab())
  return _LONGEST[tokenizer]


def tail(tokenizer, text: str, max_len: int) -> str:
  """The end of text holding at least 2 x max_len tokens, or all of it.

  Windows of 8 x max_len characters, growing 4-fold, are tokenized until one
  holds enough tokens: a cut that far back leaves the last max_len tokens as
  the whole text gives them, and a 10 MB line costs a few windows, not the
  whole line.
  """
  size = 8 * max_len
  while size < len(text):
    if len(tokenizer(text[-size:], add_special_tokens=False)['input_ids']) >= 2 * max_len:
      return text[-size:]
    size *= 4
  return text


def encode(
  tokenizer,
  example: Example,
  fmt: str,
  fewshot: Sequence[Example] = (),
  *,
  max_len: int | None = None,
) -> EncodedPrompt:
  """Formats `example` ('mc' or 'rc', with optional demonstrations) and tokenizes it.

  max_len: the most tokens the model sees. Only the end of a long context is
  tokenized (`tail`), so a huge question costs no more than a long one;
  `truncated` says whether the model will see only the end.
  """
  prompt = format_example(example, fmt, fewshot=fewshot)
  chars = tuple(max(len(c), 1) for c in prompt.continuations)  # OLMES acc_per_char
  context, choice_contexts = prompt.context, prompt.choice_contexts
  cut = False
  if max_len is not None:
    budget = 2 * max_len * longest_token(tokenizer)
    if any(len(c) > budget for c in prompt.continuations):
      raise ValueError(
        f'{example.task}/{example.id}: a choice is longer than --max_len={max_len} tokens hold'
      )
    context = tail(tokenizer, context, max_len)
    cut = len(context) < len(prompt.context)
    if choice_contexts is not None:
      # Each choice's context extends the shared one: cut it as much.
      drop = len(prompt.context) - len(context)
      choice_contexts = tuple(c[drop:] for c in choice_contexts)
  if choice_contexts is None or fmt == 'mc':
    context_ids, conts = encode_prompt(tokenizer, context, prompt.continuations)
    if fmt == 'mc' and any(len(c) != 1 for c in conts):
      raise ValueError(
        f'{example.task}/{example.id}: an answer letter is not a single token with this tokenizer'
      )
    longest = max((len(c) for c in conts), default=0)
    return EncodedPrompt(
      context=tuple(context_ids),
      continuations=tuple(tuple(c) for c in conts),
      gold=prompt.gold,
      cont_chars=chars,
      fmt=fmt,
      truncated=cut or (max_len is not None and len(context_ids) + longest > max_len),
    )
  contexts, conts = [], []
  for ctx, cont in zip(choice_contexts, prompt.continuations):
    c_ids, (cont_ids,) = encode_prompt(tokenizer, ctx, [cont])
    contexts.append(tuple(c_ids))
    conts.append(tuple(cont_ids))
  too_long = max_len is not None and any(len(a) + len(b) > max_len for a, b in zip(contexts, conts))
  return EncodedPrompt(
    context=contexts[0],
    continuations=tuple(conts),
    gold=prompt.gold,
    cont_chars=chars,
    fmt=fmt,
    choice_contexts=tuple(contexts),
    truncated=cut or too_long,
  )
