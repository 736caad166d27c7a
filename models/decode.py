"""Prefill, KV-cache decoding and greedy generation with fixed shapes.

The cache has S slots per row. Slot s of a row holds the keys of the token at
index s of the (padded) prompt, then of each generated token in turn: a row's
next token goes to the slot after its last real token, so right-padded rows
overwrite their padding and left-padded rows append after the prompt. The RoPE
position of the next token is the number of real tokens so far, as in
`transformer.positions_from_mask`, so a padded row decodes like the unpadded one.

Shapes are fixed: prompts are right-padded to a bucket length (`pad_batch`),
the cache holds prompt + new tokens, and generation is a `lax.scan`, so every
prompt in one bucket reuses one compiled program.

Dimensions: B batch, T prompt tokens, S cache slots, N new tokens, D model,
V vocab, L layers, E experts, KV key/value heads, Dh head dim.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import params as params_lib
from models import transformer
from models.config import MoeConfig

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@flax.struct.dataclass
class Cache:
  """Decoding state of a batch."""

  layers: tuple[transformer.LayerCache, ...]  # L entries, k and v [B, S, KV, Dh]
  key_valid: jax.Array  # [B, S] bool, True where a slot holds a real token's keys
  next_slot: jax.Array  # [B] int32, slot the next token's keys go to
  num_tokens: jax.Array  # [B] int32, real tokens so far: the next RoPE position

  @property
  def size(self) -> int:
    return self.key_valid.shape[1]


def prefill(
  params: transformer.Params,
  tokens: jax.Array,
  *,
  config: MoeConfig,
  attention_mask: jax.Array | None = None,
  cache_size: int,
  pathway: transformer.Pathway | None = None,
  pathway_mode: str = 'topk',
) -> tuple[jax.Array, Cache, transformer.HiddenOutput]:
  """Runs the prompt and fills a cache of `cache_size` slots.

  Args:
    params: model parameters.
    tokens: int32 [B, T] prompts, right- or left-padded (real tokens contiguous).
    config: model config.
    attention_mask: [B, T], 1 for real tokens; None means no padding.
    cache_size: S >= T; slots for the prompt plus every token to be decoded.
    pathway: layer -> [B, E] weights overriding the last real prompt token's
      routing, as in `transformer.forward`.
    pathway_mode: 'topk' or 'dense', as in `transformer.forward`.

  Returns:
    (logits [B, V] float32 at each row's last real token, the cache, the
    HiddenOutput of the prompt: hidden states, router logits and probs).
  """
  transformer._check_pathway(pathway, config, pathway_mode)
  b, t = tokens.shape
  if cache_size < t:
    raise ValueError(f'cache_size={cache_size} is smaller than the prompt length {t}')
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  key_valid = attention_mask.astype(bool)
  last_index = transformer.last_real_index(attention_mask)
  model = params_lib.bind(params, config)
  x = model.embed(tokens)  # [B, T, D]
  # A T-slot cache, padded to S afterwards: prompt attention runs over T keys only.
  empty = transformer.LayerCache.empty(config, b, t, x.dtype)
  x, caches, router_logits, router_probs = transformer.decoder_stack(
    model,
    x,
    layer_ids=range(config.num_hidden_layers),
    positions=transformer.positions_from_mask(attention_mask),
    query_slots=jnp.broadcast_to(jnp.arange(t)[None, :], (b, t)),
    key_valid=key_valid,
    last_index=last_index,
    caches=[empty] * config.num_hidden_layers,
    pathway={int(k): v for k, v in (pathway or {}).items()},
    pathway_mode=pathway_mode,
  )
  grow = ((0, 0), (0, cache_size - t), (0, 0), (0, 0))
  caches = tuple(transformer.LayerCache(k=jnp.pad(c.k, grow), v=jnp.pad(c.v, grow)) for c in caches)
  hidden = model.final_norm(x)
  last_hidden = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
  cache = Cache(
    layers=caches,
    key_valid=jnp.pad(key_valid, ((0, 0), (0, cache_size - t))),
    next_slot=(last_index + 1).astype(jnp.int32),
    num_tokens=jnp.sum(attention_mask.astype(jnp.int32), axis=1),
  )
  info = transformer.HiddenOutput(
    hidden=hidden,
    router_logits=router_logits,
    router_probs=router_probs,
    last_index=last_index,
    last_hidden=last_hidden,
  )
  return model.logits(last_hidden), cache, info


def decode_step(
  params: transformer.Params, cache: Cache, token: jax.Array, *, config: MoeConfig
) -> tuple[jax.Array, Cache]:
  """Feeds one token per row: token int32 [B] -> (logits [B, V] float32, cache).

  Routing is native here: a pathway only ever overrides the last prompt token
  (in `prefill`). The public C3PO code, under transformers' KV cache, also
  applied its override to every generated token, because each decode step's
  single position is "the last position"; we deliberately don't.

  The caller keeps `cache.next_slot < cache.size`; keys written past the end
  are dropped and the step is then wrong.
  """
  b = token.shape[0]
  slot = cache.next_slot  # [B]
  key_valid = cache.key_valid | (jnp.arange(cache.size)[None, :] == slot[:, None])
  model = params_lib.bind(params, config)
  x, caches, _, _ = transformer.decoder_stack(
    model,
    model.embed(token)[:, None, :],  # [B, 1, D]
    layer_ids=range(config.num_hidden_layers),
    positions=cache.num_tokens[:, None],
    query_slots=slot[:, None],
    key_valid=key_valid,
    last_index=jnp.zeros((b,), jnp.int32),
    caches=cache.layers,
    pathway={},
    pathway_mode='topk',
  )
  hidden = model.final_norm(x[:, 0])  # [B, D]
  cache = Cache(
    layers=caches, key_valid=key_valid, next_slot=slot + 1, num_tokens=cache.num_tokens + 1
  )
  return model.logits(hidden), cache


@functools.partial(
  jax.jit,
  static_argnames=('config', 'max_new_tokens', 'pathway_mode'),
)
def generate(
  params: transformer.Params,
  tokens: jax.Array,
  *,
  config: MoeConfig,
  attention_mask: jax.Array | None = None,
  max_new_tokens: int,
  eos_token_id: int | None = None,
  pad_token_id: int | None = None,
  pathway: transformer.Pathway | None = None,
  pathway_mode: str = 'topk',
) -> tuple[jax.Array, jax.Array]:
  """Greedy decoding of a padded batch, jitted with fixed shapes.

  Args:
    params: model parameters.
    tokens: int32 [B, T] prompts (see `pad_batch`), right- or left-padded.
    config: model config (static).
    attention_mask: [B, T], 1 for real tokens; None means no padding.
    max_new_tokens: N, tokens generated per row (static).
    eos_token_id: a row stops after emitting it; None never stops. Traced, so
      every id shares one compilation.
    pad_token_id: emitted after eos; defaults to config.pad_token_id, else 0.
    pathway: applied to the last prompt token only (see `decode_step`).
    pathway_mode: 'topk' or 'dense' (static).

  Returns:
    (tokens int32 [B, N], lengths int32 [B]): lengths count the tokens up to
    and including eos; later positions hold pad_token_id.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if pad_token_id is None:
    pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
  # -1 matches no token: a row never stops.
  eos_token_id = -1 if eos_token_id is None else eos_token_id
  b, t = tokens.shape
  # The last token generated is never fed back, hence N - 1 extra slots.
  logits, cache, _ = prefill(
    params,
    tokens,
    config=config,
    attention_mask=attention_mask,
    cache_size=t + max_new_tokens - 1,
    pathway=pathway,
    pathway_mode=pathway_mode,
  )

  def pick(logits, done):
    token = jnp.where(done, pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return token, done | (token == eos_token_id)

  def step(carry, _):
    cache, token, done = carry
    logits, cache = decode_step(params, cache, token, config=config)
    new_token, new_done = pick(logits, done)
    return (cache, new_token, new_done), (new_token, done)

  first, done = pick(logits, jnp.zeros((b,), bool))
  _, (rest, rest_done) = jax.lax.scan(
    step, (cache, first, done), None, length=max_new_tokens - 1
  )  # [N - 1, B] each
  out = jnp.concatenate([first[:, None], rest.T], axis=1)  # [B, N]
  # A position is emitted for real when its row was not done before it.
  lengths = 1 + jnp.sum(~rest_done, axis=0).astype(jnp.int32)
  return out, lengths


def bucket_length(n: int, buckets: Sequence[int] = BUCKETS) -> int:
  """The smallest bucket >= n."""
  for size in sorted(buckets):
    if size >= n:
      return size
  raise ValueError(f'length {n} exceeds the largest bucket {max(buckets)}')


def pad_batch(
  prompts: Sequence[Sequence[int]],
  *,
  pad_token_id: int,
  buckets: Sequence[int] = BUCKETS,
  batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to one bucket length.

  Args:
    prompts: non-empty token-id lists.
    pad_token_id: id written into padding.
    buckets: allowed lengths; the batch takes the smallest that fits all.
    batch_size: if given, appends all-padding rows up to this many rows, so
      the batch dimension is fixed too (their outputs are meaningless).

  Returns:
    (tokens int32 [B, T], attention_mask int32 [B, T]) as numpy arrays.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('pad_batch needs at least one prompt and no empty prompt')
  rows = len(prompts) if batch_size is None else batch_size
  if rows < len(prompts):
    raise ValueError(f'{len(prompts)} prompts do not fit batch_size={batch_size}')
  t = bucket_length(max(len(p) for p in prompts), buckets)
  tokens = np.full((rows, t), pad_token_id, np.int32)
  mask = np.zeros((rows, t), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
    mask[i, : len(p)] = 1
  return tokens, mask
