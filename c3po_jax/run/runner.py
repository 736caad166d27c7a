"""The model of a run and the passes over many prompts: built once, used by every benchmark.

`Runner.open(rc)` loads the checkpoint (each leaf straight into its shard on
a mesh), builds the engine (its jitted methods compile once per shape and
are reused by every benchmark of a suite) and the neighbour-state cache.
`begin(test, num_choices)` points it at one benchmark's samples.

Dimensions: n prompts, C choices, S sequences per prompt, L layers, E experts,
De embedding width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from c3po_jax.ckpts.checkpoint import load_checkpoint
from c3po_jax.ckpts.hf_snapshot import read_config
from c3po_jax.neighbours import embedding, references
from c3po_jax.remix import baselines, engine, losses, methods, state_cache
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.remix.scoring import ChoiceBatch, make_batch, pad_to, predictions
from c3po_jax.remix.state_cache import StateCache
from c3po_jax.run import mesh as mesh_lib
from c3po_jax.run import preflight
from c3po_jax.run.config import RunConfig
from c3po_jax.run.preflight import MissingCheckpointError  # noqa: F401 - raised by load_model
from c3po_jax.tasks import Example, encoding
from c3po_jax.tasks.encoding import EncodedPrompt
from c3po_jax.tasks.tokenizer import load_tokenizer


def load_model(rc: RunConfig, mesh=None):
  """(model config, params, tokenizer) of rc's checkpoint."""
  path = preflight.checkpoint_dir(rc)
  shardings = None
  if mesh is not None:  # Orbax restores each leaf straight into its sharding
    shardings = mesh_lib.param_shardings(read_config(path), mesh)
  config, params = load_checkpoint(path, dtype=rc.model.dtype, shardings=shardings)
  config = config.replace(dispatch=rc.execution.moe_dispatch)
  has_tok = os.path.exists(os.path.join(path, 'tokenizer.json'))
  tokenizer = load_tokenizer(path if has_tok else None)
  return config, params, tokenizer


@dataclasses.dataclass
class PromptsAnalysis:
  """A pass over many prompts (numpy, n first): `scoring.Analysis` of each batch, joined."""

  scores: np.ndarray  # [n, C]
  cont_chars: np.ndarray  # [n, C]
  embeddings: np.ndarray  # [n, De]
  router_probs: np.ndarray  # [n, L, E]
  seq_probs: np.ndarray  # [n, S, L, E] each sequence's routing at its last context token


def prefix_window(rc: RunConfig) -> bool:
  """Whether the re-mixed token is the last one alone: what the prefix-cached window covers."""
  return rc.method.token_position == 'last' and rc.method.token_count == 1


def backend_name(rc: RunConfig) -> str:
  """The loss backend: the prefix cache needs the re-mixed token to be the last one."""
  if rc.execution.ngd_backend == 'prefix' and not prefix_window(rc):
    logging.warning(
      '--token_position=%s --token_count=%d: the prefix-cached loss covers the last token '
      'only; using the naive backend',
      rc.method.token_position,
      rc.method.token_count,
    )
    return 'naive'
  return rc.execution.ngd_backend


def make_engine(rc: RunConfig, config) -> engine.Engine:
  m = rc.method
  spec = pw_lib.PathwaySpec.for_model(config, m.critical_layers, m.core_experts)
  # The methods' hyper-parameters: fields named like a setting of the run's method
  # group take its value; the others (e.g. alpha_grid) keep their defaults.
  mc, bc = (
    cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(cls) if hasattr(m, f.name)})
    for cls in (methods.MethodConfig, baselines.BaselineConfig)
  )
  ec = engine.EngineConfig(
    spec=spec,
    method=mc,
    loss=m.loss,
    opt_pathway_mode=m.opt_pathway_mode,
    eval_pathway_mode=m.eval_pathway_mode,
    baseline=bc,
  )
  return engine.shared(config, ec, losses.BACKENDS[backend_name(rc)])


