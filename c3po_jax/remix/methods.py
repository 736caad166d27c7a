"""The C3PO surrogates on the core experts' mixing weights w [C, Kc] of one sample.

Each method is written for one test sample and batched with `jax.vmap` by the
engine. Every method returns valid weights: non-negative, each critical
layer's row summing to the base core mass (see `pathway`). The neighbour loss
is a pluggable function

  loss_fn(w [C, Kc], cs: CoreSlice, data, weights [N], anchors=None) -> scalar

where `data` is whatever the loss backend prepared for the sample's
neighbours (the naive backend: their ChoiceBatch; the prefix-cached backend:
cached states) so methods never depend on how it is computed; `anchors`
([N, S, C, E], optional) are per-sequence base rows (the oracle scores the
test sample itself, whose choices may have their own contexts).

Dimensions: C critical layers, Kc core experts, N neighbours, R references,
G alpha-grid points, St optimization steps, P points of a trajectory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from c3po_jax.remix import pathway as pw_lib

LossFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Hyper-parameters of the surrogates (defaults: the spec's best settings)."""

  ngd_steps: int = 10
  # Steps the cosine schedule spans (None: ngd_steps). A run of s steps with
  # schedule_steps=S is the first s steps of an S-step run (the ablation
  # study's 'prefix' reading of a longer trajectory).
  schedule_steps: int | None = None
  lr: float = 1e-2
  lr_end: float = 1e-5
  optimizer: str = 'adam'  # 'adam' | 'sgd'
  # 'weights': optimize the core mixing weights themselves, projected onto the
  # simplex of the core mass after every step; 'logits': their log-softmax.
  pathway_param: str = 'weights'
  # Where NGD starts: 'base' (the test sample's own routing, the paper's) or
  # 'kernel_mean' (the kernel-weighted mean of the neighbours' routing, kernel
  # regression's alpha = 0 point; needs the neighbours' routing).
  ngd_init: str = 'base'
  kr_alpha: float | None = None  # None: search alpha on the neighbour loss
  alpha_grid: int = 11
  mode_alpha: float = 0.5
  mode_iters: int = 10
  mode_neighbours: int = 10

  @property
  def needs_neighbour_routing(self) -> bool:
    """Whether NGD needs the neighbours' own routing rows (w_neighbours)."""
    return self.ngd_init == 'kernel_mean'


def _optimizer(mc: MethodConfig) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(
    mc.lr, decay_steps=max(mc.schedule_steps or mc.ngd_steps, 1), alpha=mc.lr_end / mc.lr
  )
  if mc.optimizer == 'adam':
    return optax.adam(schedule)
  if mc.optimizer == 'sgd':
    return optax.sgd(schedule)
  raise ValueError(f'unknown optimizer {mc.optimizer!r}')


@dataclasses.dataclass(frozen=True)
class Trace:
  """Per-sample outcome of a method."""

  w: jax.Array  # [C, Kc] final core weights (the base ones on fallback)
  losses: jax.Array  # NGD: [St + 1] loss before each step and after the last
  finite: jax.Array  # bool: False -> fell back to the base pathway
  path: jax.Array  # [P, C, Kc] weights from the start (index 0) to the end


jax.tree_util.register_dataclass(
  Trace, data_fields=['w', 'losses', 'finite', 'path'], meta_fields=[]
)


