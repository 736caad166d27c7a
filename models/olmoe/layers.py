"""Building blocks of the OLMoE decoder: RMSNorm, RoPE, attention.

Dimensions: B batch, T query tokens, S key slots, D model, H heads,
KV key/value heads, G = H // KV query heads per key/value head, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.olmoe.config import OlmoeConfig

# Masked attention scores: finite, so a query row with no valid key (a padded
# position) yields a uniform distribution instead of NaN.
_MASKED = -1e30


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back to x's dtype, then scaled."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (HF 'rotate_half' layout). x [B, T, N, Dh], positions [B, T]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def qkv(p: dict, x: jax.Array, positions: jax.Array, config: OlmoeConfig):
  """Projects, normalizes, clips and rotates. x [B, T, D] -> q, k, v.

  Returns q [B, T, H, Dh], k and v [B, T, KV, Dh].
  """
  b, t, _ = x.shape
  q = rms_norm(x @ p['q'], p['q_norm'], config.rms_norm_eps)  # [B, T, H*Dh]
  k = rms_norm(x @ p['k'], p['k_norm'], config.rms_norm_eps)  # [B, T, KV*Dh]
  v = x @ p['v']
  if config.clip_qkv is not None:
    c = config.clip_qkv
    q, k, v = (jnp.clip(a, -c, c) for a in (q, k, v))
  q = q.reshape(b, t, config.num_attention_heads, config.head_dim)
  k = k.reshape(b, t, config.num_key_value_heads, config.head_dim)
  v = v.reshape(b, t, config.num_key_value_heads, config.head_dim)
  q = rope(q, positions, config.rope_theta)
  k = rope(k, positions, config.rope_theta)
  return q, k, v


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  query_slots: jax.Array,
  key_valid: jax.Array,
) -> jax.Array:
  """Causal grouped-query attention over key slots.

  Args:
    q: [B, T, H, Dh] queries.
    k, v: [B, S, KV, Dh] keys and values (slot s holds sequence position s).
    query_slots: [B, T] slot of each query; it sees slots <= its own.
    key_valid: [B, S] bool, False for padding and empty cache slots.

  Returns:
    [B, T, H*Dh].
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, dh)  # [B, T, KV, G, Dh]
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k).astype(jnp.float32)
  scores = scores * dh**-0.5
  slots = jnp.arange(k.shape[1])
  mask = (slots[None, None, :] <= query_slots[:, :, None]) & key_valid[:, None, :]
  scores = jnp.where(mask[:, None, None], scores, _MASKED)  # [B, KV, G, T, S]
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h * dh)
