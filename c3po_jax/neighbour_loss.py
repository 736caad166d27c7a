"""The NGD objective shared by the loss backends: pathway per neighbour, weighted loss.

Dimensions: N neighbours, S sequences per neighbour, C critical layers,
Kc core experts, E experts.
"""

from __future__ import annotations

import jax.numpy as jnp

from c3po_jax import pathway as pw_lib
from c3po_jax import scoring


def neighbour_pathway(w, cs, spec, mode: str, anchors, n: int, s: int) -> dict:
  """The pathway each of N neighbours' S sequences gets: {layer: [N, S, E]}.

  Without anchors every sequence gets the test sample's rows (the neighbour
  runs with the test sample's candidate pathway, as the paper's NGD does);
  with anchors [N, S, C, E] each sequence keeps its own base rows plus the
  change (the oracle scoring the test sample itself; see `pathway`).
  """
  pathway = pw_lib.to_pathway(w, cs, spec, mode, anchors)
  return {k: jnp.broadcast_to(v, (n, s, v.shape[-1])) for k, v in pathway.items()}


def weighted_loss(scores_fn, loss_kind: str):
  """scores_fn(w, cs, data, anchors) -> [N, C]  =>  loss_fn(w, cs, data, weights [N], anchors).

  The kernel-weighted mean of the neighbours' losses on their gold answers.
  """

  def loss_fn(w, cs, data, weights, anchors=None):
    scores = scores_fn(w, cs, data, anchors)
    per = scoring.choice_loss(scores, data.gold, data.choice_valid, loss_kind)  # [N]
    wt = weights.astype(jnp.float32)
    return jnp.sum(wt * per) / jnp.maximum(jnp.sum(wt), 1e-12)

  return loss_fn
