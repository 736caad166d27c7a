"""Grouped-matmul expert dispatch: sort assignments by expert, `jax.lax.ragged_dot`.

The accelerator path of `dispatch.moe_topk`. The N*K assignments are sorted
by expert (argsort), so each expert's rows are one contiguous group, and each
of the three SwiGLU matmuls is one `ragged_dot` over the groups: exactly the
sparse FLOPs, no padding, no per-block loop, the expert weights read in place.
On GPU and TPU XLA runs it as grouped GEMM kernels; on CPU it is correct but
slow (`dispatch.py` says by how much).

`ragged_dot` has no `vmap` rule in jax 0.10 ("vmap over any dim but 0 -
NYI"). A top-k MoE is token-wise, so vmapping it is the same as running it
on the batch flattened into the token axis: `moe_ragged` carries that as a
custom batching rule (`jax.custom_batching.custom_vmap`), the batch axis
folded into N, one sort and one grouped matmul for the whole batch. A
custom_vmap function has no reverse-mode autodiff, so `moe_ragged` is a
`custom_vjp` whose forward and backward are each such a folding function;
jax batches a custom_vjp's rules, so `vmap(grad(...))` and `grad(vmap(...))`
both fold. Under vmap the expert weights' cotangent is per sample (that is
what vmap means); it is computed one sample at a time (`lax.map`), and XLA
drops it when only the pathway's gradient is used (C3PO: params closed over).

Dimensions: B vmapped batch, N tokens, D model, F expert hidden, E experts,
K experts per token, A = N*K assignments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import custom_batching


def _forward(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict) -> jax.Array:
  """The unbatched dispatch: x [N, D], weights/indices [N, K] -> [N, D]."""
  n, k = indices.shape
  e = moe['gate'].shape[0]
  flat = indices.reshape(n * k)  # [A]
  order = jnp.argsort(flat, stable=True)  # [A] assignments grouped by expert
  token = order // k  # [A] the token of each sorted assignment
  group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E]
  xs = x[token]  # [A, D]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, moe['gate'], group_sizes))  # [A, F]
  h = h * jax.lax.ragged_dot(xs, moe['up'], group_sizes)
  ys = jax.lax.ragged_dot(h, moe['down'], group_sizes)  # [A, D]
  w = weights.reshape(n * k)[order].astype(jnp.float32)  # [A]
  out = jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(ys.astype(jnp.float32) * w[:, None])
  return out.astype(x.dtype)


def _backward(x, weights, indices, moe, g):
  """Cotangents (x, weights, moe) of `_forward` for the output cotangent g [N, D]."""
  _, vjp = jax.vjp(lambda x, w, m: _forward(x, w, indices, m), x, weights, moe)
  return vjp(g)


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


@custom_batching.custom_vmap
def _forward_folding(x, weights, indices, moe):
  return _forward(x, weights, indices, moe)


@_forward_folding.def_vmap
def _forward_rule(axis_size, in_batched, x, weights, indices, moe):
  if _moe_batched(in_batched):  # a batch of models: nothing to share
    return _per_sample(_forward_folding, axis_size, in_batched, (x, weights, indices, moe)), True
  n = x.shape[-2]
  xf, wf, idf = _fold(in_batched[:3], (x, weights, indices), axis_size)
  out = _forward_folding(xf, wf, idf, moe)  # [B*N, D]; nested vmaps fold again
  return out.reshape((axis_size, n) + out.shape[1:]), True


@custom_batching.custom_vmap
def _backward_folding(x, weights, indices, moe, g):
  return _backward(x, weights, indices, moe, g)


@_backward_folding.def_vmap
def _backward_rule(axis_size, in_batched, x, weights, indices, moe, g):
  args = (x, weights, indices, moe, g)
  if _moe_batched(in_batched):
    out = _per_sample(_backward_folding, axis_size, in_batched, args)
    return out, jax.tree.map(lambda _: True, out)
  n = x.shape[-2]
  xf, wf, idf, gf = _fold(in_batched[:3] + in_batched[4:], (x, weights, indices, g), axis_size)
  dx, dw, _ = _backward_folding(xf, wf, idf, moe, gf)
  unfold = lambda a: a.reshape((axis_size, n) + a.shape[1:])
  # The weights' cotangent per sample: one sample at a time; dead code (and
  # dropped by XLA) unless the caller asks for per-sample weight gradients.
  dmoe = _per_sample(lambda *a: _backward(*a)[2], axis_size, in_batched, args)
  return (unfold(dx), unfold(dw), dmoe), (True, True, jax.tree.map(lambda _: True, dmoe))


@jax.custom_vjp
def moe_ragged(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict) -> jax.Array:
  """Grouped-matmul dispatch: x [N, D], weights/indices [N, K] -> [N, D]."""
  return _forward_folding(x, weights, indices, moe)


def _vjp_fwd(x, weights, indices, moe):
  return _forward_folding(x, weights, indices, moe), (x, weights, indices, moe)


def _vjp_bwd(res, g):
  x, weights, indices, moe = res
  dx, dw, dmoe = _backward_folding(x, weights, indices, moe, g)
  return dx, dw, None, dmoe


moe_ragged.defvjp(_vjp_fwd, _vjp_bwd)
