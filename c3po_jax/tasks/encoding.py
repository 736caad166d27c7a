"""Examples -> formatted prompts -> token ids (`EncodedPrompt`)."""

from __future__ import annotations

import dataclasses
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


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def longest_token(tokenizer) -> int:
  """The most characters one token of the tokenizer's vocabulary covers (a bound)."""
  if tokenizer not in _LONGEST:
    _LONGEST[tokenizer] = max(len(t) for t in tokenizer.get_vocab())
  return _LONGEST[tokenizer]


def encode(
  tokenizer,
  example: Example,
  fmt: str,
  fewshot: Sequence[Example] = (),
  *,
  max_len: int | None = None,
) -> EncodedPrompt:
  """Formats `example` ('mc' or 'rc', with optional demonstrations) and tokenizes it.

  max_len: the most tokens the model sees. Only a context's last
  2 x max_len x (longest token) characters are tokenized, so a huge question
  costs no more than a long one (the cut is far before the last max_len
  tokens); `truncated` says whether the model will see only the end.
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
    texts = (context,) + (choice_contexts or ())
    cut = any(len(t) > budget for t in texts)
    context = context[-budget:]
    if choice_contexts is not None:
      choice_contexts = tuple(c[-budget:] for c in choice_contexts)
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
