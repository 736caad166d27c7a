"""Rotary embeddings with scaling (YaRN) and the interleaved pair layout.

`frequencies` turns a config's RoPE settings into the inverse frequencies and
the cos/sin scale (YaRN's attention factor) as transformers'
`ROPE_INIT_FUNCTIONS` compute them; `apply` rotates. Plain RoPE on the
rotate-half layout stays `layers.rope` (every family before DeepSeek-V2).

Dimensions: B batch, T tokens, N heads, R rotated dims (R/2 frequencies).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ConfigError


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def frequencies(
  dim: int, theta: float, scaling: dict, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
  """(inverse frequencies [R/2] float32, cos/sin scale) of RoPE over `dim` dims.

  scaling: {} (plain RoPE) or HF's rope_parameters of rope_type 'yarn':
  frequencies blend interpolation (divided by `factor`) and extrapolation
  along a linear ramp between the dims that rotate beta_fast and beta_slow
  times over the original context; the scale is mscale(factor, mscale) /
  mscale(factor, mscale_all_dim), or `attention_factor` when given.
  """
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  pos_freqs = np.float32(theta) ** exponents  # [R/2]
  rope_type = scaling.get('rope_type', 'default')
  if rope_type == 'default':
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  if rope_type != 'yarn':
    raise ConfigError(f'rope_type={rope_type!r} is not supported (default or yarn)')
  original = scaling['original_max_position_embeddings']
  factor = scaling.get('factor') or max_position_embeddings / original
  factor = float(factor)
  attention_factor = scaling.get('attention_factor')
  if attention_factor is None:
    mscale, mscale_all = scaling.get('mscale'), scaling.get('mscale_all_dim')
    if mscale and mscale_all:
      attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    else:
      attention_factor = yarn_mscale(factor)
  beta_fast = scaling.get('beta_fast') or 32
  beta_slow = scaling.get('beta_slow') or 1

  def correction_dim(rotations):  # the dim that turns `rotations` times over `original`
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # a zero-width ramp would divide by zero
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = (1 - ramp).astype(np.float32)  # 1: keep the original frequency
  inv_extra = 1.0 / pos_freqs
  inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
  inv_freq = inv_inter * (1 - extrapolate) + inv_extra * extrapolate
  return inv_freq.astype(np.float32), float(attention_factor)


def softmax_scale(head_dim: int, scaling: dict) -> float:
  """DeepSeek's attention scale: head_dim**-0.5, times mscale(factor, mscale_all_dim)**2 under YaRN."""
  scale = head_dim**-0.5
  if scaling.get('rope_type', 'default') != 'default' and scaling.get('mscale_all_dim'):
    scale *= yarn_mscale(scaling['factor'], scaling['mscale_all_dim']) ** 2
  return scale


def apply(
  x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float, interleave: bool
) -> jax.Array:
  """Rotates x [B, T, N, R] at positions [B, T]; cos and sin are multiplied by `scale`.

  interleave: pairs (x0, x1), (x2, x3), .. share a frequency (DeepSeek's
  layout); the result is written as [rotated evens, rotated odds], a fixed
  permutation of the rotated dims that queries and keys share, so their dot
  products are those of the interleaved layout. Otherwise rotate-half.
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
  cos = (jnp.cos(freqs) * scale).astype(x.dtype)[:, :, None, :]  # [B, T, 1, R/2]
  sin = (jnp.sin(freqs) * scale).astype(x.dtype)[:, :, None, :]
  if interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
