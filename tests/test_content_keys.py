"""State is keyed by content: a changed question under a reused id is computed again.

Ids repeat across draws and data files (the demo's `sum_compose-test-00000`
names another question in every draw). The prefix-state store, its disk
spill and `--resume` must key a sample by its tokens and gold, never by its
id, or a run scores one question with another's cached state (and the oracle
trains on the other question's label).
"""

import json

import numpy as np
import pytest

from c3po_jax.run import pipeline, results
from c3po_jax.run.config import RunConfig
from c3po_jax.tasks.encoding import EncodedPrompt, content_hash

QUESTIONS = [
  {
    'question': 'Which gas do plants take in to make food?',
    'choices': ['oxygen', 'carbon dioxide', 'helium', 'neon'],
    'answer': 1,
  },
  {
    'question': 'What force pulls objects toward the Earth?',
    'choices': ['magnetism', 'friction', 'gravity', 'tension'],
    'answer': 2,
  },
  {
    'question': 'Which organ pumps blood through the body?',
    'choices': ['heart', 'lung', 'kidney', 'liver'],
    'answer': 0,
  },
]
OTHER = [
  {
    'question': 'What is frozen water called?',
    'choices': ['steam', 'ice', 'fog', 'dew'],
    'answer': 1,
  },
  {
    'question': 'Which planet is closest to the Sun?',
    'choices': ['Venus', 'Mars', 'Earth', 'Mercury'],
    'answer': 3,
  },
  {
    'question': 'What do bees make?',
    'choices': ['honey', 'silk', 'wax paper', 'milk'],
    'answer': 0,
  },
]


def test_content_hash_sees_tokens_and_gold_not_ids():
  p = EncodedPrompt((5, 6, 7), ((10,), (11,)), 0, (1, 1), 'mc')
  assert content_hash(p) == content_hash(EncodedPrompt((5, 6, 7), ((10,), (11,)), 0, (1, 1), 'mc'))
  assert content_hash(p) != content_hash(EncodedPrompt((5, 6, 8), ((10,), (11,)), 0, (1, 1), 'mc'))
  assert content_hash(p) != content_hash(EncodedPrompt((5, 6, 7), ((10,), (11,)), 1, (1, 1), 'mc'))
  assert content_hash(p) != content_hash(EncodedPrompt((5, 6, 7), ((10,), (12,)), 0, (1, 1), 'mc'))


def _write(path, rows):
  with open(path, 'w') as f:
    for i, r in enumerate(rows):
      # The same task and ids in every file, as in the demo's draws.
      f.write(json.dumps({'id': f'q{i}', 'task': 'science', **r}) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def ckpt(tiny_checkpoint):
  return tiny_checkpoint  # conftest.py: one per session, read-only


def _config(ckpt, tmp_path, test_file, out, **kw):
  settings = dict(
    checkpoint_dir=ckpt,
    benchmark=test_file,
    reference=('openbookqa',),
    methods=('base', 'kernel_regression', 'oracle'),
    max_reference_samples=16,
    batch_size=3,
    ngd_steps=2,
    lr=0.1,
    critical_layers='last:2',
    core_experts=4,
    max_similarity=1.0,
    prefix_spill_dir=str(tmp_path / 'spill'),
    prefix_cache_bytes=1,  # every state leaves memory at once: the disk tier answers
    output_dir=str(tmp_path / out),
    cache_dir=str(tmp_path / 'cache'),
  )
  return RunConfig.make(**{**settings, **kw})


def _rows(tmp_path, out):
  rows = results.read_rows(str(tmp_path / out / 'results.jsonl'))
  return {(r['method'], r['id']): r for r in rows}


@pytest.mark.slow
def test_changed_question_under_a_reused_id_is_recomputed(ckpt, tmp_path):
  draw = _write(tmp_path / 'draw.jsonl', QUESTIONS)
  pipeline.run(_config(ckpt, tmp_path, draw, 'run'))
  # A fresh run of the other questions, with no spill and no earlier rows: the truth.
  other = _write(tmp_path / 'other.jsonl', OTHER)
  pipeline.run(_config(ckpt, tmp_path, other, 'fresh', prefix_spill_dir=None, prefix_cache_bytes=0))
  truth = _rows(tmp_path, 'fresh')

  # A fresh draw written over the same file (same task, same ids, other questions).
  _write(tmp_path / 'draw.jsonl', OTHER)
  # Same spill directory, new output directory: the first draw's states must not answer.
  pipeline.run(_config(ckpt, tmp_path, draw, 'spilled'))
  # Same output directory, resumed: the first draw's rows under the same ids are redone.
  pipeline.run(_config(ckpt, tmp_path, draw, 'run', resume=True))
  for out in ('spilled', 'run'):
    got = _rows(tmp_path, out)
    assert len(got) == len(truth) == 9, out  # one row per (method, id): none duplicated
    for key, want in truth.items():
      row = got[key]
      assert row['gold'] == want['gold'] and row['sample_hash'] == want['sample_hash'], (out, key)
      np.testing.assert_allclose(row['choice_scores'], want['choice_scores'], atol=1e-4)
      assert row['prediction'] == want['prediction'], (out, key)
  questions = {r['id']: r['question'] for r in _rows(tmp_path, 'run').values() if 'question' in r}
  assert questions == {f'q{i}': r['question'] for i, r in enumerate(OTHER)}
