"""One method over one batch of test samples: inputs gathered, engine run, row fields.

`method_batch` is the pipeline's inner step: it builds each sample's core
slice, neighbour batch and kernel weights, runs the method through the
engine, scores the re-mixed pathway, and returns the scores with the per-row
diagnostics (pathway before/after, NGD losses, accuracy after each step, the
share of new top-k experts, |dw|). The trained-prompt baselines (`baselines.KINDS`:
soft prompt, prefix tuning) change no pathway: they answer with their prompt.

Dimensions: Q test samples in a batch, N neighbours (k), C choices,
L layers, E experts, R references, P points of an optimization path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from c3po_jax.remix import baselines, losses
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.remix.scoring import make_batch
from c3po_jax.tasks import encoding


def pathway_record(cs, w0, w, spec) -> dict:
  """The core weights before and after, on each critical layer's core experts."""
  return {
    'layers': list(spec.layers),
    'core': np.asarray(cs.core).tolist(),
    'before': np.round(np.asarray(w0), 4).tolist(),
    'after': np.round(np.asarray(w), 4).tolist(),
  }


def neighbour_data(runner, pidx, refs, nbh, weights, ref_prompts, prepared=True):
  """Neighbour batches [Q, N, ...], kernel weights [Q, N], routing [Q, N, L, E].

  prepared: the batches as the loss backend prepared them (else plain ChoiceBatches).
  """
  eng, params, bs = runner.engine, runner.params, runner.rc.execution.batch_size
  k = nbh.index.shape[1]
  nb_prompts, nb_w, nb_probs = [], [], []
  for i in pidx:
    valid = nbh.valid[i]
    fill = int(nbh.index[i][valid][0]) if valid.any() else 0
    for j, v in zip(nbh.index[i], valid):
      nb_prompts.append(ref_prompts[int(j) if v else fill])
      nb_probs.append(refs.router_probs[int(j) if v else fill])
    nb_w.append(np.where(valid, weights[i], 0.0))
  nc, ml = runner.num_choices, runner.rc.model.max_len
  states = runner.states if prepared else None
  if states is None:
    flat = make_batch(
      nb_prompts,
      num_choices=nc,
      max_len=ml,
      position=runner.rc.method.token_position,
      count=runner.rc.method.token_count,
    )
  else:  # already prepared: [Q * N, ...]
    keys = [runner.state_key(p, 'ref') for p in nb_prompts]
    flat = states.states(params, keys, nb_prompts, num_choices=nc, max_len=ml)
  data = runner.shard(jax.tree.map(lambda x: x.reshape((bs, k) + x.shape[1:]), flat))
  if prepared and states is None:
    data = eng.prepare(params, data)
  w = runner.shard(np.stack(nb_w).astype(np.float32))
  probs = np.stack(nb_probs).reshape(bs, k, *refs.router_probs.shape[1:])
  return data, w, runner.shard(probs)


@dataclasses.dataclass
class BatchInputs:
  """One batch of test samples and what the methods need of them.

  idx: the samples' indices (len n); pidx: idx padded to the batch size Q.
  """

  runner: object  # the run's Runner: engine, params, tokenizer, batching
  idx: list[int]
  pidx: list[int]
  prompts: list  # every test sample's encoded prompt
  base: object  # the base PromptsAnalysis (runner) of every test sample
  refs: object  # the ReferenceSet, or None
  nbh: object  # neighbours of every test sample
  weights: np.ndarray  # [num_test, N] kernel weights
  ref_prompts: list  # every reference's encoded prompt
  test_batch: object = None  # ChoiceBatch [Q, ...]
  cs: object = None  # CoreSlice [Q, ...]
  seq_probs: object = None  # [Q, S, L, E]
  tests: object = None  # the test samples' prefix states [Q, 1, ...] (last token), or None
  trained: dict | None = None  # {baseline kind: run.prompts.Prompt} (scope 'references')


def _mode_finding(b: BatchInputs):
  eng, refs = b.runner.engine, b.refs
  return eng.mode_finding(b.cs, jnp.asarray(refs.router_probs), jnp.ones((len(refs),), bool))


def _oracle(b: BatchInputs):
  eng, params = b.runner.engine, b.runner.params
  if b.tests is not None and eng.loss_backend is losses.PrefixLoss:
    data = b.tests
  else:
    data = eng.prepare(params, jax.tree.map(lambda x: x[:, None], b.test_batch))  # [Q, 1, ...]
  return eng.oracle(params, b.cs, data, b.seq_probs)


