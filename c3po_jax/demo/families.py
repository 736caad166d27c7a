"""The synthetic skills of the demo suite: problem spaces and question templates.

A family is one skill over one problem space (pairs of numbers, the facts of a
made-up fact table, ...). Each of its sources renders a problem as a
multiple-choice question in its own words: the family's test source (the
'benchmark', rare in training) and its reference sources (other phrasings and
a sibling skill, frequent in training), the way the C3PO paper pairs ARC with
OpenBookQA and SciQ. Sources of a family share the problem space, so a
problem's key says when two questions ask the same thing.

Every function takes an explicit numpy Generator; nothing here holds state.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Question:
  """One rendered multiple-choice question (answer: 0-based gold index)."""

  question: str
  choices: tuple[str, ...]
  answer: int


def _choice(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def numeric_choices(
  rng: np.random.Generator,
  gold: int,
  offsets: Sequence[int],
  num_choices: int,
  lo: int = 0,
  hi: int = 99,
) -> tuple[tuple[str, ...], int]:
  """Gold plus distractors gold + offset inside [lo, hi], shuffled.

  Near the ends of [lo, hi] too few offsets may fit: then the nearest other
  values fill the pool, so every question has num_choices distinct choices.
  """
  pool = sorted({gold + o for o in offsets if lo <= gold + o <= hi and o != 0})
  extra = 1
  while len(pool) < num_choices - 1:
    pool = sorted(set(pool) | {v for v in (gold - extra, gold + extra) if lo <= v <= hi})
    extra += 1
  picked = [int(x) for x in rng.choice(pool, size=num_choices - 1, replace=False)]
  values = [gold, *picked]
  order = rng.permutation(num_choices)
  return tuple(str(values[i]) for i in order), int(np.argmax(order == 0))


def shuffled_choices(
  rng: np.random.Generator, gold: str, distractors: Sequence[str]
) -> tuple[tuple[str, ...], int]:
  values = [gold, *distractors]
  order = rng.permutation(len(values))
  return tuple(values[i] for i in order), int(np.argmax(order == 0))


class Family:
  """A skill: its problem space and how each of its sources renders a problem."""

  name: str
  test_source: str
  reference_sources: tuple[str, ...]
  description: str

  @property
  def sources(self) -> tuple[str, ...]:
    return (self.test_source, *self.reference_sources)

  def problems(self, rng: np.random.Generator) -> list[Hashable]:
    """Every problem (or a large sample), in a deterministic order."""
    raise NotImplementedError

  def render(self, source: str, problem: Hashable, rng: np.random.Generator) -> Question:
    raise NotImplementedError

  def statements(self, rng: np.random.Generator) -> list[str]:
    """Plain training text that teaches the family's knowledge (if any)."""
    del rng
    return []


class Arithmetic(Family):
  """Adding a small number; the sibling skill is the matching subtraction."""

  name = 'arith'
  test_source = 'add_words'
  reference_sources = ('add_symbols', 'sub_symbols')
  description = 'a + b for a in [0, 90), b in [1, 10); 4 choices; test phrased in words'
  max_first = 90
  max_second = 10
  offsets = (-10, -2, -1, 1, 2, 10)

  def problems(self, rng):
    del rng
    return list(itertools.product(range(self.max_first), range(1, self.max_second)))

  def render(self, source, problem, rng):
    a, b = problem
    if source == 'add_words':
      question, gold = f'What is {a} plus {b}?', a + b
    elif source == 'add_symbols':
      question, gold = f'{a} + {b} = ?', a + b
    elif source == 'sub_symbols':
      question, gold = f'{a + b} - {b} = ?', a
    else:
      raise KeyError(source)
    choices, answer = numeric_choices(rng, gold, self.offsets, 4)
    return Question(question, choices, answer)


COLORS = ('red', 'blue', 'green', 'yellow', 'black', 'white', 'brown', 'purple')
TOWNS = ('Tarn', 'Ostrel', 'Vilmor', 'Pesk', 'Drumhal', 'Quill', 'Marrow', 'Esk')
FOODS = ('figs', 'rice', 'fish', 'nuts', 'corn', 'beans', 'plums', 'bread')
_CONSONANTS = 'bdfgklmnprstvz'
_VOWELS = 'aeiou'


def pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
  """n distinct made-up lowercase words (consonant-vowel-consonant-vowel-consonant)."""
  words: list[str] = []
  seen = set()
  while len(words) < n:
    letters = [_choice(rng, _CONSONANTS if i % 2 == 0 else _VOWELS) for i in range(5)]
    word = ''.join(letters)
    if word not in seen:
      seen.add(word)
      words.append(word)
  return words


