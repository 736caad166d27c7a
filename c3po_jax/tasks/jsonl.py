"""The generic multiple-choice JSONL format, read and written.

One JSON object per line:

  {"id": "q1", "question": "...", "choices": ["...", "..."], "answer": 0}

`answer` is the 0-based index of the gold choice. Optional: "task" (default:
the file name without `.jsonl[.gz]`; a registry name such as
"arc_challenge" selects that benchmark's prompt strings), "subject",
"split", "choice_labels". Other keys are ignored. Ids must be unique within
a task. This is also the format of the project's generated demo suite.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable

from c3po_jax.common.errors import TaskDataError
from c3po_jax.tasks.example import Example
from c3po_jax.tasks.rows import JSONL_SUFFIXES, read_rows

_REQUIRED = ('id', 'question', 'choices', 'answer')


def default_task(path: str) -> str:
  """Task name of rows without one: the file name less its JSONL suffix."""
  name = os.path.basename(str(path))
  for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


def read_jsonl(path: str, *, limit: int | None = None) -> list[Example]:
  """Examples of a generic multiple-choice JSONL file, in file order.

  Raises:
    TaskDataError: a malformed line (names the file and 1-based line number):
      invalid JSON, a missing or mistyped field, fewer than 2 choices, answer
      out of range, a duplicate id.
  """
  task = default_task(path)
  out: list[Example] = []
  first_line: dict[tuple[str, str], int] = {}
  for row in read_rows(path):
    if limit is not None and len(out) >= limit:
      break
    data = row.data
    for key in _REQUIRED:
      if key not in data:
        raise row.error(f'missing field {key!r}')
    if not isinstance(data['id'], str):
      raise row.error(f"field 'id' must be a string, got {type(data['id']).__name__}")
    if not isinstance(data['choices'], list):
      raise row.error(f"field 'choices' must be a list, got {type(data['choices']).__name__}")
    try:
      example = Example(
        id=data['id'],
        task=data.get('task', task),
        context=data['question'],
        choices=tuple(data['choices']),
        gold=data['answer'],
        choice_labels=data.get('choice_labels'),
        subject=data.get('subject'),
        split=data.get('split'),
      )
    except ValueError as e:
      raise row.error(str(e)) from None
    key = (example.task, example.id)
    if key in first_line:
      raise row.error(
        f'duplicate id {example.id!r} in task {example.task!r} (first on line {first_line[key]})'
      )
    first_line[key] = row.number
    out.append(example)
  return out


def example_to_json(example: Example) -> dict:
  """The JSONL record of one Example (optional keys only when set)."""
  record = {
    'id': example.id,
    'task': example.task,
    'question': example.context,
    'choices': list(example.choices),
    'answer': example.gold,
  }
  for key in ('choice_labels', 'subject', 'split'):
    value = getattr(example, key)
    if value is not None:
      record[key] = list(value) if isinstance(value, tuple) else value
  return record


def write_jsonl(path: str, examples: Iterable[Example]) -> int:
  """Writes Examples as generic JSONL (gzip if the name ends in .gz); returns the count."""
  opener = gzip.open if str(path).endswith('.gz') else open
  n = 0
  seen = set()
  with opener(path, 'wt', encoding='utf-8') as f:
    for example in examples:
      if (example.task, example.id) in seen:
        raise TaskDataError(path, n + 1, f'duplicate id {example.id!r} in task {example.task!r}')
      seen.add((example.task, example.id))
      f.write(json.dumps(example_to_json(example), ensure_ascii=False) + '\n')
      n += 1
  return n
