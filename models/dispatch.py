"""Sparse mixture-of-experts feed-forward: SwiGLU experts stacked on axis E.

Four numerically equivalent dispatch strategies:

* `moe_dense`: every expert runs on every token, outputs weighted by a dense
  [N, E] combine matrix: E/K times the sparse FLOPs. Used for the pathway's
  dense mode and as reference.
* `moe_gather`: gathers each assignment's expert weights ([N, K, D, F] per
  matrix). The weight copies cost far more than the matmuls, even for one
  token; kept as a second reference.
* `moe_sorted`: groups the N*K assignments by expert into fixed-size blocks
  (a counting sort: no argsort), then loops over the blocks, each one matmul
  with its expert's weights, read in place. Fixed shapes and no ragged ops,
  so it works under `vmap` and `grad`; FLOPs are within one block's padding
  per expert of the sparse optimum.

* `ragged.moe_ragged`: sorts the assignments by expert and runs each SwiGLU
  matmul as one `jax.lax.ragged_dot` over the expert groups (grouped GEMM on
  GPU/TPU); a custom batching rule folds a `vmap`ped axis into the tokens.

`moe_topk` is what the model calls; `MoeConfig.dispatch` picks the
implementation ('auto': `resolve`). On CPU the block-sorted scan measured
fastest from one token to thousands, at or above transformers' grouped-matmul
experts, and `ragged_dot` is several times slower on CPU (`python -m
benchmarks.forward_throughput --dispatch=ragged`; docs/speed.md),
so 'auto' is 'sorted' there and 'ragged' on GPU and TPU, where `ragged_dot`
is a native grouped matmul and the scan's per-block loop would serialize.

The experts are SwiGLU by default; the weights dict may add per-expert
biases and gpt-oss's clamped gate (`models.glu`), which every strategy applies.

Dimensions: N tokens (flattened batch), D model, F expert hidden, E experts,
K experts per token, A = N*K assignments, S rows per block, G blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import fold, ragged, routing
from models.config import DISPATCHES
from models.glu import bias as _bias
from models.glu import glu


def _swiglu(x: jax.Array, moe: dict, e) -> jax.Array:
  """Expert e: x [..., D] -> [..., D] (gate/up [D, F], down [F, D], optional biases)."""
  h = glu(
    x @ moe['gate'][e] + _bias(moe, 'gate_bias', e),
    x @ moe['up'][e] + _bias(moe, 'up_bias', e),
    moe,
  )
  return h @ moe['down'][e] + _bias(moe, 'down_bias', e)


def expert_outputs(x: jax.Array, moe: dict) -> jax.Array:
  """Every expert on every token: [N, D] -> [N, E, D]."""
  every = slice(None)
  gate = jnp.einsum('nd,edf->nef', x, moe['gate']) + _bias(moe, 'gate_bias', every)
  up = jnp.einsum('nd,edf->nef', x, moe['up']) + _bias(moe, 'up_bias', every)
  h = glu(gate, up, moe)  # [N, E, F]
  return jnp.einsum('nef,efd->ned', h, moe['down']) + _bias(moe, 'down_bias', every)


def moe_dense(x: jax.Array, combine: jax.Array, moe: dict) -> jax.Array:
  """x [N, D], combine [N, E] float32 -> [N, D]."""
  y = expert_outputs(x, moe)  # [N, E, D]
  return jnp.einsum('ned,ne->nd', y.astype(jnp.float32), combine).astype(x.dtype)


def moe_gather(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict):
  """x [N, D], weights/indices [N, K] -> [N, D]; gathers [N, K, D, F] weights."""
  gate = moe['gate'][indices]  # [N, K, D, F]
  up = moe['up'][indices]
  down = moe['down'][indices]  # [N, K, F, D]
  h = glu(
    jnp.einsum('nd,nkdf->nkf', x, gate) + _bias(moe, 'gate_bias', indices),
    jnp.einsum('nd,nkdf->nkf', x, up) + _bias(moe, 'up_bias', indices),
    moe,
  )
  y = jnp.einsum('nkf,nkfd->nkd', h, down) + _bias(moe, 'down_bias', indices)  # [N, K, D]
  return jnp.einsum('nkd,nk->nd', y.astype(jnp.float32), weights).astype(x.dtype)


def _block_size(num_assignments: int, num_experts: int) -> int:
  """Rows per block S: a power of two near sqrt(8 * mean rows per expert).

  Padding costs up to S rows per expert (E*S in all) and every block a fixed
  loop overhead of a few rows' worth (c*A/S), so the total is least near
  S = sqrt(c * A / E). On CPU at the `bench` shapes, S from 16 to 32 at 128
  rows per expert, 8 to 16 at 16, and 1 to 4 at 1 measured alike; this picks
  32, 8 and 2. Clamped to [1, 64].
  """
  target = (8 * num_assignments / num_experts) ** 0.5
  size = 1
  while size < 64 and size * 1.5 < target:
    size *= 2
  return size


def _num_blocks(num_assignments: int, num_experts: int, block_size: int) -> int:
  """Blocks for the worst case: each non-empty expert wastes < one block."""
  used_experts = min(num_experts, num_assignments)
  return -(-(num_assignments + used_experts * (block_size - 1)) // block_size)


def _block_layout(indices: jax.Array, num_experts: int, block_size: int):
  """Where each assignment goes when grouped by expert into blocks.

  Args:
    indices: [N, K] int32 expert of each assignment.

  Returns:
    (row [A] slot of assignment n*K + k in the [G*S] blocked buffer,
     block_end [E] cumulative number of blocks of experts 0..e).
  """
  n, k = indices.shape
  one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [N, K, E]
  per_token = jnp.sum(one_hot, axis=1)  # [N, E]
  # associative_scan: jnp.cumsum lowers to a slow reduce_window on CPU.
  before = jax.lax.associative_scan(jnp.add, per_token, axis=0) - per_token  # [N, E]
  # Earlier slots of the same token with the same expert (none for top-k
  # indices, counted anyway so any indices are safe).
  same = indices[:, :, None] == indices[:, None, :]  # [N, K, K]
  earlier = jnp.sum(jnp.tril(same, -1), axis=2)  # [N, K]
  rank = jnp.take_along_axis(before, indices, axis=1) + earlier  # [N, K] rank within expert
  counts = jnp.sum(per_token, axis=0)  # [E]
  blocks = (counts + block_size - 1) // block_size
  block_end = jnp.cumsum(blocks)
  row = (block_end - blocks)[indices] * block_size + rank  # [N, K]
  return row.reshape(n * k), block_end


def moe_sorted(
  x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict, *, block_size: int | None = None
):
  """Block-sorted dispatch. x [N, D], weights/indices [N, K] -> [N, D].

  block_size: rows per block S (default `_block_size`); any S >= 1 is exact.
  """
  n, k = indices.shape
  e = moe['gate'].shape[0]
  a = n * k
  s = block_size or _block_size(a, e)
  g = _num_blocks(a, e, s)
  row, block_end = _block_layout(indices, e, s)

  # Slot -> token and slot -> mixing weight; empty slots point at a zero row
  # (index N) with weight 0, so they add nothing.
  token = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)  # [A]
  slot_token = jnp.full((g * s,), n, jnp.int32).at[row].set(token).reshape(g, s)
  slot_weight = jnp.zeros((g * s,), jnp.float32).at[row].set(weights.reshape(a)).reshape(g, s)
  x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])  # [N+1, D]
  # Blocks past the last used one get expert E-1; they hold only empty slots.
  block_expert = jnp.searchsorted(block_end, jnp.arange(g), side='right')  # [G]
  block_expert = jnp.minimum(block_expert, e - 1)

  # Under grad, slicing one expert's weights is recomputed in the backward
  # pass instead of being saved per block, which would write the [G, D, F]
  # copies this loop exists to avoid.
  @functools.partial(
    jax.checkpoint, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  )
  def expert_block(xg, expert):  # [S, D], [] -> [S, D]
    return _swiglu(xg, moe, expert)

  def run_block(out, args):
    tokens, w, expert = args  # [S], [S], []
    y = expert_block(x_pad[tokens], expert)  # [S, D]
    return out.at[tokens].add(y.astype(jnp.float32) * w[:, None]), None

  # A loop, not a batched einsum: indexing one expert's weights per block
  # reads them in place (gathering [G, D, F] copies costs more than the
  # matmuls on CPU), and each block's rows are gathered and its weighted
  # outputs accumulated in place, so no [G*S, D] buffer is ever written.
  # No `cond` to skip the trailing empty blocks: under vmap it becomes a
  # select over every operand, the expert weights included.
  out = jnp.zeros((n + 1, x.shape[1]), jnp.float32)
  out, _ = jax.lax.scan(run_block, out, (slot_token, slot_weight, block_expert))
  return out[:n].astype(x.dtype)


def resolve(impl: str) -> str:
  """'auto' -> 'sorted' on CPU, 'ragged' on GPU/TPU (the default backend at trace time)."""
  if impl not in DISPATCHES:
    raise ValueError(f'dispatch={impl!r}, expected one of {DISPATCHES}')
  if impl == 'auto':
    return 'sorted' if jax.default_backend() == 'cpu' else 'ragged'
  return impl


moe_sorted_folding = fold.token_wise(moe_sorted)


def moe_few(x: jax.Array, weights: jax.Array, indices: jax.Array, moe: dict) -> jax.Array:
  """Top-k MoE for the pathway window: x [N, D], weights/indices [N, K] -> [N, D].

  With at most E assignments every expert runs on every token, mixed by the
  top-k weights (`mix_all_experts`: each expert's weights read once, no
  per-block loop); with more, the block-sorted scan. Under `moe_window`'s
  vmap the choice is made at the folded size (all samples' window tokens).
  """
  n, k = indices.shape
  e = moe['gate'].shape[0]
  if n * k <= e:
    return mix_all_experts(moe, x, routing.combine_weights(weights, indices, e))
  return moe_sorted(x, weights, indices, moe)


# The pathway window's dispatch: vmapped over samples (NGD, the oracle, the
# final scoring), it runs once on every sample's window tokens together.
_moe_window = fold.token_wise(moe_few)


def moe_window(x, weights, indices, moe: dict, impl: str = 'auto') -> jax.Array:
  """The window dispatch on [N, D] tokens: `moe_few` folded (CPU), `ragged` on GPU/TPU."""
  if resolve(impl) == 'ragged':
    return ragged.moe_ragged(x, weights, indices, moe)
  return _moe_window(x, weights, indices, moe)


def moe_topk(
  x: jax.Array,
  weights: jax.Array,
  indices: jax.Array,
  moe: dict,
  impl: str = 'auto',
  fold_vmap: bool = False,
):
  """Top-k MoE on [N, D] tokens with the `impl` dispatch (see `resolve`).

  fold_vmap: a `vmap` of the sorted dispatch runs once on the batch folded
  into the tokens (`fold`), instead of per sample with batched weight
  slices; for calls vmapped over samples (the pathway window, NGD). Its
  backward recomputes the forward, so plain training leaves it off.
  `ragged` always folds (it has no other vmap rule).
  """
  if resolve(impl) == 'ragged':
    return ragged.moe_ragged(x, weights, indices, moe)
  if fold_vmap:
    return moe_sorted_folding(x, weights, indices, moe)
  return moe_sorted(x, weights, indices, moe)


def mix_all_experts(moe: dict, x: jax.Array, combine: jax.Array) -> jax.Array:
  """`moe_dense` as expert-batched matmuls: x [B, D], combine [B, E] -> [B, D].

  Each expert's weights are one operand of a batched matmul over E, read as
  stored; `moe_dense`'s einsums make XLA re-lay them out on every call.
  """
  dims = (((2,), (1,)), ((0,), (0,)))  # contract D (then F), batch over E
  xe = jnp.broadcast_to(x[None], (moe['gate'].shape[0],) + x.shape)  # [E, B, D]
  every = (slice(None), None)  # biases [E, 1, F] / [E, 1, D] against [E, B, .]
  gate = jax.lax.dot_general(xe, moe['gate'].astype(x.dtype), dims)  # [E, B, F]
  up = jax.lax.dot_general(xe, moe['up'].astype(x.dtype), dims)
  a = glu(gate + _bias(moe, 'gate_bias', every), up + _bias(moe, 'up_bias', every), moe)
  a = (a.astype(jnp.float32) * combine.T[..., None]).astype(x.dtype)  # [E, B, F]
  y = jax.lax.dot_general(a, moe['down'].astype(x.dtype), dims)  # [E, B, D]
  y = y.astype(jnp.float32) + combine.T[..., None] * _bias(moe, 'down_bias', every)
  return jnp.sum(y, axis=0).astype(x.dtype)
