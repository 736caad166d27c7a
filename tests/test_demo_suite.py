"""The demo suite: determinism, file format, answer correctness, no leaks, tokenizer.

Most tests run on the control world (families.py); the remix world (remix_world.py,
the default demo) has its own tests at the end.
"""

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest

from c3po_jax.demo import bpe, suite
from c3po_jax.tasks import prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, 'checkpoints', 'demo')  # the remix world
CONTROL = os.path.join(REPO, 'checkpoints', 'demo_control')  # the earlier world
SHIPPED_WORLDS = [p for p in (SHIPPED, CONTROL) if os.path.isfile(os.path.join(p, 'demo.json'))]
SMALL = suite.SuiteConfig(seed=0, world='control', num_train=600, statement_repeats=1)
REMIX = suite.SuiteConfig(seed=0, world='remix', num_train=600)


@pytest.fixture(scope='module')
def small():
  return suite.build_suite(SMALL)


@pytest.fixture(scope='module')
def tok(small):
  return bpe.train_tokenizer(r['text'] + r['target'] for r in small.train_text)


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


def test_draw_seed_redraws_only_dev_and_test(small):
  fresh = suite.build_suite(dataclasses.replace(SMALL, draw_seed=1))
  assert fresh.train_text == small.train_text
  for (source, split), rows in small.records.items():
    if split in ('train', 'reference'):
      assert fresh.records[source, split] == rows, (source, split)
    else:
      questions = {r['question'] for r in rows}
      assert {r['question'] for r in fresh.records[source, split]} != questions
  # The fresh draw is leak-free too (check_no_leak ran inside build_suite), and
  # draw_seed=seed is the default draw.
  same = suite.build_suite(dataclasses.replace(SMALL, draw_seed=SMALL.seed))
  assert same.records == small.records


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
      assert 2 <= len(r['choices']) <= len(bpe.LETTERS)
      assert len(set(r['choices'])) == len(r['choices']), r
      assert isinstance(r['answer'], int) and 0 <= r['answer'] < len(r['choices'])
      assert r['task'] == name.rsplit('_', 1)[0]


def test_files_read_with_the_benchmark_loader(written):
  jsonl = pytest.importorskip('c3po_jax.tasks.jsonl')
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
        context, _ = prompts.format_question(r['question'], r['choices'], SMALL.fmt)
        assert context not in train_text
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
  assert manifest['prompt'] == {
    'format': 'rc',
    'template': 'Question: {question}\nAnswer:',
    'continuation': ' {choice}',
  }


def test_shared_references_give_every_benchmark_the_whole_pool(written, tmp_path):
  import shutil

  src, manifest = written
  out = tmp_path / 'shared'
  shutil.copytree(src, out)
  suite.share_references(str(out))
  shared = suite.read_manifest(str(out))
  pool = [
    f for name in sorted(manifest['benchmarks']) for f in manifest['benchmarks'][name]['reference']
  ]
  assert len(set(pool)) == len(pool) > len(next(iter(manifest['benchmarks'].values()))['reference'])
  for name, bench in shared['benchmarks'].items():
    assert bench['reference'] == pool
    assert len(bench['reference_sources']) == len(pool)
    assert bench['own_reference_sources'] == manifest['benchmarks'][name]['reference_sources']
    assert bench['test'] == manifest['benchmarks'][name]['test']
  suite.share_references(str(out))  # idempotent: the own sources are not overwritten
  assert suite.read_manifest(str(out)) == shared


@pytest.mark.parametrize('fmt', prompts.FORMATS)
def test_prompt_matches_benchmark_format(fmt):
  bench_prompts = pytest.importorskip('c3po_jax.tasks.prompts')
  example = pytest.importorskip('c3po_jax.tasks.example')
  ex = example.Example(
    id='x', task='add_words', context='What is 1 plus 2?', choices=('3', '4'), gold=0
  )
  prompt = bench_prompts.format_example(ex, fmt)
  context, continuations = prompts.format_question(ex.context, ex.choices, fmt)
  assert prompt.context == context
  assert prompt.continuations == tuple(continuations)
  with pytest.raises(ValueError, match='format'):
    prompts.format_question('q', ['1', '2'], 'cloze')


