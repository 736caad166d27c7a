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

from models import params as params_lib
from models import transformer
from models.config import MoeConfig
from models.nn.decoder import DecoderLayer
from models.nn.layers import MASKED, attention_probs, causal_visible


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


def _setup(params, config: MoeConfig, tokens, mask, last_index, window_start, window: int):
  """The bound model, the stack's shared keywords, window slots [B, U] and gather rows."""
  b, t = tokens.shape
  slots = window_start[:, None] + jnp.arange(window)[None, :]  # [B, U]
  common = dict(
    positions=transformer.positions_from_mask(mask),  # [B, T]
    query_slots=jnp.broadcast_to(jnp.arange(t)[None, :], (b, t)),
    key_valid=mask.astype(bool),
    last_index=last_index,
  )
  gather = jnp.minimum(slots, t - 1)  # slots past the end: padding, unused
  return params_lib.bind(params, config), common, slots, gather


def _window(x_win, k, v, common, slots, gather) -> PrefixWindow:
  return PrefixWindow(
    x=x_win,
    k=k,
    v=v,
    key_valid=common['key_valid'],
    positions=jnp.take_along_axis(common['positions'], gather, axis=1),
    slots=slots.astype(jnp.int32),
  )


def _empty_caches(config: MoeConfig, x, n: int):
  return [transformer.LayerCache.empty(config, x.shape[0], x.shape[1], x.dtype)] * n


def prepare(
  params, config: MoeConfig, first_layer: int, tokens, mask, window_start, window: int
) -> PrefixWindow:
  """One native pass over tokens [B, T] (mask [B, T]) -> the prefix state.

  window_start [B]: slot p of each sequence's window (its re-mixed token);
  window: U, the window length.
  """
  params = jax.lax.stop_gradient(params)
  num_layers = config.num_hidden_layers
  model, common, slots, gather = _setup(
    params, config, tokens, mask, window_start, window_start, window
  )
  x = model.embed(tokens)  # [B, T, D]
  x, _, _, _ = transformer.decoder_stack(model, x, layer_ids=range(first_layer), **common)
  x_win = jnp.take_along_axis(x, gather[:, :, None], axis=1)  # [B, U, D]
  # Nothing reads the last layer's outputs at the prefix: its keys and values only.
  mid = range(first_layer, num_layers - 1)
  x, caches, _, _ = transformer.decoder_stack(
    model, x, layer_ids=mid, caches=_empty_caches(config, x, len(mid)), **common
  )
  last = model.layer(num_layers - 1)
  _, k, v = last.attn.qkv(last.attn_input(x), common['positions'])
  k = jnp.stack([c.k for c in caches] + [k], axis=1)
  v = jnp.stack([c.v for c in caches] + [v], axis=1)
  return jax.lax.stop_gradient(_window(x_win, k, v, common, slots, gather))


def forward_and_prepare(
  params, config: MoeConfig, first_layer: int, tokens, mask, last_index, window_start, window: int
):
  """A native forward over tokens [B, T] that also keeps its prefix state.

  The forward of `transformer.forward_hidden` (pathway-free, the router
  outputs of every layer) split at the first critical layer c0, keeping
  what `prepare` keeps: so a prompt's base pass yields what scoring it under
  any pathway needs. last_index [B]: each row's last real token.

  Returns (hidden [B, T, D] final-normed, router logits [L, B, T, E], probs
  [L, B, T, E], PrefixWindow).
  """
  model, common, slots, gather = _setup(
    params, config, tokens, mask, last_index, window_start, window
  )
  x = model.embed(tokens)  # [B, T, D]
  x, _, lo_logits, lo_probs = transformer.decoder_stack(
    model, x, layer_ids=range(first_layer), **common
  )
  x_win = jnp.take_along_axis(x, gather[:, :, None], axis=1)  # [B, U, D]
  upper = range(first_layer, config.num_hidden_layers)
  x, caches, hi_logits, hi_probs = transformer.decoder_stack(
    model, x, layer_ids=upper, caches=_empty_caches(config, x, len(upper)), **common
  )
  k = jnp.stack([c.k for c in caches], axis=1)
  v = jnp.stack([c.v for c in caches], axis=1)
  joined = lambda lo, hi: hi if lo is None else jnp.concatenate([lo, hi])  # [L, B, T, E]
  state = jax.lax.stop_gradient(_window(x_win, k, v, common, slots, gather))
  return (
    model.final_norm(x),
    joined(lo_logits, hi_logits),
    joined(lo_probs, hi_probs),
    state,
  )


