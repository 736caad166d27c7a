"""Building blocks of the decoder: RMSNorm, embedding, RoPE, attention.

The modules (`flax.nnx`) hold parameters and compute; they keep no state
between calls. RoPE and the attention kernel are plain functions, shared with
the prefix window (`models.prefix`).

Dimensions: B batch, T query tokens, S key slots, D model, V vocab, H heads,
KV key/value heads, G = H // KV query heads per key/value head, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import MoeConfig
from models.nn import rope as rope_lib

# Masked attention scores: finite, so a query row with no valid key (a padded
# position) yields a uniform distribution instead of NaN.
MASKED = -1e30


def normal_param(rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
  """N(0, 0.02) as HF initializes linear and embedding weights."""
  return nnx.Param((0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm computed in float32, cast back to x's dtype, then scaled."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, with a learned scale [W]."""

  def __init__(self, width: int, eps: float, *, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((width,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


class Embedding(nnx.Module):
  """Token embedding [V, D], scaled by `multiplier` (Granite); the table also serves a tied LM head."""

  def __init__(
    self, vocab: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32, multiplier: float = 1.0
  ):
    self.embedding = normal_param(rngs, (vocab, width), dtype)
    self.multiplier = multiplier

  def __call__(self, ids: jax.Array) -> jax.Array:
    x = self.embedding[...][ids]
    return x if self.multiplier == 1.0 else x * jnp.asarray(self.multiplier, x.dtype)


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


def causal_visible(
  query_slots: jax.Array, key_slots: jax.Array, window: int | None = None
) -> jax.Array:
  """query_slots [B, T], key_slots [B, S] -> [B, T, S]: key slot <= query slot, within the window.

  With a sliding window a query sees the `window` most recent slots, its own
  included (HF's `sliding_window_overlay`: key > query - window).
  """
  q, k = query_slots[:, :, None], key_slots[:, None, :]
  visible = k <= q
  if window is not None:
    visible = visible & (k > q - window)
  return visible


def attention_probs(scores: jax.Array, sinks: jax.Array | None = None) -> jax.Array:
  """Masked float32 scores [B, KV, G, T, S] -> softmax over S.

  sinks [H] (gpt-oss): one more logit per head in each row's denominator,
  attending to nothing; its probability is dropped, so a row's weights sum
  to less than 1.
  """
  if sinks is None:
    return jax.nn.softmax(scores, axis=-1)
  b, kv, g, t, _ = scores.shape
  sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, g, 1, 1), (b, kv, g, t, 1))
  return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


def attend(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  query_slots: jax.Array,
  key_valid: jax.Array,
  *,
  scale: float | None = None,
  window: int | None = None,
  sinks: jax.Array | None = None,
) -> jax.Array:
  """Causal grouped-query attention over key slots.

  Args:
    q: [B, T, H, Dh] queries.
    k, v: [B, S, KV, Dh] keys and values (slot s holds sequence position s).
    query_slots: [B, T] slot of each query; it sees slots <= its own.
    key_valid: [B, S] bool, False for padding and empty cache slots.
    scale: score multiplier (None: Dh ** -0.5).
    window: sliding window in slots (`causal_visible`), or None.
    sinks: [H] attention-sink logits (`attention_probs`), or None.

  Returns:
    [B, T, H*Dh].
  """
  b, t, h, dh = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, dh)  # [B, T, KV, G, Dh]
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k).astype(jnp.float32)
  scores = scores * (dh**-0.5 if scale is None else scale)
  slots = jnp.broadcast_to(jnp.arange(k.shape[1])[None], key_valid.shape)  # [B, S]
  mask = causal_visible(query_slots, slots, window) & key_valid[:, None, :]
  scores = jnp.where(mask[:, None, None], scores, MASKED)  # [B, KV, G, T, S]
  probs = attention_probs(scores, sinks).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, -1)  # [B, T, H*Dv]


class Attention(nnx.Module):
  """Grouped-query attention projections with the families' variants.

  q [D, H*Dh], k and v [D, KV*Dh], o [H*Dh, D]; with `qkv_bias`, q/k/v biases;
  with `qk_norm`, q_norm and k_norm RMSNorms over all heads ('full', width
  H*Dh) or per head ('head', width Dh). With `o_bias`, an
  output bias; with `attention_sinks`, sinks [H]. The attention kernel itself
  (`attend`, or the prefix window's) is the caller's: `qkv` and `out` are the
  two halves around it, `kernel_options` what this layer's kernel takes
  (score scale, sliding window, sinks).
  """

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, layer: int = 0):
    self.config = config
    self.window = config.attention_window(layer)
    d, qw, kw = config.hidden_size, config.q_width, config.kv_width
    self.q = normal_param(rngs, (d, qw), dtype)
    self.k = normal_param(rngs, (d, kw), dtype)
    self.v = normal_param(rngs, (d, kw), dtype)
    self.o = normal_param(rngs, (qw, d), dtype)
    if config.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((qw,), dtype))
      self.k_bias = nnx.Param(jnp.zeros((kw,), dtype))
      self.v_bias = nnx.Param(jnp.zeros((kw,), dtype))
    if config.o_bias:
      self.o_bias = nnx.Param(jnp.zeros((d,), dtype))
    if config.attention_sinks:
      self.sinks = nnx.Param(jnp.zeros((config.num_attention_heads,), dtype))
    if config.qk_norm == 'full':
      self.q_norm = RMSNorm(qw, config.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(kw, config.rms_norm_eps, dtype=dtype)
    elif config.qk_norm == 'head':
      self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype=dtype)

  def qkv(self, x: jax.Array, positions: jax.Array):
    """Projects, normalizes, clips and rotates. x [B, T, D], positions [B, T] -> q, k, v.

    Returns q [B, T, H, Dh], k and v [B, T, KV, Dh].
    """
    c = self.config
    b, t, _ = x.shape
    q, k, v = x @ self.q[...], x @ self.k[...], x @ self.v[...]  # [B, T, H*Dh], [B, T, KV*Dh]
    if c.qkv_bias:
      q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
    if c.qk_norm == 'full':
      q, k = self.q_norm(q), self.k_norm(k)
    if c.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
    q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
    k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
    v = v.reshape(b, t, c.num_key_value_heads, c.head_dim)
    if c.qk_norm == 'head':
      q, k = self.q_norm(q), self.k_norm(k)
    if c.rope_scaling:  # YaRN (gpt-oss): scaled frequencies, cos/sin x the attention factor
      inv_freq, scale = rope_lib.frequencies(
        c.head_dim, c.rope_theta, dict(c.rope_scaling), c.max_position_embeddings
      )
      turn = lambda a: rope_lib.apply(a, positions, inv_freq, scale, interleave=False)
      return turn(q), turn(k), v
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def kernel_options(self) -> dict:
    """Keyword arguments of `attend` for this layer: scale, window, sinks."""
    c = self.config
    sinks = self.sinks[...] if c.attention_sinks else None
    return {'scale': c.attention_multiplier, 'window': self.window, 'sinks': sinks}

  def out(self, attended: jax.Array) -> jax.Array:
    """[B, T, H*Dh] -> [B, T, D], the residual branch (x residual_multiplier)."""
    c = self.config
    y = attended @ self.o[...]
    if c.o_bias:
      y = y + self.o_bias[...]
    return y if c.residual_multiplier == 1.0 else y * jnp.asarray(c.residual_multiplier, y.dtype)
