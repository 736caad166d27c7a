"""A C3PO run end to end: data, reference set, neighbours, methods, results.

Dimensions: Q test samples in a batch, N neighbours (k), C choices,
L layers, E experts, R references.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from benchmarks.tasks import Example, TaskSourceError, format_example, load_examples
from benchmarks.tasks import registry as task_registry
from c3po_jax import (
  diagnostics,
  distributed,
  embedding,
  engine,
  errors,
  kernels,
  neighbours,
  plots,
  prompting,
  references,
  remix,
  results,
  run_output,
)
from c3po_jax import methods as methods_lib
from c3po_jax import pathway as pw_lib
from c3po_jax.checkpoint import load_checkpoint
from c3po_jax.hf_snapshot import read_config
from c3po_jax.run_config import RunConfig
from c3po_jax.scoring import ChoiceBatch, EncodedPrompt, make_batch, predictions
from c3po_jax.state_cache import StateCache
from c3po_jax.tokenizer import load_tokenizer


class MissingCheckpointError(FileNotFoundError):
  pass


def load_model(rc: RunConfig, mesh=None):
  path = os.path.expanduser(rc.checkpoint_dir)
  if not os.path.isdir(path):
    raise MissingCheckpointError(
      f'no checkpoint at {path!r}. Convert a Hugging Face OLMoE snapshot first:\n'
      f'  python -m c3po_jax.convert --hf_dir=PATH/TO/OLMoE-1B-7B-0924 --output_dir={path}\n'
      '(or pass --checkpoint_dir=PATH to a local HF snapshot directory, converted in memory)'
    )
  shardings = None
  if mesh is not None:  # Orbax restores each leaf straight into its sharding
    shardings = distributed.param_shardings(read_config(path), mesh)
  config, params = load_checkpoint(path, dtype=rc.dtype, shardings=shardings)
  has_tok = os.path.exists(os.path.join(path, 'tokenizer.json'))
  tokenizer = load_tokenizer(path if has_tok else None)
  return config, params, tokenizer


def load_references(rc: RunConfig) -> list[Example]:
  """Reference pool: the sources in order, max_reference_samples split evenly."""
  return load_reference_sources(rc)[0]


def load_reference_sources(rc: RunConfig) -> tuple[list[Example], list[dict]]:
  """The reference pool and, per source, the split actually used and its size."""
  per = None
  if rc.max_reference_samples is not None:
    per = max(1, rc.max_reference_samples // len(rc.reference))
  pool, used = [], []
  for name in rc.reference:
    generic = name.endswith(('.jsonl', '.jsonl.gz')) or name.startswith('jsonl:')
    splits = [rc.reference_split]
    if rc.reference_split is None and not generic:
      spec, _ = task_registry.resolve(name)
      splits = list(spec.reference_splits) or [None]
    for i, split in enumerate(splits):
      try:
        got = load_examples(name, split=split, limit=per)
        break
      except TaskSourceError:
        if i == len(splits) - 1:
          raise
    if not got:
      raise ValueError(f'reference source {name!r} has no samples (split {split!r})')
    pool.extend(got)
    used.append({'source': name, 'split': None if generic else split, 'size': len(got)})
  return pool, used


def _pad(items: list, size: int) -> list:
  return items + [items[-1]] * (size - len(items))


@dataclasses.dataclass
class Analysis:
  scores: np.ndarray  # [n, C]
  cont_chars: np.ndarray  # [n, C]
  embeddings: np.ndarray  # [n, De]
  router_probs: np.ndarray  # [n, L, E]
  seq_probs: np.ndarray  # [n, S, L, E] each sequence's routing at its last context token


class Runner:
  """Holds the model, data and engine of one run; yields result rows."""

  def __init__(self, rc: RunConfig, config, params, tokenizer, mesh=None):
    self.rc, self.config, self.params, self.tokenizer = rc, config, params, tokenizer
    self.mesh = mesh
    spec = pw_lib.PathwaySpec.make(
      config.num_hidden_layers, config.num_experts, rc.critical_layers, rc.core_experts
    )
    mc = methods_lib.MethodConfig(
      ngd_steps=rc.ngd_steps,
      lr=rc.lr,
      lr_end=rc.lr_end,
      optimizer=rc.optimizer,
      pathway_param=rc.pathway_param,
      ngd_init=rc.ngd_init,
      kr_alpha=rc.kr_alpha,
      mode_alpha=rc.mode_alpha,
      mode_iters=rc.mode_iters,
      mode_neighbours=rc.mode_neighbours,
    )
    self.engine = engine.Engine(
      config,
      engine.EngineConfig(
        spec=spec,
        method=mc,
        loss=rc.loss,
        opt_pathway_mode=rc.opt_pathway_mode,
        eval_pathway_mode=rc.eval_pathway_mode,
      ),
      loss_backend=engine.BACKENDS[self.backend_name(rc)],
    )
    # Prepared neighbour states of recurring references, by (task, id, fmt).
    self.states = None
    if self.backend_name(rc) == 'prefix' and rc.prefix_cache_size:
      fit = self.engine.loss_backend.fit
      self.states = StateCache(self.engine.prepare, fit, rc.prefix_cache_size)
    self.encoder = None
    if rc.embedder != 'moe':
      self.encoder = embedding.EncoderEmbedder(
        rc.embedder, pooling=rc.embedder_pooling, prefix=rc.embedder_prefix
      )
    self.num_choices = 2
    self.test: list[Example] = []

  @staticmethod
  def backend_name(rc: RunConfig) -> str:
    """The loss backend: the prefix cache needs the re-mixed token to be the last one."""
    if rc.ngd_backend == 'prefix' and rc.token_position != 'last':
      logging.warning(
        '--token_position=%s: the prefix-cached loss covers the last token only; '
        'using the naive backend',
        rc.token_position,
      )
      return 'naive'
    return rc.ngd_backend

  # ---- passes over many prompts ----
  def encode(self, examples, fewshot=None) -> list[EncodedPrompt]:
    return [
      prompting.encode(self.tokenizer, e, self.rc.fmt, fewshot[i] if fewshot else ())
      for i, e in enumerate(examples)
    ]

  def batch(self, prompts, size=None) -> ChoiceBatch:
    size = size or self.rc.batch_size
    return self.shard(
      make_batch(
        _pad(prompts, size),
        batch_size=size,
        num_choices=self.num_choices,
        max_len=self.rc.max_len,
        position=self.rc.token_position,
      )
    )

  def shard(self, tree):
    """Per-sample arrays [Q, ...] split over the mesh's data axis."""
    return tree if self.mesh is None else distributed.shard_batch(tree, self.mesh)

  def analyze(self, examples, prompts, desc) -> Analysis:
    bs = self.rc.batch_size
    out = {k: [] for k in ('scores', 'chars', 'hidden', 'logits', 'probs', 'seq_probs')}
    for i in tqdm(range(0, len(prompts), bs), desc=desc, unit='batch'):
      chunk = prompts[i : i + bs]
      b = self.batch(chunk)
      an = jax.device_get(self.engine.analyze(self.params, b))
      n = len(chunk)
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
    return Analysis(
      cat['scores'],
      cat['chars'],
      emb,
      cat['probs'].astype(np.float32),
      cat['seq_probs'].astype(np.float32),
    )

  def reference_set(self, pool: list[Example]) -> references.ReferenceSet:
    if not pool:
      raise ValueError('the reference pool is empty: check --reference / --max_reference_samples')
    parts = {
      'model': references.params_fingerprint(self.params),
      'config': dataclasses.asdict(self.config),
      'data': references.examples_fingerprint(pool),
      'fmt': self.rc.fmt,
      'embedder': self.rc.embedder,
      'embedder_pooling': self.rc.embedder_pooling,
      'embedder_prefix': self.rc.embedder_prefix,
      'token_position': self.rc.token_position,
      'max_len': self.rc.max_len,
      'version': 1,
    }
    key = references.cache_key(parts)
    cache_dir = os.path.expanduser(self.rc.cache_dir)
    routing = (self.config.num_hidden_layers, self.config.num_experts)
    cached = references.load_cached(cache_dir, key, pool, routing)
    if cached is not None:
      logging.info('reusing reference set %s (%d kept)', key, len(cached))
      return cached
    an = self.analyze(pool, self.encode(pool), 'references')
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


