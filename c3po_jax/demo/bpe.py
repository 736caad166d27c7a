"""A small byte-level BPE tokenizer for the demo model, trained on the suite.

GPT-2's byte-level pre-tokenization; with a 1024-token budget every number of
the suite (0..99, with its leading space) and every name answer becomes one
token, so an rc answer is decided at the prompt's last token (in an mc suite
the letters ' A'..' E' are single tokens). Saved in the Hugging Face format
(tokenizer.json + tokenizer_config.json), loadable with
transformers.PreTrainedTokenizerFast.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD = '<|pad|>'
EOS = '<|endoftext|>'
SPECIAL_TOKENS = (PAD, EOS)  # ids 0 and 1


# The mc answer letters of the demo (it asks 2 to 5 choices): single tokens.
LETTERS = 'ABCDE'


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
  """BPE trained on texts (deterministic for the same texts in the same order)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  return tok


def letter_token_ids(tokenizer) -> list[int]:
  """Token id of each answer continuation ' A'..' E'; raises if one is not one token.

  Accepts a `tokenizers.Tokenizer` or a transformers tokenizer.
  """
  ids = []
  for i in range(len(LETTERS)):
    text = ' ' + LETTERS[i]
    if isinstance(tokenizer, Tokenizer):
      enc = tokenizer.encode(text).ids
    else:
      enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc) != 1:
      raise ValueError(f'{text!r} is {len(enc)} tokens, expected one')
    ids.append(enc[0])
  return ids


def save_tokenizer(tokenizer: Tokenizer, directory: str) -> list[str]:
  """Writes the HF tokenizer files into directory; returns their paths."""
  from transformers import PreTrainedTokenizerFast

  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS)
  os.makedirs(directory, exist_ok=True)
  return [p for p in fast.save_pretrained(directory) if p.endswith('.json')]


def load_tokenizer(directory: str):
  """The transformers tokenizer saved in directory."""
  from transformers import PreTrainedTokenizerFast

  return PreTrainedTokenizerFast.from_pretrained(directory)
