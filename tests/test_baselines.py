"""The trained-prompt baselines (soft prompt, prefix tuning) and the model inputs they use."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3po_jax.remix import baselines, batch, engine, scoring
from c3po_jax.remix import pathway as pw_lib
from c3po_jax.tasks.encoding import EncodedPrompt
from c3po_jax.testing import checkpoints
from models import transformer
from models.families.olmoe import TINY

SPEC = pw_lib.PathwaySpec.make(TINY.num_hidden_layers, TINY.num_experts, 'last:2', 6)
IDS = np.asarray([5, 17, 42, 9], np.int32)  # the "instruction" tokens: P = 4


@pytest.fixture(scope='module')
def model():
  """Random tiny model with experts scaled up so that routing moves logits."""
  return checkpoints.loud_experts(transformer.init_params(TINY, jax.random.PRNGKey(0)))


# Reference computations run under `jax.jit`: run op by op, JAX compiles one
# program per primitive and shape (hundreds per test). Static settings are
# bound, params and data are arguments (not compile-time constants).
_forward = jax.jit(transformer.forward, static_argnames='config')
_prompt_init = jax.jit(baselines.prompt_init, static_argnums=(0, 2, 4))


def _prompts(rng, n, fmt='mc', choices=3):
  out = []
  for _ in range(n):
    ctx = tuple(int(x) for x in rng.integers(3, TINY.vocab_size, rng.integers(4, 12)))
    if fmt == 'mc':
      conts = tuple((10 + c,) for c in range(choices))
    else:
      conts = tuple(
        tuple(int(x) for x in rng.integers(3, TINY.vocab_size, rng.integers(1, 4)))
        for _ in range(choices)
      )
    out.append(EncodedPrompt(ctx, conts, int(rng.integers(choices)), (1,) * choices, fmt))
  return out


def _engine(**kw):
  """An engine with baseline settings kw (a small lr: the tiny model's top-k routing
  makes its loss rough); one per setting, so that each compiles once."""
  return _engine_of(baselines.BaselineConfig(**{'baseline_steps': 5, 'baseline_lr': 0.01, **kw}))


@functools.cache
def _engine_of(bc):
  return engine.shared(TINY, engine.EngineConfig(spec=SPEC, baseline=bc))


def _problem(q=3, k=3, fmt='mc', seed=0):
  rng = np.random.default_rng(seed)
  test = scoring.make_batch(_prompts(rng, q, fmt), num_choices=3)
  nb = scoring.make_batch(_prompts(rng, q * k, fmt), num_choices=3)
  nb = jax.tree.map(lambda x: x.reshape((q, k) + x.shape[1:]), nb)
  w = jnp.asarray(rng.uniform(0.1, 1.0, (q, k)), jnp.float32)
  return test, nb, w


def _padded_tokens():
  """Two right-padded rows [2, 8] and their mask."""
  tokens = jnp.asarray([[7, 3, 9, 11, 4, 0, 0, 0], [21, 8, 30, 2, 6, 13, 5, 40]], jnp.int32)
  mask = jnp.asarray([[1] * 5 + [0] * 3, [1] * 8], jnp.int32)
  return tokens, mask


# ---- the model inputs ----


@pytest.mark.slow
def test_absent_or_empty_prefix_is_the_plain_forward(model):
  tokens, mask = _padded_tokens()
  fwd = functools.partial(_forward, model, tokens, config=TINY, attention_mask=mask)
  plain = fwd()
  empty_kv = jnp.zeros((2, 0, TINY.num_key_value_heads, TINY.head_dim))
  for kw in (
    {'prefix_embeds': None, 'kv_prefix': None},
    {'prefix_embeds': jnp.zeros((2, 0, TINY.hidden_size))},
    {'kv_prefix': {i: transformer.LayerCache(k=empty_kv, v=empty_kv) for i in range(3)}},
  ):
    out = fwd(**kw)
    np.testing.assert_array_equal(out.logits, plain.logits)
    np.testing.assert_array_equal(out.router_probs, plain.router_probs)
    np.testing.assert_array_equal(out.last_index, plain.last_index)


@pytest.mark.slow
@pytest.mark.parametrize('kind', baselines.KINDS)
def test_prompt_of_an_instruction_is_that_instruction(model, kind):
  """Initialized from tokens u, either prompt is u written in front of the tokens.

  Also with a pathway (its site moves with the soft prompt) and padding.
  """
  tokens, mask = _padded_tokens()
  b, p = tokens.shape[0], len(IDS)
  site = jnp.asarray([2, 6])
  pathway = {2: jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (b, TINY.num_experts)))}
  joined = jnp.concatenate([jnp.broadcast_to(jnp.asarray(IDS), (b, p)), tokens], axis=1)
  want = _forward(
    model,
    joined,
    config=TINY,
    attention_mask=jnp.concatenate([jnp.ones((b, p), jnp.int32), mask], 1),
    pathway=pathway,
    pathway_index=site + p,
  )
  prompt = _prompt_init(kind, model, TINY, jnp.asarray(IDS), range(3))
  got = _forward(
    model,
    tokens,
    config=TINY,
    attention_mask=mask,
    pathway=pathway,
    pathway_index=site,
    **baselines.model_inputs(kind, prompt, b),
  )
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(got.logits[real], want.logits[:, p:][real], atol=2e-5)
  np.testing.assert_array_equal(got.last_index, want.last_index - p)
  np.testing.assert_allclose(got.router_probs[2, 1, 6], want.router_probs[2, 1, 6 + p], atol=1e-6)


def test_init_ids_cycle_the_instruction():
  tok = lambda text, add_special_tokens: {'input_ids': [4, 5, 6]}
  assert baselines.init_ids(tok, 'x', 7).tolist() == [4, 5, 6, 4, 5, 6, 4]
  assert baselines.init_ids(tok, 'x', 2).tolist() == [4, 5]
  assert baselines.prefix_layer_ids(baselines.BaselineConfig(), TINY, (1, 2)) == (0, 1, 2)
  crit = baselines.BaselineConfig(prefix_layers='critical')
  assert baselines.prefix_layer_ids(crit, TINY, (1, 2)) == (1, 2)


# ---- the methods ----


@pytest.mark.slow
@pytest.mark.parametrize(
  'kind,fmt,layers',
  [
    ('soft_prompt', 'mc', 'all'),
    ('soft_prompt', 'rc', 'all'),
    ('prefix_tuning', 'mc', 'all'),
    ('prefix_tuning', 'mc', 'critical'),
  ],
)
def test_training_lowers_the_neighbour_loss(model, kind, fmt, layers):
  eng = _engine(prefix_layers=layers)
  test, nb, w = _problem(fmt=fmt)
  out = getattr(eng, kind)(model, test, nb, w, IDS)
  losses = np.asarray(out.losses)
  assert losses.shape == (3, 6) and np.all(np.asarray(out.finite))
  assert np.all(losses[:, -1] < losses[:, 0] - 1e-4), losses


@pytest.mark.slow
@pytest.mark.parametrize('kind', baselines.KINDS)
def test_zero_length_prompt_answers_as_base(model, kind):
  eng = _engine(baseline_prefix_len=0)
  test, nb, w = _problem()
  out = getattr(eng, kind)(model, test, nb, w, IDS[:0])
  base = eng.analyze(model, test)
  assert np.all(np.asarray(out.finite))
  np.testing.assert_allclose(out.scores, base.scores, atol=1e-6)
  losses = np.asarray(out.losses)
  np.testing.assert_allclose(losses, losses[:, :1] * np.ones_like(losses), atol=1e-6)


@pytest.mark.parametrize('kind', baselines.KINDS)
@pytest.mark.slow
def test_batched_equals_per_sample(model, kind):
  eng = _engine()
  test, nb, w = _problem()
  batched = getattr(eng, kind)(model, test, nb, w, IDS)
  for i in range(3):
    one = lambda x, i=i: x[i : i + 1]
    single = getattr(eng, kind)(
      model, jax.tree.map(one, test), jax.tree.map(one, nb), w[i : i + 1], IDS
    )
    np.testing.assert_allclose(single.scores[0], batched.scores[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(single.losses[0], batched.losses[i], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('kind', baselines.KINDS)
def test_nan_is_flagged(model, kind):
  test, nb, w = _problem()
  out = getattr(_engine(), kind)(model, test, nb, w.at[0, 1].set(jnp.nan), IDS)
  assert np.asarray(out.finite).tolist() == [False, True, True]
  if kind == 'soft_prompt':  # one compile more is enough: the same code path
    out = getattr(_engine(baseline_lr=float('inf')), kind)(model, test, nb, w, IDS)
    assert not np.any(np.asarray(out.finite))


def test_rows_fall_back_to_base_and_say_why():
  """A non-finite sample and one without neighbours keep the base scores."""
  base = np.arange(12, dtype=np.float32).reshape(4, 3)
  out = baselines.PromptOutcome(
    scores=np.full((3, 3), -1.0, np.float32),
    losses=np.asarray([[1.0, 0.5], [np.nan, np.nan], [1.0, 1.0]], np.float32),
    finite=np.asarray([True, False, True]),
  )
  b = types.SimpleNamespace(
    idx=[0, 2, 3],
    nbh=types.SimpleNamespace(valid=np.asarray([[True], [True], [True], [False]])),
    base=types.SimpleNamespace(scores=base),
  )
  scores, extras = batch.baseline_rows('soft_prompt', out, b)
  np.testing.assert_array_equal(scores, [[-1, -1, -1], base[2], base[3]])
  assert 'fallback' not in extras[0] and extras[0]['loss_after'] == 0.5
  assert extras[1]['fallback'] == 'nan' and extras[2]['fallback'] == 'no_neighbours'


@pytest.mark.slow
def test_pipeline_rows_and_summary(tiny_checkpoint, tmp_path):
  """Both baselines per sample through the run: rows with their loss traces, summary."""
  from c3po_jax.run import pipeline, results
  from c3po_jax.run.config import RunConfig

  rc = RunConfig.make(
    checkpoint_dir=tiny_checkpoint,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'soft_prompt', 'prefix_tuning'),
    max_test_samples=2,
    max_reference_samples=16,
    batch_size=2,
    baseline_scope='neighbours',
    baseline_steps=2,
    baseline_prefix_len=3,
    critical_layers='last:2',
    core_experts=4,
    max_similarity=1.0,
    output_dir=str(tmp_path / 'run'),
    cache_dir=str(tmp_path / 'cache'),
  )
  summary = pipeline.run(rc)
  assert list(summary) == ['base', 'prefix_tuning', 'soft_prompt']  # Table 1 order
  rows = results.read_rows(str(tmp_path / 'run' / 'results.jsonl'))
  for r in rows:
    if r['method'] != 'base':
      assert len(r['losses']) == 3 and r['loss_before'] == r['losses'][0]
      assert 'fallback' not in r and len(r['neighbours']) >= 1
  written = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert {'soft_prompt', 'prefix_tuning'} <= set(written['diagnostics'])


# ---- the paper's form: one prompt per benchmark, trained on its references ----


def test_minibatch_order_covers_every_row_each_epoch():
  order = baselines.minibatch_order(10, 4, 3, seed=0)
  assert order.shape == (9, 4) and order.dtype == np.int32  # 3 steps per epoch
  for e in range(3):
    assert set(order[3 * e : 3 * e + 3].ravel()) == set(range(10))
  assert not np.array_equal(order[:3], order[3:6])  # a fresh shuffle each epoch
  assert baselines.minibatch_order(3, 16, 1).shape == (1, 3)  # Bt <= the rows
  with pytest.raises(ValueError, match='no references'):
    baselines.minibatch_order(0, 4, 1)


def _training_set(n=12, fmt='mc', seed=3):
  rng = np.random.default_rng(seed)
  return scoring.make_batch(_prompts(rng, n, fmt), num_choices=3)


def _set_loss(eng, kind, model, prompt, data):
  scores = eng.prompted(kind, model, prompt, data)
  return float(jnp.mean(scoring.choice_loss(scores, data.gold, data.choice_valid, 'choice_ce')))


@pytest.mark.slow
@pytest.mark.parametrize('kind,fmt', [('soft_prompt', 'mc'), ('prefix_tuning', 'rc')])
def test_reference_training_lowers_the_training_set_loss(model, kind, fmt):
  """Trained once on a reference set, the prompt fits that set better than its start."""
  eng = _engine(baseline_lr=0.05)
  data = _training_set(fmt=fmt)
  order = baselines.minibatch_order(12, 4, 4)
  out = eng.train_prompt(kind, model, data, order, IDS)
  assert bool(out.finite) and np.asarray(out.losses).shape == (12,)
  layer_ids = baselines.prefix_layer_ids(eng.ec.baseline, TINY, SPEC.layers)
  start = _prompt_init(kind, model, TINY, jnp.asarray(IDS), layer_ids)
  before = _set_loss(eng, kind, model, start, data)
  after = _set_loss(eng, kind, model, out.prompt, data)
  assert after < before - 1e-3, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize('kind', baselines.KINDS)
def test_prompted_with_the_start_prompt_is_the_model_after_the_instruction(model, kind):
  """The untrained prompt answers like the plain model reading the instruction first."""
  eng = _engine()
  data = _training_set(n=3)
  layer_ids = baselines.prefix_layer_ids(eng.ec.baseline, TINY, SPEC.layers)
  start = _prompt_init(kind, model, TINY, jnp.asarray(IDS), layer_ids)
  got = np.asarray(eng.prompted(kind, model, start, data))
  rng = np.random.default_rng(3)
  with_text = [
    EncodedPrompt(tuple(IDS.tolist()) + p.context, p.continuations, p.gold, p.cont_chars, 'mc')
    for p in _prompts(rng, 3)
  ]
  want = np.asarray(eng.analyze(model, scoring.make_batch(with_text, num_choices=3)).scores)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_rows_of_a_non_finite_trained_prompt_keep_the_base_answer(model):
  from c3po_jax.run.prompts import Prompt

  eng = _engine()
  base = np.arange(6, dtype=np.float32).reshape(2, 3)
  tests = _training_set(n=2)
  layer_ids = baselines.prefix_layer_ids(eng.ec.baseline, TINY, SPEC.layers)
  start = _prompt_init('soft_prompt', model, TINY, jnp.asarray(IDS), layer_ids)
  runner = types.SimpleNamespace(
    engine=eng,
    params=model,
    rc=types.SimpleNamespace(method=types.SimpleNamespace(baseline_scope='references')),
    batch=lambda prompts: tests,
  )
  b = batch.BatchInputs(runner, [0, 1], [0, 1], [None, None], None, None, None, None, None)
  b.base = types.SimpleNamespace(scores=base)
  for finite in (True, False):
    b.trained = {'soft_prompt': Prompt(start, finite, {})}
    scores, extras = batch.method_batch('soft_prompt', b)
    if finite:
      np.testing.assert_allclose(scores, eng.prompted('soft_prompt', model, start, tests)[:2])
      assert extras == [{}, {}]
    else:
      np.testing.assert_array_equal(scores, base)
      assert [e['fallback'] for e in extras] == ['nan', 'nan']


def _reference_scope_config(ckpt, tmp_path, **kw):
  from c3po_jax.run.config import RunConfig

  settings = dict(
    checkpoint_dir=ckpt,
    benchmark='arc_challenge',
    reference=('openbookqa',),
    methods=('base', 'soft_prompt', 'prefix_tuning'),
    max_test_samples=2,
    max_reference_samples=8,
    batch_size=2,
    baseline_epochs=1,
    baseline_batch_size=4,
    baseline_prefix_len=3,
    critical_layers='last:2',
    core_experts=4,
    output_dir=str(tmp_path / 'run'),
    cache_dir=str(tmp_path / 'cache'),
  )
  settings.update(kw)
  return RunConfig.make(**settings)


@pytest.mark.slow
def test_pipeline_trains_one_prompt_per_benchmark_and_resume_reuses_it(
  tiny_checkpoint, tmp_path, monkeypatch
):
  """The paper's form end to end: one prompt trained on the references, saved, reused."""
  from c3po_jax.run import pipeline, results
  from c3po_jax.run.runner import Runner

  rc = _reference_scope_config(tiny_checkpoint, tmp_path)
  pipeline.run(rc)
  run = tmp_path / 'run'
  for kind in baselines.KINDS:
    info = json.loads((run / f'{kind}_prompt.json').read_text())
    assert info['num_references'] == 8 and info['steps'] == 2 and info['finite']
    assert len(info['losses']) == 2 and (run / f'{kind}_prompt.npz').exists()
  rows = results.read_rows(str(run / 'results.jsonl'))
  assert {r['method'] for r in rows} == {'base', 'soft_prompt', 'prefix_tuning'}
  assert all('losses' not in r for r in rows)  # no per-sample training
  summary = json.loads((run / 'summary.json').read_text())
  assert summary['trained_prompts']['soft_prompt']['num_references'] == 8
  assert summary['settings_in_effect']['baseline_scope'] == 'references'

  # Interrupted after training (the baselines' rows lost), resumed: the saved
  # prompts answer again, nothing is retrained, the rows come out the same.
  first = {(r['method'], r['id']): r for r in rows}
  results.write_rows(str(run / 'results.jsonl'), [r for r in rows if r['method'] == 'base'])
  calls = []
  real_open = Runner.open

  def counting_open(rc, mesh=None):
    runner = real_open(rc, mesh)
    train = runner.engine.train_prompt
    if not getattr(train, 'counting', False):  # engines are shared per process: wrap once
      counting = lambda *a: calls.append(a[0]) or train(*a)
      counting.counting = True
      monkeypatch.setattr(runner.engine, 'train_prompt', counting)  # undone after the test
    return runner

  monkeypatch.setattr(Runner, 'open', counting_open)
  pipeline.run(rc.replace(resume=True))
  assert calls == []
  again = results.read_rows(str(run / 'results.jsonl'))
  assert len(again) == 6
  for r in again:
    assert r['choice_scores'] == first[r['method'], r['id']]['choice_scores']

  # Other references: the key differs, so the prompt is trained again.
  pipeline.run(rc.replace(max_reference_samples=6, overwrite=True))
  assert sorted(calls) == sorted(baselines.KINDS)
  info = json.loads((run / 'soft_prompt_prompt.json').read_text())
  assert info['num_references'] == 6


@pytest.mark.slow
def test_benchmarks_sharing_a_runner_keep_their_own_prompts(tiny_checkpoint, tmp_path):
  """A suite's benchmarks share one runner: each prompt lands in its own benchmark's folder."""
  from c3po_jax.run import pipeline

  first = _reference_scope_config(
    tiny_checkpoint, tmp_path, methods=('base', 'soft_prompt'), output_dir=str(tmp_path / 'arc')
  )
  second = first.replace(
    benchmark='arc_easy', max_reference_samples=6, output_dir=str(tmp_path / 'easy')
  )
  runner = pipeline.open_runner(first)
  pipeline.run(first, runner)
  pipeline.run(second, runner)
  arc = json.loads((tmp_path / 'arc' / 'soft_prompt_prompt.json').read_text())
  easy = json.loads((tmp_path / 'easy' / 'soft_prompt_prompt.json').read_text())
  assert arc['num_references'] == 8 and easy['num_references'] == 6
  assert arc['key'] != easy['key']
