"""The routed experts' gated unit and biases, shared by every dispatch strategy.

An expert's weights dict holds gate/up [E, D, F] and down [E, F, D]; it may
add per-expert biases ('gate_bias', 'up_bias' [E, F], 'down_bias' [E, D])
and gpt-oss's clamped gate ('glu_clamp' = (alpha, limit), float32 [2]).
Absent keys mean plain SwiGLU without biases (every family but gpt-oss).

Dimensions: E experts, F expert hidden, D model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def glu(gate: jax.Array, up: jax.Array, moe: dict) -> jax.Array:
  """The gated unit on pre-activations [..., F]: silu(gate) * up.

  With 'glu_clamp' (gpt-oss): gate clamped above and up on both sides at the
  limit, then gate * sigmoid(alpha * gate) * (up + 1), as transformers'
  `GptOssExperts._apply_gate`.
  """
  if 'glu_clamp' not in moe:
    return jax.nn.silu(gate) * up
  alpha, limit = (moe['glu_clamp'][i].astype(gate.dtype) for i in (0, 1))
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return gate * jax.nn.sigmoid(gate * alpha) * (up + 1)


def bias(moe: dict, name: str, index) -> jax.Array | float:
  """Expert bias `name` ('gate_bias', 'up_bias', 'down_bias') at `index` (an index into E), or 0."""
  return moe[name][index] if name in moe else 0.0
