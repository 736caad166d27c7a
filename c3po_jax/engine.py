"""Jitted, batched C3PO computations over a model: analysis and the methods.

`Engine` closes over the static settings (model config, pathway slice, method
hyper-parameters, loss backend) and jits one function per method; params and
data are arguments, so nothing large becomes a compile-time constant. Each
method runs `jax.vmap` over a batch of test samples (every sample with its own
neighbours, kernel weights and core experts) under a single `jit`.

Dimensions: Q test samples in a batch, N neighbours, R references, C critical
layers, Kc core experts, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from c3po_jax import methods, prefix_cache, scoring
from c3po_jax import pathway as pw_lib
from models.olmoe.config import OlmoeConfig

LOSS_KINDS = ('choice_ce', 'gold_nll')


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  spec: pw_lib.PathwaySpec
  method: methods.MethodConfig = methods.MethodConfig()
  loss: str = 'choice_ce'
  opt_pathway_mode: str = 'dense'  # how the pathway enters while optimizing
  eval_pathway_mode: str = 'topk'  # how the final pathway is evaluated


class NaiveLoss:
  """Neighbour loss by full forward passes of every neighbour prompt.

  The reference implementation: each call re-runs all neighbours' sequences
  with the candidate pathway injected at their last context token.

  A loss backend has two parts: `prepare(params, config, ec, data)` turns a
  neighbour ChoiceBatch [N, ...] into whatever the loss needs (run once per
  sample, outside the optimization; here the batch itself), each neighbour
  on its own and with N first on every leaf; and `make_loss(params, config,
  ec)` returns loss_fn(q, cs, prepared, weights).
  """

  @staticmethod
  def prepare(params, config, ec, data: scoring.ChoiceBatch):
    del params, config, ec
    return data

  @staticmethod
  def make_loss(params, config: OlmoeConfig, ec: EngineConfig):
    return _naive_loss_fn(params, config, ec)


def _naive_loss_fn(params, config: OlmoeConfig, ec: EngineConfig):
  def loss_fn(q, cs, data: scoring.ChoiceBatch, weights):
    pathway = pw_lib.to_pathway(q, cs, ec.spec)
    n = data.size
    pathway = {k: jnp.broadcast_to(v, (n, v.shape[-1])) for k, v in pathway.items()}
    an = scoring.analyze(
      params, data, config=config, pathway=pathway, pathway_mode=ec.opt_pathway_mode
    )
    per = scoring.choice_loss(an.scores, data.gold, data.choice_valid, ec.loss)  # [N]
    w = weights.astype(jnp.float32)
    return jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1e-12)

  return loss_fn


# Loss backends by name: 'prefix' recomputes only what the pathway changes.
BACKENDS = {'prefix': prefix_cache.PrefixLoss, 'naive': NaiveLoss}


def _core_slices(base_probs, spec):
  return jax.vmap(lambda p: pw_lib.core_slice(p, spec))(base_probs)


class Engine:
  """Batched C3PO on one model. All public methods take params first."""

  def __init__(self, config: OlmoeConfig, ec: EngineConfig, loss_backend=prefix_cache.PrefixLoss):
    if ec.loss not in LOSS_KINDS:
      raise ValueError(f'loss={ec.loss!r}, expected one of {LOSS_KINDS}')
    self.config = config
    self.ec = ec
    self.loss_backend = loss_backend
    self.analyze = jax.jit(functools.partial(scoring.analyze, config=config))
    self.analyze_remixed = jax.jit(self._analyze_remixed)
    self.prepare = jax.jit(self._prepare)
    self.ngd = jax.jit(self._ngd)
    self.kernel_regression = jax.jit(self._kernel_regression)
    self.mode_finding = jax.jit(self._mode_finding)

  def core_slices(self, base_probs):
    """[Q, L, E] base routing -> batched CoreSlice."""
    return _core_slices(base_probs, self.ec.spec)

  def neighbour_q(self, cs, ref_probs):
    """Neighbours' routing [Q, N, L, E] on each sample's core -> [Q, N, C, Kc]."""
    layers = self.ec.spec.layers
    per = lambda core, probs: jax.vmap(lambda p: pw_lib.gather_core(p, core, layers))(probs)
    return jax.vmap(per)(cs.core, ref_probs)

  def _analyze_remixed(self, params, batch, cs, q):
    """Scores the test batch with the core distributions q [Q, C, Kc]."""
    pathway = jax.vmap(lambda qi, ci: pw_lib.to_pathway(qi, ci, self.ec.spec))(q, cs)
    return scoring.analyze(
      params, batch, config=self.config, pathway=pathway, pathway_mode=self.ec.eval_pathway_mode
    )

  def _prepare(self, params, data):
    """Per-sample neighbour batches [Q, N, ...] -> the loss backend's state.

    Neighbours are prepared independently, so all Q * N go through as one
    batch: one large forward pass rather than Q small ones under vmap.
    """
    q, n = data.tokens.shape[:2]
    flat = jax.tree.map(lambda x: x.reshape((q * n,) + x.shape[2:]), data)
    out = self.loss_backend.prepare(params, self.config, self.ec, flat)
    return jax.tree.map(lambda x: x.reshape((q, n) + x.shape[1:]), out)

  def _ngd(self, params, cs, data, weights):
    """data: `prepare`d neighbour state, [Q, N, ...]; weights [Q, N]."""
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec)
    q0 = jax.vmap(pw_lib.base_q)(cs)
    fn = lambda c, d, w, q: methods.ngd(loss_fn, c, d, w, q, self.ec.method)
    return jax.vmap(fn)(cs, data, weights, q0)

  def _kernel_regression(self, params, cs, data, weights, q_neighbours):
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec)
    q0 = jax.vmap(pw_lib.base_q)(cs)
    fn = lambda c, d, w, q, qn: methods.kernel_regression(loss_fn, c, d, w, q, qn, self.ec.method)
    return jax.vmap(fn)(cs, data, weights, q0, q_neighbours)

  def _mode_finding(self, cs, ref_probs, ref_valid):
    """ref_probs [R, L, E] of the whole reference set; ref_valid [R]."""
    q0 = jax.vmap(pw_lib.base_q)(cs)
    layers = self.ec.spec.layers

    def one(c, q):
      q_refs = jax.vmap(lambda p: pw_lib.gather_core(p, c.core, layers))(ref_probs)
      return methods.mode_finding(q, q_refs, ref_valid, self.ec.method)

    return jax.vmap(one)(cs, q0)


def stack_batches(batches: list[scoring.ChoiceBatch]) -> scoring.ChoiceBatch:
  """Per-sample neighbour batches of equal shape -> one [Q, N, ...] pytree."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
