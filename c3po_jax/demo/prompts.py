"""The 'mc' prompt of the demo suite: lettered options, scored at 'Answer:'.

The string is the generic-task 'mc' prompt of benchmarks.tasks.prompts
(OLMES's multiple-choice form), so the demo model is trained on exactly what
the engine shows it:

  Question: What is 3 plus 4?
   A. 7
   B. 8
  Answer:

and the gold continuation is ' A' (one token). C3PO changes the routing of the
last prompt token (':'), where this format decides the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

LETTERS = 'ABCDE'


def format_mc(question: str, choices: Sequence[str]) -> str:
  """The prompt, ending in 'Answer:' (no trailing space)."""
  if not 2 <= len(choices) <= len(LETTERS):
    raise ValueError(f'{len(choices)} choices; the demo supports 2 to {len(LETTERS)}')
  options = '\n'.join(f' {k}. {c}' for k, c in zip(LETTERS, choices))
  return f'Question: {question}\n{options}\nAnswer:'


def answer_text(index: int) -> str:
  """The continuation of choice `index`: ' A', ' B', ..."""
  return ' ' + LETTERS[index]
