"""Hugging Face rows of each benchmark -> `Example`.

One function per dataset format, `adapter(data, *, task, split, index)`, with
`index` the 0-based row number in its split (ids of datasets without their
own ids are `'{split}-{index}'`). A missing or bad field raises `ValueError`
with a plain reason; the loader adds the file and row.

Text preprocessing follows OLMES (lm-evaluation-harness's, with OLMES's
fixes) so prompts match theirs: HellaSwag's WikiHow bracket clean-up and activity-label stem, Social
IQa's 'context question' stem, SciQ without its support passage.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

from c3po_jax.tasks.example import Example

Adapter = Callable[..., Example]


def _get(data: Mapping[str, Any], name: str) -> Any:
  if name not in data or data[name] is None:
    raise ValueError(f'missing field {name!r}')
  return data[name]


def _text(data: Mapping[str, Any], name: str) -> str:
  value = _get(data, name)
  if not isinstance(value, str):
    raise ValueError(f'field {name!r} must be a string, got {type(value).__name__}')
  return value


def _label_int(value: Any, name: str) -> int:
  """Integer label from an int or a numeric string ('' or -1 marks unlabelled test rows)."""
  if isinstance(value, bool):
    raise ValueError(f'field {name!r} must be an integer label, got {value!r}')
  if isinstance(value, int):
    out = value
  elif isinstance(value, str) and re.fullmatch(r'-?\d+', value.strip()):
    out = int(value)
  else:
    raise ValueError(f'field {name!r} is not an integer label: {value!r} (unlabelled split?)')
  if out < 0:
    raise ValueError(f'field {name!r} is {out} (unlabelled split?)')
  return out


def _labelled_choices(data: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """ARC/OBQA/CSQA `choices: {text: [...], label: [...]}`."""
  choices = _get(data, 'choices')
  if not isinstance(choices, Mapping) or 'text' not in choices or 'label' not in choices:
    raise ValueError("field 'choices' must be an object with 'text' and 'label' lists")
  texts, labels = list(choices['text']), [str(x) for x in choices['label']]
  if len(texts) != len(labels):
    raise ValueError(f'{len(texts)} choice texts but {len(labels)} labels')
  return texts, labels


def _answer_key_index(data: Mapping[str, Any], labels: list[str]) -> int:
  key = str(_get(data, 'answerKey')).strip()
  if key not in labels:
    raise ValueError(f'answerKey {key!r} is not one of the choice labels {labels}')
  return labels.index(key)


def arc(data, *, task, split, index) -> Example:
  """ARC-Easy/Challenge: {id, question, choices: {text, label}, answerKey}."""
  del index
  texts, labels = _labelled_choices(data)
  return Example(
    id=str(_get(data, 'id')),
    task=task,
    context=_text(data, 'question'),
    choices=tuple(texts),
    gold=_answer_key_index(data, labels),
    choice_labels=tuple(labels),
    split=split,
  )


def openbookqa(data, *, task, split, index) -> Example:
  """OpenBookQA 'main': {id, question_stem, choices: {text, label}, answerKey}."""
  del index
  texts, labels = _labelled_choices(data)
  return Example(
    id=str(_get(data, 'id')),
    task=task,
    context=_text(data, 'question_stem'),
    choices=tuple(texts),
    gold=_answer_key_index(data, labels),
    choice_labels=tuple(labels),
    split=split,
  )


def commonsense_qa(data, *, task, split, index) -> Example:
  """CommonsenseQA: {id, question, question_concept, choices: {label, text}, answerKey}."""
  return arc(data, task=task, split=split, index=index)


def sciq(data, *, task, split, index) -> Example:
  """SciQ: {question, distractor1-3, correct_answer, support}.

  lm-eval and OLMES rank [distractor1, distractor2, distractor3, correct]
  (gold always last). Ranked classification does not care about order, but a
  lettered prompt would always answer 'D', so the four are shuffled with a
  seed taken from the question and answer text (stable under row reordering).
  """
  question = _text(data, 'question')
  correct = _text(data, 'correct_answer')
  texts = [_text(data, f'distractor{i}') for i in (1, 2, 3)] + [correct]
  seed = int.from_bytes(hashlib.sha256(f'{question}\x00{correct}'.encode()).digest()[:8], 'big')
  order = list(range(4))
  random.Random(seed).shuffle(order)
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=question,
    choices=tuple(texts[i] for i in order),
    gold=order.index(3),
    split=split,
  )


def piqa(data, *, task, split, index) -> Example:
  """PIQA: {goal, sol1, sol2, label}."""
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=_text(data, 'goal'),
    choices=(_text(data, 'sol1'), _text(data, 'sol2')),
    gold=_label_int(_get(data, 'label'), 'label'),
    split=split,
  )


def hellaswag_preprocess(text: str) -> str:
  """OLMES's HellaSwag clean-up of WikiHow artifacts.

  lm-eval's replaces ' [title]' by '. ', which doubles the full stop in
  'done. [title] Next'; OLMES (followed here) swallows an optional '.' first.
  """
  text = text.strip()
  text = re.sub(r'\.? \[title\]', '. ', text)
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(data, *, task, split, index) -> Example:
  """HellaSwag: {activity_label, ctx_a, ctx_b, endings, label}.

  Stem 'ACTIVITY: CTX_A Ctx_b' and endings, all preprocessed as in lm-eval.
  """
  endings = _get(data, 'endings')
  if isinstance(endings, str) or not isinstance(endings, list | tuple):
    raise ValueError("field 'endings' must be a list of strings")
  stem = (
    _text(data, 'activity_label')
    + ': '
    + _text(data, 'ctx_a')
    + ' '
    + _text(data, 'ctx_b').capitalize()
  )
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=hellaswag_preprocess(stem),
    choices=tuple(hellaswag_preprocess(e) if isinstance(e, str) else e for e in endings),
    gold=_label_int(_get(data, 'label'), 'label'),
    split=split,
  )


def winogrande(data, *, task, split, index) -> Example:
  """WinoGrande: {sentence (with one '_'), option1, option2, answer: '1' | '2'}."""
  sentence = _text(data, 'sentence')
  if '_' not in sentence:
    raise ValueError("field 'sentence' has no '_' blank")
  answer = _label_int(_get(data, 'answer'), 'answer')
  if answer not in (1, 2):
    raise ValueError(f"field 'answer' must be 1 or 2, got {answer}")
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=sentence,
    choices=(_text(data, 'option1'), _text(data, 'option2')),
    gold=answer - 1,
    split=split,
  )


def social_iqa(data, *, task, split, index) -> Example:
  """Social IQa: {context, question, answerA, answerB, answerC, label: '1'..'3'}."""
  label = _label_int(_get(data, 'label'), 'label')
  if label not in (1, 2, 3):
    raise ValueError(f"field 'label' must be 1, 2 or 3, got {label}")
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=_text(data, 'context') + ' ' + _text(data, 'question'),
    choices=(_text(data, 'answerA'), _text(data, 'answerB'), _text(data, 'answerC')),
    gold=label - 1,
    split=split,
  )


def mmlu(data, *, task, split, index, subject: str | None = None) -> Example:
  """MMLU (cais/mmlu, hails/mmlu_no_train): {question, subject, choices, answer}.

  `answer` is an index (a letter 'A'-'D' is accepted too). The row's subject
  wins over `subject` (the file's subject) when both are given.
  """
  choices = _get(data, 'choices')
  if isinstance(choices, str) or not isinstance(choices, list | tuple):
    raise ValueError("field 'choices' must be a list of strings")
  answer = _get(data, 'answer')
  if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
    answer = ord(answer.strip().upper()) - ord('A')
  subject = data.get('subject') or subject
  if not subject:
    raise ValueError("missing field 'subject'")
  return Example(
    id=f'{subject}-{split}-{index}',
    task=task,
    context=_text(data, 'question'),
    choices=tuple(choices),
    gold=_label_int(answer, 'answer'),
    subject=subject,
    split=split,
  )


def boolq(data, *, task, split, index) -> Example:
  """BoolQ (SuperGLUE; google/boolq): {question, passage, answer: bool}.

  Stem '{passage}\\nQuestion: {question}?' (OLMES's, whose prompt then adds
  '\\nAnswer:'), choices 'yes' / 'no'.
  """
  answer = _get(data, 'answer')
  if not isinstance(answer, bool):
    raise ValueError(f"field 'answer' must be true or false, got {answer!r}")
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=_text(data, 'passage') + '\nQuestion: ' + _text(data, 'question') + '?',
    choices=('yes', 'no'),
    gold=0 if answer else 1,
    split=split,
  )


def copa(data, *, task, split, index) -> Example:
  """COPA (SuperGLUE): {premise, choice1, choice2, question: 'cause' | 'effect', label}."""
  kind = _text(data, 'question')
  if kind not in ('cause', 'effect'):
    raise ValueError(f"field 'question' must be 'cause' or 'effect', got {kind!r}")
  return Example(
    id=f'{split}-{index}',
    task=task,
    context=f'{_text(data, "premise")} What was the {kind}?',
    choices=(_text(data, 'choice1'), _text(data, 'choice2')),
    gold=_label_int(_get(data, 'label'), 'label'),
    split=split,
  )
