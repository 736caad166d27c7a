"""Hugging Face hub ids as `--checkpoint_dir`: downloaded once, converted once.

`checkpoint_path('allenai/OLMoE-1B-7B-0924', cache_dir)` downloads the
snapshot's safetensors, config and tokenizer files with
`huggingface_hub.snapshot_download` (into the hub's own cache), converts them
with `convert.convert` into CACHE_DIR/checkpoints/allenai--OLMoE-1B-7B-0924-DTYPE
and returns that directory; later runs find the conversion there and touch
neither the hub nor the snapshot. A local path is returned as it is.

A value is a hub id when it reads 'OWNER/NAME', nothing exists at that path,
and OWNER is not a local directory (so a typo in 'checkpoints/x' still says
"no checkpoint", not "hub unreachable").
"""

from __future__ import annotations

import os
import re

from absl import logging

from c3po_jax.ckpts import checkpoint, convert
from c3po_jax.common.errors import UsageError

_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')
# What a conversion needs from a snapshot (no pickle weights, no extra formats).
ALLOW_PATTERNS = ('*.safetensors', '*.json', 'merges.txt', 'vocab.json')


class HubError(UsageError):
  """A hub id that cannot be fetched: the hub is unreachable, or the client is missing."""


def is_hub_id(value: str) -> bool:
  if not _HUB_ID.fullmatch(value) or os.path.exists(os.path.expanduser(value)):
    return False
  return not os.path.isdir(value.split('/', 1)[0])


def cached_dir(repo_id: str, cache_dir: str, dtype: str) -> str:
  """Where the converted checkpoint of a hub id lives."""
  name = repo_id.replace('/', '--') + f'-{dtype}'
  return os.path.join(os.path.expanduser(cache_dir), 'checkpoints', name)


def checkpoint_path(value: str, cache_dir: str, dtype: str | None = None) -> str:
  """The local checkpoint directory of `--checkpoint_dir=value` (see the module docstring).

  dtype: the converted checkpoint's dtype (default bfloat16, as the README's
  conversion); each dtype is converted once.
  """
  if not is_hub_id(value):
    return os.path.expanduser(value)
  dtype = dtype or 'bfloat16'
  target = cached_dir(value, cache_dir, dtype)
  if checkpoint.is_ours(target):
    logging.info('%s: using the conversion in %s', value, target)
    return target
  snapshot = _download(value)
  logging.info('%s: converting %s to %s (%s), once', value, snapshot, target, dtype)
  convert.convert(snapshot, target, dtype=dtype, overwrite=True)
  return target


def _download(repo_id: str) -> str:
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise HubError(
      f"--checkpoint_dir={repo_id} is a Hugging Face hub id: pip install 'c3po-jax[hub]' "
      '(huggingface_hub), or download the snapshot and pass its directory'
    ) from None
  try:
    return snapshot_download(repo_id, allow_patterns=list(ALLOW_PATTERNS))
  except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all end the same way
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise HubError(
      f'cannot download {repo_id} from the Hugging Face hub (offline? {type(e).__name__}: '
      f'{reason}); where the hub is reachable run `huggingface-cli download {repo_id}` and pass '
      'the snapshot directory as --checkpoint_dir'
    ) from e
