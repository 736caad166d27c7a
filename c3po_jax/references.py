"""Reference sets: the base model's correctly answered samples, with their
embeddings and last-context-token routing, cached on disk by content key.

A cache entry is `CACHE_DIR/refs-KEY/` holding `manifest.jsonl` (one line per
kept reference: id, task, text, gold), `arrays.npz` (embeddings [R, De],
router_probs [R, L, E]) and `key.json` (what the key was made of). The key
hashes the model (config + a parameter fingerprint), the data (every
example's id, task, text, choices and gold), the prompt format and the
embedder, so any change rebuilds; an entry is never reused for other inputs.

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

from benchmarks.tasks import Example


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
    flat = np.asarray(leaf).reshape(-1)
    sample = flat[:: max(1, flat.size // 4096)].astype(np.float32)
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


def load_cached(cache_dir: str, key: str, pool: list[Example]) -> ReferenceSet | None:
  """The cached set for `key`, or None (missing or unreadable: rebuild)."""
  path = _entry(cache_dir, key)
  try:
    with open(os.path.join(path, 'key.json')) as f:
      meta = json.load(f)
    if meta.get('key') != key:
      return None
    by_id = {(e.task, e.id): e for e in pool}
    examples = []
    with open(os.path.join(path, 'manifest.jsonl')) as f:
      for line in f:
        row = json.loads(line)
        examples.append(by_id[(row['task'], row['id'])])
    arrays = np.load(os.path.join(path, 'arrays.npz'))
    emb, probs = arrays['embeddings'], arrays['router_probs']
  except (OSError, KeyError, ValueError, json.JSONDecodeError):
    return None
  if len(emb) != len(examples) or len(probs) != len(examples):
    return None
  return ReferenceSet(examples, emb, probs, key, meta.get('num_candidates', len(examples)))


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
