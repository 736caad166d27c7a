"""One method over one batch of test samples: inputs gathered, engine run, row fields.

`method_batch` is the pipeline's inner step: it builds each sample's core
slice, neighbour batch and kernel weights, runs the method through the
engine, scores the re-mixed pathway, and returns the scores with the per-row
diagnostics (pathway before/after, NGD losses, accuracy after each step, the
share of new top-k experts, |dw|).

Dimensions: Q test samples in a batch, N neighbours (k), C choices,
L layers, E experts, R references, P points of an optimization path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from c3po_jax import pathway as pw_lib
from c3po_jax import prompting
from c3po_jax.scoring import make_batch


def _pad(items: list, size: int) -> list:
  return items + [items[-1]] * (size - len(items))


def pathway_record(cs, w0, w, spec) -> dict:
  """The core weights before and after, on each critical layer's core experts."""
  return {
    'layers': list(spec.layers),
    'core': np.asarray(cs.core).tolist(),
    'before': np.round(np.asarray(w0), 4).tolist(),
    'after': np.round(np.asarray(w), 4).tolist(),
  }


def _neighbour_data(runner, pidx, refs, nbh, weights, ref_prompts):
  """Neighbour batches [Q, N, ...] (prepared), kernel weights [Q, N], routing [Q, N, L, E]."""
  eng, params, bs = runner.engine, runner.params, runner.rc.batch_size
  k = nbh.index.shape[1]
  nb_prompts, nb_w, nb_probs, nb_refs = [], [], [], []
  for i in pidx:
    valid = nbh.valid[i]
    fill = int(nbh.index[i][valid][0]) if valid.any() else 0
    for j, v in zip(nbh.index[i], valid):
      nb_prompts.append(ref_prompts[int(j) if v else fill])
      nb_probs.append(refs.router_probs[int(j) if v else fill])
      nb_refs.append(refs.examples[int(j) if v else fill])
    nb_w.append(np.where(valid, weights[i], 0.0))
  nc, ml = runner.num_choices, runner.rc.max_len
  if runner.states is None:
    flat = make_batch(nb_prompts, num_choices=nc, max_len=ml, position=runner.rc.token_position)
  else:  # already prepared: [Q * N, ...]
    keys = [(e.task, e.id, runner.rc.fmt) for e in nb_refs]
    flat = runner.states.states(params, keys, nb_prompts, num_choices=nc, max_len=ml)
  data = runner.shard(jax.tree.map(lambda x: x.reshape((bs, k) + x.shape[1:]), flat))
  if runner.states is None:
    data = eng.prepare(params, data)
  w = runner.shard(np.stack(nb_w).astype(np.float32))
  probs = np.stack(nb_probs).reshape(bs, k, *refs.router_probs.shape[1:])
  return data, w, runner.shard(probs)


def method_batch(method, runner, idx, prompts, base, refs, nbh, weights, ref_prompts):
  """Scores [len(idx), C] after `method`, and per-sample extra row fields."""
  eng, params, bs = runner.engine, runner.params, runner.rc.batch_size
  n = len(idx)
  if method == 'icl':
    fewshot = [
      [refs.examples[j] for j, v in zip(nbh.index[i][::-1], nbh.valid[i][::-1]) if v] for i in idx
    ]
    tests = [
      prompting.encode(runner.tokenizer, runner.test[i], runner.rc.fmt, fs)
      for i, fs in zip(idx, fewshot)
    ]
    an = jax.device_get(eng.analyze(params, runner.batch(tests)))
    return an.scores[:n], [{} for _ in idx]

  pidx = _pad(list(idx), bs)
  test_batch = runner.batch([prompts[i] for i in pidx])
  cs = eng.core_slices(runner.shard(base.router_probs[pidx]))
  seq_probs = runner.shard(base.seq_probs[pidx])  # [Q, S, L, E]
  w0 = jax.vmap(pw_lib.base_weights)(cs)
  extras = [{} for _ in idx]
  tests = None  # the test samples' prefix states, for the accuracy after each step
  if method in ('ngd', 'oracle') and runner.rc.token_position == 'last':
    tests = eng.prepare_tests(params, test_batch)
  if method == 'mode_finding':
    valid = jnp.ones((len(refs),), bool)
    out = eng.mode_finding(cs, jnp.asarray(refs.router_probs), valid)
  elif method == 'oracle':
    if tests is not None and eng.loss_backend.__name__ == 'PrefixLoss':
      data = tests
    else:
      data = eng.prepare(params, jax.tree.map(lambda x: x[:, None], test_batch))  # [Q, 1, ...]
    out = eng.oracle(params, cs, data, seq_probs)
  else:
    data, w, probs = _neighbour_data(runner, pidx, refs, nbh, weights, ref_prompts)
    if method == 'ngd' and eng.ec.method.needs_neighbour_routing:
      out = eng.ngd(params, cs, data, w, eng.neighbour_weights(cs, probs))
    elif method == 'ngd':
      out = eng.ngd(params, cs, data, w)
    else:
      out = eng.kernel_regression(params, cs, data, w, eng.neighbour_weights(cs, probs))
  trace = out.trace
  an = jax.device_get(eng.analyze_remixed(params, test_batch, cs, trace.w, seq_probs))
  step_correct = None
  if tests is not None:
    path_scores = np.asarray(eng.path_scores(params, cs, tests, seq_probs, trace.path))  # [Q, P, C]
    gold = np.asarray([runner.test[i].gold for i in pidx])
    step_correct = np.argmax(path_scores, axis=-1) == gold[:, None]
  finite = np.asarray(trace.finite)
  losses = np.asarray(trace.losses)
  topk_new, delta = np.asarray(out.topk_new), np.asarray(out.mean_abs_delta)
  for j, i in enumerate(idx):
    ex = extras[j]
    has_nb = method in ('oracle', 'mode_finding') or bool(nbh.valid[i].any())
    if not has_nb:  # nothing to learn from: the pathway stays the base one
      ex['fallback'] = 'no_neighbours'
    elif not finite[j]:
      ex['fallback'] = 'nan'
      logging.warning('%s: non-finite step for %s; fell back to the base pathway', method, pidx[j])
    if method == 'kernel_regression':
      ex['alpha'] = float(out.alpha[j])
      if losses.shape[-1] > 1:  # alpha searched: the grid ends at alpha = 1 (base)
        ex['alpha_losses'] = np.round(losses[j], 5).tolist()
        ex['loss_before'] = round(float(losses[j, -1]), 5)
        ex['loss_after'] = round(float(np.min(losses[j])), 5)
    elif losses.shape[-1]:
      ex['losses'] = np.round(losses[j], 5).tolist()
      ex['loss_before'] = round(float(losses[j, 0]), 5)  # as rounded in `losses`
      ex['loss_after'] = round(float(losses[j, -1]), 5)
    if step_correct is not None:
      ex['step_correct'] = step_correct[j].tolist()
    ex['topk_new'] = round(float(topk_new[j]), 4)
    ex['mean_abs_delta'] = round(float(delta[j]), 6)
    cs_j = jax.tree.map(lambda x, j=j: x[j], cs)
    ex['pathway'] = pathway_record(cs_j, w0[j], trace.w[j], eng.ec.spec)
  return an.scores[:n], extras