def run(rc: RunConfig) -> dict:
  """Runs every method in rc.methods; writes results, summary and plots.

  What needs no model (data files, benchmark names, the output directory)
  is checked first, so a mistake there fails in seconds, as a usage error.
  """
  started = time.time()
  distributed.initialize(rc.multihost, rc.coordinator_address, rc.num_processes, rc.process_id)
  mesh = distributed.make_mesh(rc.mesh_shape)
  distributed.check_batch_size(rc.batch_size, mesh)
  with errors.usage_errors():
    test = load_examples(rc.benchmark, split=rc.split, source=rc.source, limit=rc.max_test_samples)
    if not test:
      raise ValueError(f'no test samples in {rc.benchmark!r}')
    pool, ref_sources = load_reference_sources(rc) if rc.reference else ([], [])
    run_output.prepare(rc)
  config, params, tokenizer = load_model(rc, mesh)
  logging.info('model: %s', config)
  run_output.check_checkpoint(rc, references.params_fingerprint(params))
  runner = Runner(rc, config, params, tokenizer, mesh)
  all_test, test = test, distributed.process_share(test)  # this process's samples
  runner.test = test
  runner.num_choices = max(len(e.choices) for e in all_test + pool)
  writer = distributed.results_writer(rc.output_dir, rc.resume)
  try:
    if test:
      _run_methods(rc, runner, test, pool, writer)
  finally:
    writer.close()
  rows = distributed.collect_rows(writer.path, rc.output_dir, rc.methods, [e.id for e in all_test])
  summary = results.summarize(rows)
  if jax.process_index() != 0:
    return summary
  data = {
    'test': {'benchmark': rc.benchmark, 'split': _test_split(rc), 'size': len(all_test)},
    'references': ref_sources,
  }
  extra = {
    'benchmark': rc.benchmark,
    'reference_splits': {s['source']: s['split'] for s in ref_sources},
    'run_config': dataclasses.asdict(rc),
    'provenance': run_output.provenance(rc, data, started),
  }
  diag = diagnostics.summarize(rows)
  extra['diagnostics'] = diag
  results.write_summary(rc.output_dir, summary, extra)
  print(results.format_table(summary, rc.benchmark))
  if diag:
    print(diagnostics.format_table(diag))
    plots.ngd_steps(diag, rc.output_dir)
  plots.accuracy(summary, rc.output_dir, rc.benchmark)
  plot_rows = [r for r in rows if r['method'] == 'ngd'] or [r for r in rows if r.get('pathway')]
  plots.routing_heatmaps(plot_rows, rc.output_dir, rc.num_plots)
  return summary