def test_tokenizer_round_trips_and_answers_are_single_tokens(small, tok, tmp_path):
  bpe.save_tokenizer(tok, str(tmp_path))
  hf = bpe.load_tokenizer(str(tmp_path))
  row = small.train_text[0]
  assert hf.encode(row['text'], add_special_tokens=False) == tok.encode(row['text']).ids
  assert hf.decode(tok.encode(row['text']).ids) == row['text']
  # Every number and name answer of the suite is one token, so the rc answer
  # is decided at the prompt's last token, ':'.
  assert all(len(tok.encode(f' {i}').ids) == 1 for i in range(100))
  from c3po_jax.demo import families

  for name in (*families.COLORS, *families.TOWNS, *families.FOODS):
    assert len(tok.encode(' ' + name).ids) == 1, name
  assert tok.encode(prompts.format_question('q', ['x', 'y'], 'rc')[0]).tokens[-1] == ':'
  assert (hf.pad_token_id, hf.eos_token_id) == (0, 1)


def test_mc_suite_letters_are_single_tokens(tmp_path):
  mc = suite.build_suite(dataclasses.replace(SMALL, fmt='mc', num_drill=300))
  assert any(r['source'] == 'drill' for r in mc.train_text)
  assert {r['target'] for r in mc.train_text if r['target']} <= {' A', ' B', ' C', ' D', ' E'}
  tok = bpe.train_tokenizer(r['text'] + r['target'] for r in mc.train_text)
  ids = bpe.letter_token_ids(tok)
  assert len(set(ids)) == len(bpe.LETTERS)
  bpe.save_tokenizer(tok, str(tmp_path))
  assert bpe.letter_token_ids(bpe.load_tokenizer(str(tmp_path))) == ids


def test_tokenizer_is_deterministic(small):
  texts = [r['text'] + r['target'] for r in small.train_text]
  a = bpe.train_tokenizer(texts)
  b = bpe.train_tokenizer(texts)
  assert a.to_str() == b.to_str()


