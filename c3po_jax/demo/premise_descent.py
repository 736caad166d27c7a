"""The premise at first order: does NGD's first step from the base head for the neighbours?

The transfer gap (`premise`) says the neighbours' loss *sees* a test sample's
mis-routing; NGD also needs its *gradient* at the base routing to point to
the routing the neighbours use. Per test sample, at its base core weights
w0 [C, Kc], this takes the gradient g of the kernel-weighted neighbour loss
(the NGD objective, `dense` pathway mode: there every core expert gets a
gradient; in 'topk' mode only the selected ones do) and compares the descent
direction -g, centred per layer (a step that keeps each layer's mass), with
the way to the neighbours' routing, w_hat - w0 (w_hat: their kernel-weighted
mean routing on the core, kernel regression's alpha = 0 point):

  cosine     cos(-g, w_hat - w0) over the C x Kc core weights; > 0: the first
             step moves towards the neighbours' routing.
  hit        per critical layer, whether the steepest-descent expert (most
             negative g) is one of w_hat's top-k experts (k: experts per
             token); chance is about k / Kc.

Dimensions: Q test samples, N neighbours, C critical layers, Kc core experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from c3po_jax.remix import batch as batch_lib
from c3po_jax.remix import methods
from c3po_jax.remix import pathway as pw_lib


def descent_direction(runner, base_probs, refs, nbh, weights) -> dict:
  """{'cosine': [Q], 'hit': [Q]} (NaN where a test sample has no neighbour)."""
  eng, params, bs = runner.engine, runner.params, runner.rc.execution.batch_size
  loss = eng.loss_backend.make_loss(params, runner.config, eng.ec, 'dense')
  grad = jax.jit(jax.vmap(jax.grad(loss)))
  mean = jax.jit(jax.vmap(methods.kernel_mean))
  ref_prompts = runner.encode(refs.examples)
  top = runner.config.num_experts_per_tok
  q = len(base_probs)
  cosine, hit = np.full(q, np.nan), np.full(q, np.nan)
  for start in range(0, q, bs):
    idx = list(range(start, min(start + bs, q)))
    pidx = idx + [idx[-1]] * (bs - len(idx))  # pad like the batch
    cs = eng.core_slices(jnp.asarray(base_probs[pidx]))
    data, w, probs = batch_lib.neighbour_data(runner, pidx, refs, nbh, weights, ref_prompts)
    w0 = jax.vmap(pw_lib.base_weights)(cs)  # [B, C, Kc]
    g = np.asarray(grad(w0, cs, data, w))  # [B, C, Kc]
    w_hat = np.asarray(mean(w, eng.neighbour_weights(cs, probs), cs.mass))  # [B, C, Kc]
    step = -(g - g.mean(-1, keepdims=True))
    way = w_hat - np.asarray(w0)
    num = (step * way).sum((1, 2))
    den = np.linalg.norm(step.reshape(bs, -1), axis=1) * np.linalg.norm(way.reshape(bs, -1), axis=1)
    cos = num / np.maximum(den, 1e-30)
    steepest = np.argmin(g, axis=-1)  # [B, C] core position
    targets = np.argsort(-w_hat, axis=-1)[..., :top]  # [B, C, k]
    hits = (targets == steepest[..., None]).any(-1).mean(-1)  # [B]
    for j, i in enumerate(idx):
      if nbh.valid[i].any():
        cosine[i], hit[i] = cos[j], hits[j]
  return {'cosine': cosine, 'hit': hit}
