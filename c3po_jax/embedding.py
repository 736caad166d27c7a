"""Embeddings for neighbour search.

Default ('moe', the MoEE recipe): the model's own last-context-token hidden
state and its routing logits over all layers, each L2-normalized and
concatenated with weight 1/sqrt(2), so the cosine similarity of two
embeddings is the mean of the hidden-state cosine and the routing cosine. No
extra weights are needed.

Optional: a local Hugging Face sentence encoder directory (e.g.
all-MiniLM-L6-v2, the encoder the public C3PO code uses), mean-pooled over
tokens. It runs in PyTorch, so it needs torch installed.

Dimensions: B samples, D model, L layers, E experts.
"""

from __future__ import annotations

import os

import numpy as np

from c3po_jax.neighbours import unit


def moe_embedding(last_hidden: np.ndarray, router_logits: np.ndarray) -> np.ndarray:
  """[B, D] hidden, [B, L, E] routing logits -> [B, D + L*E] unit vectors."""
  h = unit(np.asarray(last_hidden, np.float32))
  r = unit(np.asarray(router_logits, np.float32).reshape(len(h), -1))
  return np.concatenate([h, r], axis=-1) / np.sqrt(2.0)


class EncoderEmbedder:
  """Mean-pooled sentence embeddings from a local HF encoder directory."""

  def __init__(self, path: str, batch_size: int = 32):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'encoder directory {path!r} does not exist')
    try:
      import torch
      from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
      raise ImportError('an HF encoder for neighbour search needs torch installed') from e
    self._torch = torch
    self.tokenizer = AutoTokenizer.from_pretrained(path)
    self.model = AutoModel.from_pretrained(path).eval()
    self.batch_size = batch_size
    self.name = os.path.basename(os.path.normpath(path))

  def __call__(self, texts: list[str]) -> np.ndarray:
    torch = self._torch
    out = []
    for i in range(0, len(texts), self.batch_size):
      enc = self.tokenizer(
        texts[i : i + self.batch_size],
        padding=True,
        truncation=True,
        max_length=256,
        return_tensors='pt',
      )
      with torch.inference_mode():
        h = self.model(**enc).last_hidden_state  # [B, T, D]
      m = enc['attention_mask'][..., None].to(h.dtype)
      out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
    return unit(np.concatenate(out, axis=0))
