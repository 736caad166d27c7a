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


def router_probs(
  x: jax.Array, router: jax.Array, bias: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Router logits and softmax probabilities.

  Args:
    x: [B, T, D] hidden states (compute dtype).
    router: [D, E] router weights.
    bias: [E] logit bias (gpt-oss), or None.

  Returns:
    (logits [B, T, E] float32, probs [B, T, E] float32). The logits are taken
    in the compute dtype, as in the reference, then the softmax in float32.
  """
  logits = jnp.einsum('btd,de->bte', x, router.astype(x.dtype))
  if bias is not None:
    logits = logits + bias.astype(x.dtype)
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


def place_rows(x: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, T, F] with rows put at the pathway's tokens.

  index [B] (one token per row, rows [B, F]) or [B, U] (U tokens per row,
  rows [B, U, F], or [B, F] for the same row at each). Exact (a select, no
  arithmetic); a token named twice (a context shorter than U) takes its last.
  """
  idx = index[:, None] if index.ndim == 1 else index  # [B, U]
  rows = rows[:, None] if rows.ndim == 2 else rows
  rows = jnp.broadcast_to(rows, idx.shape + rows.shape[-1:]).astype(x.dtype)  # [B, U, F]
  positions = jnp.arange(x.shape[1])[None, :]
  for u in range(idx.shape[1]):  # U is static and small (1 or 3)
    x = jnp.where((positions == idx[:, u : u + 1])[..., None], rows[:, u, None, :], x)
  return x


def override_last_token(probs: jax.Array, last_index: jax.Array, weights: jax.Array) -> jax.Array:
  """Replaces the pathway tokens' router probabilities by the pathway.

  Args:
    probs: [B, T, E] router probabilities.
    last_index: [B] position of each row's pathway token (by default its last
      real one), or [B, U] positions of U pathway tokens.
    weights: [B, E] pathway weights (or [B, U, E], one row per token),
      normalized here to sum to 1.

  Returns:
    [B, T, E] probabilities; only the pathway tokens' rows change.
  """
  return place_rows(probs, last_index, normalize_pathway(weights))


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
