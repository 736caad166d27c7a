"""Routing maths: router probabilities, the last-token pathway override, top-k.

All functions here run in float32 (the router softmax of OLMoE is float32 in
the reference implementation) and are pure.

Dimensions: B batch, T tokens, D model, E experts, K top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Weight given to an expert that the custom pathway leaves out, as in the
# public C3PO code: it keeps the row a valid distribution and keeps such
# experts below every expert the pathway names, so top-k never prefers them.
MISSING_EXPERT_WEIGHT = 1e-10


def router_probs(x: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Router logits and softmax probabilities.

  Args:
    x: [B, T, D] hidden states (compute dtype).
    router: [D, E] router weights.

  Returns:
    (logits [B, T, E] float32, probs [B, T, E] float32). The logits are taken
    in the compute dtype, as in the reference, then the softmax in float32.
  """
  logits = jnp.einsum('btd,de->bte', x, router.astype(x.dtype))
  logits = logits.astype(jnp.float32)
  return logits, jax.nn.softmax(logits, axis=-1)


def normalize_pathway(weights: jax.Array) -> jax.Array:
  """[B, E] non-negative pathway weights -> rows that sum to 1 (float32).

  Experts with zero weight get MISSING_EXPERT_WEIGHT before normalization so
  the row stays a distribution even when the pathway names few experts.
  """
  w = weights.astype(jnp.float32)
  w = jnp.where(w > 0, w, MISSING_EXPERT_WEIGHT)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def dense_coefficients(weights: jax.Array, norm_topk_prob: bool) -> jax.Array:
  """[B, E] pathway weights -> dense mixing coefficients [B, E] (float32).

  In dense mode the weights are the mixing coefficients themselves, like the
  raw top-k probabilities they stand in for (OLMoE mixes its top-k
  probabilities without renormalizing them): C3PO passes the core experts'
  weights and zeros elsewhere, so only the core is mixed, at the scale top-k
  evaluation will use. Renormalized to sum 1 only where the model renormalizes
  its top-k weights. Negative weights are clipped to 0.
  """
  w = jnp.maximum(weights.astype(jnp.float32), 0.0)
  if norm_topk_prob:
    # Guard: an all-zero row stays zero rather than dividing by zero.
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  return w


def last_token_mask(last_index: jax.Array, num_tokens: int) -> jax.Array:
  """[B] index of each row's last real token -> [B, T] boolean one-hot."""
  return jnp.arange(num_tokens)[None, :] == last_index[:, None]


def override_last_token(probs: jax.Array, last_index: jax.Array, weights: jax.Array) -> jax.Array:
  """Replaces each row's last-real-token probabilities by the pathway.

  Args:
    probs: [B, T, E] router probabilities.
    last_index: [B] position of each row's last real token.
    weights: [B, E] pathway weights, normalized here to sum to 1.

  Returns:
    [B, T, E] probabilities; only position last_index[b] of row b changes.
  """
  mask = last_token_mask(last_index, probs.shape[1])[..., None]  # [B, T, 1]
  return jnp.where(mask, normalize_pathway(weights)[:, None, :], probs)


def top_k(probs: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
  """Top-k experts and their mixing weights.

  Args:
    probs: [..., E] float32 probabilities.
    k: experts per token.
    norm_topk_prob: renormalize the k weights to sum to 1 (False for OLMoE, so
      the raw probabilities are the mixing coefficients).

  Returns:
    (weights [..., K] float32, indices [..., K] int32).
  """
  weights, indices = jax.lax.top_k(probs, k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, indices.astype(jnp.int32)


def combine_weights(weights: jax.Array, indices: jax.Array, num_experts: int) -> jax.Array:
  """Scatters top-k weights into a dense [..., E] combine matrix."""
  one_hot = jax.nn.one_hot(indices, num_experts, dtype=weights.dtype)  # [..., K, E]
  return jnp.einsum('...k,...ke->...e', weights, one_hot)