def _window_attend(
  q, k, v, cache: transformer.LayerCache, slots, key_valid, *, scale=None, window=None, sinks=None
) -> jax.Array:
  """Causal attention of the window over the cached prefix and the window itself.

  `layers.attend` with the window's keys in place of the cached ones at their
  slots, without writing them there: the prefix (cached slots before the
  window, p = slots[:, 0]) and the window are scored apart and share one
  softmax. q [B, U, H, Dh]; k, v [B, U, KV, Dh]; cache k, v [B, T, KV, Dh];
  slots [B, U]; key_valid [B, T]; scale, window, sinks as in `layers.attend`.
  Returns [B, U, H*Dh].
  """
  b, u, h, dh = q.shape
  kv, t = k.shape[2], cache.k.shape[1]
  scale = dh**-0.5 if scale is None else scale
  q = q.reshape(b, u, kv, h // kv, dh)  # [B, U, KV, G, Dh]
  pre = jnp.einsum('bukgd,btkd->bkgut', q, cache.k).astype(jnp.float32) * scale
  win = jnp.einsum('bukgd,bwkd->bkguw', q, k).astype(jnp.float32) * scale
  cached = jnp.broadcast_to(jnp.arange(t)[None], key_valid.shape)  # [B, T]
  pre_ok = causal_visible(slots, cached, window) & (cached < slots[:, :1])[:, None, :]
  pre_ok = pre_ok & key_valid[:, None, :]  # [B, U, T]
  win_valid = jnp.take_along_axis(key_valid, jnp.minimum(slots, t - 1), axis=1) & (slots < t)
  win_ok = causal_visible(slots, slots, window) & win_valid[:, None, :]  # [B, U, U]
  pre = jnp.where(pre_ok[:, None, None], pre, MASKED)  # [B, KV, G, U, T]
  win = jnp.where(win_ok[:, None, None], win, MASKED)  # [B, KV, G, U, U]
  probs = attention_probs(jnp.concatenate([pre, win], axis=-1), sinks).astype(v.dtype)
  out = jnp.einsum('bkgut,btkd->bukgd', probs[..., :t], cache.v)
  out = out + jnp.einsum('bkguw,bwkd->bukgd', probs[..., t:], v)
  return out.reshape(b, u, -1)  # [B, U, H*Dv]


def window_layer(
  layer: DecoderLayer,
  x,
  *,
  positions,
  query_slots,
  key_valid,
  last_index,
  cache,
  pathway,
  pathway_mode,
):
  """A `DecoderLayer` on the window x [B, U, D] over the cached prefix.

  query_slots [B, U] are the window's slots; the pathway token is the window's
  first (last_index is unused). Returns (x, None, None, cache): no routing.
  """
  del last_index
  q, k, v = layer.attn.qkv(layer.attn_input(x), positions)
  attended = _window_attend(q, k, v, cache, query_slots, key_valid, **layer.attn.kernel_options())
  x = x + layer.attn_branch(attended)
  return (
    x + layer.feed_forward_window(layer.ffn_input(x), pathway, pathway_mode),
    None,
    None,
    cache,
  )


def window_forward(
  params, config: MoeConfig, first_layer: int, st: PrefixWindow, pathway, pathway_mode: str
) -> jax.Array:
  """The windows through layers c0..L-1 with `pathway` {layer: [B, E]} -> [B, U, D] normed."""
  model = params_lib.bind(params, config)
  layer_ids = range(first_layer, config.num_hidden_layers)
  x, _, _, _ = transformer.decoder_stack(
    model,
    st.x,
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
  return model.final_norm(x)


def head_rows(params, config: MoeConfig, ids: jax.Array) -> jax.Array:
  """LM-head columns of the given token ids, as rows [..., D]."""
  return params_lib.bind(params, config).head_rows(ids)


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
