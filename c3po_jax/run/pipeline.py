"""A C3PO run end to end: data, reference set, neighbours, methods, results.

Dimensions: Q test samples in a batch, N neighbours (k), C choices,
L layers, E experts, R references.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from c3po_jax.common import errors
from c3po_jax.neighbours import kernels, references
from c3po_jax.neighbours import search as neighbours
from c3po_jax.remix import baselines, batch, diagnostics
from c3po_jax.remix.scoring import pad_to, predictions
from c3po_jax.run import compile_clock, per_method, plots, preflight, prompts, results
from c3po_jax.run import mesh as mesh_lib
from c3po_jax.run import output as run_output
from c3po_jax.run.config import RunConfig
from c3po_jax.run.runner import Runner, backend_name
from c3po_jax.tasks import encoding, format_example
from c3po_jax.tasks.loading import resolve_test_split


def start_processes(rc: RunConfig) -> None:
  """jax.distributed for a multi-process run: before any JAX work (idempotent)."""
  m = rc.mesh
  mesh_lib.initialize(m.multihost, m.coordinator_address, m.num_processes, m.process_id)


def open_runner(rc: RunConfig) -> Runner:
  """The processes, device mesh and model of rc, ready for one or more `run`s."""
  start_processes(rc)
  mesh = mesh_lib.make_mesh(rc.mesh.mesh_shape)
  mesh_lib.check_batch_size(rc.execution.batch_size, mesh)
  return Runner.open(rc, mesh)


def run(
  rc: RunConfig,
  runner: Runner | None = None,
  inputs: preflight.Inputs | None = None,
  name: str | None = None,
) -> dict:
  """Runs every method in rc.methods; writes results, summary and plots.

  What needs no weights (data files and rows, benchmark names, the checkpoint's
  config against the critical layers, the output directory) is checked first
  (`preflight`), so a mistake there fails in seconds, as a usage error.
  runner: an open runner to reuse (a suite's benchmarks share one: same
  model, engine and settings; see `suite`); by default one is opened.
  inputs: rc's data as `preflight.inputs` loaded and checked it (a suite checks
  every benchmark before the first runs); by default loaded here.
  name: what the figures call the benchmark (a suite's name for it); by
  default rc.data.benchmark.
  """
  started = time.time()
  start_processes(rc)
  d = rc.data
  with errors.usage_errors():
    inputs = inputs or preflight.inputs(rc)
    run_output.prepare(rc)
  test, pool, ref_sources = inputs.test, inputs.pool, inputs.ref_sources
  runner = runner or open_runner(rc)
  run_output.check_checkpoint(rc, references.params_fingerprint(runner.params))
  all_test, test = test, mesh_lib.process_share(test)  # this process's samples
  runner.begin(test, max(len(e.choices) for e in all_test + pool))
  writer = results.results_writer(rc.execution.output_dir, rc.execution.resume)
  trained = {}
  try:
    if test:
      trained = _run_methods(rc, runner, test, pool, writer)
  finally:
    writer.close()
  rows = results.collect_rows(
    writer.path, rc.execution.output_dir, rc.methods, [e.id for e in all_test]
  )
  summary = results.summarize(rows)
  if jax.process_index() != 0:
    return summary
  data = {
    'test': {
      'benchmark': d.benchmark,
      'split': resolve_test_split(d.benchmark, d.split),
      'size': len(all_test),
    },
    'references': ref_sources,
  }
  extra = {
    'benchmark': rc.data.benchmark,
    'reference_splits': {s['source']: s['split'] for s in ref_sources},
    'run_config': rc.flat(),
    'provenance': run_output.provenance(rc, data, started),
    'settings_in_effect': settings_in_effect(rc, runner),
  }
  if runner.encoder is not None:
    extra['provenance']['embedder'] = runner.encoder.provenance
  if trained:
    extra['trained_prompts'] = {
      k: {n: v for n, v in p.info.items() if n != 'losses'} for k, p in trained.items()
    }
  diag = diagnostics.summarize(rows)
  extra['diagnostics'] = diag
  results.write_summary(rc.execution.output_dir, summary, extra)
  extra['chance_accuracy'] = results.chance(rows)
  print(results.format_table(summary, rc.data.benchmark, extra['chance_accuracy']))
  scope = plots.scope(summary, name or rc.data.benchmark)
  if diag:
    print(diagnostics.format_table(diag))
    plots.ngd_steps(diag, rc.execution.output_dir, summary, scope)
  plots.accuracy(summary, rc.execution.output_dir, scope)
  plot_rows = [r for r in rows if r['method'] == 'ngd'] or [r for r in rows if r.get('pathway')]
  plots.routing_heatmaps(plot_rows, rc.execution.output_dir, rc.execution.num_plots)
  return summary


def settings_in_effect(rc: RunConfig, runner: Runner) -> dict:
  """What the run's settings resolved to on this model (the flags may ask for more)."""
  spec = runner.engine.ec.spec
  return {
    'critical_layers': list(spec.layers),
    'core_experts': spec.num_core,
    'num_experts': runner.config.num_experts,
    'experts_per_token': runner.config.num_experts_per_tok,
    'token_position': rc.method.token_position,
    'token_count': rc.method.token_count,
    'embedder': rc.neighbourhood.embedder,
    'ngd_backend': backend_name(rc),
    'baseline_scope': rc.method.baseline_scope,
    'per_method': rc.method_settings(),  # settings single methods ran with instead
  }


def kernel_weights(rc: RunConfig, refs, nbh) -> np.ndarray:
  """[Q, N] the run's kernel weights of each test sample's neighbours (`--kernel`, `--sigma`)."""
  sigma = rc.neighbourhood.sigma
  if sigma == 'reference':
    sigma = kernels.reference_bandwidth(
      refs.embeddings, k=rc.neighbourhood.k, max_similarity=rc.neighbourhood.max_similarity
    )
    logging.info('kernel bandwidth (reference rule): sigma = %.4f', sigma)
  return kernels.kernel_weights(
    nbh.similarity, nbh.valid, kind=rc.neighbourhood.kernel, sigma=sigma
  )


def find_neighbours(rc: RunConfig, refs, embeddings):
  """(neighbours, [Q, N] kernel weights) of test embeddings [Q, D] in the reference set."""
  n = rc.neighbourhood
  nbh = neighbours.find(
    embeddings,
    refs.embeddings,
    k=n.k,
    epsilon=n.epsilon,
    max_similarity=n.max_similarity,
    ball_cap=n.ball_cap,
  )
  lonely = int((~nbh.valid.any(axis=1)).sum())
  if lonely:
    logging.warning(
      '%d of %d test samples have no neighbour (every reference is more similar than '
      '--max_similarity=%s, or outside --epsilon): they keep the base pathway',
      lonely,
      len(nbh.valid),
      n.max_similarity,
    )
  return nbh, kernel_weights(rc, refs, nbh)


def _run_methods(rc, runner: Runner, test, pool, writer):
  encoded = runner.encode(test)
  long = sum(p.truncated for p in encoded)
  if long:
    logging.warning(
      '%d of %d test prompts are longer than --max_len=%d tokens: the model sees their end '
      '(left-truncated; their rows carry a warning)',
      long,
      len(encoded),
      rc.model.max_len,
    )
  hashes = [encoding.content_hash(p) for p in encoded]
  dropped = writer.drop_stale({e.id: h for e, h in zip(test, hashes)})
  if dropped:
    logging.warning(
      '--resume: dropped %d rows computed for other questions under the same ids; '
      'those samples run again',
      dropped,
    )
  t0, c0 = time.perf_counter(), compile_clock.seconds()
  base = runner.analyze(test, encoded, 'test (base)', role='test')
  compiled = compile_clock.seconds() - c0  # the base pass: base's own time per sample
  base_time = dict(
    seconds=(time.perf_counter() - t0 - compiled) / len(test), compile_seconds=compiled / len(test)
  )
  base_pred, _ = predictions(base.scores, base.cont_chars)
  gold = np.asarray([e.gold for e in test])
  refs = runner.reference_set(pool) if pool else None
  hoods = {}  # per-method neighbourhood settings -> (neighbours, kernel weights)
  ref_prompts = None
  if refs is not None:
    logging.info('reference set: %d of %d answered correctly', len(refs), refs.num_candidates)
    ref_prompts = runner.encode(refs.examples)

  def neighbourhood(mrc: RunConfig):
    """(neighbours, kernel weights) of the test samples under mrc's neighbourhood settings."""
    if refs is None:
      return None, None
    key = per_method.neighbourhood_key(mrc)
    if key not in hoods:
      hoods[key] = find_neighbours(mrc, refs, base.embeddings)
    return hoods[key]

  prompt_text = [format_example(e, rc.data.fmt).context for e in test]

  def row(method, i, scores, seconds, nbh=None, weights=None, **extra):
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
      'sample_hash': hashes[i],  # the sample's tokens and gold: what --resume checks
      'seconds': float(seconds),
      'choices': list(test[i].choices),
      # The per-choice scores the prediction was taken from (rc: summed
      # continuation log-likelihoods; mc: the answer letters' log-probabilities).
      'choice_scores': [round(float(x), 5) for x in scores[: len(test[i].choices)]],
    }
    if nbh is not None:
      r['neighbours'] = [
        {'id': refs.examples[j].id, 'similarity': round(float(s), 4), 'weight': round(float(w), 4)}
        for j, s, w, v in zip(nbh.index[i], nbh.similarity[i], weights[i], nbh.valid[i])
        if v
      ]
    if test[i].id not in writer.samples:  # the texts once per sample: its first row
      r['question'] = test[i].context
      r['prompt'] = prompt_text[i]  # the formatted prompt (rc: the first choice's context)
    if encoded[i].truncated:
      r['warning'] = f'prompt longer than --max_len={rc.model.max_len} tokens: left-truncated'
      if 'prompt' in r:  # what the model saw
        r['prompt'] = runner.tokenizer.decode(encoded[i].context[-rc.model.max_len :])
    r.update(extra)
    return r

  trained = {}  # the benchmark's trained prompts (baseline scope 'references')
  for method in rc.methods:
    todo = [i for i in range(len(test)) if (method, test[i].id) not in writer.done]
    if not todo:
      continue
    if method == 'base':  # nothing to compute
      for i in todo:
        writer.write(row('base', i, base.scores[i], **base_time))
      continue
    mrc, mrunner = rc.for_method(method), runner.for_method(method)  # --per_method
    nbh, weights = neighbourhood(mrc)
    if method in baselines.KINDS and mrc.method.baseline_scope == 'references':
      examples = prompts.training_examples(mrc, pool, refs)
      trained[method] = prompts.trained_prompt(mrc, mrunner, method, examples)
    bs = rc.execution.batch_size
    for start in tqdm(range(0, len(todo), bs), desc=method, unit='batch'):
      idx = todo[start : start + bs]
      t0, c0 = time.perf_counter(), compile_clock.seconds()
      inputs = batch.BatchInputs(
        mrunner, idx, pad_to(idx, bs), encoded, base, refs, nbh, weights, ref_prompts
      )
      inputs.trained = trained
      an_scores, extras = batch.method_batch(method, inputs)
      compiled = compile_clock.seconds() - c0  # once per shape for the whole run
      seconds = (time.perf_counter() - t0 - compiled) / len(idx)
      for j, i in enumerate(idx):
        extra = dict(extras[j], compile_seconds=compiled / len(idx))
        writer.write(row(method, i, an_scores[j], seconds, nbh, weights, **extra))
  return trained
