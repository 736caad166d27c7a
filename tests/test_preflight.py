"""Every check that needs no weights runs before the model loads, as a usage error.

`pipeline.open_runner` (which loads the checkpoint) is replaced by a function
that fails the test, so each refusal here provably comes before any loading.
"""

import json
import os
import subprocess
import sys

import pytest

from c3po_jax.common import cli
from c3po_jax.run import pipeline, preflight, results
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig
from c3po_jax.tasks import Example, encoding
from c3po_jax.tasks.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, 'checkpoints', 'demo')
SUITE = os.path.join(DEMO, 'suite')
needs_demo = pytest.mark.skipif(not os.path.isdir(DEMO), reason='no shipped demo checkpoint')


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
  def refuse(rc):
    raise AssertionError('the model was loaded before the check')

  monkeypatch.setattr(pipeline, 'open_runner', refuse)


def _rc(tmp_path, **kw) -> RunConfig:
  args = dict(
    checkpoint_dir=DEMO,
    benchmark=os.path.join(SUITE, 'max_compose_test.jsonl'),
    reference=(os.path.join(SUITE, 'max_words_reference.jsonl'),),
    fmt='rc',
    critical_layers='last:3',
    max_test_samples=4,
    output_dir=str(tmp_path / 'out'),
    cache_dir=str(tmp_path / 'cache'),
  )
  return RunConfig.make(**{**args, **kw})


@needs_demo
@pytest.mark.parametrize(
  'spec, message',
  [
    ('last:99', r'N must be in \[1, 4\]'),
    ('abc', 'expected last:N'),
    ('7', 'out of range|layer'),
  ],
)
def test_bad_critical_layers_fail_from_config_json(tmp_path, spec, message):
  with pytest.raises(ValueError, match=message) as e:
    pipeline.run(_rc(tmp_path, critical_layers=spec))
  assert f'--critical_layers={spec}' in str(e.value) and 'has 4 layers of 8 experts' in str(e.value)
  assert e.value.exit_code == cli.USAGE_EXIT
  assert not os.path.exists(tmp_path / 'out')  # no run_config.json left behind


@needs_demo
def test_mc_letters_that_are_not_one_token_fail_before_loading(tmp_path):
  # The demo's vocabulary has its letters only after its own prompt's spacing.
  tok = load_tokenizer(DEMO)
  example = Example(id='x', task='t', context='2 + 2 ?', choices=('4', '5'), gold=0)
  try:
    encoding.encode(tok, example, 'mc')
  except ValueError:
    with pytest.raises(ValueError, match='not a single token'):
      preflight.check_model(_rc(tmp_path, fmt='mc'), example)
  else:
    pytest.skip('the demo tokenizer has single-token letters')


def test_missing_checkpoint_and_malformed_row_are_usage_errors(tmp_path):
  with pytest.raises(preflight.MissingCheckpointError, match='--checkpoint_dir') as e:
    pipeline.run(_rc(tmp_path, checkpoint_dir=str(tmp_path / 'nope')))
  assert e.value.exit_code == cli.USAGE_EXIT
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"id": "a", "question": "q", "choices": ["x", "y"], "answer": 1}\n{"id": \n')
  with pytest.raises(ValueError, match=r'bad.jsonl, line 2') as e:
    pipeline.run(_rc(tmp_path, benchmark=str(bad)))
  assert e.value.exit_code == cli.USAGE_EXIT


@needs_demo
def test_output_dir_errors_name_the_flag(tmp_path):
  afile = tmp_path / 'afile'
  afile.write_text('')
  for out in (afile, afile / 'below'):
    with pytest.raises(NotADirectoryError, match=f'--output_dir={out}') as e:
      pipeline.run(_rc(tmp_path, output_dir=str(out)))
    assert e.value.exit_code == cli.USAGE_EXIT


@needs_demo
def test_a_suite_checks_every_benchmark_before_the_first_runs(tmp_path):
  rc = RunConfig.make(benchmark='(suite)', reference=('(suite)',), output_dir=str(tmp_path / 'out'))
  rc = suite_run.with_suite_settings(rc, SUITE, given={'output_dir'})
  assert rc.model.checkpoint_dir == DEMO or os.path.samefile(rc.model.checkpoint_dir, DEMO)
  names = list(suite_run.read_suite(SUITE)['benchmarks'])
  last = tmp_path / 'out' / names[-1]  # results of the last benchmark only
  last.mkdir(parents=True)
  (last / results.RESULTS_FILE).write_text('{"method": "base", "id": "x"}\n')
  with pytest.raises(results.ResultsExistError, match=f'--output_dir={last} already has') as e:
    suite_run.run_suite(rc, SUITE)
  assert e.value.exit_code == cli.USAGE_EXIT
  with pytest.raises(ValueError, match=r'N must be in \[1, 4\]'):
    suite_run.run_suite(rc.replace(critical_layers='last:5'), SUITE)


def test_resume_counts_rows_kept_dropped_and_to_do(tmp_path, caplog):
  path = tmp_path / results.RESULTS_FILE
  rows = [{'method': m, 'id': i} for m in ('base', 'ngd') for i in ('a', 'b')][:3]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"method": "ngd", "id')
  with caplog.at_level('INFO'):
    got = preflight.log_resume(str(path), ('base', 'ngd', 'icl'), ['a', 'b', 'c'])
  assert got == (3, 1, 9 - 3)  # 3 kept, the torn line dropped, 6 pairs to do
  assert 'keeps 3 rows, drops 1 torn last line(s); 6 of 9' in caplog.text


@needs_demo
def test_a_ten_megabyte_question_tokenizes_only_its_end():
  tok = load_tokenizer(DEMO)
  huge = 'the larger of 3 and 5 ' * 500_000  # 11 MB
  example = Example(id='huge', task='t', context=huge + 'is', choices=('3', '5'), gold=1)
  enc = encoding.encode(tok, example, 'rc', max_len=64)
  assert enc.truncated and len(enc.context) <= 4 * 8 * 64  # a window of at most 2048 characters
  short = Example(id='s', task='t', context='the larger of 3 and 5 is', choices=('3', '5'), gold=1)
  assert not encoding.encode(tok, short, 'rc', max_len=64).truncated
  # The end the model sees is the end of the whole prompt's tokens.
  whole = encoding.encode(tok, Example(**{**short.__dict__, 'context': huge[-2000:] + 'is'}), 'rc')
  assert enc.context[-32:] == whole.context[-32:] and enc.continuations == whole.continuations


@pytest.mark.slow
@needs_demo
def test_bare_command_from_another_directory_finds_the_demo(tmp_path):
  """The demo is found next to the package; a bad layer spec still fails before loading."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  args = [sys.executable, '-m', 'c3po_jax.main', '--critical_layers=last:9']
  proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --critical_layers=last:9')
  assert 'model: MoeConfig' not in proc.stderr and not (tmp_path / 'runs').exists()
  for flag in ('-h', '--help'):
    proc = subprocess.run(
      [sys.executable, '-m', 'c3po_jax.main', flag],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0 and '--critical_layers' in proc.stdout, proc.stderr[-2000:]
