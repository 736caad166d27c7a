"""Token-wise expert dispatch under `vmap`: fold the vmapped axis into the tokens.

A top-k MoE is token-wise, so vmapping it over a batch of token sets is the
same as running it once on the batch flattened into the token axis. Left to
itself, `vmap` batches the dispatch's data-dependent parts instead: the
block-sorted scan (`dispatch.moe_sorted`) then slices each block's expert
weights with a batched index, a gather of [B, D, F] weight copies per block
and the most expensive op of the vmapped NGD step; `ragged_dot` has no vmap
rule at all in jax 0.10. `token_wise(forward)` wraps an unbatched dispatch
`forward(x [N, D], weights [N, K], indices [N, K], moe) -> [N, D]` so that a
vmap of it (at any nesting) folds the batch into N: one sort and one pass
over the experts for the whole batch, each expert's weights read in place.

A `custom_vmap` function has no reverse-mode autodiff, so the wrapper is a
`custom_vjp` whose forward and backward are each a folding function; jax
batches a custom_vjp's rules, so `vmap(grad(...))` and `grad(vmap(...))` both
fold. The backward recomputes the forward (its `jax.vjp`) rather than saving
residuals across the custom_vmap boundary. Under vmap the expert weights'
cotangent is per sample (that is what vmap means); it is computed one sample
at a time (`lax.map`), and XLA drops it when only the pathway's gradient is
used (C3PO: params closed over). A batch of *models* (moe batched) cannot be
folded and runs one sample at a time.

Dimensions: B vmapped batch, N tokens, D model, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import custom_batching

Dispatch = Callable[[jax.Array, jax.Array, jax.Array, dict], jax.Array]


def _fold(batched, args, axis_size):
  """Broadcasts the token-level args to the batch, then folds it into N: [B*N, ...]."""
  out = []
  for arg, is_batched in zip(args, batched):
    if not is_batched:
      arg = jnp.broadcast_to(arg, (axis_size,) + arg.shape)
    out.append(arg.reshape((-1,) + arg.shape[2:]))
  return out


def _moe_batched(in_batched) -> bool:
  return any(jax.tree.leaves(in_batched[3]))


def _per_sample(fn, axis_size, in_batched, args):
  """fn one sample at a time (`lax.map`): the batch axis cannot be folded."""
  args = [
    jax.tree.map(lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + a.shape), arg, bat)
    for arg, bat in zip(args, in_batched)
  ]
  return jax.lax.map(lambda a: fn(*a), tuple(args))


def token_wise(forward: Dispatch) -> Dispatch:
  """`forward` as a custom_vjp whose vmap folds the batch into the tokens."""

  def backward(x, weights, indices, moe, g):
    """Cotangents (x, weights, moe) of `forward` for the output cotangent g [N, D]."""
    _, vjp = jax.vjp(lambda x, w, m: forward(x, w, indices, m), x, weights, moe)
    return vjp(g)

  @custom_batching.custom_vmap
  def forward_folding(x, weights, indices, moe):
    return forward(x, weights, indices, moe)

  @forward_folding.def_vmap
  def _forward_rule(axis_size, in_batched, x, weights, indices, moe):
    if _moe_batched(in_batched):  # a batch of models: nothing to share
      return _per_sample(forward_folding, axis_size, in_batched, (x, weights, indices, moe)), True
    n = x.shape[-2]
    xf, wf, idf = _fold(in_batched[:3], (x, weights, indices), axis_size)
    out = forward_folding(xf, wf, idf, moe)  # [B*N, D]; nested vmaps fold again
    return out.reshape((axis_size, n) + out.shape[1:]), True

  @custom_batching.custom_vmap
  def backward_folding(x, weights, indices, moe, g):
    return backward(x, weights, indices, moe, g)

  @backward_folding.def_vmap
  def _backward_rule(axis_size, in_batched, x, weights, indices, moe, g):
    args = (x, weights, indices, moe, g)
    if _moe_batched(in_batched):
      out = _per_sample(backward_folding, axis_size, in_batched, args)
      return out, jax.tree.map(lambda _: True, out)
    n = x.shape[-2]
    xf, wf, idf, gf = _fold(in_batched[:3] + in_batched[4:], (x, weights, indices, g), axis_size)
    dx, dw, _ = backward_folding(xf, wf, idf, moe, gf)
    unfold = lambda a: a.reshape((axis_size, n) + a.shape[1:])
    # The weights' cotangent per sample: one sample at a time; dead code (and
    # dropped by XLA) unless the caller asks for per-sample weight gradients.
    dmoe = _per_sample(lambda *a: backward(*a)[2], axis_size, in_batched, args)
    return (unfold(dx), unfold(dw), dmoe), (True, True, jax.tree.map(lambda _: True, dmoe))

  @jax.custom_vjp
  def dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict) -> jax.Array:
    return forward_folding(x, weights, indices, moe)

  def vjp_fwd(x, weights, indices, moe):
    return forward_folding(x, weights, indices, moe), (x, weights, indices, moe)

  def vjp_bwd(res, g):
    x, weights, indices, moe = res
    dx, dw, dmoe = backward_folding(x, weights, indices, moe, g)
    return dx, dw, None, dmoe

  dispatch.defvjp(vjp_fwd, vjp_bwd)
  dispatch.__doc__ = f'{forward.__name__}, folding a vmapped batch into the tokens (`fold`).'
  return dispatch
