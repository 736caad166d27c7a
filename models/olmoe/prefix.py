"""The prefix state of a batch of sequences and the forward pass of their windows.

A pathway overrides the routing of one token per sequence (its last context
token, at slot p) in the critical layers, and attention is causal. So every
position before p, and position p itself below the first critical layer c0,
is the same for every candidate pathway. `prepare` runs each sequence once,
with native routing, and keeps:

* the residual stream entering layer c0 at the window: slots p .. p+U-1, the
  tokens whose outputs depend on the pathway (the re-mixed token and any
  tokens after it that are scored);
* the keys and values of every slot in layers c0 .. L-1 (all layers from the
  first critical one on, critical or not: the window runs through all of them).

`window_forward` then runs only the window through layers c0 .. L-1 with a
pathway: a window token attends to the cached keys of the prefix (slots < p)
and to the fresh keys of the window tokens up to itself (cached slots >= p
are stale or, by causality, never attended). It returns the final-normed
window states; equal to `transformer.forward` at those positions up to
rounding. The pathway token is the window's first.

Dimensions: B sequences, T tokens (key slots), U window tokens, Lc layers
from the first critical one on, D model, KV key/value heads, Dh head dim,
E experts, K top-k.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from models.olmoe import layers, routing, transformer
from models.olmoe import moe as moe_lib
from models.olmoe.config import OlmoeConfig

# Masked attention scores, as in `layers.attend`: finite, so no NaN.
_MASKED = -1e30


@flax.struct.dataclass
class PrefixWindow:
  """The pathway-independent part of B sequences' forward passes.

  Leaves may carry extra leading axes (e.g. [N, S] neighbours x sequences)
  before the B axis described here; `window_forward` takes B flat.
  """

  x: jax.Array  # [B, U, D] residual stream entering layer c0 at the window
  k: jax.Array  # [B, Lc, T, KV, Dh] keys of layers c0..L-1 (native routing)
  v: jax.Array  # [B, Lc, T, KV, Dh] values
  key_valid: jax.Array  # [B, T] bool, real tokens
  positions: jax.Array  # [B, U] int32 RoPE positions of the window tokens
  slots: jax.Array  # [B, U] int32 window slots p .. p+U-1 (may pass T-1)

  @property
  def num_tokens(self) -> int:
    return self.key_valid.shape[-1]

  @property
  def window(self) -> int:
    return self.x.shape[-2]


def prepare(
  params, config: OlmoeConfig, first_layer: int, tokens, mask, window_start, window: int
) -> PrefixWindow:
  """One native pass over tokens [B, T] (mask [B, T]) -> the prefix state.

  window_start [B]: slot p of each sequence's window (its re-mixed token);
  window: U, the window length.
  """
  params = jax.lax.stop_gradient(params)
  b, t = tokens.shape
  num_layers = config.num_hidden_layers
  key_valid = mask.astype(bool)
  positions = transformer.positions_from_mask(mask)  # [B, T]
  slots = window_start[:, None] + jnp.arange(window)[None, :]  # [B, U]
  gather = jnp.minimum(slots, t - 1)  # slots past the end: padding, unused
  common = dict(
    positions=positions,
    query_slots=jnp.broadcast_to(jnp.arange(t)[None, :], (b, t)),
    key_valid=key_valid,
    last_index=window_start,
  )
  x = params['embed'][tokens]  # [B, T, D]
  x, _, _, _ = transformer.decoder_stack(params, x, config, layer_ids=range(first_layer), **common)
  x_win = jnp.take_along_axis(x, gather[:, :, None], axis=1)  # [B, U, D]
  empty = jnp.zeros((b, t, config.num_key_value_heads, config.head_dim), params['embed'].dtype)
  # Nothing reads the last layer's outputs at the prefix: its keys and values only.
  mid = range(first_layer, num_layers - 1)
  x, caches, _, _ = transformer.decoder_stack(
    params,
    x,
    config,
    layer_ids=mid,
    caches=[transformer.LayerCache(k=empty, v=empty)] * len(mid),
    **common,
  )
  last = params[transformer.layer_name(num_layers - 1)]
  _, k, v = layers.qkv(
    last['attn'], layers.rms_norm(x, last['input_norm'], config.rms_norm_eps), positions, config
  )
  state = PrefixWindow(
    x=x_win,
    k=jnp.stack([c.k for c in caches] + [k], axis=1),
    v=jnp.stack([c.v for c in caches] + [v], axis=1),
    key_valid=key_valid,
    positions=jnp.take_along_axis(positions, gather, axis=1),
    slots=slots.astype(jnp.int32),
  )
  return jax.lax.stop_gradient(state)


def mix_all_experts(moe: dict, x: jax.Array, combine: jax.Array) -> jax.Array:
  """`moe.moe_dense` as expert-batched matmuls: x [B, D], combine [B, E] -> [B, D].

  Each expert's weights are one operand of a batched matmul over E, read as
  stored; `moe_dense`'s einsums make XLA re-lay them out on every call.
  """
  dims = (((2,), (1,)), ((0,), (0,)))  # contract D (then F), batch over E
  xe = jnp.broadcast_to(x[None], (moe['gate'].shape[0],) + x.shape)  # [E, B, D]
  gate = jax.lax.dot_general(xe, moe['gate'].astype(x.dtype), dims)  # [E, B, F]
  up = jax.lax.dot_general(xe, moe['up'].astype(x.dtype), dims)
  a = jax.nn.silu(gate) * up
  a = (a.astype(jnp.float32) * combine.T[..., None]).astype(x.dtype)  # [E, B, F]
  y = jax.lax.dot_general(a, moe['down'].astype(x.dtype), dims)  # [E, B, D]
  return jnp.sum(y.astype(jnp.float32), axis=0).astype(x.dtype)


def _window_moe(p, h, config: OlmoeConfig, pathway, pathway_mode: str):
  """`transformer.moe_block` on window tokens h [B, U, D]; the pathway token is index 0.

  A window is a few tokens per sequence. With few assignments every expert
  runs on every window token (each expert's weights read once for the whole
  batch under vmap) and the top-k weights, zero elsewhere, mix them:
  gathering each assignment's expert weights instead is memory-bound, and
  slower. Many tokens (rc) take the model's sorted dispatch.
  """
  b, u, d = h.shape
  e, k = config.num_experts, config.num_experts_per_tok
  _, probs = routing.router_probs(h, p['router'])
  if pathway is not None:
    probs = routing.override_last_token(probs, jnp.zeros((b,), jnp.int32), pathway)
  weights, indices = routing.top_k(probs, k, config.norm_topk_prob)  # [B, U, K]
  dense_row = None
  if pathway is not None and pathway_mode == 'dense':
    dense_row = routing.dense_coefficients(pathway, config.norm_topk_prob)  # [B, E]
  if b * u * k <= e:
    combine = routing.combine_weights(weights, indices, e)  # [B, U, E]
    if dense_row is not None:
      combine = combine.at[:, 0].set(dense_row)
    out = mix_all_experts(p, h.reshape(b * u, d), combine.reshape(b * u, e))
    return out.reshape(b, u, d)
  out = moe_lib.moe_topk(h.reshape(b * u, d), weights.reshape(-1, k), indices.reshape(-1, k), p)
  out = out.reshape(b, u, d)
  if dense_row is not None:
    out = out.at[:, 0].set(mix_all_experts(p, h[:, 0], dense_row))
  return out


def _window_attend(q, k, v, cache: transformer.LayerCache, slots, key_valid) -> jax.Array:
  """Causal attention of the window over the cached prefix and the window itself.

  `layers.attend` with the window's keys in place of the cached ones at their
  slots, without writing them there: the prefix (cached slots before the
  window, p = slots[:, 0]) and the window are scored apart and share one
  softmax. q [B, U, H, Dh]; k, v [B, U, KV, Dh]; cache k, v [B, T, KV, Dh];
  slots [B, U]; key_valid [B, T]. Returns [B, U, H*Dh].
  """
  b, u, h, dh = q.shape
  kv, t = k.shape[2], cache.k.shape[1]
  q = q.reshape(b, u, kv, h // kv, dh)  # [B, U, KV, G, Dh]
  pre = jnp.einsum('bukgd,btkd->bkgut', q, cache.k).astype(jnp.float32) * dh**-0.5
  win = jnp.einsum('bukgd,bwkd->bkguw', q, k).astype(jnp.float32) * dh**-0.5
  pre_ok = (jnp.arange(t)[None, :] < slots[:, :1]) & key_valid  # [B, T]
  win_valid = jnp.take_along_axis(key_valid, jnp.minimum(slots, t - 1), axis=1) & (slots < t)
  win_ok = (jnp.arange(u)[None, :] <= jnp.arange(u)[:, None])[None] & win_valid[:, None, :]
  pre = jnp.where(pre_ok[:, None, None, None, :], pre, _MASKED)  # [B, KV, G, U, T]
  win = jnp.where(win_ok[:, None, None], win, _MASKED)  # [B, KV, G, U, U]
  probs = jax.nn.softmax(jnp.concatenate([pre, win], axis=-1), axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgut,btkd->bukgd', probs[..., :t], cache.v)
  out = out + jnp.einsum('bkguw,bwkd->bukgd', probs[..., t:], v)
  return out.reshape(b, u, h * dh)


def window_layer(
  p,
  x,
  config: OlmoeConfig,
  *,
  positions,
  query_slots,
  key_valid,
  last_index,
  cache,
  pathway,
  pathway_mode,
):
  """`transformer.decoder_layer` on the window x [B, U, D] over the cached prefix.

  query_slots [B, U] are the window's slots; the pathway token is the window's
  first (last_index is unused). Returns (x, None, None, cache): no routing.
  """
  del last_index
  h = layers.rms_norm(x, p['input_norm'], config.rms_norm_eps)
  q, k, v = layers.qkv(p['attn'], h, positions, config)
  x = x + _window_attend(q, k, v, cache, query_slots, key_valid) @ p['attn']['o']
  h = layers.rms_norm(x, p['post_attn_norm'], config.rms_norm_eps)
  return x + _window_moe(p['moe'], h, config, pathway, pathway_mode), None, None, cache


def window_forward(
  params, config: OlmoeConfig, first_layer: int, st: PrefixWindow, pathway, pathway_mode: str
) -> jax.Array:
  """The windows through layers c0..L-1 with `pathway` {layer: [B, E]} -> [B, U, D] normed."""
  layer_ids = range(first_layer, config.num_hidden_layers)
  x, _, _, _ = transformer.decoder_stack(
    params,
    st.x,
    config,
    layer_ids=layer_ids,
    positions=st.positions,
    query_slots=st.slots,
    key_valid=st.key_valid,
    last_index=st.slots[:, 0],
    caches=[transformer.LayerCache(k=st.k[:, j], v=st.v[:, j]) for j in range(len(layer_ids))],
    pathway=pathway,
    pathway_mode=pathway_mode,
    layer=window_layer,
  )
  return layers.rms_norm(x, params['final_norm'], config.rms_norm_eps)


def head_rows(params, config: OlmoeConfig, ids: jax.Array) -> jax.Array:
  """LM-head columns of the given token ids, as rows [..., D]."""
  if config.tie_word_embeddings:
    return params['embed'][ids]
  return jnp.moveaxis(params['lm_head'][:, ids], 0, -1)


def resize(a: jax.Array, axis: int, n: int) -> jax.Array:
  """a cut or zero-padded to n along axis."""
  have = a.shape[axis]
  if have >= n:
    return jax.lax.slice_in_dim(a, 0, n, axis=axis)
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, n - have)
  return jnp.pad(a, pad)


def fit(st: PrefixWindow, num_tokens: int, window: int) -> PrefixWindow:
  """Pads (or cuts) a state to T = num_tokens key slots and U = window.

  Axes count from the end, so leading axes before B are allowed. Cutting is
  exact while the cut slots and window positions hold no real token; padded
  slots are invalid keys, padded window tokens are never scored.
  """
  u0 = st.window
  if window <= u0:
    positions = resize(st.positions, st.positions.ndim - 1, window)
  else:  # window positions continued one by one past the cached window
    extra = st.positions[..., -1:] + jnp.arange(1, window - u0 + 1, dtype=st.positions.dtype)
    positions = jnp.concatenate([st.positions, extra], axis=-1)
  return st.replace(
    x=resize(st.x, st.x.ndim - 2, window),
    k=resize(st.k, st.k.ndim - 3, num_tokens),
    v=resize(st.v, st.v.ndim - 3, num_tokens),
    key_valid=resize(st.key_valid, st.key_valid.ndim - 1, num_tokens),
    positions=positions,
    slots=st.slots[..., :1] + jnp.arange(window, dtype=jnp.int32),
  )
