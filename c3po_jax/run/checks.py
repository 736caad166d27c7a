"""Range checks of a RunConfig's values, run when it is built (before any model),
and the check that a suite's files exist (run by main before the first benchmark).

Each failure is a ValueError naming the flag, e.g. `--lr=0.0: must be > 0`,
so a bad value fails in milliseconds, not after minutes of model loading.
"""

from __future__ import annotations

import math
import types

from c3po_jax.ckpts import checkpoint
from c3po_jax.tasks import loading, suites


def _fail(flag: str, value, why: str):
  raise ValueError(f'--{flag}={value}: {why}')


def check_ranges(config) -> None:
  """Raises ValueError on the first value of a RunConfig out of its range."""
  rc = types.SimpleNamespace(**config.flat())
  finite = (('lr', rc.lr), ('lr_end', rc.lr_end), ('max_similarity', rc.max_similarity))
  for flag, value in finite + (('baseline_lr', rc.baseline_lr),):
    if not math.isfinite(value):
      _fail(flag, value, 'must be a finite number')
  if rc.lr <= 0:
    _fail('lr', rc.lr, 'must be > 0 (the cosine schedule decays from it)')
  if rc.baseline_lr <= 0:
    _fail('baseline_lr', rc.baseline_lr, 'must be > 0 (the cosine schedule decays from it)')
  if not 0 <= rc.lr_end <= rc.lr:
    _fail('lr_end', rc.lr_end, f'must be in [0, --lr={rc.lr}]')
  for flag, value, least in (
    ('ngd_steps', rc.ngd_steps, 0),
    ('mode_iters', rc.mode_iters, 0),
    ('baseline_steps', rc.baseline_steps, 0),
    ('baseline_prefix_len', rc.baseline_prefix_len, 1),
    ('baseline_epochs', rc.baseline_epochs, 1),
    ('baseline_batch_size', rc.baseline_batch_size, 1),
    ('core_experts', rc.core_experts, 0),
    ('token_count', rc.token_count, 1),
    ('num_plots', rc.num_plots, 0),
    ('max_len', rc.max_len, 2),
    ('max_test_samples', rc.max_test_samples, 1),
    ('max_reference_samples', rc.max_reference_samples, 1),
  ):
    if value is not None and value < least:
      _fail(flag, value, f'must be >= {least}')
  if not 0 <= rc.mode_alpha <= 1:
    _fail('mode_alpha', rc.mode_alpha, 'must be in [0, 1]')
  if not -1 < rc.max_similarity <= 1:
    _fail('max_similarity', rc.max_similarity, 'a cosine similarity: must be in (-1, 1]')
  if rc.epsilon is not None and not 0 < rc.epsilon <= 2:
    _fail('epsilon', rc.epsilon, 'a cosine distance: must be in (0, 2]')
  if rc.kr_alpha is not None and not 0 <= rc.kr_alpha <= 1:
    _fail('kr_alpha', rc.kr_alpha, 'must be in [0, 1]')
  if rc.sigma not in ('median', 'reference'):
    try:
      ok = float(rc.sigma) > 0
    except ValueError:
      ok = False
    if not ok:
      _fail('sigma', rc.sigma, "must be 'reference', 'median' or a positive number")
  if rc.dtype is not None:
    try:
      checkpoint.param_dtype(rc.dtype)
    except ValueError as e:
      _fail('dtype', rc.dtype, str(e))
  if rc.resume and rc.overwrite:
    raise ValueError('--resume and --overwrite exclude each other: continue the run, or replace it')


def check_suite(suite: str, manifest: dict, split: str) -> None:
  """Raises unless every benchmark of the suite has its split, files and data splits.

  suite: a suite directory or a built-in suite's name (see `tasks.suites`).
  """
  for name, entry in manifest['benchmarks'].items():
    try:
      test, test_split, refs = suites.resolve_entry(suites.base_dir(suite), entry, split)
    except ValueError as e:
      raise ValueError(f'--suite_split={split}: suite benchmark {name!r} has {e}') from None
    try:
      loading.check_available(test, test_split)
      for ref in refs:
        loading.check_available(ref, None if loading.is_generic(ref) else _ref_split(ref))
    except FileNotFoundError as e:
      raise FileNotFoundError(
        f'suite {suite}: benchmark {name!r} names a missing file: {e}'
      ) from None


def _ref_split(source: str) -> str:
  name, split = loading.split_spec(source)
  return split or loading.default_reference_split(name)