def _ngd(b: BatchInputs):
  eng = b.runner.engine
  data, w, probs = neighbour_data(b.runner, b.pidx, b.refs, b.nbh, b.weights, b.ref_prompts)
  if eng.ec.method.needs_neighbour_routing:  # ngd_init='kernel_mean'
    return eng.ngd(b.runner.params, b.cs, data, w, eng.neighbour_weights(b.cs, probs))
  return eng.ngd(b.runner.params, b.cs, data, w)


def _kernel_regression(b: BatchInputs):
  eng = b.runner.engine
  data, w, probs = neighbour_data(b.runner, b.pidx, b.refs, b.nbh, b.weights, b.ref_prompts)
  return eng.kernel_regression(b.runner.params, b.cs, data, w, eng.neighbour_weights(b.cs, probs))


def _random_pathway(b: BatchInputs):
  """A random row per sample, seeded by the sample's content (the same draw in every run)."""
  seeds = [int(encoding.content_hash(b.prompts[i])[:8], 16) for i in b.pidx]
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  return b.runner.engine.random_pathway(b.cs, keys)


@dataclasses.dataclass(frozen=True)
class Remix:
  """A re-mixing method: how it runs on a batch, and what its rows report."""

  run: Callable[[BatchInputs], object]  # -> engine.Outcome
  needs_neighbours: bool = True  # without any, the sample keeps its base pathway
  path: bool = False  # an optimization path: accuracy after each step is reported


# The re-mixing methods by name (`icl` changes no pathway: see `method_batch`).
REMIX = {
  'mode_finding': Remix(_mode_finding, needs_neighbours=False),  # the whole reference set
  'kernel_regression': Remix(_kernel_regression),
  'ngd': Remix(_ngd, path=True),
  'oracle': Remix(_oracle, needs_neighbours=False, path=True),  # the sample's own label
  'random_pathway': Remix(_random_pathway, needs_neighbours=False),  # the control
}


def _icl(b: BatchInputs):
  """Scores [n, C] of the test samples with their neighbours as in-context examples."""
  runner, refs, nbh = b.runner, b.refs, b.nbh
  fewshot = [
    [refs.examples[j] for j, v in zip(nbh.index[i][::-1], nbh.valid[i][::-1]) if v] for i in b.idx
  ]
  tests = runner.encode([runner.test[i] for i in b.idx], fewshot)  # within --max_len
  an = jax.device_get(runner.engine.analyze(runner.params, runner.batch(tests)))
  return an.scores[: len(b.idx)], [{} for _ in b.idx]


def _loss_fields(losses: np.ndarray) -> dict:
  """A row's optimization trace [St + 1]: the losses, the first and the last."""
  losses = np.asarray(losses, np.float64)  # rounded in float32, 1.23099 lists as 1.2309900522..
  return {
    'losses': np.round(losses, 5).tolist(),
    'loss_before': round(float(losses[0]), 5),  # as rounded in `losses`
    'loss_after': round(float(losses[-1]), 5),
  }


def _fallback(method: str, sample, has_neighbours: bool, finite: bool) -> dict:
  """The row's `fallback` field, if the sample kept its base answer."""
  if not has_neighbours:  # nothing to learn from
    return {'fallback': 'no_neighbours'}
  if not finite:
    logging.warning('%s: non-finite step for %s; fell back to the base answer', method, sample)
    return {'fallback': 'nan'}
  return {}


def baseline_rows(method: str, out, b: BatchInputs):
  """A trained-prompt outcome (`baselines.PromptOutcome`, Q first) -> scores [n, C], extras.

  A sample without neighbours, or whose training was not finite, keeps the
  base scores (row `fallback`: 'no_neighbours' or 'nan').
  """
  scores, extras = [], []
  for j, i in enumerate(b.idx):
    has_nb, finite = bool(b.nbh.valid[i].any()), bool(out.finite[j])
    ex = _fallback(method, i, has_nb, finite)
    ex.update(_loss_fields(np.asarray(out.losses[j])))
    scores.append(np.asarray(out.scores[j]) if has_nb and finite else b.base.scores[i])
    extras.append(ex)
  return np.stack(scores), extras


