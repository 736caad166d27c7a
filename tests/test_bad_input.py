"""Bad input to a run: a clear one-line error before the model loads, never a wrong result.

Flag values, data files, benchmark names and the output directory are
checked before the model loads (a missing checkpoint proves it: the data error
comes first); corrupt caches are rebuilt; a resumed run must keep its
settings; results carry their provenance and a confidence interval.
"""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from c3po_jax.common import cli
from c3po_jax.neighbours import references
from c3po_jax.run import output as run_output
from c3po_jax.run import pipeline, results
from c3po_jax.run.config import RunConfig
from c3po_jax.tasks import Example, TaskDataError, load_examples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {'id': 'q1', 'question': 'What is 2 plus 2?', 'choices': ['3', '4'], 'answer': 1}


def _jsonl(path, rows) -> str:
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(path)


def _rc(tmp_path, **kw) -> RunConfig:
  args = dict(
    checkpoint_dir=str(tmp_path / 'no-checkpoint'),
    benchmark=_jsonl(tmp_path / 'test.jsonl', [ROW]),
    reference=(_jsonl(tmp_path / 'ref.jsonl', [ROW]),),
    output_dir=str(tmp_path / 'out'),
    cache_dir=str(tmp_path / 'cache'),
  )
  return RunConfig.make(**{**args, **kw})


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('lr', 0.0, r'--lr=0.0: must be > 0'),
    ('lr_end', 1.0, r'--lr_end=1.0: must be in \[0, --lr'),
    ('dtype', 'int8', 'dtype int8 cannot hold model weights'),
    ('dtype', 'float33', "unknown dtype 'float33'"),
    ('max_test_samples', 0, '--max_test_samples=0: must be >= 1'),
    ('baseline_lr', 0.0, r'--baseline_lr=0.0: must be > 0'),
    ('baseline_lr', float('inf'), r'--baseline_lr=inf: must be a finite number'),
    ('baseline_prefix_len', 0, '--baseline_prefix_len=0: must be >= 1'),
    ('prefix_layers', 'some', "prefix_layers='some', expected one of"),
    ('sigma', 'wide', '--sigma=wide: must be '),
    ('overwrite', True, '--resume and --overwrite exclude each other'),
  ],
)
def test_flag_values_are_refused_when_the_config_is_built(tmp_path, field, value, message):
  extra = {'resume': True} if field == 'overwrite' else {}
  with pytest.raises(ValueError, match=message):
    _rc(tmp_path, **{field: value}, **extra)