def _test_split(rc: RunConfig) -> str | None:
  """The test split used: None for a generic JSONL file (the file is the split)."""
  name = rc.benchmark
  if name.endswith(('.jsonl', '.jsonl.gz')) or name.startswith('jsonl:'):
    return None
  return rc.split or task_registry.resolve(name)[0].test_split


def _run_methods(rc, runner: Runner, test, pool, writer):
  prompts = runner.encode(test)
  base = runner.analyze(test, prompts, 'test (base)')
  base_pred, _ = predictions(base.scores, base.cont_chars)
  gold = np.asarray([e.gold for e in test])
  refs = runner.reference_set(pool) if pool else None
  if refs is not None:
    logging.info('reference set: %d of %d answered correctly', len(refs), refs.num_candidates)
    nbh = neighbours.find(
      base.embeddings,
      refs.embeddings,
      k=rc.k,
      epsilon=rc.epsilon,
      max_similarity=rc.max_similarity,
      ball_cap=rc.ball_cap,
    )
    sigma = rc.sigma
    if sigma == 'reference':
      sigma = kernels.reference_bandwidth(refs.embeddings, k=rc.k, max_similarity=rc.max_similarity)
      logging.info('kernel bandwidth (reference rule): sigma = %.4f', sigma)
    weights = kernels.kernel_weights(nbh.similarity, nbh.valid, kind=rc.kernel, sigma=sigma)
    lonely = int((~nbh.valid.any(axis=1)).sum())
    if lonely:
      logging.warning(
        '%d of %d test samples have no neighbour (every reference is more similar than '
        '--max_similarity=%s, or outside --epsilon): they keep the base pathway',
        lonely,
        len(nbh.valid),
        rc.max_similarity,
      )
    ref_prompts = runner.encode(refs.examples)

  prompt_text = [format_example(e, rc.fmt).context for e in test]

  def row(method, i, scores, seconds, **extra):
    pred, norm = predictions(scores[None], base.cont_chars[i][None])
    pred, norm = pred[0], norm[0]
    r = {
      'method': method,
      'id': test[i].id,
      'task': test[i].task,
      'prediction': int(pred),
      'gold': int(gold[i]),
      'correct': bool(pred == gold[i]),
      'correct_norm': bool(norm == gold[i]),
      'base_prediction': int(base_pred[i]),
      'seconds': float(seconds),
      'question': test[i].context,
      'choices': list(test[i].choices),
      'prompt': prompt_text[i],  # the formatted prompt (rc: the first choice's context)
      # The per-choice scores the prediction was taken from (rc: summed
      # continuation log-likelihoods; mc: the answer letters' log-probabilities).
      'choice_scores': [round(float(x), 5) for x in scores[: len(test[i].choices)]],
    }
    if refs is not None and method != 'base':
      r['neighbours'] = [
        {'id': refs.examples[j].id, 'similarity': round(float(s), 4), 'weight': round(float(w), 4)}
        for j, s, w, v in zip(nbh.index[i], nbh.similarity[i], weights[i], nbh.valid[i])
        if v
      ]
    r.update(extra)
    return r

  for method in rc.methods:
    todo = [i for i in range(len(test)) if (method, test[i].id) not in writer.done]
    if not todo:
      continue
    if method == 'base':
      for i in todo:
        writer.write(row('base', i, base.scores[i], 0.0))
      continue
    bs = rc.batch_size
    for start in tqdm(range(0, len(todo), bs), desc=method, unit='batch'):
      idx = todo[start : start + bs]
      t0 = time.perf_counter()
      out = remix.method_batch(method, runner, idx, prompts, base, refs, nbh, weights, ref_prompts)
      an_scores, extras = out
      seconds = (time.perf_counter() - t0) / len(idx)
      for j, i in enumerate(idx):
        writer.write(row(method, i, an_scores[j], seconds, **extras[j]))
