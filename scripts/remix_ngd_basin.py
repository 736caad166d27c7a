"""Where NGD lands on the remix demo's dev split, against the kernel-regression point.

For the first n dev questions of each family (the suite's own reference
set, k = 3, reference-rule bandwidth, overlap filter 0.99, last 3 layers):
the kernel-weighted neighbour loss, in dense and in top-k mode, at four
pathways (the base routing, kernel regression's result, the family's expert
pair 2f, 2f+1 with the core mass split evenly, NGD's result at the given
settings), and how often each pathway's top-2 in a critical layer is the
family's pair. On the plain-reference suite (`python -m c3po_jax.demo.suite
--seed=0 --output_dir=DIR --include_train=false --test_phrasing_references=false
--settings_from=checkpoints/demo/suite`) it showed why NGD from the base
routing did not help there: its descent ended in dense mixtures of other
experts with a higher neighbour loss than the kernel-regression point, never
on the family's pair (docs/demo_world.md, "Why the references include the test phrasing").

  python scripts/remix_ngd_basin.py --suite=DIR --n=25 --lr=0.1 --ngd_init=base
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from c3po_jax.neighbours import kernels
from c3po_jax.neighbours import search as neighbours
from c3po_jax.remix import batch
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.run.config import RunConfig
from c3po_jax.run.runner import Runner, load_model
from c3po_jax.tasks import load_examples, load_references

FAMILIES = ('sum', 'diff', 'max', 'min')  # family f owns experts 2f, 2f+1
_SUITE = flags.DEFINE_string('suite', 'checkpoints/demo/suite', 'Remix suite directory.')
_CKPT = flags.DEFINE_string('checkpoint_dir', 'checkpoints/demo', 'Remix model.')
_N = flags.DEFINE_integer('n', 25, 'Dev questions per family.')
_LR = flags.DEFINE_float('lr', 0.1, 'NGD learning rate.')
_INIT = flags.DEFINE_enum('ngd_init', 'base', ['base', 'kernel_mean'], 'NGD start point.')
_MODE = flags.DEFINE_enum('opt_pathway_mode', 'dense', ['dense', 'topk'], 'NGD pathway mode.')


def _pair_top2(w, pair):
  """Share of (question, layer) whose top-2 core experts are the family's pair."""
  top2 = np.argsort(-np.asarray(w), axis=-1)[..., :2]
  return np.mean(np.take_along_axis(pair, top2, axis=-1).all(-1), axis=0)


def main(argv):
  del argv
  with open(f'{_SUITE.value}/suite.json') as f:
    manifest = json.load(f)
  rc0 = RunConfig.make(
    checkpoint_dir=_CKPT.value,
    benchmark='-',
    reference=('-',),
    fmt='rc',
    critical_layers='last:3',
    k=3,
    max_similarity=0.99,
    lr=_LR.value,
    ngd_init=_INIT.value,
    opt_pathway_mode=_MODE.value,
    batch_size=_N.value,
    max_reference_samples=None,  # every reference of the family
  )
  config, params, tok = load_model(rc0)
  for f, fam in enumerate(FAMILIES):
    entry = manifest['benchmarks'][fam]
    rc = rc0.replace(
      benchmark=f'{_SUITE.value}/{entry["dev"]}',
      reference=tuple(f'{_SUITE.value}/{r}' for r in entry['reference']),
    )
    test = load_examples(rc.data.benchmark, split=None, limit=_N.value)
    runner = Runner(rc, config, params, tok)
    runner.begin(test, 4)
    prompts = runner.encode(test)
    base = runner.analyze(test, prompts, 'dev (base)')
    pool, _ = load_references(rc.data.reference, max_samples=rc.data.max_reference_samples)
    refs = runner.reference_set(pool)
    nbh = neighbours.find(base.embeddings, refs.embeddings, k=3, max_similarity=0.99)
    sigma = kernels.reference_bandwidth(refs.embeddings, k=3, max_similarity=0.99)
    weights = kernels.kernel_weights(nbh.similarity, nbh.valid, sigma=sigma)
    idx = list(range(len(test)))
    eng = runner.engine
    cs = eng.core_slices(jnp.asarray(base.router_probs[idx]))
    data, w, probs = batch.neighbour_data(
      runner, idx, refs, nbh, weights, runner.encode(refs.examples)
    )
    w_nb = eng.neighbour_weights(cs, probs)  # [Q, N, C, Kc]
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    kr = eng.kernel_regression(params, cs, data, w, w_nb).trace.w
    init_nb = w_nb if _INIT.value == 'kernel_mean' else None
    ngd = eng.ngd(params, cs, data, w, init_nb).trace.w
    core = np.asarray(cs.core)
    pair = (core == 2 * f) | (core == 2 * f + 1)  # [Q, C, Kc]
    w_pair = pair / pair.sum(-1, keepdims=True) * np.asarray(cs.mass)[..., None]
    print(
      f'== {fam}: {len(test)} dev questions, kernel weights of the first: {weights[0].round(2)}'
    )
    own = np.asarray(base.router_probs)[:, list(eng.ec.spec.layers)]  # [Q, C, E]
    nb_rows = np.asarray(probs)[:, :, list(eng.ec.spec.layers)]  # [Q, N, C, E]
    full_pair = np.zeros(own.shape[-1], bool)
    full_pair[[2 * f, 2 * f + 1]] = True
    nb_top2 = np.argsort(-nb_rows, axis=-1)[..., :2]
    print(
      f'  neighbours own routing: top-2 = pair per layer {full_pair[nb_top2].all(-1).mean((0, 1)).round(2)}'
    )
    points = (('base', w0), ('kernel regr.', kr), ('family pair', w_pair), ('NGD', ngd))
    for mode in ('dense', 'topk'):
      loss = eng.loss_backend.make_loss(params, config, eng.ec, mode)
      per_sample = jax.jit(jax.vmap(lambda c, d, wt, y, fn=loss: fn(y, c, d, wt)))
      for name, x in points:
        x = jnp.asarray(x, jnp.float32)
        got = np.asarray(per_sample(cs, data, w, x))
        extra = (
          f'  top-2 = pair per layer {_pair_top2(x, pair).round(2)}' if mode == 'dense' else ''
        )
        print(
          f'  {mode:5s} loss at {name:12s} mean {got.mean():7.3f} median {np.median(got):7.3f}{extra}'
        )


if __name__ == '__main__':
  app.run(main)
