"""The demo suite: four synthetic benchmark families with their reference sources.

Each family (see families.py) has a test source, the 'benchmark', and two
reference sources. Splits, per family:

  dev, test   test-source questions on held-out problems; dev is for
              choosing settings, test for reporting. The family's held-out
              problems (a `held_out_fraction` of them, at least dev + test)
              are split once, by `seed`, into a dev pool and a test pool
              (`pools`, hashed in the manifest): every draw takes dev only
              from the dev pool and test only from the test pool, so no
              draw's test problem was ever a dev problem of any draw. The
              seed's own draw is the leading problems of each pool (the
              shipped files); a fresh `draw_seed` samples each pool afresh.
  reference   reference-source questions on the other problems: the labelled
              pool C3PO draws its successful neighbours from. In the remix
              world also questions in the test phrasing on those problems
              (`test_phrasing_references`): references that resemble the
              test question, as the paper's do.
  train       the language-model training data. Reference sources dominate;
              the test source is rare (`test_train_fraction` of the family)
              and never asks a held-out problem. The knowledge the test
              questions need (the fact table, the arithmetic) is taught through
              the reference phrasings, so the model is partly right on the test
              phrasing and its router was fitted mostly to other phrasings.
              The facts family adds plain statements of the fact table; in
              the mc format a drill ('Which choice is 42?') teaches the letter
              binding every family shares.

No dev or test question text occurs in train or reference. Everything is a
function of the seed; each split draws from its own named random stream.

Written files (one per source and split, generic multiple-choice JSONL):
  {source}_{split}.jsonl  {"id", "task" (the source), "question", "choices",
                          "answer" (0-based gold), "split"}
  train_text.jsonl        {"text": prompt, "target": gold continuation or
                          "" (statements), "source"}: the LM training stream
  suite.json              the manifest: which reference files go with which
                          test family, the prompt format, sizes and sha256.

  python -m c3po_jax.demo.suite --seed=0 --output_dir=/tmp/demo_suite
  python -m c3po_jax.demo.suite --seed=0 --draw_seed=1 --output_dir=/tmp/fresh \
      --include_train=false --settings_from=checkpoints/demo/suite
  python -m c3po_jax.demo.suite --world=control ...   (the earlier world)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from c3po_jax.demo import families as families_lib
from c3po_jax.demo import remix_world, splits
from c3po_jax.demo.manifest import (  # the manifest's I/O, also used as suite.X
  FORMAT,
  copy_settings,
  read_manifest,  # noqa: F401 (suite.read_manifest is the public name)
  share_references,
  write_manifest,
)
from c3po_jax.demo.splits import (  # re-exported: suite.X is the public name
  SPLITS,  # noqa: F401
  check_no_leak,
  stream,
)
from c3po_jax.tasks import prompts

TRAIN_TEXT = 'train_text.jsonl'
FORMAT_VERSION = 2
EVAL_SPLITS = ('reference', 'dev', 'test')
# The worlds a suite can be drawn from: 'remix' (remix_world.py, the default demo:
# the skill lives in the experts the router picks) and 'control' (families.py,
# the earlier demo, kept as a negative control: its neighbours are answered
# confidently under any test routing).
WORLDS = {'remix': remix_world.make_families, 'control': families_lib.make_families}
# Whether a world's references include its test phrasing (other problems). In
# the remix world they do: with its plain phrasings alone, every neighbour is
# answered at near-zero loss once routed to the family's experts, so the
# neighbour loss cannot say more than "this family" (docs/demo_world.md, "Why the references include the test phrasing").
TEST_PHRASING_REFERENCES = {'remix': True, 'control': False}


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """Sizes of the suite. Counts are per source unless said otherwise."""

  seed: int = 0  # the world (fact table), train and reference splits
  world: str = 'remix'  # which families (WORLDS)
  draw_seed: int | None = None  # dev/test draw from the held-out problems (None: seed)
  fmt: str = 'rc'  # prompt format of train text and evaluation ('rc' or 'mc')
  num_dev: int = 100
  num_test: int = 100
  num_reference: int = 200
  num_train: int = 25000  # per family, all its sources together
  test_train_fraction: float = 0.002  # share of the family's train items (50 of 25000)
  held_out_fraction: float = 0.5  # problems never asked in the test phrasing in train
  statement_repeats: int = 10  # copies of the fact-table statements
  num_drill: int = 30000  # mc-format drill questions (train only; mc format only)
  # Also a reference split in the test phrasing (other problems than dev/test,
  # none held out). None: the world's default (TEST_PHRASING_REFERENCES).
  test_phrasing_references: bool | None = None

  def __post_init__(self):
    if self.fmt not in prompts.FORMATS:
      raise ValueError(f'fmt={self.fmt!r}; want one of {prompts.FORMATS}')
    if self.world not in WORLDS:
      raise ValueError(f'world={self.world!r}; want one of {sorted(WORLDS)}')

  @property
  def draw(self) -> int:
    return self.seed if self.draw_seed is None else self.draw_seed

  @property
  def phrasing_references(self) -> bool:
    if self.test_phrasing_references is None:
      return TEST_PHRASING_REFERENCES[self.world]
    return self.test_phrasing_references


def reference_sources(family: families_lib.Family, config: SuiteConfig) -> tuple[str, ...]:
  """The family's reference sources in this suite: its own, and its test phrasing if asked."""
  extra = (family.test_source,) if config.phrasing_references else ()
  return (*family.reference_sources, *extra)


