"""A written demo suite's manifest (suite.json): reading, writing, and edits.

Edits of a suite already on disk: copying the C3PO settings chosen on dev
from another suite, and giving every benchmark one shared reference pool.
"""

from __future__ import annotations

import json
import os

from c3po_jax.common import files

MANIFEST = 'suite.json'
FORMAT = 'c3po-jax/demo-suite'


def write_manifest(suite_dir: str, out: dict) -> None:
  """Writes suite.json (through a temporary file, so a reader never sees half of it)."""
  path = os.path.join(suite_dir, MANIFEST)
  files.write_json(path, out)


def read_manifest(suite_dir: str) -> dict:
  with open(os.path.join(suite_dir, MANIFEST)) as f:
    out = json.load(f)
  if out.get('format') != FORMAT:
    raise ValueError(f'{suite_dir}/{MANIFEST} is not a demo suite manifest')
  return out


def copy_settings(source_dir: str, output_dir: str) -> None:
  """Copies the C3PO settings chosen on dev (c3po_settings) from one suite to another."""
  settings = read_manifest(source_dir).get('c3po_settings')
  if settings is None:
    raise ValueError(f'{source_dir}/{MANIFEST} has no c3po_settings to copy')
  out = read_manifest(output_dir)
  out['c3po_settings'] = settings
  write_manifest(output_dir, out)


def share_references(suite_dir: str) -> None:
  """Gives every benchmark of a suite the same reference pool: all benchmarks' references.

  The default pairing gives each family its own references (as the paper
  pairs each benchmark with related reference sets), so the pool alone tells
  a method which family a test question belongs to; with a shared pool the
  neighbour search has to find it. Each benchmark's own sources are kept
  under `own_reference_sources`.
  """
  out = read_manifest(suite_dir)
  benchmarks = out['benchmarks']
  pool = {}  # file -> source, in benchmark order (a second call changes nothing)
  for name in sorted(benchmarks):
    pool.update(zip(benchmarks[name]['reference'], benchmarks[name]['reference_sources']))
  files_, sources = list(pool), list(pool.values())
  for b in benchmarks.values():
    b.setdefault('own_reference_sources', list(b['reference_sources']))
    b['reference'], b['reference_sources'] = list(files_), list(sources)
  write_manifest(suite_dir, out)