def ngd(
  loss_fn: LossFn,
  cs: pw_lib.CoreSlice,
  data,
  weights,
  w0,
  mc: MethodConfig,
  anchors=None,
  w_neighbours=None,
):
  """Neighbourhood gradient descent with Optax, steps in lax.scan -> Trace.

  pathway_param 'weights': the variables are the core weights; after every
  update they are projected back onto {w >= 0, sum = core mass} per layer, so
  Adam's ~lr-sized steps move probabilities by about lr each (the paper's
  1e-2 over 10 cosine steps: up to ~0.05, enough for a core expert outside
  the top-k to enter it). 'logits': the variables are the log-weights of the
  core distribution (w = softmax * mass): Adam then changes each weight by a
  factor of at most about exp(2 * sum of lr) (its own logit and the
  normalizer), i.e. within x[0.89, 1.12] at the paper's settings, which
  hardly ever changes the top-k.

  ngd_init 'kernel_mean' (needs w_neighbours [N, C, Kc], the neighbours'
  own routing on this sample's core) starts the descent at the kernel-weighted
  mean of the neighbours' routing (kernel regression's alpha = 0 point)
  instead of the base routing; the loss, steps and optimizer are the same.
  Why it exists: in a world with few experts per token (top-2 of 8) the
  descent from a mis-routed base reaches low neighbour loss through dense
  mixtures of other experts, which do not carry over to the test sample,
  while the neighbours' own experts are far away (docs/demo_world.md, remix-world
  diagnostic). The path (Trace.path) then starts at the kernel mean.
  """
  opt = _optimizer(mc)
  mass = cs.mass
  if mc.pathway_param == 'weights':
    theta0 = w0
    to_w = lambda theta: theta
    project = lambda theta: pw_lib.project_simplex(theta, mass)
  elif mc.pathway_param == 'logits':
    theta0 = pw_lib.to_logits(w0, mass)
    to_w = lambda theta: pw_lib.from_logits(theta, mass)
    project = lambda theta: theta
  else:
    raise ValueError(f'pathway_param={mc.pathway_param!r}, expected one of {pw_lib.PATHWAY_PARAMS}')
  if mc.ngd_init == 'kernel_mean':
    if w_neighbours is None:
      raise ValueError("ngd_init='kernel_mean' needs the neighbours' routing (w_neighbours)")
    w_hat = kernel_mean(weights, w_neighbours, mass)
    w_hat = jnp.where(jnp.sum(weights) > 0, w_hat, w0)  # no neighbour: the base
    theta0 = w_hat if mc.pathway_param == 'weights' else pw_lib.to_logits(w_hat, mass)
  elif mc.ngd_init != 'base':
    raise ValueError(f"ngd_init={mc.ngd_init!r}, expected 'base' or 'kernel_mean'")

  def objective(theta):
    return loss_fn(to_w(theta), cs, data, weights, anchors)

  def step(carry, _):
    theta, state = carry
    loss, grad = jax.value_and_grad(objective)(theta)
    updates, state = opt.update(grad, state, theta)
    theta = project(optax.apply_updates(theta, updates))
    ok = jnp.isfinite(loss) & jnp.all(jnp.isfinite(grad))
    return (theta, state), (loss, ok, to_w(theta))

  (theta, _), (losses, oks, ws) = jax.lax.scan(
    step, (theta0, opt.init(theta0)), None, length=mc.ngd_steps
  )
  final = objective(theta)
  w = to_w(theta)
  finite = jnp.all(oks) & jnp.isfinite(final) & jnp.all(jnp.isfinite(w))
  path = jnp.concatenate([to_w(theta0)[None], ws])
  return Trace(
    w=jnp.where(finite, w, w0),
    losses=jnp.concatenate([losses, final[None]]),
    finite=finite,
    path=jnp.where(finite, path, w0[None]),
  )


def kernel_mean(weights: jax.Array, w_neighbours: jax.Array, mass: jax.Array) -> jax.Array:
  """Kernel-weighted mean of the neighbours' core weights [N, C, Kc], rescaled to mass [C]."""
  wn = weights / jnp.maximum(jnp.sum(weights), 1e-12)  # [N]
  return pw_lib.rescale(jnp.einsum('n,nck->ck', wn, w_neighbours), mass)