@dataclasses.dataclass(frozen=True)
class Suite:
  config: SuiteConfig
  families: tuple[families_lib.Family, ...]
  records: dict[tuple[str, str], list[dict]]  # (source, split) -> rows
  train_text: list[dict]
  # family -> {'dev': [...], 'test': [...]}: the frozen held-out pools (problems)
  pools: dict[str, dict[str, list]] = dataclasses.field(default_factory=dict)
  # (source, split) -> the problem each row of records asks, in order
  problems: dict[tuple[str, str], list] = dataclasses.field(default_factory=dict)

  def family(self, name: str) -> families_lib.Family:
    return next(f for f in self.families if f.name == name)

  def family_of(self, source: str) -> families_lib.Family:
    return next(f for f in self.families if source in f.sources)


def _records(
  family: families_lib.Family,
  source: str,
  split: str,
  problems: Sequence,
  rng: np.random.Generator,
) -> list[dict]:
  out = []
  for i, problem in enumerate(problems):
    q = family.render(source, problem, rng)
    out.append(
      {
        'id': f'{source}-{split}-{i:05d}',
        'task': source,
        'question': q.question,
        'choices': list(q.choices),
        'answer': q.answer,
        'split': split,
      }
    )
  return out


def _family_records(family, config: SuiteConfig):
  """(records, problems, pools) of one family: rows per (source, split), the problem of each."""
  seed = config.seed
  problems = family.problems(stream(seed, family.name, 'problems'))
  dev_pool, test_pool, pool = splits.held_out_pools(family, config)
  draw = config.draw
  fresh = None if draw == seed else stream(draw, family.name, 'draw')
  asked = {}
  test_src = family.test_source
  asked[test_src, 'dev'] = splits.draw_from(dev_pool, config.num_dev, fresh)
  asked[test_src, 'test'] = splits.draw_from(test_pool, config.num_test, fresh)
  out = {
    (test_src, 'dev'): _records(
      family, test_src, 'dev', asked[test_src, 'dev'], stream(draw, test_src, 'dev')
    ),
    (test_src, 'test'): _records(
      family, test_src, 'test', asked[test_src, 'test'], stream(draw, test_src, 'test')
    ),
  }
  num_test_train = round(config.num_train * config.test_train_fraction)
  num_ref_train = (config.num_train - num_test_train) // len(family.reference_sources)
  for src in family.reference_sources:
    rng = stream(seed, src, 'reference')
    asked[src, 'reference'] = splits.sample(rng, pool, config.num_reference)
    out[src, 'reference'] = _records(family, src, 'reference', asked[src, 'reference'], rng)
    rng = stream(seed, src, 'train')
    asked[src, 'train'] = splits.sample(rng, problems, num_ref_train)
    out[src, 'train'] = _records(family, src, 'train', asked[src, 'train'], rng)
  rng = stream(seed, test_src, 'train')
  asked[test_src, 'train'] = splits.sample(rng, pool, num_test_train)
  out[test_src, 'train'] = _records(family, test_src, 'train', asked[test_src, 'train'], rng)
  if config.phrasing_references:  # from the pool: never a dev/test problem
    rng = stream(seed, test_src, 'reference')
    asked[test_src, 'reference'] = splits.sample(rng, pool, config.num_reference)
    out[test_src, 'reference'] = _records(
      family, test_src, 'reference', asked[test_src, 'reference'], rng
    )
  return out, asked, {'dev': dev_pool, 'test': test_pool}


def train_row(question: str, choices, answer: int, source: str, fmt: str) -> dict:
  """A training document: the prompt and the gold continuation."""
  context, continuations = prompts.format_question(question, choices, fmt)
  return {'text': context, 'target': continuations[answer], 'source': source}


def build_suite(config: SuiteConfig = SuiteConfig()) -> Suite:
  """Generates every split of every family from config.seed."""
  families = WORLDS[config.world](stream(config.seed, 'world'))
  records: dict[tuple[str, str], list[dict]] = {}
  asked, pools = {}, {}
  for family in families:
    rows, problems, pools[family.name] = _family_records(family, config)
    records.update(rows)
    asked.update(problems)
  check_no_leak(records)
  text = [
    train_row(r['question'], r['choices'], r['answer'], src, config.fmt)
    for (src, split), rows in sorted(records.items())
    if split == 'train'
    for r in rows
  ]
  if config.fmt == 'mc':
    rng = stream(config.seed, 'drill')
    values = families_lib.drill_values(families)
    for _ in range(config.num_drill):
      q = families_lib.drill_question(rng, values)
      text.append(train_row(q.question, q.choices, q.answer, 'drill', 'mc'))
  rng = stream(config.seed, 'statements')
  for family in families:
    for _ in range(config.statement_repeats):
      text += [
        {'text': s, 'target': '', 'source': f'{family.name}_statements'}
        for s in family.statements(rng)
      ]
  order = stream(config.seed, 'train_order').permutation(len(text))
  return Suite(config, families, records, [text[i] for i in order], pools, asked)


