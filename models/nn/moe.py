"""The MoE feed-forward as modules: router, routed experts, shared experts, the block.

`MoeBlock.__call__` is the MoE layer of a full pass (sparse dispatch for every
token, the pathway's override at each row's last real token); `MoeBlock.window`
the same on a few window tokens per sequence (the prefix-cached NGD step),
where mixing every expert is cheaper than dispatch.

Pathway semantics (the public C3PO code's): a pathway [B, E] replaces the
router-probability row of one token per sequence by the weights renormalized
to sum to 1; top-k (and, where the family renormalizes, renormalization) runs
on the replaced row (`pathway_mode='topk'`). With `pathway_mode='dense'` that
token instead mixes every expert with non-zero weight, the weights being the
mixing coefficients as given (renormalized only where the family renormalizes
its top-k). Shared experts are never re-mixed: they run on every token, the
re-mixed one included.

Dimensions: B batch, T tokens, U window tokens, N = B*T tokens, D model,
F expert hidden, Fs shared hidden, E experts, K top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import dispatch, expert_choice, routing
from models.config import MoeConfig
from models.nn.layers import normal_param


class Router(nnx.Module):
  """kernel [D, E]: router logits, then float32 probabilities (`expert_choice`).

  With `score_correction_bias`, also correction_bias [E]: added to the
  scores when experts are selected, never to their weights.
  """

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.kernel = normal_param(rngs, (config.hidden_size, config.num_experts), dtype)
    if config.score_correction_bias:
      self.correction_bias = nnx.Param(jnp.zeros((config.num_experts,), jnp.float32))
    if config.router_bias:  # gpt-oss: part of the logits
      self.logit_bias = nnx.Param(jnp.zeros((config.num_experts,), dtype))

  def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [B, T, D] -> (logits [B, T, E], probs [B, T, E]), both float32."""
    logit_bias = self.logit_bias[...] if self.config.router_bias else None
    logits, probs = routing.router_probs(h, self.kernel[...], logit_bias)
    if self.config.scoring_func != 'softmax':
      probs = expert_choice.probabilities(logits, self.config)
    return logits, probs

  def bias(self) -> jax.Array | None:
    return self.correction_bias[...] if self.config.score_correction_bias else None


class MLP(nnx.Module):
  """A SwiGLU MLP: gate/up [D, F], down [F, D] (dense layers, shared experts)."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.gate = normal_param(rngs, (width, hidden), dtype)
    self.up = normal_param(rngs, (width, hidden), dtype)
    self.down = normal_param(rngs, (hidden, width), dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Experts(nnx.Module):
  """Routed SwiGLU experts stacked on a leading axis: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    e, d, f = config.num_experts, config.hidden_size, config.expert_intermediate_size
    self.config = config
    self.dispatch = config.dispatch
    self.gate = normal_param(rngs, (e, d, f), dtype)
    self.up = normal_param(rngs, (e, d, f), dtype)
    self.down = normal_param(rngs, (e, f, d), dtype)
    if config.expert_bias:  # gpt-oss: gate_bias, up_bias [E, F], down_bias [E, D]
      self.gate_bias = nnx.Param(jnp.zeros((e, f), dtype))
      self.up_bias = nnx.Param(jnp.zeros((e, f), dtype))
      self.down_bias = nnx.Param(jnp.zeros((e, d), dtype))

  def weights(self) -> dict:
    """The dispatch's weights dict (`models.glu`: biases and the clamped gate when configured)."""
    c = self.config
    w = {'gate': self.gate[...], 'up': self.up[...], 'down': self.down[...]}
    if c.expert_bias:
      w.update(gate_bias=self.gate_bias[...], up_bias=self.up_bias[...])
      w['down_bias'] = self.down_bias[...]
    if c.swiglu_limit is not None:
      w['glu_clamp'] = jnp.array([c.swiglu_alpha, c.swiglu_limit], jnp.float32)
    return w

  def __call__(
    self, x: jax.Array, weights: jax.Array, indices: jax.Array, fold_vmap: bool = False
  ) -> jax.Array:
    """Sparse dispatch: x [N, D], top-k weights/indices [N, K] -> [N, D] (`dispatch.moe_topk`)."""
    return dispatch.moe_topk(x, weights, indices, self.weights(), self.dispatch, fold_vmap)

  def mix(self, x: jax.Array, combine: jax.Array) -> jax.Array:
    """Every expert on every row, mixed densely: x [N, D], combine [N, E] -> [N, D]."""
    return dispatch.mix_all_experts(self.weights(), x, combine)


