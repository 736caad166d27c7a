"""Reference sets: the base model's correctly answered samples, with their
embeddings and last-context-token routing, cached on disk by content key.

A cache entry is `CACHE_DIR/refs-KEY/` holding `manifest.jsonl` (one line per
kept reference: id, task, text, gold), `arrays.npz` (embeddings [R, De],
router_probs [R, L, E]) and `key.json` (what the key was made of). The key
hashes the model (config + a parameter fingerprint), the data (every
example's id, task, text, choices and gold), the prompt format and the
embedder, so any change rebuilds; an entry is never reused for other inputs.
An entry that cannot be read (a truncated `arrays.npz`, a manifest naming
unknown samples) or holds wrong arrays (mis-shaped, NaN) is logged, deleted
and rebuilt.

Dimensions: R references, De embedding, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from absl import logging

from c3po_jax.tasks import Example


@dataclasses.dataclass
class ReferenceSet:
  examples: list[Example]
  embeddings: np.ndarray  # [R, De]
  router_probs: np.ndarray  # [R, L, E]
  key: str
  num_candidates: int  # references scored before keeping the correct ones

  def __len__(self) -> int:
    return len(self.examples)


def params_fingerprint(params) -> str:
  """A cheap content hash of the parameters (a strided sample of every leaf)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    # Strided on the device: only the sample travels to the host.
    sample = np.asarray(leaf.reshape(-1)[:: max(1, leaf.size // 4096)]).astype(np.float32)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(sample.tobytes())
  return h.hexdigest()[:16]


def examples_fingerprint(examples: list[Example]) -> str:
  h = hashlib.sha256()
  for e in examples:
    h.update(json.dumps([e.task, e.id, e.context, list(e.choices), e.gold]).encode())
  return h.hexdigest()[:16]


def cache_key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _entry(cache_dir: str, key: str) -> str:
  return os.path.join(cache_dir, f'refs-{key}')


def load_cached(
  cache_dir: str, key: str, pool: list[Example], routing_shape: tuple[int, int] | None = None
) -> ReferenceSet | None:
  """The cached set for `key`, or None (missing, or corrupt: deleted, rebuild).

  routing_shape: (L, E) the router_probs must have, when known.
  """
  path = _entry(cache_dir, key)
  if not os.path.isdir(path):
    return None
  try:
    refs = _read_entry(path, key, pool)
    problem = _check_arrays(refs, routing_shape)
  except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, KeyError, ...: all "corrupt"
    refs, problem = None, f'{type(e).__name__}: {e}'
  if problem is None:
    return refs
  logging.warning('Reference cache entry %s is corrupt (%s): rebuilding it.', path, problem)
  shutil.rmtree(path, ignore_errors=True)
  return None


def _read_entry(path: str, key: str, pool: list[Example]) -> ReferenceSet:
  with open(os.path.join(path, 'key.json')) as f:
    meta = json.load(f)
  if meta.get('key') != key:
    raise ValueError(f'key.json holds key {meta.get("key")!r}')
  by_id = {(e.task, e.id): e for e in pool}
  examples = []
  with open(os.path.join(path, 'manifest.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      examples.append(by_id[(row['task'], row['id'])])
  with np.load(os.path.join(path, 'arrays.npz')) as arrays:
    emb, probs = arrays['embeddings'], arrays['router_probs']
  return ReferenceSet(examples, emb, probs, key, meta.get('num_candidates', len(examples)))


def _check_arrays(refs: ReferenceSet, routing_shape) -> str | None:
  """Why the arrays do not fit the examples, or None."""
  emb, probs, n = refs.embeddings, refs.router_probs, len(refs.examples)
  if emb.ndim != 2 or probs.ndim != 3 or len(emb) != n or len(probs) != n:
    return f'arrays {emb.shape} and {probs.shape} for {n} references'
  if routing_shape is not None and probs.shape[1:] != tuple(routing_shape):
    return f'router_probs {probs.shape[1:]} per reference, expected {tuple(routing_shape)}'
  if not (np.isfinite(emb).all() and np.isfinite(probs).all()):
    return 'non-finite values'
  return None


def save(cache_dir: str, refs: ReferenceSet, key_parts: dict) -> str:
  """Writes atomically (temporary directory, then rename)."""
  os.makedirs(cache_dir, exist_ok=True)
  final = _entry(cache_dir, refs.key)
  tmp = tempfile.mkdtemp(prefix='.refs-tmp-', dir=cache_dir)
  try:
    with open(os.path.join(tmp, 'manifest.jsonl'), 'w') as f:
      for e in refs.examples:
        f.write(json.dumps({'id': e.id, 'task': e.task, 'text': e.context, 'gold': e.gold}) + '\n')
    np.savez(
      os.path.join(tmp, 'arrays.npz'),
      embeddings=refs.embeddings,
      router_probs=refs.router_probs,
    )
    with open(os.path.join(tmp, 'key.json'), 'w') as f:
      json.dump(
        {'key': refs.key, 'parts': key_parts, 'num_candidates': refs.num_candidates}, f, indent=1
      )
    if os.path.exists(final):
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final
