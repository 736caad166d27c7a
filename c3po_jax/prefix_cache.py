"""Prefix-cached neighbour loss: recompute only what the pathway changes.

The pathway overrides the routing of one token per sequence (its last context
token, at slot p) in the critical layers, and attention is causal. So for a
neighbour sequence, every position before p, and position p itself below the
first critical layer c0, is the same for every candidate pathway. `prepare`
runs each neighbour sequence once without a pathway and keeps:

* the residual stream entering layer c0 at the window: slots p .. p+U-1, the
  tokens whose outputs depend on the pathway and whose logits score a choice
  (mc: U = 1, the last context token; rc: U = Tc, the last context token and
  the continuation tokens before the last one);
* the keys and values of every slot in layers c0 .. L-1 (all layers from the
  first critical one on, critical or not: the window runs through all of them).

Each loss call then runs only the window through layers c0 .. L-1: a window
token attends to the cached keys of the prefix (slots < p) and to the fresh
keys of the window tokens up to itself (cached slots >= p are stale or, by
causality, never attended). Then the final norm and only the logits that
score a choice (mc with the choice loss: only the C choice tokens' columns of
the LM head). Equal to `engine.NaiveLoss` up to rounding.

Dimensions: N neighbours, S sequences per neighbour, T tokens (key slots),
U window tokens, C choices, Tc continuation tokens per choice, Lc layers from
the first critical one on, D model, KV key/value heads, Dh head dim, E experts.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from c3po_jax import neighbour_loss, scoring
from models.olmoe import layers, routing, transformer
from models.olmoe import moe as moe_lib
from models.olmoe.config import OlmoeConfig

# Masked attention scores, as in `layers.attend`: finite, so no NaN.
_MASKED = -1e30


@flax.struct.dataclass
class PrefixState:
  """The pathway-independent part of N neighbours' forward passes.

  Every leaf has the neighbour axis N first, so states of single references
  can be cached apart and stacked (see `fit` for matching their shapes).
  """

  x: jax.Array  # [N, S, U, D] residual stream entering layer c0 at the window
  k: jax.Array  # [N, S, Lc, T, KV, Dh] keys of layers c0..L-1 (no pathway)
  v: jax.Array  # [N, S, Lc, T, KV, Dh] values
  key_valid: jax.Array  # [N, S, T] bool, real tokens
  positions: jax.Array  # [N, S, U] int32 RoPE positions of the window tokens
  slots: jax.Array  # [N, S, U] int32 window slots p .. p+U-1 (may pass T-1)
  choice_seq: jax.Array  # [N, C] sequence that holds each choice
  win_pos: jax.Array  # [N, C, Tc] window index whose logits score each token
  cont_ids: jax.Array  # [N, C, Tc]
  cont_mask: jax.Array  # [N, C, Tc] float32
  choice_valid: jax.Array  # [N, C] bool
  gold: jax.Array  # [N] int32

  @property
  def num_tokens(self) -> int:
    return self.key_valid.shape[-1]

  @property
  def window(self) -> int:
    return self.x.shape[2]


def _flat(a: jax.Array) -> jax.Array:
  """[N, S, ...] -> [N*S, ...]."""
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def prepare(params, config: OlmoeConfig, first_layer: int, data: scoring.ChoiceBatch):
  """One pathway-free pass over N neighbours [N, S, T] -> PrefixState.

  Expects `scoring.make_batch` layouts: choice j's continuation is scored at
  positions ctx_last[choice_seq[j]] + (0, 1, ...).
  """
  params = jax.lax.stop_gradient(params)
  n, s, t = data.tokens.shape
  u = data.cont_pos.shape[-1]  # window: mc 1, rc the continuation bucket
  mask = _flat(data.mask)
  key_valid = mask.astype(bool)
  positions = transformer.positions_from_mask(mask)  # [NS, T]
  last = _flat(data.ctx_last)  # [NS]
  slots = last[:, None] + jnp.arange(u)[None, :]  # [NS, U]
  gather = jnp.minimum(slots, t - 1)  # slots past the end: padding, unused
  query_slots = jnp.broadcast_to(jnp.arange(t)[None, :], (n * s, t))
  empty = jnp.zeros((n * s, t, config.num_key_value_heads, config.head_dim), params['embed'].dtype)

  x = params['embed'][_flat(data.tokens)]  # [NS, T, D]
  x_win, ks, vs = None, [], []
  num_layers = config.num_hidden_layers
  for i in range(num_layers):
    p = params[transformer.layer_name(i)]
    if i == first_layer:
      x_win = jnp.take_along_axis(x, gather[:, :, None], axis=1)  # [NS, U, D]
    if i == num_layers - 1 and i >= first_layer:
      # Nothing reads the last layer's outputs at the prefix: keys and values only.
      h = layers.rms_norm(x, p['input_norm'], config.rms_norm_eps)
      _, k, v = layers.qkv(p['attn'], h, positions, config)
      ks.append(k)
      vs.append(v)
      break
    cache = transformer.LayerCache(k=empty, v=empty) if i >= first_layer else None
    x, _, _, cache = transformer.decoder_layer(
      p,
      x,
      config,
      positions=positions,
      query_slots=query_slots,
      key_valid=key_valid,
      last_index=last,
      cache=cache,
    )
    if cache is not None:
      ks.append(cache.k)
      vs.append(cache.v)

  unflat = lambda a: a.reshape((n, s) + a.shape[1:])
  win_start = jnp.take_along_axis(data.ctx_last, data.choice_seq, axis=1)  # [N, C]
  win_pos = jnp.clip(data.cont_pos - win_start[..., None], 0, u - 1)
  state = PrefixState(
    x=unflat(x_win),
    k=unflat(jnp.stack(ks, axis=1)),
    v=unflat(jnp.stack(vs, axis=1)),
    key_valid=unflat(key_valid),
    positions=unflat(jnp.take_along_axis(positions, gather, axis=1)),
    slots=unflat(slots.astype(jnp.int32)),
    choice_seq=data.choice_seq,
    win_pos=win_pos.astype(jnp.int32),
    cont_ids=data.cont_ids,
    cont_mask=data.cont_mask,
    choice_valid=data.choice_valid,
    gold=data.gold,
  )
  return jax.lax.stop_gradient(state)


def _head_rows(params, config: OlmoeConfig, ids: jax.Array) -> jax.Array:
  """LM-head columns of the given token ids, as rows [..., D]."""
  if config.tie_word_embeddings:
    return params['embed'][ids]
  return jnp.moveaxis(params['lm_head'][:, ids], 0, -1)


def window_scores(
  params, config: OlmoeConfig, hidden: jax.Array, st: PrefixState, *, logits_only: bool = False
) -> jax.Array:
  """Final-normed window states [N, S, U, D] -> choice scores [N, C].

  logits_only: when every choice is scored at one position (mc: one sequence,
  a one-token window) the choices share the softmax normalizer, and a loss
  that only compares choices ('choice_ce') needs their logits alone: C LM-head
  columns instead of V. Scores are then log-probabilities up to a constant
  per neighbour. Ignored where choices do not share a position.
  """
  n, c, tc = st.win_pos.shape
  rows = jnp.arange(n)[:, None, None]
  seqs = jnp.broadcast_to(st.choice_seq[:, :, None], (n, c, tc))
  h = hidden[rows, seqs, st.win_pos]  # [N, C, Tc, D]
  if logits_only and _shared_normalizer(st):
    w = _head_rows(params, config, st.cont_ids).astype(h.dtype)  # [N, C, Tc, D]
    tok = jnp.einsum('nctd,nctd->nct', h, w).astype(jnp.float32)
  else:
    logp = jax.nn.log_softmax(transformer.lm_head(params, h, config), axis=-1)
    tok = jnp.take_along_axis(logp, st.cont_ids[..., None], axis=-1)[..., 0]
  scores = jnp.sum(tok * st.cont_mask, axis=-1)
  return jnp.where(st.choice_valid, scores, -jnp.inf)


def _shared_normalizer(st: PrefixState) -> bool:
  """All choices scored at one position: the softmax normalizer cancels."""
  return st.x.shape[1] == 1 and st.window == 1


def _mix_all_experts(moe: dict, x: jax.Array, combine: jax.Array) -> jax.Array:
  """`moe.moe_dense` as expert-batched matmuls: x [N, D], combine [N, E] -> [N, D].

  Each expert's weights are one operand of a batched matmul over E, read as
  stored; `moe_dense`'s einsums make XLA re-lay them out on every call.
  """
  dims = (((2,), (1,)), ((0,), (0,)))  # contract D (then F), batch over E
  xe = jnp.broadcast_to(x[None], (moe['gate'].shape[0],) + x.shape)  # [E, N, D]
  gate = jax.lax.dot_general(xe, moe['gate'].astype(x.dtype), dims)  # [E, N, F]
  up = jax.lax.dot_general(xe, moe['up'].astype(x.dtype), dims)
  a = jax.nn.silu(gate) * up
  a = (a.astype(jnp.float32) * combine.T[..., None]).astype(x.dtype)  # [E, N, F]
  y = jax.lax.dot_general(a, moe['down'].astype(x.dtype), dims)  # [E, N, D]
  return jnp.sum(y.astype(jnp.float32), axis=0).astype(x.dtype)


def _window_moe(p, h, config: OlmoeConfig, pathway, pathway_mode: str):
  """`transformer.moe_block` on window tokens h [NS, U, D]; the pathway token is index 0.

  A window is a few tokens per neighbour. With few assignments every expert
  runs on every window token (each expert's weights read once for the whole
  batch under vmap) and the top-k weights, zero elsewhere, mix them:
  gathering each assignment's expert weights instead is memory-bound, and
  slower. Many tokens (rc) take the model's sorted dispatch.
  """
  ns, u, d = h.shape
  e, k = config.num_experts, config.num_experts_per_tok
  _, probs = routing.router_probs(h, p['router'])
  if pathway is not None:
    probs = routing.override_last_token(probs, jnp.zeros((ns,), jnp.int32), pathway)
  weights, indices = routing.top_k(probs, k, config.norm_topk_prob)  # [NS, U, K]
  dense_row = None
  if pathway is not None and pathway_mode == 'dense':
    dense_row = routing.dense_coefficients(pathway, config.norm_topk_prob)  # [NS, E]
  if ns * u * k <= e:
    combine = routing.combine_weights(weights, indices, e)  # [NS, U, E]
    if dense_row is not None:
      combine = combine.at[:, 0].set(dense_row)
    out = _mix_all_experts(p, h.reshape(ns * u, d), combine.reshape(ns * u, e))
    return out.reshape(ns, u, d)
  out = moe_lib.moe_topk(h.reshape(ns * u, d), weights.reshape(-1, k), indices.reshape(-1, k), p)
  out = out.reshape(ns, u, d)
  if dense_row is not None:
    out = out.at[:, 0].set(_mix_all_experts(p, h[:, 0], dense_row))
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


def _window_layer(
  p, x, config: OlmoeConfig, *, positions, slots, key_valid, cache, pathway, pathway_mode
):
  """`transformer.decoder_layer` on the window x [NS, U, D] over cached keys."""
  h = layers.rms_norm(x, p['input_norm'], config.rms_norm_eps)
  q, k, v = layers.qkv(p['attn'], h, positions, config)
  x = x + _window_attend(q, k, v, cache, slots, key_valid) @ p['attn']['o']
  h = layers.rms_norm(x, p['post_attn_norm'], config.rms_norm_eps)
  return x + _window_moe(p['moe'], h, config, pathway, pathway_mode)


def make_scores(params, config: OlmoeConfig, ec, mode: str, *, logits_only: bool = False):
  """scores_fn(w [C, Kc], cs, st: PrefixState [N, ...], anchors=None) -> scores [N, C].

  The pathway built from the core weights w enters in `mode` at each
  sequence's window token (see `neighbour_loss.neighbour_pathway`).
  """
  first = min(ec.spec.layers)

  def scores_fn(w, cs, st: PrefixState, anchors=None):
    n, s, u, _ = st.x.shape
    ns = n * s
    pathway = neighbour_loss.neighbour_pathway(w, cs, ec.spec, mode, anchors, n, s)
    x = _flat(st.x)  # [NS, U, D]
    key_valid, positions, slots = _flat(st.key_valid), _flat(st.positions), _flat(st.slots)
    for j, i in enumerate(range(first, config.num_hidden_layers)):
      pw = pathway.get(i)
      if pw is not None:
        pw = pw.reshape(ns, pw.shape[-1])
      x = _window_layer(
        params[transformer.layer_name(i)],
        x,
        config,
        positions=positions,
        slots=slots,
        key_valid=key_valid,
        cache=transformer.LayerCache(k=_flat(st.k[:, :, j]), v=_flat(st.v[:, :, j])),
        pathway=pw,
        pathway_mode=mode,
      )
    hidden = layers.rms_norm(x, params['final_norm'], config.rms_norm_eps)
    hidden = hidden.reshape(n, s, u, -1)
    return window_scores(params, config, hidden, st, logits_only=logits_only)

  return scores_fn


def make_loss(params, config: OlmoeConfig, ec, mode: str | None = None):
  """loss_fn(w [C, Kc], cs, st: PrefixState [N, ...], weights [N], anchors=None) -> scalar."""
  # The choice loss compares choices only: logits of the choice tokens suffice.
  scores_fn = make_scores(
    params, config, ec, mode or ec.opt_pathway_mode, logits_only=ec.loss == 'choice_ce'
  )
  return neighbour_loss.weighted_loss(scores_fn, ec.loss)


def fit(state: PrefixState, num_tokens: int, window: int) -> PrefixState:
  """Pads (or cuts) a state to T = num_tokens key slots and U = window.

  Cutting is exact while the cut slots and window positions hold no real
  token; padded slots are invalid keys, padded window tokens are never scored.
  """

  def size(a, axis, n):
    have = a.shape[axis]
    if have >= n:
      return jax.lax.slice_in_dim(a, 0, n, axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n - have)
    return jnp.pad(a, pad)

  u0 = state.window
  slots = state.slots[..., :1] + jnp.arange(window, dtype=jnp.int32)
  return state.replace(
    x=size(state.x, 2, window),
    k=size(state.k, 3, num_tokens),
    v=size(state.v, 3, num_tokens),
    key_valid=size(state.key_valid, 2, num_tokens),
    positions=size(state.positions, 2, window)
    if window <= u0
    else _extend(state.positions, window),
    slots=slots,
    win_pos=size(state.win_pos, 2, window),
    cont_ids=size(state.cont_ids, 2, window),
    cont_mask=size(state.cont_mask, 2, window),
  )


def _extend(positions: jax.Array, window: int) -> jax.Array:
  """Window positions continued one by one past the cached window."""
  u0 = positions.shape[-1]
  extra = positions[..., -1:] + jnp.arange(1, window - u0 + 1, dtype=positions.dtype)
  return jnp.concatenate([positions, extra], axis=-1)


class PrefixLoss:
  """Loss backend (see `engine.NaiveLoss`) on prefix-cached neighbour states."""

  @staticmethod
  def prepare(params, config: OlmoeConfig, ec, data: scoring.ChoiceBatch) -> PrefixState:
    return prepare(params, config, min(ec.spec.layers), data)

  @staticmethod
  def make_scores(params, config: OlmoeConfig, ec, mode: str):
    return make_scores(params, config, ec, mode)

  @staticmethod
  def make_loss(params, config: OlmoeConfig, ec, mode: str | None = None):
    return make_loss(params, config, ec, mode)

  fit = staticmethod(fit)