class MoeBlock(nnx.Module):
  """Router + routed experts (+ shared experts, optionally sigmoid-gated)."""

  def __init__(self, config: MoeConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.router = Router(config, rngs=rngs, dtype=dtype)
    self.experts = Experts(config, rngs=rngs, dtype=dtype)
    if config.num_shared_experts:
      self.shared = MLP(config.hidden_size, config.shared_intermediate_size, rngs=rngs, dtype=dtype)
    if config.shared_expert_gate:
      self.shared_gate = normal_param(rngs, (config.hidden_size, 1), dtype)

  def _add_shared(self, h: jax.Array, out: jax.Array) -> jax.Array:
    """out + the shared experts on h (both [..., D]); Qwen2-MoE gates them by a sigmoid."""
    if not self.config.num_shared_experts:
      return out
    shared = self.shared(h)
    if self.config.shared_expert_gate:
      shared = jax.nn.sigmoid(h @ self.shared_gate[...]) * shared  # [..., 1] gate
    return out + shared

  def _route(self, h: jax.Array, index: jax.Array, pathway: jax.Array | None):
    """h [B, T, D] -> (logits, probs [B, T, E], weights, indices [B, T, K], mass [B, 1]).

    The pathway replaces token index [B]'s row (`expert_choice.override`);
    mass is that token's affinity mass (dense-mode coefficients need it).
    """
    c = self.config
    logits, probs = self.router(h)
    scores = expert_choice.scores(logits, probs, c)
    mass = expert_choice.mass(expert_choice.at(scores, index), c)  # [B, 1]
    if pathway is not None:
      scores, probs = expert_choice.override(scores, probs, index, pathway, c)
    weights, indices = expert_choice.choose(scores, self.router.bias(), c)  # [B, T, K]
    return logits, probs, weights, indices, mass

  def __call__(
    self,
    h: jax.Array,
    *,
    last_index: jax.Array,
    pathway: jax.Array | None = None,
    pathway_mode: str = 'topk',
  ):
    """Normed hidden states h [B, T, D] -> (out [B, T, D], logits, used probs [B, T, E])."""
    b, t, d = h.shape
    logits, probs, weights, indices, mass = self._route(h, last_index, pathway)
    k = weights.shape[-1]
    flat = (h.reshape(b * t, d), weights.reshape(b * t, k), indices.reshape(b * t, k))
    # With a pathway the call is C3PO's, usually vmapped over test samples.
    out = self.experts(*flat, fold_vmap=pathway is not None).reshape(b, t, d)
    if pathway is not None and pathway_mode == 'dense':
      # The pathway tokens mix every expert with non-zero weight, without top-k.
      sites = last_index[:, None] if last_index.ndim == 1 else last_index  # [B, U]
      u = sites.shape[1]
      coeff = expert_choice.dense_coefficients(pathway, mass, self.config)  # [B, (U,) E]
      coeff = jnp.broadcast_to(coeff.reshape(b, -1, coeff.shape[-1]), (b, u, coeff.shape[-1]))
      h_sites = jnp.take_along_axis(h, sites[:, :, None], axis=1)  # [B, U, D]
      out_sites = dispatch.moe_dense(
        h_sites.reshape(b * u, d), coeff.reshape(b * u, -1), self.experts.weights()
      ).reshape(b, u, d)
      out = routing.place_rows(out, sites, out_sites)
    return self._add_shared(h, out), logits, probs

  def window(self, h: jax.Array, pathway: jax.Array | None, pathway_mode: str) -> jax.Array:
    """The block on window tokens h [B, U, D]; the pathway token is index 0.

    The routed experts run through `dispatch.moe_window`: under the vmap
    over test samples that every C3PO caller applies, all samples' window
    tokens go through one dispatch (each expert's weights read in place,
    only the top-k experts computed); unbatched, a few tokens mix every
    expert. In dense mode the pathway token mixes every expert with its
    pathway row (zero off the core).
    """
    b, u, d = h.shape
    _, _, weights, indices, mass = self._route(h, jnp.zeros((b,), jnp.int32), pathway)
    k = weights.shape[-1]
    experts = self.experts.weights()

    def routed(x, w, i):  # [B, V, D], [B, V, K] x 2 -> [B, V, D]
      v = x.shape[1]
      flat = (x.reshape(b * v, d), w.reshape(-1, k), i.reshape(-1, k))
      return dispatch.moe_window(*flat, experts, self.config.dispatch).reshape(b, v, d)

    if pathway is None or pathway_mode != 'dense':
      out = routed(h, weights, indices)
    else:  # the pathway token mixes its row; the others (rc continuations) are routed
      dense_row = expert_choice.dense_coefficients(pathway, mass, self.config)  # [B, E]
      out = self.experts.mix(h[:, 0], dense_row)[:, None]  # [B, 1, D]
      if u > 1:
        rest = routed(h[:, 1:], weights[:, 1:], indices[:, 1:])
        out = jnp.concatenate([out, rest], axis=1)
    return self._add_shared(h, out)
