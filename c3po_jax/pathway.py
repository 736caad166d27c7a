"""The efficient pathway: critical layers x core experts of the last token.

A test sample's base routing at its last context token is `base` [L, E]. Only
the critical layers (default: the last 5) and, in each, the core experts (the
test sample's own top-n before optimization) are re-mixed. On the core experts
every method works with a distribution `q` [C, Kc] (each row sums to 1); the
full pathway puts `q * m` on the core experts, m being the base probability
mass of the core, and keeps the router's values everywhere else, so the row
still sums to 1 and q = base-core renormalized reproduces the base routing.

Dimensions: L layers, C critical layers, E experts, Kc core experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

# Floor for log-probabilities of core experts: keeps logits finite when the
# router gives an expert (numerically) zero probability.
_MIN_PROB = 1e-12


@dataclasses.dataclass(frozen=True)
class PathwaySpec:
  """Which slice of the routing is re-mixed (static under jit)."""

  layers: tuple[int, ...]
  num_core: int

  @classmethod
  def make(cls, num_layers: int, num_experts: int, critical_layers, num_core: int):
    """critical_layers: an int n (the last n layers) or explicit indices."""
    if isinstance(critical_layers, int):
      if not 1 <= critical_layers <= num_layers:
        raise ValueError(f'critical_layers={critical_layers} not in [1, {num_layers}]')
      layers = tuple(range(num_layers - critical_layers, num_layers))
    else:
      layers = tuple(sorted(int(i) for i in critical_layers))
      if not layers or any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f'critical layers {layers} out of range [0, {num_layers})')
    num_core = num_experts if num_core <= 0 else min(num_core, num_experts)
    return cls(layers=layers, num_core=num_core)


@flax.struct.dataclass
class CoreSlice:
  """One sample's core experts and base routing on the critical layers."""

  base: jax.Array  # [C, E] base router probabilities on the critical layers
  core: jax.Array  # [C, Kc] int32 core expert indices (descending base prob)

  @property
  def mass(self) -> jax.Array:
    """[C] base probability mass on the core experts."""
    return jnp.sum(jnp.take_along_axis(self.base, self.core, axis=-1), axis=-1)


def core_slice(base_probs: jax.Array, spec: PathwaySpec) -> CoreSlice:
  """base_probs [L, E] (one sample) -> its CoreSlice."""
  base = base_probs[jnp.asarray(spec.layers)]  # [C, E]
  _, core = jax.lax.top_k(base, spec.num_core)
  return CoreSlice(base=base, core=core.astype(jnp.int32))


def gather_core(probs: jax.Array, core: jax.Array, layers: Sequence[int]) -> jax.Array:
  """Any routing [L, E] -> distribution on the given core experts [C, Kc]."""
  rows = probs[jnp.asarray(layers)]  # [C, E]
  q = jnp.take_along_axis(rows, core, axis=-1)
  return q / jnp.maximum(jnp.sum(q, axis=-1, keepdims=True), _MIN_PROB)


def base_q(cs: CoreSlice) -> jax.Array:
  """The base routing as a core distribution [C, Kc]."""
  q = jnp.take_along_axis(cs.base, cs.core, axis=-1)
  return q / jnp.sum(q, axis=-1, keepdims=True)


def q_to_logits(q: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(q, _MIN_PROB))


def to_pathway(q: jax.Array, cs: CoreSlice, spec: PathwaySpec) -> dict[int, jax.Array]:
  """Core distribution [C, Kc] -> full pathway {layer: [E]} for forward()."""
  full = jax.vmap(lambda b, c, v: b.at[c].set(v))(cs.base, cs.core, q * cs.mass[:, None])
  return {layer: full[i] for i, layer in enumerate(spec.layers)}
