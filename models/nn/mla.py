"""Multi-head latent attention (DeepSeek-V2, DeepSeek-V3) as a `flax.nnx` module.

Queries come through a low-rank latent (q_a [D, Rq], RMSNorm, q_b [Rq,
H*Dqk]) or one projection (q [D, H*Dqk]) when `q_lora_rank` is None. Keys and
values come from one latent per token: kv_a [D, Rkv + Dr] gives the latent
(RMSNorm, then kv_b [Rkv, H*(Dn + Dv)] expands it to every head's unrotated
key part and value) and a single rotated key part of Dr dims that all heads
share (the decoupled RoPE key). A head's key is [its Dn unrotated dims, the
shared Dr rotated ones]; its query likewise. RoPE runs on interleaved pairs
with the config's scaling (YaRN on the published models), and the softmax
scale is Dqk**-0.5 times YaRN's mscale_all_dim correction squared.

`qkv` / `out` have `layers.Attention`'s interface, so the decoder, the KV
cache and the prefix window run it unchanged: keys [B, T, H, Dqk], values [B,
T, H, Dv] per head (the latent is expanded before caching; the cache holds
what the attention kernel reads, as for every other family).

Dimensions: B batch, T tokens, D model, H heads, Dn unrotated and Dr rotated
query/key dims per head, Dqk = Dn + Dr, Dv value dims per head, Rq and Rkv
the query and key/value latent ranks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import MoeConfig
from models.nn import rope
from models.nn.layers import RMSNorm, normal_param

# DeepSeek's latent RMSNorms are built without the config's eps: their default.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nnx.Module):
  """q (or q_a, q_a_norm, q_b), kv_a, kv_a_norm, kv_b, o; see the module docstring."""

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    c = config
    d, h, dqk = c.hidden_size, c.num_attention_heads, c.head_dim
    dn, dr, dv = dqk - c.qk_rope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    if c.q_lora_rank is None:
      self.q = normal_param(rngs, (d, h * dqk), dtype)
    else:
      self.q_a = normal_param(rngs, (d, c.q_lora_rank), dtype)
      self.q_a_norm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
      self.q_b = normal_param(rngs, (c.q_lora_rank, h * dqk), dtype)
    self.kv_a = normal_param(rngs, (d, c.kv_lora_rank + dr), dtype)
    self.kv_a_norm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS, dtype=dtype)
    self.kv_b = normal_param(rngs, (c.kv_lora_rank, h * (dn + dv)), dtype)
    self.o = normal_param(rngs, (h * dv, d), dtype)
    scaling = dict(c.rope_scaling)
    inv_freq, self._rope_scale = rope.frequencies(
      dr, c.rope_theta, scaling, c.max_position_embeddings
    )
    self._inv_freq = tuple(float(f) for f in inv_freq)  # static: no array attributes
    self._scale = rope.softmax_scale(dqk, scaling)

  def qkv(self, x: jax.Array, positions: jax.Array):
    """x [B, T, D], positions [B, T] -> q, k [B, T, H, Dqk], v [B, T, H, Dv]."""
    c = self.config
    b, t, _ = x.shape
    h, dr, dv = c.num_attention_heads, c.qk_rope_head_dim, c.v_head_dim
    dn = c.head_dim - dr
    if c.q_lora_rank is None:
      q = x @ self.q[...]
    else:
      q = self.q_a_norm(x @ self.q_a[...]) @ self.q_b[...]
    q = q.reshape(b, t, h, dn + dr)
    latent = x @ self.kv_a[...]  # [B, T, Rkv + Dr]
    kv = self.kv_a_norm(latent[..., : c.kv_lora_rank]) @ self.kv_b[...]
    kv = kv.reshape(b, t, h, dn + dv)
    k_rot = latent[..., None, c.kv_lora_rank :]  # [B, T, 1, Dr]: one for all heads

    def rotate(a):
      inv_freq = np.asarray(self._inv_freq, np.float32)
      return rope.apply(a, positions, inv_freq, self._rope_scale, c.rope_interleave)

    q = jnp.concatenate([q[..., :dn], rotate(q[..., dn:])], axis=-1)
    k_rot = jnp.broadcast_to(rotate(k_rot), (b, t, h, dr))
    k = jnp.concatenate([kv[..., :dn], k_rot], axis=-1)  # [B, T, H, Dqk]
    return q, k, kv[..., dn:]

  def kernel_options(self) -> dict:
    """Keyword arguments of the attention kernel: the score scale."""
    return {'scale': self._scale}

  def out(self, attended: jax.Array) -> jax.Array:
    """[B, T, H*Dv] -> [B, T, D]."""
    return attended @ self.o[...]
