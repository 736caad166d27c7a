"""How a MoE layer picks and weighs its experts from a row of router scores.

Beyond greedy top-k of the softmax (`routing.top_k`, every family before
DeepSeek-V2), the config may ask for (`MoeConfig`):

* sigmoid scores (DeepSeek-V3): s = sigmoid(logits), one affinity per
  expert, not a distribution. The probability row the model reports (and a
  pathway replaces) is s / sum(s); the token's affinity mass sum(s) is kept
  apart (`mass`), so s = row * mass;
* a correction bias b [E] (DeepSeek-V3's `e_score_correction_bias`, trained
  for load balance) added to the scores for *selection only*: the mixing
  weights are gathered from the unbiased scores;
* group-limited selection: the E experts form `n_group` equal groups; only
  the `topk_group` best groups may be chosen, a group scored by its best
  score ('max', DeepSeek-V2's group_limited_greedy) or the sum of its two
  best biased scores ('top2_sum', DeepSeek-V3);
* `routed_scaling_factor` on the mixing weights, after any renormalization.

How a pathway row enters (`override`): it replaces the token's probability
row, i.e. its scores s (for sigmoid scores, the row times the token's own
affinity mass). Everything downstream of the router's output then runs as
for any token: bias, group limit and top-k select on the replaced scores, the
weights are the replaced scores of the chosen experts, renormalized where the
model renormalizes and scaled by the routed scaling factor. So the base row
given back reproduces native routing exactly, and a changed row changes the
experts' mixing weights only through the quantity the router produces.

Why this is the faithful reading of "re-mixing the experts' weights": C3PO's
pathway is the router's output for one token (the public code replaces the
softmax row and lets top-k and renormalization run after it, so one row sets
both which experts run and how they mix). For a sigmoid router that output is
the affinity row s; the correction bias is not part of it (DeepSeek-V3 trains
it by a non-gradient load-balancing rule and uses it to select only), nor is
the group limit (a dispatch constraint over devices). Replacing only the
mixing weights would keep the native experts whatever the pathway says;
replacing only the selection would mix with weights the pathway never set.
C3PO's methods average and project rows on the simplex, hence the reported
row s / sum(s); scaling a pathway back by the token's own mass keeps the bias
at its native strength against the scores.

Dimensions: B batch, T tokens, E experts, G groups, K top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import routing
from models.config import MoeConfig


def probabilities(logits: jax.Array, config: MoeConfig) -> jax.Array:
  """[..., E] float32 router logits -> the reported probability row [..., E]."""
  if config.scoring_func == 'softmax':
    return jax.nn.softmax(logits, axis=-1)
  s = jax.nn.sigmoid(logits)
  return s / jnp.sum(s, axis=-1, keepdims=True)


def scores(logits: jax.Array, probs: jax.Array, config: MoeConfig) -> jax.Array:
  """The scores the model selects and weighs with: probs (softmax) or sigmoid(logits)."""
  return probs if config.scoring_func == 'softmax' else jax.nn.sigmoid(logits)


def mass(scores_row: jax.Array, config: MoeConfig) -> jax.Array:
  """[..., E] scores -> [..., 1] affinity mass: their sum (sigmoid), exactly 1 (softmax)."""
  if config.scoring_func == 'softmax':
    return jnp.ones(scores_row.shape[:-1] + (1,), jnp.float32)
  return jnp.sum(scores_row, axis=-1, keepdims=True)


def at(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B, T, E], index [B] -> row x[b, index[b]] [B, E]; index [B, U] -> rows [B, U, E]."""
  if index.ndim == 2:
    return jnp.take_along_axis(x, index[:, :, None], axis=1)
  return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


def override(
  scores_: jax.Array, probs: jax.Array, index: jax.Array, pathway: jax.Array, config: MoeConfig
) -> tuple[jax.Array, jax.Array]:
  """The pathway [B, (U,) E] in place of the rows of tokens index [B] (or [B, U]).

  The probability row becomes the pathway renormalized to sum 1
  (`routing.override_last_token`); the scores, that row times the token's
  own affinity mass (for softmax scores they are the same row). Returns
  (scores, probs) [B, T, E].
  """
  probs = routing.override_last_token(probs, index, pathway)
  if config.scoring_func == 'softmax':
    return probs, probs
  row = routing.normalize_pathway(pathway)  # [B, (U,) E]
  token_mass = mass(at(scores_, index), config)  # [B, (U,) 1]
  if row.ndim < token_mass.ndim:
    row = row[:, None]  # one pathway row for every pathway token
  return routing.place_rows(scores_, index, row * token_mass), probs


def _group_mask(selection: jax.Array, config: MoeConfig) -> jax.Array:
  """[..., E] selection scores -> [..., E] bool: experts in the topk_group best groups."""
  g = config.n_group
  grouped = selection.reshape(selection.shape[:-1] + (g, -1))  # [..., G, E/G]
  if config.group_score == 'max':
    group = jnp.max(grouped, axis=-1)
  else:
    group = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [..., G]
  _, best = jax.lax.top_k(group, config.topk_group)  # [..., topk_group]
  keep = jnp.sum(jax.nn.one_hot(best, g, dtype=jnp.int32), axis=-2) > 0  # [..., G]
  return jnp.repeat(keep, config.num_experts // g, axis=-1)


def choose(
  scores_: jax.Array, correction_bias: jax.Array | None, config: MoeConfig
) -> tuple[jax.Array, jax.Array]:
  """[..., E] float32 scores -> (mixing weights [..., K] float32, indices [..., K] int32)."""
  c = config
  plain = c.n_group == 1 and correction_bias is None and c.routed_scaling_factor == 1.0
  if plain:
    return routing.top_k(scores_, c.num_experts_per_tok, c.norm_topk_prob)
  selection = scores_ if correction_bias is None else scores_ + correction_bias.astype(jnp.float32)
  if c.n_group > 1:
    selection = jnp.where(_group_mask(selection, c), selection, -jnp.inf)
  _, indices = jax.lax.top_k(selection, c.num_experts_per_tok)
  weights = jnp.take_along_axis(scores_, indices, axis=-1)
  if c.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights * c.routed_scaling_factor, indices.astype(jnp.int32)


def dense_coefficients(pathway: jax.Array, mass_: jax.Array, config: MoeConfig) -> jax.Array:
  """[B, (U,) E] pathway, mass [B, (U,) 1] -> the dense-mode mixing coefficients.

  The pathway is the mixing row in probability units (C3PO passes the core
  experts' weights, zeros elsewhere): renormalized where the model
  renormalizes its top-k (`routing.dense_coefficients`), otherwise turned
  into scores by the token's affinity mass [B, 1] (1 for softmax), then
  scaled like the top-k weights. No selection, hence no bias or group limit.
  """
  w = routing.dense_coefficients(pathway, config.norm_topk_prob)
  if not config.norm_topk_prob and config.scoring_func != 'softmax':
    w = (w[:, None] if w.ndim < mass_.ndim else w) * mass_
  return w * config.routed_scaling_factor if config.routed_scaling_factor != 1.0 else w