def test_empty_reference_file_fails_before_the_model_loads(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(ValueError, match="reference source .*empty.jsonl' has no samples") as e:
    pipeline.run(_rc(tmp_path, reference=(str(empty),)))
  assert e.value.exit_code == cli.USAGE_EXIT
  assert not os.path.exists(tmp_path / 'out')  # nothing written


def test_unknown_benchmark_fails_before_the_model_loads(tmp_path):
  with pytest.raises(ValueError, match='arc_chalenge') as e:
    pipeline.run(_rc(tmp_path, benchmark='arc_chalenge'))
  assert e.value.exit_code == cli.USAGE_EXIT


def test_non_utf8_and_truncated_gzip_name_file_and_line(tmp_path):
  bad = tmp_path / 'latin1.jsonl'
  bad.write_bytes(json.dumps(ROW).encode() + b'\n' + b'{"id": "caf\xe9"}\n')
  with pytest.raises(TaskDataError, match=r'latin1.jsonl, line 2: not UTF-8 text'):
    load_examples(str(bad))
  gz = tmp_path / 'cut.jsonl.gz'
  rows = [{**ROW, 'id': f'q{i}', 'question': f'{i} ' * 50} for i in range(200)]
  with gzip.open(gz, 'wt') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  data = gz.read_bytes()
  gz.write_bytes(data[: len(data) // 2])
  with pytest.raises(TaskDataError, match=r'cut.jsonl.gz, line \d+: cannot read .*truncated'):
    load_examples(str(gz))


def test_garbage_line_in_results_names_file_line_and_fix(tmp_path):
  path = tmp_path / 'results.jsonl'
  good = json.dumps({'method': 'base', 'id': 'q1', 'correct': True})
  path.write_text(f'{good}\n{{"method": "base", "id\n{good}\n')
  with pytest.raises(
    results.ResultsFileError, match=r'results.jsonl, line 2: .*--resume.*--overwrite'
  ):
    results.read_rows(str(path))
  with pytest.raises(results.ResultsFileError, match='line 2'):
    results.ResultsWriter(str(tmp_path), resume=True)


def _write_results(out, rc=None):
  os.makedirs(out, exist_ok=True)
  _jsonl(os.path.join(out, 'results.jsonl'), [{'method': 'base', 'id': 'q1', 'correct': True}])


def test_existing_results_need_resume_or_overwrite(tmp_path):
  rc = _rc(tmp_path)
  run_output.prepare(rc)
  _write_results(rc.execution.output_dir)
  (tmp_path / 'out' / 'notes.txt').write_text('mine')
  with pytest.raises(results.ResultsExistError, match='--resume .*--overwrite') as e:
    run_output.prepare(rc)
  assert e.value.exit_code == cli.USAGE_EXIT
  run_output.prepare(_rc(tmp_path, overwrite=True))
  assert sorted(os.listdir(tmp_path / 'out')) == ['notes.txt', 'run_config.json']


def test_resume_refuses_changed_settings(tmp_path):
  rc = _rc(tmp_path, methods=('base', 'ngd'))
  run_output.prepare(rc)
  _write_results(rc.execution.output_dir)
  with pytest.raises(run_output.ConfigMismatchError, match=r'lr: 0.01 -> 0.1'):
    run_output.prepare(_rc(tmp_path, methods=('base', 'ngd'), lr=0.1, resume=True))
  with pytest.raises(run_output.ConfigMismatchError, match='max_test_samples'):
    run_output.prepare(_rc(tmp_path, methods=('base', 'ngd'), max_test_samples=5, resume=True))
  with pytest.raises(run_output.ConfigMismatchError, match='methods'):
    run_output.prepare(_rc(tmp_path, methods=('base',), resume=True))
  # Allowed: more methods, another batch size or cache directory.
  run_output.prepare(_rc(tmp_path, methods=('base', 'ngd', 'icl'), batch_size=3, resume=True))


def _refs(n=3, layers=4, experts=8):
  examples = [
    Example(id=f'r{i}', task='t', context=f'q{i}', choices=('a', 'b'), gold=0) for i in range(n)
  ]
  probs = np.full((n, layers, experts), 1 / experts, np.float32)
  emb = np.eye(n, 5, dtype=np.float32)
  return references.ReferenceSet(examples, emb, probs, key='k1', num_candidates=n)


@pytest.mark.parametrize('damage', ['truncated', 'nan', 'misshaped', 'wrong_routing'])
def test_corrupt_reference_cache_is_rebuilt(tmp_path, damage, caplog):
  refs = _refs()
  cache = str(tmp_path / 'cache')
  entry = references.save(cache, refs, {'x': 1})
  arrays = os.path.join(entry, 'arrays.npz')
  if damage == 'truncated':
    os.truncate(arrays, os.path.getsize(arrays) // 2)
  else:
    emb, probs = refs.embeddings, refs.router_probs
    if damage == 'nan':
      emb = emb.copy()
      emb[1, 1] = np.nan
    elif damage == 'misshaped':
      probs = probs[:2]
    np.savez(arrays, embeddings=emb, router_probs=probs)
  routing = (4, 6) if damage == 'wrong_routing' else (4, 8)
  assert references.load_cached(cache, 'k1', refs.examples, routing) is None
  assert 'is corrupt' in caplog.text and not os.path.exists(entry)
  references.save(cache, refs, {'x': 1})  # rebuilt
  assert len(references.load_cached(cache, 'k1', refs.examples, (4, 8))) == 3


def test_wilson_interval_and_wide_table_header():
  lo, hi = results.wilson_interval(5, 10)
  np.testing.assert_allclose([lo, hi], [0.2366, 0.7634], atol=1e-4)
  assert results.wilson_interval(0, 20)[0] == 0.0 and results.wilson_interval(20, 20)[1] == 1.0
  rows = [{'method': 'base', 'id': str(i), 'correct': i < 3} for i in range(4)]
  summary = results.summarize(rows)
  assert summary['base']['accuracy_ci95'] == [round(x, 4) for x in results.wilson_interval(3, 4)]
  table = results.format_table(summary, 'runs/commonsense_qa_dev_subset.jsonl')
  assert 'commonsense_qa_dev_subset' in table.splitlines()[0]
  assert '[30.1, 95.4]' in table


def _main(*flags, timeout=300) -> subprocess.CompletedProcess:
  args = [sys.executable, '-m', 'c3po_jax.main', *flags]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_usage_errors_are_one_line_with_exit_code_2(tmp_path):
  ckpt = f'--checkpoint_dir={tmp_path}/none'
  cases = [
    (['--benchmark=arc_challenge', ckpt], 'need --reference sources'),
    (['--benchmark=arc_challenge', '--reference=sciq', '--lr=0', ckpt], '--lr=0.0: must be > 0'),
    (['--benchmark=arc_challenge', '--reference=sciq', '--dtype=int8', ckpt], 'cannot hold'),
    (['--benchmark=nope', '--reference=sciq', ckpt], "'nope'"),
    (['--nonsense_flag=1'], 'nonsense_flag'),
  ]
  for flags, message in cases:
    proc = _main(*flags, f'--output_dir={tmp_path}/out')
    assert proc.returncode == 2, (flags, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()  # our INFO logs, then the one error line
    assert [x for x in lines if x.startswith('error: ')] == lines[-1:], lines
    assert message in lines[-1] and 'Traceback' not in proc.stderr, lines
  assert not os.path.exists(tmp_path / 'out')


def test_help_lists_benchmarks_and_methods():
  proc = _main('--help')
  assert 'kernel_regression' in proc.stdout and 'arc_challenge' in proc.stdout
  assert 'intentionally kept short' not in proc.stdout


def test_seconds_per_sample_leaves_out_the_first_compiling_batch():
  times = [9.0, 9.0, 1.0, 1.0, 2.0]  # per-sample times of batches of 2
  rows = [
    {'method': 'ngd', 'id': str(i), 'correct': True, 'seconds': t} for i, t in enumerate(times)
  ]
  s = results.summarize(rows)['ngd']
  assert s['seconds_per_sample'] == round(4 / 3, 5) and s['first_batch_seconds_per_sample'] == 9.0
  assert results.summarize(rows[:2])['ngd']['seconds_per_sample'] == 9.0  # one batch only


def test_seconds_per_sample_leaves_out_measured_compilation():
  # Rows that carry their share of the batch's compilation: steady time and total compile apart.
  rows = [
    {'method': 'ngd', 'id': str(i), 'correct': True, 'seconds': 1.0, 'compile_seconds': c}
    for i, c in enumerate([5.0, 5.0, 0.0])
  ]
  s = results.summarize(rows)['ngd']
  assert s['seconds_per_sample'] == 1.0 and s['compile_seconds'] == 10.0
