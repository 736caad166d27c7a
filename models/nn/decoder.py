"""The decoder layer and the whole model as `flax.nnx` modules.

`Transformer` is the parameter tree (`nnx.to_pure_dict` of its state is the
plain nested dict Orbax saves: embed, layer_0 .. layer_{L-1}, final_norm,
lm_head) and the modules that compute with it. C3PO code never holds a
module: `models.transformer.forward(params, tokens, ...)` binds the dict to
the module graph (`models.params.bind`) inside the traced function.

Dimensions: B batch, T tokens, S key slots, P prefix slots, D model, V vocab,
E experts, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from models.config import MoeConfig
from models.nn.layers import Attention, Embedding, RMSNorm, attend, normal_param
from models.nn.moe import MLP, MoeBlock


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer. k, v [B, S, KV, Dh]."""

  k: jax.Array
  v: jax.Array


class DecoderLayer(nnx.Module):
  """Pre-norm attention + feed-forward: MoE (`moe`) or, in dense layers, an MLP (`mlp`)."""

  def __init__(self, config: MoeConfig, index: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.is_moe = config.is_moe_layer(index)
    d = config.hidden_size
    self.input_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
    self.attn = Attention(config, rngs=rngs, dtype=dtype)
    self.post_attn_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
    if self.is_moe:
      self.moe = MoeBlock(config, rngs=rngs, dtype=dtype)
    else:
      self.mlp = MLP(d, config.intermediate_size, rngs=rngs, dtype=dtype)

  def feed_forward(self, h, *, last_index, pathway, pathway_mode):
    """h [B, T, D] normed -> (out, router logits, probs [B, T, E]).

    A dense layer has no router: its logits are 0 and its probabilities
    uniform, constant rows that carry no routing information.
    """
    if self.is_moe:
      return self.moe(h, last_index=last_index, pathway=pathway, pathway_mode=pathway_mode)
    e = self.config.num_experts
    logits = jnp.zeros(h.shape[:-1] + (e,), jnp.float32)
    return self.mlp(h), logits, jnp.full_like(logits, 1.0 / e)

  def feed_forward_window(self, h, pathway, pathway_mode):
    """The feed-forward on window tokens h [B, U, D] (pathway token first)."""
    if self.is_moe:
      return self.moe.window(h, pathway, pathway_mode)
    return self.mlp(h)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    query_slots: jax.Array,
    key_valid: jax.Array,
    last_index: jax.Array,
    cache: LayerCache | None = None,
    pathway: jax.Array | None = None,
    pathway_mode: str = 'topk',
    kv_prefix: LayerCache | None = None,
  ):
    """One layer.

    Args:
      x: [B, T, D] residual stream.
      positions: [B, T] RoPE positions.
      query_slots: [B, T] key slot of each token (its index in the sequence).
      key_valid: [B, S] which key slots may be attended (S = T without a cache).
      last_index: [B] index (into T) of each row's re-mixed token.
      cache: keys/values of earlier slots; this call's keys are written at
        query_slots and attention runs over all S slots.
      pathway: [B, E] pathway for this layer, or None for native routing.
      pathway_mode: 'topk' or 'dense' (see `models.nn.moe`).
      kv_prefix: k, v [B, P, KV, Dh] attended before slot 0 by every token
        (prefix tuning); not written to the cache.

    Returns:
      (x [B, T, D], router logits [B, T, E], probs [B, T, E], new cache or None).
    """
    h = self.input_norm(x)
    q, k, v = self.attn.qkv(h, positions)
    if cache is None:
      keys, values = k, v
    else:
      # A scatter, not a one-hot matmul: exact at any matmul precision (TF32
      # and bf16 passes would round the cached keys) and O(T) rather than
      # O(T * S). Slots outside [0, S) are dropped.
      rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
      keys = cache.k.at[rows, query_slots].set(k.astype(cache.k.dtype), mode='drop')
      values = cache.v.at[rows, query_slots].set(v.astype(cache.v.dtype), mode='drop')
      cache = LayerCache(k=keys, v=values)
    if kv_prefix is not None and kv_prefix.k.shape[1]:  # P slots in front of slot 0
      n = kv_prefix.k.shape[1]
      keys = jnp.concatenate([kv_prefix.k.astype(keys.dtype), keys], axis=1)  # [B, P+S, KV, Dh]
      values = jnp.concatenate([kv_prefix.v.astype(values.dtype), values], axis=1)
      key_valid = jnp.concatenate([jnp.ones((x.shape[0], n), bool), key_valid], axis=1)
      query_slots = query_slots + n
    x = x + self.attn.out(attend(q, keys, values, query_slots, key_valid))
    out, logits, probs = self.feed_forward(
      self.post_attn_norm(x), last_index=last_index, pathway=pathway, pathway_mode=pathway_mode
    )
    return x + out, logits, probs, cache


def layer_name(i: int) -> str:
  return f'layer_{i}'


class Transformer(nnx.Module):
  """Embedding, L decoder layers (attributes layer_0 ..), final norm, LM head [D, V]."""

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.embed = Embedding(config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype)
    for i in range(config.num_hidden_layers):
      setattr(self, layer_name(i), DecoderLayer(config, i, rngs=rngs, dtype=dtype))
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    if not config.tie_word_embeddings:
      self.lm_head = normal_param(rngs, (config.hidden_size, config.vocab_size), dtype)

  def layer(self, i: int) -> DecoderLayer:
    return getattr(self, layer_name(i))

  def head_weight(self) -> jax.Array:
    """[D, V]: the LM head, or the transposed embedding when tied."""
    if self.config.tie_word_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head[...]

  def head_rows(self, ids: jax.Array) -> jax.Array:
    """LM-head columns of the given token ids, as rows [..., D]."""
    if self.config.tie_word_embeddings:
      return self.embed(ids)
    return jnp.moveaxis(self.lm_head[...][:, ids], 0, -1)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] -> [..., V] float32 logits."""
    return (hidden @ self.head_weight().astype(hidden.dtype)).astype(jnp.float32)
