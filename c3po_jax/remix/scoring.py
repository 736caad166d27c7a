"""Multiple-choice scoring: tokenized prompts -> fixed-shape batches -> scores.

Both prompt formats share one representation. A sample has S sequences
(S = 1 for "mc": the prompt, scored by the answer letter at its last token;
S = C for "rc": context + each continuation) and C choices, each scored by the
summed log-probability of its continuation tokens at given positions.

Dimensions: B samples, S sequences per sample, T tokens, C choices,
Tc continuation tokens per choice, D model, V vocab, L layers, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from c3po_jax.tasks.encoding import EncodedPrompt
from models import transformer
from models.config import MoeConfig

# Which context token of each sequence is re-mixed (the paper's Table 3).
POSITIONS = ('last', 'first', 'middle')

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n (fixed shapes: no recompilation inside a bucket)."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f'length {n} exceeds the largest bucket {buckets[-1]}')


@flax.struct.dataclass
class ChoiceBatch:
  tokens: jax.Array  # [B, S, T] int32
  mask: jax.Array  # [B, S, T] int32
  ctx_last: jax.Array  # [B, S] index of the last context token
  site: jax.Array  # [B, S] index of the re-mixed context token (pathway site)
  choice_seq: jax.Array  # [B, C] sequence that holds each choice
  cont_pos: jax.Array  # [B, C, Tc] positions whose next-token logits score it
  cont_ids: jax.Array  # [B, C, Tc] the continuation tokens
  cont_mask: jax.Array  # [B, C, Tc] float32
  choice_valid: jax.Array  # [B, C] bool
  gold: jax.Array  # [B] int32
  cont_chars: jax.Array  # [B, C] float32

  @property
  def size(self) -> int:
    return self.tokens.shape[0]


def pad_to(items: list, size: int) -> list:
  """items with the last one repeated up to size (a fixed batch shape)."""
  return items + [items[-1]] * (size - len(items))


def truncate_context(context: Sequence[int], max_len: int) -> tuple[int, ...]:
  """Keeps the end of an over-long context (the question is at the end)."""
  return tuple(context[-max_len:]) if len(context) > max_len else tuple(context)


def make_batch(
  prompts: Sequence[EncodedPrompt],
  *,
  batch_size: int | None = None,
  num_choices: int | None = None,
  max_len: int = 4096,
  position: str = 'last',
  count: int = 1,
) -> ChoiceBatch:
  """Pads prompts to bucketed shapes; rows past len(prompts) are empty.

  position: the context tokens whose routing is re-mixed: 'last' (the
  default and the paper's best), 'first' or 'middle' (centred on
  (n - 1) // 2 of an n-token context); count: how many (the paper's Table 3:
  1 or 3). `site` is [B, S] for one token, [B, S, U] for U = count > 1
  (indices clipped to the context, so a context shorter than U repeats one).
  """
  if not prompts:
    raise ValueError('make_batch needs at least one prompt')
  if position not in POSITIONS:
    raise ValueError(f'position {position!r}, expected one of {POSITIONS}')
  if count < 1:
    raise ValueError(f'count {count}, expected >= 1')
  start_of = {
    'last': lambda n: n - count,
    'first': lambda n: 0,
    'middle': lambda n: (n - 1) // 2 - (count - 1) // 2,
  }[position]

  def site_of(n: int):
    sites = np.clip(start_of(n) + np.arange(count), 0, n - 1)
    return sites[0] if count == 1 else sites

  fmt = prompts[0].fmt
  if any(p.fmt != fmt for p in prompts):
    raise ValueError('a batch mixes prompt formats')
  b = batch_size or len(prompts)
  c = num_choices or max(len(p.continuations) for p in prompts)
  if fmt == 'mc':
    s, tc = 1, 1
    for p in prompts:
      if any(len(x) != 1 for x in p.continuations):
        raise ValueError('mc continuations must be single tokens')
    seq_lens = [min(len(p.context), max_len) for p in prompts]
  else:
    s = c
    tc = bucket(max(len(x) for p in prompts for x in p.continuations), CONT_BUCKETS)
    seq_lens = [
      min(len(p.context_of(j)), max_len - len(x)) + len(x)
      for p in prompts
      for j, x in enumerate(p.continuations)
    ]
  t = bucket(max(seq_lens), TOKEN_BUCKETS)

  tokens = np.zeros((b, s, t), np.int32)
  mask = np.zeros((b, s, t), np.int32)
  ctx_last = np.zeros((b, s), np.int32)
  site = np.zeros((b, s) + ((count,) if count > 1 else ()), np.int32)
  choice_seq = np.zeros((b, c), np.int32)
  cont_pos = np.zeros((b, c, tc), np.int32)
  cont_ids = np.zeros((b, c, tc), np.int32)
  cont_mask = np.zeros((b, c, tc), np.float32)
  choice_valid = np.zeros((b, c), bool)
  gold = np.zeros((b,), np.int32)
  cont_chars = np.ones((b, c), np.float32)
  for i, p in enumerate(prompts):
    if len(p.continuations) > c:
      raise ValueError(f'prompt {i} has {len(p.continuations)} choices > {c}')
    gold[i] = p.gold
    n = len(p.continuations)
    choice_valid[i, :n] = True
    cont_chars[i, :n] = np.maximum(np.asarray(p.cont_chars, np.float32), 1.0)
    if fmt == 'mc':
      ctx = truncate_context(p.context, max_len)
      tokens[i, 0, : len(ctx)] = ctx
      mask[i, 0, : len(ctx)] = 1
      ctx_last[i, 0] = len(ctx) - 1
      site[i, 0] = site_of(len(ctx))
      cont_pos[i, :n, 0] = len(ctx) - 1
      cont_ids[i, :n, 0] = [x[0] for x in p.continuations]
      cont_mask[i, :n, 0] = 1.0
    else:
      for j, cont in enumerate(p.continuations):
        ctx = truncate_context(p.context_of(j), max_len - len(cont))
        seq = ctx + tuple(cont)
        tokens[i, j, : len(seq)] = seq
        mask[i, j, : len(seq)] = 1
        ctx_last[i, j] = len(ctx) - 1
        site[i, j] = site_of(len(ctx))
        choice_seq[i, j] = j
        m = len(cont)
        cont_pos[i, j, :m] = np.arange(len(ctx) - 1, len(ctx) - 1 + m)
        cont_ids[i, j, :m] = cont
        cont_mask[i, j, :m] = 1.0
  return ChoiceBatch(
    tokens=jnp.asarray(tokens),
    mask=jnp.asarray(mask),
    ctx_last=jnp.asarray(ctx_last),
    site=jnp.asarray(site),
    choice_seq=jnp.asarray(choice_seq),
    cont_pos=jnp.asarray(cont_pos),
    cont_ids=jnp.asarray(cont_ids),
    cont_mask=jnp.asarray(cont_mask),
    choice_valid=jnp.asarray(choice_valid),
    gold=jnp.asarray(gold),
    cont_chars=jnp.asarray(cont_chars),
  )


@flax.struct.dataclass
class Analysis:
  """What a plain or re-mixed pass over a ChoiceBatch yields."""

  scores: jax.Array  # [B, C] summed continuation log-probs (-inf: invalid)
  last_hidden: jax.Array  # [B, D] final hidden state at the last context token
  router_logits: jax.Array  # [B, L, E] at the last context token
  # [B, L, E] at the pathway site (last context token), as used; with U pathway
  # tokens the mean of their rows (the sample's pathway).
  router_probs: jax.Array
  # [B, S, L, E] at each sequence's pathway site (they differ where the
  # choices have their own contexts, e.g. WinoGrande), as used; [B, S, U, L, E]
  # with U pathway tokens.
  seq_router_probs: jax.Array


def _expand_pathway(pathway: transformer.Pathway | None, b: int, s: int):
  """Per-sample [B, E] or per-sequence [B, S, E] pathway -> per-sequence [B*S, E]."""
  if pathway is None:
    return None
  out = {}
  for k, v in pathway.items():
    # [B, S, E] or [B, S, U, E] (U pathway tokens): per sequence; [B, E]: per sample.
    out[k] = v.reshape((b * s,) + v.shape[2:]) if v.ndim >= 3 else jnp.repeat(v, s, axis=0)
  return out


def analyze(
  params: transformer.Params,
  batch: ChoiceBatch,
  *,
  config: MoeConfig,
  pathway: transformer.Pathway | None = None,
  pathway_mode: str = 'topk',
  prefix_embeds: jax.Array | None = None,
  kv_prefix: dict | None = None,
) -> Analysis:
  """Scores every choice; returns last-context-token states of sequence 0.

  `pathway` maps layer -> [B, E] (one pathway per sample, applied at the
  pathway site, by default the last context token, of each of its
  sequences) or [B, S, E] (one per sequence). `prefix_embeds` [B, P, D] and
  `kv_prefix` {layer: LayerCache [B, P, KV, Dh]}: a trained prompt per
  sample, in front of each of its sequences (see `transformer`).
  """
  b, s, t = batch.tokens.shape
  per_seq = lambda a: jnp.repeat(a, s, axis=0)  # [B, ...] -> [B*S, ...]
  if prefix_embeds is not None:
    prefix_embeds = per_seq(prefix_embeds)
  if kv_prefix is not None:
    kv_prefix = jax.tree.map(per_seq, kv_prefix)
  out = transformer.forward_hidden(
    params,
    batch.tokens.reshape(b * s, t),
    config=config,
    attention_mask=batch.mask.reshape(b * s, t),
    pathway=_expand_pathway(pathway, b, s),
    pathway_mode=pathway_mode,
    pathway_index=batch.site.reshape((b * s,) + batch.site.shape[2:]),
    prefix_embeds=prefix_embeds,
    kv_prefix=kv_prefix,
  )
  return analysis(params, config, batch, out.hidden, out.router_logits, out.router_probs)


def analysis(
  params: transformer.Params,
  config: MoeConfig,
  batch: ChoiceBatch,
  hidden: jax.Array,
  router_logits: jax.Array,
  router_probs: jax.Array,
) -> Analysis:
  """The Analysis of a pass: final-normed hidden [B*S, T, D], routing [L, B*S, T, E]."""
  b, s, t = batch.tokens.shape
  hidden = hidden.reshape(b, s, t, -1)  # [B, S, T, D]
  c, tc = batch.cont_pos.shape[1:]
  rows = jnp.arange(b)[:, None, None]
  seqs = jnp.broadcast_to(batch.choice_seq[:, :, None], (b, c, tc))
  h = hidden[rows, seqs, batch.cont_pos]  # [B, C, Tc, D]
  logp = jax.nn.log_softmax(transformer.lm_head(params, h, config), axis=-1)
  tok_logp = jnp.take_along_axis(logp, batch.cont_ids[..., None], axis=-1)[..., 0]
  scores = jnp.sum(tok_logp * batch.cont_mask, axis=-1)  # [B, C]
  scores = jnp.where(batch.choice_valid, scores, -jnp.inf)

  idx0 = batch.ctx_last[:, 0]  # [B]
  seq0 = jnp.arange(b) * s
  last_hidden = hidden[jnp.arange(b), 0, idx0]
  r_logits = router_logits[:, seq0, idx0]  # [L, B, E]
  flat_site = batch.site.reshape((b * s,) + batch.site.shape[2:])  # [B*S] or [B*S, U]
  rows = jnp.arange(b * s).reshape((b * s,) + (1,) * (flat_site.ndim - 1))
  seq_probs = router_probs[:, rows, flat_site]  # [L, B*S, (U,) E]
  seq_probs = jnp.moveaxis(seq_probs.reshape((-1, b, s) + seq_probs.shape[2:]), 0, -2)
  # [B, S, L, E], or [B, S, U, L, E] with U pathway tokens: the sample's routing is
  # their mean (its pathway), each token's own row its anchor (`engine._anchors`).
  sample_probs = seq_probs[:, 0] if flat_site.ndim == 1 else jnp.mean(seq_probs[:, 0], axis=1)
  return Analysis(
    scores=scores,
    last_hidden=last_hidden,
    router_logits=jnp.swapaxes(r_logits, 0, 1),
    router_probs=sample_probs,
    seq_router_probs=seq_probs,
  )


def choice_loss(scores: jax.Array, gold: jax.Array, valid: jax.Array, kind: str) -> jax.Array:
  """Per-sample loss [B] from choice scores [B, C].

  'choice_ce': cross-entropy of the softmax over the valid choices' scores.
  'gold_nll': negative log-likelihood of the gold continuation alone.
  """
  gold_score = jnp.take_along_axis(scores, gold[:, None], axis=-1)[:, 0]
  if kind == 'gold_nll':
    return -gold_score
  if kind == 'choice_ce':
    safe = jnp.where(valid, scores, -1e30)  # finite: keeps gradients NaN-free
    return jax.nn.logsumexp(safe, axis=-1) - gold_score
  raise ValueError(f'unknown loss {kind!r}')


def predictions(scores: np.ndarray, cont_chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(argmax of scores, argmax of scores per character) for each row."""
  return np.argmax(scores, axis=-1), np.argmax(scores / cont_chars, axis=-1)
