"""The NGD objective and its two backends: naive (full forwards) and prefix-cached.

The objective is the kernel-weighted mean of the neighbours' losses on their
gold answers, each neighbour run with the test sample's candidate pathway at
its last context token (`neighbour_pathway`, `weighted_loss`).

A loss backend has three parts: `prepare(params, config, ec, data)` turns a
neighbour ChoiceBatch [N, ...] into whatever the loss needs (run once per
sample, outside the optimization), each neighbour on its own and with N
first on every leaf; `make_scores(params, config, ec, mode)` returns
scores_fn(w, cs, prepared, anchors=None) -> choice scores [N, C]
(log-likelihoods) with the pathway injected in `mode`; and `make_loss(params,
config, ec, mode)` returns loss_fn(w, cs, prepared, weights, anchors=None).

* `NaiveLoss` (the reference): every call re-runs all neighbours' sequences.
* `PrefixLoss`: `prepare` keeps each sequence's prefix state
  (`models.prefix`) and each call runs only the window (mc: the last
  context token; rc: it and the continuation tokens) through the layers from
  the first critical one on, then only the logits that score a choice (mc
  with the choice loss: the C choice tokens' columns of the LM head). Equal
  to `NaiveLoss` up to rounding.

Dimensions: N neighbours, S sequences per neighbour, T tokens, U window
tokens, C choices, Tc continuation tokens per choice, Cl critical layers,
Kc core experts, E experts, D model.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from c3po_jax.remix import pathway as pw_lib
from c3po_jax.remix import scoring
from models import prefix, transformer
from models.config import MoeConfig


def neighbour_pathway(w, cs, spec, mode: str, anchors, n: int, s: int) -> dict:
  """The pathway each of N neighbours' S sequences gets: {layer: [N, S, E]}.

  Without anchors every sequence gets the test sample's rows (the neighbour
  runs with the test sample's candidate pathway, as the paper's NGD does);
  with anchors [N, S, Cl, E] each sequence keeps its own base rows plus the
  change (the oracle scoring the test sample itself; see `pathway`).
  """
  pathway = pw_lib.to_pathway(w, cs, spec, mode, anchors)
  # [E] (the same row at every pathway token) or anchored [.., S, (U,) E].
  tail = lambda v: v.shape[-2:] if anchors is not None and anchors.ndim == 5 else v.shape[-1:]
  return {k: jnp.broadcast_to(v, (n, s) + tail(v)) for k, v in pathway.items()}


def weighted_loss(scores_fn, loss_kind: str):
  """scores_fn(w, cs, data, anchors) -> [N, C]  =>  loss_fn(w, cs, data, weights [N], anchors)."""

  def loss_fn(w, cs, data, weights, anchors=None):
    scores = scores_fn(w, cs, data, anchors)
    per = scoring.choice_loss(scores, data.gold, data.choice_valid, loss_kind)  # [N]
    wt = weights.astype(jnp.float32)
    return jnp.sum(wt * per) / jnp.maximum(jnp.sum(wt), 1e-12)

  return loss_fn


class NaiveLoss:
  """Neighbour loss by full forward passes of every neighbour prompt (the reference)."""

  @staticmethod
  def prepare(params, config, ec, data: scoring.ChoiceBatch):
    del params, config, ec
    return data

  @staticmethod
  def make_scores(params, config: MoeConfig, ec, mode: str):
    def scores_fn(w, cs, data: scoring.ChoiceBatch, anchors=None):
      n, s = data.tokens.shape[:2]
      pathway = neighbour_pathway(w, cs, ec.spec, mode, anchors, n, s)
      an = scoring.analyze(params, data, config=config, pathway=pathway, pathway_mode=mode)
      return an.scores

    return scores_fn

  @classmethod
  def make_loss(cls, params, config: MoeConfig, ec, mode: str | None = None):
    scores_fn = cls.make_scores(params, config, ec, mode or ec.opt_pathway_mode)
    return weighted_loss(scores_fn, ec.loss)


@flax.struct.dataclass
class PrefixState:
  """N neighbours' prefix states and what scores their choices.

  Every leaf has the neighbour axis N first, so states of single references
  can be cached apart and stacked (see `fit` for matching their shapes).
  """

  window: prefix.PrefixWindow  # leaves [N, S, ...]
  choice_seq: jax.Array  # [N, C] sequence that holds each choice
  win_pos: jax.Array  # [N, C, Tc] window index whose logits score each token
  cont_ids: jax.Array  # [N, C, Tc]
  cont_mask: jax.Array  # [N, C, Tc] float32
  choice_valid: jax.Array  # [N, C] bool
  gold: jax.Array  # [N] int32

  @property
  def num_tokens(self) -> int:
    return self.window.num_tokens

  @property
  def window_size(self) -> int:
    return self.window.window


def _flat(a: jax.Array) -> jax.Array:
  """[N, S, ...] -> [N*S, ...]."""
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _state(win: prefix.PrefixWindow, data: scoring.ChoiceBatch) -> PrefixState:
  """Flat windows [N*S, ...] of data [N, S, ...] -> PrefixState [N, ...]."""
  n, s, _ = data.tokens.shape
  u = data.cont_pos.shape[-1]
  win_start = jnp.take_along_axis(data.ctx_last, data.choice_seq, axis=1)  # [N, C]
  win_pos = jnp.clip(data.cont_pos - win_start[..., None], 0, u - 1)
  return PrefixState(
    window=jax.tree.map(lambda a: a.reshape((n, s) + a.shape[1:]), win),
    choice_seq=data.choice_seq,
    win_pos=win_pos.astype(jnp.int32),
    cont_ids=data.cont_ids,
    cont_mask=data.cont_mask,
    choice_valid=data.choice_valid,
    gold=data.gold,
  )


def prepare_prefix(params, config: MoeConfig, first_layer: int, data: scoring.ChoiceBatch):
  """One pathway-free pass over N neighbours [N, S, T] -> PrefixState.

  Expects `scoring.make_batch` layouts: choice j's continuation is scored at
  positions ctx_last[choice_seq[j]] + (0, 1, ...).
  """
  u = data.cont_pos.shape[-1]  # window: mc 1, rc the continuation bucket
  win = prefix.prepare(
    params, config, first_layer, _flat(data.tokens), _flat(data.mask), _flat(data.ctx_last), u
  )
  return _state(win, data)


def analyze_and_prepare(params, config: MoeConfig, first_layer: int, data: scoring.ChoiceBatch):
  """The base pass over [B, S, T] that also keeps its prefix state: (Analysis, PrefixState).

  One native forward, as `scoring.analyze` runs it, split at the first
  critical layer c0: the residual entering c0 at each window and the keys
  and values of layers c0..L-1 (written to a cache as the layers run) are
  kept, as `prepare_prefix` keeps them. So a sample's base analysis yields
  what scoring it under any pathway needs (`PrefixLoss.make_scores`), and a
  reference's what its neighbour loss needs. Equal to both up to rounding.
  """
  u = data.cont_pos.shape[-1]
  hidden, logits, probs, win = prefix.forward_and_prepare(
    params,
    config,
    first_layer,
    _flat(data.tokens),
    _flat(data.mask),
    _flat(data.site),
    _flat(data.ctx_last),
    u,
  )
  an = scoring.analysis(params, config, data, hidden, logits, probs)
  return an, _state(win, data)


def window_scores(
  params, config: MoeConfig, hidden: jax.Array, st: PrefixState, *, logits_only: bool = False
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
  shared = st.window.x.shape[1] == 1 and st.window_size == 1  # one position: it cancels
  if logits_only and shared:
    h = hidden[rows, seqs, st.win_pos]  # [N, C, Tc, D]
    w = prefix.head_rows(params, config, st.cont_ids).astype(h.dtype)  # [N, C, Tc, D]
    tok = jnp.einsum('nctd,nctd->nct', h, w).astype(jnp.float32)
  else:
    # The LM head once per window position [N, S, U], not once per (choice,
    # token): mc choices all read the same position.
    logp = jax.nn.log_softmax(transformer.lm_head(params, hidden, config), axis=-1)
    tok = logp[rows, seqs, st.win_pos, st.cont_ids]  # [N, C, Tc]
  scores = jnp.sum(tok * st.cont_mask, axis=-1)
  return jnp.where(st.choice_valid, scores, -jnp.inf)


def fit(state: PrefixState, num_tokens: int, window: int) -> PrefixState:
  """Pads (or cuts) a state to T = num_tokens key slots and U = window (`prefix.fit`)."""

  def size(a):  # [N, C, Tc]: Tc <= U, padded tokens are masked out
    return prefix.resize(a, 2, window)

  return state.replace(
    window=prefix.fit(state.window, num_tokens, window),
    win_pos=size(state.win_pos),
    cont_ids=size(state.cont_ids),
    cont_mask=size(state.cont_mask),
  )


class PrefixLoss:
  """Loss backend on prefix-cached neighbour states (see the module docstring)."""

  @staticmethod
  def prepare(params, config: MoeConfig, ec, data: scoring.ChoiceBatch) -> PrefixState:
    return prepare_prefix(params, config, min(ec.spec.layers), data)

  @staticmethod
  def make_scores(params, config: MoeConfig, ec, mode: str, *, logits_only: bool = False):
    """scores_fn(w [Cl, Kc], cs, st: PrefixState [N, ...], anchors=None) -> scores [N, C]."""
    first = min(ec.spec.layers)

    def scores_fn(w, cs, st: PrefixState, anchors=None):
      n, s = st.window.x.shape[:2]
      pathway = neighbour_pathway(w, cs, ec.spec, mode, anchors, n, s)
      pathway = {k: _flat(v) for k, v in pathway.items()}  # [NS, E]
      win = jax.tree.map(_flat, st.window)
      hidden = prefix.window_forward(params, config, first, win, pathway, mode)  # [NS, U, D]
      hidden = hidden.reshape((n, s) + hidden.shape[1:])
      return window_scores(params, config, hidden, st, logits_only=logits_only)

    return scores_fn

  @classmethod
  def make_loss(cls, params, config: MoeConfig, ec, mode: str | None = None):
    # The choice loss compares choices only: logits of the choice tokens suffice.
    scores_fn = cls.make_scores(
      params, config, ec, mode or ec.opt_pathway_mode, logits_only=ec.loss == 'choice_ce'
    )
    return weighted_loss(scores_fn, ec.loss)

  fit = staticmethod(fit)


# Loss backends by name: 'prefix' recomputes only what the pathway changes.
BACKENDS = {'prefix': PrefixLoss, 'naive': NaiveLoss}
