r"""NGD end to end: what a user pays per test sample, through the run's own code.

`python -m benchmarks.ngd_speed --end_to_end` runs this. One random model
(the `bench` preset), Q mc test prompts sharing a reference set of R random
references (R >> k), T tokens each, and the pipeline's steps through a
`run.runner.Runner`: the base analysis of the test samples (which keeps
their prefix states), the reference-set build (which keeps the references'),
neighbour search and kernel weights, then each method's batches
(`remix.batch.method_batch`: inputs, the method, the final evaluation, the
row fields). Rounds are interleaved (each round starts with an empty
prefix-state store and builds the reference set again), after one untimed
round that compiles everything; medians over rounds, seconds per test
sample (the reference build per reference, a one-off cost per reference
set). Anchors, timed once: naive JAX NGD (every step re-runs the
neighbours' full forwards) on the same neighbours, and naive PyTorch NGD
(`ngd_speed._torch_ngd`) on one sample. JSON on the last line.

Dimensions: Q test samples, R references, k neighbours, T tokens.
"""

from __future__ import annotations

import json
import os
import time

METHODS = ('mode_finding', 'kernel_regression', 'ngd')
NUM_CHOICES = 4


def _prompts(rng, n: int, t: int, vocab: int, letters, task: str):
  from c3po_jax.tasks import Example
  from c3po_jax.tasks.encoding import EncodedPrompt

  examples, prompts = [], []
  for i in range(n):
    gold = int(rng.integers(NUM_CHOICES))
    examples.append(Example(id=str(i), task=task, context='', choices=('a',) * 4, gold=gold))
    ctx = tuple(int(x) for x in rng.integers(0, vocab, t))
    prompts.append(EncodedPrompt(ctx, letters, gold, (1,) * NUM_CHOICES, 'mc'))
  return examples, prompts


def run(
  *,
  params,
  torch_ngd,
  q: int,
  r: int,
  k: int,
  t: int,
  steps: int,
  rounds: int,
  seed: int,
  opt_pathway_mode: str = 'topk',
  batch_size: int = 8,
):
  """Times the pipeline's steps; returns the result dict (see the module docstring)."""
  import jax
  import numpy as np

  from c3po_jax.neighbours import kernels, references
  from c3po_jax.neighbours import search as neighbours
  from c3po_jax.remix import batch, losses
  from c3po_jax.run import runner as runner_lib
  from c3po_jax.run.config import RunConfig
  from models.families.olmoe import BENCH

  rc = RunConfig.make(
    benchmark='bench',
    reference=('bench_refs',),
    methods=('base',) + METHODS,
    k=k,
    critical_layers='last:5',
    core_experts=20,
    opt_pathway_mode=opt_pathway_mode,
    ngd_steps=steps,
    batch_size=min(q, batch_size),
    max_similarity=1.0,
  )
  rng = np.random.default_rng(seed)
  letters = tuple((int(x),) for x in rng.choice(BENCH.vocab_size, NUM_CHOICES, replace=False))
  test, test_prompts = _prompts(rng, q, t, BENCH.vocab_size, letters, 'bench')
  pool, ref_prompts = _prompts(rng, r, t, BENCH.vocab_size, letters, 'bench_refs')
  runner = runner_lib.Runner(rc, BENCH, params, tokenizer=None)
  runner.begin(test, NUM_CHOICES)
  bs = rc.execution.batch_size

  def one_round():
    times = {}
    runner.states = runner_lib.make_store(rc, runner.engine, params)  # empty
    start = time.perf_counter()
    an = runner.analyze(pool, ref_prompts, 'references', role='ref')
    times['ref_build'] = (time.perf_counter() - start) / r
    refs = references.ReferenceSet(pool, an.embeddings, an.router_probs, 'bench', r)
    start = time.perf_counter()
    base = runner.analyze(test, test_prompts, 'test (base)', role='test')
    times['base'] = (time.perf_counter() - start) / q
    start = time.perf_counter()
    nbh = neighbours.find(base.embeddings, refs.embeddings, k=k, max_similarity=1.0)
    sigma = kernels.reference_bandwidth(refs.embeddings, k=k, max_similarity=1.0)
    weights = kernels.kernel_weights(nbh.similarity, nbh.valid, sigma=sigma)
    shared = (time.perf_counter() - start) / q  # neighbours: every method pays it once
    for method in METHODS:
      start = time.perf_counter()
      for s in range(0, q, bs):
        idx = list(range(s, min(s + bs, q)))
        b = batch.BatchInputs(
          runner,
          idx,
          idx + [idx[-1]] * (bs - len(idx)),
          test_prompts,
          base,
          refs,
          nbh,
          weights,
          ref_prompts,
        )
        batch.method_batch(method, b)
      times[method] = (time.perf_counter() - start) / q + shared
    return times, runner, nbh, weights, refs

  one_round()  # compiles
  all_times = [one_round()[0] for _ in range(rounds)]
  rows = {name: float(np.median([x[name] for x in all_times])) for name in all_times[0]}
  _, runner, nbh, weights, refs = one_round()

  # Anchors: naive JAX NGD on the same neighbours (one call), naive PyTorch on one sample.
  idx = list(range(min(q, bs)))
  data, w, _ = batch.neighbour_data(runner, idx, refs, nbh, weights, ref_prompts, prepared=False)
  base_probs = runner.analyze(test[: len(idx)], test_prompts[: len(idx)], 'anchor').router_probs
  cs = runner.engine.core_slices(base_probs)
  naive = runner_lib.engine.Engine(BENCH, runner.engine.ec, loss_backend=losses.NaiveLoss)
  jax.block_until_ready(naive.ngd(params, cs, data, w))  # compiles
  start = time.perf_counter()
  jax.block_until_ready(naive.ngd(params, cs, data, w))
  rows['naive_jax'] = (time.perf_counter() - start) / len(idx)
  tokens, letters = np.asarray(data.tokens[0, :, 0]), np.asarray(data.cont_ids[0, 0, :, 0])
  args = (
    np.asarray(data.gold[0]),
    np.asarray(w[0]),
    np.asarray(cs.base[0]),
    np.asarray(cs.core[0]),
  )
  torch_ngd(tokens, letters, *args, steps=1)  # warm-up
  start = time.perf_counter()
  torch_ngd(tokens, letters, *args, steps=steps)
  rows['torch_naive'] = time.perf_counter() - start

  load = os.getloadavg()
  out = {f'{name}_s': round(s, 5) for name, s in rows.items()}
  out.update({f'{m}_over_base': round(rows[m] / rows['base'], 3) for m in METHODS})
  out['torch_naive_over_ngd'] = round(rows['torch_naive'] / rows['ngd'], 1)
  out['naive_jax_over_ngd'] = round(rows['naive_jax'] / rows['ngd'], 1)
  out['setup'] = dict(
    q=q, r=r, k=k, t=t, steps=steps, rounds=rounds, batch_size=bs, opt_pathway_mode=opt_pathway_mode
  )
  out['load_average'] = [round(x, 2) for x in load]
  print(f'NGD end to end (load average {load[0]:.2f}): Q={q}, R={r}, k={k}, T={t}')
  print(f'{"":<18} {"s / sample":>11} {"x base":>8}')
  for name, s in rows.items():
    print(f'{name:<18} {s:>11.4f} {s / rows["base"]:>8.2f}')
  print(json.dumps(out))
  return out