def kernel_regression(loss_fn: LossFn, cs, data, weights, w0, w_neighbours, mc: MethodConfig):
  """w_hat = kernel-weighted mean of the neighbours' core weights; then alpha.

  w_neighbours [N, C, Kc]: each neighbour's raw routing weights on this
  sample's core experts. w_hat is rescaled to the core mass, and
  w = alpha w0 + (1 - alpha) w_hat, alpha fixed (mc.kr_alpha; 0 reproduces
  the public C3PO code's weighted mean) or the grid point with the lowest
  `loss_fn` (which the engine builds in the evaluation mode, so alpha = 1 is
  exactly the base pathway's loss). Returns (trace, alpha); trace.losses are
  the grid's losses (alpha ascending).
  """
  w_hat = kernel_mean(weights, w_neighbours, cs.mass)
  has_neighbours = jnp.sum(weights) > 0
  if mc.kr_alpha is not None:
    alphas = jnp.asarray([mc.kr_alpha], jnp.float32)
  else:
    alphas = jnp.linspace(0.0, 1.0, mc.alpha_grid)
  candidates = alphas[:, None, None] * w0 + (1.0 - alphas[:, None, None]) * w_hat
  if mc.kr_alpha is not None:
    losses = jnp.zeros_like(alphas)
    best = 0
  else:
    losses = jax.lax.map(lambda w: loss_fn(w, cs, data, weights), candidates)  # [G]
    best = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))
  w = candidates[best]
  finite = jnp.all(jnp.isfinite(w)) & has_neighbours
  w = jnp.where(finite, w, w0)
  alpha = jnp.where(finite, alphas[best], 1.0)
  trace = Trace(w=w, losses=losses, finite=finite, path=jnp.stack([w0, w]))
  return trace, alpha


def mode_finding(cs, w0, w_references, ref_valid, mc: MethodConfig) -> Trace:
  """Mean shift in pathway space towards the references' routing mode.

  w0 [C, Kc]; w_references [R, C, Kc] (every reference's raw routing weights
  on this sample's core experts); ref_valid [R]. Each iteration moves
  w <- alpha w + (1 - alpha) w_bar, w_bar the Gaussian-kernel mean of the
  mc.mode_neighbours references nearest to w in pathway space (bandwidth:
  their median distance to the start point). The result is rescaled to the
  core mass.
  """
  r = w_references.shape[0]
  points = w_references.reshape(r, -1)
  m = min(mc.mode_neighbours, r)

  def dists(x):
    d = jnp.sqrt(jnp.sum((points - x) ** 2, axis=-1))
    return jnp.where(ref_valid, d, jnp.inf)

  x0 = w0.reshape(-1)
  near0 = -jax.lax.top_k(-dists(x0), m)[0]
  sigma = jnp.maximum(jnp.median(jnp.where(jnp.isfinite(near0), near0, 1.0)), 1e-3)

  def body(_, x):
    d = dists(x)
    neg, idx = jax.lax.top_k(-d, m)
    w = jnp.where(jnp.isfinite(neg), jnp.exp(-(neg**2) / (2 * sigma**2)), 0.0)
    x_bar = jnp.einsum('m,mk->k', w, points[idx]) / jnp.maximum(jnp.sum(w), 1e-12)
    return jnp.where(jnp.sum(w) > 0, mc.mode_alpha * x + (1 - mc.mode_alpha) * x_bar, x)

  x = jax.lax.fori_loop(0, mc.mode_iters, body, x0)
  w = pw_lib.rescale(x.reshape(w0.shape), cs.mass)
  finite = jnp.all(jnp.isfinite(w)) & jnp.any(ref_valid)
  w = jnp.where(finite, w, w0)
  return Trace(w=w, losses=jnp.zeros((0,)), finite=finite, path=jnp.stack([w0, w]))


def random_pathway(key: jax.Array, cs: pw_lib.CoreSlice) -> Trace:
  """The control: each critical layer's core weights replaced by a random row -> Trace.

  A uniform draw from the simplex of the core (Dirichlet(1, ..., 1)) scaled to
  the core's base mass, so the pathway row stays a distribution; with every
  expert in the core (the demo, `--core_experts=0`) that is a uniformly random
  routing row. What re-mixing without information does to accuracy.
  """
  w0 = pw_lib.base_weights(cs)
  draw = jax.random.dirichlet(key, jnp.ones(w0.shape, jnp.float32))  # [C, Kc]
  w = draw * cs.mass[:, None]
  return Trace(w=w, losses=jnp.zeros((0,)), finite=jnp.asarray(True), path=jnp.stack([w0, w]))
