"""One benchmark's shared state, and one ablation setting run on it.

`Shared` holds what no setting of a study changes: the test samples' base
pass, the reference set, their encoded prompts, and the neighbourhoods
(found once per k / epsilon and reused by every kernel, layer set, core
size and step count). Engines (one per distinct pathway slice and method
hyper-parameters: each compiles once) and prefix-state stores (one per first
critical layer: a state holds the layers from it on) are shared by all
benchmarks through `Models`. A token position other than the run's needs its
own base pass and reference set (the re-mixed token changes them): its own
`Shared`, built on a runner that batches at that position.

Dimensions: Q test samples, N neighbours.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from c3po_jax.neighbours import search
from c3po_jax.remix import batch
from c3po_jax.remix.scoring import pad_to, predictions
from c3po_jax.run import pipeline
from c3po_jax.run import runner as runner_lib
from c3po_jax.run.config import RunConfig


class Models:
  """The run's runner plus the engines and stores the settings need (built on first use)."""

  def __init__(self, runner: runner_lib.Runner):
    self.runner = runner
    self._engines: dict[str, object] = {}
    first = min(runner.engine.ec.spec.layers)
    # Prefix states are keyed by prompt, not by the re-mixed tokens: one store
    # per token position (and count) and first critical layer.
    self._stores: dict[tuple, object] = {('prefix', first, position(runner.rc)): runner.states}

  def engine(self, rc: RunConfig):
    eng = runner_lib.make_engine(rc, self.runner.config)
    key = repr((eng.ec, runner_lib.backend_name(rc)))
    return self._engines.setdefault(key, eng)

  def variant(self, rc: RunConfig) -> runner_lib.Runner:
    """The runner with rc's settings: its engine, and the store for its first critical layer."""
    out = copy.copy(self.runner)  # shares params, tokenizer, mesh, the current benchmark
    out.rc = rc
    out.engine = self.engine(rc)
    backend = runner_lib.backend_name(rc)
    key = (backend, min(out.engine.ec.spec.layers), position(rc))
    if backend != 'prefix':
      out.states = None
    elif key not in self._stores:
      self._stores[key] = runner_lib.make_store(rc, out.engine, self.runner.params)
    out.states = self._stores.get(key)
    return out


def position(rc: RunConfig) -> tuple:
  """The re-mixed tokens: position and count (1 where the config has no count)."""
  return (rc.method.token_position, getattr(rc.method, 'token_count', 1))


@dataclasses.dataclass
class Shared:
  """A benchmark's base pass, reference set and neighbourhoods, at one token position."""

  name: str
  runner: runner_lib.Runner  # batches at this position
  test: list
  prompts: list
  base: runner_lib.PromptsAnalysis
  refs: object  # references.ReferenceSet
  ref_prompts: list
  _neighbourhoods: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def build(cls, name: str, runner, test, pool) -> Shared:
    prompts = runner.encode(test)
    position = runner.rc.method.token_position
    base = runner.analyze(test, prompts, f'{name} base ({position})', role='test')
    refs = runner.reference_set(pool)
    return cls(name, runner, test, prompts, base, refs, runner.encode(refs.examples))

  @property
  def gold(self) -> np.ndarray:
    return np.asarray([e.gold for e in self.test])

  @property
  def base_correct(self) -> np.ndarray:
    return predictions(self.base.scores, self.base.cont_chars)[0] == self.gold

  def neighbours(self, rc: RunConfig) -> search.Neighbourhood:
    """The neighbourhood of rc's k / epsilon (found once, then reused)."""
    n = rc.neighbourhood
    key = (n.k, n.epsilon, n.max_similarity, n.ball_cap)
    if key not in self._neighbourhoods:
      self._neighbourhoods[key] = search.find(
        self.base.embeddings,
        self.refs.embeddings,
        k=n.k,
        epsilon=n.epsilon,
        max_similarity=n.max_similarity,
        ball_cap=n.ball_cap,
      )
    return self._neighbourhoods[key]


def run_setting(shared: Shared, models: Models, rc: RunConfig) -> list[dict]:
  """NGD under rc on every test sample of `shared`: one record per sample.

  A record: id, correct, base_correct, prediction, step_correct (the
  accuracy path, with the last token re-mixed), topk_new, neighbours
  (valid count), fallback, after (the final core weights [C, Kc], core in
  the base ranking's order).
  """
  runner = models.variant(rc)
  runner.test = shared.test
  nbh = shared.neighbours(rc)
  weights = pipeline.kernel_weights(rc, shared.refs, nbh)
  bs = rc.execution.batch_size
  base_correct = shared.base_correct
  records = []
  for start in range(0, len(shared.test), bs):
    idx = list(range(start, min(start + bs, len(shared.test))))
    inputs = batch.BatchInputs(
      runner, idx, pad_to(idx, bs), shared.prompts, shared.base, shared.refs, nbh, weights,
      shared.ref_prompts,
    )  # fmt: skip
    scores, extras = batch.method_batch('ngd', inputs)
    for j, i in enumerate(idx):
      pred = int(predictions(scores[j][None], shared.base.cont_chars[i][None])[0][0])
      ex = extras[j]
      records.append(
        {
          'id': shared.test[i].id,
          'prediction': pred,
          'correct': pred == int(shared.test[i].gold),
          'base_correct': bool(base_correct[i]),
          'step_correct': ex.get('step_correct'),
          'topk_new': ex.get('topk_new'),
          'neighbours': int(nbh.valid[i].sum()),
          'fallback': ex.get('fallback'),
          'after': ex['pathway']['after'],
        }
      )
  return records
