"""The trained-prompt baselines of the paper's Table 1: soft prompts and prefix tuning.

As the paper trains them (`--baseline_scope=references`, the default): one
prompt per benchmark, "trained on the full reference sets with the base
model frozen" (section 4.1), then applied unchanged to every test sample,
so a test sample costs one forward with the prompt (`train`, `prompted`).
The prompt is fitted with Optax (Adam, cosine schedule, mini-batches drawn
in a fixed shuffled order, steps in `lax.scan`) to the mean over a
mini-batch of NGD's per-sample loss (`scoring.choice_loss` on each
reference's gold answer).

Per test sample (`--baseline_scope=neighbours`, kept for comparison, not
the paper's): each sample learns its own prompt from its neighbours only,
on the same kernel-weighted neighbour loss NGD uses (`fit`, `run`).

The model weights never change: they enter through `stop_gradient` and
only the prompt is differentiated.

* `soft_prompt` (prompt tuning, Lester et al. 2021): P embeddings in front of
  every sequence (`transformer.forward_hidden(prefix_embeds=...)`),
  initialized from the embeddings of the first P tokens of a fixed
  instruction (cycled if it is shorter).
* `prefix_tuning` (Li & Liang 2021): P key/value slots in every layer, or in
  the critical layers only (`kv_prefix=`), initialized with that
  instruction's own keys and values (its prefill cache). With every layer
  prefixed, both methods start out as the model after the instruction.

Step size: the variables are offsets in units of the initial prompt's RMS
(theta = theta0 + rms(theta0) * delta, one scale per tensor), so Adam's step
of about lr per coordinate moves the prompt by about lr of its own scale,
whatever the model's embedding or key scale. The schedule decays the
learning rate over the steps like NGD's (cosine, to 1e-3 of it).

A step or result that is not finite (a NaN loss, gradient, prompt or
choice score) marks the prompt (or the sample): its test samples then keep
the base model's answer.

Dimensions: Q test samples, N neighbours, R training references, Bt
mini-batch, S sequences per sample, T tokens, C choices, P prompt length,
D model, L layers, KV key/value heads, Dh head dim, St optimization steps.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from c3po_jax.remix import losses, scoring
from models import decode, transformer
from models.config import MoeConfig

KINDS = ('soft_prompt', 'prefix_tuning')
PREFIX_LAYERS = ('all', 'critical')
SCOPES = ('references', 'neighbours')
# What a benchmark's prompt is trained on: every labelled reference candidate, or
# only those the base model answers correctly (the references C3PO keeps).
TRAIN_SETS = ('all', 'correct')
# The instruction whose tokens initialize the prompt (its embeddings, or its keys and values).
INIT_TEXT = 'Answer the question below. Choose the correct answer.'
LR_END_RATIO = 1e-3  # the cosine schedule ends at this fraction of the learning rate


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
  """Hyper-parameters of both baselines (named like the run's settings)."""

  baseline_prefix_len: int = 10
  baseline_steps: int = 10  # per test sample (scope 'neighbours')
  baseline_lr: float = 0.3
  prefix_layers: str = 'all'  # 'all' | 'critical' (prefix tuning)
  baseline_scope: str = 'references'  # SCOPES
  baseline_epochs: int = 2  # passes over the training references (scope 'references')
  baseline_batch_size: int = 16  # references per mini-batch (scope 'references')


@flax.struct.dataclass
class TrainedPrompt:
  """A prompt trained once on a reference set (scope 'references')."""

  prompt: dict  # as `prompt_init` returns it: {'embeds': [P, D]} or {layer: LayerCache}
  losses: jax.Array  # [St] the mini-batch loss before each step
  finite: jax.Array  # bool: every step finite


@flax.struct.dataclass
class PromptOutcome:
  """Test samples answered with their trained prompts; leaves with Q first."""

  scores: jax.Array  # [Q, C] choice scores with the trained prompt (-inf: invalid)
  losses: jax.Array  # [Q, St + 1] neighbour loss before each step and after the last
  finite: jax.Array  # [Q] bool: False -> the sample keeps the base scores


def init_ids(tokenizer, text: str, length: int) -> np.ndarray:
  """The first `length` tokens of text, cycled if it is shorter -> int32 [P]."""
  ids = list(tokenizer(text, add_special_tokens=False)['input_ids'])
  if not ids and length:
    raise ValueError(f'the prompt initialization text {text!r} has no tokens')
  return np.asarray([ids[i % len(ids)] for i in range(length)], np.int32)


def prefix_layer_ids(bc: BaselineConfig, config: MoeConfig, critical) -> tuple[int, ...]:
  """The layers prefix tuning trains a key/value prefix for."""
  if bc.prefix_layers == 'all':
    return tuple(range(config.num_hidden_layers))
  if bc.prefix_layers == 'critical':
    return tuple(critical)
  raise ValueError(f'prefix_layers={bc.prefix_layers!r}, expected one of {PREFIX_LAYERS}')


def prompt_init(kind: str, params, config: MoeConfig, ids: jax.Array, layer_ids) -> dict:
  """The initial prompt (float32) of ids [P].

  soft_prompt: {'embeds': [P, D]}; prefix_tuning: {layer: LayerCache, k and v
  [P, KV, Dh]}, the keys and values the instruction leaves in each layer.
  """
  p = ids.shape[0]
  if kind == 'soft_prompt':
    return {'embeds': params['embed']['embedding'][ids].astype(jnp.float32)}
  if kind != 'prefix_tuning':
    raise ValueError(f'unknown baseline {kind!r}, expected one of {KINDS}')
  if p == 0:
    empty = jax.tree.map(lambda a: a[0], transformer.LayerCache.empty(config, 1, 0, jnp.float32))
    return {i: empty for i in layer_ids}  # k [0, KV, Dh], v [0, KV, Dv]
  _, cache, _ = decode.prefill(params, ids[None], config=config, cache_size=p)
  f32 = lambda a: a[0].astype(jnp.float32)  # [1, P, KV, Dh] -> [P, KV, Dh]
  return {
    i: transformer.LayerCache(k=f32(cache.layers[i].k), v=f32(cache.layers[i].v)) for i in layer_ids
  }


def model_inputs(kind: str, prompt: dict, b: int) -> dict:
  """One prompt -> `scoring.analyze` keyword arguments for a batch of b samples."""
  rows = lambda a: jnp.broadcast_to(a[None], (b,) + a.shape)  # [...] -> [B, ...]
  if kind == 'soft_prompt':
    return {'prefix_embeds': rows(prompt['embeds'])}  # [B, P, D]
  return {'kv_prefix': jax.tree.map(rows, prompt)}  # {layer: LayerCache [B, P, KV, Dh]}


def _rms(a: jax.Array) -> jax.Array:
  """The RMS of a tensor; 1 for an empty or all-zero one (an offset unit)."""
  if a.size == 0:
    return jnp.ones((), jnp.float32)
  r = jnp.sqrt(jnp.mean(jnp.square(a)))
  return jnp.where(r > 0, r, 1.0)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def fit(kind, params, config, loss_kind, bc, layer_ids, test, data, weights, ids):
  """One test sample: trains its prompt on its neighbours, then scores it.

  test: ChoiceBatch [1, S, T] (the sample); data: ChoiceBatch [N, S, T] (its
  neighbours); weights [N] kernel weights; ids [P] the initialization tokens.
  Returns (scores [C], losses [St + 1], finite).
  """
  params = jax.lax.stop_gradient(params)
  theta0 = prompt_init(kind, params, config, ids, layer_ids)
  scale = jax.tree.map(_rms, theta0)
  delta0 = jax.tree.map(jnp.zeros_like, theta0)

  def scores_fn(delta, cs, batch, anchors=None):
    del cs, anchors  # no pathway: the prompt is the only variable
    inputs = model_inputs(kind, _offset_prompt(theta0, scale, delta), batch.size)
    return scoring.analyze(params, batch, config=config, **inputs).scores

  loss_fn = losses.weighted_loss(scores_fn, loss_kind)
  objective = lambda delta: loss_fn(delta, None, data, weights)
  schedule = optax.cosine_decay_schedule(
    bc.baseline_lr, decay_steps=max(bc.baseline_steps, 1), alpha=LR_END_RATIO
  )
  opt = optax.adam(schedule)

  def step(carry, _):
    delta, state = carry
    loss, grad = jax.value_and_grad(objective)(delta)
    updates, state = opt.update(grad, state, delta)
    delta = optax.apply_updates(delta, updates)
    return (delta, state), (loss, jnp.isfinite(loss) & _all_finite(grad))

  (delta, _), (trace, oks) = jax.lax.scan(
    step, (delta0, opt.init(delta0)), None, length=bc.baseline_steps
  )
  final = objective(delta)
  scores = scores_fn(delta, None, test)[0]  # [C]
  valid = test.choice_valid[0]
  finite = jnp.all(oks) & jnp.isfinite(final) & _all_finite(delta)
  finite = finite & jnp.all(jnp.isfinite(scores) | ~valid)
  return scores, jnp.concatenate([trace, final[None]]), finite


def run(kind: str, params, config: MoeConfig, ec, tests, data, weights, ids) -> PromptOutcome:
  """Both baselines, batched: `fit` under `jax.vmap` over Q test samples.

  tests: ChoiceBatch [Q, S, T]; data: the neighbours' ChoiceBatch [Q, N, S, T];
  weights [Q, N]; ids [P] (shared). ec: the engine config (its `baseline`
  settings, loss and critical layers).
  """
  bc = ec.baseline
  layer_ids = prefix_layer_ids(bc, config, ec.spec.layers)

  def one(test, d, w):
    test = jax.tree.map(lambda a: a[None], test)  # [1, S, T]
    return fit(kind, params, config, ec.loss, bc, layer_ids, test, d, w, ids)

  scores, trace, finite = jax.vmap(one)(tests, data, weights)
  return PromptOutcome(scores=scores, losses=trace, finite=finite)


def _offset_prompt(theta0, scale, delta):
  return jax.tree.map(lambda t, s, d: t + s * d, theta0, scale, delta)


def train(kind, params, config, loss_kind, bc, layer_ids, data, order, ids) -> TrainedPrompt:
  """One prompt on a training set, in mini-batches (the paper's form).

  data: ChoiceBatch [R, S, T] (every training reference, one padded shape);
  order: int32 [St, Bt], the rows of each step's mini-batch; ids [P] the
  initialization tokens. Each step: Adam on the mean of `choice_loss` over
  the mini-batch, with the cosine schedule over the St steps.
  """
  params = jax.lax.stop_gradient(params)
  theta0 = prompt_init(kind, params, config, ids, layer_ids)
  scale = jax.tree.map(_rms, theta0)
  delta0 = jax.tree.map(jnp.zeros_like, theta0)

  def objective(delta, rows):
    batch = jax.tree.map(lambda a: a[rows], data)  # [Bt, S, T]
    inputs = model_inputs(kind, _offset_prompt(theta0, scale, delta), batch.size)
    scores = scoring.analyze(params, batch, config=config, **inputs).scores
    return jnp.mean(scoring.choice_loss(scores, batch.gold, batch.choice_valid, loss_kind))

  steps = order.shape[0]
  schedule = optax.cosine_decay_schedule(
    bc.baseline_lr, decay_steps=max(steps, 1), alpha=LR_END_RATIO
  )
  opt = optax.adam(schedule)

  def step(carry, rows):
    delta, state = carry
    loss, grad = jax.value_and_grad(objective)(delta, rows)
    updates, state = opt.update(grad, state, delta)
    delta = optax.apply_updates(delta, updates)
    return (delta, state), (loss, jnp.isfinite(loss) & _all_finite(grad))

  (delta, _), (trace, oks) = jax.lax.scan(step, (delta0, opt.init(delta0)), order)
  prompt = _offset_prompt(theta0, scale, delta)
  return TrainedPrompt(prompt=prompt, losses=trace, finite=jnp.all(oks) & _all_finite(prompt))


def prompted(kind: str, params, config: MoeConfig, prompt: dict, tests) -> jax.Array:
  """Choice scores [Q, C] of test samples [Q, S, T] answered with one trained prompt."""
  return scoring.analyze(
    params, tests, config=config, **model_inputs(kind, prompt, tests.size)
  ).scores


def minibatch_order(num_rows: int, batch_size: int, epochs: int, seed: int = 0) -> np.ndarray:
  """int32 [St, Bt]: each epoch a fresh shuffle of the rows, cut into mini-batches.

  The last mini-batch of an epoch is filled from the start of the same
  shuffle, so every step has Bt rows and one compiled shape.
  """
  if num_rows < 1:
    raise ValueError('no references to train the prompt on')
  bt = min(batch_size, num_rows)
  per_epoch = -(-num_rows // bt)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(epochs):
    perm = rng.permutation(num_rows)
    perm = np.concatenate([perm, perm[: per_epoch * bt - num_rows]])
    out.append(perm.reshape(per_epoch, bt))
  return np.concatenate(out).astype(np.int32) if out else np.zeros((0, bt), np.int32)
