"""The demo suite: determinism, file format, answer correctness, no leaks, tokenizer."""

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest

from c3po_jax.demo import prompts, suite
from c3po_jax.demo import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, 'checkpoints', 'demo')
SMALL = suite.SuiteConfig(seed=0, num_train=600, statement_repeats=1)


@pytest.fixture(scope='module')
def small():
  return suite.build_suite(SMALL)


@pytest.fixture(scope='module')
def written(small, tmp_path_factory):
  out = tmp_path_factory.mktemp('suite')
  return out, suite.write_suite(small, str(out))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _ints(text):
  return [int(x) for x in re.findall(r'\d+', text)]


def _statement_table(small):
  """entity -> {attribute: value}, parsed from the training statements alone."""
  table = {}
  patterns = {'color': r'The (\w+) is (\w+)\.', 'home': r'The (\w+) lives in (\w+)\.'}
  patterns['food'] = r'The (\w+) eats (\w+)\.'
  for row in small.train_text:
    if row['source'] == 'facts_statements':
      for attr, pattern in patterns.items():
        for entity, value in re.findall(pattern, row['text']):
          assert table.setdefault(entity, {}).setdefault(attr, value) == value
  return table


def _expected_answer(source, question, table):
  """The gold answer text, recomputed from the question by hand."""
  n = _ints(question)
  if source in ('add_words', 'add_symbols'):
    return str(n[0] + n[1])
  if source == 'sub_symbols':
    return str(n[0] - n[1])
  if source in ('cmp_greatest', 'cmp_largest'):
    return str(max(n))
  if source == 'cmp_smallest':
    return str(min(n))
  if source in ('seq_next', 'seq_blank_next'):
    return str(n[3] + (n[3] - n[2]))
  if source == 'seq_blank_before':
    return str(n[0] - (n[1] - n[0]))
  entity = re.findall(r'the (\w+)', question)[-1]
  if 'color' in question:
    return table[entity]['color']
  if 'town' in question or 'live' in question:
    return table[entity]['home']
  return table[entity]['food']


def test_deterministic_per_seed(small):
  again = suite.build_suite(SMALL)
  assert again.records == small.records
  assert again.train_text == small.train_text
  other = suite.build_suite(dataclasses.replace(SMALL, seed=1))
  for key, rows in small.records.items():
    assert [r['question'] for r in rows] != [r['question'] for r in other.records[key]], key


def test_eval_splits_do_not_depend_on_train_size(small):
  bigger = suite.build_suite(dataclasses.replace(SMALL, num_train=900, statement_repeats=2))
  for (source, split), rows in small.records.items():
    if split != 'train':
      assert bigger.records[source, split] == rows, (source, split)


def test_files_parse_in_generic_format(written, small):
  out, manifest = written
  assert set(manifest['files']) == {
    *(suite.file_name(s, sp) for s, sp in small.records),
    suite.TRAIN_TEXT,
  }
  for name, info in manifest['files'].items():
    with open(out / name, 'rb') as f:
      data = f.read()
    assert hashlib.sha256(data).hexdigest() == info['sha256'], name
    if name == suite.TRAIN_TEXT:
      continue
    rows = _read_jsonl(out / name)
    assert len(rows) == info['rows'] > 0
    ids = [r['id'] for r in rows]
    assert len(set(ids)) == len(ids), name
    for r in rows:
      assert isinstance(r['id'], str) and isinstance(r['question'], str)
      assert all(isinstance(c, str) for c in r['choices'])
      assert 2 <= len(r['choices']) <= len(prompts.LETTERS)
      assert len(set(r['choices'])) == len(r['choices']), r
      assert isinstance(r['answer'], int) and 0 <= r['answer'] < len(r['choices'])
      assert r['task'] == name.rsplit('_', 1)[0]


def test_files_read_with_the_benchmark_loader(written):
  jsonl = pytest.importorskip('benchmarks.tasks.jsonl')
  out, manifest = written
  for bench in manifest['benchmarks'].values():
    for name in (bench['dev'], bench['test'], *bench['reference']):
      examples = jsonl.read_jsonl(str(out / name))
      assert len(examples) == manifest['files'][name]['rows']


def test_gold_answers_are_correct(small):
  table = _statement_table(small)
  assert len(table) == len(small.family('facts').entities)
  for (source, split), rows in small.records.items():
    for r in rows:
      gold = r['choices'][r['answer']]
      if source == 'fact_true':
        entity = re.search(r'the (\w+) is true', r['question']).group(1)
        attr = {'it is': 'color', 'it lives in': 'home', 'it eats': 'food'}
        prefix = next(p for p in attr if gold.startswith(p + ' '))
        assert gold == f'{prefix} {table[entity][attr[prefix]]}', r
      else:
        assert gold == _expected_answer(source, r['question'], table), (split, r)


