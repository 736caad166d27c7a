"""Sparse mixture-of-experts feed-forward: SwiGLU experts stacked on axis E.

Three numerically equivalent dispatch strategies, chosen statically from the
number of token-expert assignments:

* `moe_dense`: every expert runs on every token, outputs weighted by a dense
  [N, E] combine matrix. Used for the pathway's dense mode and as reference.
* `moe_gather`: gathers each assignment's expert weights. For a handful of
  tokens (decode steps, a single last token).
* `moe_sorted`: sorts the N*K assignments by expert into fixed-size blocks,
  runs one matmul per block with that block's expert weights, and scatters the
  weighted rows back. Fixed shapes, no ragged ops, so it works under `vmap`
  and `grad`; FLOPs are within a block's padding of the sparse optimum.

Dimensions: N tokens (flattened batch), D model, F expert hidden, E experts,
K experts per token, S rows per block, G blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expert_outputs(x: jax.Array, moe: dict) -> jax.Array:
  """Every expert on every token: [N, D] -> [N, E, D]."""
  h = jax.nn.silu(jnp.einsum('nd,edf->nef', x, moe['gate']))
  h = h * jnp.einsum('nd,edf->nef', x, moe['up'])  # [N, E, F]
  return jnp.einsum('nef,efd->ned', h, moe['down'])


def moe_dense(x: jax.Array, combine: jax.Array, moe: dict) -> jax.Array:
  """x [N, D], combine [N, E] float32 -> [N, D]."""
  y = expert_outputs(x, moe)  # [N, E, D]
  return jnp.einsum('ned,ne->nd', y.astype(jnp.float32), combine).astype(x.dtype)


def moe_gather(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict):
  """x [N, D], weights/indices [N, K] -> [N, D]; gathers [N, K, D, F] weights."""
  gate = moe['gate'][indices]  # [N, K, D, F]
  up = moe['up'][indices]
  down = moe['down'][indices]  # [N, K, F, D]
  h = jax.nn.silu(jnp.einsum('nd,nkdf->nkf', x, gate))
  h = h * jnp.einsum('nd,nkdf->nkf', x, up)
  y = jnp.einsum('nkf,nkfd->nkd', h, down)  # [N, K, D]
  return jnp.einsum('nkd,nk->nd', y.astype(jnp.float32), weights).astype(x.dtype)


def _block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block: about half the mean rows per expert, in [8, 128]."""
  mean = max(1, num_assignments // num_experts)
  size = 8
  while size * 2 <= min(128, max(8, mean // 2)):
    size *= 2
  return size


def moe_sorted(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict):
  """Block-sorted dispatch. x [N, D], weights/indices [N, K] -> [N, D]."""
  n, k = indices.shape
  e = moe['gate'].shape[0]
  a = n * k  # assignments
  s = _block_size(a, e)
  # Worst case every expert's group wastes s - 1 rows of padding.
  g = -(-(a + e * (s - 1)) // s)

  flat_e = indices.reshape(a)
  flat_t = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
  order = jnp.argsort(flat_e, stable=True)
  sorted_e = flat_e[order]
  sorted_t = flat_t[order]
  sorted_w = weights.reshape(a)[order]

  counts = jnp.bincount(flat_e, length=e)  # [E]
  padded = (counts + s - 1) // s * s
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  start = jnp.cumsum(counts) - counts
  row = padded_start[sorted_e] + jnp.arange(a) - start[sorted_e]  # [A]

  buf = jnp.zeros((g * s, x.shape[-1]), x.dtype).at[row].set(x[sorted_t])
  block_expert = jnp.searchsorted(padded_end, jnp.arange(g) * s, side='right')
  block_expert = jnp.minimum(block_expert, e - 1)  # trailing empty blocks
  xb = buf.reshape(g, s, -1)  # [G, S, D]
  h = jax.nn.silu(jnp.einsum('gsd,gdf->gsf', xb, moe['gate'][block_expert]))
  h = h * jnp.einsum('gsd,gdf->gsf', xb, moe['up'][block_expert])
  y = jnp.einsum('gsf,gfd->gsd', h, moe['down'][block_expert])
  y = y.reshape(g * s, -1)[row].astype(jnp.float32) * sorted_w[:, None]
  out = jnp.zeros((n, x.shape[-1]), jnp.float32).at[sorted_t].add(y)
  return out.astype(x.dtype)


def moe_topk(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict):
  """Top-k MoE on [N, D] tokens with the cheapest exact dispatch for N."""
  n, k = indices.shape
  e = moe['gate'].shape[0]
  if n * k <= e:
    return moe_gather(x, weights, indices, moe)
  return moe_sorted(x, weights, indices, moe)
