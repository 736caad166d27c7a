"""The MoE decoder as a pure function of an explicit parameter pytree.

`forward(params, tokens, *, config, attention_mask=None, pathway=None)` is the
whole model. Params are a plain nested dict (see `models.params`); the
function binds them to the `flax.nnx` modules of `models.nn` inside the
trace, so `jax.jit`, `jax.grad` with respect to the pathway and `jax.vmap`
over samples apply with no NNX transform. The routing pathway is an explicit
input: `pathway` maps a MoE layer's index to weights [B, E] that replace the
router probabilities of each sequence's last real token (see `models.nn.moe`
for both modes). Every other token and layer keeps native routing; dense
layers (DeepSeekMoE's first, Qwen's `mlp_only_layers`) take no pathway.

Trained prompts (the soft-prompt and prefix-tuning baselines) are explicit
inputs too. `prefix_embeds` [B, P, D]: P free embeddings placed before the
token embeddings (a soft prompt): they take positions 0 .. P-1 and key slots
before the tokens, every token attends to them, and the outputs are the
tokens' alone (hidden [B, T, D], last_index into T). `kv_prefix` {layer:
LayerCache with k, v [B, P, KV, Dh]}: P free key/value slots before slot 0
in the listed layers (prefix tuning), attended by every token; the tokens'
RoPE positions start at P, as after a P-token prompt (so a prefix holding a
prompt's keys and values, in every layer, is that prompt). Absent, or P = 0,
either reproduces the plain forward exactly.

Dimensions: B batch, T tokens, S cache slots, D model, V vocab, L layers,
E experts, K top-k, F expert hidden, H heads, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from models import params as params_lib
from models.config import MoeConfig
from models.nn.decoder import LayerCache as LayerCache
from models.nn.decoder import Transformer
from models.params import Params as Params
from models.params import init_params as init_params
from models.params import layer_name as layer_name
from models.params import param_shapes as param_shapes
from models.params import param_structs as param_structs

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


def last_real_index(attention_mask: jax.Array) -> jax.Array:
  """[B, T] mask (right- or left-padded) -> [B] index of the last real token."""
  t = attention_mask.shape[1]
  return t - 1 - jnp.argmax(attention_mask[:, ::-1].astype(jnp.int32), axis=1)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions that ignore padding: a padded row matches the unpadded one."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def decoder_stack(
  model: Transformer,
  x: jax.Array,
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
  kv_prefix: Mapping[int, LayerCache] | None = None,
):
  """The decoder-layer loop: the one that `forward`, `decode` and `prefix` all run.

  Args:
    model: the bound model (`models.params.bind`).
    x: [B, T, D] residual stream entering the first layer of `layer_ids`.
    layer_ids: the layers to run, in order (a range of layer indices).
    positions, query_slots, key_valid, last_index: as in `DecoderLayer`.
    caches: one LayerCache per entry of layer_ids, or None (no cache).
    pathway: {layer: [B, E]}; layers not in it keep native routing.
    pathway_mode: 'topk' or 'dense'.
    layer: called as layer(module, x, **same keywords) instead of the module
      itself; `prefix` passes its window layer (same outputs; no routing).
    kv_prefix: {layer: LayerCache [B, P, KV, Dh]}, prefix tuning's key/value
      slots (see `DecoderLayer`); passed only to the layers listed.

  Returns:
    (x [B, T, D], new caches (a tuple, or None without caches), router logits
    [len(layer_ids), B, T, E] and probs, or None where `layer` returns none).
  """
  pathway, kv_prefix = pathway or {}, kv_prefix or {}
  new_caches, all_logits, all_probs = [], [], []
  for j, i in enumerate(layer_ids):
    extra = {'kv_prefix': kv_prefix[i]} if i in kv_prefix else {}
    module = model.layer(i)
    run = module if layer is None else (lambda *a, _m=module, **kw: layer(_m, *a, **kw))
    x, logits, probs, cache = run(
      x,
      positions=positions,
      query_slots=query_slots,
      key_valid=key_valid,
      last_index=last_index,
      cache=None if caches is None else caches[j],
      pathway=pathway.get(i),
      pathway_mode=pathway_mode,
      **extra,
    )
    new_caches.append(cache)
    all_logits.append(logits)
    all_probs.append(probs)

  def stacked(xs):
    return jnp.stack(xs) if xs and xs[0] is not None else None

  caches_out = None if caches is None else tuple(new_caches)
  return x, caches_out, stacked(all_logits), stacked(all_probs)


def _check_pathway(pathway: Pathway | None, config: MoeConfig, mode: str):
  if mode not in PATHWAY_MODES:
    raise ValueError(f'pathway_mode={mode!r}, expected one of {PATHWAY_MODES}')
  for layer in pathway or {}:
    if not 0 <= int(layer) < config.num_hidden_layers:
      raise ValueError(f'pathway layer {layer} out of range [0, {config.num_hidden_layers})')
    if not config.is_moe_layer(int(layer)):
      raise ValueError(
        f'pathway layer {layer} is a dense layer (no router); MoE layers: {config.moe_layers}'
      )


def forward_hidden(
  params: Params,
  tokens: jax.Array,
  *,
  config: MoeConfig,
  attention_mask: jax.Array | None = None,
  pathway: Pathway | None = None,
  pathway_mode: str = 'topk',
  pathway_index: jax.Array | None = None,
  prefix_embeds: jax.Array | None = None,
  kv_prefix: Mapping[int, LayerCache] | None = None,
) -> HiddenOutput:
  """The decoder without the LM head. tokens int32 [B, T].

  `pathway_index` [B] moves the overridden token away from the last real one
  (e.g. to the last context token of a context+continuation sequence).
  `prefix_embeds` [B, P, D] and `kv_prefix` {layer: LayerCache [B, P, KV, Dh]}
  are trained prompts (see the module docstring); every output and index is
  the tokens' own (T positions).
  """
  model = params_lib.bind(params, config)
  return _hidden(
    model, tokens, attention_mask, pathway, pathway_mode, pathway_index, prefix_embeds, kv_prefix
  )


def _hidden(
  model: Transformer,
  tokens,
  attention_mask,
  pathway,
  pathway_mode,
  pathway_index,
  prefix_embeds,
  kv_prefix,
) -> HiddenOutput:
  """`forward_hidden` on the bound model."""
  config = model.config
  _check_pathway(pathway, config, pathway_mode)
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  x = model.embed(tokens)  # [B, T, D]
  p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
  if p:  # a soft prompt: P embeddings in front, on real slots and positions
    x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)  # [B, P+T, D]
    attention_mask = jnp.concatenate([jnp.ones((b, p), attention_mask.dtype), attention_mask], 1)
    pathway_index = None if pathway_index is None else pathway_index + p
  kv_prefix = {int(k): v for k, v in (kv_prefix or {}).items()}
  for layer in kv_prefix:
    if not 0 <= layer < config.num_hidden_layers:
      raise ValueError(f'kv_prefix layer {layer} out of range [0, {config.num_hidden_layers})')
  kv_len = {v.k.shape[1] for v in kv_prefix.values()}
  if len(kv_len) > 1:
    raise ValueError(f'kv_prefix layers differ in length: {sorted(kv_len)}')
  key_valid = attention_mask.astype(bool)
  # Tokens after a key/value prefix of P slots sit at positions P.. (as after a P-token prompt).
  positions = positions_from_mask(attention_mask) + (kv_len.pop() if kv_len else 0)
  last_index = last_real_index(attention_mask)
  override_index = last_index if pathway_index is None else pathway_index
  query_slots = jnp.broadcast_to(jnp.arange(p + t)[None, :], (b, p + t))
  pathway = {int(k): v for k, v in (pathway or {}).items()}

  x, _, all_logits, all_probs = decoder_stack(
    model,
    x,
    layer_ids=range(config.num_hidden_layers),
    positions=positions,
    query_slots=query_slots,
    key_valid=key_valid,
    last_index=override_index,
    pathway=pathway,
    pathway_mode=pathway_mode,
    kv_prefix=kv_prefix,
  )
  # The soft prompt's positions out: [B, P+T, ...] -> the tokens' [B, T, ...].
  hidden = model.final_norm(x[:, p:])
  last_index = last_index - p
  last_hidden = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
  return HiddenOutput(
    hidden=hidden,
    router_logits=all_logits[:, :, p:],
    router_probs=all_probs[:, :, p:],
    last_index=last_index,
    last_hidden=last_hidden,
  )


def lm_head(params: Params, hidden: jax.Array, config: MoeConfig) -> jax.Array:
  """[..., D] -> [..., V] float32 logits (tied or untied head)."""
  return params_lib.bind(params, config).logits(hidden)


def forward(
  params: Params,
  tokens: jax.Array,
  *,
  config: MoeConfig,
  attention_mask: jax.Array | None = None,
  pathway: Pathway | None = None,
  pathway_mode: str = 'topk',
  pathway_index: jax.Array | None = None,
  prefix_embeds: jax.Array | None = None,
  kv_prefix: Mapping[int, LayerCache] | None = None,
) -> ForwardOutput:
  """Full model. tokens int32 [B, T] -> ForwardOutput (logits [B, T, V])."""
  model = params_lib.bind(params, config)
  out = _hidden(
    model, tokens, attention_mask, pathway, pathway_mode, pathway_index, prefix_embeds, kv_prefix
  )
  return ForwardOutput(
    hidden=out.hidden,
    router_logits=out.router_logits,
    router_probs=out.router_probs,
    last_index=out.last_index,
    last_hidden=out.last_hidden,
    logits=model.logits(out.hidden),
  )