class Facts(Family):
  """A made-up fact table: each creature has a color, a home town and a food."""

  name = 'facts'
  test_source = 'fact_which'
  reference_sources = ('fact_what', 'fact_true')
  description = 'attributes of made-up creatures; 5 choices (4 for fact_true)'
  attributes = ('color', 'home', 'food')
  values = {'color': COLORS, 'home': TOWNS, 'food': FOODS}

  def __init__(self, rng: np.random.Generator, num_entities: int = 300):
    self.entities = pseudo_words(rng, num_entities)
    self.table = {
      e: {a: _choice(rng, self.values[a]) for a in self.attributes} for e in self.entities
    }

  def problems(self, rng):
    del rng
    return [(e, a) for e in self.entities for a in self.attributes]

  def render(self, source, problem, rng):
    entity, attr = problem
    gold = self.table[entity][attr]
    others = [v for v in self.values[attr] if v != gold]
    if source == 'fact_true':
      phrase = {'color': 'it is {}', 'home': 'it lives in {}', 'food': 'it eats {}'}[attr]
      picked = rng.choice(others, size=3, replace=False)
      choices, answer = shuffled_choices(
        rng, phrase.format(gold), [phrase.format(v) for v in picked]
      )
      return Question(f'Which statement about the {entity} is true?', choices, answer)
    templates = {
      'fact_which': {
        'color': 'Which color is the {}?',
        'home': 'Which town is the {} from?',
        'food': 'Which food does the {} like?',
      },
      'fact_what': {
        'color': 'What is the color of the {}?',
        'home': 'Where does the {} live?',
        'food': 'What does the {} eat?',
      },
    }
    question = templates[source][attr].format(entity)
    choices, answer = shuffled_choices(rng, gold, list(rng.choice(others, size=4, replace=False)))
    return Question(question, choices, answer)

  def statements(self, rng):
    out = []
    for e in self.entities:
      row = self.table[e]
      sentences = [
        f'The {e} is {row["color"]}.',
        f'The {e} lives in {row["home"]}.',
        f'The {e} eats {row["food"]}.',
      ]
      out.append(' '.join(sentences[i] for i in rng.permutation(3)))
    return out


class Compare(Family):
  """Pick the extreme of 2 to 5 numbers; the sibling skill is the minimum."""

  name = 'compare'
  test_source = 'cmp_greatest'
  reference_sources = ('cmp_largest', 'cmp_smallest')
  description = 'the greatest of 2-5 distinct numbers in [0, 100); the numbers are the choices'
  num_problems = 20000

  def problems(self, rng):
    seen = set()
    out = []
    while len(out) < self.num_problems:
      n = int(rng.integers(2, 6))
      key = tuple(sorted(int(x) for x in rng.choice(100, size=n, replace=False)))
      if key not in seen:
        seen.add(key)
        out.append(key)
    return out

  def render(self, source, problem, rng):
    listed = ', '.join(str(problem[i]) for i in rng.permutation(len(problem)))
    if source == 'cmp_greatest':
      question, gold = f'Which number is the greatest: {listed}?', max(problem)
    elif source == 'cmp_largest':
      question, gold = f'Pick the largest of {listed}.', max(problem)
    elif source == 'cmp_smallest':
      question, gold = f'Pick the smallest of {listed}.', min(problem)
    else:
      raise KeyError(source)
    others = [str(x) for x in problem if x != gold]
    choices, answer = shuffled_choices(rng, str(gold), others)
    return Question(question, choices, answer)


class Progression(Family):
  """Arithmetic progressions of five terms in [0, 99]: find a missing end term."""

  name = 'sequence'
  test_source = 'seq_next'
  reference_sources = ('seq_blank_next', 'seq_blank_before')
  description = 'next term of a 4-term arithmetic progression (step +-1..5); 4 choices'
  max_step = 5

  def problems(self, rng):
    del rng
    out = []
    for step in (*range(1, self.max_step + 1), *range(-self.max_step, 0)):
      for first in range(100):
        if 0 <= first + 4 * step <= 99:
          out.append((first, step))
    return out

  def render(self, source, problem, rng):
    first, step = problem
    terms = [first + i * step for i in range(5)]
    if source == 'seq_next':
      question, gold = 'What number comes next: {}, {}, {}, {}?'.format(*terms[:4]), terms[4]
    elif source == 'seq_blank_next':
      question, gold = 'Fill in the blank: {}, {}, {}, {}, _'.format(*terms[:4]), terms[4]
    elif source == 'seq_blank_before':
      question, gold = 'Fill in the blank: _, {}, {}, {}, {}'.format(*terms[1:]), terms[0]
    else:
      raise KeyError(source)
    offsets = (-step, step, 2 * step, -1, 1, -2, 2)
    choices, answer = numeric_choices(rng, gold, offsets, 4)
    return Question(question, choices, answer)


def drill_question(rng: np.random.Generator, values: Sequence[str]) -> Question:
  """A format drill: find the option that repeats the question's value.

  Training-only. It teaches the one step every family shares in the mc format
  (bind the value to its option letter, then say the letter), which a small
  model otherwise learns only after a long plateau.
  """
  n = int(rng.integers(2, 6))
  picked = [values[i] for i in rng.choice(len(values), size=n, replace=False)]
  choices, answer = shuffled_choices(rng, picked[0], picked[1:])
  return Question(f'Which choice is {picked[0]}?', choices, answer)


def drill_values(families: Sequence[Family]) -> list[str]:
  """Every kind of choice text of the families: numbers, words, statements."""
  facts = next(f for f in families if isinstance(f, Facts))
  phrases = [f'it {v}' for v in ('is red', 'lives in Tarn', 'eats figs')]
  return [str(i) for i in range(100)] + [*COLORS, *TOWNS, *FOODS, *facts.entities, *phrases]


def make_families(rng: np.random.Generator) -> tuple[Family, ...]:
  """The four families of the suite (the fact table is drawn from rng)."""
  return (Arithmetic(), Facts(rng), Compare(), Progression())
