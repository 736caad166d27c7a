"""The efficient pathway: critical layers x core experts of the last token.

A test sample's base routing at its last context token is `base` [L, E]. Only
the critical layers (default: the last 5) and, in each, the core experts (the
test sample's own top-n before optimization) are re-mixed. Every method works
with the core experts' mixing weights `w` [C, Kc] themselves (probabilities,
as the public C3PO code injects them): the full pathway row keeps the
router's values everywhere else and puts `w` on the core, so `w` = the base
weights reproduces the base routing exactly. A valid `w` is non-negative and
keeps each critical layer's core mass m (the base probability mass of its
core experts), so every row still sums to 1 (`project_simplex`).

How a pathway enters the model (`to_pathway`):
* 'topk' mode: the full row (router values off the core, `w` on it); the
  model renormalizes it and takes its own top-k.
* 'dense' mode: `w` on the core and zeros elsewhere; the model mixes exactly
  the core experts with these weights as coefficients.
* with per-sequence `anchor` rows (a sample whose choices have their own
  contexts, e.g. WinoGrande): each sequence keeps its own base row and gets
  the method's change `w - w_base` on the core experts (clipped at 0), so the
  unchanged pathway reproduces every sequence's base routing.

Dimensions: L layers, C critical layers, E experts, Kc core experts,
S sequences of a sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

PATHWAY_PARAMS = ('weights', 'logits')

# Floor for log-weights of core experts (logit parameterization): keeps logits
# finite when the router gives an expert (numerically) zero probability.
_MIN_PROB = 1e-12


def parse_layers(spec, num_layers: int, moe_layers=None) -> tuple[int, ...]:
  """Critical layers from a spec: 'last:N' (the last N MoE layers), 'I' (layer I),
  'I,J,K' (explicit indices; negative ones count from the end), or a sequence
  of ints. A bare int is refused: it used to mean 'the last N', which made a
  single layer inexpressible. moe_layers: the model's MoE layers (default:
  every layer); dense layers (DeepSeekMoE's first) have no router to re-mix,
  so 'last:N' counts MoE layers only and an explicit dense layer is an error."""
  moe = tuple(range(num_layers)) if moe_layers is None else tuple(moe_layers)
  if isinstance(spec, bool) or isinstance(spec, int):
    raise TypeError(
      f'critical layers {spec!r}: write "last:{spec}" for the last {spec} layers, '
      f'or "{spec}" (a string) / ({spec},) for layer {spec}'
    )
  if isinstance(spec, str):
    text = spec.strip().replace(' ', '')
    if text.startswith('last:'):
      try:
        n = int(text[len('last:') :])
      except ValueError:
        raise ValueError(f'critical layers {spec!r}: expected last:N with an integer N') from None
      if not 1 <= n <= len(moe):
        raise ValueError(f'critical layers {spec!r}: N must be in [1, {len(moe)}] (MoE layers)')
      return moe[len(moe) - n :]
    try:
      items = [int(x) for x in text.split(',') if x]
    except ValueError:
      raise ValueError(
        f'critical layers {spec!r}: expected last:N, a layer index, or a comma list of indices'
      ) from None
  else:
    items = [int(x) for x in spec]
  layers = sorted({i + num_layers if i < 0 else i for i in items})
  if not layers or any(not 0 <= i < num_layers for i in layers):
    raise ValueError(f'critical layers {spec!r} out of range [0, {num_layers})')
  dense = [i for i in layers if i not in moe]
  if dense:
    raise ValueError(f'critical layers {spec!r}: layers {dense} are dense (MoE layers: {moe})')
  return tuple(layers)


@dataclasses.dataclass(frozen=True)
class PathwaySpec:
  """Which slice of the routing is re-mixed (static under jit)."""

  layers: tuple[int, ...]
  num_core: int

  @classmethod
  def make(cls, num_layers: int, num_experts: int, critical_layers, num_core: int, moe_layers=None):
    """critical_layers: a `parse_layers` spec; num_core <= 0 means all experts."""
    layers = parse_layers(critical_layers, num_layers, moe_layers)
    num_core = num_experts if num_core <= 0 else min(num_core, num_experts)
    return cls(layers=layers, num_core=num_core)

  @classmethod
  def for_model(cls, config, critical_layers, num_core: int):
    """The spec for a model config (a `models.config.MoeConfig`): its MoE layers count."""
    return cls.make(
      config.num_hidden_layers, config.num_experts, critical_layers, num_core, config.moe_layers
    )


@flax.struct.dataclass
class CoreSlice:
  """One sample's core experts and base routing on the critical layers."""

  base: jax.Array  # [C, E] base router probabilities on the critical layers
  core: jax.Array  # [C, Kc] int32 core expert indices (descending base prob)

  @property
  def mass(self) -> jax.Array:
    """[C] base probability mass on the core experts."""
    return jnp.sum(base_weights(self), axis=-1)


def core_slice(base_probs: jax.Array, spec: PathwaySpec) -> CoreSlice:
  """base_probs [L, E] (one sample) -> its CoreSlice."""
  base = base_probs[jnp.asarray(spec.layers)]  # [C, E]
  _, core = jax.lax.top_k(base, spec.num_core)
  return CoreSlice(base=base, core=core.astype(jnp.int32))


def core_weights(probs: jax.Array, core: jax.Array, layers: Sequence[int]) -> jax.Array:
  """Any routing [L, E] -> its raw weights on the given core experts [C, Kc]."""
  rows = probs[jnp.asarray(layers)]  # [C, E]
  return jnp.take_along_axis(rows, core, axis=-1)


def base_weights(cs: CoreSlice) -> jax.Array:
  """The base routing's weights on the core experts [C, Kc]."""
  return jnp.take_along_axis(cs.base, cs.core, axis=-1)


def rescale(w: jax.Array, mass: jax.Array) -> jax.Array:
  """Weights [C, Kc] scaled so that each row sums to mass [C]."""
  total = jnp.sum(w, axis=-1, keepdims=True)
  # Guard: a row with no weight at all becomes uniform rather than NaN.
  uniform = jnp.full_like(w, 1.0 / w.shape[-1])
  safe = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), uniform)
  return safe * mass[..., None]


