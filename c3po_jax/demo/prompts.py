"""The prompts of the demo suite: the generic-task prompts of c3po_jax.tasks.

The strings are those of c3po_jax.tasks.prompts for a task with the default
style (OLMES's), so the demo model is trained on exactly what the engine shows
it. 'rc' (the suite's default):

  Question: What is 3 plus 4?
  Answer:

with one continuation per choice, ' 7', ' 8', ... (the suite's numbers and
names are single tokens, so the answer is decided at the last prompt token,
':', whose routing C3PO re-mixes). 'mc' lists lettered options before
'Answer:' and its continuations are ' A', ' B', ...
"""

from __future__ import annotations

from collections.abc import Sequence

LETTERS = 'ABCDE'
FORMATS = ('rc', 'mc')


def format_mc(question: str, choices: Sequence[str]) -> str:
  """The mc prompt, ending in 'Answer:' (no trailing space)."""
  if not 2 <= len(choices) <= len(LETTERS):
    raise ValueError(f'{len(choices)} choices; the demo supports 2 to {len(LETTERS)}')
  options = '\n'.join(f' {k}. {c}' for k, c in zip(LETTERS, choices))
  return f'Question: {question}\n{options}\nAnswer:'


def format_rc(question: str) -> str:
  """The rc context, ending in 'Answer:' (no trailing space)."""
  return f'Question: {question}\nAnswer:'


def answer_text(index: int) -> str:
  """The mc continuation of choice `index`: ' A', ' B', ..."""
  return ' ' + LETTERS[index]


def format_question(question: str, choices: Sequence[str], fmt: str) -> tuple[str, list[str]]:
  """(context, one continuation per choice) in format fmt ('rc' or 'mc')."""
  if fmt == 'rc':
    return format_rc(question), [' ' + c for c in choices]
  if fmt == 'mc':
    return format_mc(question, choices), [answer_text(i) for i in range(len(choices))]
  raise ValueError(f'unknown demo prompt format {fmt!r}; want one of {FORMATS}')
