"""The OLMoE decoder as a pure function of an explicit parameter pytree.

`forward(params, tokens, *, config, attention_mask=None, pathway=None)` is the
whole model. Params are a plain nested dict (see `param_shapes`); the routing
pathway is an explicit input, so `jax.grad` and `jax.vmap` apply to it.

Pathway semantics (the public C3PO code's): `pathway` maps a layer index to
weights [B, E]. In each listed layer, the router-probability row of every
sequence's last real token is replaced by the weights renormalized to sum to
1, then top-k is taken on the replaced row (`pathway_mode='topk'`). With
`pathway_mode='dense'` that token instead mixes every expert with non-zero
pathway weight, densely, the weights being the mixing coefficients as given
(renormalized only when `norm_topk_prob`), so gradients reach all of them;
C3PO passes the core experts' weights and zeros elsewhere. Every other token
and layer keeps native routing.

Dimensions: B batch, T tokens, S cache slots, D model, V vocab, L layers,
E experts, K top-k, F expert hidden, H heads, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models.olmoe import layers, routing
from models.olmoe import moe as moe_lib
from models.olmoe.config import OlmoeConfig

Params = dict
Pathway = Mapping[int, jax.Array]
PATHWAY_MODES = ('topk', 'dense')


@flax.struct.dataclass
class HiddenOutput:
  """What one pass produces before the LM head."""

  hidden: jax.Array  # [B, T, D] after the final norm
  router_logits: jax.Array  # [L, B, T, E] float32
  router_probs: jax.Array  # [L, B, T, E] float32, as used (after any override)
  last_index: jax.Array  # [B] position of each row's last real token
  last_hidden: jax.Array  # [B, D] final-normed hidden state at last_index


@flax.struct.dataclass
class ForwardOutput(HiddenOutput):
  logits: jax.Array = None  # [B, T, V] float32


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer. k, v [B, S, KV, Dh]."""

  k: jax.Array
  v: jax.Array


def layer_name(i: int) -> str:
  return f'layer_{i}'


def param_shapes(config: OlmoeConfig) -> dict:
  """The full parameter tree as shapes: the single source of the layout."""
  d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
  layer = {
    'input_norm': (d,),
    'post_attn_norm': (d,),
    'attn': {
      'q': (d, config.q_width),
      'k': (d, config.kv_width),
      'v': (d, config.kv_width),
      'o': (config.q_width, d),
      'q_norm': (config.q_width,),
      'k_norm': (config.kv_width,),
    },
    'moe': {
      'router': (d, e),
      'gate': (e, d, f),
      'up': (e, d, f),
      'down': (e, f, d),
    },
  }
  tree = {'embed': (config.vocab_size, d), 'final_norm': (d,)}
  for i in range(config.num_hidden_layers):
    tree[layer_name(i)] = layer
  if not config.tie_word_embeddings:
    tree['lm_head'] = (d, config.vocab_size)
  return tree


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_structs(config: OlmoeConfig, dtype=jnp.float32) -> dict:
  """`param_shapes` as jax.ShapeDtypeStruct leaves (for eval_shape, Orbax)."""
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, dtype), param_shapes(config), is_leaf=_is_shape
  )


