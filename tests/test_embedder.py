"""The HF text embedder pools as the encoder was trained and takes a prefix."""

import json
import os

import numpy as np
import pytest

from c3po_jax.neighbours import embedding

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

DEMO_TOKENIZER = os.path.join(os.path.dirname(__file__), '..', 'checkpoints', 'demo')


@pytest.fixture(scope='module')
def encoder_dir(tmp_path_factory):
  """A tiny random BERT encoder with the demo's tokenizer, saved like a hub snapshot."""
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


def _write_pooling(path, mode):
  modules = [
    {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
    {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'},
  ]
  with open(os.path.join(path, 'modules.json'), 'w') as f:
    json.dump(modules, f)
  os.makedirs(os.path.join(path, '1_Pooling'), exist_ok=True)
  cfg = {
    'word_embedding_dimension': 32,
    'pooling_mode_cls_token': mode == 'cls',
    'pooling_mode_mean_tokens': mode == 'mean',
    'pooling_mode_lasttoken': mode == 'last',
  }
  with open(os.path.join(path, '1_Pooling', 'config.json'), 'w') as f:
    json.dump(cfg, f)


TEXTS = ['What is 37 plus 3?', 'The largest of 4, 9 and 12 is', 'Blue']


def _reference(path, texts, mode):
  """One text at a time, no padding: the pooled state by hand, unit-normalized."""
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModel.from_pretrained(path).eval()
  out = []
  for t in texts:
    enc = tok(t, return_tensors='pt')
    with torch.inference_mode():
      h = model(**enc).last_hidden_state[0]  # [T, D]
    v = {'cls': h[0], 'last': h[-1], 'mean': h.mean(0)}[mode].numpy()
    out.append(v / np.linalg.norm(v))
  return np.stack(out)


@pytest.mark.parametrize('mode', ['mean', 'cls', 'last'])
def test_pooling_read_from_the_sentence_transformers_config(encoder_dir, mode):
  _write_pooling(encoder_dir, mode)
  emb = embedding.EncoderEmbedder(encoder_dir, batch_size=2)  # batches pad the short text
  assert emb.pooling == mode
  np.testing.assert_allclose(emb(TEXTS), _reference(encoder_dir, TEXTS, mode), atol=1e-5)


def test_pooling_flag_and_prefix(encoder_dir):
  _write_pooling(encoder_dir, 'mean')
  emb = embedding.EncoderEmbedder(encoder_dir, pooling='last', prefix='query: ')
  assert emb.pooling == 'last'
  want = _reference(encoder_dir, ['query: ' + t for t in TEXTS], 'last')
  np.testing.assert_allclose(emb(TEXTS), want, atol=1e-5)
  plain = embedding.EncoderEmbedder(encoder_dir, pooling='last')(TEXTS)
  assert np.abs(plain - want).max() > 1e-3  # the prefix changes the embedding
  with pytest.raises(ValueError, match='pooling'):
    embedding.EncoderEmbedder(encoder_dir, pooling='max')


def test_no_sentence_transformers_config_means_mean_pooling(tmp_path):
  assert embedding.pooling_from_config(str(tmp_path)) == 'mean'
