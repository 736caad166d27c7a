"""Jitted, batched C3PO computations over a model: analysis, the methods, the baselines.

`Engine` closes over the static settings (model config, pathway slice, method
hyper-parameters, loss backend) and jits one function per method; params and
data are arguments, so nothing large becomes a compile-time constant. Each
method runs `jax.vmap` over a batch of test samples (every sample with its own
neighbours, kernel weights and core experts) under a single `jit`; so do the
trained-prompt baselines (`baselines`: soft prompt, prefix tuning).

Dimensions: Q test samples in a batch, N neighbours, R references, C critical
layers, Kc core experts, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from c3po_jax.remix import baselines, losses, methods, scoring
from c3po_jax.remix import pathway as pw_lib
from models.config import MoeConfig

LOSS_KINDS = ('choice_ce', 'gold_nll')


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  spec: pw_lib.PathwaySpec
  method: methods.MethodConfig = methods.MethodConfig()
  loss: str = 'choice_ce'
  opt_pathway_mode: str = 'dense'  # how the pathway enters while optimizing
  eval_pathway_mode: str = 'topk'  # how the final pathway is evaluated
  baseline: baselines.BaselineConfig = baselines.BaselineConfig()


def _core_slices(base_probs, spec):
  return jax.vmap(lambda p: pw_lib.core_slice(p, spec))(base_probs)


@flax.struct.dataclass
class Outcome:
  """A batch of samples after a method: the trace and what it changed."""

  trace: methods.Trace  # leaves with Q first
  alpha: jax.Array  # [Q] kernel regression's alpha (1 elsewhere)
  topk_new: jax.Array  # [Q] fraction of the final top-k experts not in the base top-k
  mean_abs_delta: jax.Array  # [Q] mean |w - w_base| over the core weights
  # [Q] NGD's and the oracle's objective as the model routes (`eval_pathway_mode`, top-k
  # by default) at the base weights and at the result, whatever mode the descent ran in
  # (the dense loss at the base weights mixes every core expert: not the model's loss);
  # NaN where a method has none.
  loss_before: jax.Array
  loss_after: jax.Array


class Engine:
  """Batched C3PO on one model. All public methods take params first."""

  def __init__(self, config: MoeConfig, ec: EngineConfig, loss_backend=losses.PrefixLoss):
    if ec.loss not in LOSS_KINDS:
      raise ValueError(f'loss={ec.loss!r}, expected one of {LOSS_KINDS}')
    self.config = config
    self.ec = ec
    self.loss_backend = loss_backend
    self.analyze = jax.jit(functools.partial(scoring.analyze, config=config))
    self.analyze_prepared = jax.jit(self._analyze_prepared)
    self.analyze_remixed = jax.jit(self._analyze_remixed)
    self.prepare = jax.jit(self._prepare)
    self.prepare_tests = jax.jit(self._prepare_tests)
    self.ngd = jax.jit(self._ngd)
    self.oracle = jax.jit(self._oracle)
    self.kernel_regression = jax.jit(self._kernel_regression)
    self.mode_finding = jax.jit(self._mode_finding)
    self.random_pathway = jax.jit(self._random_pathway)
    self.path_scores = jax.jit(self._path_scores)
    self.soft_prompt = jax.jit(functools.partial(self._baseline, 'soft_prompt'))
    self.prefix_tuning = jax.jit(functools.partial(self._baseline, 'prefix_tuning'))
    self.train_prompt = jax.jit(self._train_prompt, static_argnums=0)
    self.prompted = jax.jit(self._prompted, static_argnums=0)
    self.core_slices = jax.jit(self._core_slices)
    self.neighbour_weights = jax.jit(self._neighbour_weights)
    # A prefix state padded or cut to (num_tokens, window), for `state_cache.StateCache`.
    self.fit = jax.jit(losses.fit, static_argnums=(1, 2))

  def _core_slices(self, base_probs):
    """[Q, L, E] base routing -> batched CoreSlice."""
    return _core_slices(base_probs, self.ec.spec)

  def _neighbour_weights(self, cs, ref_probs):
    """Neighbours' routing [Q, N, L, E] on each sample's core -> [Q, N, C, Kc]."""
    layers = self.ec.spec.layers
    per = lambda core, probs: jax.vmap(lambda p: pw_lib.core_weights(p, core, layers))(probs)
    return jax.vmap(per)(cs.core, ref_probs)

  def _anchors(self, seq_probs):
    """Per-sequence base routing [Q, S, (U,) L, E] -> critical-layer rows [Q, S, (U,) C, E].

    With U pathway tokens each token keeps its own base row plus the change.
    """
    return jnp.take(seq_probs, jnp.asarray(self.ec.spec.layers), axis=-2)

  def _analyze_remixed(self, params, batch, cs, w, seq_probs):
    """Scores the test batch with core weights w [Q, C, Kc].

    seq_probs [Q, S, L, E]: each sequence's base routing at its last context
    token; each sequence keeps its own rows plus the change on the core.
    """
    anchors = self._anchors(seq_probs)
    mode = self.ec.eval_pathway_mode
    rows = jax.vmap(lambda wi, ci, ai: pw_lib.pathway_rows(wi, ci, mode, ai))(w, cs, anchors)
    pathway = {layer: rows[..., i, :] for i, layer in enumerate(self.ec.spec.layers)}
    return scoring.analyze(params, batch, config=self.config, pathway=pathway, pathway_mode=mode)

  def _analyze_prepared(self, params, batch):
    """The base analysis of a batch [B, ...] and its prefix states [B, ...] in one pass.

    `losses.analyze_and_prepare`: what `path_scores` needs of a test sample,
    or the neighbour loss of a reference, comes with its base pass.
    """
    return losses.analyze_and_prepare(params, self.config, min(self.ec.spec.layers), batch)

  def _prepare(self, params, data):
    """Per-sample neighbour batches [Q, N, ...] -> the loss backend's state.

    Neighbours are prepared independently, so all Q * N go through as one
    batch: one large forward pass rather than Q small ones under vmap.
    """
    q, n = data.tokens.shape[:2]
    flat = jax.tree.map(lambda x: x.reshape((q * n,) + x.shape[2:]), data)
    out = self.loss_backend.prepare(params, self.config, self.ec, flat)
    return jax.tree.map(lambda x: x.reshape((q, n) + x.shape[1:]), out)

  def _prepare_tests(self, params, batch):
    """The test batch [Q, ...] as prefix states [Q, 1, ...] (for `path_scores`)."""
    out = losses.PrefixLoss.prepare(params, self.config, self.ec, batch)
    return jax.tree.map(lambda x: x[:, None], out)

  def _outcome(self, cs, trace, alpha=None, ends=None):
    k = self.config.num_experts_per_tok
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    topk_new = jax.vmap(lambda w, c: jnp.mean(pw_lib.topk_change(w, c, k)))(trace.w, cs)
    delta = jnp.mean(jnp.abs(trace.w - w0), axis=(-2, -1))
    if alpha is None:
      alpha = jnp.ones(delta.shape, jnp.float32)
    nan = jnp.full(delta.shape, jnp.nan, jnp.float32)
    before, after = ends if ends is not None else (nan, nan)
    return Outcome(
      trace=trace,
      alpha=alpha,
      topk_new=topk_new,
      mean_abs_delta=delta,
      loss_before=before,
      loss_after=after,
    )

  def _loss_ends(self, params, cs, data, weights, w, anchors=None):
    """([Q], [Q]) the objective in the evaluation mode at the base weights and at w [Q, C, Kc]."""
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec, self.ec.eval_pathway_mode)
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    extra = () if anchors is None else (anchors,)
    at = lambda ws: jax.vmap(loss_fn)(ws, cs, data, weights, *extra)
    return at(w0), at(w)

  def _ngd(self, params, cs, data, weights, w_neighbours=None):
    """data: `prepare`d neighbour state, [Q, N, ...]; weights [Q, N].

    w_neighbours [Q, N, C, Kc]: the neighbours' routing on each sample's core
    (`neighbour_weights`), needed by ngd_init='kernel_mean' only.
    """
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec)
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    mc = self.ec.method
    if w_neighbours is None:
      fn = lambda c, d, wt, w: methods.ngd(loss_fn, c, d, wt, w, mc)
      trace = jax.vmap(fn)(cs, data, weights, w0)
    else:
      fn = lambda c, d, wt, w, wn: methods.ngd(loss_fn, c, d, wt, w, mc, w_neighbours=wn)
      trace = jax.vmap(fn)(cs, data, weights, w0, w_neighbours)
    return self._outcome(cs, trace, ends=self._loss_ends(params, cs, data, weights, trace.w))

  def _oracle(self, params, cs, data, seq_probs):
    """NGD on the test sample's own label; data: the test batch `prepare`d as [Q, 1, ...].

    The sample is scored as it will be evaluated: each of its sequences with
    its own base rows plus the change. The oracle has no neighbours: it
    always starts at the base routing.
    """
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec)
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    anchors = self._anchors(seq_probs)[:, None]  # [Q, 1, S, C, E]
    ones = jnp.ones((w0.shape[0], 1), jnp.float32)
    mc = self.ec.method
    if mc.ngd_init != 'base':
      mc = dataclasses.replace(mc, ngd_init='base')
    fn = lambda c, d, wt, w, a: methods.ngd(loss_fn, c, d, wt, w, mc, a)
    trace = jax.vmap(fn)(cs, data, ones, w0, anchors)
    ends = self._loss_ends(params, cs, data, ones, trace.w, anchors)
    return self._outcome(cs, trace, ends=ends)

  def _kernel_regression(self, params, cs, data, weights, w_neighbours):
    # alpha is chosen on the loss of the mode the result is evaluated in.
    mode = self.ec.eval_pathway_mode
    loss_fn = self.loss_backend.make_loss(params, self.config, self.ec, mode)
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    fn = lambda c, d, wt, w, wn: methods.kernel_regression(loss_fn, c, d, wt, w, wn, self.ec.method)
    trace, alpha = jax.vmap(fn)(cs, data, weights, w0, w_neighbours)
    return self._outcome(cs, trace, alpha)

  def _mode_finding(self, cs, ref_probs, ref_valid):
    """ref_probs [R, L, E] of the whole reference set; ref_valid [R]."""
    w0 = jax.vmap(pw_lib.base_weights)(cs)
    layers = self.ec.spec.layers

    def one(c, w):
      w_refs = jax.vmap(lambda p: pw_lib.core_weights(p, c.core, layers))(ref_probs)
      return methods.mode_finding(c, w, w_refs, ref_valid, self.ec.method)

    return self._outcome(cs, jax.vmap(one)(cs, w0))

  def _random_pathway(self, cs, keys):
    """The random-row control (`methods.random_pathway`); keys [Q] one PRNG key per sample."""
    return self._outcome(cs, jax.vmap(methods.random_pathway)(keys, cs))

  def _path_scores(self, params, cs, tests, seq_probs, path):
    """Choice scores [Q, P, C] of the test samples at every point of a path [Q, P, C, Kc].

    Evaluated as the final pathway is (eval mode, per-sequence rows), from
    the test samples' prefix states (kept from their base pass, or
    `prepare_tests`): only the last-token window runs through the layers
    from the first critical one on, so the final evaluation and the accuracy
    after each NGD step (the paper's Fig. 6) cost little; equal to
    `analyze_remixed` up to rounding.
    """
    mode = self.ec.eval_pathway_mode
    scores_fn = losses.PrefixLoss.make_scores(params, self.config, self.ec, mode)
    anchors = self._anchors(seq_probs)[:, None]  # [Q, 1, S, C, E]

    def one(c, st, a, ws):
      return jax.vmap(lambda w: scores_fn(w, c, st, a)[0])(ws)  # [P, C]

    return jax.vmap(one)(cs, tests, anchors, path)

  def _baseline(self, kind, params, tests, data, weights, ids):
    """A prompt trained per test sample (`baselines.run`) -> baselines.PromptOutcome.

    tests [Q, ...]; data: the neighbours' plain ChoiceBatch [Q, N, ...]; weights
    [Q, N]; ids [P]: the tokens that initialize the prompt.
    """
    return baselines.run(kind, params, self.config, self.ec, tests, data, weights, ids)

  def _train_prompt(self, kind, params, data, order, ids):
    """One prompt trained on a reference set (`baselines.train`) -> baselines.TrainedPrompt.

    data: ChoiceBatch [R, S, T]; order int32 [St, Bt] mini-batch rows; ids [P].
    """
    bc = self.ec.baseline
    layer_ids = baselines.prefix_layer_ids(bc, self.config, self.ec.spec.layers)
    return baselines.train(kind, params, self.config, self.ec.loss, bc, layer_ids, data, order, ids)

  def _prompted(self, kind, params, prompt, tests):
    """Scores [Q, C] of a test batch [Q, ...] with a trained prompt (`baselines.prompted`)."""
    return baselines.prompted(kind, params, self.config, prompt, tests)


@functools.lru_cache(maxsize=16)
def shared(config: MoeConfig, ec: EngineConfig, loss_backend=losses.PrefixLoss) -> Engine:
  """The Engine of these settings, one per process: its compiled programs are reused.

  An Engine is a pure function of (config, ec, loss_backend), all frozen and
  hashable; runs in one process with equal settings (the benchmarks of an
  ablation grid, repeated `c3po_jax.run` calls in a notebook) trace and
  compile each program once instead of once per run.
  """
  return Engine(config, ec, loss_backend)
