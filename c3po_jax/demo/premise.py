"""The premise diagnostic: does a model's routing carry what C3PO's neighbours can fix?

C3PO rests on a premise: a test sample is mis-routed, and its successful
neighbours would fail under that wrong routing, so lowering their loss moves
the routing towards what the test sample needs. Per test sample this measures,
with the pipeline's own neighbour search (reference set, MoEE embedding, kNN
with the overlap filter):

  transfer gap   the neighbours' loss (CE over their choices) with the test
                 sample's full base router rows of the critical layers
                 injected at their last context token (pathway_mode 'topk'),
                 minus their loss under their own routing; split by whether
                 base answers the test sample right or wrong. Positive for
                 wrong-base samples: their neighbours see the mis-routing.
  routing need   test accuracy when the critical layers' last-token routing
                 is replaced by a random row (uniform on the simplex) or by
                 the base routing of a random test sample of another
                 benchmark of the suite (its own rows injected back: base).
  descent        whether the NGD objective's gradient at the base routing
                 points to the neighbours' routing (`premise_descent`):
                 cosine of the descent step with the way there, and how often
                 the steepest-descent expert is one of the neighbours' top-k.
  neighbour source  with a shared reference pool (`suite --shared_references`):
                 the share of neighbours drawn from the test benchmark's own
                 reference sources, i.e. whether the neighbour search finds
                 the test sample's family without the pool telling it.

  python -m c3po_jax.demo.premise --suite=checkpoints/demo/suite \\
      --checkpoint_dir=checkpoints/demo --split=dev

Prints a table and writes --output (JSON). Works for any model and suite.

Dimensions: Q test samples, N neighbours, P (test, neighbour) pairs,
L layers, C critical layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from absl import app, flags, logging

from c3po_jax.common import files
from c3po_jax.demo import premise_descent
from c3po_jax.neighbours import search as neighbours
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.remix import scoring
from c3po_jax.run import pipeline
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig
from c3po_jax.run.runner import Runner, load_model
from c3po_jax.tasks import load_examples, load_references


@functools.partial(jax.jit, static_argnames='config')
def _scores(params, batch, pathway, *, config):
  return scoring.analyze(params, batch, config=config, pathway=pathway, pathway_mode='topk').scores


def choice_ce(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
  """[n] cross-entropy over the valid choices (scores -inf where invalid)."""
  s = np.where(np.isfinite(scores), scores, -1e30)
  m = s.max(axis=-1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=-1))
  return lse - s[np.arange(len(s)), gold]


def score_with(runner: Runner, prompts, rows: np.ndarray | None, layers) -> np.ndarray:
  """[n, C] choice scores; rows [n, L, E] injected on `layers` (None: native routing)."""
  bs = runner.rc.execution.batch_size
  out = []
  for i in range(0, len(prompts), bs):
    chunk = prompts[i : i + bs]
    batch = runner.batch(chunk)
    pathway = None
    if rows is not None:
      r = rows[i : i + bs]
      r = np.concatenate([r, np.repeat(r[-1:], bs - len(r), axis=0)])  # pad like the batch
      pathway = {layer: jax.numpy.asarray(r[:, layer]) for layer in layers}
    s = _scores(runner.params, batch, pathway, config=runner.config)
    out.append(np.asarray(s)[: len(chunk)])
  return np.concatenate(out)


@dataclasses.dataclass
class Benchmark:
  name: str
  runner: Runner
  prompts: list
  gold: np.ndarray
  base_scores: np.ndarray
  base_probs: np.ndarray  # [Q, L, E]
  embeddings: np.ndarray


def _prepare(rc: RunConfig, suite_dir: str, name: str, entry: dict, split: str, model):
  config, params, tok = model
  sub = rc.replace(
    benchmark=os.path.join(suite_dir, entry[split]),
    reference=tuple(os.path.join(suite_dir, r) for r in entry['reference']),
  )
  test = load_examples(sub.data.benchmark, limit=sub.data.max_test_samples)
  pool, _ = load_references(sub.data.reference, max_samples=sub.data.max_reference_samples)
  runner = Runner(sub, config, params, tok)
  runner.begin(test, max(len(e.choices) for e in test + pool))
  prompts = runner.encode(test)
  an = runner.analyze(test, prompts, f'{name} test')
  gold = np.asarray([e.gold for e in test])
  return Benchmark(name, runner, prompts, gold, an.scores, an.router_probs, an.embeddings), pool


def transfer_gap(
  b: Benchmark, pool, layers, k: int, max_similarity: float, own_sources=None
) -> dict:
  """Per test sample: neighbours' loss under own vs the test sample's routing.

  own_sources: the benchmark's own reference sources (a shared pool), or None.
  """
  refs = b.runner.reference_set(pool)
  nbh = neighbours.find(b.embeddings, refs.embeddings, k=k, max_similarity=max_similarity)
  ref_prompts = b.runner.encode(refs.examples)
  ref_gold = np.asarray([e.gold for e in refs.examples])
  own = choice_ce(score_with(b.runner, ref_prompts, None, layers), ref_gold)  # [R]
  qi, ni = np.nonzero(nbh.valid)
  ri = nbh.index[qi, ni]
  pair_prompts = [ref_prompts[j] for j in ri]
  rows = np.asarray(refs.router_probs)[ri].copy()  # [P, L, E]: their own, but for `layers`
  rows[:, list(layers)] = b.base_probs[qi][:, list(layers)]
  moved = score_with(b.runner, pair_prompts, rows, layers)
  moved_loss = choice_ce(moved, ref_gold[ri])
  moved_wrong = np.argmax(moved, axis=-1) != ref_gold[ri]
  kw = pipeline.kernel_weights(b.runner.rc, refs, nbh)
  descent = premise_descent.descent_direction(b.runner, b.base_probs, refs, nbh, kw)
  q = len(b.gold)
  gap = np.full(q, np.nan)
  wrong_frac = np.full(q, np.nan)
  own_loss = np.full(q, np.nan)
  own_share = np.full(q, np.nan)
  own_set = set(own_sources or ())
  is_own = np.asarray([e.task in own_set for e in refs.examples])
  for i in range(q):
    sel = qi == i
    if sel.any():
      gap[i] = float(np.mean(moved_loss[sel] - own[ri[sel]]))
      own_loss[i] = float(np.mean(own[ri[sel]]))
      wrong_frac[i] = float(np.mean(moved_wrong[sel]))
      if own_sources is not None:
        own_share[i] = float(np.mean(is_own[ri[sel]]))
  return {
    'gap': gap,
    'own_loss': own_loss,
    'neighbours_wrong': wrong_frac,
    'descent_cosine': descent['cosine'],
    'descent_hit': descent['hit'],
    'own_share': own_share,
    'references_kept': len(refs),
    'references_candidates': refs.num_candidates,
  }


def _mean(x) -> float | None:
  x = np.asarray(x, float)
  x = x[np.isfinite(x)]
  return None if len(x) == 0 else round(float(np.mean(x)), 4)


def _median(x) -> float | None:
  x = np.asarray(x, float)
  x = x[np.isfinite(x)]
  return None if len(x) == 0 else round(float(np.median(x)), 4)


def diagnose(rc: RunConfig, suite_dir: str, split: str = 'dev', seed: int = 0) -> dict:
  """The diagnostic for every benchmark of the suite, and pooled."""
  manifest = suite_run.read_suite(suite_dir)
  model = load_model(rc)
  config = model[0]
  spec = pw_lib.PathwaySpec.for_model(config, rc.method.critical_layers, rc.method.core_experts)
  layers = spec.layers
  benches, pools = [], []
  for name, entry in manifest['benchmarks'].items():
    b, pool = _prepare(rc, suite_dir, name, entry, split, model)
    benches.append(b)
    pools.append(pool)
  rng = np.random.default_rng(seed)
  keys = ('correct', 'gap', 'own', 'nw', 'same', 'rand', 'other', 'cos', 'hit', 'src')
  per, pooled = {}, {key: [] for key in keys}
  for bi, (b, pool) in enumerate(zip(benches, pools)):
    correct = np.argmax(b.base_scores, axis=-1) == b.gold
    own_sources = manifest['benchmarks'][b.name].get('own_reference_sources')
    nb = rc.neighbourhood
    t = transfer_gap(b, pool, layers, nb.k, nb.max_similarity, own_sources)
    q = len(b.gold)
    same = np.argmax(score_with(b.runner, b.prompts, b.base_probs, layers), -1) == b.gold
    random_rows = b.base_probs.copy()
    random_rows[:, list(layers)] = rng.dirichlet(np.ones(config.num_experts), (q, len(layers)))
    rand = np.argmax(score_with(b.runner, b.prompts, random_rows, layers), -1) == b.gold
    others = [o for oi, o in enumerate(benches) if oi != bi]
    other_rows = b.base_probs.copy()
    if others:
      for i in range(q):
        o = others[int(rng.integers(len(others)))]
        other_rows[i, list(layers)] = o.base_probs[int(rng.integers(len(o.gold))), list(layers)]
      other = np.argmax(score_with(b.runner, b.prompts, other_rows, layers), -1) == b.gold
    else:
      other = np.full(q, np.nan)
    values = (correct, t['gap'], t['own_loss'], t['neighbours_wrong'], same, rand, other)
    values += (t['descent_cosine'], t['descent_hit'], t['own_share'])
    per[b.name] = summarize(*values)
    per[b.name]['references_kept'] = t['references_kept']
    per[b.name]['references_candidates'] = t['references_candidates']
    for key, v in zip(pooled, values):
      pooled[key].append(v)
  cat = {key: np.concatenate(v) for key, v in pooled.items()}
  out = {
    'suite': suite_dir,
    'checkpoint_dir': rc.model.checkpoint_dir,
    'split': split,
    'critical_layers': list(layers),
    'k': rc.neighbourhood.k,
    'max_similarity': rc.neighbourhood.max_similarity,
    'samples_per_benchmark': rc.data.max_test_samples,
    'descent_hit_chance': round(config.num_experts_per_tok / spec.num_core, 4),
    'seed': seed,
    'benchmarks': per,
    'pooled': summarize(*cat.values()),
  }
  return out


def summarize(
  correct, gap, own, neighbours_wrong, same, rand, other, cosine, hit, own_share=None
) -> dict:
  right, wrong = correct.astype(bool), ~correct.astype(bool)
  own_share = np.full(len(correct), np.nan) if own_share is None else own_share
  return {
    'n': int(len(correct)),
    'base_accuracy': _mean(correct),
    'n_base_wrong': int(wrong.sum()),
    'neighbour_own_loss_median': _median(own),
    'gap_mean_base_right': _mean(gap[right]),
    'gap_mean_base_wrong': _mean(gap[wrong]),
    'gap_median_base_right': _median(gap[right]),
    'gap_median_base_wrong': _median(gap[wrong]),
    'neighbours_wrong_base_right': _mean(neighbours_wrong[right]),
    'neighbours_wrong_base_wrong': _mean(neighbours_wrong[wrong]),
    'accuracy_own_rows': _mean(same),
    'accuracy_random_rows': _mean(rand),
    'accuracy_other_benchmark_rows': _mean(other),
    'descent_cosine_base_right': _mean(cosine[right]),
    'descent_cosine_base_wrong': _mean(cosine[wrong]),
    'descent_hit_base_wrong': _mean(hit[wrong]),
    'neighbours_own_sources': _mean(own_share),
  }


COLUMNS = (
  ('n', 'n', '{:d}'),
  ('base', 'base_accuracy', '{:.3f}'),
  ('gap|right', 'gap_mean_base_right', '{:+.3f}'),
  ('gap|wrong', 'gap_mean_base_wrong', '{:+.3f}'),
  ('nbr-fail|right', 'neighbours_wrong_base_right', '{:.3f}'),
  ('nbr-fail|wrong', 'neighbours_wrong_base_wrong', '{:.3f}'),
  ('own-loss', 'neighbour_own_loss_median', '{:.3f}'),
  ('acc:own', 'accuracy_own_rows', '{:.3f}'),
  ('acc:random', 'accuracy_random_rows', '{:.3f}'),
  ('acc:other', 'accuracy_other_benchmark_rows', '{:.3f}'),
  ('cos|right', 'descent_cosine_base_right', '{:+.3f}'),
  ('cos|wrong', 'descent_cosine_base_wrong', '{:+.3f}'),
  ('hit|wrong', 'descent_hit_base_wrong', '{:.3f}'),
  ('nbr-own', 'neighbours_own_sources', '{:.3f}'),
)


def format_table(result: dict) -> str:
  rows = {**result['benchmarks'], 'pooled': result['pooled']}
  width = max(9, *(len(n) for n in rows))
  head = f'{"benchmark":<{width}}' + ''.join(f' {c:>14}' for c, _, _ in COLUMNS)
  lines = [head]
  for name, r in rows.items():
    cells = []
    for _, key, fmt in COLUMNS:
      v = r.get(key)
      cells.append(f' {"-" if v is None else fmt.format(v):>14}')
    lines.append(f'{name:<{width}}' + ''.join(cells))
  lines.append(
    "gap: mean neighbour loss (CE over choices) under the test sample's routing minus under "
    'their own; nbr-fail: share of neighbours answered wrong under it; own-loss: median '
    "neighbour loss under their own routing; acc:X: test accuracy with the critical layers' "
    "last-token routing replaced by X; cos: cosine of NGD's first descent step from the base "
    "(dense mode) with the way to the neighbours' mean routing; hit: share of critical layers "
    "whose steepest-descent expert is one of that routing's top-k (chance: "
    f'{result.get("descent_hit_chance", float("nan")):.3f}); nbr-own: share of neighbours from '
    "the benchmark's own reference sources (a shared pool only)."
  )
  return '\n'.join(lines)


def main(argv):
  del argv
  F = flags.FLAGS
  settings = suite_run.suite_settings(suite_run.read_suite(F.suite))
  rc = RunConfig.make(
    checkpoint_dir=F.checkpoint_dir,
    benchmark='(suite)',
    reference=('(suite)',),
    methods=('base',),
    output_dir=os.path.dirname(F.output) or '.',
    max_test_samples=F.max_test_samples,
    max_reference_samples=F.max_reference_samples,
    batch_size=F.batch_size,
    fmt=settings.get('fmt', 'mc'),
    k=F.k if F.k is not None else settings.get('k', 3),
    max_similarity=(
      F.max_similarity if F.max_similarity is not None else settings.get('max_similarity', 0.95)
    ),
    critical_layers=F.critical_layers or settings.get('critical_layers', 'last:5'),
    cache_dir=F.cache_dir,
    num_plots=0,
  )
  if isinstance(rc.method.critical_layers, int):  # suites written when an int meant 'the last N'
    rc = rc.replace(critical_layers=f'last:{rc.method.critical_layers}')
  logging.info('premise diagnostic with %s', rc)
  result = diagnose(rc, F.suite, F.split, F.seed)
  print(format_table(result))
  os.makedirs(os.path.dirname(F.output) or '.', exist_ok=True)
  files.write_json(F.output, result)
  logging.info('wrote %s', F.output)


if __name__ == '__main__':
  flags.DEFINE_string('suite', 'checkpoints/demo/suite', 'Suite directory (suite.json).')
  flags.DEFINE_string('checkpoint_dir', 'checkpoints/demo', 'The model.')
  flags.DEFINE_string('split', 'dev', 'Suite split of the test samples.')
  flags.DEFINE_string('output', 'runs/premise/premise.json', 'JSON written here.')
  flags.DEFINE_integer('max_test_samples', 100, 'Test samples per benchmark.')
  flags.DEFINE_integer(
    'max_reference_samples', None, 'Reference candidates per benchmark (default: all).'
  )
  flags.DEFINE_integer('batch_size', 25, 'Prompts per jitted batch.')
  flags.DEFINE_integer('k', None, 'Neighbours (default: the suite settings, else 3).')
  flags.DEFINE_float('max_similarity', None, 'Overlap filter (default: the suite settings).')
  flags.DEFINE_string('critical_layers', None, 'Critical layers (default: suite, else last:5).')
  flags.DEFINE_string('cache_dir', '~/.cache/c3po_jax', 'Reference-set cache directory.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random and other-benchmark rows.')
  app.run(main)