def init_params(config: OlmoeConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters (normal, std 0.02; norm scales 1), as HF initializes."""
  shapes = param_shapes(config)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  paths = [
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]
  ]
  keys = jax.random.split(rng, len(leaves))
  out = []
  for path, shape, key in zip(paths, leaves, keys):
    if 'norm' in path:
      out.append(jnp.ones(shape, dtype))
    else:
      out.append((0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


def last_real_index(attention_mask: jax.Array) -> jax.Array:
  """[B, T] mask (right- or left-padded) -> [B] index of the last real token."""
  t = attention_mask.shape[1]
  return t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions that ignore padding: a padded row matches the unpadded one."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def moe_block(
  p: dict,
  h: jax.Array,
  config: OlmoeConfig,
  *,
  last_index: jax.Array,
  pathway: jax.Array | None,
  pathway_mode: str,
):
  """Sparse MoE on normed hidden states h [B, T, D].

  Returns (out [B, T, D], router logits [B, T, E], used probs [B, T, E]).
  """
  b, t, d = h.shape
  logits, probs = routing.router_probs(h, p['router'])
  if pathway is not None:
    probs = routing.override_last_token(probs, last_index, pathway)
  weights, indices = routing.top_k(
    probs, config.num_experts_per_tok, config.norm_topk_prob
  )  # [B, T, K]
  k = config.num_experts_per_tok
  out = moe_lib.moe_topk(
    h.reshape(b * t, d), weights.reshape(b * t, k), indices.reshape(b * t, k), p
  ).reshape(b, t, d)
  if pathway is not None and pathway_mode == 'dense':
    # The last token mixes every expert with non-zero weight, without top-k.
    coeff = routing.dense_coefficients(pathway, config.norm_topk_prob)  # [B, E]
    h_last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)[:, 0]  # [B, D]
    out_last = moe_lib.moe_dense(h_last, coeff, p)  # [B, D]
    is_last = routing.last_token_mask(last_index, t)[..., None]  # [B, T, 1]
    out = jnp.where(is_last, out_last[:, None, :], out)
  return out, logits, probs


def decoder_layer(
  p: dict,
  x: jax.Array,
  config: OlmoeConfig,
  *,
  positions: jax.Array,
  query_slots: jax.Array,
  key_valid: jax.Array,
  last_index: jax.Array,
  cache: LayerCache | None = None,
  pathway: jax.Array | None = None,
  pathway_mode: str = 'topk',
):
  """One pre-norm decoder layer.

  Args:
    p: this layer's parameters.
    x: [B, T, D] residual stream.
    positions: [B, T] RoPE positions.
    query_slots: [B, T] key slot of each token (its index in the sequence).
    key_valid: [B, S] which key slots may be attended (S = T without a cache).
    last_index: [B] index (into T) of each row's last real token.
    cache: keys/values of earlier slots; this call's keys are written at
      query_slots and attention runs over all S slots.
    pathway: [B, E] pathway for this layer, or None for native routing.
    pathway_mode: 'topk' or 'dense' (see module docstring).

  Returns:
    (x [B, T, D], router logits [B, T, E], probs [B, T, E], new cache or None).
  """
  h = layers.rms_norm(x, p['input_norm'], config.rms_norm_eps)
  q, k, v = layers.qkv(p['attn'], h, positions, config)
  if cache is None:
    keys, values = k, v
  else:
    # A scatter, not a one-hot matmul: exact at any matmul precision (TF32 and
    # bf16 passes would round the cached keys) and O(T) rather than O(T * S).
    # Slots outside [0, S) are dropped.
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    keys = cache.k.at[rows, query_slots].set(k.astype(cache.k.dtype), mode='drop')
    values = cache.v.at[rows, query_slots].set(v.astype(cache.v.dtype), mode='drop')
    cache = LayerCache(k=keys, v=values)
  attn = layers.attend(q, keys, values, query_slots, key_valid)
  x = x + attn @ p['attn']['o']
  h = layers.rms_norm(x, p['post_attn_norm'], config.rms_norm_eps)
  out, logits, probs = moe_block(
    p['moe'], h, config, last_index=last_index, pathway=pathway, pathway_mode=pathway_mode
  )
  return x + out, logits, probs, cache


def decoder_stack(
  params: Params,
  x: jax.Array,
  config: OlmoeConfig,
  *,
  layer_ids: Sequence[int],
  positions: jax.Array,
  query_slots: jax.Array,
  key_valid: jax.Array,
  last_index: jax.Array,
  caches: Sequence[LayerCache] | None = None,
  pathway: Pathway | None = None,
  pathway_mode: str = 'topk',
  layer: Callable = None,
):
  """The decoder-layer loop: the one that `forward`, `decode` and `prefix` all run.

  Args:
    params: model parameters.
    x: [B, T, D] residual stream entering the first layer of `layer_ids`.
    layer_ids: the layers to run, in order (a range of layer indices).
    positions, query_slots, key_valid, last_index: as in `decoder_layer`.
    caches: one LayerCache per entry of layer_ids, or None (no cache).
    pathway: {layer: [B, E]}; layers not in it keep native routing.
    pathway_mode: 'topk' or 'dense'.
    layer: the layer function, `decoder_layer` by default; `prefix` passes its
      window layer (same signature and outputs; it returns no routing).

  Returns:
    (x [B, T, D], new caches (a tuple, or None without caches), router logits
    [len(layer_ids), B, T, E] and probs, or None where `layer` returns none).
  """
  layer = layer or decoder_layer
  pathway = pathway or {}
  new_caches, all_logits, all_probs = [], [], []
  for j, i in enumerate(layer_ids):
    x, logits, probs, cache = layer(
      params[layer_name(i)],
      x,
      config,
      positions=positions,
      query_slots=query_slots,
      key_valid=key_valid,
      last_index=last_index,
      cache=None if caches is None else caches[j],
      pathway=pathway.get(i),
      pathway_mode=pathway_mode,
    )
    new_caches.append(cache)
    all_logits.append(logits)
    all_probs.append(probs)

  def stacked(xs):
    return jnp.stack(xs) if xs and xs[0] is not None else None

  caches_out = None if caches is None else tuple(new_caches)
  return x, caches_out, stacked(all_logits), stacked(all_probs)


def _check_pathway(pathway: Pathway | None, config: OlmoeConfig, mode: str):
  if mode not in PATHWAY_MODES:
    raise ValueError(f'pathway_mode={mode!r}, expected one of {PATHWAY_MODES}')
  for layer in pathway or {}:
    if not 0 <= int(layer) < config.num_hidden_layers:
      raise ValueError(f'pathway layer {layer} out of range [0, {config.num_hidden_layers})')


def forward_hidden(
  params: Params,
  tokens: jax.Array,
  *,
  config: OlmoeConfig,
  attention_mask: jax.Array | None = None,
  pathway: Pathway | None = None,
  pathway_mode: str = 'topk',
  pathway_index: jax.Array | None = None,
) -> HiddenOutput:
  """The decoder without the LM head. tokens int32 [B, T].

  `pathway_index` [B] moves the overridden token away from the last real one
  (e.g. to the last context token of a context+continuation sequence).
  """
  _check_pathway(pathway, config, pathway_mode)
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  key_valid = attention_mask.astype(bool)
  positions = positions_from_mask(attention_mask)
  last_index = last_real_index(attention_mask)
  override_index = last_index if pathway_index is None else pathway_index
  query_slots = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
  pathway = {int(k): v for k, v in (pathway or {}).items()}

  x = params['embed'][tokens]  # [B, T, D]
  x, _, all_logits, all_probs = decoder_stack(
    params,
    x,
    config,
    layer_ids=range(config.num_hidden_layers),
    positions=positions,
    query_slots=query_slots,
    key_valid=key_valid,
    last_index=override_index,
    pathway=pathway,
    pathway_mode=pathway_mode,
  )
  hidden = layers.rms_norm(x, params['final_norm'], config.rms_norm_eps)
  last_hidden = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
  return HiddenOutput(
    hidden=hidden,
    router_logits=all_logits,
    router_probs=all_probs,
    last_index=last_index,
    last_hidden=last_hidden,
  )


def lm_head(params: Params, hidden: jax.Array, config: OlmoeConfig) -> jax.Array:
  """[..., D] -> [..., V] float32 logits (tied or untied head)."""
  if config.tie_word_embeddings:
    w = params['embed'].T
  else:
    w = params['lm_head']
  return (hidden @ w.astype(hidden.dtype)).astype(jnp.float32)


def forward(
  params: Params,
  tokens: jax.Array,
  *,
  config: OlmoeConfig,
  attention_mask: jax.Array | None = None,
  pathway: Pathway | None = None,
  pathway_mode: str = 'topk',
  pathway_index: jax.Array | None = None,
) -> ForwardOutput:
  """Full model. tokens int32 [B, T] -> ForwardOutput (logits [B, T, V])."""
  out = forward_hidden(
    params,
    tokens,
    config=config,
    attention_mask=attention_mask,
    pathway=pathway,
    pathway_mode=pathway_mode,
    pathway_index=pathway_index,
  )
  return ForwardOutput(
    hidden=out.hidden,
    router_logits=out.router_logits,
    router_probs=out.router_probs,
    last_index=out.last_index,
    last_hidden=out.last_hidden,
    logits=lm_head(params, out.hidden, config),
  )
