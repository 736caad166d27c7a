"""Embeddings for neighbour search.

Default ('moe', the MoEE recipe): the model's own last-context-token hidden
state and its routing logits over all layers, each L2-normalized and
concatenated with weight 1/sqrt(2), so the cosine similarity of two
embeddings is the mean of the hidden-state cosine and the routing cosine. No
extra weights are needed.

Optional: a local Hugging Face sentence-encoder directory (e.g.
all-MiniLM-L6-v2, the encoder the public C3PO code uses, or an
instruction-tuned one such as GTE or NV-Embed), pooled as the encoder was
trained: the pooling mode is read from its sentence-transformers config
(`modules.json` -> `1_Pooling/config.json`: mean, CLS or last token) unless
given, and an optional instruction prefix is prepended to every text. It
runs in PyTorch, so it needs torch installed (`pip install c3po-jax[embedder]`).

Dimensions: B samples, D model, L layers, E experts.
"""

from __future__ import annotations

import json
import os

import numpy as np

from c3po_jax.neighbours.search import unit


def moe_embedding(last_hidden: np.ndarray, router_logits: np.ndarray) -> np.ndarray:
  """[B, D] hidden, [B, L, E] routing logits -> [B, D + L*E] unit vectors."""
  h = unit(np.asarray(last_hidden, np.float32))
  r = unit(np.asarray(router_logits, np.float32).reshape(len(h), -1))
  return np.concatenate([h, r], axis=-1) / np.sqrt(2.0)


POOLINGS = ('auto', 'mean', 'cls', 'last')


def _read_json(path: str) -> dict | list | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def pooling_from_config(path: str) -> str:
  """The pooling a sentence-transformers directory declares ('mean' if none)."""
  modules = _read_json(os.path.join(path, 'modules.json')) or []
  pool_dirs = [m.get('path', '') for m in modules if 'Pooling' in str(m.get('type', ''))]
  for sub in pool_dirs or ['1_Pooling']:
    cfg = _read_json(os.path.join(path, sub, 'config.json'))
    if not cfg:
      continue
    if cfg.get('pooling_mode_cls_token'):
      return 'cls'
    if cfg.get('pooling_mode_lasttoken'):
      return 'last'
    if cfg.get('pooling_mode_mean_tokens'):
      return 'mean'
    unsupported = [k for k, v in cfg.items() if k.startswith('pooling_mode') and v]
    if unsupported:
      raise ValueError(f'{path}: unsupported pooling {unsupported}; pass a pooling mode')
  return 'mean'


def pool(hidden, mask, mode: str):
  """hidden [B, T, D], mask [B, T] (torch tensors) -> [B, D] pooled as `mode`."""
  if mode == 'cls':
    return hidden[:, 0]
  if mode == 'last':  # the last real token, whichever side is padded
    t = mask.shape[1]
    last = t - 1 - mask.flip(1).float().argmax(dim=1)
    return hidden[range(hidden.shape[0]), last]
  if mode == 'mean':
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
  raise ValueError(f'pooling {mode!r}, expected one of {POOLINGS[1:]}')


class EncoderEmbedder:
  """Sentence embeddings from a local HF encoder directory.

  pooling: 'auto' (the directory's sentence-transformers config, else mean),
  'mean', 'cls' or 'last'. prefix: text prepended to every input (the
  instruction of instruction-tuned encoders).
  """

  def __init__(self, path: str, batch_size: int = 32, pooling: str = 'auto', prefix: str = ''):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'encoder directory {path!r} does not exist')
    if pooling not in POOLINGS:
      raise ValueError(f'pooling {pooling!r}, expected one of {POOLINGS}')
    try:
      import torch
      from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
      raise ImportError(
        'an HF encoder for neighbour search needs torch: pip install c3po-jax[embedder]'
      ) from e
    self._torch = torch
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.model = AutoModel.from_pretrained(path).eval()
    self.batch_size = batch_size
    self.pooling = pooling_from_config(path) if pooling == 'auto' else pooling
    self.prefix = prefix
    self.name = os.path.basename(os.path.normpath(path))

  def __call__(self, texts: list[str]) -> np.ndarray:
    torch = self._torch
    out = []
    texts = [self.prefix + t for t in texts]
    for i in range(0, len(texts), self.batch_size):
      enc = self.tokenizer(
        texts[i : i + self.batch_size],
        padding=True,
        truncation=True,
        max_length=512,
        return_tensors='pt',
      )
      with torch.inference_mode():
        h = self.model(**enc).last_hidden_state  # [B, T, D]
      out.append(pool(h, enc['attention_mask'], self.pooling).float().numpy())
    return unit(np.concatenate(out, axis=0))