def make_store(rc: RunConfig, eng: engine.Engine, params) -> StateCache | None:
  """The prefix-state store of a run, or None (naive backend, or --prefix_cache_bytes=0)."""
  x = rc.execution
  if backend_name(rc) != 'prefix' or x.prefix_cache_bytes == 0:
    return None
  auto_device, auto_host = state_cache.auto_budgets()
  device = auto_device if x.prefix_cache_bytes is None else x.prefix_cache_bytes
  host = auto_host if x.prefix_host_bytes is None else x.prefix_host_bytes
  # What a state depends on besides its prompt: it names the spilled files.
  fingerprint = references.params_fingerprint(params)
  dtype = str(jax.tree.leaves(params)[0].dtype)
  namespace = json.dumps([fingerprint, dtype, min(eng.ec.spec.layers), rc.model.max_len])
  logging.info(
    'prefix-state store: %d device bytes, %d host bytes, spill to %s',
    device,
    host,
    x.prefix_spill_dir,
  )
  return StateCache(
    eng.prepare,
    eng.fit,
    max(device, 1),
    host_bytes=host,
    spill_dir=x.prefix_spill_dir and os.path.expanduser(x.prefix_spill_dir),
    namespace=namespace,
  )


def make_encoder(rc: RunConfig) -> embedding.TextEmbedder | None:
  """The run's text encoder for neighbour search (None: MoEE, the model's own states)."""
  n = rc.neighbourhood
  if n.embedder == embedding.MOE:
    return None
  return embedding.TextEmbedder(n.embedder, rc.execution.cache_dir, prompt=n.embedder_prefix)


