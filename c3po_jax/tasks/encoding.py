"""Examples -> formatted prompts -> token ids (`EncodedPrompt`)."""

from __future__ import annotations

import dataclasses
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

  def context_of(self, choice: int) -> tuple[int, ...]:
    return self.context if self.choice_contexts is None else self.choice_contexts[choice]


def encode(tokenizer, example: Example, fmt: str, fewshot: Sequence[Example] = ()) -> EncodedPrompt:
  """Formats `example` ('mc' or 'rc', with optional demonstrations) and tokenizes it."""
  prompt = format_example(example, fmt, fewshot=fewshot)
  chars = tuple(max(len(c), 1) for c in prompt.continuations)  # OLMES acc_per_char
  if prompt.choice_contexts is None or fmt == 'mc':
    context, conts = encode_prompt(tokenizer, prompt.context, prompt.continuations)
    if fmt == 'mc' and any(len(c) != 1 for c in conts):
      raise ValueError(
        f'{example.task}/{example.id}: an answer letter is not a single token with this tokenizer'
      )
    return EncodedPrompt(
      context=tuple(context),
      continuations=tuple(tuple(c) for c in conts),
      gold=prompt.gold,
      cont_chars=chars,
      fmt=fmt,
    )
  contexts, conts = [], []
  for ctx, cont in prompt.pairs():
    c_ids, (cont_ids,) = encode_prompt(tokenizer, ctx, [cont])
    contexts.append(tuple(c_ids))
    conts.append(tuple(cont_ids))
  return EncodedPrompt(
    context=contexts[0],
    continuations=tuple(conts),
    gold=prompt.gold,
    cont_chars=chars,
    fmt=fmt,
    choice_contexts=tuple(contexts),
  )