def project_simplex(v: jax.Array, mass: jax.Array) -> jax.Array:
  """Euclidean projection of v [..., K] onto {w >= 0, sum w = mass [...]}.

  The sort-based algorithm (Held et al. 1974; Duchi et al. 2008): the
  projection is max(v - tau, 0) with the threshold tau that makes it sum to
  `mass`. Unlike clip-and-renormalize it is the closest valid point, so a
  projected gradient step changes the weights only as much as the
  constraints force; weights that stay inside keep their exact step.
  """
  k = v.shape[-1]
  u = -jnp.sort(-v, axis=-1)  # descending
  css = jnp.cumsum(u, axis=-1) - mass[..., None]
  idx = jnp.arange(1, k + 1, dtype=v.dtype)
  active = u - css / idx > 0  # a prefix of the sorted entries
  rho = jnp.sum(active, axis=-1, keepdims=True)  # >= 1 whenever mass > 0
  tau = jnp.take_along_axis(css, jnp.maximum(rho - 1, 0), axis=-1) / jnp.maximum(rho, 1)
  return jnp.maximum(v - tau, 0.0)


def to_logits(w: jax.Array, mass: jax.Array) -> jax.Array:
  """Logit parameterization: weights [C, Kc] -> log of the core distribution."""
  return jnp.log(jnp.maximum(w / mass[..., None], _MIN_PROB))


def from_logits(theta: jax.Array, mass: jax.Array) -> jax.Array:
  return jax.nn.softmax(theta, axis=-1) * mass[..., None]


def _set_core(rows: jax.Array, core: jax.Array, values: jax.Array) -> jax.Array:
  """rows [..., C, E] with values [..., C, Kc] written at the core [C, Kc].

  A scatter, exact at any matmul precision (a one-hot matmul would round on
  accelerators).
  """
  lead = rows.shape[:-2]
  c, e = rows.shape[-2:]
  flat_rows = rows.reshape((-1, c, e))
  flat_vals = jnp.broadcast_to(values, lead + values.shape[-2:]).reshape((-1,) + values.shape[-2:])
  one = jax.vmap(lambda r, i, x: r.at[i].set(x))  # over C
  out = jax.vmap(lambda r, x: one(r, core, x))(flat_rows, flat_vals)
  return out.reshape(rows.shape)


def pathway_rows(
  w: jax.Array, cs: CoreSlice, mode: str = 'topk', anchor: jax.Array | None = None
) -> jax.Array:
  """Core weights [C, Kc] -> the injected rows [..., C, E] (see module doc).

  anchor: optional per-sequence base rows [..., C, E]; None injects the
  sample's own row (as for its neighbours).
  """
  if anchor is None:
    values = w
    rows = cs.base if mode == 'topk' else jnp.zeros_like(cs.base)
  else:
    core = jnp.broadcast_to(cs.core, anchor.shape[:-2] + cs.core.shape)  # [..., C, Kc]
    anchor_core = jnp.take_along_axis(anchor, core, axis=-1)
    values = jnp.maximum(anchor_core + (w - base_weights(cs)), 0.0)
    rows = anchor if mode == 'topk' else jnp.zeros_like(anchor)
  if mode not in ('topk', 'dense'):
    raise ValueError(f'pathway mode {mode!r}, expected topk or dense')
  return _set_core(rows, cs.core, values)


def to_pathway(
  w: jax.Array,
  cs: CoreSlice,
  spec: PathwaySpec,
  mode: str = 'topk',
  anchor: jax.Array | None = None,
) -> dict[int, jax.Array]:
  """Core weights [C, Kc] -> pathway {layer: [..., E]} for forward()."""
  rows = pathway_rows(w, cs, mode, anchor)  # [..., C, E]
  return {layer: rows[..., i, :] for i, layer in enumerate(spec.layers)}


def topk_change(w: jax.Array, cs: CoreSlice, k: int) -> jax.Array:
  """Fraction of the re-mixed rows' top-k experts [C] that were not in the base top-k.

  The paper's Fig. 5 statistic, per critical layer, for the 'topk' rows.
  """
  after = jax.lax.top_k(pathway_rows(w, cs, 'topk'), k)[1]  # [C, K]
  before = jax.lax.top_k(cs.base, k)[1]
  new = ~jnp.any(after[:, :, None] == before[:, None, :], axis=-1)  # [C, K]
  return jnp.mean(new.astype(jnp.float32), axis=-1)
