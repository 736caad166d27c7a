"""The C3PO surrogates on the core-expert distribution q [C, Kc] of one sample.

Each method is written for one test sample and batched with `jax.vmap` by the
engine. The neighbour loss is a pluggable function

  loss_fn(q [C, Kc], cs: CoreSlice, data, weights [N]) -> scalar

where `data` is whatever the loss backend prepared for the sample's
neighbours (the naive backend: their ChoiceBatch; a prefix-cached backend can
prepare cached states instead) so methods never depend on how it is computed.

Dimensions: C critical layers, Kc core experts, N neighbours, R references,
G alpha-grid points, St optimization steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from c3po_jax import pathway as pw_lib

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Hyper-parameters of the surrogates (defaults: the spec's best settings)."""

  ngd_steps: int = 10
  lr: float = 1e-2
  lr_end: float = 1e-5
  optimizer: str = 'adam'  # 'adam' | 'sgd'
  kr_alpha: float | None = None  # None: search alpha on the NGD loss
  alpha_grid: int = 11
  mode_alpha: float = 0.5
  mode_iters: int = 10
  mode_neighbours: int = 10


def _optimizer(mc: MethodConfig) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(
    mc.lr, decay_steps=max(mc.ngd_steps, 1), alpha=mc.lr_end / mc.lr
  )
  if mc.optimizer == 'adam':
    return optax.adam(schedule)
  if mc.optimizer == 'sgd':
    return optax.sgd(schedule)
  raise ValueError(f'unknown optimizer {mc.optimizer!r}')


@dataclasses.dataclass(frozen=True)
class Trace:
  """Per-sample outcome of an optimizing method."""

  q: jax.Array  # [C, Kc] final core distribution (base on fallback)
  losses: jax.Array  # [St + 1] loss before each step and after the last
  finite: jax.Array  # bool: False -> fell back to the base pathway


jax.tree_util.register_dataclass(Trace, data_fields=['q', 'losses', 'finite'], meta_fields=[])


def ngd(loss_fn: LossFn, cs: pw_lib.CoreSlice, data, weights, q0, mc: MethodConfig) -> Trace:
  """Neighbourhood gradient descent on the logits of q, Optax, lax.scan."""
  opt = _optimizer(mc)
  theta0 = pw_lib.q_to_logits(q0)

  def objective(theta):
    return loss_fn(jax.nn.softmax(theta, axis=-1), cs, data, weights)

  def step(carry, _):
    theta, state = carry
    loss, grad = jax.value_and_grad(objective)(theta)
    updates, state = opt.update(grad, state, theta)
    theta = optax.apply_updates(theta, updates)
    ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grad))
    return (theta, state), (loss, ok)

  (theta, _), (losses, oks) = jax.lax.scan(
    step, (theta0, opt.init(theta0)), None, length=mc.ngd_steps
  )
  final = objective(theta)
  finite = jnp.all(oks) & jnp.isfinite(final) & jnp.all(jnp.isfinite(theta))
  q = jnp.where(finite, jax.nn.softmax(theta, axis=-1), q0)
  return Trace(q=q, losses=jnp.concatenate([losses, final[None]]), finite=finite)


def kernel_regression(
  loss_fn: LossFn, cs, data, weights, q0, q_neighbours, mc: MethodConfig
) -> tuple[Trace, jax.Array]:
  """q_hat = kernel-weighted mean of the neighbours' q; then alpha.

  q = alpha q0 + (1 - alpha) q_hat, alpha fixed (mc.kr_alpha; 0 reproduces the
  public C3PO code) or the grid point with the lowest neighbour loss.
  Returns (trace with the grid's losses, alpha).
  """
  w = weights / jnp.maximum(jnp.sum(weights), 1e-12)
  q_hat = jnp.einsum('n,nck->ck', w, q_neighbours)
  has_neighbours = jnp.sum(weights) > 0
  if mc.kr_alpha is not None:
    alphas = jnp.asarray([mc.kr_alpha], jnp.float32)
  else:
    alphas = jnp.linspace(0.0, 1.0, mc.alpha_grid)
  candidates = alphas[:, None, None] * q0 + (1.0 - alphas[:, None, None]) * q_hat
  if mc.kr_alpha is not None:
    losses = jnp.zeros_like(alphas)
    best = 0
  else:
    losses = jax.lax.map(lambda q: loss_fn(q, cs, data, weights), candidates)  # [G]
    best = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))
  q = candidates[best]
  finite = jnp.all(jnp.isfinite(q)) & has_neighbours
  q = jnp.where(finite, q, q0)
  alpha = jnp.where(finite, alphas[best], 1.0)
  return Trace(q=q, losses=losses, finite=finite), alpha


def mode_finding(q0, q_references, ref_valid, mc: MethodConfig) -> Trace:
  """Mean shift in pathway space towards the references' routing mode.

  q0 [C, Kc]; q_references [R, C, Kc] (every reference's routing on this
  sample's core experts); ref_valid [R]. Each iteration moves
  q <- alpha q + (1 - alpha) q_bar, q_bar the Gaussian-kernel mean of the
  mc.mode_neighbours references nearest to q in pathway space (bandwidth:
  their median distance to the start point).
  """
  r = q_references.shape[0]
  points = q_references.reshape(r, -1)
  m = min(mc.mode_neighbours, r)

  def dists(x):
    d = jnp.sqrt(jnp.sum((points - x) ** 2, axis=-1))
    return jnp.where(ref_valid, d, jnp.inf)

  x0 = q0.reshape(-1)
  near0 = -jax.lax.top_k(-dists(x0), m)[0]
  sigma = jnp.maximum(jnp.median(jnp.where(jnp.isfinite(near0), near0, 1.0)), 1e-3)

  def body(_, x):
    d = dists(x)
    neg, idx = jax.lax.top_k(-d, m)
    w = jnp.where(jnp.isfinite(neg), jnp.exp(-(neg**2) / (2 * sigma**2)), 0.0)
    x_bar = jnp.einsum('m,mk->k', w, points[idx]) / jnp.maximum(jnp.sum(w), 1e-12)
    return jnp.where(jnp.sum(w) > 0, mc.mode_alpha * x + (1 - mc.mode_alpha) * x_bar, x)

  x = jax.lax.fori_loop(0, mc.mode_iters, body, x0)
  q = x.reshape(q0.shape)
  q = q / jnp.sum(q, axis=-1, keepdims=True)
  finite = jnp.all(jnp.isfinite(q)) & jnp.any(ref_valid)
  return Trace(q=jnp.where(finite, q, q0), losses=jnp.zeros((0,)), finite=finite)