def test_choice_counts_and_positions(small):
  counts = {len(r['choices']) for rows in small.records.values() for r in rows}
  assert counts == {2, 3, 4, 5}
  # Gold positions are not predictable: every letter is gold for some question.
  dev = small.records['add_words', 'dev']
  assert {r['answer'] for r in dev} == {0, 1, 2, 3}


def test_splits_do_not_leak(small):
  records = small.records
  questions = {
    split: {r['question'] for (_, s), rows in records.items() if s == split for r in rows}
    for split in suite.SPLITS
  }
  for split in ('dev', 'test'):
    assert not questions[split] & questions['train']
    assert not questions[split] & questions['reference']
  assert not questions['dev'] & questions['test']
  train_text = {row['text'] for row in small.train_text}
  for (_, split), rows in records.items():
    if split in ('dev', 'test'):
      for r in rows:
        assert prompts.format_mc(r['question'], r['choices']) not in train_text
  # The test phrasing is rare in train, the reference phrasings common.
  for family in small.families:
    n = {s: len(records[s, 'train']) for s in family.sources}
    assert all(n[family.test_source] * 5 < n[s] for s in family.reference_sources), n


def test_check_no_leak_raises():
  records = {
    ('a', 'test'): [{'question': 'q1'}],
    ('b', 'train'): [{'question': 'q1'}],
  }
  with pytest.raises(ValueError, match='test questions occur in train'):
    suite.check_no_leak(records)


def test_manifest_pairs_each_test_family_with_its_references(written, small):
  out, manifest = written
  assert suite.read_manifest(str(out)) == manifest
  assert set(manifest['benchmarks']) == {f.name for f in small.families}
  for name, bench in manifest['benchmarks'].items():
    family = small.family(name)
    assert bench['test'] == f'{family.test_source}_test.jsonl'
    assert bench['reference'] == [f'{s}_reference.jsonl' for s in family.reference_sources]
    for f in (bench['dev'], bench['test'], *bench['reference']):
      assert os.path.isfile(out / f)
  r = _read_jsonl(out / manifest['benchmarks']['arith']['dev'])[0]
  template = manifest['prompt']['template']
  assert template.startswith('Question: {question}\n A. {choice 0}\n B. {choice 1}\nAnswer:')
  assert prompts.format_mc(r['question'], r['choices']).endswith('\nAnswer:')


def test_prompt_matches_benchmark_mc_format():
  bench_prompts = pytest.importorskip('benchmarks.tasks.prompts')
  example = pytest.importorskip('benchmarks.tasks.example')
  ex = example.Example(
    id='x', task='add_words', context='What is 1 plus 2?', choices=('3', '4'), gold=0
  )
  prompt = bench_prompts.format_example(ex, 'mc')
  assert prompt.context == prompts.format_mc(ex.context, ex.choices)
  assert prompt.continuations == (prompts.answer_text(0), prompts.answer_text(1))


def test_tokenizer_letters_are_single_tokens(small, tmp_path):
  tok = tokenizer_lib.train_tokenizer(r['text'] + r['target'] for r in small.train_text)
  ids = tokenizer_lib.letter_token_ids(tok)
  assert len(set(ids)) == len(prompts.LETTERS)
  tokenizer_lib.save_tokenizer(tok, str(tmp_path))
  hf = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert tokenizer_lib.letter_token_ids(hf) == ids
  row = small.train_text[0]
  assert hf.encode(row['text'], add_special_tokens=False) == tok.encode(row['text']).ids
  assert hf.decode(tok.encode(row['text']).ids) == row['text']
  # Digits are single tokens; the prompt's last token is ':'.
  assert tok.encode(' 42').tokens == ['Ġ4', '2']
  assert tok.encode(prompts.format_mc('q', ['1', '2'])).tokens[-1] == ':'
  assert (hf.pad_token_id, hf.eos_token_id) == (0, 1)


def test_tokenizer_is_deterministic(small):
  texts = [r['text'] + r['target'] for r in small.train_text]
  a = tokenizer_lib.train_tokenizer(texts)
  b = tokenizer_lib.train_tokenizer(texts)
  assert a.to_str() == b.to_str()


