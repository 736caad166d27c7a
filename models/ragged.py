"""Grouped-matmul expert dispatch: sort assignments by expert, `jax.lax.ragged_dot`.

The accelerator path of `dispatch.moe_topk`. The N*K assignments are sorted
by expert (argsort), so each expert's rows are one contiguous group, and each
of the three SwiGLU matmuls is one `ragged_dot` over the groups: exactly the
sparse FLOPs, no padding, no per-block loop, the expert weights read in place.
On GPU and TPU XLA runs it as grouped GEMM kernels; on CPU it is correct but
slow (`dispatch.py` says by how much).

`ragged_dot` has no `vmap` rule in jax 0.10 ("vmap over any dim but 0 -
NYI"); `fold.token_wise` gives `moe_ragged` one that folds a vmapped batch
into the token axis (one sort and one grouped matmul for the whole batch),
under `grad` too.

Dimensions: B vmapped batch, N tokens, D model, F expert hidden, E experts,
K experts per token, A = N*K assignments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models import fold
from models.glu import glu


def _forward(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict) -> jax.Array:
  """The unbatched dispatch: x [N, D], weights/indices [N, K] -> [N, D]."""
  n, k = indices.shape
  e = moe['gate'].shape[0]
  flat = indices.reshape(n * k)  # [A]
  order = jnp.argsort(flat, stable=True)  # [A] assignments grouped by expert
  token = order // k  # [A] the token of each sorted assignment
  group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)  # [E]
  xs = x[token]  # [A, D]
  expert = flat[order]  # [A] the expert of each sorted assignment (for biases)
  bias = lambda name: moe[name][expert] if name in moe else 0.0  # [A, F] or [A, D]
  gate = jax.lax.ragged_dot(xs, moe['gate'], group_sizes) + bias('gate_bias')  # [A, F]
  up = jax.lax.ragged_dot(xs, moe['up'], group_sizes) + bias('up_bias')
  h = glu(gate, up, moe)
  ys = jax.lax.ragged_dot(h, moe['down'], group_sizes) + bias('down_bias')  # [A, D]
  w = weights.reshape(n * k)[order].astype(jnp.float32)  # [A]
  out = jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(ys.astype(jnp.float32) * w[:, None])
  return out.astype(x.dtype)


moe_ragged = fold.token_wise(_forward)