class Runner:
  """The model, engine and caches of a run; batched passes over prompts."""

  def __init__(self, rc: RunConfig, config, params, tokenizer, mesh=None):
    self.rc, self.config, self.params, self.tokenizer = rc, config, params, tokenizer
    self.mesh = mesh
    self.engine = make_engine(rc, config)
    # Prefix states of references and test samples (`state_key`), from their first pass.
    self.states = make_store(rc, self.engine, params)
    self.encoder = make_encoder(rc)
    self.num_choices = 2
    self.test: list[Example] = []
    self._engines = {rc.method: self.engine}  # per method settings (`for_method`)

  def for_method(self, method: str) -> Runner:
    """This runner as `method` runs: its per-method settings, an engine compiled for them.

    Shares the model, the state store and the encoder (per-method settings
    change neither prefix states nor references, see `per_method`).
    """
    mrc = self.rc.for_method(method)
    if mrc == self.rc:
      return self
    view = copy.copy(self)
    view.rc = mrc
    if mrc.method not in self._engines:
      self._engines[mrc.method] = make_engine(mrc, self.config)
    view.engine = self._engines[mrc.method]
    return view

  @classmethod
  def open(cls, rc: RunConfig, mesh=None) -> Runner:
    """Loads rc's checkpoint and builds everything that runs on it."""
    config, params, tokenizer = load_model(rc, mesh)
    logging.info('model: %s', config)
    return cls(rc, config, params, tokenizer, mesh)

  def begin(self, test: list[Example], num_choices: int) -> None:
    """Points the runner at one benchmark: its (this process's) samples, choices per sample."""
    self.test, self.num_choices = test, num_choices

  # ---- passes over many prompts ----
  def encode(self, examples, fewshot=None) -> list[EncodedPrompt]:
    fmt, max_len = self.rc.data.fmt, self.rc.model.max_len
    return [
      encoding.encode(self.tokenizer, e, fmt, fewshot[i] if fewshot else (), max_len=max_len)
      for i, e in enumerate(examples)
    ]

  def batch(self, prompts, size=None) -> ChoiceBatch:
    size = size or self.rc.execution.batch_size
    return self.shard(
      make_batch(
        pad_to(prompts, size),
        batch_size=size,
        num_choices=self.num_choices,
        max_len=self.rc.model.max_len,
        position=self.rc.method.token_position,
        count=self.rc.method.token_count,
      )
    )

  def test_states(self, prompts, test_batch, keys):
    """The test samples' prefix states [Q, 1, ...]: from the store (their base pass) or fresh."""
    if self.states is None:
      return self.engine.prepare_tests(self.params, test_batch)
    kw = dict(num_choices=self.num_choices, max_len=self.rc.model.max_len)
    flat = self.states.states(self.params, keys, prompts, **kw)  # [Q, ...]
    return self.shard(jax.tree.map(lambda x: x[:, None], flat))

  def shard(self, tree):
    """Per-sample arrays [Q, ...] split over the mesh's data axis."""
    return tree if self.mesh is None else mesh_lib.shard_batch(tree, self.mesh)

  def state_key(self, prompt: EncodedPrompt, role: str) -> tuple:
    """A prompt's key in the prefix-state store (role 'ref' or 'test'): by its content.

    The tokens and gold (`encoding.content_hash`), never the sample's id: ids
    repeat across draws and data files, and a state kept (or spilled to disk
    by an earlier run) must never answer another question.
    """
    return (role, encoding.content_hash(prompt), self.rc.data.fmt, self.num_choices)

  def analyze(self, examples, prompts, desc, *, role=None, correct_only=False) -> PromptsAnalysis:
    """The base pass over prompts in batches.

    role: keep each prompt's prefix state in the store under `state_key`
    (with a store and the last token re-mixed); correct_only: only of the
    prompts the base answers correctly (the reference set).
    """
    bs = self.rc.execution.batch_size
    keep = role is not None and self.states is not None
    keep = keep and prefix_window(self.rc)
    out = {k: [] for k in ('scores', 'chars', 'hidden', 'logits', 'probs', 'seq_probs')}
    for i in tqdm(range(0, len(prompts), bs), desc=desc, unit='batch'):
      chunk = prompts[i : i + bs]
      b = self.batch(chunk)
      n = len(chunk)
      if keep:
        an, st = self.engine.analyze_prepared(self.params, b)
        an = jax.device_get(an)
        keys = [self.state_key(p, role) for p in chunk]
        if correct_only:
          pred, _ = predictions(an.scores[:n], np.asarray(b.cont_chars)[:n])
          keys = [k if p == e.gold else None for k, p, e in zip(keys, pred, examples[i : i + n])]
        kw = dict(num_choices=self.num_choices, max_len=self.rc.model.max_len)
        self.states.put_rows(keys, st, chunk, **kw)
      else:
        an = jax.device_get(self.engine.analyze(self.params, b))
      out['scores'].append(an.scores[:n])
      out['chars'].append(np.asarray(b.cont_chars)[:n])
      out['hidden'].append(an.last_hidden[:n])
      out['logits'].append(an.router_logits[:n])
      out['probs'].append(an.router_probs[:n])
      out['seq_probs'].append(an.seq_router_probs[:n])
    cat = {k: np.concatenate(v) for k, v in out.items()}
    if self.encoder is None:
      emb = embedding.moe_embedding(cat['hidden'], cat['logits'])
    else:
      emb = self.encoder([e.context for e in examples])
    return PromptsAnalysis(
      cat['scores'],
      cat['chars'],
      emb,
      cat['probs'].astype(np.float32),
      cat['seq_probs'].astype(np.float32),
    )

  def reference_set(self, pool: list[Example]) -> references.ReferenceSet:
    """The pool's correctly answered samples with their embeddings and routing (cached)."""
    if not pool:
      raise ValueError('the reference pool is empty: check --reference / --max_reference_samples')
    n = self.rc.neighbourhood
    parts = {
      'model': references.params_fingerprint(self.params),
      'config': dataclasses.asdict(self.config),
      'data': references.examples_fingerprint(pool),
      'fmt': self.rc.data.fmt,
      'embedder': n.embedder,
      'embedder_files': self.encoder.provenance['fingerprint'] if self.encoder else None,
      'embedder_prefix': n.embedder_prefix,
      'token_position': self.rc.method.token_position,
      'token_count': self.rc.method.token_count,
      'max_len': self.rc.model.max_len,
      'version': 1,
    }
    key = references.cache_key(parts)
    cache_dir = os.path.expanduser(self.rc.execution.cache_dir)
    routing = (self.config.num_hidden_layers, self.config.num_experts)
    cached = references.load_cached(cache_dir, key, pool, routing)
    if cached is not None:
      logging.info('reusing reference set %s (%d kept)', key, len(cached))
      return cached
    an = self.analyze(pool, self.encode(pool), 'references', role='ref', correct_only=True)
    pred, _ = predictions(an.scores, an.cont_chars)
    keep = np.flatnonzero(pred == np.asarray([e.gold for e in pool]))
    refs = references.ReferenceSet(
      examples=[pool[i] for i in keep],
      embeddings=an.embeddings[keep],
      router_probs=an.router_probs[keep],
      key=key,
      num_candidates=len(pool),
    )
    if len(refs) == 0:
      raise ValueError(
        f'the base model answers none of the {len(pool)} reference samples correctly: '
        'the reference set is empty'
      )
    if jax.process_index() == 0:  # one writer when processes share cache_dir
      references.save(cache_dir, refs, parts)
    return refs
