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
from models.nn.mla import LatentAttention
from models.nn.moe import MLP, MoeBlock


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer. k [B, S, KV, Dh], v [B, S, KV, Dv] (Dv = Dh but in MLA)."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def empty(cls, config: MoeConfig, batch: int, slots: int, dtype) -> LayerCache:
    """A zero cache of `slots` slots per row."""
    kv = config.num_key_value_heads
    return cls(
      k=jnp.zeros((batch, slots, kv, config.head_dim), dtype),
      v=jnp.zeros((batch, slots, kv, config.v_head_dim), dtype),
    )


class DecoderLayer(nnx.Module):
  """Attention + feed-forward: MoE (`moe`) or, in dense layers, an MLP (`mlp`).

  Pre-norm (input_norm before attention, post_attn_norm before the
  feed-forward) or, with `post_norm`, OLMo-2's order: post_attn_norm on the
  attention output, post_ffn_norm on the feed-forward output, no input
  norms. Attention is grouped-query or, with `kv_lora_rank`, latent (MLA).
  """

  def __init__(self, config: MoeConfig, index: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.is_moe = config.is_moe_layer(index)
    d = config.hidden_size
    if not config.post_norm:
      self.input_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
    if config.kv_lora_rank is not None:
      self.attn = LatentAttention(config, rngs=rngs, dtype=dtype)
    else:
      self.attn = Attention(config, rngs=rngs, dtype=dtype, layer=index)
    self.post_attn_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
    if config.post_norm:
      self.post_ffn_norm = RMSNorm(d, config.rms_norm_eps, dtype=dtype)
    if self.is_moe:
      self.moe = MoeBlock(config, rngs=rngs, dtype=dtype)
    else:
      self.mlp = MLP(d, config.intermediate_size, rngs=rngs, dtype=dtype)

  def feed_forward(self, h, *, last_index, pathway, pathway_mode):
    """h [B, T, D] normed -> (out, router logits, probs [B, T, E]).

    A dense layer has no router: its logits are 0 and its probabilities
    uniform, constant rows that carry no routing information. The output is
    the residual branch, x residual_multiplier.
    """
    if self.is_moe:
      out, logits, probs = self.moe(
        h, last_index=last_index, pathway=pathway, pathway_mode=pathway_mode
      )
      return self._branch(out), logits, probs
    e = self.config.num_experts
    logits = jnp.zeros(h.shape[:-1] + (e,), jnp.float32)
    return self._branch(self.mlp(h)), logits, jnp.full_like(logits, 1.0 / e)

  def feed_forward_window(self, h, pathway, pathway_mode):
    """The feed-forward on window tokens h [B, U, D] (pathway token first)."""
    if self.is_moe:
      return self._branch(self.moe.window(h, pathway, pathway_mode))
    return self._branch(self.mlp(h))

  def _branch(self, y: jax.Array) -> jax.Array:
    """The feed-forward branch's output: normed (post_norm), x residual_multiplier (Granite)."""
    if self.config.post_norm:
      y = self.post_ffn_norm(y)
    m = self.config.residual_multiplier
    return y if m == 1.0 else y * jnp.asarray(m, y.dtype)

  def attn_input(self, x: jax.Array) -> jax.Array:
    """The residual stream as attention reads it (normed, unless post_norm)."""
    return x if self.config.post_norm else self.input_norm(x)

  def ffn_input(self, x: jax.Array) -> jax.Array:
    """The residual stream as the feed-forward reads it (normed, unless post_norm)."""
    return x if self.config.post_norm else self.post_attn_norm(x)

  def attn_branch(self, attended: jax.Array) -> jax.Array:
    """Attention's output [B, T, H*Dv] -> the residual branch [B, T, D] (normed with post_norm)."""
    y = self.attn.out(attended)
    return self.post_attn_norm(y) if self.config.post_norm else y

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
    q, k, v = self.attn.qkv(self.attn_input(x), positions)
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
    attended = attend(q, keys, values, query_slots, key_valid, **self.attn.kernel_options())
    x = x + self.attn_branch(attended)
    out, logits, probs = self.feed_forward(
      self.ffn_input(x), last_index=last_index, pathway=pathway, pathway_mode=pathway_mode
    )
    return x + out, logits, probs, cache


def layer_name(i: int) -> str:
  return f'layer_{i}'


class Transformer(nnx.Module):
  """Embedding, L decoder layers (attributes layer_0 ..), final norm, LM head [D, V]."""

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.embed = Embedding(
      config.vocab_size,
      config.hidden_size,
      rngs=rngs,
      dtype=dtype,
      multiplier=config.embedding_multiplier,
    )
    for i in range(config.num_hidden_layers):
      setattr(self, layer_name(i), DecoderLayer(config, i, rngs=rngs, dtype=dtype))
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
    if not config.tie_word_embeddings:
      self.lm_head = normal_param(rngs, (config.hidden_size, config.vocab_size), dtype)

  def layer(self, i: int) -> DecoderLayer:
    return getattr(self, layer_name(i))

  def head_weight(self) -> jax.Array:
    """[D, V]: the LM head, or the transposed embedding when tied; / logits_scaling (Granite)."""
    w = self.embed.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]
    return self._unscaled(w)

  def head_rows(self, ids: jax.Array) -> jax.Array:
    """LM-head columns of the given token ids, as rows [..., D] (h . row is the logit)."""
    if self.config.tie_word_embeddings:
      return self._unscaled(self.embed.embedding[...][ids])
    return self._unscaled(jnp.moveaxis(self.lm_head[...][:, ids], 0, -1))

  def _unscaled(self, w: jax.Array) -> jax.Array:
    s = self.config.logits_scaling
    return w if s == 1.0 else w / jnp.asarray(s, w.dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[..., D] -> [..., V] float32 logits."""
    return (hidden @ self.head_weight().astype(hidden.dtype)).astype(jnp.float32)