def file_name(source: str, split: str) -> str:
  return f'{source}_{split}.jsonl'


def _write_jsonl(path: str, rows: Sequence[dict]) -> str:
  """Writes rows; returns the sha256 of the bytes written."""
  data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows).encode()
  with open(path, 'wb') as f:
    f.write(data)
  return hashlib.sha256(data).hexdigest()


def manifest(suite: Suite) -> dict:
  """The suite.json object (without file hashes)."""
  benchmarks = {}
  for f in suite.families:
    benchmarks[f.name] = {
      'description': f.description,
      'test_source': f.test_source,
      'dev': file_name(f.test_source, 'dev'),
      'test': file_name(f.test_source, 'test'),
      'reference_sources': list(reference_sources(f, suite.config)),
      'reference': [file_name(s, 'reference') for s in reference_sources(f, suite.config)],
    }
  return {
    'format': FORMAT,
    'format_version': FORMAT_VERSION,
    'config': dataclasses.asdict(suite.config),
    'prompt': {
      'format': suite.config.fmt,
      'template': prompts.format_question(
        '{question}', ['{choice 0}', '{choice 1}'], suite.config.fmt
      )[0],
      'continuation': prompts.format_question('q', ['{choice}', '{other}'], suite.config.fmt)[1][0],
    },
    'benchmarks': benchmarks,
    # The frozen dev / test pools of held-out problems (suite.held_out_pools):
    # every draw of this seed takes dev from 'dev' and test from 'test'.
    'pools': {
      name: {
        split: {'problems': len(p), 'sha256': splits.pool_digest(p)} for split, p in pools.items()
      }
      for name, pools in sorted(suite.pools.items())
    },
  }


def write_suite(suite: Suite, output_dir: str, *, include_train: bool = True) -> dict:
  """Writes the split files and suite.json; returns the manifest.

  Train files are hashed in the manifest even when not written, so a copy
  regenerated from the seed can be checked against it.
  """
  os.makedirs(output_dir, exist_ok=True)
  files = {}
  outputs = [(file_name(src, split), rows) for (src, split), rows in sorted(suite.records.items())]
  outputs.append((TRAIN_TEXT, suite.train_text))
  for name, rows in outputs:
    is_train = name == TRAIN_TEXT or name.endswith('_train.jsonl')
    if is_train and not include_train:
      data = ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows).encode()
      digest = hashlib.sha256(data).hexdigest()
    else:
      digest = _write_jsonl(os.path.join(output_dir, name), rows)
    files[name] = {'rows': len(rows), 'sha256': digest, 'written': not is_train or include_train}
  out = manifest(suite)
  out['files'] = files
  write_manifest(output_dir, out)
  return out


def main(
  argv,
  *,
  seed: int,
  world: str,
  draw_seed: int | None,
  output_dir: str,
  include_train: bool,
  settings_from: str | None,
  shared_references: bool = False,
  test_phrasing_references: bool | None = None,
):
  del argv
  config = SuiteConfig(
    seed=seed, world=world, draw_seed=draw_seed, test_phrasing_references=test_phrasing_references
  )
  suite = build_suite(config)
  out = write_suite(suite, output_dir, include_train=include_train)
  if settings_from:
    copy_settings(settings_from, output_dir)
  if shared_references:  # the pool changes; the files written do not
    share_references(output_dir)
  for name, info in sorted(out['files'].items()):
    logging.info('%s: %d rows%s', name, info['rows'], '' if info['written'] else ' (not written)')


if __name__ == '__main__':
  # Flags live here so that importing this module defines none.
  _seed = flags.DEFINE_integer('seed', 0, 'Suite seed: world, train and reference splits.')
  _world = flags.DEFINE_enum('world', 'remix', sorted(WORLDS), 'Which families.')
  _draw = flags.DEFINE_integer('draw_seed', None, 'Seed of the dev/test draw (default: --seed).')
  _output_dir = flags.DEFINE_string('output_dir', None, 'Where to write the files.', required=True)
  _include_train = flags.DEFINE_bool('include_train', True, 'Also write the train split.')
  _settings_from = flags.DEFINE_string(
    'settings_from', None, 'Copy the C3PO settings chosen on dev from this suite directory.'
  )
  _shared = flags.DEFINE_bool(
    'shared_references',
    False,
    "Every benchmark's reference pool is all benchmarks' references (pass "
    '--max_reference_samples=<benchmarks x per-benchmark count> to runs on it).',
  )
  _phrasing = flags.DEFINE_bool(
    'test_phrasing_references',
    None,
    "References also in the test phrasing (default: the world's, on for remix).",
  )
  app.run(
    lambda argv: main(
      argv,
      seed=_seed.value,
      world=_world.value,
      draw_seed=_draw.value,
      output_dir=_output_dir.value,
      include_train=_include_train.value,
      settings_from=_settings_from.value,
      shared_references=_shared.value,
      test_phrasing_references=_phrasing.value,
    )
  )