@pytest.mark.parametrize('shipped_dir', SHIPPED_WORLDS)
def test_shipped_suite_regenerates_from_its_seed(shipped_dir, tmp_path):
  shipped = suite.read_manifest(os.path.join(shipped_dir, 'suite'))
  config = suite.SuiteConfig(**shipped['config'])
  # Eval splits do not depend on the train size, so a small train split will do.
  regenerated = suite.build_suite(dataclasses.replace(config, num_train=300, statement_repeats=1))
  manifest = suite.write_suite(regenerated, str(tmp_path), include_train=False)
  for name, info in shipped['files'].items():
    if info['written']:
      assert manifest['files'][name]['sha256'] == info['sha256'], name
      with open(os.path.join(shipped_dir, 'suite', name), 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == info['sha256'], name
  assert np.all([b == shipped['benchmarks'][k] for k, b in manifest['benchmarks'].items()])
  assert manifest['pools'] == shipped['pools']  # the frozen dev / test pools, by hash


@pytest.mark.slow
def test_scorer_matches_unpadded_forward(small, tok):
  import jax
  import jax.numpy as jnp

  from c3po_jax.demo import choice_scores
  from models import transformer
  from models.families.olmoe import TINY

  config = TINY.replace(vocab_size=-(-tok.get_vocab_size() // 64) * 64)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  # Multi-token continuations (fact_true) and 2..5 choices; batches of 4
  # sequences leave filler rows; sequences are right-padded.
  rows = small.records['cmp_greatest', 'dev'][:3] + small.records['fact_true', 'reference'][:2]
  got = choice_scores.choice_log_probs(params, config, tok, rows, batch_size=4, max_len=64)
  # The unpadded forward, jitted (one program per length rather than eager op by op).
  log_probs = jax.jit(
    lambda p, ids: jax.nn.log_softmax(transformer.forward(p, ids, config=config).logits[0])
  )
  for r, lp in zip(rows, got):
    assert lp.shape == (len(r['choices']),)
    context = tok.encode(prompts.format_question(r['question'], ['x', 'y'], 'rc')[0]).ids
    for c, choice in enumerate(r['choices']):
      cont = tok.encode(' ' + choice).ids
      ids = jnp.asarray([context + cont])
      logp = log_probs(params, ids)
      want = sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(cont))
      np.testing.assert_allclose(lp[c], want, atol=1e-4)
  assert list(choice_scores.predictions(got)) == [int(np.argmax(lp)) for lp in got]


def test_documents_weight_the_answer(small, tok):
  from c3po_jax.demo import data

  docs = [d for d in small.train_text if d['target']][:3]
  docs.append(next(d for d in small.train_text if not d['target']))
  out = data.tokenize_documents(tok, docs, eos_id=1, answer_weight=7.0)
  for d, (ids, w) in zip(docs, out):
    n = len(tok.encode(d['text']).ids)
    assert ids[-1] == 1 and len(w) == len(ids) - 1
    if d['target']:
      target = tok.encode(d['target']).ids
      assert list(ids[n:-1]) == target
      assert np.all(w[n - 1 : n - 1 + len(target)] == 7.0) and np.sum(w != 1) == len(target)
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


@pytest.mark.slow
@pytest.mark.parametrize('shipped_dir', SHIPPED_WORLDS)
def test_shipped_checkpoint_reproduces_its_dev_accuracy(
  shipped_dir, xla_default_options, monkeypatch
):
  import jax

  from c3po_jax.demo import choice_scores, evaluate

  # 1,600 sequences through one program: compiled as users compile it (the
  # suite's flags compile fast and run slowly; the accuracy was recorded so).
  scores = jax.jit(
    choice_scores._sequence_scores.__wrapped__,
    static_argnames='config',
    compiler_options=xla_default_options,
  )
  monkeypatch.setattr(choice_scores, '_sequence_scores', scores)
  with open(os.path.join(shipped_dir, 'demo.json')) as f:
    recorded = json.load(f)['dev_accuracy']
  got = evaluate.evaluate(shipped_dir, 'dev')
  assert set(got) == set(recorded)
  for family, acc in got.items():
    # One question of slack (100 per family) for float differences across CPUs.
    assert abs(acc - recorded[family]) <= 0.011, (family, acc, recorded[family])


def test_tune_picks_the_best_dev_point_and_records_it(written, monkeypatch, tmp_path):
  from c3po_jax.demo import tune
  from c3po_jax.run import suite as suite_run
  from c3po_jax.run.config import RunConfig

  out, _ = written
  calls = []
  dev_ngd = {(lr, k): 0.70 for lr in (0.01, 0.1, 0.3) for k in (3, 10)}
  dev_ngd.update({(0.1, 3): 0.74, (0.3, 3): 0.74, (0.1, 10): 0.72})

  def fake_run_suite(rc, suite_dir, split):
    calls.append(split)
    assert rc.neighbourhood.max_similarity == 0.99 and rc.neighbourhood.sigma == 'median'
    acc = dev_ngd[rc.method.lr, rc.neighbourhood.k]
    pooled = {
      'base': {'accuracy': 0.7, 'mcnemar_p_vs_base': 1.0},
      'ngd': {'accuracy': acc, 'mcnemar_p_vs_base': 0.5},
    }
    return {'benchmarks': {}, 'pooled': pooled}

  monkeypatch.setattr(suite_run, 'run_suite', fake_run_suite)
  rc = RunConfig.make(
    checkpoint_dir='x', benchmark='(suite)', reference=('(suite)',), output_dir=str(tmp_path)
  )
  grid = {'lr': [0.01, 0.1, 0.3], 'k': [3, 10], 'max_similarity': [0.99], 'sigma': ['median']}
  entry = tune.tune(rc, str(out), grid)
  assert calls == ['dev'] * 6  # every grid point, on dev only
  # Best dev NGD accuracy; the tie between lr 0.1 and 0.3 goes to the earlier point.
  assert entry['settings']['lr'] == 0.1 and entry['settings']['k'] == 3
  assert entry['settings']['max_similarity'] == 0.99 and entry['settings']['sigma'] == 'median'
  assert entry['chosen_on'] == 'dev' and len(entry['grid']) == 6
  assert entry['searched'] == grid
  tune.write_settings(str(out), entry)
  manifest = suite.read_manifest(str(out))
  assert manifest['c3po_settings'] == json.loads(json.dumps(entry))
  assert suite_run.suite_settings(manifest) == {'fmt': 'rc', **entry['settings']}
  # A fresh draw copies the settings chosen on the shipped dev split.
  fresh = tmp_path / 'fresh'
  suite.write_suite(suite.build_suite(dataclasses.replace(SMALL, draw_seed=3)), str(fresh))
  suite.copy_settings(str(out), str(fresh))
  assert suite.read_manifest(str(fresh))['c3po_settings'] == manifest['c3po_settings']


# ---- the remix world (remix_world.py): the default demo ----


@pytest.fixture(scope='module')
def remix_suite():
  return suite.build_suite(REMIX)


def test_remix_gold_answers_and_choices(remix_suite):
  from c3po_jax.demo import remix_world

  ops = {f.test_source: f.op for f in remix_suite.families}
  ops.update({s: f.op for f in remix_suite.families for s in f.reference_sources})
  for (source, _), rows in remix_suite.records.items():
    for r in rows:
      x, y = _ints(r['question'])[:2]
      values = remix_world.answers(max(x, y), min(x, y))
      gold = values[ops[source]]
      assert r['choices'][r['answer']] == str(gold), (source, r)
      assert len(set(r['choices'])) == 4
      # Every other operation's answer is offered: a question routed to another
      # family's experts gets a wrong choice, not an absent one.
      assert {str(v) for v in values.values()} <= set(r['choices']), r


def test_remix_test_phrasing_names_another_family(remix_suite):
  words = {'sum': 'sum', 'diff': 'difference', 'max': 'larger', 'min': 'smaller'}
  for family in remix_suite.families:
    question = remix_suite.records[family.test_source, 'dev'][0]['question']
    others = [w for name, w in words.items() if name != family.name and w in question]
    assert others, (family.name, question)


def test_remix_splits_do_not_leak_and_draws_differ(remix_suite):
  suite.check_no_leak(remix_suite.records)
  fresh = suite.build_suite(dataclasses.replace(REMIX, draw_seed=1))
  assert fresh.train_text == remix_suite.train_text
  for family in remix_suite.families:
    key = (family.test_source, 'test')
    assert [r['question'] for r in fresh.records[key]] != [
      r['question'] for r in remix_suite.records[key]
    ]


def test_remix_references_include_the_test_phrasing_on_other_problems(remix_suite, small):
  def pair(q):
    return frozenset(_ints(q))

  for family in remix_suite.families:
    refs = remix_suite.records[family.test_source, 'reference']
    assert len(refs) == REMIX.num_reference
    assert {r['task'] for r in refs} == {family.test_source}
    # The test template, on problems that are never a dev or test problem.
    template = family.templates[family.test_source].split('{')[0]
    assert all(r['question'].startswith(template) for r in refs)
    held = {
      pair(r['question'])
      for split in ('dev', 'test')
      for r in remix_suite.records[family.test_source, split]
    }
    assert not held & {pair(r['question']) for r in refs}
  out = suite.manifest(remix_suite)
  for family in remix_suite.families:
    bench = out['benchmarks'][family.name]
    assert bench['reference_sources'] == [*family.reference_sources, family.test_source]
    assert bench['reference'][-1] == f'{family.test_source}_reference.jsonl'
  # The control world keeps its two reference sources; the option turns it off.
  assert all((f.test_source, 'reference') not in small.records for f in small.families)
  off = suite.build_suite(dataclasses.replace(REMIX, test_phrasing_references=False))
  assert all((f.test_source, 'reference') not in off.records for f in off.families)
  for key, rows in off.records.items():  # nothing else changes
    assert remix_suite.records[key] == rows


def test_route_loss_and_document_routes(remix_suite):
  import jax.numpy as jnp

  from c3po_jax.demo import data, train

  layers, b, t, e = 3, 2, 5, 8
  probs = jnp.full((layers, b, t, e), 1 / e)
  pos, group = jnp.array([4, 2]), jnp.array([1, -1])
  # Uniform routing puts 2/8 of the mass on each group of two experts.
  assert float(train.route_loss(probs, pos, group, 2, 4)) == pytest.approx(-np.log(0.25))
  # All mass on group 1 (experts 2, 3) at the supervised token: zero loss;
  # the ungrouped document and the other positions do not count.
  on = jnp.zeros(e).at[2].set(1.0)
  probs = probs.at[:, 0, 4].set(on)
  assert float(train.route_loss(probs, pos, group, 2, 4)) == pytest.approx(0.0, abs=1e-6)
  docs = remix_suite.train_text[:20]
  tok = bpe.train_tokenizer(r['text'] + r['target'] for r in remix_suite.train_text)
  routes = train.document_routes(remix_suite, tok, docs)
  names = [f.name for f in remix_suite.families]
  for d, (p, g) in zip(docs, routes):
    ids = tok.encode(d['text']).ids
    assert p == len(ids) - 1 and tok.id_to_token(ids[p]) == ':'
    assert names[g] == remix_suite.family_of(d['source']).name
  documents = data.tokenize_documents(tok, docs, eos_id=1, answer_weight=10.0)
  buckets = data.make_buckets(documents, (16, 20, 24, 32), 64, routes)
  batch = next(data.epoch_batches(buckets, np.random.default_rng(0)))
  for row in range(len(batch.inputs)):
    assert batch.weights[row, batch.route_pos[row]] == 10.0  # predicts the answer


def test_premise_choice_ce_and_summary():
  from c3po_jax.demo import premise

  scores = np.array([[0.0, -np.inf, np.log(3.0)], [1.0, 1.0, -np.inf]])
  got = premise.choice_ce(scores, np.array([2, 0]))
  np.testing.assert_allclose(got, [np.log(4 / 3), np.log(2)], rtol=1e-6)
  correct = np.array([True, False, False])
  out = premise.summarize(
    correct,
    np.array([0.1, 2.0, np.nan]),  # gap
    np.array([0.0, 0.1, np.nan]),
    np.array([0.0, 1.0, np.nan]),
    correct,
    np.zeros(3, bool),
    np.zeros(3, bool),
    np.full(3, np.nan),  # descent cosine, hit: tests/test_premise.py
    np.full(3, np.nan),
  )
  assert out['gap_mean_base_right'] == 0.1 and out['gap_mean_base_wrong'] == 2.0
  assert out['n_base_wrong'] == 2 and out['accuracy_random_rows'] == 0.0
  assert 'pooled' in premise.format_table({'benchmarks': {'a': out}, 'pooled': out})
  assert out['neighbours_own_sources'] is None  # no shared pool: not applicable


def test_frozen_pools_keep_every_draws_test_problems_out_of_dev_and_training(remix_suite):
  """No draw's test problem is a dev problem of any draw, or asked in its phrasing in training."""
  draws = [remix_suite] + [
    suite.build_suite(dataclasses.replace(REMIX, draw_seed=d)) for d in (1, 2)
  ]
  for family in remix_suite.families:
    src = family.test_source
    pools = remix_suite.pools[family.name]
    assert pools['dev'] and pools['test'] and not set(pools['dev']) & set(pools['test'])
    any_dev = set().union(*(s.problems[src, 'dev'] for s in draws))
    any_test_question = set()
    for s in draws:
      assert s.pools[family.name] == pools  # frozen: one split for every draw
      dev, test = set(s.problems[src, 'dev']), set(s.problems[src, 'test'])
      assert dev <= set(pools['dev']) and test <= set(pools['test'])
      assert len(test) == REMIX.num_test and not test & any_dev
      assert not test & (set(s.problems[src, 'train']) | set(s.problems[src, 'reference']))
      any_test_question |= {r['question'] for r in s.records[src, 'test']}
    assert len({frozenset(s.problems[src, 'test']) for s in draws}) == len(draws)  # fresh draws
    trained = '\n'.join(r['text'] for r in remix_suite.train_text)
    assert not [q for q in any_test_question if q in trained]
  # The seed's own draw is the leading problems of each pool (the shipped files).
  for family in remix_suite.families:
    n = REMIX.num_test
    assert (
      remix_suite.problems[family.test_source, 'test'] == remix_suite.pools[family.name]['test'][:n]
    )


def test_fewshot_documents_are_the_icl_prompt_of_their_question(remix_suite):
  from c3po_jax.demo import data, train

  docs = remix_suite.train_text
  group_of = {s: f.name for f in remix_suite.families for s in f.sources}
  out = data.fewshot_documents(docs, group_of, 0.2, 3, np.random.default_rng(0))
  questions = [d for d in docs if d['target'] and d['source'] in group_of]
  assert len(out) == round(0.2 * len(questions))
  assert data.fewshot_documents(docs, group_of, 0.0, 3, np.random.default_rng(0)) == []
  by_text = {d['text']: d for d in questions}
  shots = set()
  for doc in out:
    *demos, last = doc['text'].split(data.FEWSHOT_SEPARATOR)
    shots.add(len(demos))
    q = by_text[last]  # the question's own prompt, its target and source kept
    assert (doc['target'], doc['source']) == (q['target'], q['source'])
    examples = []
    for text in demos:  # each a solved question of the same family
      d = next(d for d in questions if text == d['text'] + d['target'])
      assert group_of[d['source']] == group_of[q['source']] and d is not q
      examples.append(_example(d))
    icl = prompts.format_example(_example(q), remix_suite.config.fmt, fewshot=examples)
    assert (icl.context, icl.continuations[icl.gold]) == (doc['text'], doc['target'])
  assert shots == {1, 2, 3}
  # Routing is supervised at the question's last context token, after the demos.
  tok = bpe.train_tokenizer(r['text'] + r['target'] for r in docs)
  for (p, g), doc in zip(train.document_routes(remix_suite, tok, out[:20]), out[:20]):
    assert p == len(tok.encode(doc['text']).ids) - 1
    assert [f.name for f in remix_suite.families][g] == group_of[doc['source']]


def _example(doc):
  """The Example of a training document (its gold is the target)."""
  from c3po_jax.tasks.example import Example

  question = doc['text'].removeprefix('Question: ').removesuffix('\nAnswer:')
  choices = (doc['target'][1:], 'other')
  return Example(id='q', task=doc['source'], context=question, choices=choices, gold=0)