@pytest.mark.skipif(
  not os.path.isfile(os.path.join(SHIPPED, 'suite', suite.MANIFEST)),
  reason='no shipped demo suite',
)
def test_shipped_suite_regenerates_from_its_seed(tmp_path):
  shipped = suite.read_manifest(os.path.join(SHIPPED, 'suite'))
  config = suite.SuiteConfig(**shipped['config'])
  # Eval splits do not depend on the train size, so a small train split will do.
  regenerated = suite.build_suite(dataclasses.replace(config, num_train=300, statement_repeats=1))
  manifest = suite.write_suite(regenerated, str(tmp_path), include_train=False)
  for name, info in shipped['files'].items():
    if info['written']:
      assert manifest['files'][name]['sha256'] == info['sha256'], name
      with open(os.path.join(SHIPPED, 'suite', name), 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == info['sha256'], name
  assert np.all([b == shipped['benchmarks'][k] for k, b in manifest['benchmarks'].items()])


@pytest.fixture(scope='module')
def tok(small):
  return tokenizer_lib.train_tokenizer(r['text'] + r['target'] for r in small.train_text)


def test_scorer_matches_unpadded_forward(small, tok):
  import jax
  import jax.numpy as jnp

  from c3po_jax.demo import scoring
  from models.olmoe import transformer
  from models.olmoe.config import TINY

  config = TINY.replace(vocab_size=-(-tok.get_vocab_size() // 64) * 64)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  rows = small.records['cmp_greatest', 'dev'][:5]
  # Two batches of 4: the second has filler rows; prompts are right-padded.
  got = scoring.letter_log_probs(params, config, tok, rows, batch_size=4, max_len=64)
  letters = jnp.asarray(tokenizer_lib.letter_token_ids(tok))
  for r, lp in zip(rows, got):
    ids = tok.encode(prompts.format_mc(r['question'], r['choices'])).ids
    logits = transformer.forward(params, jnp.asarray([ids]), config=config).logits[0, -1]
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[letters], atol=1e-5)
  preds = scoring.predictions(got, rows)
  for p, lp, r in zip(preds, got, rows):
    assert p == int(np.argmax(lp[: len(r['choices'])]))


def test_documents_weight_the_answer_letter(small, tok):
  from c3po_jax.demo import data

  docs = [d for d in small.train_text if d['target']][:3]
  docs.append(next(d for d in small.train_text if not d['target']))
  out = data.tokenize_documents(tok, docs, eos_id=1, answer_weight=7.0)
  letters = tokenizer_lib.letter_token_ids(tok)
  for d, (ids, w) in zip(docs, out):
    n = len(tok.encode(d['text']).ids)
    assert ids[-1] == 1 and len(w) == len(ids) - 1
    if d['target']:
      assert ids[n] in letters and w[n - 1] == 7.0 and np.sum(w != 1) == 1
    else:
      assert np.all(w == 1)
  buckets = data.make_buckets(out, (40, 48, 56, 64), batch_tokens=48)
  seen = 0
  for batch in data.epoch_batches(buckets, np.random.default_rng(0)):
    real = batch.mask[:, 1:] == 1
    np.testing.assert_array_equal(batch.targets[:, :-1][real], batch.inputs[:, 1:][real])
    assert np.all(batch.weights[batch.mask == 0] == 0)
    seen += int(np.sum(batch.weights > 0))
  assert seen == sum(len(w) for _, w in out)


def test_load_balance_loss():
  import jax
  import jax.numpy as jnp

  from c3po_jax.demo import train

  layers, b, t, e, k = 2, 3, 4, 8, 2
  mask = jnp.ones((b, t), jnp.int32).at[0, 2:].set(0)
  uniform = jnp.full((layers, b, t, e), 1 / e)
  assert float(train.load_balance_loss(uniform, mask, k)) == pytest.approx(1.0)
  # Collapsed on expert 0: E * (1/2 * 1) = E / k.
  collapsed = jnp.zeros((layers, b, t, e)).at[..., 0].set(1.0)
  assert float(train.load_balance_loss(collapsed, mask, k)) == pytest.approx(e / k)
  # Padding does not count: garbage at masked positions changes nothing.
  noisy = collapsed.at[:, 0, 2:].set(jax.random.uniform(jax.random.PRNGKey(0), (layers, 2, e)))
  assert float(train.load_balance_loss(noisy, mask, k)) == pytest.approx(e / k)


@pytest.mark.skipif(
  not os.path.isfile(os.path.join(SHIPPED, 'demo.json')), reason='no shipped demo checkpoint'
)
def test_shipped_checkpoint_reproduces_its_dev_accuracy():
  from c3po_jax.demo import evaluate

  with open(os.path.join(SHIPPED, 'demo.json')) as f:
    recorded = json.load(f)['dev_accuracy']
  got = evaluate.evaluate(SHIPPED, 'dev')
  assert set(got) == set(recorded)
  for family, acc in got.items():
    # One question of slack (100 per family) for float differences across CPUs.
    assert abs(acc - recorded[family]) <= 0.011, (family, acc, recorded[family])
