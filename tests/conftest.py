"""Shared test setup: JAX on CPU in float32, one compilation cache per run, tiny models.

Most of the suite's time is XLA compiling the same small programs in test after
test (and in the subprocesses of the end-to-end tests). JAX's persistent
compilation cache is pointed at one temporary directory per pytest run, set in
the environment before JAX is imported, so the xdist workers and every
subprocess they start read and write the same cache; it is removed when the
run ends. A JAX_COMPILATION_CACHE_DIR set by the caller is used as it is (and
kept).

The session fixtures below are the things many test files build: treat what
they return as read-only (copy a checkpoint directory before editing it).
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_OWN_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  # Only the first process creates it (the xdist controller, or a plain run);
  # workers and subprocesses inherit the variable.
  _OWN_CACHE = tempfile.mkdtemp(prefix='jax-compilation-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE
# The suite's programs are tiny: compiling them costs far more than running
# them, so XLA's CPU backend skips its LLVM optimization passes (about 40% less
# time for a file of end-to-end tests) and emits fusions with its older loop
# emitters rather than the MLIR fusion emitters (XLA compile time about halves:
# the whole suite's pytest went from 20 min 49 s to 15 min 51 s), and compiles
# each program's code as one LLVM module rather than 32 parts for a thread pool
# the busy workers cannot use (about 15% less compile time for a large
# program). Floating-point semantics are the same (no fast-math either way):
# the parity tests hold at their tolerances. Set XLA_FLAGS with an optimization
# level of your own to keep yours.
# flag: (the suite's value, XLA's default)
_COMPILE_FLAGS = {
  'xla_backend_optimization_level': (0, 3),
  'xla_llvm_disable_expensive_passes': (True, False),
  'xla_cpu_use_fusion_emitters': (False, True),
  'xla_cpu_parallel_codegen_split_count': (1, 32),
}
_FAST_COMPILE = ' '.join(f'--{k}={str(v).lower()}' for k, (v, _) in _COMPILE_FLAGS.items())
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_FAST_COMPILE}'.strip()
# Cache every program, however quick to compile or small.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import jax  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
# Parity against PyTorch float32 needs full-precision matmuls.
jax.config.update('jax_default_matmul_precision', 'highest')


# Test files by their measured time (worker-seconds, the whole suite on the
# 2-core machine), slowest first: xdist (--dist loadfile) hands files to workers
# in collection order, so the slow ones start early and small files fill the
# end (before: one worker finished 40 s before the other). Files not listed
# keep their order, after these.
SLOWEST_FILES = (
  'test_baselines.py',
  'test_cli.py',
  'test_families_mla.py',
  'test_prefix_cache.py',
  'test_token_positions.py',
  'test_distributed.py',
  'test_readme.py',
  'test_demo_suite.py',
  'test_ablate.py',
  'test_families_granite_gpt_oss.py',
  'test_families.py',
  'test_table1.py',
  'test_methods.py',
  'test_premise.py',
  'test_remix.py',
  'test_pathway.py',
  'test_moe.py',
  'test_content_keys.py',
  'test_remix_pipeline.py',
  'test_per_method.py',
  'test_embedder.py',
  'test_bad_input.py',
  'test_run_output.py',
  'test_decode.py',
  'test_scoring.py',
  'test_accelerator_bench.py',
  'test_convert_safety.py',
)


def pytest_configure(config):
  # xdist would otherwise hand out files by their number of tests, largest first.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """Slowest files first (SLOWEST_FILES); a file's tests keep their order."""
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # a stable sort


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def xla_default_options() -> dict:
  """XLA's own values of the flags `_FAST_COMPILE` sets, as `jax.jit` compiler_options.

  For the rare program that runs far longer than it compiles (scoring a whole
  dev set): jitted with these, it is compiled as users' runs compile it.
  """
  return {flag: default for flag, (_, default) in _COMPILE_FLAGS.items()}


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> str:
  """A tiny random OLMoE checkpoint for the real OLMoE tokenizer (seed 0), shared read-only."""
  from c3po_jax.testing.checkpoints import make_checkpoint

  return make_checkpoint(tmp_path_factory.mktemp('tiny_checkpoint') / 'tiny')


@pytest.fixture(scope='module', autouse=True)
def _compiled_programs_per_file():
  """Each test file starts without the compiled programs of the files before it.

  Programs are shared within a file (module-level jitted helpers, `engine.shared`);
  after it they are dropped, so a worker's memory does not grow with every file
  it runs (the persistent compilation cache still serves a later file's repeats).
  """
  yield
  import gc

  from c3po_jax.remix import engine

  engine.shared.cache_clear()
  jax.clear_caches()
  gc.collect()
