"""One multiple-choice question, task-neutral (bad data raises `common.errors`' TaskDataError).

An `Example` holds the data only (the question as given and its choices);
how it is shown to a model is `prompts.format_example`'s business.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Example:
  """A multiple-choice question with its gold answer.

  Attributes:
    id: unique within `task`.
    task: benchmark name (a registry name such as 'arc_challenge' selects that
      benchmark's prompt strings) or any user task name.
    context: the question or stem as given (HellaSwag: activity label and
      preprocessed context; WinoGrande: the sentence with its '_' blank;
      Social IQa: context and question).
    choices: answer texts, at least two.
    gold: index of the correct choice.
    choice_labels: the dataset's own labels of the choices ('A'.., '1'..),
      when it has them; prompts always letter choices A, B, C, ...
    subject: MMLU subject (e.g. 'college_physics'); None elsewhere.
    split: the dataset split the row came from, when known.
  """

  id: str
  task: str
  context: str
  choices: tuple[str, ...]
  gold: int
  choice_labels: tuple[str, ...] | None = None
  subject: str | None = None
  split: str | None = None

  def __post_init__(self):
    for name in ('id', 'task', 'context'):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f'{name} must be a string, got {type(getattr(self, name)).__name__}')
    if not self.id:
      raise ValueError('id is empty')
    if not self.task:
      raise ValueError('task is empty')
    if isinstance(self.choices, str) or not hasattr(self.choices, '__iter__'):
      raise ValueError(f'choices must be a list of strings, got {type(self.choices).__name__}')
    choices = tuple(self.choices)
    object.__setattr__(self, 'choices', choices)
    if len(choices) < 2:
      raise ValueError(f'needs at least 2 choices, got {len(choices)}')
    for i, c in enumerate(choices):
      if not isinstance(c, str):
        raise ValueError(f'choice {i} must be a string, got {type(c).__name__}')
    if isinstance(self.gold, bool) or not isinstance(self.gold, int):
      raise ValueError(f'gold must be an integer, got {self.gold!r}')
    if not 0 <= self.gold < len(choices):
      raise ValueError(f'gold {self.gold} out of range for {len(choices)} choices')
    if self.choice_labels is not None:
      if isinstance(self.choice_labels, str):
        raise ValueError('choice_labels must be a list of strings, got a string')
      labels = tuple(str(x) for x in self.choice_labels)
      object.__setattr__(self, 'choice_labels', labels)
      if len(labels) != len(choices):
        raise ValueError(f'{len(labels)} choice labels for {len(choices)} choices')

  @property
  def answer(self) -> str:
    """The gold choice's text."""
    return self.choices[self.gold]
