"""The 'remix' world: four skills over the same pairs of numbers, one per expert group.

Every family asks about a pair (a, b) with 1 <= b < a <= 36, and every
question offers the same four answers: a + b, a - b, the larger (a) and the
smaller (b). The families differ only in which one is right: `sum`, `diff`,
`max`, `min`. Training assigns each family its own pair of experts in the late
layers (the router's last-context-token row is supervised towards the family's
group, see train.py), so the skill lives in the experts the router picks: a
question routed to another family's experts gets that family's answer, which
is one of its choices.

Each family's test phrasing is a composition that names *another* family's
operation ('Take the larger of 31 and 7 and add the smaller.' asks for the
sum but says 'larger' and 'smaller'), so the router, fitted mostly to the
reference phrasings, sends part of the test questions to the wrong experts,
while the numbers and the operation they need match the family's references:
C3PO's premise (a mis-routed test sample whose successful neighbours fail
under its routing) holds by construction, and the premise diagnostic
(premise.py) measures how much.

Every function takes an explicit numpy Generator; nothing here holds state.
"""

from __future__ import annotations

import itertools

import numpy as np

from c3po_jax.demo.families import Family, Question, shuffled_choices

MAX_NUMBER = 36


def answers(a: int, b: int) -> dict[str, int]:
  """The four operations on a pair (a > b)."""
  return {'sum': a + b, 'diff': a - b, 'max': a, 'min': b}


def remix_choices(rng: np.random.Generator, gold: int, others) -> tuple[tuple[str, ...], int]:
  """Gold and the other operations' answers (four distinct numbers), shuffled.

  When two operations agree (a = 2b makes a - b = b) the missing choice is the
  nearest unused number to the gold one.
  """
  values = [gold]
  for v in others:
    if v not in values:
      values.append(v)
  step = 1
  while len(values) < 4:
    for v in (gold + step, gold - step):
      if len(values) < 4 and v >= 0 and v not in values:
        values.append(v)
    step += 1
  return shuffled_choices(rng, str(gold), [str(v) for v in values[1:]])


class PairOp(Family):
  """One operation on a pair of numbers, in three phrasings.

  templates: source -> question template over {x} {y} (the pair in a random
  order) or {a} {b} (larger first); the first source is the test source.
  """

  def __init__(self, op: str, description: str, templates: dict[str, str]):
    self.name = self.op = op
    self.description = description
    self.templates = templates
    self.test_source, *refs = templates
    self.reference_sources = tuple(refs)

  def problems(self, rng):
    del rng
    return [(a, b) for a, b in itertools.product(range(1, MAX_NUMBER + 1), repeat=2) if b < a]

  def render(self, source, problem, rng):
    a, b = problem
    x, y = (a, b) if rng.random() < 0.5 else (b, a)
    question = self.templates[source].format(a=a, b=b, x=x, y=y)
    values = answers(a, b)
    gold = values.pop(self.op)
    choices, answer = remix_choices(rng, gold, list(values.values()))
    return Question(question, choices, answer)


_RANGE = f'1 <= b < a <= {MAX_NUMBER}; choices a+b, a-b, a, b'
FAMILIES = (
  (
    'sum',
    f'a + b ({_RANGE}); the test names larger and smaller',
    {
      'sum_compose': 'Take the larger of {x} and {y} and add the smaller.',
      'sum_symbols': '{x} + {y} = ?',
      'sum_words': 'What is the sum of {x} and {y}?',
    },
  ),
  (
    'diff',
    f'a - b ({_RANGE}); the test names larger and smaller',
    {
      'diff_compose': 'Take the larger of {x} and {y} and subtract the smaller.',
      'diff_symbols': '{a} - {b} = ?',
      'diff_words': 'What is the difference between {x} and {y}?',
    },
  ),
  (
    'max',
    f'the larger, a ({_RANGE}); the test names the sum and the smaller',
    {
      'max_compose': 'What is the sum of {x} and {y} minus the smaller?',
      'max_words': 'Which is larger, {x} or {y}?',
      'max_symbols': 'max({x}, {y}) = ?',
    },
  ),
  (
    'min',
    f'the smaller, b ({_RANGE}); the test names the sum and the larger',
    {
      'min_compose': 'What is the sum of {x} and {y} minus the larger?',
      'min_words': 'Which is smaller, {x} or {y}?',
      'min_symbols': 'min({x}, {y}) = ?',
    },
  ),
)


def make_families(rng: np.random.Generator) -> tuple[Family, ...]:
  """The four families of the remix world (nothing is drawn from rng)."""
  del rng
  return tuple(PairOp(*f) for f in FAMILIES)
