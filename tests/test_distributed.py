"""Scale-out: meshes, shardings, process shares, and sharded / multi-process runs.

The end-to-end tests run the CLI in subprocesses: XLA's host device count
must be set before JAX starts (the rest of the suite keeps one device), and a
multi-process run needs processes. All runs use a one-layer random model, six
ARC-Challenge questions and sixteen OpenBookQA references; each compiles its
few programs once (one token bucket), which is most of its time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from c3po_jax.ckpts.checkpoint import save_checkpoint
from c3po_jax.run import mesh as mesh_lib
from c3po_jax.run import results
from models import transformer
from models.config import MoeConfig
from models.families.olmoe import OLMOE_1B_7B_0924

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Vocabulary of the OLMoE tokenizer (ids up to 50279); everything else tiny.
TINY = MoeConfig(
  vocab_size=50304,
  hidden_size=32,
  intermediate_size=16,
  num_hidden_layers=1,
  num_attention_heads=4,
  num_key_value_heads=2,
  num_experts=8,
  num_experts_per_tok=2,
  max_position_embeddings=2048,
)
RUN_FLAGS = (
  '--benchmark=arc_challenge',
  '--reference=openbookqa',
  '--max_test_samples=6',
  '--max_reference_samples=16',
  '--ngd_steps=2',
  '--lr=0.5',
  # A random model's alpha search is a near-tie that rounding decides: fix alpha.
  '--kr_alpha=0.5',
  '--critical_layers=last:1',
  '--core_experts=4',
  '--max_similarity=1.0',  # a random model's embeddings are all alike
  '--batch_size=2',
  '--max_len=32',  # every prompt in one token bucket: one compilation per function
  '--num_plots=0',
)
METHODS = 'base,kernel_regression,ngd'
TIMEOUT = 420


# ---- the mesh and shardings ----


def test_parse_mesh_shape():
  assert mesh_lib.parse_mesh_shape(None) == {}
  assert mesh_lib.parse_mesh_shape('') == {}
  assert mesh_lib.parse_mesh_shape('data:4, expert:2') == {'data': 4, 'expert': 2}
  assert mesh_lib.parse_mesh_shape('expert:-1') == {'expert': -1}
  for bad in ('data', 'data:x', 'batch:2', 'data:0', 'data:2,data:2', 'data:-1,expert:-1'):
    with pytest.raises(ValueError):
      mesh_lib.parse_mesh_shape(bad)


def test_resolve_mesh_sizes():
  resolve = mesh_lib._resolve
  assert resolve({}, 8) == (8, 1, 1)
  assert resolve({'expert': 2}, 8) == (4, 2, 1)
  assert resolve({'data': 2, 'expert': -1}, 8) == (2, 4, 1)
  assert resolve({'data': 2, 'expert': 2, 'model': 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError):
    resolve({'expert': 3}, 8)


def test_make_mesh_on_one_device():
  mesh = mesh_lib.make_mesh(None)
  assert dict(mesh.shape) == {'data': 1, 'expert': 1, 'model': 1}
  with pytest.raises(ValueError, match='needs 2 devices'):
    mesh_lib.make_mesh('data:2')


def test_check_batch_size():
  mesh = AbstractMesh((4, 2, 1), mesh_lib.MESH_AXES)
  mesh_lib.check_batch_size(8, mesh)
  with pytest.raises(ValueError, match='multiple of the data axis'):
    mesh_lib.check_batch_size(6, mesh)


def test_param_specs_split_experts_and_widths():
  specs = mesh_lib.param_specs(OLMOE_1B_7B_0924)
  shapes = transformer.param_shapes(OLMOE_1B_7B_0924)
  moe = specs['layer_3']['moe']
  assert moe['experts']['gate'] == P('expert', None, 'model')  # [E, D, F]
  assert moe['experts']['up'] == P('expert', None, 'model')
  assert moe['experts']['down'] == P('expert', 'model', None)  # [E, F, D]
  assert moe['router']['kernel'] == P(None, 'expert')  # [D, E]: the router's E column
  assert specs['layer_0']['attn']['q'] == P(None, 'model')
  assert specs['layer_0']['input_norm']['scale'] == P(None)
  assert specs['lm_head'] == P(None, 'model')
  # Every spec names a mesh axis or None for each dimension.
  for spec, shape in zip(
    _leaves(specs, lambda x: isinstance(x, P)), _leaves(shapes, lambda x: isinstance(x, tuple))
  ):
    assert len(spec) == len(shape)
    assert set(spec) <= {None, *mesh_lib.MESH_AXES}


def _leaves(tree, is_leaf):
  import jax

  return jax.tree.leaves(tree, is_leaf=is_leaf)


def test_param_shardings_check_divisibility():
  ok = AbstractMesh((1, 8, 2), mesh_lib.MESH_AXES)  # 64 experts, F = 1024
  mesh_lib.param_shardings(OLMOE_1B_7B_0924, ok)
  with pytest.raises(ValueError, match='gate'):
    mesh_lib.param_shardings(OLMOE_1B_7B_0924, AbstractMesh((1, 3, 1), mesh_lib.MESH_AXES))


# ---- processes and their results files ----


def test_process_share_covers_every_sample_once():
  items = list(range(11))
  for count in (1, 2, 3, 4):
    shares = [mesh_lib.process_share(items, k, count) for k in range(count)]
    assert sorted(sum(shares, [])) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_initialize_needs_a_coordinator():
  mesh_lib.initialize()  # one process: nothing to do
  with pytest.raises(ValueError, match='coordinator_address'):
    mesh_lib.initialize(num_processes=2, process_id=0)


def test_results_filename():
  assert results.results_filename(0, 1) == results.RESULTS_FILE
  assert results.results_filename(0, 2) == 'results.process-0.jsonl'
  assert results.results_filename(3, 4) == 'results.process-3.jsonl'


def _row(method, i, **kw):
  return {'method': method, 'id': f'q{i}', **kw}


def test_merge_rows_dedups_in_single_process_order():
  ids = [f'q{i}' for i in range(4)]
  p0 = [_row('base', 0), _row('base', 2), _row('ngd', 0), _row('ngd', 2, v=1)]
  p1 = [_row('base', 1), _row('base', 3), _row('ngd', 3), _row('ngd', 2, v=2)]
  old = [_row('icl', 9), _row('base', 1, v=0)]
  merged = results.merge_rows([old, p0, p1], ['base', 'ngd'], ids)
  keys = [(r['method'], r['id']) for r in merged]
  assert keys == [
    ('base', 'q0'),
    ('base', 'q1'),
    ('base', 'q2'),
    ('base', 'q3'),
    ('ngd', 'q0'),
    ('ngd', 'q2'),
    ('ngd', 'q3'),
    ('icl', 'q9'),  # an earlier run's method, kept after the current ones
  ]
  assert merged[1]['v'] == 0 and merged[5]['v'] == 1  # the first row seen wins


def test_results_writer_refuses_to_mix_process_counts(tmp_path):
  out = str(tmp_path)
  w = results.results_writer(out, False, 1, 2)
  assert os.path.basename(w.path) == 'results.process-1.jsonl'
  w.write(_row('base', 0))
  w.close()
  with pytest.raises(results.ResultsExistError, match='same number of processes'):
    results.results_writer(out, True, 0, 1)  # one process resuming a 2-process run
  with open(os.path.join(out, results.RESULTS_FILE), 'w') as f:
    f.write(json.dumps(_row('base', 0)) + '\n')
  with pytest.raises(results.ResultsExistError, match='--resume'):
    results.results_writer(out, False, 0, 2)  # the merge would overwrite results.jsonl
  w = results.results_writer(out, True, 1, 2)
  assert w.done == {('base', 'q0')}
  w.close()


def test_parse_lines_drops_a_torn_last_line():
  data = b'{"method": "m", "id": "1"}\n{"method": "m", "id": "2"}\n{"a": '
  got = results.parse_rows(data, 'f')
  assert got == [{'method': 'm', 'id': '1'}, {'method': 'm', 'id': '2'}]


def test_parse_lines_names_the_file_and_line_of_garbage():
  data = b'{"method": "m", "id": "1"}\nnot json\n{"method": "m", "id": "2"}\n'
  with pytest.raises(results.ResultsFileError, match='merged.jsonl, line 2'):
    results.parse_rows(data, 'merged.jsonl')


# ---- end to end, in subprocesses ----


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  import jax

  root = tmp_path_factory.mktemp('scale_out')
  params = jax.tree.map(np.asarray, transformer.init_params(TINY, jax.random.PRNGKey(0)))
  save_checkpoint(str(root / 'ckpt'), TINY, params)
  return root


def _env(devices=1):
  env = dict(os.environ)
  # Compiling is most of each run: the suite's fast-compile flags (conftest.py, the
  # same in every run), and the host device count.
  flags = (os.environ.get('XLA_FLAGS', ''), f'--xla_force_host_platform_device_count={devices}')
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags).strip())
  return env


def _cli(root, name, *extra, methods=METHODS):
  return [
    sys.executable,
    '-m',
    'c3po_jax.main',
    f'--checkpoint_dir={root / "ckpt"}',
    f'--output_dir={root / name}',
    f'--cache_dir={root / name}_refs',
    f'--methods={methods}',
    *RUN_FLAGS,
    *extra,
  ]


def _start(cmd, env, log):
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs, logs, timeout=TIMEOUT):
  """Waits for every process; on a failure or timeout kills the rest, shows logs."""
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  codes = [p.returncode for p in procs]
  if any(codes):
    tails = [open(log.name).read()[-3000:] for log in logs]
    pytest.fail(f'exit codes {codes}\n' + '\n-----\n'.join(tails))


def _run(root, name, *extra, devices=1, methods=METHODS):
  with open(root / f'{name}.log', 'w') as log:
    _wait_all([_start(_cli(root, name, *extra, methods=methods), _env(devices), log)], [log])
  return results.read_rows(str(root / name / results.RESULTS_FILE))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_processes(root, name, *extra, devices=1, methods=METHODS):
  """Two processes on localhost, each with `devices` CPU devices."""
  port = _free_port()
  procs, logs = [], []
  for k in range(2):
    log = open(root / f'{name}.{k}.log', 'a')
    flags = (f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={k}')
    cmd = _cli(root, name, *flags, *extra, methods=methods)
    procs.append(_start(cmd, _env(devices), log))
    logs.append(log)
  return procs, logs


def _keys(rows):
  return [(r['method'], r['id']) for r in rows]


def _assert_same_rows(got, want):
  """Same (method, id) rows in the same order, equal up to float rounding."""
  assert _keys(got) == _keys(want)
  for g, w in zip(got, want):
    g, w = dict(g), dict(w)
    for key in ('seconds', 'compile_seconds'):  # timings differ from run to run
      g.pop(key, None), w.pop(key, None)
    _assert_close(g, w, f'{w["method"]} {w["id"]}')


def _assert_close(a, b, where):
  if isinstance(b, dict):
    assert sorted(a) == sorted(b), where
    for key in b:
      _assert_close(a[key], b[key], f'{where}.{key}')
  elif isinstance(b, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f'{where}[{i}]')
  elif isinstance(b, float):
    assert a == pytest.approx(b, abs=2e-4), where
  else:
    assert a == b, where


@pytest.fixture(scope='module')
def baseline(tiny):
  """One process on one device: the reference result rows."""
  rows = _run(tiny, 'single')
  assert len(rows) == 18
  assert any(r.get('neighbours') for r in rows)  # the methods had neighbours to fit
  return rows


@pytest.mark.slow
def test_sharded_parameters_are_split(tiny):
  """Orbax restores each leaf straight into its shard of an 8-device mesh."""
  code = (
    'import json, sys; from c3po_jax.run import mesh as mesh_lib, runner\n'
    'from c3po_jax.run.config import RunConfig\n'
    "rc = RunConfig.make(checkpoint_dir=sys.argv[1], benchmark='-', reference=('-',))\n"
    "mesh = mesh_lib.make_mesh('data:2,expert:2,model:2')\n"
    'config, params, _ = runner.load_model(rc, mesh)\n'
    "moe = params['layer_0']['moe']\n"
    "moe = {**moe['experts'], 'router': moe['router']['kernel']}\n"
    'shape = lambda x: [list(s.data.shape) for s in x.addressable_shards]\n'
    'print(json.dumps({k: shape(v) for k, v in moe.items()}))\n'
  )
  out = subprocess.run(
    [sys.executable, '-c', code, str(tiny / 'ckpt')],
    cwd=REPO,
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  shards = json.loads(out.stdout.strip().splitlines()[-1])
  e, d, f = TINY.num_experts, TINY.hidden_size, TINY.intermediate_size
  assert shards['gate'] == [[e // 2, d, f // 2]] * 8  # [E, D, F] over expert x model
  assert shards['down'] == [[e // 2, f // 2, d]] * 8
  assert shards['router'] == [[d, e // 2]] * 8


def _only(rows, methods):
  return [r for r in rows if r['method'] in methods]


@pytest.mark.slow
def test_sharded_run_matches_single_device(tiny, baseline):
  """8 devices: the batch over data:2, experts over expert:2, widths over model:2."""
  mesh = 'data:2,expert:2,model:2'
  rows = _run(tiny, 'sharded', f'--mesh_shape={mesh}', devices=8, methods='base,ngd')
  with open(tiny / 'sharded.log') as f:
    assert "mesh {'data': 2, 'expert': 2, 'model': 2}" in f.read()
  _assert_same_rows(rows, _only(baseline, ('base', 'ngd')))


@pytest.mark.slow
def test_two_processes_match_one(tiny, baseline):
  """Two processes, each data-parallel over its two devices (the default mesh)."""
  procs, logs = _start_processes(tiny, 'two', devices=2)
  _wait_all(procs, logs)
  for k in (0, 1):
    with open(tiny / f'two.{k}.log') as f:
      assert f"process {k} mesh {{'data': 2, 'expert': 1, 'model': 1}}" in f.read()
  rows = results.read_rows(str(tiny / 'two' / results.RESULTS_FILE))
  _assert_same_rows(rows, baseline)
  per = [results.read_rows(str(tiny / 'two' / f'results.process-{k}.jsonl')) for k in (0, 1)]
  assert sorted(_keys(per[0] + per[1])) == sorted(_keys(baseline))  # disjoint shares
  ids = [r['id'] for r in baseline if r['method'] == 'base']
  assert {r['id'] for r in per[1]} == set(ids[1::2])
  with open(tiny / 'two' / results.SUMMARY_FILE) as f:
    assert json.load(f)['methods']['ngd']['n'] == 6


def _lines(path):
  with open(path, 'rb') as f:
    data = f.read()
  return data[: data.rfind(b'\n') + 1].splitlines()


@pytest.mark.slow
def test_killed_process_resumes_without_loss_or_duplicates(tiny, baseline):
  out = tiny / 'killed'
  file1 = out / 'results.process-1.jsonl'
  procs, logs = _start_processes(tiny, 'killed', methods='base,ngd')
  deadline = time.monotonic() + TIMEOUT
  # Process 1 has written its base rows; its other methods are still to come.
  while not (file1.exists() and len(_lines(file1)) >= 3):
    assert time.monotonic() < deadline and procs[1].poll() is None, 'process 1 never wrote'
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  procs[0].send_signal(signal.SIGKILL)  # the job dies with it (process 0 would wait)
  for p in procs:
    p.wait()
  with open(file1, 'ab') as f:
    f.write(b'{"method": "ngd", "id": ')  # a line torn by the crash
  file0 = out / 'results.process-0.jsonl'
  before = {0: _lines(file0) if file0.exists() else [], 1: _lines(file1)}
  assert 3 <= len(before[1]) < 6
  assert not (out / results.RESULTS_FILE).exists()

  procs, logs = _start_processes(tiny, 'killed', '--resume', methods='base,ngd')
  _wait_all(procs, logs)
  for k in (0, 1):
    after = _lines(out / f'results.process-{k}.jsonl')
    assert after[: len(before[k])] == before[k]  # rows written before the crash kept
    keys = _keys([json.loads(x) for x in after])
    assert len(keys) == len(set(keys)) == 6  # nothing lost, nothing twice
  rows = results.read_rows(str(out / results.RESULTS_FILE))
  _assert_same_rows(rows, _only(baseline, ('base', 'ngd')))
