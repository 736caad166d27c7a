"""What a run records besides its rows: the stored run config and provenance.

`prepare` runs before the model loads. It refuses results already in the
output directory unless the run resumes (`--resume`) or replaces them
(`--overwrite`, which deletes only the files a run writes), and a resumed run
whose settings differ from the stored `run_config.json` in anything that
changes results. Settings that only change how fast or where things run
(`EXECUTION_FIELDS`) may differ, and the methods list may grow (each method's
rows depend only on the other settings); everything else must match.
`check_checkpoint` then compares the loaded parameters' fingerprint with the
stored one, so a checkpoint re-converted at the same path is caught too.

`provenance` is the block summary.json carries: package versions, the git
commit, the checkpoint's fingerprint, the data splits and sizes actually used,
when the run started and finished (UTC) and its wall time.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import time

import jax
from absl import logging

from c3po_jax.common import files
from c3po_jax.common.errors import UsageError
from c3po_jax.run import results
from c3po_jax.run.config import EXECUTION_GROUPS, GROUP_OF

RUN_CONFIG_FILE = 'run_config.json'
# Fields that change neither the rows nor the summary of a run.
EXECUTION_FIELDS = frozenset(n for n, g in GROUP_OF.items() if g in EXECUTION_GROUPS)
PACKAGES = (
  'c3po-jax',
  'jax',
  'jaxlib',
  'flax',
  'optax',
  'orbax-checkpoint',
  'transformers',
  'tokenizers',
  'numpy',
)


class ConfigMismatchError(UsageError):
  """--resume with settings that differ from the stored run's."""


def _as_json(rc) -> dict:
  return json.loads(json.dumps(rc.flat()))


def _has_results(output_dir: str) -> bool:
  return any(
    os.path.getsize(p) > 0
    for p in (os.path.join(output_dir, f) for f in os.listdir(output_dir))
    if os.path.basename(p).startswith('results') and p.endswith('.jsonl')
  )


def config_mismatch(stored: dict, rc) -> list[str]:
  """The settings of rc that differ from stored, as 'field: stored -> now'."""
  now = _as_json(rc)
  out = []
  for field in sorted(set(stored) | set(now)):
    if field in EXECUTION_FIELDS or stored.get(field) == now.get(field):
      continue
    if field == 'methods' and set(stored.get(field) or ()) <= set(now[field]):
      continue  # more methods: the new ones get their own rows
    out.append(f'{field}: {stored.get(field)!r} -> {now.get(field)!r}')
  return out


def check_existing(rc) -> None:
  """Raises unless rc may write into its output directory (see the module docstring)."""
  out = rc.execution.output_dir
  if not (os.path.isdir(out) and _has_results(out)) or rc.execution.overwrite:
    return
  if not rc.execution.resume:
    raise results.ResultsExistError(
      f'--output_dir={out} already has results: pass --resume to continue that run, '
      '--overwrite to replace it, or choose another --output_dir'
    )
  _check_resume(rc)


def prepare(rc) -> None:
  """Checks the output directory against rc and stores rc (see the module docstring)."""
  out = rc.execution.output_dir
  check_existing(rc)
  if os.path.isdir(out) and _has_results(out) and rc.execution.overwrite:
    if jax.process_index() == 0:
      gone = results.remove_results(out)
      logging.warning(
        '--overwrite: removed %d result files of the earlier run in %s', len(gone), out
      )
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RUN_CONFIG_FILE)
    stored = {}
    if rc.execution.resume and os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)  # keeps checkpoint_fingerprint for check_checkpoint
    files.write_json(path, {**stored, 'run_config': _as_json(rc)})


def _check_resume(rc) -> None:
  path = os.path.join(rc.execution.output_dir, RUN_CONFIG_FILE)
  if not os.path.exists(path):
    logging.warning('%s is missing: cannot check that --resume uses the same settings', path)
    return
  try:
    with open(path) as f:
      stored = json.load(f)['run_config']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f'{path} is unreadable ({e}): cannot check the settings of --resume') from e
  diff = config_mismatch(stored, rc)
  if diff:
    raise ConfigMismatchError(
      f'--resume with settings that differ from the run in {rc.execution.output_dir} '
      f'({"; ".join(diff)}): its rows would mix both; use the stored settings, '
      'another --output_dir, or --overwrite'
    )


def check_checkpoint(rc, fingerprint: str) -> None:
  """Refuses --resume over another checkpoint's rows; stores the fingerprint."""
  path = os.path.join(rc.execution.output_dir, RUN_CONFIG_FILE)
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return  # prepare wrote it, or another process did: nothing to compare with
  before = stored.get('checkpoint_fingerprint')
  if rc.execution.resume and before not in (None, fingerprint):
    raise ConfigMismatchError(
      f'--resume with other model weights than the run in {rc.execution.output_dir} (parameter '
      f'fingerprint {before} -> {fingerprint}, same --checkpoint_dir={rc.model.checkpoint_dir}): '
      'its rows would mix both; use another --output_dir, or --overwrite'
    )
  if jax.process_index() == 0 and before != fingerprint:
    stored['checkpoint_fingerprint'] = fingerprint
    files.write_json(path, stored)


def _versions() -> dict:
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_commit() -> dict | None:
  """The commit of the source tree this package runs from, and whether it is dirty."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10
    )
    dirty = subprocess.run(
      ['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.SubprocessError):
    return None
  if head.returncode != 0:
    return None
  return {'commit': head.stdout.strip(), 'dirty': bool(dirty.stdout.strip())}


def timestamp(seconds: float) -> str:
  """A time.time() value as an ISO 8601 UTC timestamp to the second."""
  utc = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
  return utc.isoformat(timespec='seconds')


def provenance(rc, data: dict, started: float) -> dict:
  """summary.json's provenance block; data: the splits and sizes used."""
  with open(os.path.join(rc.execution.output_dir, RUN_CONFIG_FILE)) as f:
    fingerprint = json.load(f).get('checkpoint_fingerprint')
  now = time.time()
  return {
    'date': timestamp(now),  # when the run finished
    'started': timestamp(started),
    'finished': timestamp(now),
    'wall_seconds': round(now - started, 1),
    'versions': _versions(),
    'git': git_commit(),
    'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
    'checkpoint': {
      'path': rc.model.checkpoint_dir,
      'fingerprint': fingerprint,
    },
    'data': data,
  }