def _baseline(method: str, b: BatchInputs):
  """Scores [n, C] with a trained prompt: the benchmark's one, or each sample's own."""
  runner, m = b.runner, b.runner.rc.method
  tests = runner.batch([b.prompts[i] for i in b.pidx])
  if m.baseline_scope == 'references':  # the paper's: one prompt, trained on the references
    tp = b.trained[method]
    scores = np.asarray(
      jax.device_get(runner.engine.prompted(method, runner.params, tp.prompt, tests))
    )
    out, extras = [], []
    for j, i in enumerate(b.idx):
      out.append(scores[j] if tp.finite else b.base.scores[i])
      extras.append({} if tp.finite else {'fallback': 'nan'})
    return np.stack(out), extras
  data, w, _ = neighbour_data(
    runner, b.pidx, b.refs, b.nbh, b.weights, b.ref_prompts, prepared=False
  )
  ids = baselines.init_ids(runner.tokenizer, m.baseline_init_text, m.baseline_prefix_len)
  out = jax.device_get(getattr(runner.engine, method)(runner.params, tests, data, w, ids))
  return baseline_rows(method, out, b)


def method_batch(method: str, b: BatchInputs):
  """Scores [n, C] after `method` on batch b, and per-sample extra row fields."""
  if method == 'icl':
    return _icl(b)
  if method in baselines.KINDS:
    return _baseline(method, b)
  remix = REMIX[method]
  runner = b.runner
  eng, params = runner.engine, runner.params
  b.test_batch = runner.batch([b.prompts[i] for i in b.pidx])
  b.cs = eng.core_slices(runner.shard(b.base.router_probs[b.pidx]))
  b.seq_probs = runner.shard(b.base.seq_probs[b.pidx])  # [Q, S, L, E]
  m = runner.rc.method
  if m.token_position == 'last' and m.token_count == 1:  # prefix states: the window scores it
    keys = [runner.state_key(b.prompts[i], 'test') for i in b.pidx]
    b.tests = runner.test_states([b.prompts[i] for i in b.pidx], b.test_batch, keys)
  out = remix.run(b)
  path_scores = None
  if b.tests is None:  # a second full forward of the test batch
    an = eng.analyze_remixed(params, b.test_batch, b.cs, out.trace.w, b.seq_probs)
    scores = jax.device_get(an.scores)
  else:  # the final pathway is the path's last point: only the window runs
    path = out.trace.path if remix.path else out.trace.w[:, None]
    path_scores = np.asarray(eng.path_scores(params, b.cs, b.tests, b.seq_probs, path))
    scores = path_scores[:, -1]  # [Q, C]
  return scores[: len(b.idx)], _extras(method, remix, b, out, path_scores)


def _extras(method: str, remix: Remix, b: BatchInputs, out, path_scores=None) -> list[dict]:
  """Per-sample row fields: pathway before/after, losses, step accuracy, fallbacks.

  path_scores [Q, P, C]: the test samples' scores along the method's path, if evaluated.
  """
  runner, eng = b.runner, b.runner.engine
  trace = out.trace
  w0 = jax.vmap(pw_lib.base_weights)(b.cs)
  step_correct = None
  if remix.path and path_scores is not None:
    gold = np.asarray([runner.test[i].gold for i in b.pidx])
    step_correct = np.argmax(path_scores, axis=-1) == gold[:, None]
  finite = np.asarray(trace.finite)
  loss_trace = np.asarray(trace.losses)
  topk_new, delta = np.asarray(out.topk_new), np.asarray(out.mean_abs_delta)
  extras = []
  for j, i in enumerate(b.idx):
    has_nb = not remix.needs_neighbours or bool(b.nbh.valid[i].any())
    ex = _fallback(method, i, has_nb, bool(finite[j]))  # the base pathway stays
    if method == 'kernel_regression':
      ex['alpha'] = float(out.alpha[j])
      if loss_trace.shape[-1] > 1:  # alpha searched: the grid ends at alpha = 1 (base)
        ex['alpha_losses'] = np.round(loss_trace[j], 5).tolist()
        ex['loss_before'] = round(float(loss_trace[j, -1]), 5)
        ex['loss_after'] = round(float(np.min(loss_trace[j])), 5)
    elif loss_trace.shape[-1]:
      ex.update(_loss_fields(loss_trace[j]))
      ends = float(np.asarray(out.loss_before)[j]), float(np.asarray(out.loss_after)[j])
      if all(np.isfinite(ends)):  # as the model routes (eval mode), whatever the descent's mode
        ex['loss_before'], ex['loss_after'] = (round(x, 5) for x in ends)
    if step_correct is not None:
      ex['step_correct'] = step_correct[j].tolist()
    ex['topk_new'] = round(float(topk_new[j]), 4)
    ex['mean_abs_delta'] = round(float(delta[j]), 6)
    cs_j = jax.tree.map(lambda x, j=j: x[j], b.cs)
    ex['pathway'] = pathway_record(cs_j, w0[j], trace.w[j], eng.ec.spec)
    extras.append(ex)
  return extras
